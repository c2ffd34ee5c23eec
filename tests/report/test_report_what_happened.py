"""`report` shows what happened: the steps a run took, every kept task in the table and the trade-off
plot, every figure linked from report.md, every run kind of a folder, and a finished distillation
without `pending` cells. Small fake run folders, as the commands write them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lensunlearn.core.paths import write_marker
from lensunlearn.report import plots
from lensunlearn.report.tables import csv_table, learning_rate, markdown_table, number, percent, plain, points

from .test_report import _run_dir, _tamper_dir, _write, main
from .test_report_robustness import _output, _result

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("facts:country_capital", "facts:element_symbol", "facts:us_state_capital")


def _eval(*accs: float) -> dict:
    return {"model": "base", "format": "cloze",
            "results": {t: {"acc": a, "acc_norm": a, "n": 80} for t, a in zip(TASKS, accs, strict=True)}}


def _demo_like_run(root: Path, name: str = "unlearn", *, planned: int = 100, taken: int = 25,
                   stopped_early: bool = True) -> Path:
    """A finished robust-preset run that planned 100 steps (2 epochs) and stopped at step 25 at its
    general-text loss budget: the plan in run_config.json and summary.json, the truth in metrics.jsonl."""
    run = root / name
    _write(run / "run_config.json", {"model": "base", "forget": "facts:country_capital", "eval_tasks": ",".join(TASKS),
                                     "examples": 1600, "epochs": 1, "steps": planned, "effective_epochs": 2.0,
                                     "batch": 32, "lr": 1e-3, "retain_coef": 1.0, "forget_coef": 20.0,
                                     "optimizer": "muon", "full": True})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "forget_loss": 1.0, "retain_loss": 0.01})
                                               + "\n" for s in range(1, taken + 1)))
    _write(run / "summary.json", {"examples": 1600, "epochs": 2.0, "steps": planned, "final_retain_loss": 0.01,
                                  "final_forget_loss": 1.0, "stopped_early_at_step": taken if stopped_early else None})
    _write(run / "eval.json", _eval(0.3375, 0.9286, 0.28))
    _write(run / "base_eval.json", _eval(0.9125, 0.9643, 0.88))
    write_marker(run, "unlearn")
    return run


def _rows(markdown: str, section: str = "## Unlearning runs") -> list[list[str]]:
    table = markdown.split(section)[1].split("\n## ")[0]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines() if line.startswith("| ")]


def test_a_run_that_ended_past_its_budget_says_so(tmp_path):
    run = _demo_like_run(tmp_path, taken=100, stopped_early=False)
    summary = json.loads((run / "summary.json").read_text())
    _write(run / "summary.json", {**summary, "over_budget_at_end": True})
    header, _, row = _rows(main([str(run), "--out", str(tmp_path / "r")])["markdown"])
    assert row[header.index("steps")] == "100" and "ended with general-text loss past its budget" in row[-1]


def test_a_run_that_stopped_early_shows_the_steps_it_took(tmp_path):
    report = main([str(_demo_like_run(tmp_path)), "--out", str(tmp_path / "r"), "--table_format", "csv"])
    header, _, row = _rows(report["markdown"])
    assert row[header.index("steps")] == "25 of 100"  # not the plan's 100
    assert row[header.index("epochs")] == "0.5"  # 2 planned epochs, a quarter of the steps taken
    assert "stopped early: general-text loss past its budget" in row[-1]
    saved = (tmp_path / "r" / "report.csv").read_text().splitlines()
    fields = saved[0].split(",")
    assert saved[2].split(",")[fields.index("steps")] == "25" and saved[2].split(",")[fields.index("steps_planned")] \
        == "100"


def test_steps_come_from_the_metrics_log_when_the_summary_only_has_the_plan(tmp_path):
    run = _demo_like_run(tmp_path, taken=40, stopped_early=False)
    report = main([str(run), "--out", str(tmp_path / "r")])
    header, _, row = _rows(report["markdown"])
    assert row[header.index("steps")] == "40 of 100" and "stopped early" not in row[-1]


def _drawn_tradeoff(monkeypatch) -> list:
    figures = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real(fig, path))
    return figures


def test_every_kept_task_has_a_column_and_a_marker_on_the_tradeoff(tmp_path, monkeypatch):
    figures = _drawn_tradeoff(monkeypatch)
    report = main([str(_demo_like_run(tmp_path)), "--out", str(tmp_path / "r")])
    header, baseline, row = _rows(report["markdown"])
    assert header[-4:] == ["facts:country_capital (↓)", "facts:element_symbol (↑)", "facts:us_state_capital (↑)",
                           "Notes"]
    assert baseline[-4:-1] == ["91.25%", "96.43%", "88.00%"] and row[-4:-1] == ["33.75%", "92.86%", "28.00%"]
    assert report["kept_tasks"] == list(TASKS[1:])
    (ax,) = figures[0].axes
    labels = ax.get_legend_handles_labels()[1]
    assert labels[:2] == list(TASKS[1:]) and "baseline (original model)" in labels
    # the run and the baseline each at (forget, kept) for both kept tasks
    offsets = {tuple(round(v, 2) for v in c.get_offsets()[0]) for c in ax.collections if len(c.get_offsets())}
    assert {(33.75, 92.86), (33.75, 28.0), (91.25, 96.43), (91.25, 88.0)} <= offsets
    assert "state" in ax.get_ylabel() or "kept-task" in ax.get_ylabel()


def _links(markdown: str) -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown))


def test_every_figure_drawn_is_linked_and_every_link_is_drawn(tmp_path):
    curved = _run_dir(tmp_path, "curved", examples=8, steps=4, lr=1e-3, forget=0.3, retain=0.4, losses=(1.0, 1.0))
    lines = [json.loads(line) for line in (curved / "metrics.jsonl").read_text().splitlines()]
    lines[1]["eval/wmdp_bio_robust/acc"] = 0.4
    (curved / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    robust = _output(tmp_path, "robust", _result(unseen=(0.2, 0.4, 0.55), kept=0.95, ppl=21.0))
    out = tmp_path / "r"
    report = main([str(curved), str(_tamper_dir(tmp_path)), str(robust), "--out", str(out)])
    drawn = {p.name for p in out.glob("*.png")}
    assert drawn == {"tradeoff.png", "training_curves.png", "tamper_curves.png", "robustness_curves.png"}
    assert _links(report["markdown"]) == drawn == _links((out / "report.md").read_text())


def test_a_folder_of_runs_with_a_tamper_output_reports_every_run(tmp_path, caplog):
    """Before: the folder was taken for one tamper sweep, and both unlearning runs were dropped silently."""
    runs = tmp_path / "runs"
    first = _demo_like_run(runs, "first")
    _demo_like_run(runs, "second", taken=100, stopped_early=False)
    _tamper_dir(runs)  # runs/attack/results.json
    (runs / "notes").mkdir()  # a folder of the user's own
    with caplog.at_level("INFO", logger="lensunlearn.report.command"):
        report = main([str(runs), "--out", str(tmp_path / "r")])
    assert [r["run"] for r in report["rows"]] == ["baseline", "first", "second"]
    assert {r["attack"] for r in report["tamper"]} == {"attack"}
    assert "2 unlearning or distillation runs, 1 tamper output" in caplog.text
    assert "notes (no output of lensunlearn)" in caplog.text  # what was not reported is named
    # the run folders given one by one report the same rows
    again = main([str(first), str(runs / "second"), str(runs / "attack"), "--out", str(tmp_path / "r2")])
    assert again["rows"] == report["rows"] and again["tamper"] == report["tamper"]


def test_a_folder_holding_no_output_is_refused_in_one_line_naming_what_it_found(tmp_path):
    folder = tmp_path / "stuff"
    (folder / "lens").mkdir(parents=True)
    write_marker(folder / "lens", "lens")
    (folder / "photos").mkdir()
    proc = subprocess.run([sys.executable, "-m", "lensunlearn", "report", str(folder), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "holds none" in lines[0] and "lens (a tuned lens)" in lines[0] and "photos (no output" in lines[0]
    assert not (tmp_path / "r").exists()


def _distill_run(root: Path) -> Path:
    """A finished `distill` output: the distillation's settings, steps and recovered share, no forget loss."""
    run = root / "src_distilled"
    _write(run / "run_config.json", {"model": "base", "forget": "facts:country_capital", "teacher": "runs/src/merged",
                                     "eval_tasks": ",".join(TASKS), "alpha": 0.25, "beta": 0.1, "steps": 120,
                                     "lr": 1e-4, "batch": 16, "optimizer": "adamw", "full": True})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kl": 0.5}) + "\n" for s in range(1, 81)))
    _write(run / "summary.json", {"source_run": "runs/src", "alpha": 0.25, "beta": 0.1, "steps": 80,
                                  "stop_reason": "target_share", "steps_planned": 120, "recovered": 0.9})
    _write(run / "eval.json", _eval(0.35, 0.9, 0.3))
    write_marker(run, "distill")
    return run


