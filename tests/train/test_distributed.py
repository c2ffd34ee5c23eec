"""Two gloo processes on CPU give the same result as one process with the same global batch.

LoRA runs under DDP (the objective module is wrapped) and full-parameter runs under FSDP2
(`fully_shard` per block), with AdamW and with Muon (whose updates are orthogonalised as whole
matrices, `optim.ShardedMuon`). One spawn runs all three.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lensunlearn.train.distributed import World, shard

sys.path.insert(0, str(Path(__file__).parent))
from _dist_worker import run  # noqa: E402

from tests.conftest import write_unlearn_inputs  # noqa: E402

RUNS = {"ddp_lora": dict(full=False, optimizer="adamw"), "fsdp_full": dict(full=True, optimizer="adamw"),
        "fsdp_full_muon": dict(full=True, optimizer="muon")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configs(tmp_path: Path, out: str) -> list[dict]:
    write_unlearn_inputs(tmp_path, "gpt_neox")
    model, forget, retain = tmp_path / "tiny", tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    base = dict(model=str(model), lens=str(tmp_path / "lens"), layers=(1, 3), forget=str(forget),
                retain=str(retain), retain_config=None, retain_column=None, examples=8, batch=4, per_device_batch=1,
                max_length=16, eval_tasks="", lora_dropout=0.0, device="cpu", checkpoint_every=0)
    return [{**base, **extra, "out": str(tmp_path / out), "run_name": name} for name, extra in RUNS.items()]


def test_shard_splits_micro_batches_contiguously():
    items = list(range(6))
    assert shard(items, World(0, 2)) + shard(items, World(1, 2)) == items
    with pytest.raises(ValueError, match="evenly"):
        shard(list(range(3)), World(0, 2))


def test_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    two = _configs(tmp_path, "two")
    mp.spawn(run, args=(2, _free_port(), two), nprocs=2, join=True)
    one = [{**c, "out": str(tmp_path / "one")} for c in two]
    run(0, 1, _free_port(), one)
    for name in RUNS:
        a = load_file(tmp_path / "one" / name / "merged" / "model.safetensors")
        b = load_file(tmp_path / "two" / name / "merged" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            # Muon orthogonalises in bfloat16: gradients that differ in the last float32 bits (reduce-scatter
            # order) flip a few bfloat16 roundings, moving those weights by about one bfloat16 step of the update.
            atol = 2e-5 if RUNS[name]["optimizer"] == "muon" else 1e-6
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=atol,
                                       msg=lambda m, name=name, key=key: f"{name}: {key}: {m}")
        base = load_file(tmp_path / "tiny" / "model.safetensors")
        assert any(not torch.equal(base[k], a[k]) for k in base if k in a), f"{name}: training changed nothing"
        m1 = [json.loads(l) for l in (tmp_path / "one" / name / "metrics.jsonl").read_text().splitlines()]
        m2 = [json.loads(l) for l in (tmp_path / "two" / name / "metrics.jsonl").read_text().splitlines()]
        assert len(m1) == len(m2) == 2
        for x, y in zip(m1, m2):
            assert x["forget_loss"] == pytest.approx(y["forget_loss"], rel=1e-5)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert (tmp_path / "two" / "ddp_lora" / "adapter").is_dir()
    assert not list((tmp_path / "two").glob("*/checkpoint.pt"))


def test_fsdp_run_stopped_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    import torch.multiprocessing as mp

    configs = [c for c in _configs(tmp_path, "straight") if c["full"]]  # FSDP2 with AdamW and with Muon
    configs = [{**c, "examples": 16, "checkpoint_every": 2} for c in configs]
    mp.spawn(run, args=(2, _free_port(), configs), nprocs=2, join=True)
    stopped = [{**c, "out": str(tmp_path / "resumed")} for c in configs]
    mp.spawn(run, args=(2, _free_port(), stopped, 2), nprocs=2, join=True)
    for c in stopped:
        run_dir = Path(c["out"]) / c["run_name"]
        assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists()
        assert sorted(p.name for p in run_dir.glob("checkpoint.rank*.pt")) == ["checkpoint.rank0.pt",
                                                                              "checkpoint.rank1.pt"]
    with pytest.raises(ValueError, match="nproc_per_node 2"):
        run(0, 1, _free_port(), [{**stopped[0], "resume": True}])
    mp.spawn(run, args=(2, _free_port(), [{**c, "resume": True} for c in stopped]), nprocs=2, join=True)
    for c in configs:
        a = load_file(tmp_path / "straight" / c["run_name"] / "merged" / "model.safetensors")
        b = load_file(tmp_path / "resumed" / c["run_name"] / "merged" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), c["run_name"]
        run_dir = tmp_path / "resumed" / c["run_name"]
        assert not list(run_dir.glob("checkpoint*")) and (run_dir / "summary.json").exists()
        steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
