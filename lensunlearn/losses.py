"""Loss functions as small tensor functions, and the token chunking that bounds their memory.

Full-vocabulary losses never hold [tokens, vocab] logits for a whole batch: `chunked_token_sum`
evaluates a per-token loss over slices of tokens under activation checkpointing, so forward and
backward peak memory is one chunk's logits.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is nonzero (shapes broadcast)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def select_tokens(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of [batch, seq, d] (or [batch, seq]) at real (non-padding) tokens, flattened."""
    return h[mask.bool()]


class _WithGradients(torch.autograd.Function):
    """A scalar whose gradients with respect to `inputs` were already computed in forward."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: tuple, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return (None, None, *[None if g is None else g * grad_out for g in ctx.grads])


def chunked_token_sum(per_token: Callable[..., torch.Tensor], *tensors: torch.Tensor,
                      chunk: int = DEFAULT_CHUNK, frozen: bool = False) -> torch.Tensor:
    """Sum of `per_token(*slices)` over token slices of at most `chunk` rows.

    `tensors` share their first dimension (tokens); only one slice's intermediates (e.g. [chunk,
    vocab] logits) are alive at once. By default each slice runs under activation checkpointing
    and is recomputed in backward. With `frozen=True` (`per_token` has no trainable parameters of
    its own) each slice's gradient with respect to the tensors is computed right away and kept
    ([tokens, d], small), which saves the recomputation: one forward and one backward per slice.
    """
    n = tensors[0].shape[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad:
        with torch.no_grad():
            return sum((per_token(*[t[s:s + chunk] for t in tensors]).float().sum() for s in range(0, n, chunk)),
                       tensors[0].new_zeros((), dtype=torch.float32))
    if frozen:
        return _precomputed_sum(per_token, tensors, chunk)
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        parts = [t[start:start + chunk] for t in tensors]
        total = total + checkpoint(lambda *xs: per_token(*xs).float().sum(), *parts, use_reentrant=False)
    return total


def _precomputed_sum(per_token: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor],
                     chunk: int) -> torch.Tensor:
    wants = [t.requires_grad for t in tensors]
    grads = [torch.zeros_like(t) if w else None for t, w in zip(tensors, wants)]
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for start in range(0, tensors[0].shape[0], chunk):
        parts = [t[start:start + chunk].detach().requires_grad_(w) for t, w in zip(tensors, wants)]
        with torch.enable_grad():
            value = per_token(*parts).float().sum()
            chunk_grads = torch.autograd.grad(value, [p for p, w in zip(parts, wants) if w])
        for grad, part_grad in zip([g for g in grads if g is not None], chunk_grads):
            grad[start:start + chunk] = part_grad
        total = total + value.detach()
    return _WithGradients.apply(total, tuple(grads), *tensors)


def kl_from_logits(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_target || q) in nats, from unnormalised logits (float32)."""
    target = F.log_softmax(target_logits.float(), dim=-1)
    pred = F.log_softmax(logits.float(), dim=-1)
    return (target.exp() * (target - pred)).sum(-1)


def lens_kl(lens, layers: Sequence[int], streams: torch.Tensor, h_final: torch.Tensor,
            chunk: int = DEFAULT_CHUNK, backward_scale: float | None = None) -> torch.Tensor:
    """Per-layer summed token KL(p_model || q_lens_l), shape [len(layers)].

    `streams` is [tokens, len(layers), d]; `h_final` is [tokens, d], the final pre-norm stream.
    The model's distribution is the frozen unembedding of `h_final`, computed once per chunk of
    tokens and shared by all layers; no logits outlive their chunk. The streams carry no graph
    (the model is frozen), so with `backward_scale` set each chunk's gradient is accumulated at
    once (scaled) and the returned sums are detached: memory stays one chunk, with no recompute.
    Without it, chunks are checkpointed and recomputed in backward.
    """
    n = streams.shape[0]
    sums: list[torch.Tensor] = [streams.new_zeros((), dtype=torch.float32) for _ in layers]
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in lens.parameters())
    for start in range(0, n, chunk):
        h_chunk = streams[start:start + chunk]
        with torch.no_grad():
            target = F.log_softmax(lens.decode(h_final[start:start + chunk].float()), dim=-1)
            target_p = target.exp()
            entropy_term = (target_p * target).sum()

        def per_layer(h: torch.Tensor, layer: int) -> torch.Tensor:
            pred = F.log_softmax(lens(h, layer), dim=-1)
            return entropy_term - (target_p * pred).sum()

        for i, layer in enumerate(layers):
            if not needs_grad:
                value = per_layer(h_chunk[:, i], layer)
            elif backward_scale is not None:
                value = per_layer(h_chunk[:, i], layer)
                (value * backward_scale).backward()
                value = value.detach()
            else:
                value = checkpoint(per_layer, h_chunk[:, i], layer, use_reentrant=False)
            sums[i] = sums[i] + value
    return torch.stack(sums)


# --- Unlearning losses (SPEC section 4) ---------------------------------------------------------


def uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against the uniform distribution over the vocabulary, in nats.

    `logsumexp(z) - mean(z)` is the exact expectation of the cross-entropy against a uniformly random
    token; it is >= ln V, with equality exactly when the logits are constant.
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.mean(dim=-1)


def random_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against given (randomly sampled) target tokens: the reference's estimator."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def retain_l2(h: torch.Tensor, h_original: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm (not squared) of the difference between updated and original streams."""
    return (h.float() - h_original.float()).norm(dim=-1)


def retain_kl(original_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_original || p_updated) of output distributions, in nats."""
    return kl_from_logits(original_logits, logits)


def random_targets(num_tokens: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Uniform random token ids from their own seeded generator (rank- and resume-independent)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=generator)


def lens_forget_loss(lens, layers: Sequence[int], streams: Sequence[torch.Tensor],
                     targets: Sequence[torch.Tensor] | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The forget loss: mean over tokens and layers of the lens cross-entropy, divided by ln V.

    `streams[i]` is [tokens, d], stream `layers[i]` at the forget batch's real tokens. With
    `targets` None the target is uniform (`uniform_ce`), else `targets[i]` holds one sampled token per
    row (`random_ce`), which has the same expectation. Logits exist for one chunk of tokens of one
    layer at a time (recomputed in backward, or, with a frozen lens, differentiated at once), so
    peak memory is [chunk, V].
    """
    if len(streams) != len(layers) or (targets is not None and len(targets) != len(layers)):
        raise ValueError(f"need one stream (and target set) per layer: {len(layers)} layers, {len(streams)} streams")
    num_tokens = streams[0].shape[0]
    vocab_size = lens.unembed.weight.shape[0]
    frozen = not any(p.requires_grad for p in lens.parameters())
    total = streams[0].new_zeros((), dtype=torch.float32)
    for i, layer in enumerate(layers):
        if targets is None:
            total = total + chunked_token_sum(lambda h, l=layer: uniform_ce(lens(h, l)), streams[i], chunk=chunk,
                                              frozen=frozen)
        else:
            total = total + chunked_token_sum(lambda h, t, l=layer: random_ce(lens(h, l), t), streams[i],
                                              targets[i].to(streams[i].device), chunk=chunk, frozen=frozen)
    return total / (max(num_tokens, 1) * len(layers) * math.log(vocab_size))
