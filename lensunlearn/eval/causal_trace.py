"""Causal tracing: where a model looks up a set of facts, block by block and component by component.

After "Locating and Editing Factual Associations in GPT" (Meng et al. 2022,
https://arxiv.org/abs/2202.05262). For each fact (a cloze prompt that names its subject, and the
answer):

1. clean run: the probability p_clean of the answer's tokens after the prompt, and every block's
   MLP and attention outputs at the subject's tokens;
2. corrupted run: Gaussian noise (`noise` x the standard deviation of the stream at the subject's
   tokens, over every fact traced) added to the subject tokens' stream `stream`; the answer's
   probability p_corrupt, averaged over `samples` noise draws. The paper corrupts the token
   embeddings (stream 0). In models whose first MLP acts as an extended embedding (it writes most
   of a token's identity into the stream: GPT-2, and the Llama-like SmolLM2, whose block-0 MLP
   alone restores 99 % of what noise on the embeddings destroys), that MLP then takes all the
   effect and hides where the facts are looked up; corrupting stream 1 (after block 0) instead
   treats block 0 as part of the embedding, as "Fact Finding" (Nanda, Rajamanoharan, Kramar and
   Shah 2023) does;
3. restored runs: the corrupted run with one component's output at the subject's tokens put back to
   its clean value, at block b (and the blocks around it, with `window` > 1); the answer's
   probability p_restored(b, component).

The indirect effect of (b, component) is p_restored - p_corrupt. Over the facts it is reported as
the recovered share, sum(p_restored - p_corrupt) / sum(p_clean - p_corrupt): the part of what the
noise destroyed that restoring that one component brings back. Every restored run of a fact is a
row of one batch (one noise draw per row, shared by the rows of that draw), so a fact costs
(1 + 2 x blocks) x samples rows of a few tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.layers import block_component, forward_streams, model_parts

COMPONENTS = ("mlp", "attn")


@dataclass
class TraceItem:
    """One fact, tokenised: the prompt and answer ids, and the subject's token positions [start, end)."""

    fact_id: str
    subject: str
    answer: str
    context: list[int]
    answer_ids: list[int]
    subject_start: int
    subject_end: int


def subject_tokens(tokenizer, text: str, ids: Sequence[int], subject: str) -> tuple[int, int] | None:
    """Token positions [start, end) of `ids` (the tokenisation of `text`) that cover the subject's first
    occurrence in `text`, or None when the tokenizer cannot map characters to tokens or the subject is
    not in the text."""
    where = text.find(subject)
    if where < 0:
        return None
    end_char = where + len(subject)
    for special in (None, False):
        kwargs = {} if special is None else {"add_special_tokens": special}
        try:
            enc = tokenizer(text, return_offsets_mapping=True, **kwargs)
        except (NotImplementedError, ValueError):  # a slow tokenizer has no offsets
            return None
        if list(enc["input_ids"]) != list(ids):
            continue
        covered = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end_char and b > where]
        return (covered[0], covered[-1] + 1) if covered else None
    return None


def corruption_site(model: nn.Module, stream: int) -> nn.Module:
    """The module whose output is stream `stream` (`layers`' convention): the embedding for 0, block s-1 for s."""
    parts = model_parts(model)
    return parts.embed if stream == 0 else parts.blocks[stream - 1]


@torch.no_grad()
def noise_scale(model: nn.Module, items: Sequence[TraceItem], stream: int = 0) -> float:
    """The standard deviation of stream `stream` at the subject's tokens (every element, every fact traced): the
    unit of the noise. For stream 0, the embeddings of the subject tokens, as in the paper."""
    if stream == 0:
        ids = torch.tensor(sorted({t for it in items for t in it.context[it.subject_start:it.subject_end]}))
        weight = model_parts(model).embed.weight.detach()
        return float(weight[ids.to(weight.device)].float().std())
    device = model_parts(model).embed.weight.device
    values = []
    for item in items:
        ids = torch.tensor([item.context], device=device)
        captured = forward_streams(model, (stream,), ids, torch.ones_like(ids))[stream]
        values.append(captured[0, item.subject_start:item.subject_end].float().flatten())
    return float(torch.cat(values).std())


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _answer_logprob(model: nn.Module, ids: torch.Tensor, item: TraceItem) -> torch.Tensor:
    """log p(answer | prompt) of every row of `ids` [rows, prompt + answer - 1]: the final stream is
    unembedded at the answer's positions only."""
    from .evaluate import _final_logits

    parts = model_parts(model)
    hidden = forward_streams(model, (), ids, torch.ones_like(ids), final=True)[parts.num_layers]
    start = len(item.context) - 1
    read = hidden[:, start:start + len(item.answer_ids)]
    logprobs = torch.log_softmax(_final_logits(model, parts.final_norm(read), parts.unembed), dim=-1)
    targets = torch.tensor(item.answer_ids, device=ids.device).expand(ids.shape[0], -1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1).double()


def _restored_rows(restore: Sequence[tuple[int, str] | None], block: int, component: str, window: int,
                   samples: int) -> list[int]:
    """The rows of a batch (`samples` per entry of `restore`) whose `component` is restored at `block`:
    those of the entries centred within the window around it."""
    low = window // 2
    rows = []
    for index, entry in enumerate(restore):
        if entry is not None and entry[1] == component and entry[0] - low <= block < entry[0] - low + window:
            rows.extend(range(index * samples, (index + 1) * samples))
    return rows


