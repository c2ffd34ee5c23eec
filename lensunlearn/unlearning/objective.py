"""The lens unlearning objective: forget loss, retain loss and their schedule.

One objective serves LoRA and full-parameter training. What differs is only where the original
model's activations come from, a strategy: `AdapterDisabled` (the same LoRA model with its
adapters switched off) or `FrozenCopy` (a frozen copy made before training).

Streams are read with `forward_streams(..., stop=True)`: the forward pass ends at the deepest
target layer, so later blocks never run. Stream l depends on blocks 0 .. l-1 only, which is why
LoRA adapters are placed on blocks 0 .. max(layers) - 1 (an adapter on block max(layers) could not
change any stream the objective reads). The `kl` retain loss needs the model's output, so it runs
every block up to the final norm (the unembedding is applied in chunks here, never [B, T, V] whole).

The forget loss is the lens loss or, with `forget_loss="mlp_confuse"`, the MLP-output loss of
"Collapse of Irrelevant Representations (CIR) Ensures Robust and Non-Disruptive LLM Unlearning"
(https://arxiv.org/abs/2509.11816), whose passes end after the deepest chosen block; the retain
loss `relative` is that paper's relative stream distance.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Literal, Protocol

import torch
from torch import nn

from ..data.corpora import length_group_batches
from ..modeling.layers import capture_mlp_outputs, forward_streams, model_parts, unwrap
from ..modeling.losses import (
    DEFAULT_CHUNK,
    chunked_token_sum,
    lens_forget_loss,
    mlp_confuse,
    random_targets,
    relative_distance,
    retain_kl,
    retain_l2,
    select_tokens,
)

ForgetTarget = Literal["uniform", "random"]
RetainLoss = Literal["l2", "kl", "relative"]
ForgetLoss = Literal["lens", "mlp_confuse"]
FORGET_TARGETS = ("uniform", "random")
RETAIN_LOSSES = ("l2", "kl", "relative")
FORGET_LOSSES = ("lens", "mlp_confuse")


def schedule(step: int, steps_per_epoch: int, retain_coef: float, forget_coef: float) -> tuple[float, float]:
    """(retain weight, forget weight) after `step` optimiser steps: s = min(1, step / T).

    The retain weight ramps from 0 to `retain_coef` over the first epoch while the forget weight
    eases from `forget_coef` to 0.75 x `forget_coef`.
    """
    s = min(1.0, step / max(1, steps_per_epoch))
    return retain_coef * s, forget_coef * (1.0 - 0.25 * s)


class OriginalModel(Protocol):
    """Where the un-updated model's activations come from."""

    model: nn.Module

    def context(self) -> AbstractContextManager: ...


class AdapterDisabled:
    """LoRA mode: the original model is the same peft model with its adapters disabled."""

    def __init__(self, peft_model: nn.Module) -> None:
        self.model = peft_model

    def context(self) -> AbstractContextManager:
        return self.model.disable_adapter()


