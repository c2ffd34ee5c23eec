"""torchrun support: process group, DDP for LoRA, FSDP2 for full parameters, rank-0 I/O, data shards.

A single process is the world of size 1, so every helper here is a no-op without torchrun.
LoRA training wraps the objective module in DDP (the adapters are small; every rank holds the whole
model). Full-parameter training shards every decoder block, then the root, with FSDP2's
`fully_shard`; the blocks are found from the module tree (`layers.model_parts`), so any
architecture works. Each rank takes a contiguous share of every global batch's micro-batches, so
the gradient averaged over ranks equals the single-process gradient of the same global batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.layers import model_parts, unwrap

T = TypeVar("T")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call created the process group, so `cleanup` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str | None = None) -> World:
    """Join the torchrun process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, owns)


def device_for(world: World, requested: str | None) -> torch.device:
    """The rank's device: `requested`, else cuda:<local rank> when a GPU exists, else cpu."""
    if requested is not None:
        device = torch.device(requested)
        return torch.device("cuda", world.local_rank) if device.type == "cuda" and device.index is None \
            and world.distributed else device
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's contiguous share of `items` (whose length the world size divides)."""
    if len(items) % world.world_size:
        raise ValueError(f"{len(items)} micro-batches cannot be split evenly over {world.world_size} ranks")
    per_rank = len(items) // world.world_size
    return list(items[world.rank * per_rank:(world.rank + 1) * per_rank])


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only; frozen weights are neither broadcast nor reduced."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: `fully_shard` each decoder block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    base = unwrap(model)
    for block in model_parts(base).blocks:
        fully_shard(block)
    fully_shard(base)
    return model


def no_sync(module: nn.Module) -> Callable[[], AbstractContextManager] | None:
    """A context factory that suspends gradient reduction (all micro-steps but the last), or None."""
    if hasattr(module, "no_sync") and hasattr(module, "module"):
        return module.no_sync  # DDP
    if hasattr(module, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def fsdp_no_sync() -> Iterator[None]:
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return fsdp_no_sync
    return None


def mean_over_ranks(values: dict[str, float], keys: Sequence[str], world: World) -> dict[str, float]:
    """Average the named metrics over ranks so rank 0 logs the global batch, not its own share."""
    if not world.distributed:
        return values
    present = [k for k in keys if k in values]
    tensor = torch.tensor([float(values[k]) for k in present], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {**values, **{k: float(v) / world.world_size for k, v in zip(present, tensor.tolist())}}


def average_over_ranks(tensors: Sequence[torch.Tensor], world: World) -> None:
    """Replace each tensor, in place, by its mean over ranks (one all-reduce of them all, flattened).

    For gradients formed by hand rather than by a backward pass that DDP or FSDP would reduce.
    """
    if not world.distributed or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def full_state_dict(model: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective under FSDP: every rank must call it)."""
    if not world.distributed:
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def cleanup(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()
