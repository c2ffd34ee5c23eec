"""`tamper`: fine-tune a (unlearned) model on forget-domain text and watch knowledge return.

The attack is the package's one fine-tuning attack (`finetune`, which the robustness protocol
runs too): full-parameter, or a LoRA adapter on every linear layer of the blocks. Evaluation runs at step 0,
every `--eval_every` steps and at the end, and the results (schema in `tamper_results`) are
rewritten atomically after each one, so a killed attack keeps everything it measured.

Held-out recovery (`--holdout 0.5`): the facts of the forget corpus are split; the attack trains
only on text about the attacked half, and every evaluation task whose questions carry a
`fact_id` is reported twice, as `<task>:attacked` and `<task>:heldout`. Accuracy regained on the
held-out half is knowledge the attack did not simply re-teach.

A sweep (`--lrs 1e-5,2e-5,8e-5`, optionally `--schedules linear,cosine`) runs one attack per
setting, each on a freshly loaded model, in `<out>/<label>/`, and draws one comparison plot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import write_json_atomic, write_jsonl_atomic
from ..core.config import ConfigError, to_jsonable
from ..core.outputs import Output, prepare_output
from ..core.paths import (
    BASE_EVAL_FILE,
    EVAL_KEY_PREFIX,
    MERGED_DIR,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    ORIGINAL_EVAL_FILE,
    RESULTS_FILE,
    RUN_CONFIG_FILE,
    SPLIT_FILE,
    SPLIT_TASKS_DIR,
    SWEEP_FILE,
    SWEEP_PLOT_FILE,
    TAMPER_PLOT_FILE,
    is_unlearn_run,
)
from ..core.run_config import fill, read_run_config, run_tasks
from ..data.corpora import FACTS_PREFIX, WMDP_BIO_FORGET_CORPUS, chunk_documents, load_texts
from ..data.tasks import NUM_CHOICES, REFERENCE_EVAL_TASKS, check_tasks, load_items, resolve_tasks
from ..modeling.loading import load_model
from ..report.tamper_results import ATTACKED, HELDOUT, recovery, task_display
from ..train.loop import MetricsLog
from ..train.tracking import Tracker, check_tracker, open_tracker
from .finetune import LORA_TARGETS, Attack, attached, run_attack
from .options import TamperConfig

log = logging.getLogger(__name__)

CHANCE = 1.0 / NUM_CHOICES


# ----------------------------------------------------------------------------------------- inputs


def run_directory(model: str) -> Path | None:
    """The unlearning run directory `model` names, else None."""
    return Path(model).expanduser() if is_unlearn_run(model) else None


def model_path(model: str) -> str:
    """What to load: a run directory's `merged/` model, else the name as given."""
    run = run_directory(model)
    if run is None:
        return model
    if not (run / MERGED_DIR / MODEL_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"run directory {run} has no {MERGED_DIR}/ model: finish the unlearning run, or pass "
                                f"the model folder itself as --model")
    return str(run / MERGED_DIR)


def _run_config(cfg: TamperConfig) -> dict:
    run = run_directory(cfg.attacked)
    return {} if run is None else read_run_config(run)


def resolve_defaults(cfg: TamperConfig) -> TamperConfig:
    """Fill forget corpus, eval tasks and format from the run directory, else the reference experiment's."""
    run_cfg = _run_config(cfg)
    forget = fill(cfg.forget, run_cfg, "forget", WMDP_BIO_FORGET_CORPUS)
    tasks = cfg.eval_tasks or ",".join(run_tasks(run_cfg))
    if not tasks:
        tasks = forget if forget.startswith(FACTS_PREFIX) else REFERENCE_EVAL_TASKS
    fmt = fill(cfg.eval_format, run_cfg, "eval_format", "letter")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    forget_task = cfg.forget_task or names[0]
    if forget_task not in names:
        raise ConfigError(f"--forget_task {forget_task} is not one of --eval_tasks {names}")
    return dataclasses.replace(cfg, forget=forget, eval_tasks=",".join(names), eval_format=fmt,
                               forget_task=forget_task)


