"""`robustness`: the whole relearning protocol on one unlearned model, in one `robustness.json`.

For each seed the forget task's facts are split by `fact_id` into an attacked and an unseen half.
Every attack of a grid (full-parameter and LoRA fine-tuning, learning rates, schedules; the one
fine-tuning attack of `finetune`, which `tamper` runs too) trains on the attacked half's text only,
starting from the unlearned weights, and is evaluated on both halves at several step counts. The
schedule spans the longest attack, and an N-step number is the state after N steps of that attack
(with `constant`, the same as an N-step attack). The envelope is, per step count, the best
unseen-half accuracy over the grid; its value at the largest step count is the headline.

Controls, each attacked with the grid's strongest setting (every setting under `--grid full`):
the base model (how fast a model that never forgot relearns), a benign attack on generic text that
no unlearning or distillation stage trained on, and fictional facts that the model never knew, each
the twin of a real forget fact (its prompt, question and corpus sentences, with a made-up subject and
an answer from the forget task's answer set): their unseen half can only be "recovered" through
format and prior, which makes it the floor. Capability is the kept tasks' accuracy and the perplexity
of held-out generic text before unlearning, after it and after every attack; fluency is the base
model's perplexity of the base, unlearned and best-attacked models' greedy continuations.

Beside the envelope: the recovery share per step count; the worst case (the envelope, the real
forget facts during the fictional attack or the benign attack, whichever recovered most); the unseen
half under an attack chosen on the other of two folds of it (the envelope chooses on the facts it
reports, which biases it up); each named paper's own attack (`--paper_attacks`); and facts whose
subject gives the answer away, left out of the split and reported on their own (`--guessable`).

Other phrasings of the forget facts (`--phrasings`: the questions asked as "Q: ... A:", or the
user's own question files) are measured on both halves for the base and unlearned models and at
the end of every grid attack: forgetting that holds only for the phrasing it was trained on, or
relearning that carries to phrasings the attack never used, shows there.

One model is loaded; the unlearned and base weights stay in memory as CPU state dicts and are
copied back before each attack. Each finished attack is written to its own file, so a killed
protocol continues with `--resume`, skipping finished attacks (with the same settings only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import write_json_atomic, write_jsonl_atomic, write_text_atomic
from ..core.checks import check_resumed_config
from ..core.config import ConfigError, read_config_file, to_jsonable
from ..core.errors import read_text
from ..core.outputs import Output, prepare_output
from ..core.paths import (
    MERGED_DIR,
    MODEL_CONFIG_FILE,
    ROBUSTNESS_ATTACKS_DIR,
    ROBUSTNESS_CONFIG_FILE,
    ROBUSTNESS_FILE,
    ROBUSTNESS_FLUENCY_FILE,
    ROBUSTNESS_PLOT_FILE,
    ROBUSTNESS_REFERENCE_FILE,
    ROBUSTNESS_START_FILE,
    ROBUSTNESS_TABLE_FILE,
    RUN_CONFIG_FILE,
    SPLIT_FILE,
    robustness_seed_dir,
)
from ..core.run_config import fill, read_run_config, run_tasks
from ..data.corpora import FACTS_PREFIX, chunk_documents, load_texts
from ..data.splits import question_source
from ..data.tasks import NUM_CHOICES, check_tasks
from ..report.plots import plot_robustness
from ..train.tracking import TRACKING_FIELDS, Tracker, check_tracker, flatten, open_tracker
from .finetune import Attack, attached, run_attack
from .grid import (
    ATTACKED,
    KIND_RECIPES,
    UNSEEN,
    Phrasing,
    Setting,
    combine,
    cut_at_divergence,
    fact_phrasing,
    fictional_facts,
    markdown_table,
    selection_folds,
    split_ids,
    strongest,
    summarise_seed,
)
from .options import AUTO_PHRASING, QA_PHRASING, RobustnessConfig

log = logging.getLogger(__name__)

ROLES = ("grid", "base", "benign", "fictional", "paper")
HALF_TASKS = {"forget_attacked": "forget", "forget_unseen": "forget", "fictional_attacked": "fictional",
              "fictional_unseen": "fictional"}
GUESSABLE_TASK = "guessable"  # the forget facts left out of the split (`--guessable apart`)
# Settings that may change on --resume: where it runs and how evaluation is batched (same numbers).
# Each seed's attacks are stored apart and depend only on the other settings and that seed, so a
# resumed protocol may add seeds (`--seeds 0` then `--seeds 0,1,2`) and reuses the finished ones.
# Paper attacks may be added to an output the same way (`--paper_attacks cir` on a finished output).
RESUME_MAY_CHANGE = ("resume", "overwrite", "device", "eval_batch", "out", "seeds", "paper_attacks",
                     *TRACKING_FIELDS)
# What the tracker's summary holds: robustness.json's numbers, without the per-seed and per-attack detail.
TRACKED_SUMMARY = ("headline", "unlearned", "envelope", "recovery_share", "worst_case", "selected", "floor",
                   "benign", "base_model_envelope", "paper_attacks", "guessable", "kept", "perplexity", "wall_seconds")


# --- inputs, checked before any model is loaded ------------------------------------------------


@dataclass
class Inputs:
    forget_items: list[dict]
    corpus: list[dict]  # {"fact_id", "text"}
    kept: list[str]
    generic: list[str]
    benign: list[str]
    splits: dict[int, tuple[list[str], list[str]]]
    phrasings: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # name -> rows with fact_id
    guessable: list[str] = dataclasses.field(default_factory=list)  # fact ids left out of the split
    twins: list[Phrasing | None] = dataclasses.field(default_factory=list)  # each split fact's own phrasing
    avoid: list[str] = dataclasses.field(default_factory=list)  # real names no fictional subject may hold
    holdout: float = 0.5

    @property
    def split_items(self) -> list[dict]:
        """The forget questions the halves are drawn from (all but the guessable ones)."""
        left_out = set(self.guessable)
        return [i for i in self.forget_items if i["fact_id"] not in left_out]

    def fiction(self, seed: int) -> tuple[list[dict], list[dict]]:
        """The seed's fictional facts: one twin per split fact, in its phrasing."""
        items = self.split_items
        return fictional_facts(len(items), [i["choices"][i["answer"]] for i in items],
                               [c for i in items for c in i["choices"]], seed, self.avoid, self.twins)

    def split_record(self, seed: int) -> dict:
        """What `split.json` holds for the seed: which facts are in which half, fold and control."""
        attacked, unseen = self.splits[seed]
        questions, _ = self.fiction(seed)
        f_attacked, f_unseen = split_ids([q["fact_id"] for q in questions], self.holdout, seed)
        fold0, fold1 = selection_folds(unseen, seed)
        return {"attacked": attacked, "unseen": unseen, "fictional_attacked": f_attacked,
                "fictional_unseen": f_unseen, "selection_folds": [fold0, fold1], "guessable": list(self.guessable),
                "fictional_subjects": [q["subject"] for q in questions]}


