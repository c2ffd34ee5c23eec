"""Greedy continuations, perplexities and the fluency report, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lensunlearn.eval.fluency import (
    continuation_perplexity,
    fluency_report,
    fluency_table,
    greedy_continuations,
    perplexity_summary,
    text_perplexity,
)
from tests.conftest import make_tiny_model, tiny_tokenizer

# Different lengths, so that batching pads most of them on the left.
PROMPTS = ["the capital of france is", "gold", "the symbol of iron , the element , is",
           "question : what is the capital of spain ? answer :", "rome is in"]


def _greedy_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Reference: one prompt, no cache, no padding, the whole sequence recomputed for every token."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    prompt_text = tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids + new, skip_special_tokens=True)[len(prompt_text):]


def test_greedy_batched_equals_each_prompt_alone(arch):
    model, tokenizer = make_tiny_model(arch)
    batched = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=16)
    alone = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1)
    reference = [_greedy_alone(model, tokenizer, p, 8) for p in PROMPTS]
    assert batched == alone == reference
    assert sum(len(c.split()) for c in batched) >= 10  # real continuations, not a run of empty strings


def test_greedy_stops_at_eos_and_restores_train_mode():
    model, tokenizer = make_tiny_model("llama")
    full = greedy_continuations(model, tokenizer, PROMPTS[:1], max_new_tokens=10)[0].split()
    assert len(full) >= 4
    stop_word = full[2]
    stopping = tiny_tokenizer()
    stopping.eos_token = stop_word  # the model now ends its answer where it would write this word
    model.train()
    cut = greedy_continuations(model, stopping, PROMPTS[:1], max_new_tokens=10)[0].split()
    assert cut == full[:full.index(stop_word)]
    assert model.training


def _continuation_nll_by_hand(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    context = tokenizer(prompt)["input_ids"]
    tokens = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    total = 0.0
    with torch.no_grad():
        for t, token in enumerate(tokens):
            logits = model(torch.tensor([context + tokens[:t]])).logits[0, -1]
            total -= float(torch.log_softmax(logits.double(), -1)[token])
    return total, len(tokens)


def test_continuation_perplexity_matches_a_hand_computation():
    model, tokenizer = make_tiny_model("gpt2")
    continuations = [" paris is in france .", " au", "", " iron and gold , 3 4 5 6 7", "  "]
    prompts = PROMPTS[:4] + ["rome"]
    continuations[1] = " 79"  # two tokens
    got = continuation_perplexity(model, tokenizer, prompts, continuations, batch_size=2)
    for prompt, continuation, ppl in zip(prompts, continuations, got):
        if not continuation.strip():
            assert math.isnan(ppl)  # nothing to score
            continue
        nll, count = _continuation_nll_by_hand(model, tokenizer, prompt, continuation)
        assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_own_greedy_continuation_scores_lower_than_random_tokens():
    model, tokenizer = make_tiny_model("llama", seed=3)
    own = greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=6)
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<") and w.strip()]
    generator = torch.Generator().manual_seed(0)
    salad = [" " + " ".join(words[int(i)] for i in torch.randint(len(words), (6,), generator=generator))
             for _ in PROMPTS]
    own_ppl = continuation_perplexity(model, tokenizer, PROMPTS, own)
    salad_ppl = continuation_perplexity(model, tokenizer, PROMPTS, salad)
    scored = [(o, s) for o, s in zip(own_ppl, salad_ppl) if math.isfinite(o)]
    assert len(scored) >= 4
    assert all(o < s for o, s in scored)


def _text_perplexity_by_hand(model, tokenizer, texts, max_length: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"][:max_length]
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                total -= float(logprobs[t - 1, ids[t]])
                count += 1
    return math.exp(total / count)


def test_text_perplexity_matches_a_hand_computation_whatever_the_batching():
    model, tokenizer = make_tiny_model("qwen2")
    texts = ["the capital of france is paris .", "gold", "iron and oxygen",
             " ".join(["the element symbol of gold is au"] * 6), "rome is the capital of italy , 1 2 3"]
    expected = _text_perplexity_by_hand(model, tokenizer, texts, max_length=16)
    for batch_size in (1, 2, 8):
        assert text_perplexity(model, tokenizer, texts, max_length=16, batch_size=batch_size) == pytest.approx(
            expected, rel=1e-5)
    assert text_perplexity(model, tokenizer, texts, max_length=64) != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="nothing to predict"):
        text_perplexity(model, tokenizer, ["gold", ""])


def test_perplexity_summary_is_robust_to_the_tail():
    summary = perplexity_summary([10.0, 1000.0, 100.0, math.nan])
    assert summary["n"] == 4 and summary["empty"] == 1
    assert summary["median"] == 100.0
    assert summary["geometric_mean"] == pytest.approx(100.0)
    assert summary["mean"] == pytest.approx(370.0)
    assert perplexity_summary([math.nan])["median"] is None


def test_fluency_report_is_json_ready_and_tabulates():
    base, tokenizer = make_tiny_model("llama", seed=0)
    other, _ = make_tiny_model("llama", seed=1)
    prompts = {"forget": PROMPTS[:2], "kept | other": PROMPTS[2:]}
    report = fluency_report(base, {"base": base, "unlearned": other}, tokenizer, prompts, max_new_tokens=5)
    json.dumps(report, allow_nan=False)
    row = report["groups"]["forget"]["models"]["unlearned"]
    assert row["continuations"] == greedy_continuations(other, tokenizer, PROMPTS[:2], max_new_tokens=5)
    expected = continuation_perplexity(base, tokenizer, PROMPTS[:2], row["continuations"])
    assert [p if p is None else pytest.approx(p) for p in row["perplexities"]] == [
        None if math.isnan(e) else e for e in expected]
    assert row["summary"] == perplexity_summary(expected)
    table = fluency_table(report)
    assert "| kept \\| other | unlearned |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == (1 + 4) + (1 + 2 * 2) + (1 + 3 * 2)


def test_mismatched_inputs_are_refused_before_compute():
    model, tokenizer = make_tiny_model("llama")
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        continuation_perplexity(model, tokenizer, PROMPTS[:2], ["x"])
    with pytest.raises(ValueError, match="must be positive"):
        greedy_continuations(model, tokenizer, PROMPTS, max_new_tokens=0)