@torch.no_grad()
def trace_fact(model: nn.Module, item: TraceItem, noise: torch.Tensor, window: int = 1, batch: int = 256,
               components: Sequence[str] = COMPONENTS, stream: int = 0) -> dict:
    """p_clean, p_corrupt and p_restored [component][block] (means over the noise draws) of one fact.

    `noise` [samples, subject tokens, d] is added to stream `stream` (0: the embeddings) at the subject's
    tokens in every corrupted row; a block below that stream is not traced (restoring it changes nothing)."""
    parts = model_parts(model)
    device = parts.embed.weight.device
    blocks = range(parts.num_layers)
    ids = torch.tensor([item.context + item.answer_ids[:-1]], device=device)
    span = slice(item.subject_start, item.subject_end)
    modules = {(b, c): block_component(parts.blocks[b], c) for b in blocks for c in components}

    clean: dict[tuple[int, str], torch.Tensor] = {}
    handles = [module.register_forward_hook(
        lambda _m, _a, out, key=key: clean.__setitem__(key, _first(out)[0, span].clone()))
        for key, module in modules.items()]
    try:
        p_clean = float(_answer_logprob(model, ids, item).exp()[0])
    finally:
        for handle in handles:
            handle.remove()

    samples = noise.shape[0]
    entries: list[tuple[int, str] | None] = [None] + [(b, c) for c in components for b in blocks if b >= stream]
    per_chunk = max(1, batch // samples)
    probs: list[torch.Tensor] = []
    for first in range(0, len(entries), per_chunk):
        chunk = entries[first:first + per_chunk]
        probs.append(_corrupted_run(model, ids, item, noise, chunk, modules, clean, window, span, stream).exp())
    p = torch.cat(probs).view(len(entries), samples).mean(1)
    restored: dict[str, list[float | None]] = {c: [None] * parts.num_layers for c in components}
    for index, entry in enumerate(entries[1:], 1):
        restored[entry[1]][entry[0]] = float(p[index])
    return {"p_clean": p_clean, "p_corrupt": float(p[0]), "p_restored": restored}


def _corrupted_run(model: nn.Module, ids: torch.Tensor, item: TraceItem, noise: torch.Tensor,
                   entries: Sequence[tuple[int, str] | None], modules: dict, clean: dict, window: int,
                   span: slice, stream: int = 0) -> torch.Tensor:
    """log p(answer) of the rows of `entries` (each `samples` rows, one per noise draw) with stream `stream`
    corrupted at the subject's tokens and each entry's component restored."""
    samples = noise.shape[0]
    rows = ids.expand(len(entries) * samples, -1).contiguous()
    added = noise.to(ids.device).repeat(len(entries), 1, 1)

    def corrupt(_module, _args, out):
        hidden = _first(out)
        hidden[:, span] += added.to(hidden.dtype)

    def restore(key, chosen):
        index = torch.tensor(chosen, device=ids.device)

        def hook(_module, _args, out):
            _first(out)[index, span] = clean[key].to(_first(out).dtype)
        return hook

    handles = [corruption_site(model, stream).register_forward_hook(corrupt)]
    for (block, component), module in modules.items():
        if block < stream:  # computed before the noise: restoring it changes nothing
            continue
        chosen = _restored_rows(entries, block, component, window, samples)
        if chosen:
            handles.append(module.register_forward_hook(restore((block, component), chosen)))
    try:
        return _answer_logprob(model, rows, item)
    finally:
        for handle in handles:
            handle.remove()


def noise_for(item_index: int, seed: int, samples: int, tokens: int, width: int, scale: float) -> torch.Tensor:
    """The noise of one fact: its own CPU generator (seed, fact index), so that a fact's draws do not
    depend on which other facts are traced or on the device."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + item_index)
    return torch.randn(samples, tokens, width, generator=generator) * scale


def _effects(traces: Sequence[dict], component: str) -> list[float | None]:
    """Per block, the sum over facts of p_restored - p_corrupt (None for a block not traced)."""
    blocks = len(traces[0]["p_restored"][component]) if traces else 0
    return [None if traces[0]["p_restored"][component][b] is None else
            sum(t["p_restored"][component][b] - t["p_corrupt"] for t in traces) for b in range(blocks)]


def recovered_share(traces: Sequence[dict], components: Sequence[str]) -> dict[str, list[float | None]]:
    """Per component and block: sum over facts of (p_restored - p_corrupt) / sum of (p_clean - p_corrupt)."""
    damage = sum(t["p_clean"] - t["p_corrupt"] for t in traces)
    return {c: [None if e is None else e / damage if damage > 0 else 0.0 for e in _effects(traces, c)]
            for c in components}


def mean_effect(traces: Sequence[dict], components: Sequence[str]) -> dict[str, list[float | None]]:
    """The paper's average indirect effect: mean over facts of p_restored - p_corrupt."""
    return {c: [None if e is None else e / max(1, len(traces)) for e in _effects(traces, c)] for c in components}


def band(effect: Sequence[float | None], threshold: float) -> tuple[int, int]:
    """The band of blocks [first, last]: the block of the largest effect and its neighbours on either side,
    as far as each keeps at least `threshold` x that largest effect (a contiguous run around the peak).
    Blocks not traced (None) are in no band."""
    traced = [b for b, e in enumerate(effect) if e is not None]
    peak = max(traced, key=lambda b: (effect[b], -b))
    floor = threshold * effect[peak] if effect[peak] > 0 else math.inf

    def keeps(b: int) -> bool:
        return 0 <= b < len(effect) and effect[b] is not None and effect[b] >= floor

    first = last = peak
    while keeps(first - 1):
        first -= 1
    while keeps(last + 1):
        last += 1
    return first, last


def sample_items(items: Sequence, count: int, seed: int) -> list:
    """A seeded sample of `count` items in their order (all of them when count is 0 or at least their number)."""
    if not count or count >= len(items):
        return list(items)
    chosen = sorted(random.Random(f"locate:{seed}").sample(range(len(items)), count))
    return [items[i] for i in chosen]
