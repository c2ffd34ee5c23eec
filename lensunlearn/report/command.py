"""`report RUN_DIR...`: one table of unlearning runs, a trade-off plot, tamper curves and a robustness
table with its curves, every figure linked from report.md.

Everything is read from the files the other commands write (names in `core.paths`), so the report can
be rebuilt at any time and always gives the same bytes for the same files:

* an unlearning or distillation run folder (`run_results`): its settings, the steps it took, its
  losses and its accuracy on the forget task and on every kept task, and optionally the evaluation
  before unlearning (the baseline row) and evaluations during training (its training curves,
  `unlearn --eval_every`);
* a tamper output (one attack's results, or a sweep with one sub-folder per attack), given with
  `--tamper` or among the positional folders, where it is recognised by its files;
* a robustness output (`robustness.json`), given with `--robustness` or among the positional
  folders, where it is recognised by that file or its marker: one row per output, so runs
  attacked by the same protocol compare side by side, and their unseen-half curves in one plot;
* a folder holding any of these (a folder of runs, a demo's or a search's folder): every output in it
  is reported, and what it holds besides is named; a folder that holds none is refused.

A number a run has not written yet (an unfinished run) is written `pending`, so a table of runs
in progress has every row; a number a finished run does not have is `-`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.atomic import write_json_atomic, write_text_atomic
from ..core.config import Command, ConfigError, Options, option
from ..core.errors import InputError, read_json
from ..core.outputs import NOUNS, check_folder, claim_folder, output_kind
from ..core.paths import (
    BASE_EVAL_FILE,
    EVAL_FILE,
    REPORT_FILE,
    REPORT_ROBUSTNESS_CSV_FILE,
    REPORT_TABLE_FILES,
    RESULTS_FILE,
    ROBUSTNESS_CURVES_FILE,
    ROBUSTNESS_FILE,
    SWEEP_FILE,
    TAMPER_CURVES_FILE,
    TRADEOFF_PLOT_FILE,
    TRAINING_CURVES_FILE,
    is_robustness_output,
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
from .run_results import (
    Curve,
    Run,
    baseline_row,
    csv_fields,
    csv_row,
    load_run,
    run_row,
    runs_table,
    task_names,
    trained_params,
    training_curves,
)
from .tables import PENDING, csv_table, learning_rate, markdown_table, percent, points
from .tamper_results import load_tamper, series, split_tasks, task_display

log = logging.getLogger(__name__)


@dataclass
class ReportConfig(Options):
    runs: tuple[str, ...] = option((), "unlearning and distillation run folders, tamper and robustness outputs "
                                       "(each recognised by its files), or folders holding them",
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
    retain_task: str | None = option(None, "the one kept-task column", group="evaluation",
                                     default_text=f"a column for every other task of the runs' {EVAL_FILE}")
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


# ------------------------------------------------------------------------------------------ inputs

# what the report tabulates, by the kind of output a folder is (`core.outputs.output_kind`)
REPORTED = {"unlearn": "runs", "distill": "runs", "tamper": "tamper", "robustness": "robustness"}
# folders whose outputs are reported one by one: a plain folder of runs, a demo's, a search's
CONTAINERS = (None, "demo", "search")
NOUNS_PLURAL = {"runs": "unlearning or distillation run", "tamper": "tamper output",
                "robustness": "robustness output"}
MAX_DEPTH = 2  # a folder of runs, and folders in it (a search's runs/); a run's own sub-folders are never read


@dataclass
class Inputs:
    """The outputs to report, by kind, and what the positional folders held besides (named in a warning)."""

    runs: list[Path] = field(default_factory=list)
    tamper: list[Path] = field(default_factory=list)
    robustness: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _kind(path: Path) -> str | None:
    return "robustness" if is_robustness_output(path) else output_kind(path)


def _noun(kind: str | None) -> str:
    noun = NOUNS.get(kind, kind) if kind else None
    return ("an " if noun[0] in "aeiou" else "a ") + noun if noun else "no output of lensunlearn"


def _gather(path: Path, top: Path, found: Inputs, depth: int = 0) -> int:
    """Add the outputs in `path` (itself, or those inside a container folder) to `found`; their count.
    What is neither is named in `found.skipped`, relative to `top`, the folder the user gave."""
    kind = _kind(path)
    if kind in REPORTED:
        getattr(found, REPORTED[kind]).append(path)
        return 1
    if kind in CONTAINERS and depth < MAX_DEPTH:
        children = sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith("."))
        count = sum(_gather(child, top, found, depth + 1) for child in children)
        if kind is None and depth > 0 and count == 0:
            found.skipped.append(f"{path.relative_to(top)} ({_noun(None)})")
        return count
    found.skipped.append(f"{path.relative_to(top) if path != top else path} ({_noun(kind)})")
    return 0


def gather_inputs(cfg: ReportConfig) -> Inputs:
    """The flags' folders, and the positional ones sorted by what their files say they are; a positional
    folder that is no output is searched for outputs, and refused when it holds none."""
    found = Inputs(tamper=[Path(p) for p in cfg.tamper], robustness=[Path(p) for p in cfg.robustness])
    for name in cfg.runs:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise InputError(f"{path} {'is not a folder' if path.exists() else 'does not exist'}: pass run folders "
                             f"written by `lensunlearn unlearn`, `distill`, `tamper` or `robustness`")
        before = len(found.skipped)
        if _gather(path, path, found) == 0:
            held = "; ".join(found.skipped[before:]) or "nothing"
            raise InputError(f"{path} is no unlearning, distillation, tamper or robustness output and holds none "
                             f"(found: {held}): pass folders those commands wrote (a run folder holds "
                             f"run_config.json)")
    if found.skipped:
        log.warning("report: left out, being no run, tamper or robustness output: %s", "; ".join(found.skipped))
    counts = {kind: len(getattr(found, kind)) for kind in NOUNS_PLURAL}
    log.info("report: %s", ", ".join(f"{n} {NOUNS_PLURAL[k]}{'s' if n != 1 else ''}" for k, n in counts.items() if n))
    return found


def _read_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def curves_section(curves: list[tuple[str, dict[str, Curve]]], forget_task: str) -> list[str]:
    """The report's paragraph for the training-curves figure, naming what its panels show."""
    names = ", ".join(label for label, _ in curves)
    return ["## Training curves", "",
            f"Accuracy during unlearning (`unlearn --eval_every`, on `--eval_limit` questions per task) for "
            f"{names}: {forget_task} on the left (where forgetting happens), every other evaluated task on the "
            f"right (where collateral damage starts), one colour per run; step 0 is the model before unlearning.",
            "",
            f"![training curves]({TRAINING_CURVES_FILE})", ""]


