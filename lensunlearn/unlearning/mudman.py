"""Disruption masking, gradient normalisation and a relearning adversary: the parts of meta-unlearning.

An unlearning update is kept only where it moves a weight the same way the retain gradient does
(`disruption_mask`), it is rescaled to a fixed global norm (`normalise_grads`), and it is taken at
an attacked fork of the weights: a simulated attacker fine-tunes the fork on forget text for a few
steps, so the unlearning gradient pushes against what relearning would restore (`Adversary`).

After MUDMAN (Sondej et al. 2025). The values it settled on, which are this module's defaults:
the attacker is plain SGD with learning rate 1e-3, it takes one step per unlearning step and is
re-forked from the trained weights every 32 of its steps; the unlearning gradient's global L2 norm
is measured before masking and the gradient rescaled by it. MUDMAN keeps the fork as a separate
copy of the weights that stays where it was forked; here the fork is the trained weights plus an
attacker offset (`delta`), so it follows the unlearning updates made since the fork.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..train.loop import NonFiniteLossError

Batch = Mapping[str, torch.Tensor]
AttackerOptimizer = Literal["sgd", "adam"]

# ------------------------------------------------------------------------------------------ masking


def disruption_mask(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """`forget` with every element zeroed where its sign differs from `retain`'s (a zero `retain` masks too).

    Both are gradients of losses being minimised, so equal signs mean the unlearning update and the
    retain update move that weight the same way; elsewhere unlearning would disrupt retained ability.
    """
    if forget.shape != retain.shape:
        raise ValueError(f"forget gradient has shape {tuple(forget.shape)} but retain has {tuple(retain.shape)}")
    return forget.masked_fill(torch.sign(forget) != torch.sign(retain), 0)


def mask_grads(forget: Mapping[str, torch.Tensor], retain: Mapping[str, torch.Tensor], *,
               inplace: bool = False) -> dict[str, torch.Tensor]:
    """`disruption_mask` per parameter name; `inplace` overwrites the `forget` tensors instead of copying.

    MUDMAN masks against an exponential moving average of the retain gradients (momentum 0.9 to 0.95),
    not the last retain batch alone, so one noisy batch does not decide the mask.
    """
    if set(forget) != set(retain):
        missing, extra = sorted(set(forget) - set(retain)), sorted(set(retain) - set(forget))
        raise ValueError(f"forget and retain gradients name different parameters: only in forget {missing}, "
                         f"only in retain {extra}")
    if not inplace:
        return {name: disruption_mask(g, retain[name]) for name, g in forget.items()}
    for name, g in forget.items():
        if g.shape != retain[name].shape:
            raise ValueError(f"{name}: forget gradient has shape {tuple(g.shape)} but retain has "
                             f"{tuple(retain[name].shape)}")
        g.masked_fill_(torch.sign(g) != torch.sign(retain[name]), 0)
    return dict(forget)


def global_norm(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together, in float32, on the first tensor's device."""
    tensors = list(grads.values())
    device = tensors[0].device
    squares = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) ** 2 for g in tensors]
    return torch.stack(squares).sum().sqrt()


