"""The unlearning objective on hand-computed values: losses, schedule, chunking and the strategies."""

from __future__ import annotations

import math

import pytest
import torch

from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.layers import forward_streams
from lensunlearn.modeling.losses import (
    lens_forget_loss,
    random_ce,
    random_targets,
    retain_kl,
    retain_l2,
    select_tokens,
    uniform_ce,
    vocab_cross_entropy,
)
from lensunlearn.unlearning.objective import AdapterDisabled, FrozenCopy, UnlearnObjective, schedule

from ..conftest import make_tiny_model


def test_uniform_ce_is_log_vocab_for_constant_logits_and_larger_otherwise():
    assert uniform_ce(torch.full((2, 8), 3.0)).tolist() == pytest.approx([math.log(8)] * 2)
    z = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4): CE to uniform = -(ln 1/4 + ln 3/4) / 2
    assert uniform_ce(z).item() == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2)
    assert uniform_ce(z).item() > math.log(2)


def test_random_ce_averaged_over_all_targets_is_uniform_ce():
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    every = torch.stack([random_ce(z, torch.full((5,), v)) for v in range(7)]).mean(0)
    torch.testing.assert_close(every, uniform_ce(z))
    assert random_ce(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])).item() == pytest.approx(-math.log(0.75))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("random_target", [False, True])
def test_fused_cross_entropy_matches_the_plain_functions_and_their_gradients(with_bias, random_target):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 8, generator=generator)
    bias = torch.randn(37, generator=generator) if with_bias else None
    x = torch.randn(6, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 37, (6,), generator=generator) if random_target else None
    scale = torch.randn(6, generator=generator)  # a non-uniform upstream gradient
    fused = vocab_cross_entropy(x, weight, bias, targets)
    (fused_grad,) = torch.autograd.grad((fused * scale).sum(), x)
    logits = torch.nn.functional.linear(x, weight, bias)
    plain = random_ce(logits, targets) if random_target else uniform_ce(logits)
    (plain_grad,) = torch.autograd.grad((plain * scale).sum(), x)
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: values only
        torch.testing.assert_close(vocab_cross_entropy(x, weight, bias, targets), fused.detach())


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_cross_entropy_against_a_distribution_is_its_plain_cross_entropy(with_bias):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(37, 8, generator=generator)
    bias = torch.randn(37, generator=generator) if with_bias else None
    x = torch.randn(6, 8, generator=generator, requires_grad=True)
    q = torch.softmax(torch.randn(6, 37, generator=generator), dim=-1)
    expected = (q @ weight, None if bias is None else q @ bias)
    fused = vocab_cross_entropy(x, weight, bias, target_mean=expected)
    plain = -(q * torch.log_softmax(torch.nn.functional.linear(x, weight, bias), dim=-1)).sum(-1)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(fused.sum(), x)[0], torch.autograd.grad(plain.sum(), x)[0],
                               rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_in_bfloat16_stays_close_and_refuses_a_trainable_weight():
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(50, 16, generator=generator), torch.randn(4, 16, generator=generator)
    exact = uniform_ce(x @ weight.T)
    torch.testing.assert_close(vocab_cross_entropy(x, weight.to(torch.bfloat16)), exact, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="freeze it"):
        vocab_cross_entropy(x, weight.requires_grad_())


def test_lens_cross_entropy_is_uniform_ce_of_the_lens_logits_at_every_layer():
    lens, streams = _lens_and_streams()
    h = streams[0].detach()
    for layer in (0, 2, lens.num_layers):  # a translated layer, and the model's own output
        torch.testing.assert_close(lens.cross_entropy(h, layer), uniform_ce(lens(h, layer)), rtol=1e-6, atol=1e-6)
    lens.unembed.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze it"):
        lens.cross_entropy(h, 2)


def test_retain_l2_is_the_unsquared_norm_and_kl_is_zero_for_equal_logits():
    assert retain_l2(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)).tolist() == [5.0]
    z = torch.randn(3, 6)
    assert retain_kl(z, z).abs().max().item() < 1e-6
    p = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4), q uniform
    assert retain_kl(p, torch.zeros(1, 2)).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))


