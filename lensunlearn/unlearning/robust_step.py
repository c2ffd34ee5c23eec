"""The robust gradient step of `unlearn`: shared-direction projection, disruption masking,
gradient normalisation and a relearning adversary, each an option, all off by default.

With every option off `unlearn` never builds a `RobustStep`: its loss goes through the objective
and the loop's backward as before, so those runs are unchanged. With any option on, each
micro-batch's gradients are formed here and the loop only clips and steps:

1. at the start of an optimiser step: the first estimate of the shared directions (`--cir`: from
   the forget batches of the first window, read without updating, or in the general-text variant
   from that text, again when due), and the adversary's relearning steps on the step's forget text
   (`--adversary_steps`);
2. per micro-batch: the forget gradient (of the forget loss; at the adversary's attacked fork;
   for the projected MLP weights from projected per-token inputs and output gradients, whose raw
   values also feed the moments of the next estimate), the retain gradient (of the retain loss,
   while its weight is above 0) and, for the mask, the gradient of next-token cross-entropy on the
   retain text; each summed over micro-batches;
3. after the last micro-batch: the sums averaged over processes (the step bypasses DDP), the
   forget gradient rescaled (`--normalise_grad`) and masked (`--disruption_mask`), and
   param.grad = forget weight x forget gradient + retain weight x retain gradient;
4. after the optimiser step: at the end of each window of `--cir_refresh` steps, new shared
   directions from the forget tokens of that window; every `--cir_budget_every` steps, next-token
   loss on the held-out budget text against `--cir_max_loss_rise`; past it, training stops or, with
   `--cir_on_loss_rise shrink`, goes on at a learning rate shrunk by `--cir_shrink`.

Shared directions after "Collapse of Irrelevant Representations (CIR) Ensures Robust and
Non-Disruptive LLM Unlearning" (https://arxiv.org/abs/2509.11816); masking, normalisation and the
adversary after "Robust LLM Unlearning with MUDMAN: Meta-Unlearning with Disruption Masking And
Normalization" (https://arxiv.org/abs/2506.12484); their mechanics live in `cir` and `mudman`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.errors import InputError
from ..data.corpora import collate, load_texts, tokenize
from ..modeling.layers import model_parts
from ..train.distributed import World, average_over_ranks
from .cir import ForgetMoments, SharedDirections, TokenCapture, is_transposed, mlp_linears
from .mudman import Adversary, global_norm, lm_loss, mask_grads, normalise_grads
from .options import FORGET_CORPUS, RETAIN_CORPUS, RobustOptions, check_robust_options  # noqa: F401

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
# What the step adds to each line of the metrics log, and to the run's summary.
ROBUST_LOGGED = ("forget_grad_norm", "retain_grad_norm", "masked_fraction", "adversary_loss", "general_loss",
                 "cir_refreshed", "lr_scale")
ROBUST_SUMMARY_KEYS = ("general_loss_start", "general_loss_end", "stopped_early_at_step", "lr_shrunk_at_steps",
                       "over_budget_at_end")
# --cir_on_loss_rise shrink stops once the learning rate is shrunk below this share of the schedule's:
# by then the updates are too small to move the loss, and the run would only spend time.
MIN_LR_SCALE = 0.01


def resolve_cir_blocks(cfg: Any, layers: Sequence[int], num_blocks: int) -> tuple[int, ...]:
    """The blocks whose MLP --cir trains: --cir_blocks, the band of --blocks, or every block below the deepest
    target layer."""
    deepest = max(layers)
    chosen = cfg.cir_blocks
    if chosen is None and getattr(cfg, "blocks", None) is not None:
        from .blocks import resolve_blocks

        chosen = resolve_blocks(cfg, num_blocks)
    blocks = tuple(range(deepest)) if chosen is None else tuple(sorted(set(chosen)))
    bad = [b for b in blocks if not 0 <= b < min(deepest, num_blocks)]
    if bad or not blocks:
        raise ConfigError(f"--cir_blocks {bad or list(blocks)}: the forget loss reads stream {deepest}, so only "
                          f"blocks 0..{deepest - 1} can change it; choose blocks in that range")
    return blocks


def full_target_names(cfg: Any) -> tuple[str, ...] | None:
    """The leaf names --full_targets keeps, or None for all."""
    spec = getattr(cfg, "full_targets", "all")
    return None if spec == "all" else tuple(t.strip() for t in spec.split(",") if t.strip())


def cir_modules(model: nn.Module, cfg: Any, layers: Sequence[int], num_blocks: int) -> dict[str, nn.Module]:
    """The linear layers --cir projects and trains: those of the MLPs of its blocks (those --full_targets names)."""
    modules = mlp_linears(model, resolve_cir_blocks(cfg, layers, num_blocks))
    names = full_target_names(cfg)
    if names is None:
        return modules
    kept = {n: m for n, m in modules.items() if n.rsplit(".", 1)[-1] in names}
    if not kept:
        found = sorted({n.rsplit(".", 1)[-1] for n in modules})
        raise ConfigError(f"--full_targets {','.join(names)} names none of the MLP layers --cir trains "
                          f"({','.join(found)}): pass some of those, or all")
    return kept


def freeze_all_but_cir(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Only the weights of the projected layers train (their biases and every other tensor are frozen)."""
    model.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)