# ------------------------------------------------------------------------------------------- tables


def _acc(value: float | None) -> str:
    return percent(value, 2, unit="%", missing=PENDING)


def attack_status(results: dict) -> str | None:
    """None for a finished attack, else e.g. "unfinished, step 24 of 64": a killed attack's last
    numbers are not its final ones. Results written before the "finished" flag existed count as
    finished when their last evaluation is at the planned last step."""
    last = results["records"][-1]["step"] if results.get("records") else 0
    steps = results.get("config", {}).get("steps")
    finished = results.get("finished", steps is None or last == steps)
    return None if finished else f"unfinished, step {last} of {steps}"


def tamper_rows(attacks: list[tuple[str, dict]]) -> list[dict[str, Any]]:
    """One row per attack and evaluated task (the forget task or its attacked and held-out halves, then
    every kept task): step 0, peak, final, and the change from step 0 (recovery, for the forget task)."""
    rows = []
    for label, results in attacks:
        cfg = results["config"]
        metric = cfg.get("metric", "acc")
        status = attack_status(results)
        label = f"{label} ({status})" if status else label
        forget, kept = split_tasks(results)
        for task in [*forget, *kept]:
            curve = series(results, task, metric)
            if not curve:
                continue
            peak = max(curve, key=lambda s: s[1])
            # steps and their batch say how long the attack was even when --steps cycled the chunks
            length = f"{cfg['steps']} steps of {cfg['batch']}" if cfg.get("steps") and cfg.get("batch") \
                else f"{cfg.get('epochs'):g} epoch"
            rows.append({"attack": label, "model": Path(str(cfg.get("run") or cfg.get("model"))).name, "task": task,
                         "config": f"{cfg.get('chunks')} chunks, lr={learning_rate(cfg.get('lr'))}, {length}, "
                                   f"{cfg.get('schedule')}, {trained_params(cfg)}, "
                                   f"{cfg.get('optimizer')}",
                         "step0": curve[0][1], "peak": peak[1], "peak_step": peak[0], "final": curve[-1][1],
                         "final_step": curve[-1][0], "recovery": curve[-1][1] - curve[0][1]})
    return rows