def test_a_finished_distill_run_has_no_pending_cells(tmp_path):
    """Before: its examples, epochs, coefficients and losses, which a distillation does not have, read `pending`."""
    report = main([str(_distill_run(tmp_path)), "--out", str(tmp_path / "r")])
    header, row = _rows(report["markdown"])
    assert "pending" not in " ".join(row)
    cells = dict(zip(header, row, strict=True))
    assert cells["steps"] == "80 of 120" and cells["lr"] == "1e-4" and cells["batch"] == "16"
    assert cells["examples"] == cells["forget_coef"] == cells["forget_loss"] == "-"
    assert cells["facts:us_state_capital (↑)"] == "30.00%"
    assert cells["Notes"].startswith("distilled (alpha 0.25, beta 0.1), 90% of the held-out gap recovered, stopped "
                                     "at --target_share")


def test_a_distill_run_stopped_near_the_teacher_says_so(tmp_path):
    run = _distill_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    _write(run / "summary.json", {**summary, "stop_reason": "stop_within"})
    header, row = _rows(main([str(run), "--out", str(tmp_path / "r")])["markdown"])
    assert ", stopped at --stop_within;" in dict(zip(header, row, strict=True))["Notes"]


def test_an_unfinished_run_is_pending_and_says_where_it_is(tmp_path):
    run = _demo_like_run(tmp_path)
    (run / "summary.json").unlink()
    (run / "eval.json").unlink()
    header, _, row = _rows(main([str(run), "--out", str(tmp_path / "r")])["markdown"])
    cells = dict(zip(header, row, strict=True))
    assert cells["steps"] == "25 of 100" and cells["facts:country_capital (↓)"] == "pending"
    assert "unfinished (step 25 of 100)" in cells["Notes"]