# --- general text --------------------------------------------------------------------------------


def check_general_corpus(cfg: Any) -> None:
    """A --cir_corpus of its own (not 'forget', not 'retain') and --cir_budget_text are read once before the
    model loads, so that a missing or empty one is reported naming its flag, before any compute."""
    if not cfg.cir:
        return
    reads = []
    if not cfg.cir_from_forget and cfg.cir_corpus != RETAIN_CORPUS:
        reads.append(("--cir_corpus", cfg.cir_corpus, cfg.cir_pca_docs))
    if cfg.cir_max_loss_rise and cfg.cir_budget_text is not None:
        reads.append(("--cir_budget_text", cfg.cir_budget_text, None))
    for flag, source, limit in reads:
        try:
            load_texts(source, limit=limit, what=f"{flag} corpus",
                       column_flag=f"a corpus with a 'text' column as {flag}")
        except (OSError, ValueError) as err:
            raise InputError(f"{flag} {source}: {err}") from err


def general_documents(cfg: Any, retain: list[list[int]], tokenizer) -> list[list[int]]:
    """The --cir_pca_docs documents the general-text variant estimates its shared directions on, tokenised
    (none when the directions come from the forget tokens)."""
    if not cfg.cir or cfg.cir_from_forget:
        return []
    if cfg.cir_corpus == RETAIN_CORPUS:
        return retain[:cfg.cir_pca_docs]
    return _load_documents(cfg.cir_corpus, cfg.cir_pca_docs, cfg.max_length, tokenizer, "--cir_corpus")


def budget_documents(cfg: Any, general: list[list[int]], tokenizer) -> list[list[int]]:
    """The documents the loss budget is measured on: --cir_budget_text, or the variant's general text."""
    if not cfg.cir or not cfg.cir_max_loss_rise:
        return []
    if cfg.cir_budget_text is None:
        return general
    docs = _load_documents(cfg.cir_budget_text, None, cfg.max_length, tokenizer, "--cir_budget_text")
    docs = [d for d in docs if len(d) >= 2]
    if not docs:
        raise InputError(f"--cir_budget_text {cfg.cir_budget_text} has no document of two or more tokens, so there "
                         f"is no next-token loss to watch: pass longer text")
    return docs


def _load_documents(source: str, limit: int | None, max_length: int, tokenizer, flag: str) -> list[list[int]]:
    try:
        texts = load_texts(source, limit=limit, what=f"{flag} corpus",
                           column_flag=f"a corpus with a 'text' column as {flag}")
    except ValueError as err:  # empty, or without a text column
        raise InputError(str(err)) from err
    return tokenize(texts, tokenizer, max_length)


def check_general_text(cfg: Any, docs: list[list[int]], modules: Mapping[str, nn.Module]) -> int:
    """Refuse more components than the layers' widths or the general text's tokens allow; returns the tokens."""
    for name, module in modules.items():
        d_out, d_in = module.weight.shape if not is_transposed(module) else module.weight.shape[::-1]
        for flag, count, width, what in (("--cir_act_components", cfg.cir_act_components, d_in, "inputs"),
                                         ("--cir_grad_components", cfg.cir_grad_components, d_out, "outputs")):
            if count > width:
                raise ConfigError(f"{flag} {count} is more than the {width} dimensions of the {what} of {name}: "
                                  f"choose at most {width}")
    if cfg.cir_from_forget:
        return 0
    tokens = sum(max(0, len(d) - cfg.skip_first) for d in docs)
    needed = max(cfg.cir_act_components, cfg.cir_grad_components)
    if tokens < needed:
        raise ConfigError(f"{needed} shared directions need at least {needed} general-text tokens, but the "
                          f"{len(docs)} documents taken from {cfg.cir_corpus} (--cir_pca_docs {cfg.cir_pca_docs}) "
                          f"hold {tokens} after --skip_first {cfg.skip_first}: pass more --cir_pca_docs, a longer "
                          f"--cir_corpus or fewer components")
    return tokens