def tamper_table(rows: list[dict]) -> str:
    header = ["Attack", "Model", "Task", "Attack config", "Step 0", "Peak (step)", "Final (step)",
              "Recovery (final - step 0)"]
    return markdown_table(header, [[r["attack"], r["model"], r["task"], r["config"], _acc(r["step0"]),
                                    f"{_acc(r['peak'])} ({r['peak_step']})", f"{_acc(r['final'])} ({r['final_step']})",
                                    points(r["recovery"])] for r in rows])


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


# ---------------------------------------------------------------------------------------- the command


def _resolve_tasks(cfg: ReportConfig, runs: list[Run], baseline: dict | None) -> tuple[str, list[str]]:
    """The forget task and the kept tasks: every task the runs asked for or their evaluations hold, in
    that order (`--forget_task` and `--retain_task` pick them instead)."""
    names: list[str] = []
    for run in runs:  # the order the run asked for, then whatever its evaluations hold
        asked = run.config.get("eval_tasks") or ""
        asked = asked.split(",") if isinstance(asked, str) else list(asked)
        names.extend(n for n in (task_display(a) for a in asked if a) if n not in names)
        for source in (run.eval, run.base_eval):
            names.extend(n for n in task_names(source or {}) if n not in names)
    names.extend(n for n in task_names(baseline or {}) if n not in names)
    forget = cfg.forget_task or (names[0] if names else None)
    if forget is None:
        raise InputError(f"cannot tell the forget task (no {EVAL_FILE} names a task): pass --forget_task")
    kept = [cfg.retain_task] if cfg.retain_task else [n for n in names if n != forget]
    return forget, kept


def _figure(alt: str, file: str) -> list[str]:
    return [f"![{alt}]({file})", ""]


def build_report(cfg: ReportConfig, preface: list[str] | None = None) -> dict[str, Any]:
    """Rows, markdown and the figures to draw, computed from the files alone (no plotting, no writing).
    `preface` (markdown lines) goes after the title."""
    found = gather_inputs(cfg)
    robustness = [load_robustness(d) for d in found.robustness]
    runs = [load_run(p) for p in found.runs]
    baseline = _read_json(Path(cfg.baseline)) if cfg.baseline else next((r.base_eval for r in runs if r.base_eval),
                                                                       None)
    if cfg.baseline and baseline is None:
        raise FileNotFoundError(f"--baseline {cfg.baseline} does not exist: pass an eval JSON of the original model")
    attacks = [a for d in found.tamper for a in load_tamper(d)]
    sections = ["# lensunlearn report", "", *(preface or [])]
    rows: list[dict] = []
    forget, kept = None, []
    figures: dict[str, str] = {}
    if runs or baseline:
        forget, kept = _resolve_tasks(cfg, runs, baseline)
        rows = ([baseline_row(baseline, forget, kept, cfg.metric)] if baseline else []) + \
               [run_row(r, forget, kept, cfg.metric) for r in runs]
        sections += ["## Unlearning runs", "",
                     f"Accuracy: `{cfg.metric}`; chance {100 / NUM_CHOICES:.0f}%. Steps: those the run took (of "
                     f"those it planned, when it stopped early); epochs: passes over the forget set in those steps.",
                     "", runs_table(rows, forget, kept), ""]
        if kept:
            figures["tradeoff"] = TRADEOFF_PLOT_FILE
            sections += _figure("trade-off: forget against kept accuracy, one marker per kept task",
                                TRADEOFF_PLOT_FILE)
    curves: list[tuple[str, dict[str, Curve]]] = [(r.name, c) for r in runs if (c := training_curves(r, cfg.metric))]
    if curves:
        figures["curves"] = TRAINING_CURVES_FILE
        sections += curves_section(curves, forget)
    t_rows = tamper_rows(attacks)
    if t_rows:
        sections += ["## Tampering resistance (fine-tune attack)", "", tamper_table(t_rows), ""]
    if attacks:
        figures["tamper"] = TAMPER_CURVES_FILE
        sections += _figure("tamper attacks: forget and kept accuracy against attack step", TAMPER_CURVES_FILE)
    if robustness:
        sections += robustness_section(robustness)
        if any(result is not None for _, result in robustness):
            figures["robustness"] = ROBUSTNESS_CURVES_FILE
            sections += _figure("unseen-half accuracy under relearning attacks", ROBUSTNESS_CURVES_FILE)
    return {"forget_task": forget, "kept_tasks": kept, "retain_task": kept[0] if kept else None,
            "metric": cfg.metric, "rows": rows, "curves": curves, "tamper": t_rows, "attacks": attacks,
            "robustness": [robustness_row(label, result) for label, result in robustness],
            "robustness_results": robustness, "figures": figures, "markdown": "\n".join(sections)}