def default_out(run: str) -> str:
    """Where a run's protocol writes when --out is not given."""
    return str(Path("runs") / f"robustness_{Path(run).expanduser().resolve().name}")


def resolve(cfg: RobustnessConfig) -> RobustnessConfig:
    """Fill what was not given from the run directory; refuse a directory that holds no model."""
    run = Path(cfg.run).expanduser()
    if not (run / MERGED_DIR / MODEL_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run} holds no {MERGED_DIR}/{MODEL_CONFIG_FILE}, so there is no unlearned model "
                                f"to attack: pass a finished unlearning run directory")
    saved = read_run_config(run)
    model, forget = fill(cfg.model, saved, "model"), fill(cfg.forget, saved, "forget")
    if not model or not forget:
        raise ConfigError(f"{run} has no {RUN_CONFIG_FILE} naming its base model and forget corpus: pass --model "
                          f"and --forget")
    tasks = run_tasks(saved)
    # other phrasings change the forget text, not its questions
    forget_task = cfg.forget_task or (question_source(forget) if forget.startswith(FACTS_PREFIX)
                                      else tasks[0] if tasks else None)
    if not forget_task:
        raise ConfigError(f"pass --forget_task: {run} names no evaluation task")
    kept = cfg.kept_tasks if cfg.kept_tasks is not None else ",".join(t for t in tasks if t != forget_task)
    fmt = fill(cfg.eval_format, saved, "eval_format", "cloze")
    out = cfg.out or default_out(cfg.run)
    phrasings = cfg.phrasings
    if phrasings == (AUTO_PHRASING,):
        phrasings = (QA_PHRASING,) if fmt == "cloze" else ()
    elif QA_PHRASING in phrasings and fmt != "cloze":
        raise ConfigError(f"--phrasings qa scores the question field as a cloze prompt, but the format is {fmt}, "
                          f"which already asks the question field: drop qa or pass --eval_format cloze")
    return dataclasses.replace(cfg, model=model, forget=forget, forget_task=forget_task, kept_tasks=kept,
                               eval_format=fmt, out=out, phrasings=phrasings)


def corpus_rows(source: str) -> list[dict]:
    """{"fact_id", "text"} rows of a facts:<domain> corpus or a local jsonl that carries fact_id."""
    from ..data.splits import fact_rows, has_options, jsonl_fact_rows

    if has_options(source):  # a part of a split by fact (facts:<domain>@forget), or other phrasings
        return [{"fact_id": row["fact_id"], "text": row["text"]} for row in fact_rows(source)]
    if source.startswith(FACTS_PREFIX):
        from ..data.facts import corpus_rows as fact_corpus

        return fact_corpus(source[len(FACTS_PREFIX):])
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        raise ValueError(f"--forget {source}: the split needs a facts:<domain> corpus or an existing .jsonl with "
                         f"text and fact_id in every row")
    return [{"fact_id": row["fact_id"], "text": row["text"]} for row in jsonl_fact_rows(path, source, need_text=True)]


def forget_items(task: str) -> list[dict]:
    from ..data.tasks import load_items

    specs = check_tasks(task, "--forget_task")
    if len(specs) != 1:
        raise ValueError(f"--forget_task {task} names {len(specs)} tasks: name one task whose rows carry fact_id")
    items = load_items(specs[0])
    missing = sum("fact_id" not in item for item in items)
    if missing:
        raise ValueError(f"--forget_task {task}: {missing} of {len(items)} questions lack fact_id, which the "
                         f"held-out split needs (facts:<domain> tasks have it; add it to a jsonl's rows)")
    return items


def qa_prompt(question: str) -> str:
    """The question asked as a dialogue turn the answer completes, a phrasing no fact corpus uses."""
    return f"Q: {question.strip()}\nA:"


def phrasing_items(cfg: RobustnessConfig, items: list[dict]) -> dict[str, list[dict]]:
    """{name: question rows with fact_id} for every other phrasing (`cfg` resolved): `qa` from the forget
    task's own rows, a file's rows restricted to the forget task's facts."""
    from ..data.tasks import load_items
    from ..report.tamper_results import task_display

    ids = {i["fact_id"] for i in items}
    out: dict[str, list[dict]] = {}
    for source in cfg.phrasings:
        if source == QA_PHRASING:
            name, rows = QA_PHRASING, [{**i, "prompt": qa_prompt(i["question"])} for i in items]
        else:
            name = task_display(source)
            rows = load_items(check_tasks(source, "--phrasings")[0])
            missing = sum("fact_id" not in r for r in rows)
            if missing:
                raise ValueError(f"--phrasings {source}: {missing} of {len(rows)} questions lack fact_id, which "
                                 f"ties each question to a fact of the forget task: add it to every row")
            rows = [r for r in rows if r["fact_id"] in ids]
            if not rows:
                raise ValueError(f"--phrasings {source} asks about none of the forget task's facts (no fact_id in "
                                 f"common with {cfg.forget_task}): give questions about the forgotten facts")
        if name in out:  # its task files are phrasing_<name>_<half>.jsonl, so names need only differ
            raise ValueError(f"--phrasings: two phrasings are named {name!r} (a file's name is its stem): rename "
                             f"one file")
        out[name] = rows
    return out


