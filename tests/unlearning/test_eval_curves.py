"""`unlearn --eval_every`: curve points at the right steps, the same adapter as without them, resume,
the too-large warning, and `report`'s training-curves figure."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file

from lensunlearn.core.config import ConfigError
from lensunlearn.eval import evaluate as evaluate_module
from lensunlearn.report.command import ReportConfig, run_report
from lensunlearn.report.plots import DPI, TRAINING_CURVES_SIZE
from lensunlearn.unlearning.run import UnlearnConfig, unlearn

from ..conftest import write_unlearn_inputs

ROOT = Path(__file__).resolve().parents[2]
CAPITALS, SYMBOLS = "capitals", "symbols"


def _task(path: Path, rows: list[tuple[str, list[str], int]]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
    return path


@pytest.fixture
def setup(tmp_path) -> Path:
    """The tiny model, lens and corpora, and two local tasks: the forgotten one and a kept one."""
    root = write_unlearn_inputs(tmp_path, "llama")
    cities = ["paris", "rome", "madrid", "berlin"]
    _task(root / f"{CAPITALS}.jsonl", [(f"the capital of {c} is", cities, a)
                                       for c, a in (("france", 0), ("italy", 1), ("spain", 2), ("germany", 3))])
    _task(root / f"{SYMBOLS}.jsonl", [(f"the symbol of {e} is", ["1", "2", "3", "4"], a)
                                      for e, a in (("gold", 0), ("iron", 1), ("oxygen", 2))])
    return root


def _config(root: Path, **kw) -> UnlearnConfig:
    """6 steps of 4 pairs, LoRA with dropout (so a consumed random number would change the adapter)."""
    base = dict(model=str(root / "tiny"), lens=str(root / "lens"), layers=(1, 3), forget=str(root / "forget.jsonl"),
                retain=str(root / "retain.jsonl"), retain_config=None, retain_column=None, examples=24, batch=4,
                per_device_batch=2, max_length=16, out=str(root / "runs"), device="cpu", lr=1e-2,
                lora_dropout=0.3, forget_target="random", checkpoint_every=3, eval_format="cloze",
                eval_tasks=f"{root / CAPITALS}.jsonl,{root / SYMBOLS}.jsonl")
    return UnlearnConfig(**{**base, **kw})


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _evals(lines: list[dict]) -> dict[int, dict]:
    return {line["step"]: {k: v for k, v in line.items() if k.startswith("eval/") and k != "eval/seconds"}
            for line in lines if any(k.startswith("eval/") for k in line)}


def test_curve_points_at_their_steps_leave_the_adapter_unchanged(setup, monkeypatch):
    plain = unlearn(_config(setup, run_name="plain", eval_base=True))
    real, grad_enabled = evaluate_module.evaluate, []

    def careless(model, *args, **kwargs):
        """An evaluation that draws random numbers and leaves the model in eval mode: the caller must undo both."""
        grad_enabled.append(torch.is_grad_enabled())
        torch.rand(1000)
        result = real(model, *args, **kwargs)
        model.eval()
        return result

    monkeypatch.setattr(evaluate_module, "evaluate", careless)
    curved = unlearn(_config(setup, run_name="curved", eval_every=2))
    a, b = _adapter(plain), _adapter(curved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = _lines(curved)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4, 5, 6]
    points = _evals(lines)
    assert list(points) == [0, 2, 4, 6] and grad_enabled == [False] * 4 + [True]  # + the final evaluation
    assert set(points[2]) == {f"eval/{t}/{m}" for t in (CAPITALS, SYMBOLS) for m in ("acc", "acc_norm")}
    assert "retain_loss" in lines[2] and "eval/seconds" in lines[2] and "retain_loss" not in lines[0]
    assert [line["forget_loss"] for line in lines[1:]] == [line["forget_loss"] for line in _lines(plain)]
    for name, step in (("base_eval.json", 0), ("eval.json", 6)):  # step 0 is the base model; step 6 the result
        result = json.loads(((plain if step == 0 else curved) / name).read_text())["results"]
        assert points[step] == {f"eval/{t}/{m}": pytest.approx(result[t][m]) for t in (CAPITALS, SYMBOLS)
                                for m in ("acc", "acc_norm")}


_KILL_AFTER_LINE_4 = """
import os, signal, sys
from lensunlearn.train.loop import MetricsLog
from lensunlearn.cli import main
original = MetricsLog.write
def write_then_die(self, metrics):
    original(self, metrics)
    if metrics.get("step") == 4:
        os.kill(os.getpid(), signal.SIGKILL)
