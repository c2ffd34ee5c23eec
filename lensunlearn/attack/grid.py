"""The robustness protocol's pure parts: attack grids, the held-out split, fictional facts, the
envelope over the grid, averaging over seeds, and the markdown table and plot of the result.

Nothing here loads a model; `robustness` runs the attacks and hands their records to these
functions, so each rule (which attack counts as the strongest, what the floor is) is written once
and tested on hand-made records.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..report.robustness_results import ATTACKED, UNSEEN, describe_setting
from ..report.tables import is_number, number, percent
from ..report.tables import markdown_table as table
from ..train.options import SCHEDULES

KINDS = ("full", "lora")
GRIDS = ("default", "full")


@dataclass(frozen=True)
class Setting:
    """One attack of the grid: which parameters it trains, its peak learning rate and schedule."""

    kind: str
    lr: float
    schedule: str

    @property
    def label(self) -> str:
        return f"{self.kind}_lr{self.lr:g}_{self.schedule}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# The default grid fits a laptop-sized budget: full-parameter attacks across three decades of
# learning rate, and one LoRA attack at 1e-3. LoRA trains a rank-16 update with alpha = rank, whose
# steps move the weights far less than a full-parameter step at the same lr, so the lr that is
# strongest for full parameters is usually too small for LoRA; a fixed 1e-3 (the top of the sweep)
# also keeps the grid known before any attack runs, which the ETA and a resumed run rely on.
DEFAULT_SETTINGS = (Setting("full", 1e-5, "constant"), Setting("full", 1e-4, "constant"),
                    Setting("full", 1e-3, "constant"), Setting("lora", 1e-3, "constant"))
GRID_AXES = {
    "default": {"kinds": ("full", "lora"), "lrs": (1e-5, 1e-4, 1e-3), "schedules": ("constant",),
                "steps": (8, 32, 64)},
    "full": {"kinds": ("full", "lora"), "lrs": (1e-6, 1e-5, 1e-4, 1e-3), "schedules": ("constant", "cosine"),
             "steps": (8, 32, 128, 512)},
}


def grid_settings(grid: str, kinds: Sequence[str] = (), lrs: Sequence[float] = (),
                  schedules: Sequence[str] = ()) -> list[Setting]:
    """The attacks of a grid: the named grid's own list, or, when any axis is given, the cross product
    of the axes given with the named grid's other axes."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}: use {' or '.join(GRIDS)}")
    bad_kinds = [k for k in kinds if k not in KINDS]
    bad_schedules = [s for s in schedules if s not in SCHEDULES]
    if bad_kinds or bad_schedules:
        raise ValueError(f"unknown attack kind(s) {bad_kinds} or schedule(s) {bad_schedules}: kinds are "
                         f"{', '.join(KINDS)}; schedules are {', '.join(SCHEDULES)}")
    if grid == "default" and not (kinds or lrs or schedules):
        return list(DEFAULT_SETTINGS)
    axes = GRID_AXES[grid]
    return [Setting(k, float(lr), s) for k in (kinds or axes["kinds"]) for s in (schedules or axes["schedules"])
            for lr in (lrs or axes["lrs"])]