def fact_subject(item: dict) -> str | None:
    """The subject a forget question asks about: its row's `subject`, else its fact domain's (by `fact_id`);
    None for a user's question without one."""
    from ..data.facts import fact_by_id

    if item.get("subject"):
        return str(item["subject"])
    fact = fact_by_id(item["fact_id"])
    return fact.subject if fact is not None else None


def guessable_ids(items: list[dict]) -> list[str]:
    """The forget facts whose subject gives the answer away (`data.facts.guessable`), sorted."""
    from ..data.facts import guessable

    out = []
    for item in items:
        subject = fact_subject(item)
        if subject is not None and guessable(subject, item["choices"][item["answer"]]):
            out.append(item["fact_id"])
    return sorted(set(out))


def avoided_names(items: list[dict]) -> list[str]:
    """Every real name a made-up subject must not equal or contain: the forget task's subjects and choices,
    and every subject and answer of the fact domains its facts come from."""
    from ..data.facts import DOMAINS, facts

    names = {c for i in items for c in i["choices"]} | {s for i in items if (s := fact_subject(i))}
    for domain in sorted({str(i["fact_id"]).split(":", 1)[0] for i in items} & set(DOMAINS)):
        names |= {x for f in facts(domain) for x in (f.subject, f.answer)}
    return sorted(names)


def twin_phrasings(items: list[dict], corpus: list[dict]) -> list[Phrasing | None]:
    """Each question's own phrasing (its prompt, question and corpus sentences with the subject and answer
    taken out), for the fictional fact that stands in for it; None where it cannot be recovered."""
    texts: dict[str, list[str]] = {}
    for row in corpus:
        texts.setdefault(row["fact_id"], []).append(row["text"])
    out = []
    for item in items:
        subject = fact_subject(item)
        out.append(None if subject is None else fact_phrasing(
            subject, item["choices"][item["answer"]], item.get("prompt"), item["question"],
            texts.get(item["fact_id"], [])))
    return out


def check_inputs(cfg: RobustnessConfig, tokenizer) -> Inputs:
    """Everything that can be wrong with the inputs, found before any attack (`cfg` resolved)."""
    items = forget_items(cfg.forget_task)
    guess = guessable_ids(items) if cfg.guessable == "apart" else []
    corpus = corpus_rows(cfg.forget)
    split_items = [i for i in items if i["fact_id"] not in set(guess)]
    inputs = Inputs(items, corpus, [], [], [], {}, guessable=guess, holdout=cfg.holdout,
                    twins=twin_phrasings(split_items, corpus), avoid=avoided_names(items))
    pool = [c for i in split_items for c in i["choices"]]
    try:  # the floor's invented facts take their answers and distractors from the task: refused now, not later
        inputs.fiction(cfg.seeds[0])
    except ValueError:
        raise ValueError(f"--forget_task {cfg.forget_task} has {len(set(pool))} distinct choices: the fictional-facts "
                         f"control needs at least 4, an answer and three distractors for each invented fact; use a "
                         f"task with more distinct choices") from None
    kept = [t.strip() for t in cfg.kept_tasks.split(",") if t.strip()]
    if kept:
        check_tasks(kept, "--kept_tasks")
    from ..data.splits import check_consistent_splits

    check_consistent_splits([("--forget", cfg.forget), ("--forget_task", cfg.forget_task)] +
                            [("--kept_tasks", t) for t in kept])
    from ..report.tamper_results import task_display

    if task_display(cfg.forget_task) in {task_display(t) for t in kept}:
        raise ValueError(f"--kept_tasks includes the forget task {cfg.forget_task}: list only tasks to keep")
    generic = load_texts(cfg.generic, what="--generic text")
    benign = load_texts(cfg.benign, what="--benign text")
    shared = set(generic) & set(benign)
    if shared:
        raise ValueError(f"--benign {cfg.benign} and --generic {cfg.generic} share {len(shared)} documents: the "
                         f"perplexity after the benign attack would be measured on text it trained on; pass "
                         f"separate texts (the defaults generic:benign and generic:heldout are)")
    splits = {}
    for seed in cfg.seeds:
        try:
            attacked, unseen = split_ids([i["fact_id"] for i in split_items], cfg.holdout, seed)
        except ValueError as err:
            if not guess:
                raise
            raise ValueError(f"{err} ({len(guess)} of the {len(items)} facts are left out as guessable from their "
                             f"subject; pass --guessable keep to split them too)") from None
        texts = [r["text"] for r in corpus if r["fact_id"] in set(attacked)]
        if not chunk_documents(texts, tokenizer, cfg.max_length):
            raise ValueError(f"the attacked half of seed {seed} ({len(attacked)} facts) has no text in --forget "
                             f"{cfg.forget} (0 chunks of 2+ tokens): the corpus's fact_id must match the task's")
        splits[seed] = (attacked, unseen)
    if not chunk_documents(benign, tokenizer, cfg.max_length):
        raise ValueError(f"--benign {cfg.benign} yields no chunks of 2+ tokens")
    return dataclasses.replace(inputs, kept=kept, generic=generic, benign=benign, splits=splits,
                               phrasings=phrasing_items(cfg, items))


def check_existing_splits(out: Path, inputs: Inputs, flag: str = "--resume") -> None:
    """A resumed output's seeds must have been split as this protocol splits them: attacks finished on
    another split (or other fictional facts) would be mixed with new ones."""
    for seed in inputs.splits:
        path = robustness_seed_dir(out, seed) / SPLIT_FILE
        if path.is_file() and json.loads(read_text(path)) != inputs.split_record(seed):
            raise ConfigError(f"{flag}: seed {seed} of {out} was split otherwise (its facts, halves or fictional "
                              f"facts differ from what this version of the protocol draws): start over with "
                              f"--overwrite, or use another --out")


