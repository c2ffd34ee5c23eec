"""Reading unlearning and distillation runs for the report: one table row per run, from its files.

A run folder (`unlearn` or `distill`; names in `core.paths`) holds `run_config.json` (the settings
and the plan), `metrics.jsonl` (one line per optimiser step, and evaluations during training as
`eval/<task>/<metric>` keys), `summary.json` once finished, `eval.json` and `base_eval.json`.

The row says what happened, not what was planned: the steps the run took (a run can stop before its
plan, at the robust step's general-text loss budget or at distill's `--target_share`), the epochs
those steps make, and an accuracy for every task the runs evaluated. A number an unfinished run has
not written yet is `pending`; one a finished run never measured, or that does not apply to its kind
(a distillation has no forget loss), is `-`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import InputError, read_json
from ..core.paths import (
    BASE_EVAL_FILE,
    EVAL_FILE,
    EVAL_KEY_PREFIX,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    read_marker,
)
from .tables import MISSING, PENDING, is_number, learning_rate, markdown_table, percent, plain

RUN_COLUMNS = ("examples", "epochs", "steps", "retain_coef", "forget_coef", "lr", "batch", "retain_loss",
               "forget_loss")


def _read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    import json

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        rows = [json.loads(line) for line in lines]
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: a line is not JSON ({err.msg}): the run's metrics log is damaged") from err
    return [r for r in rows if isinstance(r, dict)]


@dataclass
class Run:
    """One unlearning or distillation run folder, as read from its files."""

    name: str
    kind: str  # "unlearn" or "distill"
    config: dict
    summary: dict | None  # None until the run has finished
    metrics: list[dict]
    eval: dict | None
    base_eval: dict | None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def last(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    @property
    def evals(self) -> list[dict]:
        """The metrics lines that hold evaluations during training (`unlearn --eval_every`)."""
        return [m for m in self.metrics if any(k.startswith(EVAL_KEY_PREFIX) for k in m)]


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config = _read(path / RUN_CONFIG_FILE)
    if not isinstance(config, dict):
        raise InputError(f"{path} has no {RUN_CONFIG_FILE}: pass a folder written by `lensunlearn unlearn` or "
                         f"`lensunlearn distill`")
    summary = _read(path / SUMMARY_FILE)
    kind = "distill" if read_marker(path) == "distill" or "teacher" in config else "unlearn"
    return Run(path.name, kind, config, summary if isinstance(summary, dict) else None, _metrics(path / METRICS_FILE),
               _read(path / EVAL_FILE), _read(path / BASE_EVAL_FILE))


def steps_taken(run: Run) -> int | None:
    """The optimiser steps the run took: where the robust step stopped it, else the last step its metrics
    log reached, else (a log-less summary) the steps it planned."""
    stopped = (run.summary or {}).get("stopped_early_at_step")
    if is_number(stopped):
        return int(stopped)
    steps = [m["step"] for m in run.metrics if is_number(m.get("step"))]
    if steps:
        return int(max(steps))
    return (run.summary or {}).get("steps") if run.finished else 0


def steps_planned(run: Run) -> int | None:
    summary = run.summary or {}
    return summary.get("steps_planned", summary.get("steps", run.config.get("steps")))


Curve = tuple[list[int], list[float]]  # steps and accuracies


def training_curves(run: Run, metric: str) -> dict[str, Curve]:
    """Accuracy against step for each task the run evaluated during training, from its
    `eval/<task>/<metric>` keys (a task name may itself hold a slash: the metric is the last part)."""
    curves: dict[str, Curve] = {}
    for line in run.evals:
        for key, value in line.items():
            task, _, name = key.removeprefix(EVAL_KEY_PREFIX).rpartition("/")
            if key.startswith(EVAL_KEY_PREFIX) and task and name == metric:
                steps, values = curves.setdefault(task, ([], []))
                steps.append(line["step"])
                values.append(value)
    return curves


def task_names(result: dict) -> list[str]:
    """Top-level tasks of an eval result, in order, with group members replaced by their group."""
    member_of = {m: g for g, info in result.get("groups", {}).items() for m in info.get("tasks", [])}
    names: list[str] = []
    for name in result.get("results", {}):
        name = member_of.get(name, name)
        if name not in names:
            names.append(name)
    return names + [g for g in result.get("groups", {}) if g not in names]


def score(result: dict | None, task: str, metric: str) -> float | None:
    if result is None:
        return None
    found = result.get("groups", {}).get(task) or result.get("results", {}).get(task)
    return None if found is None else found.get(metric)


def trained_params(cfg: dict) -> str:
    """"full" or "LoRA r16" from a run's or an attack's config; configs written before the flags were
    unified say `lora` / `rank` instead of `full` / `lora_rank`."""
    full = cfg["full"] if "full" in cfg else not cfg.get("lora", False)
    return "full" if full else f"LoRA r{cfg.get('lora_rank', cfg.get('rank', '?'))}"


def _notes(run: Run, taken: int | None, planned: int | None) -> str:
    cfg, summary = run.config, run.summary or {}
    if run.kind == "distill":
        what = f"distilled (alpha {cfg.get('alpha', '?')}, beta {cfg.get('beta', '?')})"
        if is_number(summary.get("recovered")):
            what += f", {100 * summary['recovered']:.0f}% of the held-out gap recovered"
        if summary.get("stop_reason") in ("target_share", "stop_within"):
            what += f", stopped at --{summary['stop_reason']}"
    else:
        what = f"{cfg.get('optimizer', '?')}, {trained_params(cfg)}"
        if is_number(summary.get("stopped_early_at_step")):
            what += ", stopped early: general-text loss past its budget"
        elif summary.get("over_budget_at_end"):
            what += ", ended with general-text loss past its budget"
    if not run.finished:
        what += f", unfinished (step {taken} of {planned})" if taken is not None and planned else ", unfinished"
    return f"{what}; {run.name}"


def run_row(run: Run, forget_task: str, kept_tasks: Sequence[str], metric: str) -> dict[str, Any]:
    """The table row of a run: numbers straight from its files, None where the run has not written them
    (or, for a finished run, never will). `epochs` counts the steps taken."""
    cfg, summary = run.config, run.summary or {}
    taken, planned = steps_taken(run), steps_planned(run)
    epochs = summary.get("epochs", cfg.get("effective_epochs", cfg.get("epochs")))
    if is_number(epochs) and taken is not None and planned:
        epochs = epochs * taken / planned
    kept = {task: score(run.eval, task, metric) for task in kept_tasks}
    return {
        "run": run.name, "kind": run.kind, "finished": run.finished,
        "examples": summary.get("examples", cfg.get("examples")) if run.kind == "unlearn" else None,
        "epochs": epochs if run.kind == "unlearn" else None,
        "steps": taken, "steps_planned": planned,
        "retain_coef": cfg.get("retain_coef"),
        "forget_coef": cfg.get("forget_coef", cfg.get("remove_coef")),  # the flag's earlier name
        "lr": cfg.get("lr"),
        "batch": cfg.get("batch"),
        "retain_loss": summary.get("final_retain_loss", run.last.get("retain_loss")),
        "forget_loss": summary.get("final_forget_loss", run.last.get("forget_loss")),
        "forget_acc": score(run.eval, forget_task, metric),
        "kept_acc": kept,
        "retain_acc": kept[kept_tasks[0]] if kept_tasks else None,
        "notes": _notes(run, taken, planned),
    }


def baseline_row(baseline: dict, forget_task: str, kept_tasks: Sequence[str], metric: str) -> dict[str, Any]:
    kept = {task: score(baseline, task, metric) for task in kept_tasks}
    return {"run": "baseline", "kind": "baseline", "finished": True, **{c: None for c in RUN_COLUMNS},
            "steps_planned": None, "forget_acc": score(baseline, forget_task, metric), "kept_acc": kept,
            "retain_acc": kept[kept_tasks[0]] if kept_tasks else None,
            "notes": f"baseline: original model {baseline.get('model', '')}".strip()}


def _cell(row: dict, column: str) -> str:
    value = row[column]
    missing = MISSING if row["finished"] else PENDING
    if value is None:
        return missing
    if column == "lr":
        return learning_rate(value)
    if column == "epochs":
        return f"{value:.3g}"
    if column == "steps" and row["steps_planned"] and value != row["steps_planned"]:
        return f"{value} of {row['steps_planned']}"
    return plain(value)


def runs_table(rows: list[dict], forget_task: str, kept_tasks: Sequence[str]) -> str:
    """One row per run (the baseline first): its settings, the steps it took, and its accuracy on the
    forget task and on every kept task."""
    header = [*RUN_COLUMNS, f"{forget_task} (↓)", *(f"{t} (↑)" for t in kept_tasks), "Notes"]
    body = []
    for row in rows:
        missing = MISSING if row["finished"] else PENDING
        cells = [MISSING] * len(RUN_COLUMNS) if row["run"] == "baseline" else [_cell(row, c) for c in RUN_COLUMNS]
        accuracies = [row["forget_acc"], *(row["kept_acc"].get(t) for t in kept_tasks)]
        body.append([*cells, *(percent(a, 2, unit="%", missing=missing) for a in accuracies), row["notes"]])
    return markdown_table(header, body)


def csv_fields(kept_tasks: Sequence[str]) -> list[str]:
    """report.csv's columns: the run, its settings, the steps planned, and one accuracy per task."""
    return ["run", *RUN_COLUMNS, "steps_planned", "forget_acc", *(f"kept_acc:{t}" for t in kept_tasks), "notes"]


def csv_row(row: dict) -> dict[str, Any]:
    return {**row, **{f"kept_acc:{t}": acc for t, acc in row["kept_acc"].items()}}