def fact_records(source: str) -> list[dict]:
    """Attack corpus documents tagged with their fact: [{"fact_id", "text"}].

    For `facts:<domain>` they are derived from `facts.corpus_texts`, which states each fact (in
    fact-id order) in the same number of phrasings; a jsonl corpus must carry `fact_id` itself.
    """
    from ..data.splits import fact_rows, has_options

    if has_options(source):  # a part of a split by fact (facts:<domain>@forget), or other phrasings
        return [{"fact_id": row["fact_id"], "text": row["text"]} for row in fact_rows(source)]
    if source.startswith(FACTS_PREFIX):
        from ..data import facts

        domain = source[len(FACTS_PREFIX):]
        items, texts = facts.facts(domain), facts.corpus_texts(domain)
        per_fact = len(texts) // max(1, len(items))
        if per_fact * len(items) != len(texts) or any(
                f.answer not in t for i, f in enumerate(items) for t in texts[i * per_fact:(i + 1) * per_fact]):
            raise ValueError(f"cannot tag the sentences of {source} with their facts: facts.corpus_texts no longer "
                             f"lists each fact's phrasings together")
        return [{"fact_id": items[i // per_fact].fact_id, "text": t} for i, t in enumerate(texts)]
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        raise ValueError(f"--holdout needs a facts:<domain> corpus or a local .jsonl corpus with fact_id and text "
                         f"columns, got {source}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or any("fact_id" not in r or "text" not in r for r in rows):
        raise ValueError(f"{source}: every row needs fact_id and text for --holdout")
    return [{"fact_id": str(r["fact_id"]), "text": str(r["text"])} for r in rows]


def split_fact_ids(source: str, ids: list[str], holdout: float, seed: int) -> tuple[set[str], set[str]]:
    """(attacked, held-out) fact ids: `facts.split_facts` for a fact domain, the same rule otherwise."""
    from ..data.splits import has_options

    if source.startswith(FACTS_PREFIX) and not has_options(source):
        from ..data.facts import split_facts

        attacked, held = split_facts(source[len(FACTS_PREFIX):], holdout, seed)
        return set(attacked), set(held)
    ordered = sorted(set(ids))
    random.Random(f"{source}:{seed}").shuffle(ordered)
    n_held = int(round(holdout * len(ordered)))
    return set(ordered[n_held:]), set(ordered[:n_held])


@dataclass
class EvalTask:
    """One line of the results: its name there, what `evaluate` is asked for, and the key it answers under."""

    name: str
    request: str
    key: str
    base: str  # the --eval_tasks entry it comes from


def plan_tasks(cfg: TamperConfig, out: Path, split: tuple[set[str], set[str]] | None) -> list[EvalTask]:
    """Evaluation tasks; with a held-out split, each fact task becomes an attacked and a held-out file."""
    plan = []
    for name in cfg.eval_tasks.split(","):
        items = None
        if split is not None:
            spec = resolve_tasks([name])
            if len(spec) == 1 and spec[0].dataset_path in ("facts", "json"):
                items = load_items(spec[0])
        display = task_display(name)
        if items is None or not any(i.get("fact_id") in split[0] | split[1] for i in items):
            plan.append(EvalTask(display, name, display, display))
            continue
        for part, ids in zip((ATTACKED, HELDOUT), split):
            rows = [i for i in items if i.get("fact_id") in ids]
            if not rows:
                raise ValueError(f"the {part} half of {name} is empty: lower or raise --holdout")
            stem = f"{display.replace(':', '-')}.{part}"
            path = write_jsonl_atomic(out / SPLIT_TASKS_DIR / f"{stem}.jsonl", rows)
            plan.append(EvalTask(f"{display}:{part}", str(path), stem, display))
    if split is not None and not any(t.name != t.base for t in plan):
        raise ValueError(f"--holdout needs an eval task whose questions carry fact_id (e.g. facts:<domain>); "
                         f"none of {cfg.eval_tasks} does")
    return plan


def attack_chunks(cfg: TamperConfig, tokenizer, attacked: set[str] | None) -> list[list[int]]:
    """The first `--forget_limit` chunks of the attack corpus (only attacked facts' text under --holdout)."""
    if attacked is None:
        texts = load_texts(cfg.forget, config=cfg.forget_config, column=cfg.forget_column, what="attack corpus",
                           column_flag="--forget_column")
    else:
        texts = [r["text"] for r in fact_records(cfg.forget) if r["fact_id"] in attacked]
    chunks = chunk_documents(texts, tokenizer, cfg.max_length, cfg.forget_limit)
    if not chunks:
        raise ValueError(f"attack corpus {cfg.forget} yields no chunks of 2+ tokens")
    return chunks


# --------------------------------------------------------------------------------------- measuring


def measure(model, tokenizer, plan: list[EvalTask], cfg: TamperConfig) -> dict[str, dict]:
    """{task name: {"acc", "acc_norm", "n"}} for every planned task."""
    from ..eval.evaluate import evaluate

    was_training = model.training
    model.eval()
    try:
        result = evaluate(model, tokenizer, [t.request for t in plan], format=cfg.eval_format,
                          batch_size=cfg.eval_batch, limit=cfg.eval_limit)
    finally:
        model.train(was_training)
    return {t.name: _pick(result, t.key, t.name) for t in plan}


def _pick(result: dict, key: str, name: str) -> dict:
    found = result.get("results", {}).get(key) or result.get("groups", {}).get(key)
    if found is None:
        raise KeyError(f"evaluation returned no result for task {name} (key {key})")
    return {k: found.get(k) for k in ("acc", "acc_norm", "n")}


def original_scores(cfg: TamperConfig, plan: list[EvalTask], out: Path) -> dict[str, dict]:
    """The original model's accuracy per task: from an eval JSON, or by evaluating the model given."""
    source = cfg.baseline
    run = run_directory(cfg.attacked)
    if source is None and run is not None and (run / BASE_EVAL_FILE).is_file():
        source = str(run / BASE_EVAL_FILE)
    if source is None:
        return {}
    if source.endswith(".json"):
        result = json.loads(Path(source).read_text())
        scores = {}
        for task in plan:
            for key in (task.key, task.base):  # a held-out half falls back to the whole task
                found = result.get("results", {}).get(key) or result.get("groups", {}).get(key)
                if found is not None:  # "task" says what was measured: the half, or the whole task
                    scores[task.name] = {**{k: found.get(k) for k in ("acc", "acc_norm", "n")}, "task": key}
                    break
        return scores
    cached = out / ORIGINAL_EVAL_FILE
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if saved.get("model") == source and set(saved["tasks"]) == {t.name for t in plan}:
            return saved["tasks"]
    log.info("evaluating the original model %s for the reference line", source)
    model, tokenizer = load_model(model_path(source), cfg.dtype, cfg.device, cfg.trust_remote_code)
    scores = measure(model, tokenizer, plan, cfg)
    del model
    write_json_atomic(cached, {"model": source, "tasks": scores})
    return scores


# ---------------------------------------------------------------------------------------- training


def attack_for(cfg: TamperConfig, lr: float, schedule: str, steps: int) -> Attack:
    """The fine-tuning attack these options name (`finetune`, the robustness protocol's attack too)."""
    return Attack(kind="full" if cfg.full else "lora", lr=lr, steps=steps, schedule=schedule, warmup=cfg.warmup,
                  batch=cfg.batch, per_device_batch=cfg.per_device_batch, optimizer=cfg.optimizer,
                  weight_decay=cfg.weight_decay, clip=cfg.clip, lora_rank=cfg.lora_rank, seed=cfg.seed,
                  momentum=cfg.momentum)


def attack(cfg: TamperConfig, lr: float, schedule: str, out: Path, plan: list[EvalTask],
           attacked: set[str] | None, original: dict[str, dict], step0: dict[str, dict] | None = None,
           tracker: Tracker | None = None) -> dict:
    """One fine-tuning attack on a freshly loaded model; `out/results.json` after every evaluation.

    `step0` reuses a step-0 measurement of the same weights (every attack of a sweep starts from the
    same model), which saves one evaluation per extra sweep setting. `tracker` gets every metrics
    line and every evaluation (as `eval/<task>/<metric>` at its step).
    """
    tracker = tracker or Tracker()
    model, tokenizer = load_model(model_path(cfg.attacked), cfg.dtype, cfg.device, cfg.trust_remote_code)
    chunks = attack_chunks(cfg, tokenizer, attacked)
    steps = cfg.steps or max(1, math.ceil(len(chunks) * cfg.epochs / cfg.batch))
    spec = attack_for(cfg, lr, schedule, steps)
    results = {"config": {**to_jsonable(cfg), "lr": lr, "schedule": schedule, "model_path": model_path(cfg.attacked),
                          "chunks": len(chunks), "steps": steps, "num_attacked_facts": len(attacked or ()),
                          "lora_targets": LORA_TARGETS if spec.kind == "lora" else None},
               "chance": CHANCE, "original": original, "records": [], "recovery": {}, "finished": False}
    log.info("attack lr=%g %s: %d chunks, %d steps of %d, evaluating every %d steps", lr, schedule, len(chunks),
             steps, cfg.batch, cfg.eval_every)
    tracker.log_config(results["config"])
    metrics_log = MetricsLog(out / METRICS_FILE, tracker=tracker)
    losses: list[float] = []
    began = time.perf_counter()
    with attached(model, spec) as trainable:

        def record(step: int, tasks: dict[str, dict] | None = None) -> None:
            train_loss = sum(losses) / len(losses) if losses else None
            losses.clear()
            tasks = tasks if tasks is not None else measure(trainable, tokenizer, plan, cfg)
            results["records"].append({"step": step, "train_loss": train_loss, "tasks": tasks,
                                       "wall_seconds": round(time.perf_counter() - began, 2)})
            tracker.log({f"{EVAL_KEY_PREFIX}{task}/{metric}": value for task, scores in tasks.items()
                         for metric, value in scores.items() if metric in ("acc", "acc_norm")}, step)
            results["recovery"] = recovery(results["records"], cfg.metric)
            results["finished"] = step == steps  # a killed attack's results say so (report marks them)
            write_json_atomic(out / RESULTS_FILE, results)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            metrics_log.write(metrics)
            losses.append(metrics["loss"])
            if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
                record(step + 1)

        record(0, step0)
        run_attack(trainable, chunks, tokenizer.pad_token_id, spec, on_step, desc=f"tamper lr={lr:g}")
    return results


def _label(lr: float, schedule: str, several_schedules: bool) -> str:
    return f"lr{lr:g}" + (f"_{schedule}" if several_schedules else "")


def _finished(out: Path) -> bool:
    path = out / RESULTS_FILE
    return path.is_file() and json.loads(path.read_text()).get("finished", True)


def _prepare_out(cfg: TamperConfig) -> Output:
    """Check what can fail before the first attack (tasks, model, reference line), then claim --out:
    only a tamper output may be replaced, and the replacement is swapped in once every attack is done."""
    check_tasks(cfg.eval_tasks)
    if cfg.run is not None and run_directory(cfg.run) is None:
        raise FileNotFoundError(f"--run {cfg.run} is not an unlearning run folder (it holds neither {MERGED_DIR}/ nor "
                                f"{RUN_CONFIG_FILE}): pass a folder `lensunlearn unlearn` wrote, or a model as --model")
    model_path(cfg.attacked)
    if cfg.baseline and cfg.baseline.endswith(".json") and not Path(cfg.baseline).is_file():
        raise FileNotFoundError(f"--baseline {cfg.baseline} does not exist: pass an eval JSON of the original model "
                                f"(e.g. a run's {BASE_EVAL_FILE}) or a model to evaluate")
    run = run_directory(cfg.attacked)
    out = Path(cfg.out)
    if run is not None and (out.resolve() == run.resolve() or out.resolve() in run.resolve().parents):
        raise FileExistsError(f"--out {out} holds the run being attacked ({run}): choose another --out")
    check_tracker(cfg)
    return prepare_output(out, "tamper", overwrite=cfg.overwrite, finished=_finished, resumable=False,
                          reads=(("--model", cfg.model), ("--baseline", cfg.baseline), ("--forget", cfg.forget)))


def run_tamper(cfg: TamperConfig) -> dict:
    """Attack once, or once per (lr, schedule) of a sweep; write results, plots and a sweep summary."""
    cfg = resolve_defaults(cfg)
    output = _prepare_out(cfg)
    return output.run(lambda work: _run_attacks(cfg, work))


def _run_attacks(cfg: TamperConfig, out: Path) -> dict:
    from ..report import plots

    split = None
    if cfg.holdout > 0:
        records = fact_records(cfg.forget)
        split = split_fact_ids(cfg.forget, [r["fact_id"] for r in records], cfg.holdout, cfg.seed)
        log.info("held-out split: %d attacked facts, %d held out", len(split[0]), len(split[1]))
        write_json_atomic(out / SPLIT_FILE, {"attacked": sorted(split[0]), "heldout": sorted(split[1])})
    plan = plan_tasks(cfg, out, split)
    original = original_scores(cfg, plan, out)
    settings = cfg.sweep
    several = len({s for _, s in settings}) > 1
    if len(settings) == 1 and not cfg.lrs and not cfg.schedules:
        with open_tracker(cfg, out, Path(cfg.out).name, "tamper", final=cfg.out) as tracker:
            results = attack(cfg, settings[0][0], settings[0][1], out, plan, split and split[0], original,
                             tracker=tracker)
            plots.plot_tamper(results, out / TAMPER_PLOT_FILE, cfg.metric)
            _track_results(tracker, results, out)
        _log_recovery(results, out)
        return results
    # The summary lists every planned attack up front, so a killed sweep still names its folders.
    runs = [{"label": _label(lr, s, several), "lr": lr, "schedule": s, "dir": _label(lr, s, several),
             "recovery": None} for lr, s in settings]
    summary = {"config": to_jsonable(cfg), "runs": runs}
    write_json_atomic(out / SWEEP_FILE, summary)
    step0 = None
    for run in runs:
        # one tracked run per attack (a sweep's runs grouped under --out's name), each in its own folder
        with open_tracker(cfg, out / run["dir"], f"{Path(cfg.out).name}/{run['dir']}", "tamper",
                          group=Path(cfg.out).name, final=Path(cfg.out) / run["dir"]) as tracker:
            results = attack(cfg, run["lr"], run["schedule"], out / run["dir"], plan, split and split[0], original,
                             step0, tracker)
            plots.plot_tamper(results, out / run["dir"] / TAMPER_PLOT_FILE, cfg.metric)
            _track_results(tracker, results, out / run["dir"])
        step0 = results["records"][0]["tasks"]
        _log_recovery(results, out / run["dir"])
        run["recovery"] = results["recovery"]
        write_json_atomic(out / SWEEP_FILE, summary)
    plots.plot_tamper_comparison([(r["label"], json.loads((out / r["dir"] / RESULTS_FILE).read_text())) for r in runs],
                                 out / SWEEP_PLOT_FILE, cfg.metric)
    log.info("sweep plot: %s", out / SWEEP_PLOT_FILE)
    return summary


def _track_results(tracker: Tracker, results: dict, out: Path) -> None:
    """The attack's plot and its recovery per task (last minus first evaluation) as summary numbers."""
    tracker.log_images([out / TAMPER_PLOT_FILE])
    tracker.log_summary({f"recovery/{task}": value for task, value in results["recovery"].items()})


def _log_recovery(results: dict, out: Path) -> None:
    for task, value in results["recovery"].items():
        first = results["records"][0]["tasks"][task][results["config"]["metric"]]
        log.info("%s: %s %.2f%% -> %+.2f points", out, task, 100 * first, 100 * value)

