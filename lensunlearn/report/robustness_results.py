"""Reading `robustness` outputs for the report: the checked summary, one table row per run, the
curves to plot, and the capability verdict.

`robustness` writes `robustness.json` (`layout.is_robustness_output` recognises its folder);
`report` tabulates and plots it through this module, so the keys it relies on are named once
(`REQUIRED`) and a file lacking one is refused with that key's name before any table is written.
The numbers used, as `robustness` writes them (accuracies are fractions; with several seeds a
number is the mean and `<key>_sd` beside it the sample sd):

    {"grid", "settings", "steps": [n, ...], "seeds", "unlearned": {"attacked", "unseen"},
     "base": {"attacked", "unseen"}, "envelope": {"<n>": {"unseen", "attacked", "setting"}},
     "headline": {"steps", "unseen", "attacked", "setting"}, "floor": {"0", "<n>"},
     "benign": {"unseen", "attacked"}, "base_model_envelope": {"<n>": {"unseen"}},
     "kept": {task: {"base", "unlearned", "after_best_attack"}}, "perplexity": {"base", "unlearned"}}

and, where the protocol measured other phrasings of the forget facts (optional: older outputs lack it),
"phrasings": {name: {"base", "unlearned", "after_best_attack", "envelope": {"attacked", "unseen"}}}.
Also optional, for the same reason:

    "recovery_share": {"<n>": share}, "selected": {"<n>": {"unseen", "bias", "recovery_share"}},
    "worst_case": {"<n>": {"unseen", "source", "sources" (with several seeds that disagree), "recovery_share"}},
    "fictional": {"<n>": {"forget_unseen"}}, "guessable": {"base", "unlearned", "steps": {"<n>": acc}},
    "paper_attacks": {name: {"setting", "title", "steps": {"<n>": {"unseen"}}, "recovery_share": {"<n>"}}}

(the recovery share is (after the attack - unlearned) / (base - unlearned) on the unseen half, None where
unlearning removed nothing; `selected` is the unseen half under the attack chosen on the other fold of it;
`worst_case` the highest of the envelope, the real unseen half during the fictional attack and the unseen
half after the benign attack, its `source` "envelope", "fictional_attack" or "benign_attack").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import InputError, UserError, read_json
from ..core.paths import ROBUSTNESS_FILE, read_marker
from .tables import MISSING, PENDING, is_number, markdown_table, number, percent

# The halves' keys as `robustness_grid` writes them, repeated here because importing that module
# imports torch (through its schedules), which a report of finished files never needs.
ATTACKED, UNSEEN = "attacked", "unseen"

# The worst case's sources other than the envelope (`worst_case.<n>.source`), in the tables' words and
# in the order they are named.
WORST_CASE_SOURCES = {"fictional_attack": "fictional attack", "benign_attack": "benign attack"}

# A defence that holds only because general ability collapsed is no defence: past either limit the
# run is marked as failing capability, however low its forget accuracy stays under attack.
PPL_RATIO_LIMIT = 1.10
KEPT_SHARE_LIMIT = 0.95

REQUIRED: dict[str, tuple[str, ...]] = {
    "grid": (), "steps": (), "seeds": (), "unlearned": (ATTACKED, UNSEEN), "base": (UNSEEN,), "envelope": (),
    "headline": ("steps", ATTACKED, UNSEEN), "floor": (), "benign": (UNSEEN,), "base_model_envelope": (),
    "kept": (), "perplexity": ("base", "unlearned"),
}


def check_result(result: Any, path: Path) -> dict:
    """`result` itself, once every key the report reads is there; else one error naming the first missing key."""
    fix = "it is damaged or not written by `lensunlearn robustness`: re-create it with `lensunlearn robustness RUN_DIR`"
    if not isinstance(result, dict):
        raise InputError(f"{path} holds {type(result).__name__}, not a robustness summary: {fix}")
    for key, inner in REQUIRED.items():
        if key not in result:
            raise InputError(f"{path} lacks {key!r}: {fix}")
        if inner and not isinstance(result[key], dict):
            raise InputError(f"{path}: {key!r} is not an object: {fix}")
        missing = [k for k in inner if k not in result[key]]
        if missing:
            raise InputError(f"{path} lacks {key}.{missing[0]}: {fix}")
    steps = result["steps"]
    if not isinstance(steps, list) or not steps or not all(isinstance(n, int) for n in steps):
        raise InputError(f"{path}: 'steps' must be a non-empty list of step counts, got {steps!r}: {fix}")
    return result


def load_robustness(path: str | Path) -> tuple[str, dict | None]:
    """(label, checked robustness.json) of an output folder; None for an output still running (its row is pending)."""
    path = Path(path)
    if (path / ROBUSTNESS_FILE).is_file():
        return path.name, check_result(read_json(path / ROBUSTNESS_FILE), path / ROBUSTNESS_FILE)
    if read_marker(path) == "robustness":
        return path.name, None
    raise UserError(f"{path} is not a robustness output (no {ROBUSTNESS_FILE}): pass a folder written by "
                    f"`lensunlearn robustness`")


# --- numbers -------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if is_number(value) else None


def _at(node: Any, key: str) -> tuple[float | None, float | None]:
    """(mean, sd) of `node[key]`; sd None for one seed or a number that was never measured."""
    if not isinstance(node, Mapping):
        return None, None
    return _number(node.get(key)), _number(node.get(f"{key}_sd"))


def perplexity_ratio(result: Mapping) -> float | None:
    """Unlearned over base perplexity of the held-out generic text: above 1 the model writes worse than before."""
    base, unlearned = _number(result["perplexity"].get("base")), _number(result["perplexity"].get("unlearned"))
    return unlearned / base if base and unlearned is not None else None


def capability_failures(result: Mapping) -> list[str]:
    """Why the unlearned model counts as having lost general ability (empty when it has not)."""
    failures = []
    ratio = perplexity_ratio(result)
    if ratio is not None and ratio > PPL_RATIO_LIMIT:
        failures.append(f"perplexity x{ratio:.2f} of base")
    for task, row in result["kept"].items():
        base, unlearned = _at(row, "base")[0], _at(row, "unlearned")[0]
        if base and unlearned is not None and unlearned < KEPT_SHARE_LIMIT * base:
            failures.append(f"{task} at {100 * unlearned / base:.0f}% of base")
    return failures


def capability(result: Mapping | None) -> str:
    """"ok", "fails", "unknown" (nothing measured capability) or "pending" (the output is not finished)."""
    if result is None:
        return PENDING
    if capability_failures(result):
        return "fails"
    return "ok" if perplexity_ratio(result) is not None or result["kept"] else "unknown"


def unseen_curves(result: Mapping) -> dict[str, tuple[list[int], list[float | None], list[float | None]]]:
    """(steps from 0, means, sds) of unseen-half accuracy: the best attack over the grid (from the unlearned
    model), the base model attacked the same way, and the fictional-facts floor."""
    steps = [0, *result["steps"]]

    def curve(start: tuple, points: Mapping, key: str | None) -> tuple[list[int], list, list]:
        pairs = [start] + [_at(points.get(str(n)), key) if key else _at(points, str(n)) for n in result["steps"]]
        return steps, [m for m, _ in pairs], [s for _, s in pairs]

    return {"best attack": curve(_at(result["unlearned"], UNSEEN), result["envelope"], UNSEEN),
            "base model": curve(_at(result["base"], UNSEEN), result["base_model_envelope"], UNSEEN),
            "floor": curve(_at(result["floor"], "0"), result["floor"], None)}


# --- the table -----------------------------------------------------------------------------------


def describe_setting(setting: Mapping | None) -> str:
    """An attack setting in a few words: `full lr 0.001 constant`."""
    if not setting:
        return "-"
    return f"{setting['kind']} lr {setting['lr']:g} {setting['schedule']}"


_setting = describe_setting


def _share_of_means(result: Mapping, n: int) -> float | None:
    """The recovery share at `n` steps from the mean accuracies, for an output written before the protocol
    recorded it (with several seeds, the share of the means rather than the mean of each seed's share)."""
    value = _at(result["envelope"].get(str(n)), UNSEEN)[0]
    unlearned, base = _at(result["unlearned"], UNSEEN)[0], _at(result["base"], UNSEEN)[0]
    if value is None or unlearned is None or base is None or base - unlearned <= 0:
        return None
    return (value - unlearned) / (base - unlearned)


def _put(row: dict, key: str, pair: tuple[float | None, float | None]) -> None:
    row[key], row[f"{key}_sd"] = pair


def robustness_row(label: str, result: Mapping | None) -> dict[str, Any]:
    """One flat row per output (the csv's columns): accuracies as fractions, each with its `_sd`;
    only the run's name and "pending" for an output still running."""
    row: dict[str, Any] = {"run": label}
    if result is None:
        return {**row, "capability": PENDING, "capability_failures": ""}
    top = str(result["headline"]["steps"])
    row.update(objective=result.get("objective"), grid=result["grid"], attacks=len(result.get("settings") or []),
               steps="/".join(map(str, result["steps"])), seeds=",".join(map(str, result["seeds"])),
               headline_steps=int(top), best_attack=_setting(result["headline"].get("setting")))
    _put(row, "forget_unseen", _at(result["unlearned"], UNSEEN))
    _put(row, "forget_attacked", _at(result["unlearned"], ATTACKED))
    _put(row, "base_forget_unseen", _at(result["base"], UNSEEN))
    for task, kept in result["kept"].items():
        row[f"kept_{task}_base"] = _at(kept, "base")[0]
        _put(row, f"kept_{task}", _at(kept, "unlearned"))
        _put(row, f"kept_{task}_after_best_attack", _at(kept, "after_best_attack"))
    row.update(perplexity_base=_number(result["perplexity"].get("base")),
               perplexity_unlearned=_number(result["perplexity"].get("unlearned")),
               perplexity_ratio=perplexity_ratio(result))
    for n in result["steps"]:
        _put(row, f"unseen_{n}", _at(result["envelope"].get(str(n)), UNSEEN))
        _put(row, f"base_unseen_{n}", _at(result["base_model_envelope"].get(str(n)), UNSEEN))
        _put(row, f"recovery_share_{n}", _at(result.get("recovery_share"), str(n)) if result.get("recovery_share")
             else (_share_of_means(result, n), None))
    worst = result.get("worst_case") or {}  # older outputs lack it: their cells stay "-"
    for n in result["steps"]:
        point = worst.get(str(n))
        _put(row, f"worst_case_{n}", _at(point, UNSEEN))
        _put(row, f"worst_case_recovery_share_{n}", _at(point, "recovery_share"))
        if isinstance(point, Mapping):
            row[f"worst_case_source_{n}"] = ",".join(map(str, point.get("sources") or [point.get("source")]))
    selected = (result.get("selected") or {}).get(top)
    _put(row, "selected_unseen", _at(selected, UNSEEN))
    _put(row, "selection_bias", _at(selected, "bias"))
    for name, paper in (result.get("paper_attacks") or {}).items():
        row[f"paper_{name}_setting"] = _setting(paper.get("setting"))
        for n in result["steps"]:
            _put(row, f"paper_{name}_unseen_{n}", _at((paper.get("steps") or {}).get(str(n)), UNSEEN))
            _put(row, f"paper_{name}_recovery_share_{n}", _at(paper.get("recovery_share"), str(n)))
    _put(row, "attacked", _at(result["headline"], ATTACKED))
    _put(row, "floor", _at(result["floor"], top))
    _put(row, "fictional_forget_unseen", _at((result.get("fictional") or {}).get(top), "forget_unseen"))
    _put(row, "benign_unseen", _at(result["benign"], UNSEEN))
    guess = result.get("guessable")
    if guess:
        row["guessable_facts"] = len(result.get("guessable_facts") or [])
        row["guessable_base"] = _at(guess, "base")[0]
        _put(row, "guessable_unlearned", _at(guess, "unlearned"))
        _put(row, "guessable_after_best_attack", _at(guess.get("steps"), top))
    for name, phrasing in (result.get("phrasings") or {}).items():
        row[f"phrasing_{name}_base"] = _at(phrasing.get("base"), UNSEEN)[0]
        _put(row, f"phrasing_{name}_forget", _at(phrasing.get("unlearned"), UNSEEN))
        _put(row, f"phrasing_{name}_envelope", _at(phrasing.get("envelope"), UNSEEN))
    for group, key in FLUENCY_GROUPS.items():
        row[f"fluency_{key}"], row[f"fluency_{key}_base"] = fluency_median(result, group)
    row.update(capability=capability(result), capability_failures="; ".join(capability_failures(result)))
    return row


# The fluency groups shown in the table: the unseen half's prompts (what a user would ask about the
# forgotten facts) and neighbouring relations of the same subjects.
FLUENCY_GROUPS = {"forget (unseen half)": "forget", "neighbour": "neighbour"}


def fluency_median(result: Mapping, group: str) -> tuple[float | None, float | None]:
    """The median base-model perplexity of the unlearned model's greedy continuations in `group`, and
    the base model's own; (None, None) when the output recorded no fluency. Near the base model's means
    the model answers in words (wrong or right); hundreds mean token salad."""
    models = ((result.get("fluency") or {}).get("groups") or {}).get(group, {}).get("models") or {}
    return tuple(_number((models.get(name) or {}).get("summary", {}).get("median"))  # type: ignore[return-value]
                 for name in ("unlearned", "base"))


def fmt_fluency(row: Mapping, key: str) -> str:
    """"12.3 (base 2.9)", the continuation perplexities of one fluency group; "-" when not recorded."""
    value, base = _number(row.get(f"fluency_{key}")), _number(row.get(f"fluency_{key}_base"))
    if value is None:
        return MISSING
    return number(value, 1) + (f" (base {number(base, 1)})" if base is not None else "")


def fmt_acc(row: Mapping, key: str, base_key: str | None = None, pending: str = PENDING) -> str:
    """An accuracy in percent as "12.5 ± 3.1 (base 80.0)": the sd when there were several seeds, the
    base model's number when there is one; "-" for a number the run did not measure."""
    if row.get("capability") == PENDING:
        return pending
    value = _number(row.get(key))
    if value is None:
        return MISSING
    base = _number(row.get(base_key)) if base_key else None
    return percent(value, sd=_number(row.get(f"{key}_sd"))) + (f" (base {percent(base)})" if base is not None else "")


def fmt_share(row: Mapping, key: str, pending: str = PENDING) -> str:
    """A recovery share as "0.57 ± 0.03"; "-" where it is not defined or was not measured."""
    if row.get("capability") == PENDING:
        return pending
    value, sd = _number(row.get(key)), _number(row.get(f"{key}_sd"))
    return MISSING if value is None else number(value) + (f" ± {number(sd)}" if sd is not None else "")


def worst_case_sources(sources: Sequence[Any]) -> str:
    """The attacks other than the envelope that gave the worst case, from each seed's `source`, as a table
    cell's note: "fictional attack" or "benign attack" where every seed agrees, "benign attack in 1 of 3
    seeds" (each such attack, comma-separated) where they disagree; "" where the envelope gave it on every
    seed."""
    sources = ["" if s is None else str(s) for s in sources]
    named = [s for s in dict.fromkeys([*WORST_CASE_SOURCES, *sources]) if s in sources and s not in ("envelope", "")]
    words = [WORST_CASE_SOURCES.get(s, s.replace("_", " ")) for s in named]
    if len(set(sources)) == 1:
        return "".join(words)
    return ", ".join(f"{w} in {sources.count(s)} of {len(sources)} seeds" for s, w in zip(named, words, strict=True))


def fmt_worst(row: Mapping, n: int) -> str:
    """The worst case at `n` steps as "51.4 (fictional attack)" or "51.4 (benign attack)": the source
    named only where an attack other than the envelope gave it, and where seeds disagree in how many
    ("51.4 (benign attack in 1 of 3 seeds)"); "-" when not recorded."""
    cell = fmt_acc(row, f"worst_case_{n}")
    note = worst_case_sources(str(row.get(f"worst_case_source_{n}") or "").split(","))
    return cell if cell in (MISSING, PENDING) or not note else f"{cell} ({note})"


def _capability_cell(row: Mapping) -> str:
    if row["capability"] == "fails":
        return f"**fails**: {row['capability_failures']}"
    return row["capability"]


def robustness_table(runs: Sequence[tuple[str, Mapping | None]]) -> str:
    """The markdown table: one row per run; step counts and kept tasks are the union over the runs."""
    finished = [result for _, result in runs if result is not None]
    steps = sorted({n for result in finished for n in result["steps"]})
    tasks = list(dict.fromkeys(task for result in finished for task in result["kept"]))
    phrasings = list(dict.fromkeys(name for result in finished for name in result.get("phrasings") or {}))
    papers = list(dict.fromkeys(name for result in finished for name in result.get("paper_attacks") or {}))
    guessable = any(result.get("guessable") for result in finished)
    selected = any(result.get("selected") for result in finished)  # older outputs lack these
    worst = any(result.get("worst_case") for result in finished)
    fiction = any(is_number((result.get("fictional") or {}).get(str(result["headline"]["steps"]), {})
                            .get("forget_unseen")) for result in finished)
    rows = [robustness_row(label, result) for label, result in runs]
    tops = {r["headline_steps"] for r in rows if "headline_steps" in r}
    last = f"{tops.pop()} steps" if len(tops) == 1 else "last step"
    header = ["run", "grid", "forget ↓", *(f"{t} ↑" for t in tasks), "perplexity ratio",
              *(f"unseen, {n} steps" for n in steps), *(f"recovery share, {n} steps" for n in steps),
              *(f"worst case, {n} steps" for n in (steps if worst else [])),
              *([f"unseen, attack chosen on the other fold, {last}"] if selected else []),
              *(f"unseen under the {p} paper's attack, {n} steps" for p in papers for n in steps),
              *(f"recovery share under the {p} paper's attack, {last}" for p in papers),
              f"attacked half, {last}", f"floor, {last}",
              *([f"unseen after the fictional attack, {last}"] if fiction else []),
              f"benign, {last}", *([f"guessable facts after the best attack, {last}"] if guessable else []),
              *(c for p in phrasings for c in (f"{p}: forget ↓", f"{p}: unseen, {last}")),
              "fluency: forget ↓", "fluency: neighbour ↓", "best attack", "capability"]
    body = []
    for r in rows:
        done = r["capability"] != PENDING
        cells = [r["run"], f"{r['grid']} ({r['attacks']} attacks, seeds {r['seeds']})" if done else PENDING,
                 fmt_acc(r, "forget_unseen", "base_forget_unseen"),
                 *(fmt_acc(r, f"kept_{t}", f"kept_{t}_base") for t in tasks),
                 number(r.get("perplexity_ratio")) if done else PENDING,
                 *(fmt_acc(r, f"unseen_{n}", f"base_unseen_{n}") for n in steps),
                 *(fmt_share(r, f"recovery_share_{n}") for n in steps),
                 *(fmt_worst(r, n) for n in (steps if worst else [])),
                 *([fmt_acc(r, "selected_unseen") + (f" (bias {number(100 * r['selection_bias'], 1)})"
                                                     if _number(r.get("selection_bias")) is not None else "")]
                   if selected else []),
                 *(fmt_acc(r, f"paper_{p}_unseen_{n}") for p in papers for n in steps),
                 *(fmt_share(r, f"paper_{p}_recovery_share_{r.get('headline_steps')}") for p in papers),
                 fmt_acc(r, "attacked"), fmt_acc(r, "floor"),
                 *([fmt_acc(r, "fictional_forget_unseen")] if fiction else []),
                 fmt_acc(r, "benign_unseen"),
                 *([fmt_acc(r, "guessable_after_best_attack", "guessable_base")] if guessable else []),
                 *(fmt_acc(r, f"phrasing_{p}_{key}", f"phrasing_{p}_base" if key == "forget" else None)
                   for p in phrasings for key in ("forget", "envelope")),
                 *((fmt_fluency(r, key) if done else PENDING) for key in FLUENCY_GROUPS.values()),
                 r.get("best_attack", PENDING), _capability_cell(r)]
        body.append(cells)
    return markdown_table(header, body, "ll" + "r" * (len(header) - 4))


def grid_lines(runs: Sequence[tuple[str, Mapping | None]]) -> list[str]:
    """One line per finished run naming the grid that produced its numbers: every attack, the step
    counts, the seeds and the split."""
    lines = []
    for label, result in runs:
        if result is None:
            continue
        settings = ", ".join(_setting(s) for s in result.get("settings") or []) or "settings not recorded"
        split = result.get("split") or {}
        facts = f"; {split[ATTACKED]} attacked / {split[UNSEEN]} unseen facts" \
            if ATTACKED in split and UNSEEN in split else ""
        objective = f"objective `{result['objective']}`, " if result.get("objective") else ""
        lines.append(f"- `{label}`: {objective}grid `{result['grid']}` ({settings}), evaluated after "
                     f"{', '.join(map(str, result['steps']))} steps, seeds {','.join(map(str, result['seeds']))}"
                     f"{facts}; forget task `{result.get('forget_task', '?')}`.")
    return lines
