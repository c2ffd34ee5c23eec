"""What a model says and how fluent it still is: greedy continuations and perplexities.

Multiple-choice accuracy shows what a model knows; it does not show whether an unlearned model
now answers a forget prompt with token salad, or whether it still writes ordinary text elsewhere.
These functions give the qualitative side for any Hugging Face causal LM on CPU or GPU:

* `greedy_continuations`: the argmax continuation of each prompt, batched with left padding and
  explicit position ids, so a prompt's continuation never depends on what it was batched with;
* `continuation_perplexity`: each continuation's perplexity under a reference (the base) model,
  given its prompt; salad scores high, ordinary text low, whatever model wrote it;
* `text_perplexity`: a model's token-weighted perplexity on held-out texts;
* `fluency_report` / `fluency_table`: both, per prompt group and model, as JSON and markdown.

All models are assumed to share the one tokenizer (an unlearned or attacked model keeps its
base model's tokenizer).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..report.tables import cell, number
from ..report.tables import markdown_table as table
from .evaluate import encode_request


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no autograd for the duration, the caller's train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out, so any id will do


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokenizer's EOS and the model's generation EOS ids (chat models often end turns with another one)."""
    ids = {tokenizer.eos_token_id}
    generation = getattr(model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {int(i) for i in ids if i is not None}


def _left_padded(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask, and position ids that start at 0 on each row's first real token.

    Without explicit positions a left-padded row would start counting at its padding, and its
    continuation would differ from the same prompt generated alone.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def decode_batch(model: nn.Module, rows: Sequence[list[int]], max_new_tokens: int, pad_id: int, stop: set[int],
                 choose: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[list[int]]:
    """Decoding with a KV cache in eval mode, without autograd; each row's new ids, cut before its first
    stop id. `choose` maps the [rows, vocabulary] next-token logits to the [rows] next ids (argmax when
    None); it is called for every row at every step, finished rows included, so that a seeded sampler
    draws the same numbers whichever rows have stopped."""
    with _inference(model) as device:
        batch = _left_padded(rows, pad_id, device)
        mask, positions = batch["attention_mask"], batch["position_ids"][:, -1:]
        out = model(**batch, use_cache=True)
        # transformers 5 renamed the KV cache `past_key_values` to `cache`: hand it back under the name it came
        # with.
        cache_key = "cache" if "cache" in out else "past_key_values"
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1]
            token = logits.argmax(-1) if choose is None else choose(logits)
            for i, t in enumerate(token.tolist()):
                done[i] = done[i] or t in stop
                if not done[i]:
                    new[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_key: out[cache_key]})
    return new


def _new_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new ids add to the prompt, decoded together so that word boundaries (a leading
    space) come out as they would in the whole text; `prompt + result` is the generated text."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    return whole[len(prompt):] if whole.startswith(prompt) else tokenizer.decode(new_ids, skip_special_tokens=True)


def greedy_continuations(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12,
                         batch_size: int = 16) -> list[str]:
    """Each prompt's greedy (argmax) continuation: only the new text, stopped at EOS, special tokens dropped.

    Batched with left padding; the result for a prompt is the one it gets when generated alone.
    Padding changes the arithmetic in the last bits only, which is enough to flip a near-tie
    between two tokens in bfloat16 but not, in practice, in float32. The prompt is tokenised
    with the tokenizer's own special tokens.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be positive, got {max_new_tokens} and {batch_size}")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt(s) {empty} tokenise to nothing: a continuation needs at least one prompt token")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths, little padding
    results: list[str] = [""] * len(prompts)
    pad_id, stop = pad_id_of(tokenizer), stop_ids(model, tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        new = decode_batch(model, [encoded[i] for i in chunk], max_new_tokens, pad_id, stop)
        for i, ids in zip(chunk, new):
            results[i] = _new_text(tokenizer, encoded[i], ids)
    return results


def _sequence_nll(model: nn.Module, rows: Sequence[tuple[list[int], int]], pad_id: int,
                  device: torch.device) -> list[tuple[float, int]]:
    """Per row (ids, n_context): summed NLL (float64) of the tokens after the first n_context, and their count.

    Rows are right-padded: a causal model's outputs at real positions never see the padding.
    """
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n_context) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, n_context:len(row)] = torch.tensor(row[n_context:])
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    targets = labels[:, 1:].to(device)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
    sums = nll.double().sum(-1).tolist()
    counts = (targets != -100).sum(-1).tolist()
    return list(zip(sums, counts))


def _scored(model: nn.Module, rows: Sequence[tuple[list[int], int]], pad_id: int,
            batch_size: int) -> list[tuple[float, int]]:
    """`_sequence_nll` over all rows in batches of similar length, in the input order."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with _inference(model) as device:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, result in zip(chunk, _sequence_nll(model, [rows[i] for i in chunk], pad_id, device)):
                out[i] = result
    return out


def continuation_perplexity(reference_model: nn.Module, tokenizer, prompts: Sequence[str],
                            continuations: Sequence[str], batch_size: int = 16) -> list[float]:
    """Perplexity of each continuation under `reference_model`, given its prompt: exp of the mean NLL
    of the continuation's tokens only (the prompt is context, not scored).

    Prompt and continuation are tokenised together and split as lm-eval does, so a continuation
    that a model generated is scored on the tokens it reads as in the whole text. An empty or
    whitespace-only continuation (the model stopped at once, or wrote only blanks) gets NaN:
    it has no words whose fluency could be judged.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: pass one per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scored = [i for i, c in enumerate(continuations) if c.strip()]
    rows = []
    for i in scored:
        enc = encode_request(tokenizer, prompts[i], [continuations[i]])
        rows.append((enc.context + enc.continuations[0], len(enc.context)))
    results = [math.nan] * len(prompts)
    if rows:
        for i, (nll, count) in zip(scored, _scored(reference_model, rows, pad_id_of(tokenizer), batch_size)):
            results[i] = math.exp(nll / count)
    return results


def text_perplexity(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 256,
                    batch_size: int = 8) -> float:
    """Perplexity of `model` on held-out texts: exp of the token-weighted mean NLL over every predicted
    token (all but each text's first), each text cut to its first `max_length` tokens.

    Token-weighted rather than a mean of per-text perplexities, so that a long text counts for
    its length and a two-token text cannot dominate.
    """
    if max_length < 2 or batch_size < 1:
        raise ValueError(f"max_length must be at least 2 and batch_size positive, got {max_length} and {batch_size}")
    rows = [(ids[:max_length], 1) for ids in (tokenizer(t)["input_ids"] for t in texts)]
    rows = [r for r in rows if len(r[0]) >= 2]
    if not rows:
        raise ValueError("no text has two or more tokens, so there is nothing to predict: pass longer texts")
    scored = _scored(model, rows, pad_id_of(tokenizer), batch_size)
    return math.exp(sum(nll for nll, _ in scored) / sum(count for _, count in scored))


def perplexity_summary(perplexities: Sequence[float]) -> dict[str, Any]:
    """Median, geometric and arithmetic mean of the finite perplexities, and how many were empty (NaN).

    Perplexities are heavy-tailed: one salad answer at 10^4 swamps an arithmetic mean of answers
    near 10. The geometric mean is the exp of the mean log-perplexity (averaging in the space the
    model is trained in); the median ignores the tail altogether. Both are the ones to compare.
    """
    finite = [p for p in perplexities if math.isfinite(p)]
    summary: dict[str, Any] = {"n": len(perplexities), "empty": len(perplexities) - len(finite)}
    if not finite:
        return {**summary, "median": None, "geometric_mean": None, "mean": None}
    return {**summary, "median": statistics.median(finite),
            "geometric_mean": math.exp(statistics.fmean(math.log(p) for p in finite)),
            "mean": statistics.fmean(finite)}


def fluency_report(base_model: nn.Module, models: Mapping[str, nn.Module], tokenizer,
                   prompts: Mapping[str, Sequence[str]], max_new_tokens: int = 12, batch_size: int = 16) -> dict:
    """For each prompt group and model: the greedy continuations, their perplexities under `base_model`
    and a summary (`perplexity_summary`). JSON-ready: an empty continuation's perplexity is None.

    Put the base model in `models` too (e.g. "base") to see its own answers beside the others'.
    """
    groups: dict[str, Any] = {}
    for group, texts in prompts.items():
        rows: dict[str, Any] = {}
        for name, model in models.items():
            continuations = greedy_continuations(model, tokenizer, texts, max_new_tokens, batch_size)
            ppl = continuation_perplexity(base_model, tokenizer, texts, continuations, batch_size)
            rows[name] = {"continuations": continuations,
                          "perplexities": [p if math.isfinite(p) else None for p in ppl],
                          "summary": perplexity_summary(ppl)}
        groups[group] = {"prompts": list(texts), "models": rows}
    return {"max_new_tokens": max_new_tokens, "groups": groups}


def fluency_table(report: dict) -> str:
    """The report as markdown: a summary per group and model, then every prompt's continuations."""
    summary = [[group, name, row["summary"]["n"], row["summary"]["empty"], number(row["summary"]["median"], 1),
                number(row["summary"]["geometric_mean"], 1), number(row["summary"]["mean"], 1)]
               for group, data in report["groups"].items() for name, row in data["models"].items()]
    lines = [table(["group", "model", "n", "empty", "median ppl", "geo-mean ppl", "mean ppl"], summary, "llrrrrr")]
    for group, data in report["groups"].items():
        rows = [[prompt, name, row["continuations"][k], number(row["perplexities"][k], 1)]
                for k, prompt in enumerate(data["prompts"]) for name, row in data["models"].items()]
        lines += ["", f"**{cell(group)}** (perplexity under the base model)", "",
                  table(["prompt", "model", "continuation", "ppl"], rows, "lllr")]
    return "\n".join(lines)
