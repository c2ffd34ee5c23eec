"""`report RUN_DIR...`: one table of unlearning runs, a trade-off plot, tamper curves and a robustness
table with its curves.

Everything is read from the files the other commands write (names in `layout`), so the report can
be rebuilt at any time and always gives the same bytes for the same files:

* an unlearning run directory: its config, summary, metrics and evaluation, and optionally the
  evaluation before unlearning (the baseline row) and evaluations during training (its training
  curves, `unlearn --eval_every`);
* a tamper output (one attack's results, or a sweep with one sub-folder per attack), given with
  `--tamper` or among the positional directories, where it is recognised by its files;
* a robustness output (`robustness.json`), given with `--robustness` or among the positional
  directories, where it is recognised by that file or its marker: one row per output, so runs
  attacked by the same protocol compare side by side, and their unseen-half curves in one plot.

A number a run has not written yet (an unfinished run) is written `pending`, so a table of runs
in progress has every row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..core.atomic import write_json_atomic, write_text_atomic
from ..core.config import Command, ConfigError, Options, option
from ..core.outputs import check_folder, claim_folder
from ..core.paths import (
    BASE_EVAL_FILE,
    EVAL_FILE,
    EVAL_KEY_PREFIX,
    METRICS_FILE,
    REPORT_FILE,
    REPORT_ROBUSTNESS_CSV_FILE,
    REPORT_TABLE_FILES,
    RESULTS_FILE,
    ROBUSTNESS_CURVES_FILE,
    ROBUSTNESS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    TAMPER_CURVES_FILE,
    TRADEOFF_PLOT_FILE,
    TRAINING_CURVES_FILE,
    is_robustness_output,
    is_tamper_output,
)
from ..data.tasks import NUM_CHOICES
from .robustness_results import (
    KEPT_SHARE_LIMIT,
    PPL_RATIO_LIMIT,
    grid_lines,
    load_robustness,
    robustness_row,
    robustness_table,
)
from .tables import MISSING, PENDING, csv_table, learning_rate, markdown_table, percent, plain, points
from .tamper_results import forget_names, load_tamper, series, task_display

log = logging.getLogger(__name__)

RUN_COLUMNS = ("examples", "epochs", "steps", "retain_coef", "forget_coef", "lr", "batch", "retain_loss",
               "forget_loss")


@dataclass
class ReportConfig(Options):
    runs: tuple[str, ...] = option((), "unlearning run folders (tamper and robustness outputs are recognised too)",
                                   positional=True, nargs="*", positional_metavar="RUN_DIR", group="data")
    tamper: tuple[str, ...] = option((), f"comma-separated tamper output folders ({RESULTS_FILE} or {SWEEP_FILE})",
                                     group="data", default_text="those among the positional folders")
    robustness: tuple[str, ...] = option((), f"comma-separated robustness output folders ({ROBUSTNESS_FILE}), one "
                                             f"table row and one set of curves each", group="data",
                                         default_text="those among the positional folders")
    baseline: str | None = option(None, "eval JSON of the original model", group="data", metavar="FILE",
                                  default_text=f"the first run's {BASE_EVAL_FILE}")
    forget_task: str | None = option(None, "forget task column", group="evaluation",
                                     default_text=f"the first task of the runs' {EVAL_FILE}")
    retain_task: str | None = option(None, "retain task column", group="evaluation",
                                     default_text=f"the second task of the runs' {EVAL_FILE}")
    metric: Literal["acc", "acc_norm"] = option("acc", "accuracy reported", group="evaluation")
    out: str = option(str(Path("runs") / "report"), f"the output folder, for {REPORT_FILE} and the plots",
                      metavar="DIR")
    table_format: Literal["md", "csv", "json"] = option("md", "also write the table as "
                                                        + " or ".join(REPORT_TABLE_FILES.values()),
                                                        old_names=("format",))

    def __post_init__(self) -> None:
        self.runs = _flatten(self.runs)
        self.tamper = _flatten(self.tamper)
        self.robustness = _flatten(self.robustness)
        if not self.runs and not self.tamper and not self.robustness:
            raise ConfigError("give at least one run directory: lensunlearn report RUN_DIR [RUN_DIR ...]")
        super().__post_init__()


def _flatten(values: Any) -> tuple[str, ...]:
    """argparse hands a positional list of comma-split tuples; accept that, a string or a flat sequence."""
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        out.extend([value] if isinstance(value, str) else value)
    return tuple(v for v in out if v)


# ------------------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metrics(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [json.loads(line) for line in lines]


@dataclass
class Run:
    """One unlearning run directory, as read from its files."""

    name: str
    config: dict
    summary: dict
    last: dict
    eval: dict | None
    base_eval: dict | None
    evals: list[dict]  # the metrics lines that hold evaluations during training (`unlearn --eval_every`)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config = _read_json(path / RUN_CONFIG_FILE)
    if config is None:
        raise FileNotFoundError(f"{path} has no {RUN_CONFIG_FILE}: pass a directory written by `lensunlearn unlearn`")
    metrics = _metrics(path / METRICS_FILE)
    evals = [m for m in metrics if any(k.startswith(EVAL_KEY_PREFIX) for k in m)]
    return Run(path.name, config, _read_json(path / SUMMARY_FILE) or {}, metrics[-1] if metrics else {},
               _read_json(path / EVAL_FILE), _read_json(path / BASE_EVAL_FILE), evals)


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


def curves_section(curves: list[tuple[str, dict[str, Curve]]], forget_task: str) -> list[str]:
    """The report's paragraph for the training-curves figure, naming what its panels show."""
    names = ", ".join(label for label, _ in curves)
    return ["## Training curves", "",
            f"Accuracy during unlearning (`unlearn --eval_every`, on `--eval_limit` questions per task) for "
            f"{names}: {forget_task} on the left (where forgetting happens), every other evaluated task on the "
            f"right (where collateral damage starts), one colour per run; step 0 is the model before unlearning.",
            "",
            f"![training curves]({TRAINING_CURVES_FILE})", ""]


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


