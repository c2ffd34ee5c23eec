"""The one training loop (lens training, unlearning and the tamper attack) and its checkpoints.

Data order is a pure function of the step (see `data.batch_indices`), so a resumed run only has
to restore parameters, optimiser state, RNG state and the step counter to continue exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .optim import MultiOptimizer, is_sharded, set_lr

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclass
class LoopSpec:
    """What one optimisation run needs; everything model-specific hides in the callables.

    `loss_fn(batch, step)` returns (loss, metrics). The loop back-propagates loss / number of
    micro-batches; a loss_fn that already accumulated its own gradients (with that scale)
    returns a detached loss instead.
    """

    params: Sequence[nn.Parameter]
    optimizer: MultiOptimizer
    base_lr: float
    total_steps: int
    micro_batches: Callable[[int], Sequence[Any]]
    loss_fn: Callable[[Any, int], tuple[torch.Tensor, dict[str, float]]]
    lr_factor: Callable[[int], float]
    clip: float = 1.0
    no_sync: Callable[[], ContextManager] | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None
    checkpoint: Callable[[int], None] | None = None
    checkpoint_every: int = 0
    desc: str = "train"
    postfix: Sequence[str] = field(default_factory=tuple)


def _step(spec: LoopSpec, step: int) -> dict[str, float]:
    """One optimiser step: accumulate over micro-batches (no gradient sync but on the last), clip, step."""
    lr = set_lr(spec.optimizer, spec.base_lr, spec.lr_factor(step))
    micro = spec.micro_batches(step)
    totals: dict[str, float] = {}
    for index, batch in enumerate(micro):
        last = index == len(micro) - 1
        sync = contextlib.nullcontext() if last or spec.no_sync is None else spec.no_sync()
        with sync:
            loss, metrics = spec.loss_fn(batch, step)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at step {step}: lower the learning rate (--lr), keep grad clipping "
                    f"on, or use float32 (--dtype float32)")
            if loss.requires_grad:  # else loss_fn accumulated its own gradients (see LoopSpec)
                (loss / len(micro)).backward()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value
    out = {k: (v if k == "tokens" else v / len(micro)) for k, v in totals.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(spec.params, spec.clip if spec.clip > 0 else math.inf)
    spec.optimizer.step()
    spec.optimizer.zero_grad(set_to_none=True)
    out.update(lr=lr, grad_norm=float(grad_norm))
    return out


def run_loop(spec: LoopSpec, start_step: int = 0) -> dict[str, float]:
    """Run optimiser steps `start_step` .. `total_steps - 1`; return the last step's metrics."""
    bar = tqdm(total=spec.total_steps, initial=start_step, desc=spec.desc, disable=not is_main_process(),
               dynamic_ncols=True)
    metrics: dict[str, float] = {}
    try:
        for step in range(start_step, spec.total_steps):
            began = time.perf_counter()
            metrics = _step(spec, step)
            metrics["step"] = step + 1
            metrics["seconds"] = time.perf_counter() - began
            if "tokens" in metrics:
                metrics["tokens_per_s"] = metrics["tokens"] / max(metrics["seconds"], 1e-9)
            if spec.on_step is not None:
                spec.on_step(step, metrics)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in spec.postfix if k in metrics}, refresh=False)
            done = step + 1
            if spec.checkpoint is not None and spec.checkpoint_every > 0 and done % spec.checkpoint_every == 0 \
                    and done < spec.total_steps:
                spec.checkpoint(done)
    finally:
        bar.close()
    return metrics


class MetricsLog:
    """Per-step metrics as JSONL; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.enabled = is_main_process()
        if not self.enabled:
            return
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _local(tree: Any) -> Any:
    """`tree` with every DTensor replaced by this rank's shard, on CPU (what one rank saves)."""
    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_local(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return (tree.to_local() if is_sharded(tree) else tree).detach().cpu()
    return tree


def _shard_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"checkpoint.rank{rank}.pt"


def _write_atomic(payload: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: MultiOptimizer,
                    extra: dict[str, Any] | None = None) -> Path:
    """Atomically write the resume point: step, trainable tensors, optimiser and RNG state.

    Plain tensors: rank 0 alone writes `checkpoint.pt`. Tensors sharded by FSDP2 (DTensors):
    every rank must call this; each writes its own shards to `checkpoint.rank<r>.pt`, and once
    all have, rank 0 writes `checkpoint.pt`, which names the world size, so a checkpoint exists
    only when every shard is complete. Resuming needs the same number of processes.
    """
    import torch.distributed as dist

    path = Path(run_dir) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "trainable": _local(trainable), "optimizer": _local(optimizer.state_dict()),
               "rng": rng_state(), "extra": extra or {}}
    if not any(is_sharded(t) for t in trainable.values()):
        _write_atomic(payload, path)
    else:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        _write_atomic(payload, _shard_file(run_dir, rank))
        dist.barrier()
        if rank == 0:
            _write_atomic({"step": step, "sharded_over": world_size, "extra": extra or {}}, path)
        dist.barrier()
    log.info("checkpoint at step %d -> %s", step, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint saved in `run_dir` (this rank's shards of a sharded one), or None if there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "sharded_over" in state:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if world_size != state["sharded_over"]:
            raise ValueError(f"{path} was written by {state['sharded_over']} processes, each holding a shard: "
                             f"resume with torchrun --nproc_per_node {state['sharded_over']}")
        state = torch.load(_shard_file(run_dir, dist.get_rank()), map_location="cpu", weights_only=True)
    return state


def remove_checkpoint(run_dir: Path) -> None:
    """Delete a finished run's checkpoint and any per-rank shards."""
    (Path(run_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    for shard in Path(run_dir).glob("checkpoint.rank*.pt"):
        shard.unlink(missing_ok=True)


def _reshard_optimizer_state(optimizer: MultiOptimizer) -> None:
    """After loading saved shards, make the states of sharded parameters DTensors again."""
    from torch.distributed.tensor import DTensor

    for opt in optimizer.optimizers:
        for param, state in opt.state.items():
            if not is_sharded(param):
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == param.to_local().shape:
                    state[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                    shape=param.shape, stride=param.stride())


def restore_checkpoint(state: dict[str, Any], trainable: dict[str, torch.Tensor], optimizer: MultiOptimizer) -> int:
    """Copy a checkpoint back into live tensors and optimiser; return the step to continue from."""
    missing = set(trainable) - set(state["trainable"])
    if missing:
        raise ValueError(f"checkpoint does not match this run (missing {sorted(missing)[:3]}...): "
                         f"resume with the same config, or start over with --overwrite")
    with torch.no_grad():
        for name, tensor in trainable.items():
            target = tensor.to_local() if is_sharded(tensor) else tensor
            target.copy_(state["trainable"][name].to(target.device, target.dtype))
    optimizer.load_state_dict(state["optimizer"])
    _reshard_optimizer_state(optimizer)
    set_rng_state(state["rng"])
    return int(state["step"])
