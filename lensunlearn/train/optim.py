"""Optimisers, schedules and their options, shared by lens training, unlearning and the tamper attack.

The one Muon split: 2-D hidden matrices (LoRA A and B included) go to `torch.optim.Muon`, with
`adjust_lr_fn="match_rms_adamw"` so AdamW learning rates carry over; embeddings, the
unembedding, norms and biases go to AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..modeling.loading import fast_matmul_dtype
from .options import DEFAULT_MOMENTUM, SCHEDULES, OptimizerName, ScheduleName, TrainingOptions  # noqa: F401

# Param-group settings that pick how a step is computed, not what it computes.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


class MultiOptimizer:
    """Several optimisers stepped as one (Muon for matrices plus AdamW for the rest)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, sub in zip(self.optimizers, state["optimizers"], strict=True):
            # torch takes every group setting from the saved state, including which implementation
            # runs the step; a checkpoint from another torch or device would otherwise choose it
            # (say, the slow unfused loop): the live optimiser's choice is kept, the numbers are loaded
            chosen = [{k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in opt.param_groups]
            opt.load_state_dict(sub)
            for group, flags in zip(opt.param_groups, chosen, strict=True):
                group.update(flags)


def orthogonalise(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Muon's Newton-Schulz orthogonalisation of a 2-D update. In bfloat16 it is torch's own function (the
    numbers `torch.optim.Muon` computes). In a wider dtype it is the same map computed through the Gram
    matrix's eigendecomposition (`newton_schulz_spectral`), which falls back to the iteration itself
    (`newton_schulz`) where the eigensolver fails."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    if dtype == torch.bfloat16:
        return _zeropower_via_newtonschulz(update, coefficients, steps, eps)
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    x = (x.T if tall else x) / x.norm().clamp(min=eps)
    try:
        out = newton_schulz_spectral(x, coefficients, steps)
    except torch.linalg.LinAlgError:  # eigh does not converge on non-finite or pathological input
        out = newton_schulz(x, coefficients, steps)
    return out.T if tall else out


def newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int) -> torch.Tensor:
    """The iteration as Muon runs it, on a wide matrix scaled to norm at most 1: `steps` times
    X <- aX + (bG + cG^2)X with G = XX^T."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def newton_schulz_spectral(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int) -> torch.Tensor:
    """`newton_schulz` through one eigendecomposition of G = XX^T: the same map with fewer products.

    Each step multiplies X by p(G) = aI + bG + cG^2, a polynomial in G, so after k steps X_k = R_k X with R_k
    a function of the first G alone. On an eigenvalue l of G the recursion is scalar: r <- r p(l) and
    l <- l p(l)^2 (the new Gram is p(G) G p(G)). One m x m eigensolve and three matrix products replace
    the iteration's fifteen products, two thirds of them m x m x n. The result agrees with the iteration
    in exact arithmetic, and in float32 within a few 1e-6 of the float64 iteration, far finer than the
    bfloat16 rounding of torch's own Muon."""
    a, b, c = coefficients
    # float64 for the m x m part: a float32 eigensolver's vectors are orthogonal only to about 1e-6, which
    # the large r of small eigenvalues amplifies to bfloat16-sized errors; in float64 the result is within
    # a few 1e-6 of the float64 iteration, and the eigensolve is still small beside two m x m x n products
    eigenvalues, vectors = torch.linalg.eigh((x @ x.T).double())
    lam = eigenvalues.clamp(min=0)  # G is positive semi-definite up to rounding
    r = torch.ones_like(lam)
    for _ in range(steps):
        p = a + b * lam + c * lam * lam
        r, lam = r * p, lam * p * p
    return ((vectors * r) @ vectors.T).to(x.dtype) @ x


class ShardedMuon(torch.optim.Muon):
    """`torch.optim.Muon`, step for step, where torch's own cannot run or runs slowly.

    - Matrices sharded by FSDP2 (DTensors): Muon orthogonalises each update as a whole matrix, which a
      rank holding some rows cannot do. Here the momentum stays sharded (it is elementwise), the update
      is gathered, orthogonalised identically on every rank, and each rank applies its own rows, so a
      sharded run follows a single-process run.
    - CPUs without native bfloat16 (`ns_dtype=torch.float32`): torch orthogonalises in bfloat16, which
      such a CPU emulates: on an AVX2 CPU one 576x576 orthogonalisation took 2.3 s, about 15 times its
      float32 time, and the robust preset orthogonalises 87 larger MLP matrices a step. In float32 the
      same map runs through one eigendecomposition (`newton_schulz_spectral`), the fastest of the three
      there.
    """

    def __init__(self, params, *args, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor, distribute_tensor
        from torch.optim._muon import _adjust_lr

        if closure is not None:
            raise ValueError("ShardedMuon.step takes no closure")
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                ortho = orthogonalise(whole, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                if isinstance(param, DTensor):
                    ortho = distribute_tensor(ortho, param.device_mesh, param.placements, src_data_rank=None)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(ortho, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], param.shape))
        return None


def is_sharded(tensor: object) -> bool:
    """Whether `tensor` is a DTensor (a parameter or state sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def split_for_muon(named_params: Iterable[tuple[str, nn.Parameter]], exclude: Iterable[nn.Parameter] = ()
                   ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon params, AdamW params): 2-D matrices not in `exclude` (embeddings, unembedding) go to Muon."""
    excluded = {id(p) for p in exclude}
    muon, adamw = [], []
    for _, param in named_params:
        if not param.requires_grad:
            continue
        (muon if param.ndim == 2 and id(param) not in excluded else adamw).append(param)
    return muon, adamw


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Input and output embedding weights, which Muon must not take."""
    params = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            params.extend(module.parameters())
    return params


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for these parameters.

    The default implementation loops over parameters with several elementwise passes each; the
    fused one makes a single pass, which on a CPU took a full-parameter step of the 135M embedded
    model from 0.44 s to 0.12 s (`benchmarks/adamw_cpu.py`). Sharded (FSDP2) parameters, devices
    without a fused kernel and non-float parameters keep the default: the update is the same.
    """
    fusable = all(p.is_floating_point() and not is_sharded(p) and p.device.type in ("cpu", "cuda")
                  for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fusable or None)


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], name: OptimizerName, lr: float,
                    weight_decay: float, exclude_from_muon: Iterable[nn.Parameter] = (),
                    momentum: float | None = None) -> MultiOptimizer:
    """AdamW, Muon (+AdamW for the rest) or SGD over the trainable params. `momentum` None takes
    `DEFAULT_MOMENTUM`; SGD uses Nesterov momentum when it is above 0 and is plain SGD at 0."""
    named_params = [(n, p) for n, p in named_params if p.requires_grad]
    if not named_params:
        raise ValueError("no trainable parameters: nothing to optimise")
    params = [p for _, p in named_params]
    if momentum is None:
        momentum = DEFAULT_MOMENTUM.get(name, 0.0)
    if name == "adamw":
        return MultiOptimizer([adamw(params, lr, weight_decay)])
    if name == "sgd":
        return MultiOptimizer([torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                                               weight_decay=weight_decay)])
    if name == "muon":
        matrices, rest = split_for_muon(named_params, exclude_from_muon)
        optimizers: list[torch.optim.Optimizer] = []
        if matrices:
            settings = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")
            ns_dtype = fast_matmul_dtype(torch.bfloat16, matrices[0].device, "Muon's orthogonalisation")
            if any(is_sharded(p) for p in matrices) or ns_dtype != torch.bfloat16:
                optimizers.append(ShardedMuon(matrices, ns_dtype=ns_dtype, **settings))
            else:
                optimizers.append(torch.optim.Muon(matrices, **settings))
        if rest:
            optimizers.append(adamw(rest, lr, weight_decay))
        return MultiOptimizer(optimizers)
    raise ValueError(f"unknown optimizer {name!r}: use adamw, muon or sgd")


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "linear") -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): warmup, then constant/linear/cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}: use constant, linear or cosine")


def set_lr(optimizer: MultiOptimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