def test_schedule_ramps_retain_up_and_forget_down_over_one_epoch():
    assert schedule(0, 10, 5.0, 4.0) == (0.0, 4.0)
    assert schedule(5, 10, 5.0, 4.0) == pytest.approx((2.5, 3.5))
    assert schedule(10, 10, 5.0, 4.0) == pytest.approx((5.0, 3.0))
    assert schedule(25, 10, 5.0, 4.0) == pytest.approx((5.0, 3.0))


def _lens_and_streams(vocab_zero: bool = False):
    model, _ = make_tiny_model("llama")
    lens = TunedLens.from_model(model)
    if vocab_zero:
        torch.nn.init.zeros_(lens.unembed.weight)
    generator = torch.Generator().manual_seed(1)
    streams = [torch.randn(11, 32, generator=generator, requires_grad=True) for _ in range(2)]
    return lens, streams


def test_forget_loss_is_exactly_one_for_a_uniform_lens_and_at_least_one_otherwise():
    lens, streams = _lens_and_streams(vocab_zero=True)
    assert lens_forget_loss(lens, [1, 3], streams).item() == pytest.approx(1.0, abs=1e-6)
    targets = [random_targets(11, lens.unembed.weight.shape[0], seed) for seed in (0, 1)]
    assert lens_forget_loss(lens, [1, 3], streams, targets).item() == pytest.approx(1.0, abs=1e-6)
    lens, streams = _lens_and_streams()
    assert lens_forget_loss(lens, [1, 3], streams).item() > 1.0


def test_random_target_forget_loss_has_the_uniform_expectation():
    lens, streams = _lens_and_streams()
    vocab = lens.unembed.weight.shape[0]
    uniform = lens_forget_loss(lens, [1, 3], streams)
    every = torch.stack([lens_forget_loss(lens, [1, 3], streams, [torch.full((11,), v)] * 2) for v in range(vocab)])
    assert every.mean().item() == pytest.approx(uniform.item(), rel=1e-5)


