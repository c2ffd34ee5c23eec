"""The one training loop (lens training, unlearning and the tamper attack) and its metrics log.

Data order is a pure function of the step (see `data.batch_indices`), so a resumed run only has
to restore parameters, optimiser state, RNG state and the step counter (`checkpoint`) to continue
exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.atomic import write_text_atomic
from ..core.errors import UserError
from .distributed import is_main_process
from .optim import MultiOptimizer, set_lr

if TYPE_CHECKING:
    from .tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss (the message names the settings to change)."""


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
    no_sync: Callable[[], AbstractContextManager] | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None
    checkpoint: Callable[[int], None] | None = None
    checkpoint_every: int = 0
    desc: str = "train"
    postfix: Sequence[str] = field(default_factory=tuple)
    # called after each step (and its on_step) with the number of steps done; True ends the run there
    stop: Callable[[int], bool] | None = None


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
            if spec.stop is not None and spec.stop(done):
                break
            if spec.checkpoint is not None and spec.checkpoint_every > 0 and done % spec.checkpoint_every == 0 \
                    and done < spec.total_steps:
                spec.checkpoint(done)
    finally:
        bar.close()
    return metrics


class MetricsLog:
    """Per-step metrics as JSONL; on resume, lines past the resumed step are dropped. Every line also goes
    to `tracker` (see `tracking`), when one is given, with its `step` as the step: the one place training
    metrics pass through, so a tracker holds what the file holds."""

    def __init__(self, path: Path, resume_step: int = 0, tracker: Tracker | None = None) -> None:
        self.path = Path(path)
        self.tracker = tracker
        self.enabled = is_main_process()
        if not self.enabled:
            return
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            if self.tracker is not None:
                self.tracker.log(metrics, int(metrics["step"]))
