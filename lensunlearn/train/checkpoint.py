"""Resumable checkpoints: step, trainable tensors, optimiser and RNG state, written atomically.

Plain tensors are saved by rank 0 alone. Tensors sharded by FSDP2 (DTensors) are saved by every
rank, each its own shards, and a checkpoint exists only once all shards are complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import torch_save_atomic
from ..core.errors import load_torch_file
from ..core.paths import CHECKPOINT_FILE, checkpoint_shard, checkpoint_shards
from .optim import MultiOptimizer, is_sharded

log = logging.getLogger(__name__)


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


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: MultiOptimizer,
                    extra: dict[str, Any] | None = None) -> Path:
    """Atomically write the resume point: step, trainable tensors, optimiser and RNG state.

    Plain tensors: rank 0 alone writes the checkpoint file. Tensors sharded by FSDP2 (DTensors):
    every rank must call this; each writes its own shard file, and once all have, rank 0 writes
    the checkpoint file, which names the world size, so a checkpoint exists only when every shard
    is complete. Resuming needs the same number of processes.
    """
    import torch.distributed as dist

    path = Path(run_dir) / CHECKPOINT_FILE
    payload = {"step": step, "trainable": _local(trainable), "optimizer": _local(optimizer.state_dict()),
               "rng": rng_state(), "threads": torch.get_num_threads(), "extra": extra or {}}
    if not any(is_sharded(t) for t in trainable.values()):
        torch_save_atomic(payload, path)
    else:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        torch_save_atomic(payload, checkpoint_shard(run_dir, rank))
        dist.barrier()
        if rank == 0:
            torch_save_atomic({"step": step, "sharded_over": world_size, "extra": extra or {}}, path)
        dist.barrier()
    log.info("checkpoint at step %d -> %s", step, path)
    return path


# A damaged checkpoint (a copy cut short, a disk that filled up) cannot be resumed from.
_REMAKE = "start the run over with --overwrite instead of --resume"


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint saved in `run_dir` (this rank's shards of a sharded one), or None if there is none."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    state = load_torch_file(path, _REMAKE)
    if "sharded_over" in state:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if world_size != state["sharded_over"]:
            raise ValueError(f"{path} was written by {state['sharded_over']} processes, each holding a shard: "
                             f"resume with torchrun --nproc_per_node {state['sharded_over']}")
        state = load_torch_file(checkpoint_shard(run_dir, dist.get_rank()), _REMAKE)
    return state


def remove_checkpoint(run_dir: Path) -> None:
    """Delete a finished run's checkpoint and any per-rank shards."""
    (Path(run_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    for shard in checkpoint_shards(run_dir):
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
    warn_on_thread_change(state.get("threads"))
    return int(state["step"])


def warn_on_thread_change(saved: int | None) -> None:
    """Say once that a resumed run will match an uninterrupted one only to float rounding when it runs
    with another torch thread count than the checkpoint's: on some CPUs float sums depend on it."""
    now = torch.get_num_threads()
    if saved is not None and saved != now:
        log.warning("the checkpoint was written with %d torch threads and this process uses %d: the resumed run "
                    "matches an uninterrupted one only to float rounding (set OMP_NUM_THREADS=%d for identical "
                    "weights)", saved, now, saved)