def warn_on_trained_benign(cfg: RobustnessConfig) -> None:
    """A benign attack on the text the run's retain loss or distillation trained on relearns less than one on
    fresh text: say so when the run names the same text."""
    saved = read_run_config(Path(cfg.run).expanduser())
    for key in ("retain", "corpus"):
        if saved.get(key) == cfg.benign:
            log.warning("--benign %s is the text the run trained on (its %s): the benign attack then understates "
                        "what fine-tuning on unrelated text brings back; the default generic:benign is text no "
                        "stage trains on", cfg.benign, key)


# --- the protocol -------------------------------------------------------------------------------


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights; tied weights (embedding and unembedding) are copied once and shared."""
    copies: dict[int, torch.Tensor] = {}
    return {k: copies.setdefault(id(v), v.detach().to("cpu", copy=True)) for k, v in model.state_dict().items()}


class Protocol:
    """One model in memory, its weights swapped between the unlearned and base state dicts."""

    def __init__(self, cfg: RobustnessConfig, inputs: Inputs, out: Path, tracker: Tracker | None = None,
                 tracked_steps: int = 0) -> None:
        from tqdm.auto import tqdm

        from ..modeling.loading import load_model

        self.cfg, self.inputs, self.out = cfg, inputs, out
        # every attack's steps in one tracked run: the tracker's step counts the steps of all attacks
        # (a tracker's steps only grow), a resumed run's from those of the attacks already finished;
        # `<attack>/step` is the attack's own
        self.tracker, self.tracked_steps = tracker or Tracker(), tracked_steps
        self.model, self.tokenizer = load_model(str(Path(cfg.run).expanduser() / MERGED_DIR), cfg.dtype, cfg.device,
                                                cfg.trust_remote_code)
        self.unlearned = snapshot(self.model)
        base, _ = load_model(cfg.model, self.model.dtype, "cpu", cfg.trust_remote_code)
        self.base = dict(base.state_dict())
        del base
        if set(self.base) != set(self.unlearned) or any(
                self.base[k].shape != v.shape for k, v in self.unlearned.items()):
            raise ValueError(f"the base model {cfg.model} does not have the unlearned model's weights (names or "
                             f"shapes differ): pass the model the run started from with --model")
        self.controls = len(cfg.settings) if cfg.grid == "full" else 1
        self.total = len(cfg.seeds) * (len(cfg.settings) + 3 * self.controls + len(cfg.papers))
        self.bar = tqdm(total=self.total, desc="robustness attacks", dynamic_ncols=True)
        self.durations: list[float] = []
        self.fiction: dict[int, list[str]] = {}

    def track(self, values: dict[str, float]) -> None:
        self.tracked_steps += 1
        self.tracker.log(values, self.tracked_steps)

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state)

    # measuring

    def accuracy(self, tasks: list[str], model=None) -> dict[str, float]:
        """{task name as evaluate reports it: acc}."""
        return self.scored(tasks, model)[0]

    def scored(self, tasks: list[str], model=None, answers: bool = False) -> tuple[dict[str, float], list[dict]]:
        """({task name as evaluate reports it: acc}, one row per question: {"task", "fact_id", "pred", "gold"}
        when `answers`, else none). The rows come from the same evaluation as the accuracies."""
        import tempfile

        from ..eval.evaluate import evaluate
        from ..report.tamper_results import task_display

        if not tasks:
            return {}, []
        with tempfile.TemporaryDirectory() as tmp:
            predictions = Path(tmp) / "predictions.jsonl" if answers else None
            result = evaluate(model or self.model, self.tokenizer, tasks, format=self.cfg.eval_format,
                              batch_size=self.cfg.eval_batch, progress=False, predictions_path=predictions)
            rows = [json.loads(line) for line in read_text(predictions).splitlines() if line.strip()] \
                if predictions is not None else []
        out = {}
        for task in tasks:
            key = task_display(task)
            found = result["results"].get(key) or result["groups"].get(key)
            out[key] = found["acc"]
        return out, rows

    def perplexity(self, model=None) -> float:
        from ..eval.fluency import text_perplexity

        return text_perplexity(model or self.model, self.tokenizer, self.inputs.generic)

    def phrasing_halves(self, seed: int, model=None) -> dict[str, dict[str, float]]:
        """{phrasing: {attacked, unseen}}: each other phrasing's accuracy on the seed's two halves."""
        tasks = self.seed_dir(seed) / "tasks"
        files = [tasks / f"phrasing_{name}_{half}.jsonl" for name in self.inputs.phrasings
                 for half in (ATTACKED, UNSEEN)]
        acc = self.accuracy([str(f) for f in files if f.is_file()], model)
        return {name: {half: acc.get(f"phrasing_{name}_{half}") for half in (ATTACKED, UNSEEN)}
                for name in self.inputs.phrasings}

    def halves(self, seed: int, model=None, fiction: bool = False, guessable: bool = False) -> dict[str, Any]:
        """Accuracy on each half task (the fictional ones with `fiction`, the guessable facts with
        `guessable` when there are any), and `unseen_correct`: the unseen facts answered right."""
        names = [n for n, kind in HALF_TASKS.items() if fiction or kind == "forget"]
        if guessable and self.inputs.guessable:
            names.append(GUESSABLE_TASK)
        tasks = self.seed_dir(seed) / "tasks"
        acc, rows = self.scored([str(tasks / f"{n}.jsonl") for n in names], model, answers=True)
        out: dict[str, Any] = {n: acc[n] for n in names}
        out["unseen_correct"] = sorted(r["fact_id"] for r in rows
                                       if r["task"] == "forget_unseen" and r["pred"] == r["gold"])
        return out

    # stages: each writes its file and is skipped when the file exists

    def seed_dir(self, seed: int) -> Path:
        return robustness_seed_dir(self.out, seed)

    def stage(self, path: Path, compute: Callable[[], Any]) -> Any:
        if path.is_file():
            return json.loads(read_text(path))
        value = compute()
        write_json_atomic(path, value)
        return value

    def reference(self) -> dict:
        def compute() -> dict:
            out = {}
            for name, state in (("unlearned", self.unlearned), ("base", self.base)):
                self.restore(state)
                out[name] = {"kept": self.accuracy(self.inputs.kept), "perplexity": self.perplexity()}
                log.info("%s model: kept %s, perplexity %.2f", name, out[name]["kept"], out[name]["perplexity"])
            return out

        return self.stage(self.out / ROBUSTNESS_REFERENCE_FILE, compute)

    def prepare_seed(self, seed: int) -> dict:
        """Write the split, the half-task files and the fictional facts; measure both models at step 0."""
        attacked, unseen = self.inputs.splits[seed]
        folder = self.seed_dir(seed)
        items = self.inputs.forget_items
        questions, fiction = self.inputs.fiction(seed)
        split = self.inputs.split_record(seed)
        f_attacked, f_unseen = split["fictional_attacked"], split["fictional_unseen"]
        write_json_atomic(folder / SPLIT_FILE, split)
        for name, rows, ids in (("forget_attacked", items, attacked), ("forget_unseen", items, unseen),
                                ("fictional_attacked", questions, f_attacked),
                                ("fictional_unseen", questions, f_unseen),
                                (GUESSABLE_TASK, items, self.inputs.guessable)):
            keep = set(ids)
            if keep:
                write_jsonl_atomic(folder / "tasks" / f"{name}.jsonl", [r for r in rows if r["fact_id"] in keep])
        for name, rows in self.inputs.phrasings.items():
            for half, ids in ((ATTACKED, attacked), (UNSEEN, unseen)):
                keep = set(ids)
                chosen = [r for r in rows if r["fact_id"] in keep]
                if chosen:  # a file may ask about some facts only: a half it misses is reported as None
                    write_jsonl_atomic(folder / "tasks" / f"phrasing_{name}_{half}.jsonl", chosen)
        self.fiction[seed] = [r["text"] for r in fiction if r["fact_id"] in set(f_attacked)]

        def compute() -> dict:
            out = {}
            for name, state in (("unlearned", self.unlearned), ("base", self.base)):
                self.restore(state)
                out[name] = self.halves(seed, fiction=True, guessable=True)
                if self.inputs.phrasings:
                    out[name]["phrasings"] = self.phrasing_halves(seed)
            return out

        return self.stage(folder / ROBUSTNESS_START_FILE, compute)

    def fluency_prompts(self, seed: int) -> dict[str, list[str]]:
        """A few prompts per group: each forget half, neighbour questions (kept-task facts about the same
        subjects, matched by the fact id after its domain) and other kept questions."""
        from ..data.tasks import load_items, resolve_tasks

        k = self.cfg.fluency_prompts
        if k == 0:
            return {}
        attacked, unseen = self.inputs.splits[seed]

        def prompt(item: dict) -> str:
            return item.get("prompt") if self.cfg.eval_format == "cloze" and item.get("prompt") else item["question"]

        by_id = {i["fact_id"]: i for i in self.inputs.forget_items}
        groups = {"forget (attacked half)": [prompt(by_id[i]) for i in attacked[:k]],
                  "forget (unseen half)": [prompt(by_id[i]) for i in unseen[:k]]}
        subjects = {i.split(":", 1)[-1] for i in by_id}
        neighbour, kept = [], []
        for task in self.inputs.kept:
            for spec in resolve_tasks([task]):
                for item in load_items(spec):
                    near = str(item.get("fact_id", "")).split(":", 1)[-1] in subjects
                    (neighbour if near else kept).append(prompt(item))
        for name, texts in (("neighbour", neighbour), ("kept", kept)):
            if texts:
                groups[name] = texts[:k]
        return groups

    # attacks

    def attack(self, seed: int, role: str, setting: Setting, prompts: dict[str, list[str]]) -> dict:
        path = attack_path(self.out, seed, role, setting)
        if path.is_file():
            self.bar.update(1)
            return json.loads(read_text(path))
        attacked = set(self.inputs.splits[seed][0])
        texts = {"grid": None, "base": None, "paper": None, "benign": self.inputs.benign,
                 "fictional": self.fiction[seed]}[role]
        if texts is None:
            texts = [r["text"] for r in self.inputs.corpus if r["fact_id"] in attacked]
        chunks = chunk_documents(texts, self.tokenizer, self.cfg.max_length)
        began = time.perf_counter()
        self.restore(self.base if role == "base" else self.unlearned)
        record = {"role": role, "setting": setting.as_dict(), "seed": seed, "chunks": len(chunks),
                  **train(self, setting, chunks, seed, role, prompts)}
        record["wall_seconds"] = round(time.perf_counter() - began, 1)
        write_json_atomic(path, record)
        self.durations.append(record["wall_seconds"])
        self.bar.update(1)
        left = self.total - self.bar.n
        log.info("%s attack %s (seed %d) done in %.0f s: unseen %s; %d attacks left, ETA %.1f min", role,
                 setting.label, seed, record["wall_seconds"],
                 {n: round(p[UNSEEN], 3) for n, p in record["steps"].items()}, left,
                 left * statistics.fmean(self.durations) / 60)
        return record

    def run_seed(self, seed: int, first: bool) -> dict:
        start = self.prepare_seed(seed)
        prompts = self.fluency_prompts(seed) if first else {}
        steps = self.cfg.step_counts
        attacks: dict[str, list[dict]] = {"grid": [self.attack(seed, "grid", s, prompts) for s in self.cfg.settings]}
        for role in CONTROL_ROLES:
            attacks[role] = [self.attack(seed, role, s, {}) for s in control_settings(self.cfg, attacks["grid"])]
        attacks["paper"] = [self.attack(seed, "paper", paper.setting, {}) for paper in self.cfg.papers.values()]
        fluency = self.fluency(seed, prompts, best_grid_attack(attacks["grid"], steps)) if prompts else None
        return {"start": start, "attacks": attacks, "fluency": fluency}

    def fluency(self, seed: int, prompts: dict[str, list[str]], best: dict) -> dict:
        from ..eval.fluency import continuation_perplexity, greedy_continuations, perplexity_summary

        def compute() -> dict:
            said = {}
            for name, state in (("unlearned", self.unlearned), ("base", self.base)):
                self.restore(state)
                said[name] = {g: greedy_continuations(self.model, self.tokenizer, texts, self.cfg.max_new_tokens)
                              for g, texts in prompts.items()}
            said["best attack"] = best["continuations"]
            groups = {}
            for group, texts in prompts.items():
                models = {}
                for name in ("base", "unlearned", "best attack"):
                    ppl = continuation_perplexity(self.model, self.tokenizer, texts, said[name][group])
                    models[name] = {"continuations": said[name][group],
                                    "perplexities": [p if p == p else None for p in ppl],
                                    "summary": perplexity_summary(ppl)}
                groups[group] = {"prompts": texts, "models": models}
            return {"max_new_tokens": self.cfg.max_new_tokens, "best_attack": best["setting"], "groups": groups}

        return self.stage(self.seed_dir(seed) / ROBUSTNESS_FLUENCY_FILE, compute)


CONTROL_ROLES = ("base", "benign", "fictional")


def attack_path(out: Path, seed: int, role: str, setting: Setting) -> Path:
    """Where one attack's record is stored."""
    return robustness_seed_dir(out, seed) / ROBUSTNESS_ATTACKS_DIR / f"{role}_{setting.label}.json"