class FrozenCopy:
    """Full-parameter mode: a frozen copy of the model, taken before any update (not a submodule)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(unwrap(model)).requires_grad_(False).eval()

    def context(self) -> AbstractContextManager:
        return contextlib.nullcontext()


class OriginalCache:
    """The original model's streams per retain document, kept in CPU memory up to a byte budget.

    The original model never changes during a run, so its streams for retain document k are the same
    each time k comes back: when the retain corpus is shorter than --examples (it is cycled) or with
    more than one epoch. Documents are stored whole (every real position), in the order they are
    first seen, until the budget is spent; documents that do not fit are computed every time.
    `hits` and `misses` count documents served from the cache and computed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.store: dict[int, dict[int, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def __contains__(self, doc_id: int) -> bool:
        return doc_id in self.store

    def get(self, doc_id: int) -> dict[int, torch.Tensor]:
        self.hits += 1
        return self.store[doc_id]

    def put(self, doc_id: int, streams: dict[int, torch.Tensor]) -> None:
        self.misses += 1
        size = sum(t.numel() * t.element_size() for t in streams.values())
        if self.bytes + size <= self.max_bytes:
            self.store[doc_id] = {key: t.detach().to("cpu", copy=True) for key, t in streams.items()}
            self.bytes += size

    def take_counts(self) -> tuple[int, int]:
        """(hits, misses) since the last call."""
        counts = (self.hits, self.misses)
        self.hits = self.misses = 0
        return counts


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _float32(device: torch.device) -> AbstractContextManager:
    """Autocast off: the lens, the losses and their reductions stay in float32 under --mixed_precision."""
    return torch.autocast(device.type, enabled=False)


class UnlearnObjective(nn.Module):
    """Forget and retain losses of one forget batch and one retain batch.

    A module, so that DDP can wrap it: its `forward` returns the weighted loss and the two parts,
    and the early stops of `forward_streams` happen inside it, invisible to DDP.
    """

    def __init__(self, model: nn.Module, lens: nn.Module, layers: Sequence[int], original: OriginalModel,
                 retain_loss: RetainLoss = "l2", forget_target: ForgetTarget = "uniform",
                 chunk: int = DEFAULT_CHUNK, skip_first: int = 0, cache: OriginalCache | None = None,
                 forget_loss: ForgetLoss = "lens", confuse_blocks: Sequence[int] = ()) -> None:
        super().__init__()
        if retain_loss not in RETAIN_LOSSES or forget_target not in FORGET_TARGETS or forget_loss not in FORGET_LOSSES:
            raise ValueError(f"retain_loss must be one of {RETAIN_LOSSES}, forget_target one of {FORGET_TARGETS} and "
                             f"forget_loss one of {FORGET_LOSSES}, got {retain_loss!r}, {forget_target!r} and "
                             f"{forget_loss!r}")
        if forget_loss == "mlp_confuse" and not confuse_blocks:
            raise ValueError("the mlp_confuse forget loss needs the blocks whose MLP outputs it reads")
        self.model, self.lens, self.layers = model, lens, tuple(layers)
        self.original, self.retain_kind, self.forget_target, self.chunk = original, retain_loss, forget_target, chunk
        self.skip_first, self.cache = skip_first, cache
        self.forget_kind, self.confuse_blocks = forget_loss, tuple(sorted(set(confuse_blocks)))

    def _inputs(self, batch: dict[str, torch.Tensor], check: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, loss mask): the loss mask also drops the first `skip_first` positions."""
        device = _device(self.model)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        loss_mask = mask.clone()
        loss_mask[:, :self.skip_first] = 0
        if check and not loss_mask.any():
            raise ValueError(f"no tokens left after skipping the first {self.skip_first} of each document: "
                             f"lower --skip_first or use longer documents")
        return ids, mask, loss_mask

    def forget_loss(self, batch: dict[str, torch.Tensor], target_seed: int = 0) -> torch.Tensor:
        """Lens cross-entropy against a uniform (or sampled) target, / ln V; 1 for a uniform lens. With the
        mlp_confuse loss: `mlp_confuse` of the chosen blocks' MLP outputs against the original model's."""
        if self.forget_kind == "mlp_confuse":
            return self._mlp_confuse(batch)
        ids, mask, loss_mask = self._inputs(batch)
        streams = forward_streams(self.model, self.layers, ids, mask, stop=True)
        hs = [select_tokens(streams[l], loss_mask).float() for l in self.layers]
        targets = None
        if self.forget_target == "random":
            vocab = self.lens.unembed.weight.shape[0]
            targets = [random_targets(hs[0].shape[0], vocab, target_seed * 1009 + i) for i in range(len(hs))]
        with _float32(ids.device):
            return lens_forget_loss(self.lens, self.layers, hs, targets, chunk=self.chunk)

    def _mlp_confuse(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Both passes end right after the deepest chosen block (its output stream is the last one run)."""
        ids, mask, loss_mask = self._inputs(batch)
        blocks, stop_at = self.confuse_blocks, (max(self.confuse_blocks) + 1,)
        with torch.no_grad(), self.original.context(), \
                capture_mlp_outputs(self.original.model, blocks) as captured:
            forward_streams(self.original.model, stop_at, ids, mask, stop=True)
            originals = [select_tokens(captured[b], loss_mask) for b in blocks]
        with capture_mlp_outputs(self.model, blocks) as captured:
            forward_streams(self.model, stop_at, ids, mask, stop=True)
            outputs = [select_tokens(captured[b], loss_mask) for b in blocks]
        with _float32(ids.device):
            return mlp_confuse(outputs, originals)

    def _original_streams(self, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int], final: bool,
                          doc_ids: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """The original model's streams for a retain batch, from the cache where it has them.

        Rows the cache lacks are computed together in one pass over a smaller batch; positions
        past each row's length are left at zero (no loss reads them).
        """
        def compute(rows_ids: torch.Tensor, rows_mask: torch.Tensor) -> dict[int, torch.Tensor]:
            with torch.no_grad(), self.original.context():
                return forward_streams(self.original.model, layers, rows_ids, rows_mask, stop=True, final=final)

        if self.cache is None or doc_ids is None:
            return compute(ids, mask)
        docs = [int(d) for d in doc_ids]
        lengths = mask.sum(dim=1).tolist()
        missing = [row for row, doc in enumerate(docs) if doc not in self.cache]
        computed = compute(ids[missing], mask[missing]) if missing else {}
        keys = list(computed) or list(self.cache.store[docs[0]])
        sample = computed[keys[0]] if computed else self.cache.store[docs[0]][keys[0]]
        out = {key: torch.zeros(ids.shape[0], ids.shape[1], sample.shape[-1], dtype=sample.dtype, device=ids.device)
               for key in keys}
        for j, row in enumerate(missing):
            self.cache.put(docs[row], {key: computed[key][j, :lengths[row]] for key in keys})
            for key in keys:
                out[key][row] = computed[key][j]
        for row, doc in enumerate(docs):
            if row not in missing:
                for key, value in self.cache.get(doc).items():
                    out[key][row, :lengths[row]] = value.to(ids.device)
        return out

    def retain_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Distance of the updated model from the original on retain text (`l2` streams or `kl` outputs).

        A batch with a `length_group` row label (`PairedData.micro_batch`: everyday prose beside short fact
        sentences) runs one pass per group, each padded to its own longest document; the tokens of all
        groups are then reduced together, so the loss is the one padded batch's."""
        self._inputs(batch)  # no loss tokens in the whole batch is an error; in one group it is not
        final = self.retain_kind == "kl"
        layers = () if final else self.layers
        keys = [model_parts(self.model).num_layers] if final else list(self.layers)
        after: dict[int, list[torch.Tensor]] = {key: [] for key in keys}
        before: dict[int, list[torch.Tensor]] = {key: [] for key in keys}
        for part in length_group_batches(batch):
            ids, mask, loss_mask = self._inputs(part, check=False)
            original = self._original_streams(ids, mask, layers, final, part.get("doc_ids"))
            updated = forward_streams(self.model, layers, ids, mask, stop=True, final=final)
            for key in keys:
                after[key].append(select_tokens(updated[key], loss_mask))
                before[key].append(select_tokens(original[key], loss_mask))
        h = {key: torch.cat(after[key]) for key in keys}
        h0 = {key: torch.cat(before[key]) for key in keys}
        device = h[keys[0]].device
        if self.retain_kind == "relative":
            with _float32(device):
                return torch.stack([relative_distance(h[l], h0[l]) for l in self.layers]).mean()
        if not final:
            with _float32(device):
                return torch.stack([retain_l2(h[l], h0[l]).mean() for l in self.layers]).mean()
        key = keys[0]
        new_parts, old_parts = model_parts(self.model), model_parts(self.original.model)

        def per_token(x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.original.context():
                target = old_parts.unembed(old_parts.final_norm(x0))
            return retain_kl(target, new_parts.unembed(new_parts.final_norm(x)))

        with _float32(device):
            total = chunked_token_sum(per_token, h[key], h0[key], chunk=self.chunk)
        return total / max(h[key].shape[0], 1)

    def losses(self, forget_batch: dict[str, torch.Tensor], retain_batch: dict[str, torch.Tensor] | None,
               target_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(forget loss, retain loss); the retain passes are skipped (loss 0) when `retain_batch` is None."""
        forget = self.forget_loss(forget_batch, target_seed)
        retain = self.retain_loss(retain_batch) if retain_batch is not None else forget.new_zeros(())
        return forget, retain

    def forward(self, forget_batch: dict[str, torch.Tensor], retain_batch: dict[str, torch.Tensor],
                retain_weight: float, forget_weight: float, target_seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted loss, forget loss, retain loss); retain passes skipped while its weight is 0."""
        forget, retain = self.losses(forget_batch, retain_batch if retain_weight != 0 else None, target_seed)
        return forget_weight * forget + retain_weight * retain, forget, retain