@pytest.mark.parametrize("frozen", [False, True])  # recomputed in backward, or differentiated at once
def test_chunked_forget_loss_equals_naive_loss_and_gradients(frozen):
    lens, streams = _lens_and_streams()
    lens.requires_grad_(False).translators.requires_grad_(not frozen)
    chunked = lens_forget_loss(lens, [1, 3], streams, chunk=3)
    grads = torch.autograd.grad(chunked, streams)
    naive = torch.stack([uniform_ce(lens(h, l)).mean() for h, l in zip(streams, [1, 3])]).mean()
    naive = naive / math.log(lens.unembed.weight.shape[0])
    naive_grads = torch.autograd.grad(naive, streams)
    assert chunked.item() == pytest.approx(naive.item(), abs=1e-6)
    for a, b in zip(grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _batch(tokenizer, texts):
    from lensunlearn.data.corpora import collate

    return collate([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


@pytest.mark.parametrize("retain_loss", ["l2", "kl"])
def test_objective_starts_with_zero_retain_loss_in_both_modes(retain_loss):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = make_tiny_model("gpt_neox")
    lens = TunedLens.from_model(model).requires_grad_(False)
    forget = _batch(tokenizer, ["the capital of france is paris .", "rome is in italy"])
    retain = _batch(tokenizer, ["gold iron oxygen element symbol", "the answer is 3"])
    full = UnlearnObjective(model, lens, [1, 3], FrozenCopy(model), retain_loss)
    peft_model = get_peft_model(make_tiny_model("gpt_neox")[0], LoraConfig(r=4, target_modules=["query_key_value"]))
    lora = UnlearnObjective(peft_model, lens, [1, 3], AdapterDisabled(peft_model), retain_loss)
    for objective in (full, lora):
        forget_loss, retain_value = objective.losses(forget, retain)
        assert forget_loss.item() > 1.0
        assert retain_value.item() == pytest.approx(0.0, abs=1e-5)
        loss, f, r = objective(forget, retain, 0.0, 5.0)
        assert r.item() == 0.0 and loss.item() == pytest.approx(5.0 * f.item())
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora" in n)
    # Stream 3 depends on blocks 0..2 only: block 3 gets no gradient from the l2 objective.
    if retain_loss == "l2":
        assert all(p.grad is None for p in model.gpt_neox.layers[3].parameters())


def test_forget_loss_reads_the_same_streams_as_forward_streams():
    model, tokenizer = make_tiny_model("llama")
    lens = TunedLens.from_model(model)
    batch = _batch(tokenizer, ["the capital of spain is madrid", "paris"])
    objective = UnlearnObjective(model, lens, [2], FrozenCopy(model))
    streams = forward_streams(model, [2], batch["input_ids"], batch["attention_mask"])
    h = select_tokens(streams[2], batch["attention_mask"])
    expected = uniform_ce(lens(h, 2)).mean() / math.log(lens.unembed.weight.shape[0])
    assert objective.forget_loss(batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_skip_first_leaves_the_first_positions_out_of_both_losses():
    model, tokenizer = make_tiny_model("llama")
    lens = TunedLens.from_model(model).requires_grad_(False)
    batch = _batch(tokenizer, ["the capital of spain is madrid", "paris is in france"])
    objective = UnlearnObjective(model, lens, [2], FrozenCopy(model), skip_first=1)
    streams = forward_streams(model, [2], batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].clone()
    mask[:, 0] = 0
    expected = uniform_ce(lens(select_tokens(streams[2], mask), 2)).mean() / math.log(lens.unembed.weight.shape[0])
    assert objective.forget_loss(batch).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="no tokens left"):
        UnlearnObjective(model, lens, [2], FrozenCopy(model), skip_first=50).forget_loss(batch)


def test_frozen_chunked_sum_matches_recomputed_in_value_and_gradient():
    from lensunlearn.modeling.losses import chunked_token_sum

    weight = torch.randn(50, 8)
    h = torch.randn(13, 8, requires_grad=True)
    per_token = lambda x: uniform_ce(x @ weight.T)  # noqa: E731
    recomputed = chunked_token_sum(per_token, h * 2, chunk=4)
    recomputed.backward()
    expected_grad, h.grad = h.grad.clone(), None
    frozen = chunked_token_sum(per_token, h * 2, chunk=4, frozen=True)
    (3 * frozen).backward()
    assert frozen.item() == pytest.approx(recomputed.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, 3 * expected_grad)


@pytest.mark.parametrize("retain_loss", ["l2", "kl"])
def test_original_cache_serves_revisited_documents_with_the_same_loss(retain_loss):
    from peft import LoraConfig, get_peft_model

    from lensunlearn.unlearning.objective import OriginalCache

    model, tokenizer = make_tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lens = TunedLens.from_model(model).requires_grad_(False)
    texts = ["gold iron oxygen element symbol", "the answer is 3", "the capital of spain is madrid ."]
    plain = UnlearnObjective(peft_model, lens, [1, 3], AdapterDisabled(peft_model), retain_loss)
    cache = OriginalCache(max_bytes=2**20)
    cached = UnlearnObjective(peft_model, lens, [1, 3], AdapterDisabled(peft_model), retain_loss, cache=cache)

    def batch(rows):
        out = _batch(tokenizer, [texts[r] for r in rows])
        out["doc_ids"] = torch.tensor(rows)
        return out

    for rows, hits, misses in (([0, 1], 0, 2), ([1, 2], 1, 1), ([2, 0, 1], 3, 0)):
        expected = plain.retain_loss(batch(rows)).item()
        assert expected > 0  # the adapters are not zero, so the models differ
        assert cached.retain_loss(batch(rows)).item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert cache.take_counts() == (hits, misses)
    assert len(cache.store) == 3


@pytest.mark.parametrize("retain_loss", ["l2", "relative", "kl"])
def test_retain_loss_by_length_groups_is_the_padded_batch_loss(retain_loss):
    """Everyday prose beside short fact sentences is padded by length groups (`label_length_groups`); the
    retain loss and its gradients are those of the one padded batch, with and without the original cache."""
    from peft import LoraConfig, get_peft_model

    from lensunlearn.data.corpora import collate, label_length_groups, length_group_batches
    from lensunlearn.unlearning.objective import OriginalCache

    model, tokenizer = make_tiny_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lens = TunedLens.from_model(model).requires_grad_(False)
    long = " ".join(["gold iron oxygen element symbol the answer is 3"] * 4)
    docs = [tokenizer(t)["input_ids"] for t in ("paris", long, "the capital of spain is madrid .", "rome", long[:40])]
    padded = collate(docs, tokenizer.pad_token_id)
    padded["doc_ids"] = torch.arange(len(docs))
    grouped = label_length_groups({k: v.clone() for k, v in padded.items()}, [len(d) for d in docs])
    parts = length_group_batches(grouped)
    assert len(parts) > 1 and sum(p["input_ids"].numel() for p in parts) < padded["input_ids"].numel()
    assert sorted(int(i) for p in parts for i in p["doc_ids"]) == list(range(len(docs)))
    for part in parts:  # each group cut to its own longest document, its rows' ids following them
        assert part["input_ids"].shape[1] == int(part["attention_mask"].sum(1).max())
        for row, doc in enumerate(part["doc_ids"].tolist()):
            assert part["input_ids"][row, :len(docs[doc])].tolist() == docs[doc]
    lora = [p for n, p in peft_model.named_parameters() if "lora" in n]
    for cache in (None, OriginalCache(max_bytes=2**20)):
        objective = UnlearnObjective(peft_model, lens, [1, 3], AdapterDisabled(peft_model), retain_loss,
                                     skip_first=1, cache=cache)
        values = []
        for batch in (padded, grouped, grouped):  # the second grouped pass reads the cache where there is one
            value = objective.retain_loss(batch)
            grads = torch.autograd.grad(value, lora, allow_unused=True)  # blocks past stream 3 get none
            values.append((value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(lora, grads)]))
        assert values[0][0].item() > 0 and any(g.abs().sum() > 0 for g in values[0][1])
        for value, grads in values[1:]:
            torch.testing.assert_close(value, values[0][0], rtol=1e-5, atol=1e-7)
            for a, b in zip(grads, values[0][1]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_original_cache_stops_adding_at_its_budget():
    from lensunlearn.unlearning.objective import OriginalCache

    cache = OriginalCache(max_bytes=3 * 4 * 10)  # room for three streams of 10 floats
    for doc in range(5):
        cache.put(doc, {1: torch.zeros(10)})
    assert sorted(cache.store) == [0, 1, 2] and cache.bytes == 120 and cache.take_counts() == (0, 5)


def test_bfloat16_autocast_on_cpu_keeps_the_losses_float32_and_close():
    model, tokenizer = make_tiny_model("llama")
    lens = TunedLens.from_model(model).requires_grad_(False)
    forget = _batch(tokenizer, ["the capital of spain is madrid", "paris is in france"])
    retain = _batch(tokenizer, ["gold iron oxygen element symbol", "the answer is 3"])
    objective = UnlearnObjective(model, lens, [1, 3], FrozenCopy(model))
    exact = objective.forget_loss(forget)
    with torch.autocast("cpu", torch.bfloat16):
        fast, retain_value = objective.losses(forget, retain)
    assert fast.dtype == torch.float32 and retain_value.dtype == torch.float32
    assert fast.item() == pytest.approx(exact.item(), rel=1e-2) and fast.item() != exact.item()


def test_forget_loss_at_the_output_layer_is_the_uniform_ce_of_the_model_logits():
    model, tokenizer = make_tiny_model("llama")
    lens = TunedLens.from_model(model).requires_grad_(False)
    batch = _batch(tokenizer, ["the capital of spain is madrid", "paris"])
    top = len(model.model.layers)
    with torch.no_grad():
        logits = model(**batch).logits
    expected = uniform_ce(select_tokens(logits, batch["attention_mask"])).mean() / math.log(logits.shape[-1])
    objective = UnlearnObjective(model, lens, [2, top], FrozenCopy(model))
    assert objective.forget_loss(batch).item() == pytest.approx(
        (expected.item() + UnlearnObjective(model, lens, [2], FrozenCopy(model)).forget_loss(batch).item()) / 2,
        rel=1e-5)
    assert objective.retain_loss(batch).item() == pytest.approx(0.0, abs=1e-6)