MetricsLog.write = write_then_die
main(sys.argv[1:])
"""


def _argv(cfg: UnlearnConfig) -> list[str]:
    return ["unlearn", "--model", cfg.model, "--lens", cfg.lens, "--layers", "1,3", "--forget", cfg.forget,
            "--retain", cfg.retain, "--retain_config", "none", "--retain_column", "none", "--examples", "24",
            "--batch", "4", "--per_device_batch", "2", "--max_length", "16", "--out", cfg.out, "--device", "cpu",
            "--lr", "1e-2", "--lora_dropout", "0.3", "--forget_target", "random", "--checkpoint_every", "3",
            "--eval_format", "cloze", "--eval_tasks", cfg.eval_tasks, "--eval_every", "2", "--run_name", "killed"]


def test_resume_keeps_the_points_up_to_the_checkpoint_and_measures_the_rest_again(setup):
    straight = unlearn(_config(setup, run_name="straight", eval_every=2))
    cfg = _config(setup, run_name="killed", eval_every=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_LINE_4, *_argv(cfg)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = setup / "runs" / "killed"
    assert [line["step"] for line in _lines(run_dir)] == [0, 1, 2, 3, 4]  # step 4's point, past the checkpoint at 3
    resumed = unlearn(_config(setup, run_name="killed", eval_every=2, resume=True))
    lines = _lines(resumed)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4, 5, 6]
    assert _evals(lines) == _evals(_lines(straight))  # each point once, with the uninterrupted run's numbers
    a, b = _adapter(straight), _adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interval_longer_than_the_run_warns_once_and_keeps_step_0(setup, caplog):
    with caplog.at_level(logging.WARNING, logger="lensunlearn.unlearning.run"):
        run_dir = unlearn(_config(setup, examples=8, eval_every=100, eval_base=True))
    warnings = [r.getMessage() for r in caplog.records if "--eval_every" in r.getMessage()]
    assert warnings == ["--eval_every 100 is more than the run's 2 steps: only step 0 is evaluated during training"]
    assert list(_evals(_lines(run_dir))) == [0]


def test_bad_intervals_are_refused_before_any_model_is_loaded(setup, monkeypatch):
    with pytest.raises(ConfigError, match="--eval_every must be a finite number >= 0"):
        _config(setup, eval_every=-1)
    with pytest.raises(ConfigError, match="--eval_every needs tasks"):
        _config(setup, eval_every=2, eval_tasks="")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("lensunlearn.train.distributed.dist.init_process_group", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="--full under torchrun is not supported"):
        unlearn(_config(setup, eval_every=2, full=True))
    assert not (setup / "runs").exists()


def _fake_run(root: Path, name: str, points: dict[int, tuple[float, float]] | None) -> Path:
    """A finished run directory; `points` maps step -> (forget, kept) accuracy logged during training."""
    run = root / name
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"examples": 8, "steps": 4, "eval_tasks": "f/forget.jsonl,kept"}))
    lines = [{"step": s, "forget_loss": 1.0, "retain_loss": 0.5} for s in range(1, 5)]
    if points is not None:
        lines = [{"step": 0}, *lines]
        for line in lines:
            if line["step"] in points:
                forget, kept = points[line["step"]]
                line.update({"eval/forget/acc": forget, "eval/kept/acc": kept, "eval/seconds": 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = {"results": {"forget": {"acc": 0.25}, "kept": {"acc": 0.75}}}
    (run / "eval.json").write_text(json.dumps(result))
    (run / "summary.json").write_text(json.dumps({"steps": 4, "final_forget_loss": 1.0, "final_retain_loss": 0.5}))
    return run


def test_report_draws_the_curves_of_runs_that_have_them(tmp_path):
    curved = _fake_run(tmp_path, "curved", {0: (0.75, 0.75), 2: (0.5, 0.75), 4: (0.25, 0.5)})
    plain = _fake_run(tmp_path, "plain", None)
    report = run_report(ReportConfig(runs=(str(curved), str(plain)), out=str(tmp_path / "r")))
    assert report["curves"] == [("curved", {"forget": ([0, 2, 4], [0.75, 0.5, 0.25]),
                                            "kept": ([0, 2, 4], [0.75, 0.75, 0.5])})]
    png = tmp_path / "r" / "training_curves.png"
    assert matplotlib.image.imread(png).shape[:2] == (TRAINING_CURVES_SIZE[1] * DPI, TRAINING_CURVES_SIZE[0] * DPI)
    text = (tmp_path / "r" / "report.md").read_text()
    assert "![training curves](training_curves.png)" in text and "for curved:" in text
    report = run_report(ReportConfig(runs=(str(plain),), out=str(tmp_path / "r2")))
    assert report["curves"] == [] and not (tmp_path / "r2" / "training_curves.png").exists()
    assert "training_curves" not in (tmp_path / "r2" / "report.md").read_text()