def _tables(report: dict, table_format: str, out: Path) -> list[Path]:
    """report.csv (and report_robustness.csv: other columns) or report.json, as --table_format asks."""
    if table_format == "csv":
        written = [write_text_atomic(out / REPORT_TABLE_FILES["csv"], csv_table(
            [csv_row(r) for r in report["rows"]], csv_fields(report["kept_tasks"])))]
        if report["robustness"]:  # columns in order of first appearance: runs may differ in steps and tasks
            fields = list(dict.fromkeys(k for row in report["robustness"] for k in row))
            written.append(write_text_atomic(out / REPORT_ROBUSTNESS_CSV_FILE, csv_table(report["robustness"],
                                                                                        fields)))
        return written
    if table_format == "json":
        table = {k: report[k] for k in ("forget_task", "kept_tasks", "retain_task", "metric", "rows", "tamper",
                                        "robustness")}
        return [write_json_atomic(out / REPORT_TABLE_FILES["json"], table)]
    return []


def _draw(report: dict, out: Path, metric: str) -> list[Path]:
    """Every figure `build_report` linked, and only those."""
    from . import plots

    figures, written = report["figures"], []
    if "tradeoff" in figures:
        scatter = [(r["run"], r["forget_acc"], r["kept_acc"]) for r in report["rows"] if r["run"] != "baseline"]
        base = next((r for r in report["rows"] if r["run"] == "baseline"), None)
        written.append(plots.plot_tradeoff(scatter, out / figures["tradeoff"],
                                           (base["forget_acc"], base["kept_acc"]) if base else None,
                                           1 / NUM_CHOICES, report["forget_task"], report["kept_tasks"]))
    if "curves" in figures:
        written.append(plots.plot_training_curves(report["curves"], report["forget_task"], out / figures["curves"],
                                                  metric))
    if "tamper" in figures:
        written.append(plots.plot_tamper_comparison(report["attacks"], out / figures["tamper"], metric))
    if "robustness" in figures:
        finished = [(label, result) for label, result in report["robustness_results"] if result is not None]
        written.append(plots.plot_robustness_comparison(finished, out / figures["robustness"]))
    return written


def run_report(cfg: ReportConfig, preface: list[str] | None = None) -> dict[str, Any]:
    """Write report.md, the figures it links (trade-off, training, tamper and robustness curves) and
    report.csv / report.json; `preface` (markdown lines) goes after the title."""
    check_folder(cfg.out, "report", also=("demo",))  # a demo's folder holds its report
    report = build_report(cfg, preface)
    out = claim_folder(cfg.out, "report", also=("demo",))
    written = [write_text_atomic(out / REPORT_FILE, report["markdown"])]
    written += _draw(report, out, cfg.metric)
    written += _tables(report, cfg.table_format, out)
    print(report["markdown"])
    log.info("wrote %s", ", ".join(str(p) for p in written))
    report["files"] = [str(p) for p in written]
    return report


COMMANDS = [
    Command(("report",), "one table of unlearning runs (baseline first), a trade-off plot, tamper curves and a "
                         "robustness table with its curves", ReportConfig, "lensunlearn.report.command:run_report"),
]
