"""Shared-direction projection of weight updates, after "Collapse of Irrelevant Representations (CIR)
Ensures Robust and Non-Disruptive LLM Unlearning" (https://arxiv.org/abs/2509.11816).

A linear layer's weight gradient is a sum over tokens of outer products, grad_W = sum_t g_t x_t^T
(g_t: the gradient at the layer's output, x_t: its input). Directions that the tokens' inputs (or
output gradients) share, such as their mean and top principal components over the forget tokens,
carry what the forget facts have in common with each other and with everything else (the template,
the relation). Removing them from each token's x_t and g_t before the outer products leaves an
update W' with W' v = 0 for every removed input direction v and u^T W' = 0 for every removed
output-gradient direction u, so the update acts on what is specific to each forget fact.

Here: which layers are projected (`mlp_linears`), the bases (`shared_basis` from vectors,
`Moments.basis` from running moments, `SharedDirections`), the moments of a window of forget
batches (`ForgetMoments`), the per-token capture during a forward pass (`TokenCapture`) and the
projected update (`projected_update`). Pure tensor code: the robust step (`robust_step`) decides
when to estimate and when to apply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..modeling.layers import block_mlp, unwrap

# Iterations of the randomised subspace method behind `shared_basis`. CIR runs torch.pca_lowrank
# with 16 on a GPU; on a CPU each one costs a pass over all captured tokens of every layer, and
# the leading components of activation spectra (which decay fast) settle within a few. Whatever
# basis comes out is removed exactly, so a less converged one changes which directions go, not
# whether the update is free of them.
PCA_ITERS = 4


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as [in, out] (y = x W + b); nn.Linear as [out, in]."""
    return not isinstance(module, nn.Linear)


def mlp_linears(model: nn.Module, blocks: Sequence[int]) -> dict[str, nn.Module]:
    """The linear layers of the MLP of each block in `blocks`, by their name in the unwrapped model."""
    base = unwrap(model)
    names = {module: name for name, module in base.named_modules()}
    found: dict[str, nn.Module] = {}
    for index in blocks:
        linears = {names[m]: m for m in block_mlp(base, index).modules() if _is_linear(m)}
        if not linears:
            raise ValueError(f"the MLP of block {index} of {type(base).__name__} has no linear layer")
        found.update(linears)
    return found