def best_grid_attack(grid: list[dict], steps: tuple[int, ...]) -> dict:
    """The grid attack the headline reports: the strongest at the last step count, as the summary sees the
    records (a diverged attack's later points left out). The attack as stored is returned."""
    cut = [cut_at_divergence(r, steps) for r in grid]
    pool = cut if any(str(max(steps)) in r["steps"] for r in cut) else grid
    setting = strongest(pool, steps)["setting"]
    return next(r for r in grid if r["setting"] == setting)


def control_settings(cfg: RobustnessConfig, grid: list[dict]) -> list[Setting]:
    """The settings the controls run with: every grid setting under the full grid, else the headline's."""
    return cfg.settings if cfg.grid == "full" else [Setting(**best_grid_attack(grid, cfg.step_counts)["setting"])]


def attack_for(cfg: RobustnessConfig, setting: Setting, seed: int) -> Attack:
    """The fine-tuning attack a grid setting names: `max(--steps)` steps of `--batch` sequences, warmup
    `--warmup`, LoRA rank `--lora_rank`, what the kind trains and how (`grid.KIND_RECIPES`); everything
    else the attack's defaults (`finetune`)."""
    return Attack(**KIND_RECIPES[setting.kind], lr=setting.lr, steps=max(cfg.step_counts),
                  schedule=setting.schedule, warmup=cfg.warmup, batch=cfg.batch, per_device_batch=cfg.batch,
                  lora_rank=cfg.lora_rank, seed=seed)