# --- the one table writer ------------------------------------------------------------------------


def test_markdown_tables_align_escape_and_keep_rows_on_one_line():
    table = markdown_table(["name", "acc", "note"], [["a|b", 1, "two\nlines"], ["c", "", None]], "lr")
    assert table.splitlines() == ["| name | acc | note |", "|---|---:|---|", "| a\\|b | 1 | two\\nlines |",
                                  "| c |  | None |"]


def test_csv_tables_leave_missing_fields_empty():
    assert csv_table([{"a": 1, "b": "x, y"}, {"a": None}], ["a", "b"]) == 'a,b\n1,"x, y"\n,\n'


@pytest.mark.parametrize("call,text", [
    (lambda: percent(0.12345), "12.3"), (lambda: percent(0.12345, 2, unit="%"), "12.35%"),
    (lambda: percent(0.2, sd=0.05), "20.0 ± 5.0"), (lambda: percent(None), "-"),
    (lambda: percent(None, missing="pending"), "pending"), (lambda: percent(True), "-"),
    (lambda: points(0.2679), "+26.79 pts"), (lambda: points(-0.01), "-1.00 pts"),
    (lambda: number(1.23456, 4), "1.2346"), (lambda: number(12.0, 0), "12"), (lambda: number(None), "-"),
    (lambda: plain(5.0), "5.0"), (lambda: plain(32), "32"), (lambda: plain(None, "-"), "-"),
    (lambda: learning_rate(1.5e-4), "1.5e-4"), (lambda: learning_rate(0.02), "0.02"),
])
def test_number_formats(call, text):
    assert call() == text


def test_the_tamper_plot_names_the_attacked_run():
    """tamper's results name the attacked run under `run`; older results named it `model`."""
    from lensunlearn.report.plots import tamper_title

    config = {"lr": 1e-5, "schedule": "constant", "chunks": 400}
    assert tamper_title({"config": {**config, "run": "/x/demo/unlearn", "model": None}}).startswith(
        "tamper attack on unlearn: lr 1e-05, constant, 400 chunks")
    assert tamper_title({"config": {**config, "model": "runs/old"}}).startswith("tamper attack on old:")