# ------------------------------------------------------------------------------------------- tables


def trained_params(cfg: dict) -> str:
    """"full" or "LoRA r16" from a run's or an attack's config; configs written before the flags were
    unified say `lora` / `rank` instead of `full` / `lora_rank`."""
    full = cfg["full"] if "full" in cfg else not cfg.get("lora", False)
    return "full" if full else f"LoRA r{cfg.get('lora_rank', cfg.get('rank', '?'))}"


def _notes(run: Run) -> str:
    return f"{run.config.get('optimizer', '?')}, {trained_params(run.config)}; {run.name}"


def run_row(run: Run, forget_task: str, retain_task: str, metric: str) -> dict[str, Any]:
    """The table row of a run: numbers straight from its files, None where the run has not written them."""
    cfg, summary = run.config, run.summary
    return {
        "run": run.name,
        "examples": summary.get("examples", cfg.get("examples")),
        "epochs": summary.get("epochs", cfg.get("epochs")),
        "steps": summary.get("steps", cfg.get("steps")),
        "retain_coef": cfg.get("retain_coef"),
        "forget_coef": cfg.get("forget_coef", cfg.get("remove_coef")),  # a run from before the rename
        "lr": cfg.get("lr"),
        "batch": cfg.get("batch"),
        "retain_loss": summary.get("final_retain_loss", run.last.get("retain_loss")),
        "forget_loss": summary.get("final_forget_loss", run.last.get("forget_loss")),
        "forget_acc": score(run.eval, forget_task, metric),
        "retain_acc": score(run.eval, retain_task, metric),
        "notes": _notes(run),
    }


def baseline_row(baseline: dict, forget_task: str, retain_task: str, metric: str) -> dict[str, Any]:
    row: dict[str, Any] = {"run": "baseline", **{c: None for c in RUN_COLUMNS}}
    row.update(forget_acc=score(baseline, forget_task, metric), retain_acc=score(baseline, retain_task, metric),
               notes=f"baseline: original model {baseline.get('model', '')}".strip())
    return row


def _acc(value: float | None) -> str:
    return percent(value, 2, unit="%", missing=PENDING)


def runs_table(rows: list[dict], forget_task: str, retain_task: str) -> str:
    header = [*RUN_COLUMNS, f"{forget_task} (↓)", f"{retain_task} (↑)", "Notes"]
    body = []
    for row in rows:
        if row["run"] == "baseline":
            cells = [MISSING] * len(RUN_COLUMNS)
        else:
            cells = [learning_rate(row[c]) if c == "lr" else f"{row[c]:g}" if c == "epochs" and row[c] is not None
                     else plain(row[c]) for c in RUN_COLUMNS]
        body.append([*cells, _acc(row["forget_acc"]), _acc(row["retain_acc"]), row["notes"]])
    return markdown_table(header, body)


def attack_status(results: dict) -> str | None:
    """None for a finished attack, else e.g. "unfinished, step 24 of 64": a killed attack's last
    numbers are not its final ones. Results written before the "finished" flag existed count as
    finished when their last evaluation is at the planned last step."""
    last = results["records"][-1]["step"] if results.get("records") else 0
    steps = results.get("config", {}).get("steps")
    finished = results.get("finished", steps is None or last == steps)
    return None if finished else f"unfinished, step {last} of {steps}"


