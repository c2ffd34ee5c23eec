"""`report`: the table is rebuilt identically from run files, its numbers are the files' numbers, plots exist."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from lensunlearn.cli import all_commands, build_parser
from lensunlearn.core.config import ConfigError, config_from_args
from lensunlearn.core.errors import InputError
from lensunlearn.core.paths import is_tamper_output
from lensunlearn.report import command as report
from lensunlearn.report.command import ReportConfig
from lensunlearn.report.plots import DPI, TAMPER_SIZE, TRADEOFF_SIZE
from lensunlearn.report.tables import learning_rate, plain


def main(argv: list[str]):
    """The `lensunlearn report` command line, built from this module's command alone."""
    args = build_parser(all_commands()).parse_args(["report", *argv])
    return args._command(config_from_args(args._command.config, args))


def _eval(forget: float, retain: float, model: str = "m") -> dict:
    """An evaluate() result: the forget task plain, the retain task as a group of two subtasks."""
    def task(acc: float, n: int) -> dict:
        return {"acc": acc, "acc_stderr": 0.01, "acc_norm": acc - 0.01, "acc_norm_stderr": 0.01, "n": n}

    return {"model": model, "format": "letter",
            "results": {"wmdp_bio_robust": task(forget, 868), "mmlu_a": task(retain, 10), "mmlu_b": task(retain, 10)},
            "groups": {"mmlu_stem": {**task(retain, 20), "tasks": ["mmlu_a", "mmlu_b"]}}}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _run_dir(root: Path, name: str, *, examples: int, steps: int, lr: float, forget: float | None, retain: float,
             losses: tuple[float, float] | None, full: bool = False) -> Path:
    run = root / name
    _write(run / "run_config.json", {"model": "base-model", "lens": "lens", "forget": "facts:x", "retain": "wiki",
                                     "examples": examples, "epochs": 1, "steps": steps, "batch": 32, "lr": lr,
                                     "retain_coef": 5.0, "remove_coef": 5.0,  # as runs wrote it before forget_coef
                                     "layers": [5, 10], "optimizer": "adamw",
                                     "full": full, "rank": 16})
    metrics = [{"step": s, "retain_loss": 1.0 + 1 / s, "forget_loss": 0.5 + 1 / s, "lr": lr}
               for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if losses is not None:
        _write(run / "summary.json", {"examples": examples, "epochs": 1.0, "steps": steps,
                                      "final_retain_loss": losses[0],
                                      "final_forget_loss": losses[1], "wall_seconds": 12.5})
    if forget is not None:
        _write(run / "eval.json", _eval(forget, retain))
    _write(run / "base_eval.json", _eval(0.4297, 0.3685, "base-model"))
    return run


def _tamper_dir(root: Path) -> Path:
    records = [{"step": s, "train_loss": None if s == 0 else 1.0 / s,
                "tasks": {"wmdp_bio_robust:attacked": {"acc": a, "acc_norm": a}, "wmdp_bio_robust:heldout":
                          {"acc": h, "acc_norm": h}, "mmlu_stem": {"acc": 0.34, "acc_norm": 0.33}}}
               for s, a, h in ((0, 0.2482, 0.25), (50, 0.5208, 0.30), (100, 0.5161, 0.31))]
    results = {"config": {"model": "runs/best", "forget_task": "wmdp_bio_robust", "lr": 2e-5, "epochs": 1.0,
                          "schedule": "linear", "chunks": 512, "steps": 100, "batch": 8, "lora": False,
                          "optimizer": "adamw", "metric": "acc"},
               "chance": 0.25, "original": {"wmdp_bio_robust:attacked": {"acc": 0.4297}}, "records": records,
               "recovery": {}}
    _write(root / "attack" / "results.json", results)
    return root / "attack"


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [_run_dir(tmp_path, "m_lens_ex8192_rm5.0_ret5.0", examples=8192, steps=256, lr=1e-3, forget=0.2316,
                     retain=0.3435, losses=(1.19, 1.04)),
            _run_dir(tmp_path, "m_lens_ex16384_rm5.0_ret5.0", examples=16384, steps=1024, lr=1e-3, forget=None,
                     retain=0.0, losses=None, full=True)]


def _png_shape(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    return matplotlib.image.imread(path).shape[:2]


def test_table_rebuilds_identically_from_the_files(tmp_path, runs):
    attack = _tamper_dir(tmp_path)
    first = main([*map(str, runs), "--tamper", str(attack), "--out", str(tmp_path / "r1"), "--format", "csv"])
    main([*map(str, runs), str(attack), "--out", str(tmp_path / "r2"), "--format", "csv"])  # tamper auto-detected
    text = (tmp_path / "r1" / "report.md").read_text()
    assert text == (tmp_path / "r2" / "report.md").read_text()
    assert (tmp_path / "r1" / "report.csv").read_text() == (tmp_path / "r2" / "report.csv").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| examples | epochs | steps | retain_coef | forget_coef | lr | batch | retain_loss | "
                        "forget_loss | wmdp_bio_robust (↓) | mmlu_stem (↑) | Notes |")
    assert lines[1].startswith("| - | - |") and "42.97% | 36.85% | baseline: original model base-model" in lines[1]
    assert lines[2] == ("| 8192 | 1 | 256 | 5.0 | 5.0 | 1e-3 | 32 | 1.19 | 1.04 | 23.16% | 34.35% | "
                        "adamw, LoRA r16; m_lens_ex8192_rm5.0_ret5.0 |")
    # No summary.json: losses come from the last metrics line; no eval.json: accuracies are pending.
    assert lines[3] == ("| 16384 | 1 | 1024 | 5.0 | 5.0 | 1e-3 | 32 | 1.00 | 0.50 | pending | pending | "
                        "adamw, full, unfinished (step 1024 of 1024); m_lens_ex16384_rm5.0_ret5.0 |")
    assert "| attack | best | wmdp_bio_robust:attacked | 512 chunks, lr=2e-5, 100 steps of 8, linear, full, adamw | " \
           "24.82% | 52.08% (50) | 51.61% (100) | +26.79 pts |" in text
    assert "| wmdp_bio_robust:heldout |" in text
    rows = list(csv.DictReader((tmp_path / "r1" / "report.csv").open()))
    assert [r["run"] for r in rows] == ["baseline", runs[0].name, runs[1].name]
    assert float(rows[1]["forget_acc"]) == 0.2316 and float(rows[1]["retain_loss"]) == 1.19
    assert [r["forget_acc"] for r in first["rows"]] == [0.4297, 0.2316, None]
    assert rows[1]["kept_acc:mmlu_stem"] == "0.3435" and rows[1]["steps"] == "256"
    assert _png_shape(tmp_path / "r1" / "tradeoff.png") == (TRADEOFF_SIZE[1] * DPI, TRADEOFF_SIZE[0] * DPI)
    assert _png_shape(tmp_path / "r1" / "tamper_curves.png") == (TAMPER_SIZE[1] * DPI, TAMPER_SIZE[0] * DPI)


def test_killed_sweep_without_summary_is_read(tmp_path):
    attack = _tamper_dir(tmp_path)
    sweep = tmp_path / "sweep"
    (sweep / "lr2e-05").mkdir(parents=True)
    (attack / "results.json").rename(sweep / "lr2e-05" / "results.json")
    assert is_tamper_output(sweep)
    assert [label for label, _ in report.load_tamper(sweep)] == ["sweep/lr2e-05"]


def test_baseline_file_tasks_and_json(tmp_path, runs):
    _write(tmp_path / "base.json", _eval(0.5, 0.6, "other"))
    out = main([str(runs[0]), "--baseline", str(tmp_path / "base.json"), "--forget_task", "mmlu_stem",
                "--retain_task", "wmdp_bio_robust", "--metric", "acc_norm", "--format", "json",
                "--out", str(tmp_path / "r")])
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    assert saved["rows"][0]["forget_acc"] == pytest.approx(0.59) and saved["rows"][1]["retain_acc"] == 0.2216
    assert saved["kept_tasks"] == ["wmdp_bio_robust"] and saved["rows"][1]["kept_acc"] == {"wmdp_bio_robust": 0.2216}
    assert saved["forget_task"] == "mmlu_stem" and not (tmp_path / "r" / "tamper_curves.png").exists()


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError):
        ReportConfig()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds none .*run_config.json"):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    with pytest.raises(InputError, match="does not exist"):
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])


@pytest.mark.parametrize("value,text", [(1e-3, "1e-3"), (2e-5, "2e-5"), (1.5e-4, "1.5e-4"), (0.02, "0.02"),
                                        (None, "pending")])
def test_learning_rates_in_seed_style(value, text):
    assert learning_rate(value) == text


@pytest.mark.parametrize("value,text", [(5.0, "5.0"), (32, "32"), (1.19, "1.19"), (0.001, "0.00"), (None, "pending")])
def test_numbers_in_seed_style(value, text):
    assert plain(value) == text