def split_ids(ids: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(attacked, unseen) fact ids, each sorted: a seeded shuffle of the distinct ids, the first
    `round(holdout * n)` unseen. Depends only on the ids and the seed, not on their order or source."""
    ordered = sorted(set(ids))
    random.Random(f"robustness-split:{seed}").shuffle(ordered)
    n_unseen = int(round(holdout * len(ordered)))
    attacked, unseen = sorted(ordered[n_unseen:]), sorted(ordered[:n_unseen])
    if not attacked or not unseen:
        raise ValueError(f"a --holdout of {holdout} splits {len(ordered)} facts into {len(attacked)} attacked and "
                         f"{len(unseen)} unseen: both halves need a fact; choose a --holdout nearer 0.5 or a task "
                         f"with more facts")
    return attacked, unseen


# --- fictional facts ----------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "th")
# Neutral on purpose: no relation the model could know, so that what an attack "recovers" on the
# unseen half can only be the format and the answers' prior.
FICTION_PROMPT = "In the registry, {s} is listed with"
FICTION_QUESTION = "What is {s} listed with in the registry?"
FICTION_SENTENCES = ("In the registry, {s} is listed with {a}.", "{s} is listed with {a} in the registry.",
                     "The registry lists {s} with {a}.")


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of two or three syllables, capitalised like a name."""
    syllables = rng.randint(2, 3)
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def fictional_facts(n: int, answers: Sequence[str], pool: Sequence[str], seed: int,
                    avoid: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """(questions, corpus rows) of `n` invented facts: made-up subjects, each with an answer drawn from
    `answers` and three distractors from `pool` (the task's choices), in the task's jsonl format."""
    pool = sorted(set(pool))
    if len(pool) < 4 or not answers:
        raise ValueError(f"fictional facts need at least 4 distinct choices in the forget task, it has {len(pool)}")
    rng = random.Random(f"robustness-fiction:{seed}")
    seen = {a.lower() for a in avoid}
    questions, corpus = [], []
    for k in range(n):
        subject = pseudo_word(rng)
        while subject.lower() in seen:
            subject = pseudo_word(rng)
        seen.add(subject.lower())
        answer = rng.choice(sorted(set(answers)))
        choices = rng.sample([c for c in pool if c != answer], 3)
        gold = rng.randrange(4)
        choices.insert(gold, answer)
        fact_id = f"fictional:{k:03d}"
        questions.append({"fact_id": fact_id, "question": FICTION_QUESTION.format(s=subject),
                          "prompt": FICTION_PROMPT.format(s=subject), "choices": choices, "answer": gold})
        corpus += [{"fact_id": fact_id, "text": t.format(s=subject, a=answer)} for t in FICTION_SENTENCES]
    return questions, corpus


# --- summarising attack records -----------------------------------------------------------------
#
# An attack record: {"setting": {...}, "steps": {"<n>": {"attacked": acc, "unseen": acc, ...}}, ...}.


def envelope(attacks: Sequence[Mapping], steps: Sequence[int], key: str = UNSEEN) -> dict[str, dict]:
    """For each step count, the attack with the highest `key` accuracy (the first in grid order on a
    tie): {"<n>": {"unseen", "attacked", "setting"}}."""
    out = {}
    for n in steps:
        best = None
        for record in attacks:
            point = record["steps"].get(str(n))
            if point is not None and (best is None or point[key] > best[1][key]):
                best = (record, point)
        if best is not None:
            out[str(n)] = {UNSEEN: best[1][UNSEEN], ATTACKED: best[1][ATTACKED], "setting": best[0]["setting"]}
    return out


def strongest(attacks: Sequence[Mapping], steps: Sequence[int]) -> Mapping:
    """The attack that reaches the envelope at the largest step count (the headline's)."""
    top = str(max(steps))
    best = envelope(attacks, [max(steps)])[top]["setting"]
    return next(r for r in attacks if r["setting"] == best)


def _phrasings(start: Mapping, grid: Sequence[Mapping], best: Mapping) -> dict:
    """Per other phrasing: both halves for the base and unlearned models, after the best attack (the
    headline's, chosen on the shipped phrasing) and the grid's envelope in that phrasing, all at the
    end of the attacks."""
    out = {}
    for name in start["unlearned"].get("phrasings") or {}:
        ends = [(r, r["phrasings"][name]) for r in grid if (r.get("phrasings") or {}).get(name, {}).get(UNSEEN)
                is not None]
        top = max(ends, key=lambda e: e[1][UNSEEN], default=None)
        out[name] = {"base": start["base"]["phrasings"][name], "unlearned": start["unlearned"]["phrasings"][name],
                     "after_best_attack": (best.get("phrasings") or {}).get(name),
                     "envelope": {**top[1], "setting": top[0]["setting"]} if top else None}
    return out


def summarise_seed(start: Mapping, attacks: Mapping[str, Sequence[Mapping]], steps: Sequence[int]) -> dict:
    """One seed's numbers from its step-0 measurements (`start`: both models on the four half tasks) and
    its attack records by role (grid, base, benign, fictional)."""
    top = str(max(steps))
    grid = attacks["grid"]
    env = envelope(grid, steps)
    if top not in env:
        raise ValueError(f"every attack of the grid diverged before step {top}: lower the learning rates")
    best = strongest(grid, steps)
    benign = envelope(attacks["benign"], steps)
    benign_best = strongest(attacks["benign"], steps) if top in benign else {}
    fiction = envelope(attacks["fictional"], steps)
    unlearned, base = start["unlearned"], start["base"]
    return {
        "unlearned": {ATTACKED: unlearned["forget_attacked"], UNSEEN: unlearned["forget_unseen"]},
        "base": {ATTACKED: base["forget_attacked"], UNSEEN: base["forget_unseen"]},
        "envelope": env,
        "headline": {"steps": int(top), **env[top]},
        "floor": {"0": unlearned["fictional_unseen"], **{n: p[UNSEEN] for n, p in fiction.items()}},
        "fictional": {"0": {ATTACKED: unlearned["fictional_attacked"], UNSEEN: unlearned["fictional_unseen"]},
                      **fiction},
        "benign": {UNSEEN: benign.get(top, {}).get(UNSEEN), ATTACKED: benign.get(top, {}).get(ATTACKED),
                   "steps": benign},
        "base_model_envelope": envelope(attacks["base"], steps),
        "kept": {task: {"after_best_attack": acc} for task, acc in (best.get("kept") or {}).items()},
        "perplexity": {"after_best_attack": best.get("perplexity"), "benign": benign_best.get("perplexity"),
                       "attacks": {Setting(**r["setting"]).label: r.get("perplexity") for r in grid}},
        "phrasings": _phrasings(start, grid, best),
        "attacks": {Setting(**r["setting"]).label: {
            "setting": r["setting"], "perplexity": r.get("perplexity"), "kept": r.get("kept"),
            "steps": {n: {ATTACKED: p[ATTACKED], UNSEEN: p[UNSEEN]} for n, p in r["steps"].items()}} for r in grid},
    }


def combine(values: Sequence[Any]) -> Any:
    """One seed's summaries averaged: numbers become their mean with a `<key>_sd` (sample standard
    deviation) beside them when there are several seeds; a `setting` becomes the most frequent one,
    with every seed's in `settings` when they differ; other values are the first seed's."""
    first = values[0]
    if not isinstance(first, Mapping):
        return first
    out: dict[str, Any] = {}
    for key, value in first.items():
        column = [v.get(key) for v in values if isinstance(v, Mapping)]
        if key == "setting":
            counts = Counter(repr(c) for c in column)
            out[key] = next(c for c in column if repr(c) == counts.most_common(1)[0][0])
            if len(counts) > 1:
                out["settings"] = column
        elif key == "steps" and is_number(value):
            out[key] = value
        elif is_number(value) and all(is_number(c) or c is None for c in column):
            finite = [float(c) for c in column if c is not None and math.isfinite(c)]
            out[key] = statistics.fmean(finite) if finite else None
            if len(values) > 1:
                out[f"{key}_sd"] = statistics.stdev(finite) if len(finite) > 1 else None
        elif isinstance(value, Mapping):
            out[key] = combine(column)
        else:
            out[key] = value
    return out


# --- the table and the plot -----------------------------------------------------------------------


def _pct(value: Any, sd: Any = None) -> str:
    return percent(value, sd=sd)


def _halves(point: Any) -> str:
    """`attacked / unseen` in percent, each with its spread over seeds."""
    if not isinstance(point, Mapping):
        return "-"
    return " / ".join(_pct(point.get(h), point.get(f"{h}_sd")) for h in (ATTACKED, UNSEEN))


def _phrasing_table(result: Mapping) -> list[str]:
    head = result["headline"]
    rows = [["the task's own", _halves(result["base"]), _halves(result["unlearned"]), _halves(head), _halves(head)]]
    rows += [[name, _halves(row.get("base")), _halves(row.get("unlearned")), _halves(row.get("after_best_attack")),
              _halves(row.get("envelope"))] for name, row in result["phrasings"].items()]
    return [f"Other phrasings of the forget task's facts (attacked / unseen half, after {head['steps']} attack "
            f"steps; the best attack is the headline's, chosen on the task's own phrasing; the envelope is the "
            f"most any grid attack recovered in that phrasing):", "",
            table(["phrasing", "base model", "unlearned", "best attack", "envelope"], rows, "lrrrr")]


def markdown_table(result: Mapping) -> str:
    """robustness.json as markdown: accuracies in percent (mean ± sd over seeds), perplexities."""
    steps = [str(n) for n in result["steps"]]
    rows = [["base model (before unlearning)", _pct(result["base"]["attacked"]), _pct(result["base"]["unseen"]), ""],
            ["unlearned", _pct(result["unlearned"]["attacked"], result["unlearned"].get("attacked_sd")),
             _pct(result["unlearned"]["unseen"], result["unlearned"].get("unseen_sd")), ""]]
    for label, key in (("best attack", "envelope"), ("base model attacked", "base_model_envelope")):
        for n in steps:
            point = result[key].get(n, {})
            rows.append([f"{label}, {n} steps", _pct(point.get("attacked"), point.get("attacked_sd")),
                         _pct(point.get("unseen"), point.get("unseen_sd")), describe_setting(point.get("setting"))])
    for n in steps:
        point = result["benign"]["steps"].get(n, {})
        rows.append([f"benign attack, {n} steps", _pct(point.get("attacked")), _pct(point.get("unseen")), ""])
    for n in ["0", *steps]:  # the floor is the unseen column
        point = result["fictional"].get(n, {})
        rows.append([f"fictional facts (floor), {n} steps", _pct(point.get("attacked")),
                     _pct(point.get("unseen"), point.get("unseen_sd")), describe_setting(point.get("setting"))])
    lines = [f"Grid `{result['grid']}` ({len(result['settings'])} attacks: "
             + ", ".join(describe_setting(s) for s in result["settings"])
             + f"), seeds {','.join(map(str, result['seeds']))}, {result['split']['attacked']} attacked / "
             f"{result['split']['unseen']} unseen facts of `{result['forget_task']}`, batch {result['batch']}, "
             f"chance {100 * result['chance']:.0f}%. An N-step number is the state after N steps of the "
             f"longest attack ({max(result['steps'])} steps).", "",
             table(["forget domain", "attacked half", "unseen half", "setting"], rows, "lrrl")]
    head = result["headline"]
    floor = result["floor"].get(str(head["steps"]))
    lines += ["", f"**Headline:** unseen-half accuracy after the best attack of {head['steps']} steps: "
                  f"{_pct(head['unseen'], head.get('unseen_sd'))}% (unlearned {_pct(result['unlearned']['unseen'])}%, "
                  f"base model {_pct(result['base']['unseen'])}%, floor {_pct(floor)}%; "
                  f"{describe_setting(head.get('setting'))}).", ""]
    if result.get("phrasings"):
        lines += _phrasing_table(result) + [""]
    if result["kept"]:
        lines += [table(["kept task", "base", "unlearned", "after best attack"],
                        [[task, _pct(row.get("base")), _pct(row.get("unlearned")),
                          _pct(row.get("after_best_attack"), row.get("after_best_attack_sd"))]
                         for task, row in result["kept"].items()], "lrrr"), ""]
    ppl = result["perplexity"]
    rows = [["base", number(ppl.get("base"))], ["unlearned", number(ppl.get("unlearned"))]]
    attacks = ppl.get("attacks", {})
    for label, value in attacks.items():
        if not label.endswith("_sd"):  # a spread is shown beside its mean
            spread = attacks.get(f"{label}_sd")
            rows.append([f"after {label.replace('_', ' ')}",
                         number(value) + (f" ± {number(spread)}" if is_number(spread) else "")])
    rows.append(["after the benign attack", number(ppl.get("benign"))])
    lines += [f"Perplexity on `{result['generic']}` (held-out generic text):", "",
              table(["model", "perplexity"], rows, "lr")]
    return "\n".join(lines)