def shared_basis(vectors: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """An orthonormal basis [d, count] of the span of the mean of `vectors` [n, d] and their top
    `count - 1` principal components (CIR's "mean plus PCA components"), or [d, 0] for count 0.

    The components come from a randomised subspace iteration with its own seeded generator, so the
    result depends on the data and the seed only (not on torch's global random state). CIR removes
    the mean and each component one after another; they are not orthogonal to each other, so here
    the span is orthonormalised first and removed at once (`project_out`), which removes all of it.
    """
    n, d = vectors.shape
    if count > min(n, d):
        raise ValueError(f"{count} shared directions need at least {count} vectors of at least {count} dimensions, "
                         f"got {n} of {d}")
    x = vectors.float()
    if count == 0:
        return x.new_zeros(d, 0)
    mean = x.mean(dim=0)
    columns = [mean.unsqueeze(1)]
    if count > 1:
        columns.append(_top_components(x - mean, count - 1, seed))
    basis, _ = torch.linalg.qr(torch.cat(columns, dim=1))
    return basis


def _top_components(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The top `count` right singular vectors [d, count] of centred `x` [n, d] (randomised, with oversampling)."""
    n, d = x.shape
    width = min(count + 8, n, d)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(d, width, generator=generator).to(x.device)
    q, _ = torch.linalg.qr(x @ probe)
    for _ in range(PCA_ITERS):
        z, _ = torch.linalg.qr(x.T @ q)
        q, _ = torch.linalg.qr(x @ z)
    _, _, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return vh[:count].T


def top_eigenvectors(matrix: torch.Tensor, count: int, seed: int = 0, iters: int = 16) -> torch.Tensor:
    """The `count` leading eigenvectors [d, count] of a symmetric positive semi-definite `matrix` [d, d]
    (a covariance), by randomised subspace iteration with its own seeded generator and a final
    Rayleigh-Ritz step. `iters` is CIR's `niter` (16): on a d x d matrix each one is a cheap product."""
    d = matrix.shape[0]
    width = min(count + 8, d)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(matrix @ torch.randn(d, width, generator=generator).to(matrix))
    for _ in range(iters):
        q, _ = torch.linalg.qr(matrix @ q)
    values, vectors = torch.linalg.eigh(q.T @ matrix @ q)
    order = torch.argsort(values, descending=True)[:count]
    return q @ vectors[:, order]


class Moments:
    """Count, mean and scatter (the sum of (x - mean)(x - mean)^T) of vectors added in batches.

    Batches are merged with the pairwise update of Chan, Golub and LeVeque, which never subtracts two
    large sums from each other, so a float32 covariance of activations with a large mean stays
    accurate. Memory is one d x d matrix whatever the number of vectors: a pass over the forget set
    of the embedded model (10^4 tokens) would take 50 times more as stored vectors.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of `x` [n, d]."""
        if x.shape[0] == 0:
            return
        x = x.detach().float()
        n, mean = x.shape[0], x.mean(dim=0)
        centred = x - mean
        self._merge(n, mean, centred.T @ centred)

    def _merge(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        if self.mean is None:
            self.count, self.mean, self.scatter = n, mean.clone(), scatter.clone()
            return
        total = self.count + n
        delta = mean - self.mean
        self.scatter.add_(scatter).add_(torch.outer(delta, delta), alpha=self.count * n / total)
        self.mean.add_(delta, alpha=n / total)
        self.count = total

    def merge_over_ranks(self, world) -> None:
        """Combine every rank's moments into the moments of all their vectors, on every rank."""
        from ..train.distributed import average_over_ranks

        if not world.distributed or self.mean is None:
            return
        size = world.world_size
        count = torch.tensor([float(self.count)])
        average_over_ranks([count], world)
        total = count.item() * size
        weighted = self.mean * (self.count / total)
        average_over_ranks([weighted], world)
        mean = weighted * size
        # each rank's scatter about the common mean, summed over ranks
        delta = self.mean - mean
        scatter = self.scatter + self.count * torch.outer(delta, delta)
        average_over_ranks([scatter], world)
        self.count, self.mean, self.scatter = round(total), mean, scatter * size

    def basis(self, count: int, seed: int = 0) -> torch.Tensor:
        """Orthonormal basis [d, count] of the span of the mean and the top `count - 1` principal
        components (as `shared_basis`, from the moments instead of the vectors)."""
        if self.mean is None:
            raise ValueError("no vectors were added: cannot estimate directions")
        d = self.mean.shape[0]
        if count > min(self.count, d):
            raise ValueError(f"{count} shared directions need at least {count} vectors of at least {count} "
                             f"dimensions, got {self.count} of {d}")
        if count == 0:
            return self.mean.new_zeros(d, 0)
        columns = [self.mean.unsqueeze(1)]
        if count > 1:
            columns.append(top_eigenvectors(self.scatter / self.count, count - 1, seed))
        basis, _ = torch.linalg.qr(torch.cat(columns, dim=1))
        return basis

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": None if self.mean is None else self.mean.cpu(),
                "scatter": None if self.scatter is None else self.scatter.cpu()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.count = int(state["count"])
        self.mean = None if state["mean"] is None else state["mean"].to(device)
        self.scatter = None if state["scatter"] is None else state["scatter"].to(device)


def project_out(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Each row of `x` [n, d] minus its component in the span of `basis` [d, k] (orthonormal columns)."""
    if basis is None or basis.shape[1] == 0:
        return x
    return x - (x @ basis) @ basis.T


def projected_update(acts: torch.Tensor, grads: torch.Tensor, act_basis: torch.Tensor | None,
                     grad_basis: torch.Tensor | None, transposed: bool = False) -> torch.Tensor:
    """sum_t P_g g_t (P_a x_t)^T for per-token inputs `acts` [n, in] and output gradients `grads` [n, out]:
    the layer's weight gradient with the shared directions removed ([out, in]; [in, out] if `transposed`).
    With empty bases it is the ordinary weight gradient of those tokens."""
    a, g = project_out(acts.float(), act_basis), project_out(grads.float(), grad_basis)
    return a.T @ g if transposed else g.T @ a


class TokenCapture:
    """Per-token inputs and outputs of some linear layers during forward passes inside `capture(mask)`.

    Only tokens where `mask` [batch, seq] is nonzero are kept (CIR leaves out padding and the first
    tokens). The inputs are detached copies; the outputs stay in the graph, so the caller takes the
    gradient of a loss with respect to them (`output_grads`): the weights' own gradients are never
    formed. Layers that share one input tensor (a gated MLP's gate and up projections) share one copy.
    Hooks are removed on exit.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.acts: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self, mask: torch.Tensor) -> Iterator[TokenCapture]:
        self.acts = {name: [] for name in self.modules}
        self.outputs = {name: [] for name in self.modules}
        self._mask = mask.bool()
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(input) -> (input, its kept rows)

        def make_hook(name: str):
            def hook(_module, args, output):
                if not output.requires_grad:  # a no-grad pass: nothing to differentiate
                    return
                x = args[0]
                if x.shape[:2] != self._mask.shape:
                    raise RuntimeError(f"{name}: input of shape {tuple(x.shape)} does not match the token mask "
                                       f"{tuple(self._mask.shape)}")
                if id(x) not in shared:
                    shared[id(x)] = (x, x.detach()[self._mask.to(x.device)].float())
                self.acts[name].append(shared[id(x)][1])
                self.outputs[name].append(output)
            return hook

        handles = [module.register_forward_hook(make_hook(name)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._mask = None

    def output_grads(self, loss: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(kept inputs, kept output gradients) of each forward call of each layer, for `loss`; call it
        inside `capture`. The graph is freed (as by `backward`)."""
        if self._mask is None:
            raise RuntimeError("output_grads needs the token mask: call it inside capture(mask)")
        keys = [(name, i) for name, outs in self.outputs.items() for i in range(len(outs))]
        outputs = [self.outputs[name][i] for name, i in keys]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True) if outputs else ()
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in self.modules}
        for (name, i), grad in zip(keys, grads, strict=True):
            if grad is not None:  # None: the loss does not depend on this call (a pass stopped before it)
                pairs[name].append((self.acts[name][i], grad[self._mask.to(grad.device)].float()))
        self.outputs = {name: [] for name in self.modules}
        return pairs


class SharedDirections:
    """The bases removed from each projected layer's per-token inputs and output gradients."""

    def __init__(self, modules: Mapping[str, nn.Module], act_count: int, grad_count: int) -> None:
        self.modules = dict(modules)
        self.act_count, self.grad_count = act_count, grad_count
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def estimate(self, samples: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]], seed: int = 0) -> None:
        """New bases from (inputs, output gradients) pairs of every layer, e.g. over general text."""
        bases = {}
        for index, (name, pairs) in enumerate(samples.items()):
            if not pairs:
                raise ValueError(f"no tokens reached {name}: cannot estimate its shared directions")
            acts = torch.cat([a for a, _ in pairs])
            grads = torch.cat([g for _, g in pairs])
            bases[name] = (shared_basis(acts, self.act_count, seed * 7919 + 2 * index),
                           shared_basis(grads, self.grad_count, seed * 7919 + 2 * index + 1))
        self.bases = bases

    def estimate_from_moments(self, moments: Mapping[str, tuple[Moments, Moments]], seed: int = 0) -> None:
        """New bases from the moments of each layer's (inputs, output gradients), e.g. over a pass of forget
        batches (`ForgetMoments`)."""
        bases = {}
        for index, (name, module) in enumerate(self.modules.items()):
            acts, grads = moments[name]
            if not acts.count:  # the forget loss does not reach this layer (it sits past the loss): nothing to remove
                d_out, d_in = module.weight.shape if not is_transposed(module) else module.weight.shape[::-1]
                bases[name] = (module.weight.new_zeros(d_in, 0, dtype=torch.float32),
                               module.weight.new_zeros(d_out, 0, dtype=torch.float32))
                continue
            bases[name] = (acts.basis(self.act_count, seed * 7919 + 2 * index),
                           grads.basis(self.grad_count, seed * 7919 + 2 * index + 1))
        self.bases = bases

    def update(self, name: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """The projected weight gradient of layer `name` from its (inputs, output gradients) pairs."""
        if not pairs:
            return None
        act_basis, grad_basis = self.bases[name]
        transposed = is_transposed(self.modules[name])
        return sum(projected_update(a, g, act_basis.to(a.device), grad_basis.to(g.device), transposed)
                   for a, g in pairs)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"act": {n: a.cpu() for n, (a, _) in self.bases.items()},
                "grad": {n: g.cpu() for n, (_, g) in self.bases.items()}}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if set(state["act"]) != set(self.modules):
            raise ValueError("the checkpoint's shared directions are for other layers than this run projects: "
                             "resume with the same --cir_blocks and model, or start over with --overwrite")
        self.bases = {n: (state["act"][n], state["grad"][n]) for n in self.modules}


class ForgetMoments:
    """The moments of every projected layer's per-token inputs and output gradients over the forget
    batches of one collection window (CIR gathers them over an epoch as it trains): fed with the pairs
    `TokenCapture.output_grads` returns for each forget micro-batch, so they cost no extra pass."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.reset()

    def reset(self) -> None:
        self.moments = {name: (Moments(), Moments()) for name in self.names}

    @property
    def tokens(self) -> int:
        """Tokens added so far (per layer; every layer sees the same tokens)."""
        return self.moments[self.names[0]][0].count if self.names else 0

    def add(self, pairs: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        for name, calls in pairs.items():
            acts, grads = self.moments[name]
            for a, g in calls:
                acts.add(a)
                grads.add(g)

    def merge_over_ranks(self, world) -> None:
        for acts, grads in self.moments.values():
            acts.merge_over_ranks(world)
            grads.merge_over_ranks(world)

    def state_dict(self) -> dict:
        return {name: (a.state_dict(), g.state_dict()) for name, (a, g) in self.moments.items()}

    def load_state_dict(self, state: Mapping, device: torch.device | str = "cpu") -> None:
        if set(state) != set(self.names):
            raise ValueError("the checkpoint's forget-token moments are for other layers than this run projects: "
                             "resume with the same blocks and model, or start over with --overwrite")
        for name, (a, g) in state.items():
            self.moments[name][0].load_state_dict(a, device)
            self.moments[name][1].load_state_dict(g, device)