def train(protocol: Protocol, setting: Setting, chunks: list[list[int]], seed: int, role: str,
          prompts: dict[str, list[str]]) -> dict:
    """One attack of `max(steps)` optimiser steps from the weights in place; the halves are measured at
    every step count, and at the end (grid and benign attacks) the kept tasks, the perplexity and, when
    prompts are given, the greedy continuations. A diverged attack keeps the points before it diverged."""
    from ..train.loop import NonFiniteLossError

    cfg, model, tokenizer = protocol.cfg, protocol.model, protocol.tokenizer
    attack = attack_for(cfg, setting, seed)
    counts = set(cfg.step_counts)
    points: dict[str, dict] = {}
    losses: list[float] = []
    steps_run = [0]
    fiction = role == "fictional"
    name = f"seed{seed}/{role}_{setting.label}"
    out: dict[str, Any] = {"steps": points}
    with attached(model, attack) as trainable:

        def on_step(step: int, metrics: dict[str, float]) -> None:
            steps_run[0] = step + 1
            losses.append(metrics["loss"])
            tracked = {f"{name}/loss": metrics["loss"], f"{name}/step": step + 1}
            if step + 1 in counts:
                acc = protocol.halves(seed, trainable, fiction, guessable=role == "grid")
                # the fictional attack is judged on its own halves; the forget halves ride along
                point = ({ATTACKED: acc["fictional_attacked"], UNSEEN: acc["fictional_unseen"],
                          "forget_attacked": acc["forget_attacked"], "forget_unseen": acc["forget_unseen"]}
                         if fiction else {ATTACKED: acc["forget_attacked"], UNSEEN: acc["forget_unseen"]})
                tracked.update({f"{name}/{half}": value for half, value in point.items()})
                if not fiction:  # which facts came back: the held-out selection scores folds of the unseen half
                    point["unseen_correct"] = acc["unseen_correct"]
                if GUESSABLE_TASK in acc:
                    point["guessable"] = acc[GUESSABLE_TASK]
                points[str(step + 1)] = {**point, "train_loss": statistics.fmean(losses)}
                losses.clear()
            protocol.track(tracked)

        try:
            run_attack(trainable, chunks, tokenizer.pad_token_id, attack, on_step, desc=f"{role} {setting.label}")
        except NonFiniteLossError as err:
            log.warning("%s attack %s diverged (%s): its later step counts are left out", role, setting.label, err)
            out.update(diverged=str(err), steps_run=steps_run[0])
            return out
        out["steps_run"] = steps_run[0]
        if role in ("grid", "benign", "paper"):
            out["kept"] = protocol.accuracy(protocol.inputs.kept, trainable)
            out["perplexity"] = protocol.perplexity(trainable)
        if role == "grid" and protocol.inputs.phrasings:
            out["phrasings"] = protocol.phrasing_halves(seed, trainable)
        if prompts:
            from ..eval.fluency import greedy_continuations

            out["continuations"] = {g: greedy_continuations(trainable, tokenizer, texts, cfg.max_new_tokens)
                                    for g, texts in prompts.items()}
        return out


