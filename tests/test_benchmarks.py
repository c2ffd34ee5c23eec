"""Benchmark scripts run at toy size on CPU and report every row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_step_gpu_runs_tiny_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_gpu.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["step"], r["checkpointing"]) for r in rows] == [
        ("unlearn LoRA", False), ("unlearn LoRA", True), ("lens train", False)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < math.inf for r in rows)
    # MFU is against the bfloat16 product rate measured in the same process: a CPU that emulates bfloat16
    # measures a rate below what its steps reach, so the bound holds only where bfloat16 is native
    from lensunlearn.modeling.loading import NATIVE_BF16_ENV, native_bfloat16

    monkeypatch.delenv(NATIVE_BF16_ENV)
    if native_bfloat16("cpu"):
        assert all(r["mfu"] < 1 for r in rows)


def test_lens_quality_runs_tiny_and_reports_both_recipes(tmp_path, text_corpus):
    pytest.importorskip("tuned_lens")
    from .conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "quality.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lens_quality.py"), "--model", str(model_dir),
                           "--corpus", str(text_corpus), "--docs", "30", "--heldout_docs", "10", "--prose", "2",
                           "--chunk", "16", "--eval_max_length", "16", "--threads", "1", "--out", str(out)],
                          check=True, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    result = json.loads(out.read_text())
    assert set(result["kl"]) == {"logit lens", "ours", "library"}
    assert all(len(v) == 4 and all(math.isfinite(x) and x >= 0 for x in v) for v in result["kl"].values())
    assert result["runs"]["ours"]["steps"] == 4 and result["runs"]["library"]["steps"] > 0
    assert all(result["runs"][arm]["train_s"] > 0 for arm in ("ours", "library"))
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert lines[header].split()[1:] == ["logit", "lens", "ours", "library"]
    assert [line.split()[0] for line in lines[header + 1:header + 6]] == ["0", "1", "2", "3", "mean"]
    for arm in ("ours", "library"):
        row = next(line for line in lines if line.startswith(f"{arm} "))
        assert float(row.split()[1]) == pytest.approx(result["mean_kl"][arm], abs=1e-4)
