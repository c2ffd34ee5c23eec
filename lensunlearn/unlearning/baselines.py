"""The baseline objectives of `unlearn --objective`: RMU, gradient difference, NPO, SimNPO,
representation rerouting (circuit breakers) and sequential back-to-front unlearning.

Each is a subclass of the lens objective (`objective.UnlearnObjective`) with the same interface,
`forget_loss(batch, target_seed)`, `retain_loss(batch)` and `forward(...)`, so the training loop,
DDP/FSDP, checkpoints and the robust step (CIR, MUDMAN's parts) take any of them as they take the lens
objective. What "the original model" is stays the strategy of `objective`: the adapter-disabled model
with LoRA, a frozen copy with full parameters. None of them reads a tuned lens.

The papers, and where this code follows or leaves them:

* `rmu`: "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning" (Li et al. 2024,
  https://arxiv.org/abs/2403.03218). Forget: mean squared distance of the forget tokens' stream l to
  c u, u a fixed random unit vector (uniform in the unit cube, normalised) and c the steering
  coefficient; retain: mean squared distance of the retain tokens' stream l to the frozen model's,
  weighted by alpha (`--retain_coef`). Only the MLPs of the three blocks below stream l train (the
  paper's layers l-2, l-1, l: its "layer l" is the output of block l, stream l+1 here); its code
  trains one matrix of each (the MLP's output projection), the paper's text the MLPs, which is what
  is done here. Padding is left out of both means (the code averages over it).
* `graddiff`: gradient difference as TOFU ("TOFU: A Task of Fictitious Unlearning for LLMs", Maini
  et al. 2024, https://arxiv.org/abs/2401.06121) and open-unlearning run it: minus the next-token loss
  on forget text plus the next-token loss on retain text.
* `npo`: "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning" (Zhang
  et al. 2024, https://arxiv.org/abs/2404.05868), with its retain term (NPO+RT): the reference model
  is the original model, log-likelihoods are summed over each sequence's tokens.
* `simnpo`: "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning" (Fan
  et al. 2024, https://arxiv.org/abs/2410.07163): no reference model, the log-likelihood normalised by
  the sequence's length, the margin gamma as the paper writes it (open-unlearning's delta is gamma /
  beta), and the next-token retain term.
* `rr`: representation rerouting of "Improving Alignment and Robustness with Circuit Breakers" (Zou et
  al. 2024, https://arxiv.org/abs/2406.04313): ReLU of the cosine between the updated and the original
  forget streams at the target layers, the L2 distance to the original retain streams, and the
  paper's schedule (retain weight x t / 2T, rerouting weight x (1 - t / 2T)). With `--orth_coef` > 0
  the orthogonal variant of EleutherAI/unlearn: the forget sequences' mean-pooled streams are pushed
  apart too (ReLU of their pairwise cosines, scaled by the mean sequence length as its code does);
  here that term shares the rerouting weight, where that code ramps it up on its own.
* `sequential`: back-to-front unlearning of EleutherAI/unlearn (`sequential_retain.py` and its
  full-parameter variant): one phase per target stream, deepest first, each an equal share of the
  steps with its own retain ramp and learning-rate decay. In the phase of stream s only block s-1 (the
  block that writes stream s) trains, and the forget loss reads stream s through the original model's
  remaining blocks s..L-1, final norm and unembedding (the probe): cross-entropy against a uniform
  (or sampled) token, / ln V. The retain loss is the L2 distance at stream s (or KL of the outputs).
  EleutherAI's LoRA runs let every adapter train in every phase; training one block per phase is its
  full-parameter variant, chosen here for both modes so that the phases are layer by layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.layers import call_of_block, forward_streams, model_parts, run_blocks_from
from ..modeling.losses import (
    DEFAULT_CHUNK,
    chunked_token_values,
    cosine_relu,
    masked_mean,
    mean_squared_error,
    npo_loss,
    pairwise_cosine_relu,
    random_targets,
    retain_l2,
    rmu_control_vector,
    select_tokens,
    sequence_sums,
    simnpo_loss,
    vocab_cross_entropy,
)
from .baseline_options import OUTPUT_OBJECTIVES
from .objective import RETAIN_LOSSES, OriginalCache, OriginalModel, UnlearnObjective, _float32

log = logging.getLogger(__name__)

PAPERS = {
    "lens": "tuned-lens unlearning (EleutherAI/unlearn)",
    "rmu": "RMU, 'The WMDP Benchmark' (Li et al. 2024)",
    "graddiff": "gradient difference, as in 'TOFU' (Maini et al. 2024) and open-unlearning",
    "npo": "'Negative Preference Optimization' (Zhang et al. 2024)",
    "simnpo": "'Simplicity Prevails: Rethinking Negative Preference Optimization' (Fan et al. 2024)",
    "rr": "representation rerouting, 'Improving Alignment and Robustness with Circuit Breakers' (Zou et al. 2024)",
    "sequential": "sequential back-to-front unlearning (EleutherAI/unlearn)",
}
# RMU trains the MLPs of this many blocks below its stream (the paper's layers l-2, l-1, l).
RMU_BLOCKS = 3


def uses_lens(objective: str) -> bool:
    return objective == "lens"


def default_layers(objective: str, num_layers: int) -> tuple[int, ...]:
    """Each paper's layer choice, scaled to this model's depth (the lens objective's is in `run`)."""
    def at(share: float) -> int:
        return min(num_layers - 1, max(1, round(num_layers * share)))

    if objective in OUTPUT_OBJECTIVES:
        return (num_layers,)
    if objective == "rmu":  # the WMDP paper: the output of block 7 of Zephyr-7B's 32 (stream 8)
        return (at(8 / 32),)
    if objective == "rr":  # circuit breakers on Llama-3-8B (32 blocks): hidden states 10 and 20
        return tuple(sorted({at(10 / 32), at(20 / 32)}))
    if objective == "sequential":  # EleutherAI's best run: outputs of blocks 28, 24, 20, 16 of 32
        return tuple(sorted({at(k / 32) for k in (29, 25, 21, 17)}, reverse=True))
    raise ValueError(f"no default layers for objective {objective!r}")


def trained_blocks(objective: str, layers: Sequence[int]) -> list[int]:
    """The blocks whose weights an objective trains (LoRA adapters go on them; with full parameters the
    lens, next-token and rerouting objectives train every weight, RMU and sequential these blocks')."""
    if objective == "rmu":
        return list(range(max(0, layers[0] - RMU_BLOCKS), layers[0]))
    if objective == "sequential":
        return sorted({layer - 1 for layer in layers})
    return list(range(max(layers)))


def phase_starts(total_steps: int, phases: int) -> list[int]:
    """The first step of each sequential phase: the steps split as evenly as they go."""
    return [round(i * total_steps / phases) for i in range(phases)]


def phase_of(step: int, starts: Sequence[int]) -> int:
    return max(i for i, start in enumerate(starts) if start <= step)


def weights(objective: str, step: int, plan: dict, retain_coef: float, forget_coef: float,
            starts: Sequence[int] = ()) -> tuple[float, float]:
    """(retain weight, forget weight) after `step` optimiser steps, by each paper's schedule.

    lens: `objective.schedule`. rmu, graddiff, npo, simnpo: constant (their papers' weighted sums).
    rr: the circuit-breaker schedule, retain x t/(2T) and forget x (1 - t/(2T)), T the run's steps.
    sequential: the lens schedule restarted in each phase, T the phase's steps.
    """
    from .objective import schedule

    if objective == "lens":
        return schedule(step, plan["steps_per_epoch"], retain_coef, forget_coef)
    if objective == "rr":
        share = min(1.0, step / (2 * max(1, plan["steps"])))
        return retain_coef * share, forget_coef * (1.0 - share)
    if objective == "sequential":
        phase = phase_of(step, starts)
        end = starts[phase + 1] if phase + 1 < len(starts) else plan["steps"]
        return schedule(step - starts[phase], end - starts[phase], retain_coef, forget_coef)
    return retain_coef, forget_coef


# --- next-token losses ----------------------------------------------------------------------------


def token_cross_entropy(model: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                        chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-row cross-entropy of the model's output distribution at final streams `h` ([n, d]) against
    `targets`, chunked over rows; fused (`vocab_cross_entropy`) when the unembedding is frozen."""
    parts = model_parts(model)
    weight, bias = parts.unembed.weight, getattr(parts.unembed, "bias", None)
    if h.shape[0] == 0:
        return h.new_zeros((0,), dtype=torch.float32)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return chunked_token_values(
            lambda x, t: F.cross_entropy(parts.unembed(parts.final_norm(x)).float(), t, reduction="none"),
            h, targets, chunk=chunk)
    return torch.cat([vocab_cross_entropy(parts.final_norm(h[s:s + chunk]), weight, bias, targets=targets[s:s + chunk])
                      for s in range(0, h.shape[0], chunk)])


def next_token_nll(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor,
                   chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token negative log-likelihood, each token's row) of the next-token predictions whose target
    is a loss token (`loss_mask`: real and not skipped) predicted from a real token."""
    parts = model_parts(model)
    final = forward_streams(model, (), ids, mask, stop=True, final=True)[parts.num_layers]
    predicted = (loss_mask[:, 1:] * mask[:, :-1]).bool()
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(predicted)[predicted]
    with _float32(ids.device):
        nll = token_cross_entropy(model, final[:, :-1][predicted], ids[:, 1:][predicted], chunk)
    return nll, rows


class BaselineObjective(UnlearnObjective):
    """What the baselines share: no lens, and the retain losses `nll` (next-token loss on retain text)
    beside the lens objective's `l2` (streams at the target layers) and `kl` (output distributions)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], original: OriginalModel | None, retain_loss: str,
                 chunk: int = DEFAULT_CHUNK, skip_first: int = 0, cache: OriginalCache | None = None,
                 forget_target: str = "uniform") -> None:
        super().__init__(model, None, layers, original,  # type: ignore[arg-type]
                         retain_loss if retain_loss in RETAIN_LOSSES else "l2", forget_target, chunk, skip_first,
                         cache)
        self.retain_kind = retain_loss

    def mean_nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask, loss_mask = self._inputs(batch)
        nll, _ = next_token_nll(self.model, ids, mask, loss_mask, self.chunk)
        return nll.sum() / max(1, nll.numel())

    def retain_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.retain_kind == "nll":
            return self.mean_nll(batch)
        return super().retain_loss(batch)


class GradDiffObjective(BaselineObjective):
    """Gradient difference: the forget loss is minus the next-token loss on forget text (its mean per token)."""

    def forget_loss(self, batch: dict[str, torch.Tensor], target_seed: int = 0) -> torch.Tensor:
        return -self.mean_nll(batch)


class NPOObjective(BaselineObjective):
    """NPO: the preference loss of the forget sequences against the original model's log-likelihoods."""

    def __init__(self, *args, beta: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta

    def forget_loss(self, batch: dict[str, torch.Tensor], target_seed: int = 0) -> torch.Tensor:
        ids, mask, loss_mask = self._inputs(batch)
        nll, rows = next_token_nll(self.model, ids, mask, loss_mask, self.chunk)
        with torch.no_grad(), self.original.context():
            reference, _ = next_token_nll(self.original.model, ids, mask, loss_mask, self.chunk)
        n = ids.shape[0]
        counted = sequence_sums(torch.ones_like(nll), rows, n) > 0
        with _float32(ids.device):
            losses = npo_loss(sequence_sums(nll, rows, n), sequence_sums(reference, rows, n), self.beta)
        return losses[counted].mean()


# Below this mean weight (the sigmoid at about beta NLL - gamma = 4.6) SimNPO's forget gradient is under 2 %
# of gradient ascent's, and it shrinks further as the model forgets: the run would train on retain text only.
SATURATED_WEIGHT = 0.01


def warn_if_saturated(mean_nll: torch.Tensor, beta: float, gamma: float) -> float:
    """Warn when SimNPO's loss starts saturated on these sequences (their mean token losses): the mean of
    sigmoid(-(beta NLL - gamma)) below SATURATED_WEIGHT. Returns that mean weight."""
    weight = torch.sigmoid(-(beta * mean_nll - gamma)).mean().item()
    if weight < SATURATED_WEIGHT:
        typical = mean_nll.mean().item()
        log.warning("simnpo's loss is saturated at the first step: beta %g x the forget text's mean token loss "
                    "%.2f is %.1f, so its forget gradient is %.1e of gradient ascent's and only the retain term "
                    "trains; lower --beta to about %.2g (beta x token loss near 1 + gamma)",
                    beta, typical, beta * typical, 2 * weight, (1 + gamma) / max(typical, 1e-6))
    return weight


class SimNPOObjective(BaselineObjective):
    """SimNPO: the length-normalised, reference-free preference loss with margin gamma.

    The loss's gradient is gradient ascent's on the mean token loss times 2 sigmoid(-(beta NLL/|y| - gamma)).
    Where beta times the forget text's mean token loss is large from the start, that weight is near 0 and
    only the retain term trains: the first batch is checked (`check_saturation`) and a warning names a beta
    that keeps the loss in its live range."""

    def __init__(self, *args, beta: float, gamma: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.beta, self.gamma = beta, gamma
        self.check_saturation = True  # the run turns it off when it resumes (the model has forgotten by then)

    def forget_loss(self, batch: dict[str, torch.Tensor], target_seed: int = 0) -> torch.Tensor:
        ids, mask, loss_mask = self._inputs(batch)
        nll, rows = next_token_nll(self.model, ids, mask, loss_mask, self.chunk)
        n = ids.shape[0]
        lengths = sequence_sums(torch.ones_like(nll), rows, n)
        sums = sequence_sums(nll, rows, n)
        if self.check_saturation:
            self.check_saturation = False
            mean_nll = (sums.detach()[lengths > 0] / lengths[lengths > 0]).float()
            if mean_nll.numel():
                warn_if_saturated(mean_nll, self.beta, self.gamma)
        with _float32(ids.device):
            losses = simnpo_loss(sums, lengths, self.beta, self.gamma)
        return losses[lengths > 0].mean()


class RMUObjective(BaselineObjective):
    """RMU: forget tokens' stream l steered to c u, retain tokens' stream l held at the original's (MSE)."""

    def __init__(self, *args, steering_coef: float, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.layers) != 1:
            raise ValueError(f"rmu steers one layer, got {list(self.layers)}")
        self.steering_coef, self.seed = steering_coef, seed
        self._control: torch.Tensor | None = None

    def control(self, dim: int, device: torch.device) -> torch.Tensor:
        """The fixed target c u (drawn once from the run's seed)."""
        if self._control is None:
            self._control = rmu_control_vector(dim, self.steering_coef, self.seed)
        return self._control.to(device)

    def forget_loss(self, batch: dict[str, torch.Tensor], target_seed: int = 0) -> torch.Tensor:
        ids, mask, loss_mask = self._inputs(batch)
        layer = self.layers[0]
        h = select_tokens(forward_streams(self.model, self.layers, ids, mask, stop=True)[layer], loss_mask)
        with _float32(ids.device):
            return mean_squared_error(h, self.control(h.shape[-1], h.device)).mean()

    def retain_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask, loss_mask = self._inputs(batch)
        layer = self.layers[0]
        before = self._original_streams(ids, mask, self.layers, False, batch.get("doc_ids"))
        after = forward_streams(self.model, self.layers, ids, mask, stop=True)
        with _float32(ids.device):
            return masked_mean(mean_squared_error(after[layer], before[layer]), loss_mask)


class RerouteObjective(BaselineObjective):
    """Representation rerouting: forget streams pushed to orthogonality with their originals (and, with
    `orth_coef`, the forget sequences' pooled streams away from each other); retain streams held (L2)."""

    def __init__(self, *args, orth_coef: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.orth_coef = orth_coef

    def forget_loss(self, batch: dict[str, torch.Tensor], target_seed: int = 0) -> torch.Tensor:
        ids, mask, loss_mask = self._inputs(batch)
        before = self._original_streams(ids, mask, self.layers, False, None)
        after = forward_streams(self.model, self.layers, ids, mask, stop=True)
        with _float32(ids.device):
            reroute = torch.stack([masked_mean(cosine_relu(after[l], before[l]), loss_mask)
                                   for l in self.layers]).mean()
            if not self.orth_coef:
                return reroute
            weights = loss_mask.float().unsqueeze(-1)
            counts = weights.sum(dim=1)
            orth = torch.stack([pairwise_cosine_relu((after[l].float() * weights).sum(dim=1) / counts.clamp_min(1))
                                for l in self.layers]).mean()
            return reroute + self.orth_coef * orth * counts.mean()


class SequentialObjective(BaselineObjective):
    """Back-to-front unlearning: phase i reads stream `phases[i]` (deepest first) through the original
    model's remaining blocks, and only the block that writes that stream trains (`set_phase`)."""

    def __init__(self, *args, phase_params: Sequence[Sequence[nn.Parameter]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phases = tuple(self.layers)
        if list(self.phases) != sorted(self.phases, reverse=True) or len(set(self.phases)) != len(self.phases):
            raise ValueError(f"sequential phases run deepest first: got {list(self.phases)}")
        self.phase_params = [list(params) for params in phase_params]
        self.phase = 0
        self.set_phase(0)

    def set_phase(self, index: int) -> None:
        """Train only phase `index`'s block: every other trained tensor gets no gradient (and so no
        optimiser update, weight decay included) until its phase."""
        self.phase, self.layers = index, (self.phases[index],)
        self.hold_phase()

    def hold_phase(self) -> None:
        """Set requires_grad to the phase's: peft turns every adapter trainable again whenever its adapters
        are enabled (on leaving `disable_adapter`, the original model's context), so this runs after it."""
        for i, params in enumerate(self.phase_params):
            for p in params:
                p.requires_grad_(i == self.phase)

    def _original_streams(self, *args, **kwargs) -> dict[int, torch.Tensor]:
        try:
            return super()._original_streams(*args, **kwargs)
        finally:
            self.hold_phase()

    def probe_streams(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Stream L (the final norm's input) of the original model's blocks s..L-1 run on the trained model's
        stream s, differentiable in that stream."""
        layer, last = self.layers[0], model_parts(self.model).num_layers
        if layer == last:
            return forward_streams(self.model, (layer,), ids, mask, stop=True)[layer]
        call = call_of_block(self.model, layer, ids, mask)
        try:
            with self.original.context():
                return run_blocks_from(self.original.model, layer, call.hidden, call)
        finally:
            self.hold_phase()

    def forget_loss(self, batch: dict[str, torch.Tensor], target_seed: int = 0) -> torch.Tensor:
        self.hold_phase()
        ids, mask, loss_mask = self._inputs(batch)
        h = select_tokens(self.probe_streams(ids, mask), loss_mask)
        parts = model_parts(self.original.model)
        weight, bias = parts.unembed.weight, getattr(parts.unembed, "bias", None)
        vocab = weight.shape[0]
        targets = random_targets(h.shape[0], vocab, target_seed * 1009).to(h.device) \
            if self.forget_target == "random" else None
        with _float32(ids.device):
            total = h.new_zeros((), dtype=torch.float32)
            for s in range(0, h.shape[0], self.chunk):
                part = None if targets is None else targets[s:s + self.chunk]
                total = total + vocab_cross_entropy(parts.final_norm(h[s:s + self.chunk]), weight, bias,
                                                    targets=part).sum()
            return total / (max(1, h.shape[0]) * math.log(vocab))

    def retain_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.hold_phase()
        if self.retain_kind == "kl":
            try:
                return super().retain_loss(batch)
            finally:
                self.hold_phase()
        ids, mask, loss_mask = self._inputs(batch)
        layer = self.layers[0]
        # With a cache, every phase's stream is kept at once, so a document cached in one phase serves all.
        wanted = self.phases if self.cache is not None else self.layers
        before = self._original_streams(ids, mask, wanted, False, batch.get("doc_ids"))
        after = forward_streams(self.model, self.layers, ids, mask, stop=True)
        with _float32(ids.device):
            return masked_mean(retain_l2(after[layer], before[layer]), loss_mask)