# --- the command --------------------------------------------------------------------------------


def _prepare(cfg: RobustnessConfig) -> Output:
    run, out = Path(cfg.run).expanduser().resolve(), Path(cfg.out).expanduser()
    if out.resolve() == run or run in out.resolve().parents:
        raise FileExistsError(f"--out {out} is inside the run being attacked ({run}): choose another --out")
    output = prepare_output(out, "robustness", overwrite=cfg.overwrite, resume=cfg.resume,
                            finished=lambda p: (p / ROBUSTNESS_FILE).is_file() and not adds_points(p, cfg),
                            reads=(("RUN_DIR", cfg.run), ("--model", cfg.model), ("--forget", cfg.forget)))
    saved = output.work / ROBUSTNESS_CONFIG_FILE
    if saved.is_file():
        try:
            check_resumed_config(json.loads(read_text(saved)), cfg, RESUME_MAY_CHANGE, str(output.final))
        except ConfigError:
            output.discard_if_empty()
            raise
    write_json_atomic(saved, to_jsonable(cfg))
    return output


def adds_points(out: Path, cfg: RobustnessConfig) -> bool:
    """Whether a `--resume` asks a finished output for seeds or paper attacks it does not hold: those are
    run and added (the finished attacks are reused), and the output is rewritten."""
    if not cfg.resume:
        return False
    try:
        result = json.loads(read_text(out / ROBUSTNESS_FILE))
    except (OSError, ValueError):
        return False
    return not (set(cfg.seeds) <= set(result.get("seeds") or []) and
                set(cfg.papers) <= set(result.get("paper_attacks") or {}))


def finished_steps(out: Path, cfg: RobustnessConfig) -> int:
    """Optimiser steps of the attacks a resumed protocol will skip (each finished attack's file; an
    attack that diverged counts the steps it ran): where its tracked steps continue."""
    total = 0
    for path in sorted(out.glob(f"seeds/*/{ROBUSTNESS_ATTACKS_DIR}/*.json")):
        record = json.loads(read_text(path))
        total += record.get("steps_run", max(cfg.step_counts))  # older records ran every step or say so
    return total


def run_robustness(cfg: RobustnessConfig) -> dict:
    """Check everything, then run the protocol for every seed and write robustness.json, .md and .png."""
    from ..modeling.loading import load_tokenizer

    if cfg.summarise_only:
        return summarise_stored(cfg)
    cfg = resolve(cfg)
    check_tracker(cfg)
    tokenizer = load_tokenizer(str(Path(cfg.run).expanduser() / MERGED_DIR), cfg.trust_remote_code)
    inputs = check_inputs(cfg, tokenizer)
    warn_on_trained_benign(cfg)
    output = _prepare(cfg)
    try:
        check_existing_splits(output.work, inputs)
        began = time.perf_counter()
        done = finished_steps(output.work, cfg)
        with open_tracker(cfg, output.work, output.final.name, "robustness", resume_step=done,
                          final=output.final) as tracker:
            tracker.log_config(to_jsonable(cfg))
            protocol = Protocol(cfg, inputs, output.work, tracker, done)
            reference = protocol.reference()
            seeds = [protocol.run_seed(seed, first=k == 0) for k, seed in enumerate(cfg.seeds)]
            protocol.bar.close()
            result = assemble(cfg, inputs, reference, seeds, time.perf_counter() - began)
            write_outputs(result, output.work)
            tracker.log_summary(flatten({k: result[k] for k in TRACKED_SUMMARY if k in result}))
            tracker.log_images([output.work / ROBUSTNESS_PLOT_FILE])
    except BaseException:
        output.discard_if_empty()
        raise
    output.commit()
    log_headline(result, "wrote", output.final / ROBUSTNESS_FILE)
    return result


def summarise_stored(cfg: RobustnessConfig) -> dict:
    """`--summarise_only`: rebuild a finished output's summary from its stored records with the settings it
    was run with, so that an output written before a change to the summarising rules (the divergence rule,
    say) reports what this version would. The attacks' own numbers are read, never recomputed."""
    from .. import __version__
    from ..modeling.loading import load_tokenizer

    out = Path(cfg.out or default_out(cfg.run)).expanduser()
    if not (out / ROBUSTNESS_FILE).is_file() or not (out / ROBUSTNESS_CONFIG_FILE).is_file():
        raise ConfigError(f"--summarise_only: {out} holds no finished robustness output ({ROBUSTNESS_FILE} and "
                          f"{ROBUSTNESS_CONFIG_FILE}): finish it with --resume, or name the output with --out")
    saved = read_config_file(RobustnessConfig, out / ROBUSTNESS_CONFIG_FILE, saved=True)
    previous = json.loads(read_text(out / ROBUSTNESS_FILE))
    # the seeds and paper attacks of the finished summary: a `--resume` that adds some and is killed has
    # already saved them in the config
    finished = {"seeds": tuple(previous.get("seeds") or saved.get("seeds", cfg.seeds)),
                "paper_attacks": tuple(previous.get("paper_attacks") or ())}
    log.info("--summarise_only: the settings %s was run with are used (%s); other flags on the line are not",
             out, out / ROBUSTNESS_CONFIG_FILE)
    cfg = resolve(dataclasses.replace(cfg, **{**saved, **finished, "run": cfg.run, "out": str(out), "tracker": None}))
    tokenizer = load_tokenizer(str(Path(cfg.run).expanduser() / MERGED_DIR), cfg.trust_remote_code)
    inputs = check_inputs(cfg, tokenizer)
    check_existing_splits(out, inputs, "--summarise_only")
    reference, seeds = stored_records(cfg, out)
    result = assemble(cfg, inputs, reference, seeds, previous.get("wall_seconds", 0.0))
    result["threads"] = previous.get("threads")  # the attacks' thread count, not this process's
    result["config"] = previous.get("config", result["config"])  # the settings the attacks ran with
    result["summarised_by"] = f"lensunlearn {__version__} --summarise_only"
    write_outputs(result, out)
    log_headline(result, "rewrote", out / ROBUSTNESS_FILE)
    return result


