"""Loss functions as small tensor functions, and the token chunking that bounds their memory.

Full-vocabulary losses never hold [tokens, vocab] logits for a whole batch: `chunked_token_sum`
evaluates a per-token loss over slices of tokens under activation checkpointing, so forward and
backward peak memory is one chunk's logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .options import DEFAULT_CHUNK


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
        with torch.no_grad():  # the model's distribution p: its negative entropy and expected unembedding
            target = F.log_softmax(lens.decode(h_final[start:start + chunk].float()), dim=-1)
            target_p = target.exp()
            entropy_term = (target_p * target).sum()
            expected = lens.expected_unembedding(target_p)
            del target, target_p

        # Sum of KL(p || q) = CE(p, q) - H(p). The defaults bind this chunk's target: a checkpointed
        # call is rerun in backward, after the loop has moved on.
        def per_layer(h: torch.Tensor, layer: int, entropy_term=entropy_term, expected=expected) -> torch.Tensor:
            return entropy_term + lens.cross_entropy(h, layer, target_mean=expected).sum()

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


# --- Unlearning losses --------------------------------------------------------------------------


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


class _VocabCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of softmax(x W^T + b) against a target, fused (see `vocab_cross_entropy`).

    Autograd through `logsumexp` keeps the logits, rereads them to rebuild the softmax in backward
    and allocates several [rows, V] temporaries. Here the softmax numerator is made in place in the
    logits' buffer, and, when x needs a gradient, it is multiplied by W right away; only the
    [rows, d] gradient outlives forward. The weight and bias are frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor | None,
                target_rows: torch.Tensor | None, target_bias: torch.Tensor | None) -> torch.Tensor:
        z = F.linear(x.to(weight.dtype), weight).float()
        if bias is not None:
            z += bias.float()
        if targets is not None:
            target_logit = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
            target_rows = weight[targets.long()].float()
        elif target_rows is not None:
            target_logit = (x.float() * target_rows).sum(-1) + (0.0 if target_bias is None else target_bias)
        else:
            target_logit = z.mean(dim=-1)
            target_rows = weight.mean(dim=0, dtype=torch.float32)
        peak = z.amax(dim=-1, keepdim=True)
        numerator = z.sub_(peak).exp_()  # in place: exp(z - max); z is not needed again
        total = numerator.sum(dim=-1, keepdim=True)
        loss = (peak + total.log()).squeeze(-1) - target_logit
        if ctx.needs_input_grad[0]:  # d/dx [logsumexp(z) - target logit] = softmax(z) W - target row
            grad = torch.mm(numerator.to(weight.dtype), weight).float().div_(total)
            ctx.save_for_backward(grad.sub_(target_rows))
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(-1), None, None, None, None, None


def vocab_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        targets: torch.Tensor | None = None,
                        target_mean: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """Per-row cross-entropy of softmax(x W^T + b) against a target, in nats, differentiable in x.

    The target is uniform (`uniform_ce` of the logits) unless `targets` gives one token id per row
    (`random_ce`) or `target_mean` gives a distribution q per row through its expected unembedding,
    (q W [rows, d], q . b [rows] or None): then the result is CE(q, p) = KL(q || p) + H(q). The same
    values as the plain functions (to float rounding) in about half the time on CPU, with one [rows,
    V] buffer instead of several. `weight` and `bias` are frozen; the products run in `weight`'s
    dtype (bfloat16 for the lens' fast product), everything else in float32.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("vocab_cross_entropy differentiates only x, but the unembedding weight or bias requires "
                         "grad: freeze it (`.requires_grad_(False)`)")
    rows, row_bias = target_mean if target_mean is not None else (None, None)
    return _VocabCrossEntropy.apply(x, weight, bias, targets, rows, row_bias)


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
    row (`random_ce`), which has the same expectation; both are computed fused by
    `lens.cross_entropy`. Logits exist for one chunk of tokens of one layer at a time (recomputed in
    backward, or, with a frozen lens, differentiated at once), so peak memory is [chunk, V].
    """
    if len(streams) != len(layers) or (targets is not None and len(targets) != len(layers)):
        raise ValueError(f"need one stream (and target set) per layer: {len(layers)} layers, {len(streams)} streams")
    num_tokens = streams[0].shape[0]
    vocab_size = lens.unembed.weight.shape[0]
    frozen = not any(p.requires_grad for p in lens.parameters())
    total = streams[0].new_zeros((), dtype=torch.float32)
    for i, layer in enumerate(layers):
        if targets is None:
            total = total + chunked_token_sum(lambda h, l=layer: lens.cross_entropy(h, l), streams[i], chunk=chunk,
                                              frozen=frozen)
        else:
            total = total + chunked_token_sum(lambda h, t, l=layer: lens.cross_entropy(h, l, t), streams[i],
                                              targets[i].to(streams[i].device), chunk=chunk, frozen=frozen)
    return total / (max(num_tokens, 1) * len(layers) * math.log(vocab_size))


def mlp_confuse(outputs: Sequence[torch.Tensor], originals: Sequence[torch.Tensor]) -> torch.Tensor:
    """The MLP-output forget loss of "Collapse of Irrelevant Representations": per block, the mean over
    tokens of max(0, <o_t, o0_t>) / m^2, m the mean over tokens of |o0_t|; averaged over blocks.

    `outputs[i]` and `originals[i]` are one block's MLP outputs [tokens, d] of the model being trained
    and of the original model on the same tokens. Each token's term starts near 1 and pushes its output
    towards orthogonality with the original; at 0 it stops (a token whose output is orthogonal to the
    original's, or points away from it, gives no gradient), so the loss is bounded below by 0 and
    cannot run off the way a cross-entropy to a target can.
    """
    if len(outputs) != len(originals) or not outputs:
        raise ValueError(f"need one original per output and at least one block, got {len(outputs)} and "
                         f"{len(originals)}")
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for out, org in zip(outputs, originals, strict=True):
        if out.shape != org.shape:
            raise ValueError(f"MLP output of shape {tuple(out.shape)} against an original of {tuple(org.shape)}")
        org = org.detach().float()
        scale = org.norm(dim=-1).mean().clamp_min(torch.finfo(torch.float32).tiny)
        dots = (out.float() * org).sum(dim=-1) / scale ** 2
        total = total + torch.relu(dots).mean()  # relu, not clamp: no gradient at exactly 0 either
    return total / len(outputs)


def relative_distance(h: torch.Tensor, h_original: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |h_t - h0_t| divided by the mean over tokens of |h0_t| ([tokens, d] each): the
    representation retain loss of "Collapse of Irrelevant Representations" (0 for an unchanged stream,
    1 when the change is as large as the stream itself, whatever the stream's scale)."""
    h0 = h_original.detach().float()
    return (h.float() - h0).norm(dim=-1).mean() / h0.norm(dim=-1).mean().clamp_min(torch.finfo(torch.float32).tiny)


# --- Baseline objectives' losses ----------------------------------------------------------------
# Each is written as its paper states it; the objectives in `unlearning.baselines` feed them.


def chunked_token_values(per_token: Callable[..., torch.Tensor], *tensors: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """`per_token(*slices)` over token slices of at most `chunk` rows, concatenated ([tokens] values).

    Unlike `chunked_token_sum` the per-token values come back, for losses that are not a plain sum of
    them (a per-sequence transform, as in NPO). Each slice runs under activation checkpointing when a
    gradient is needed, so only one slice's intermediates (e.g. [chunk, vocab] logits) are alive at once.
    """
    n = tensors[0].shape[0]
    if n == 0:
        return tensors[0].new_zeros((0,), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    parts = []
    for start in range(0, n, chunk):
        slices = [t[start:start + chunk] for t in tensors]
        if needs_grad:
            parts.append(checkpoint(lambda *xs: per_token(*xs).float(), *slices, use_reentrant=False))
        else:
            parts.append(per_token(*slices).float())
    return torch.cat(parts)


def sequence_sums(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per-sequence sums of per-token `values`; `rows[i]` is the sequence of token i."""
    return values.new_zeros(num_rows).index_add(0, rows.to(values.device), values)


def rmu_control_vector(dim: int, steering_coef: float, seed: int) -> torch.Tensor:
    """RMU's fixed target: a vector drawn uniformly from [0, 1)^d, scaled to norm `steering_coef`.

    "The WMDP Benchmark" (Li et al. 2024, https://arxiv.org/abs/2403.03218) draws u once, uniformly in
    the unit cube, normalises it and multiplies it by the steering coefficient c. Drawn here from its own
    seeded generator, so a resumed run (and every process) has the same one without saving it.
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(dim, generator=generator, dtype=torch.float64)
    return (u / u.norm() * steering_coef).float()


def mean_squared_error(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token mean over features of the squared difference ([tokens, d] -> [tokens]); RMU's MSE."""
    return (h.float() - target.float()).pow(2).mean(dim=-1)


def npo_loss(nll: torch.Tensor, reference_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sequence NPO loss, -(2/beta) log sigmoid(-beta log(pi_theta(y|x) / pi_ref(y|x))).

    "Negative Preference Optimization" (Zhang et al. 2024, https://arxiv.org/abs/2404.05868). With
    log pi = -NLL summed over the sequence's tokens, -beta log(pi_theta / pi_ref) = beta (NLL - NLL_ref).
    """
    return -(2.0 / beta) * F.logsigmoid(beta * (nll.float() - reference_nll.float()))


def simnpo_loss(nll: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Per-sequence SimNPO loss, -(2/beta) log sigmoid(-(beta / |y|) log pi_theta(y|x) - gamma).

    "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning" (Fan et al.
    2024, https://arxiv.org/abs/2410.07163): reference-free, the sequence's log-likelihood normalised by
    its length |y|, with the reward margin gamma. -(beta / |y|) log pi = beta NLL / |y|.
    """
    return -(2.0 / beta) * F.logsigmoid(beta * nll.float() / lengths.float().clamp_min(1) - gamma)


def cosine_relu(h: torch.Tensor, h_original: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-token ReLU of the cosine similarity between updated and original representations.

    The rerouting loss of "Improving Alignment and Robustness with Circuit Breakers" (Zou et al. 2024,
    https://arxiv.org/abs/2406.04313): zero once a representation is orthogonal to (or opposed to) its
    original.
    """
    h, h0 = h.float(), h_original.float()
    cos = (h * h0).sum(-1) / (h.norm(dim=-1) * h0.norm(dim=-1)).clamp_min(eps)
    return torch.relu(cos)


def pairwise_cosine_relu(pooled: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over ordered pairs i != j of ReLU(cos(p_i, p_j)) of the rows of `pooled` ([n, d]); 0 for n < 2.

    The orthogonality term of the orthogonal circuit breakers in EleutherAI/unlearn: the forget
    sequences' pooled representations are pushed apart, so that they do not collapse onto one direction
    (one direction is easy for an attacker to undo).
    """
    n = pooled.shape[0]
    if n < 2:
        return pooled.new_zeros((), dtype=torch.float32)
    unit = pooled.float() / (pooled.float().norm(dim=-1, keepdim=True) + eps)
    sim = unit @ unit.T
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=pooled.device)
    return torch.relu(sim[off_diagonal]).sum() / (n * (n - 1))
