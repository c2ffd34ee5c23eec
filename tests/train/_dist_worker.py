"""A worker for the distributed tests: runs `unlearn` as one of N gloo processes on CPU.

Started by `torch.multiprocessing.spawn` from test_distributed.py. It sets the environment torchrun
would set and joins one gloo process group, then runs each config in turn (`unlearn` leaves a
group it did not create alone), so one spawn serves several runs.
"""

from __future__ import annotations

import os


class _Stopped(Exception):
    """Raised on every rank right after a checkpoint, to leave a run unfinished (as a kill would)."""


def _stop_after_checkpoint(step_to_stop: int) -> None:
    import lensunlearn.unlearning.run as unlearn_module

    save = unlearn_module.save_checkpoint

    def save_then_stop(run_dir, step, *args, **kwargs):
        save(run_dir, step, *args, **kwargs)
        if step == step_to_stop:
            raise _Stopped

    unlearn_module.save_checkpoint = save_then_stop


def run(rank: int, world_size: int, port: int, configs: list[dict], stop_at: int | None = None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from lensunlearn.unlearning.run import UnlearnConfig, unlearn

    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if stop_at is not None:
        _stop_after_checkpoint(stop_at)
    try:
        for config in configs:
            try:
                unlearn(UnlearnConfig(**config))
            except _Stopped:
                pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
