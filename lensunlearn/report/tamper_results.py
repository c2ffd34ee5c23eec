"""Reading tamper attack results: which tasks measure forgetting, recovery, and the results of a folder.

`tamper` writes these results, `plots` draws them and `report` tabulates them; all three read
them through this module. One attack's `results.json`:

    {"config": {...}, "chance": 0.25, "original": {task: {"acc", "acc_norm"}},
     "records": [{"step": 0, "train_loss": null, "tasks": {task: {"acc", "acc_norm", "n"}}}, ...],
     "recovery": {task: last acc - first acc}}

With a held-out split each fact task appears twice, as `<task>:attacked` and `<task>:heldout`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.paths import RESULTS_FILE, SWEEP_FILE, sweep_results

ATTACKED, HELDOUT = "attacked", "heldout"


def task_display(name: str) -> str:
    """A task's name in results: the file stem for a local jsonl (as `evaluate` names it), the source and its
    part for a part of a split by fact (`notes.jsonl@kept` is notes@kept), else the name."""
    if ("@" in name or "?" in name) and not Path(name).is_file():
        from ..data.splits import parse_source

        try:
            return parse_source(name).task_name()
        except ValueError:  # not a source name (a tamper half, `<task>:attacked`)
            pass
    return Path(name).stem if name.endswith(".jsonl") else name


def half(task: str) -> str | None:
    """`attacked` or `heldout` for a task name of a held-out split's half, else None."""
    suffix = task.rsplit(":", 1)[-1]
    return suffix if suffix in (ATTACKED, HELDOUT) else None


def recovery(records: list[dict], metric: str = "acc") -> dict[str, float]:
    """Accuracy regained per task: the last evaluation's minus the first's."""
    if not records:
        return {}
    first, last = records[0]["tasks"], records[-1]["tasks"]
    return {t: last[t][metric] - first[t][metric] for t in first
            if t in last and first[t].get(metric) is not None and last[t].get(metric) is not None}


def forget_names(results: dict) -> list[str]:
    """Task names in `results` that measure forgetting (the forget task, or its two halves)."""
    base = task_display(results["config"]["forget_task"])
    names = list(results["records"][0]["tasks"]) if results["records"] else []
    return [n for n in names if n == base or n in (f"{base}:{ATTACKED}", f"{base}:{HELDOUT}")]


def split_tasks(results: dict) -> tuple[list[str], list[str]]:
    """(forget tasks, retain tasks) of one attack's results."""
    forget = forget_names(results)
    names = list(results["records"][0]["tasks"]) if results["records"] else []
    return forget, [n for n in names if n not in forget]


def series(results: dict, task: str, metric: str) -> list[tuple[int, float]]:
    """(step, accuracy) of every evaluation of `task` that measured `metric`."""
    points = [(r["step"], r["tasks"][task].get(metric)) for r in results["records"] if task in r["tasks"]]
    return [(s, v) for s, v in points if v is not None]


def load_tamper(path: str | Path) -> list[tuple[str, dict]]:
    """(label, results) of every attack in a tamper output folder (one, or each of a sweep)."""
    path = Path(path)
    if (path / SWEEP_FILE).is_file():
        sweep = json.loads((path / SWEEP_FILE).read_text())
        return [(f"{path.name}/{r['label']}", json.loads((path / r["dir"] / RESULTS_FILE).read_text()))
                for r in sweep["runs"] if (path / r["dir"] / RESULTS_FILE).is_file()]
    if (path / RESULTS_FILE).is_file():
        return [(path.name, json.loads((path / RESULTS_FILE).read_text()))]
    found = sweep_results(path)  # a sweep killed before it wrote its summary
    if found:
        return [(f"{path.name}/{p.parent.name}", json.loads(p.read_text())) for p in found]
    raise FileNotFoundError(f"{path} holds no {RESULTS_FILE} or {SWEEP_FILE}: pass a folder written by "
                            f"`lensunlearn tamper`")
