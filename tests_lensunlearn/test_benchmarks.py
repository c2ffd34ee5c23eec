"""The GPU benchmark script runs (at toy size, on CPU) and reports every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_gpu_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_gpu.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["step"], r["checkpointing"]) for r in rows] == [
        ("unlearn LoRA", False), ("unlearn LoRA", True), ("lens train", False)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