def tamper_rows(attacks: list[tuple[str, dict]]) -> list[dict[str, Any]]:
    """One row per attack and forget task (attacked / held-out half): step 0, peak, final, recovery."""
    rows = []
    for label, results in attacks:
        cfg = results["config"]
        metric = cfg.get("metric", "acc")
        status = attack_status(results)
        label = f"{label} ({status})" if status else label
        for task in forget_names(results):
            points = series(results, task, metric)
            if not points:
                continue
            peak = max(points, key=lambda s: s[1])
            # steps and their batch say how long the attack was even when --steps cycled the chunks
            length = f"{cfg['steps']} steps of {cfg['batch']}" if cfg.get("steps") and cfg.get("batch") \
                else f"{cfg.get('epochs'):g} epoch"
            rows.append({"attack": label, "model": Path(str(cfg.get("run") or cfg.get("model"))).name, "task": task,
                         "config": f"{cfg.get('chunks')} chunks, lr={learning_rate(cfg.get('lr'))}, {length}, "
                                   f"{cfg.get('schedule')}, {trained_params(cfg)}, "
                                   f"{cfg.get('optimizer')}",
                         "step0": points[0][1], "peak": peak[1], "peak_step": peak[0], "final": points[-1][1],
                         "final_step": points[-1][0], "recovery": points[-1][1] - points[0][1]})
    return rows


def tamper_table(rows: list[dict]) -> str:
    header = ["Attack", "Model", "Task", "Attack config", "Step 0", "Peak (step)", "Final (step)", "Recovery"]
    return markdown_table(header, [[r["attack"], r["model"], r["task"], r["config"], _acc(r["step0"]),
                                    f"{_acc(r['peak'])} ({r['peak_step']})", f"{_acc(r['final'])} ({r['final_step']})",
                                    points(r["recovery"])] for r in rows])


# ---------------------------------------------------------------------------------------- the command


def _resolve_tasks(cfg: ReportConfig, runs: list[Run], baseline: dict | None) -> tuple[str, str]:
    names: list[str] = []
    for run in runs:  # the order the run asked for, then whatever its evaluations hold
        asked = run.config.get("eval_tasks") or ""
        asked = asked.split(",") if isinstance(asked, str) else list(asked)
        names.extend(n for n in (task_display(a) for a in asked if a) if n not in names)
        for source in (run.eval, run.base_eval):
            names.extend(n for n in task_names(source or {}) if n not in names)
    names.extend(n for n in task_names(baseline or {}) if n not in names)
    forget = cfg.forget_task or (names[0] if names else None)
    retain = cfg.retain_task or next((n for n in names if n != forget), None)
    if forget is None or retain is None:
        raise ValueError(f"cannot tell the forget and retain tasks (no {EVAL_FILE} with two tasks): pass --forget_task "
                         "and --retain_task")
    return forget, retain


def robustness_section(runs: list[tuple[str, dict | None]]) -> list[str]:
    """The robustness table with what its columns mean and which grid produced each row."""
    return ["## Robustness to relearning attacks", "",
            "Accuracy in percent on the forget task's unseen half (the facts no attack trains on), mean ± sd "
            "over seeds where there were several; (base ...) is the base model before unlearning, attacked the "
            "same way. forget: the unlearned model before any attack; unseen, N steps: the best of the grid's "
            "attacks after N steps (the envelope); attacked half: the best attack's accuracy on the half it "
            "trained on; floor: fictional facts the model never knew (what format and prior alone recover); "
            "benign: an attack on text unrelated to the forget domain; <phrasing>: forget and <phrasing>: "
            "unseen: the same two numbers with the questions asked another way (`robustness --phrasings`; qa: "
            "'Q: <question> A:'), after the attacks' last step. Kept tasks: the unlearned model's "
            "accuracy. Perplexity ratio: unlearned over base on held-out generic text. A run whose ratio "
            f"exceeds {PPL_RATIO_LIMIT:.2f} or whose kept accuracy falls below {100 * KEPT_SHARE_LIMIT:.0f}% of "
            "the base model's **fails** capability: it resists by wrecking general ability.", "",
            robustness_table(runs), "",
            *grid_lines(runs), ""]


def _inputs(cfg: ReportConfig) -> tuple[list[Path], list[str], list[str]]:
    """(run directories, tamper outputs, robustness outputs): the flags' folders and the positional ones
    sorted by what their files say they are."""
    positional = [Path(p) for p in cfg.runs]
    robust = [p for p in positional if is_robustness_output(p)]
    tamper = [p for p in positional if p not in robust and is_tamper_output(p)]
    runs = [p for p in positional if p not in robust and p not in tamper]
    return runs, [*cfg.tamper, *map(str, tamper)], [*cfg.robustness, *map(str, robust)]