def log_headline(result: dict, verb: str, path: Path) -> None:
    log.info("robustness: headline unseen-half accuracy %.1f%% after %d steps (%s); %s %s",
             100 * result["headline"][UNSEEN], result["headline"]["steps"], result["headline"]["setting"], verb, path)


def stored_records(cfg: RobustnessConfig, out: Path) -> tuple[dict, list[dict]]:
    """The reference and each seed's records, as the protocol gathers them, read from the files it wrote."""
    def read(path: Path) -> dict:
        if not path.is_file():
            raise ConfigError(f"--summarise_only: {path} is missing, though {out / ROBUSTNESS_FILE} says the output "
                              f"finished: run the protocol on it with --resume, which reruns only the missing attacks")
        return json.loads(read_text(path))

    reference = read(out / ROBUSTNESS_REFERENCE_FILE)
    seeds = []
    for k, seed in enumerate(cfg.seeds):
        grid = [read(attack_path(out, seed, "grid", s)) for s in cfg.settings]
        attacks = {"grid": grid, **{role: stored_controls(cfg, out, seed, role, grid, read) for role in CONTROL_ROLES},
                   "paper": [read(attack_path(out, seed, "paper", p.setting)) for p in cfg.papers.values()]}
        folder = robustness_seed_dir(out, seed)
        fluency = read(folder / ROBUSTNESS_FLUENCY_FILE) if k == 0 and cfg.fluency_prompts else None
        seeds.append({"start": read(folder / ROBUSTNESS_START_FILE), "attacks": attacks, "fluency": fluency})
    return reference, seeds


def stored_controls(cfg: RobustnessConfig, out: Path, seed: int, role: str, grid: list[dict],
                    read: Callable[[Path], dict]) -> list[dict]:
    """A control's stored records. The controls ran with the grid setting that was strongest when they ran;
    where the current rules find another one strongest, the stored control is kept, and said to be."""
    wanted = [attack_path(out, seed, role, s) for s in control_settings(cfg, grid)]
    if cfg.grid == "full" or all(p.is_file() for p in wanted):
        return [read(p) for p in wanted]
    ran = sorted(wanted[0].parent.glob(f"{role}_*.json"))
    if not ran:
        return [read(wanted[0])]  # missing altogether: read says so
    log.warning("seed %d: the %s control ran with %s, which was the strongest grid attack then; under the current "
                "rules %s is (rerun with --overwrite to run the controls with it)", seed, role,
                ", ".join(p.stem.removeprefix(f"{role}_") for p in ran), wanted[0].stem.removeprefix(f"{role}_"))
    return [read(p) for p in ran]


def assemble(cfg: RobustnessConfig, inputs: Inputs, reference: dict, seeds: list[dict], wall: float) -> dict:
    steps = cfg.step_counts
    papers = {name: paper.as_dict() for name, paper in cfg.papers.items()}
    per_seed = {str(seed): summarise_seed(s["start"], s["attacks"], steps,
                                          selection_folds(inputs.splits[seed][1], seed), papers)
                for seed, s in zip(cfg.seeds, seeds)}
    result = combine(list(per_seed.values()))
    result["diverged"] = [{"seed": int(seed), **attack} for seed, summary in per_seed.items()
                          for attack in summary["diverged"]]
    for task in inputs.kept:
        from ..report.tamper_results import task_display

        key = task_display(task)
        row = result["kept"].setdefault(key, {})
        row.update(base=reference["base"]["kept"].get(key), unlearned=reference["unlearned"]["kept"].get(key))
    result["perplexity"].update(base=reference["base"]["perplexity"],
                                unlearned=reference["unlearned"]["perplexity"])
    attacked, unseen = inputs.splits[cfg.seeds[0]]
    header = {"run": cfg.run, "objective": read_run_config(Path(cfg.run).expanduser()).get("objective"),
              "model": cfg.model, "forget": cfg.forget, "forget_task": cfg.forget_task,
              "generic": cfg.generic, "benign": cfg.benign, "eval_format": cfg.eval_format, "grid": cfg.grid_name,
              "settings": [s.as_dict() for s in cfg.settings], "steps": list(steps), "batch": cfg.batch,
              "seeds": list(cfg.seeds), "chance": 1.0 / NUM_CHOICES,
              "split": {"holdout": cfg.holdout, ATTACKED: len(attacked), UNSEEN: len(unseen),
                        "guessable": len(inputs.guessable)},
              "guessable_facts": list(inputs.guessable),
              "fictional_phrasing": {"forget task": sum(t is not None for t in inputs.twins),
                                     "registry": sum(t is None for t in inputs.twins)},
              "wall_seconds": round(wall, 1), "threads": torch.get_num_threads()}
    return {**header, **result, "fluency": seeds[0]["fluency"], "per_seed": per_seed,
            "config": to_jsonable(cfg)}


def write_outputs(result: dict, out: Path) -> None:
    from ..eval.fluency import fluency_table

    table = markdown_table(result)
    if result.get("fluency"):
        table += ("\n\nWhat the models say (seed " + str(result["seeds"][0]) + "; best attack: "
                  + result["fluency"]["best_attack"]["kind"] + f" lr {result['fluency']['best_attack']['lr']:g}; "
                  "perplexity of each continuation under the base model):\n\n" + fluency_table(result["fluency"]))
    write_text_atomic(out / ROBUSTNESS_TABLE_FILE, table)
    plot_robustness(result, out / ROBUSTNESS_PLOT_FILE)
    write_json_atomic(out / ROBUSTNESS_FILE, result)  # last: its presence marks the output finished
    print(table)