def check_forget_tokens(cfg: Any, forget_batches: Callable[[int], list[Batch]], refresh: int, total: int) -> int:
    """Refuse more components than the forget tokens of the first estimate's window hold; returns them."""
    tokens = sum(int(loss_mask(b, cfg.skip_first).sum()) for s in range(min(refresh, total))
                 for b in forget_batches(s))
    needed = max(cfg.cir_act_components, cfg.cir_grad_components)
    if tokens < needed:
        raise ConfigError(f"{needed} shared directions need at least {needed} forget tokens in each estimate, but "
                          f"the {min(refresh, total)} steps of one estimate (--cir_refresh) hold {tokens} after "
                          f"--skip_first {cfg.skip_first}: pass a larger --cir_refresh or fewer components")
    return tokens


def loss_mask(batch: Batch, skip_first: int) -> torch.Tensor:
    """The tokens the objective's losses read: real tokens past the first `skip_first` of each document."""
    mask = batch["attention_mask"].clone()
    mask[:, :skip_first] = 0
    return mask


@contextlib.contextmanager
def _quiet_pass(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and torch's random state put back afterwards: a measurement between steps changes
    neither the weights nor the dropout masks and random targets of later steps."""
    accelerator = [] if device.type == "cpu" else [device]
    was_training = model.training
    with torch.random.fork_rng(accelerator, device_type=None if device.type == "cpu" else device.type):
        try:
            model.eval()
            yield
        finally:
            model.train(was_training)


# --- the step ------------------------------------------------------------------------------------


@dataclass
class StepInputs:
    """What `RobustStep` needs from the run: the model, its objective (not wrapped in DDP) and
    trainable tensors, the processes, micro-batches per process and step, the plan's length, and
    the documents it reads."""

    cfg: Any  # the run's UnlearnConfig (a RobustOptions)
    world: World
    model: nn.Module
    objective: nn.Module
    trainable: dict[str, nn.Parameter]
    micro_per_step: int
    total_steps: int
    refresh_every: int
    forget_batches: Callable[[int], list[Batch]]  # every forget micro-batch of a global step (all ranks)
    general_docs: list[list[int]]  # the general-text variant's direction text (empty otherwise)
    pad_id: int
    cir_modules: dict[str, nn.Module]
    budget_docs: list[list[int]] = dataclasses.field(default_factory=list)  # the loss budget's text
    budget_every: int = 0  # optimiser steps between budget checks; 0: --cir_budget_every's value


class RobustStep:
    """Forms each step's gradients (see the module docstring). Call it like the objective, once per
    micro-batch: it returns (weighted loss, forget loss, retain loss), detached; after the last
    micro-batch of a step it writes param.grad for the loop to clip and step."""

    def __init__(self, inputs: StepInputs) -> None:
        self.inputs, self.cfg = inputs, inputs.cfg
        self.over_budget_at_end = False
        self.params = inputs.trainable
        self.device = next(iter(self.params.values())).device
        self.directions = self.capture = None
        if self.cfg.cir:
            self.capture = TokenCapture(inputs.cir_modules)
            self.directions = SharedDirections(inputs.cir_modules, self.cfg.cir_act_components,
                                               self.cfg.cir_grad_components)
            by_id = {id(p): name for name, p in self.params.items()}
            self.param_of = {name: by_id[id(m.weight)] for name, m in inputs.cir_modules.items()}
        # with the directions from the forget tokens: their moments over the current window of steps
        self.moments = ForgetMoments(list(inputs.cir_modules)) if self.cfg.cir and self.cfg.cir_from_forget else None
        self.adversary = None
        if self.cfg.adversary_steps:
            self.adversary = Adversary(self.params, lambda batch: lm_loss(inputs.model, batch), self.cfg.adversary_lr,
                                       self.cfg.adversary_steps * self.cfg.adversary_every,
                                       decay=self.cfg.adversary_decay)
        self.target_norm: float | None = None
        self.retain_average: dict[str, torch.Tensor] = {}
        self.general_start: float | None = None
        self.stopped_at: int | None = None
        self.lr_scale = 1.0  # the factor --cir_on_loss_rise shrink puts on the schedule's learning rate
        self.shrunk_at: list[int] = []
        self.step_metrics: dict[str, float] = {}
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._micro = 0

    # -- per micro-batch --

    def __call__(self, forget_batch: Batch, retain_batch: Batch, retain_weight: float, forget_weight: float,
                 target_seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._micro == 0:
            self._begin(step)
        forget, grads = self._forget_grads(forget_batch, target_seed)
        self._add("forget", grads)
        retain = forget.new_zeros(())
        if retain_weight:  # the retain passes are skipped while its weight is 0, as without this step
            retain = self.inputs.objective.retain_loss(retain_batch)
            self._add("retain", self._grads(retain))
        if self.cfg.disruption_mask:
            self._add("mask", self._grads(lm_loss(self.inputs.model, retain_batch)))
        self._micro += 1
        if self._micro == self.inputs.micro_per_step:
            self._micro = 0
            self._finish(retain_weight, forget_weight)
        loss = forget_weight * forget.detach() + retain_weight * retain.detach()
        return loss, forget.detach(), retain.detach()

    def _grads(self, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
        grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
        return dict(zip(self.params, grads, strict=True))

    def _forget_grads(self, batch: Batch, target_seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The forget loss and its gradient, at the attacked fork when there is an adversary; with --cir the
        projected layers' gradients come from their projected per-token inputs and output gradients."""
        objective = self.inputs.objective
        fork = self.adversary.applied() if self.adversary is not None else contextlib.nullcontext()
        with fork:
            if self.capture is None:
                loss = objective.forget_loss(batch, target_seed)
                return loss, self._grads(loss)
            with self.capture.capture(loss_mask(batch, objective.skip_first)):
                loss = objective.forget_loss(batch, target_seed)
                pairs = self.capture.output_grads(loss)
            if self.moments is not None:  # the raw (unprojected) tokens, for the next estimate
                self.moments.add(pairs)
            grads = {self.param_of[name]: self.directions.update(name, pairs[name]) for name in pairs}
            return loss, grads

    def _add(self, kind: str, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Sum one micro-batch's gradients (divided by the micro-batches per step) in float32."""
        sums = self._sums.setdefault(kind, {})
        for name, p in self.params.items():
            if name not in sums:
                sums[name] = torch.zeros_like(p, dtype=torch.float32)
            if grads.get(name) is not None:
                sums[name].add_(grads[name].float(), alpha=1 / self.inputs.micro_per_step)

    # -- per optimiser step --

    def _begin(self, step: int) -> None:
        """Before the step's first micro-batch: shared directions when due, then the attacker's steps."""
        self.step_metrics = {}
        if self.directions is not None:
            if self.general_start is None and self.cfg.cir_max_loss_rise:
                self.general_start = self.general_loss()
            if self.moments is not None:
                if not self.directions.bases:  # a fresh run: CIR's epoch 0, which collects without updating
                    self.first_estimate(step)
            elif step % self.inputs.refresh_every == 0 or not self.directions.bases:
                self.refresh(step)
        if self.adversary is not None:
            batches = self.inputs.forget_batches(step)
            losses = [self.adversary.relearn(batches) for _ in range(self.cfg.adversary_steps)]
            self.step_metrics["adversary_loss"] = sum(losses) / len(losses)

    def _finish(self, retain_weight: float, forget_weight: float) -> None:
        """After the step's last micro-batch: average over processes, normalise, mask, write param.grad."""
        sums = self._sums
        self._sums = {}
        names = list(self.params)
        average_over_ranks([sums[kind][n] for kind in sorted(sums) for n in names], self.inputs.world)
        forget = sums["forget"]
        norm = float(global_norm(forget))
        self.step_metrics["forget_grad_norm"] = norm
        if self.cfg.normalise_grad:
            if self.target_norm is None:  # a given norm, or the first step's norm sets the scale of every step
                self.target_norm = self.cfg.grad_norm if self.cfg.grad_norm is not None else norm
            if self.target_norm > 0:
                forget = normalise_grads(forget, self.target_norm, inplace=True)
        if self.cfg.disruption_mask:
            self._mask(forget, sums["mask"])
        retain = sums.get("retain", {})
        if retain:  # before its weight: with plain SGD, lr x weight x this is the retain step's size
            self.step_metrics["retain_grad_norm"] = float(global_norm(retain))
        for name, p in self.params.items():
            grad = forget[name].mul_(forget_weight)
            if name in retain:
                grad.add_(retain[name], alpha=retain_weight)
            p.grad = grad.to(p.dtype)

    @torch.no_grad()
    def _mask(self, forget: dict[str, torch.Tensor], retain_grads: dict[str, torch.Tensor]) -> None:
        """Mask `forget` in place against the running average of retain gradients (MUDMAN's retain_acc).

        The reference is next-token loss on the retain text, not the retain loss being trained: that one
        measures the distance to the original model, so its gradient is zero before the first update
        (it would mask every element, and the run would never move) and afterwards only points back to
        the original. Next-token loss has a gradient from the start, at every retain weight.
        """
        m = self.cfg.mask_momentum
        for name, g in retain_grads.items():
            average = self.retain_average.setdefault(name, torch.zeros_like(g))
            average.mul_(m).add_(g, alpha=1 - m)
        nonzero = sum(int(torch.count_nonzero(g)) for g in forget.values())
        mask_grads(forget, self.retain_average, inplace=True)
        kept = sum(int(torch.count_nonzero(g)) for g in forget.values())
        self.step_metrics["masked_fraction"] = 1 - kept / max(1, nonzero)

    # -- general text: shared directions and the loss budget --

    def _general_batches(self, docs: list[list[int]] | None = None) -> Iterator[Batch]:
        docs = self.inputs.general_docs if docs is None else docs
        size = self.cfg.per_device_batch
        for start in range(0, len(docs), size):
            yield collate(docs[start:start + size], self.inputs.pad_id)

    def first_estimate(self, step: int) -> None:
        """The shared directions before the first update: the moments of the forget tokens of steps
        `step` .. `step` + the refresh period - 1, at the current weights, with no update (every process
        reads every micro-batch, so all hold the same directions without communicating)."""
        window = ForgetMoments(list(self.inputs.cir_modules))
        objective = self.inputs.objective
        last = min(step + self.inputs.refresh_every, self.inputs.total_steps)
        with _quiet_pass(self.inputs.model, self.device):
            for s in range(step, last):
                for batch in self.inputs.forget_batches(s):
                    with self.capture.capture(loss_mask(batch, objective.skip_first)):
                        loss = objective.forget_loss(batch, self.cfg.seed * 1_000_003 + s)
                        window.add(self.capture.output_grads(loss))
        self.directions.estimate_from_moments(window.moments, seed=self.cfg.seed * 1_000_003 + step)
        self.step_metrics["cir_refreshed"] = 1.0
        log.info("step %d: shared directions estimated on the %d forget tokens of steps %d-%d (no update)", step,
                 window.tokens, step, last - 1)

    def _estimate_from_window(self, done: int) -> None:
        """New shared directions from the forget tokens of the steps since the last estimate, at the
        weights they were met with (CIR's previous epoch), then a fresh window."""
        self.moments.merge_over_ranks(self.inputs.world)
        tokens = self.moments.tokens
        self.directions.estimate_from_moments(self.moments.moments, seed=self.cfg.seed * 1_000_003 + done)
        self.moments.reset()
        log.info("step %d: shared directions re-estimated on the %d forget tokens of the last %d steps", done,
                 tokens, self.inputs.refresh_every)

    def refresh(self, step: int) -> None:
        """Estimate the shared directions anew at the current weights: the inputs and the forget loss's
        output gradients of every projected layer, token by token, over the general text."""
        objective, skip = self.inputs.objective, self.cfg.skip_first
        samples: dict[str, list] = {name: [] for name in self.inputs.cir_modules}
        with _quiet_pass(self.inputs.model, self.device):
            for batch in self._general_batches():
                mask = loss_mask(batch, skip)
                if not mask.any():
                    continue
                with self.capture.capture(mask):
                    # weighted by its tokens, so each token counts the same whatever its batch
                    loss = objective.forget_loss(batch, self.cfg.seed) * mask.sum()
                    for name, pairs in self.capture.output_grads(loss).items():
                        samples[name].extend(pairs)
        self.directions.estimate(samples, seed=self.cfg.seed * 1_000_003 + step)
        self.step_metrics["cir_refreshed"] = 1.0
        log.info("step %d: shared directions re-estimated on %d general-text documents", step,
                 len(self.inputs.general_docs))

    @torch.no_grad()
    def general_loss(self) -> float:
        """Next-token loss of the model on the general text, averaged over its predicted tokens."""
        total, count = 0.0, 0
        with _quiet_pass(self.inputs.model, self.device):
            for batch in self._general_batches(self.inputs.budget_docs):
                targets = int(batch["attention_mask"][:, 1:].sum())
                if targets:
                    total += float(lm_loss(self.inputs.model, batch)) * targets
                    count += targets
        return total / max(1, count)

    def after_step(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """The step's own metrics for the log; at each re-estimate (and the last step) the general-text
        loss, and a stop (or a shrunk learning rate) when it rose past --cir_max_loss_rise."""
        out = dict(self.step_metrics)
        if self.cfg.cir_on_loss_rise == "shrink":
            out["lr_scale"] = self.lr_scale  # the factor this step's learning rate had
        done = step + 1
        if self.moments is not None and done % self.inputs.refresh_every == 0 and done < self.inputs.total_steps:
            # here rather than before the next step: a checkpoint written at a multiple of the period then holds
            # no half-filled window
            self._estimate_from_window(done)
            out["cir_refreshed"] = 1.0
        every = self.inputs.budget_every or self.cfg.cir_budget_every
        if self.general_start is not None and (done % every == 0 or done == self.inputs.total_steps):
            loss = self.general_loss()
            out["general_loss"] = loss
            limit = self.general_start * (1 + self.cfg.cir_max_loss_rise)
            if loss > limit and done == self.inputs.total_steps:
                # nothing is left to stop or shrink, but a model past its budget must not pass for one within it
                self.over_budget_at_end = True
                log.warning("step %d, the last: general-text loss %.4f is past %.4f (%.2f%% over its start %.4f): the "
                            "run ends over its budget; lower --lr, or check more often with --cir_budget_every",
                            done, loss, limit, 100 * self.cfg.cir_max_loss_rise, self.general_start)
            elif loss > limit:
                past = (f"step {done}: general-text loss {loss:.4f} is past {limit:.4f} "
                        f"({100 * self.cfg.cir_max_loss_rise:.2f}% over its start {self.general_start:.4f})")
                shrunk = self.lr_scale * self.cfg.cir_shrink
                if self.cfg.cir_on_loss_rise == "shrink" and shrunk >= MIN_LR_SCALE:
                    self.lr_scale = shrunk
                    self.shrunk_at.append(done)
                    log.warning("%s: learning rate shrunk to %.3g of the schedule's (--cir_on_loss_rise shrink)",
                                past, shrunk)
                else:
                    self.stopped_at = done
                    log.warning("%s: stopping (%s)", past, "--cir_max_loss_rise" if self.cfg.cir_on_loss_rise ==
                                "stop" else f"the learning rate would fall below {MIN_LR_SCALE} of the schedule's")
        return out

    def should_stop(self, done: int) -> bool:
        return self.stopped_at is not None

    def summary(self, last: Mapping[str, float]) -> dict[str, Any]:
        """What the run's summary records of this step: the general-text loss and where training stopped."""
        if self.general_start is None:
            return {}
        return {"general_loss_start": self.general_start, "general_loss_end": last.get("general_loss"),
                "stopped_early_at_step": self.stopped_at, "lr_shrunk_at_steps": list(self.shrunk_at),
                "over_budget_at_end": self.over_budget_at_end}

    # -- checkpoints --

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (the trained weights are saved apart)."""
        state: dict[str, Any] = {"target_norm": self.target_norm, "general_start": self.general_start,
                                 "lr_scale": self.lr_scale, "shrunk_at": list(self.shrunk_at),
                                 "retain_average": {n: t.cpu() for n, t in self.retain_average.items()}}
        if self.directions is not None:
            state["directions"] = self.directions.state_dict()
        if self.moments is not None and self.moments.tokens:
            state["moments"] = self.moments.state_dict()
        if self.adversary is not None:
            state["adversary"] = {k: ({n: t.cpu() for n, t in v.items()} if isinstance(v, dict) else v)
                                  for k, v in self.adversary.state_dict().items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.target_norm, self.general_start = state["target_norm"], state["general_start"]
        self.lr_scale, self.shrunk_at = state.get("lr_scale", 1.0), list(state.get("shrunk_at", []))
        self.retain_average = {n: t.to(self.device) for n, t in state["retain_average"].items()}
        if self.directions is not None:
            self.directions.load_state_dict(state["directions"])
        if self.moments is not None and state.get("moments"):
            self.moments.load_state_dict(state["moments"], self.device)
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])


def refresh_period(cfg: Any, unique_forget: int) -> int:
    """--cir_refresh, or (0) the optimiser steps of one pass over the forget documents."""
    return cfg.cir_refresh or max(1, math.ceil(unique_forget / cfg.batch))


def build_robust_step(job: Any, setup: Any, plan: Mapping[str, Any],
                      forget_batches: Callable[[int], list[Batch]]) -> RobustStep:
    """The robust step of an unlearning run (`unlearn.UnlearnJob`, `unlearn.TrainingSetup`, the plan),
    after checking its direction and budget text against the layers it projects: before any training."""
    cfg, model = job.cfg, setup.model
    modules: dict[str, nn.Module] = {}
    docs: list[list[int]] = []
    budget: list[list[int]] = []
    refresh = refresh_period(cfg, plan["unique_forget_examples"])
    budget_every = cfg.cir_budget_every or max(1, math.ceil(plan["unique_forget_examples"] / cfg.batch))
    if cfg.cir:
        modules = cir_modules(model, cfg, job.layers, model_parts(model).num_layers)
        docs = general_documents(cfg, job.data.retain, job.tokenizer)
        check_general_text(cfg, docs, modules)
        if cfg.cir_from_forget:
            tokens = check_forget_tokens(cfg, forget_batches, refresh, plan["steps"])
            source = f"the forget tokens of every {refresh} steps ({tokens} in the first window)"
            if refresh * cfg.batch < plan["unique_forget_examples"]:
                log.warning("--cir_refresh %d: each estimate sees %d of the %d forget documents, so the directions "
                            "that only a few facts share count as shared and are kept out of the update; CIR "
                            "estimates over a whole pass (--cir_refresh 0)", refresh, refresh * cfg.batch,
                            plan["unique_forget_examples"])
        else:
            source = f"{len(docs)} documents of {cfg.cir_corpus} (general-text variant), every {refresh} steps"
            if cfg.cir_corpus == RETAIN_CORPUS and job.data.retain_mix is not None:
                # The documents are listed in the order the mixed pairs first use them, so the sample holds
                # every source in its share: with facts of the forget relation among them, a loss budget on it
                # watches the very sentences the forget step disturbs most, and stops early.
                mixed_budget = bool(cfg.cir_max_loss_rise) and cfg.cir_budget_text is None
                log.warning("--cir_corpus retain with %d --retain sources: the shared directions%s come from the "
                            "first %d retain documents, which mix every source (%s), not general text alone%s",
                            len(job.data.retain_mix), " and the loss budget" if mixed_budget else "", len(docs),
                            ", ".join(m["source"] for m in job.data.retain_mix),
                            "; pass --cir_budget_text generic:heldout to watch text nothing trains on"
                            if mixed_budget else "")
        budget = budget_documents(cfg, docs, job.tokenizer)
        log.info("--cir: %d linear layers of %d MLPs trained at full rank; shared directions (%d input, %d "
                 "output-gradient) from %s; loss budget %s on %d documents of %s, checked every %d steps",
                 len(modules), len(resolve_cir_blocks(cfg, job.layers, model_parts(model).num_layers)),
                 cfg.cir_act_components, cfg.cir_grad_components, source, cfg.cir_max_loss_rise, len(budget),
                 cfg.cir_budget_text or cfg.cir_corpus, budget_every)
    objective = setup.objective.module if hasattr(setup.objective, "module") else setup.objective
    return RobustStep(StepInputs(cfg, job.world, model, objective, setup.trainable, plan["grad_accum"],
                                 plan["steps"], refresh, forget_batches, docs, job.data.pad_id, modules, budget,
                                 budget_every))