def normalise_grads(grads: Mapping[str, torch.Tensor], norm: float | None = None, *, eps: float = 1e-12,
                    inplace: bool = False) -> dict[str, torch.Tensor]:
    """Rescale all gradients by one factor so their global L2 norm is `norm`; the direction is unchanged.

    `norm=None` means sqrt(number of elements): a root-mean-square of 1 per element, so one
    unlearning rate suits LoRA adapters and full weights alike (MUDMAN's experiments do this;
    its minimal example uses `norm=1`). The norm is global over all tensors, as in MUDMAN, not per
    tensor. Call it before `mask_grads`: MUDMAN measures the norm of the unmasked gradient, and a
    positive factor does not change which signs the mask keeps. A gradient whose norm is at most
    `eps` comes back as zeros rather than blown up by a huge factor.
    """
    if not grads:
        raise ValueError("normalise_grads needs at least one gradient")
    if norm is not None and not norm > 0:
        raise ValueError(f"the target norm must be positive, got {norm}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    target = math.sqrt(sum(g.numel() for g in grads.values())) if norm is None else float(norm)
    total = global_norm(grads)
    # a tensor factor, not .item(): no device sync on an accelerator
    factor = torch.where(total > eps, target / total.clamp_min(max(eps, torch.finfo(torch.float32).tiny)),
                         torch.zeros_like(total))
    if inplace:
        for g in grads.values():
            g.mul_(factor.to(device=g.device, dtype=g.dtype))
        return dict(grads)
    return {name: g * factor.to(device=g.device, dtype=g.dtype) for name, g in grads.items()}


# ---------------------------------------------------------------------------------------- adversary


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of `model` on a collated batch, padding (attention_mask 0) ignored."""
    device = getattr(model, "device", None)
    if not isinstance(device, torch.device):  # a DDP wrapper has no .device
        device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


class Adversary:
    """A simulated attacker that fine-tunes an offset (`delta`) of the trainable tensors on forget text.

    `applied()` puts the attacked fork (trained + delta) into the parameters for the body of a
    `with` block and restores the trained weights bitwise on exit; gradients taken inside stay in
    the parameters' `.grad`, so the caller's optimiser applies the gradient of the attacked fork to
    the trained weights. `relearn` takes one attacker step and leaves `.grad` as it found it;
    every `steps_per_fork` steps it first re-forks (`reset`): delta and attacker state back to zero.

    The attacker's optimiser is its own: plain SGD by default, as in MUDMAN (no state), or Adam
    (betas, eps below; its moments restart at every fork). `decay` < 1 shrinks delta after each
    step, MUDMAN's pull of the fork back towards the trained weights (it searched 0.3 to 1).
    Memory: delta (one copy of the trainable tensors, in their dtype) and, for Adam, two float32
    moments; while `applied()` is open also a copy of the trained weights, which is what makes the
    restore bitwise (trained + delta - delta is not the trained weights in floating point).

    `loss_fn(batch)` is the relearning loss of the model as it currently is (`lm_loss` on forget
    text). Nothing here draws random numbers, so the steps are as deterministic as `loss_fn`.
    Every rank must keep the same delta: if `loss_fn`'s backward goes through DDP it is averaged
    already; otherwise pass `reduce_grads`, called in place on the attacker's gradients before each
    step (e.g. an all-reduce mean over ranks).
    """

    def __init__(self, params: Mapping[str, nn.Parameter], loss_fn: Callable[[Batch], torch.Tensor],
                 lr: float = 1e-3, steps_per_fork: int = 32, *, optimizer: AttackerOptimizer = "sgd",
                 decay: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 reduce_grads: Callable[[list[torch.Tensor]], None] | None = None) -> None:
        if not params:
            raise ValueError("the adversary needs at least one trainable parameter")
        frozen = [name for name, p in params.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"the adversary can only move parameters that require grad; frozen: {frozen[:5]}")
        if not lr > 0:
            raise ValueError(f"the attacker's learning rate must be positive, got {lr}")
        if steps_per_fork < 1:
            raise ValueError(f"steps_per_fork must be at least 1, got {steps_per_fork}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"the attacker's optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.loss_fn = loss_fn
        self.lr, self.steps_per_fork, self.optimizer, self.decay = lr, steps_per_fork, optimizer, decay
        self.betas, self.eps, self.reduce_grads = betas, eps, reduce_grads
        self._delta = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        adam = optimizer == "adam"
        self._exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if adam else []
        self._exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if adam else []
        self.steps_since_fork = 0
        self._saved: list[torch.Tensor] | None = None  # the trained weights while applied() is open

    @property
    def delta(self) -> dict[str, torch.Tensor]:
        """The attacker's offset per parameter name (live tensors: read, do not write)."""
        return dict(zip(self.names, self._delta, strict=True))

    @torch.no_grad()
    def reset(self) -> None:
        """Fork again: the attacked copy starts at the trained weights, with fresh attacker state."""
        for t in self._delta + self._exp_avg + self._exp_avg_sq:
            t.zero_()
        self.steps_since_fork = 0
        if self._saved is not None:
            for p, trained in zip(self.params, self._saved, strict=True):
                p.copy_(trained)

    @contextlib.contextmanager
    def applied(self) -> Iterator[Adversary]:
        """Parameters hold trained + delta inside; on exit, also on an exception, exactly the trained weights."""
        if self._saved is not None:
            raise RuntimeError("Adversary.applied() is already open; it does not nest")
        self._saved = [p.detach().clone() for p in self.params]
        try:
            self._write_fork()
            yield self
        finally:
            with torch.no_grad():
                for p, trained in zip(self.params, self._saved, strict=True):
                    p.copy_(trained)
            self._saved = None

    @torch.no_grad()
    def _write_fork(self) -> None:
        assert self._saved is not None
        for p, trained, d in zip(self.params, self._saved, self._delta, strict=True):
            p.copy_(trained).add_(d)

    def relearn(self, batch: Batch | Sequence[Batch]) -> float:
        """One attacker step on `batch` (or micro-batches, averaged) at the fork; returns the mean loss.

        Re-forks first when `steps_per_fork` steps have been taken since the last fork. The
        parameters' `.grad` is the same before and after (the attacker's gradient never reaches
        the unlearning optimiser). Inside `applied()` the parameters then hold the new fork.
        """
        if self.steps_since_fork >= self.steps_per_fork:
            self.reset()
        if self._saved is None:
            with self.applied():
                return self._relearn(batch)
        return self._relearn(batch)

    def _relearn(self, batch: Batch | Sequence[Batch]) -> float:
        micro = [batch] if isinstance(batch, Mapping) else list(batch)
        if not micro:
            raise ValueError("relearn needs at least one batch")
        stashed = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            total = 0.0
            for b in micro:
                loss = self.loss_fn(b)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the simulated attacker's loss became {loss.item()} after {self.steps_since_fork} steps "
                        f"since the fork: lower the attacker's learning rate")
                (loss / len(micro)).backward()
                total += loss.item()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
            if self.reduce_grads is not None:
                self.reduce_grads(grads)
            self._step(grads)
        finally:
            for p, g in zip(self.params, stashed, strict=True):
                p.grad = g
        self.steps_since_fork += 1
        self._write_fork()
        return total / len(micro)

    @torch.no_grad()
    def _step(self, grads: list[torch.Tensor]) -> None:
        if self.optimizer == "sgd":
            for d, g in zip(self._delta, grads, strict=True):
                d.sub_(g.to(d.dtype), alpha=self.lr)
        else:
            beta1, beta2 = self.betas
            step = self.steps_since_fork + 1  # Adam's bias correction counts from the fork
            correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
            for d, g, m, v in zip(self._delta, grads, self._exp_avg, self._exp_avg_sq, strict=True):
                g32 = g.to(torch.float32)
                m.mul_(beta1).add_(g32, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
                update = (m / correction1) / ((v / correction2).sqrt_().add_(self.eps))
                d.sub_(update.to(d.dtype), alpha=self.lr)
        if self.decay != 1.0:
            for d in self._delta:
                d.mul_(self.decay)

    def state_dict(self) -> dict[str, Any]:
        """Delta, attacker moments and the step count since the fork, as copies (safe to keep)."""
        state: dict[str, Any] = {"optimizer": self.optimizer, "steps_since_fork": self.steps_since_fork,
                                 "delta": {n: d.detach().clone() for n, d in zip(self.names, self._delta)}}
        if self.optimizer == "adam":
            state["exp_avg"] = {n: m.clone() for n, m in zip(self.names, self._exp_avg)}
            state["exp_avg_sq"] = {n: v.clone() for n, v in zip(self.names, self._exp_avg_sq)}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned, onto this adversary's devices; checked before anything changes."""
        if self._saved is not None:
            raise RuntimeError("load the adversary's state outside applied()")
        if state.get("optimizer") != self.optimizer:
            raise ValueError(f"the saved adversary used optimizer {state.get('optimizer')!r}, this one "
                             f"{self.optimizer!r}")
        groups = [("delta", self._delta)]
        if self.optimizer == "adam":
            groups += [("exp_avg", self._exp_avg), ("exp_avg_sq", self._exp_avg_sq)]
        for key, tensors in groups:
            saved = state[key]
            if set(saved) != set(self.names):
                raise ValueError(f"the saved adversary's {key} names other parameters than this one's "
                                 f"(saved {len(saved)}, here {len(self.names)})")
            for name, t in zip(self.names, tensors, strict=True):
                if saved[name].shape != t.shape:
                    raise ValueError(f"the saved adversary's {key} for {name} has shape "
                                     f"{tuple(saved[name].shape)}, the parameter {tuple(t.shape)}")
        for key, tensors in groups:
            for name, t in zip(self.names, tensors, strict=True):
                t.copy_(state[key][name])
        self.steps_since_fork = int(state["steps_since_fork"])