def build_report(cfg: ReportConfig) -> dict[str, Any]:
    """Rows, markdown and tamper rows, computed from the files alone (no plotting, no writing)."""
    run_dirs, tamper_dirs, robustness_dirs = _inputs(cfg)
    robustness = [load_robustness(d) for d in robustness_dirs]
    runs = [load_run(p) for p in run_dirs]
    baseline = _read_json(Path(cfg.baseline)) if cfg.baseline else next((r.base_eval for r in runs if r.base_eval),
                                                                       None)
    if cfg.baseline and baseline is None:
        raise FileNotFoundError(f"--baseline {cfg.baseline} does not exist: pass an eval JSON of the original model")
    attacks = [a for d in tamper_dirs for a in load_tamper(d)]
    sections = ["# lensunlearn report", ""]
    rows: list[dict] = []
    forget = retain = None
    if runs or baseline:
        forget, retain = _resolve_tasks(cfg, runs, baseline)
        rows = ([baseline_row(baseline, forget, retain, cfg.metric)] if baseline else []) + \
               [run_row(r, forget, retain, cfg.metric) for r in runs]
        sections += ["## Unlearning runs", "", f"Accuracy: `{cfg.metric}`; chance {100 / NUM_CHOICES:.0f}%.", "",
                     runs_table(rows, forget, retain), ""]
    curves: list[tuple[str, dict[str, Curve]]] = [(r.name, c) for r in runs if (c := training_curves(r, cfg.metric))]
    if curves:
        sections += curves_section(curves, forget)
    t_rows = tamper_rows(attacks)
    if t_rows:
        sections += ["## Tampering resistance (fine-tune attack)", "", tamper_table(t_rows), ""]
    if robustness:
        sections += robustness_section(robustness)
    return {"forget_task": forget, "retain_task": retain, "metric": cfg.metric, "rows": rows, "curves": curves,
            "tamper": t_rows, "attacks": attacks,
            "robustness": [robustness_row(label, result) for label, result in robustness],
            "robustness_results": robustness, "markdown": "\n".join(sections)}


def _tables(report: dict, table_format: str, out: Path) -> list[Path]:
    """report.csv (and report_robustness.csv: other columns) or report.json, as --table_format asks."""
    if table_format == "csv":
        written = [write_text_atomic(out / REPORT_TABLE_FILES["csv"], csv_table(
            report["rows"], ["run", *RUN_COLUMNS, "forget_acc", "retain_acc", "notes"]))]
        if report["robustness"]:  # columns in order of first appearance: runs may differ in steps and tasks
            fields = list(dict.fromkeys(k for row in report["robustness"] for k in row))
            written.append(write_text_atomic(out / REPORT_ROBUSTNESS_CSV_FILE, csv_table(report["robustness"],
                                                                                        fields)))
        return written
    if table_format == "json":
        table = {k: report[k] for k in ("forget_task", "retain_task", "metric", "rows", "tamper", "robustness")}
        return [write_json_atomic(out / REPORT_TABLE_FILES["json"], table)]
    return []


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write report.md, the trade-off scatter, the training, tamper and robustness curves (and report.csv /
    report.json)."""
    from . import plots

    check_folder(cfg.out, "report", also=("demo",))  # a demo's folder holds its report
    report = build_report(cfg)
    out = claim_folder(cfg.out, "report", also=("demo",))
    written = [write_text_atomic(out / REPORT_FILE, report["markdown"])]
    if report["rows"]:
        points = [(r["run"], r["forget_acc"], r["retain_acc"]) for r in report["rows"]
                  if r["run"] != "baseline" and r["forget_acc"] is not None and r["retain_acc"] is not None]
        base = next((r for r in report["rows"] if r["run"] == "baseline"), None)
        base_point = (base["forget_acc"], base["retain_acc"]) if base and None not in (
            base["forget_acc"], base["retain_acc"]) else None
        written.append(plots.plot_tradeoff(points, out / TRADEOFF_PLOT_FILE, base_point, 1 / NUM_CHOICES,
                                           report["forget_task"], report["retain_task"]))
    if report["curves"]:
        written.append(plots.plot_training_curves(report["curves"], report["forget_task"], out / TRAINING_CURVES_FILE,
                                                  cfg.metric))
    if report["attacks"]:
        written.append(plots.plot_tamper_comparison(report["attacks"], out / TAMPER_CURVES_FILE, cfg.metric))
    finished = [(label, result) for label, result in report["robustness_results"] if result is not None]
    if finished:
        written.append(plots.plot_robustness_comparison(finished, out / ROBUSTNESS_CURVES_FILE))
    written += _tables(report, cfg.table_format, out)
    print(report["markdown"])
    log.info("wrote %s", ", ".join(str(p) for p in written))
    report["files"] = [str(p) for p in written]
    return report


COMMANDS = [
    Command(("report",), "one table of unlearning runs (baseline first), a trade-off plot, tamper curves and a "
                         "robustness table with its curves", ReportConfig, "lensunlearn.report.command:run_report"),
]
