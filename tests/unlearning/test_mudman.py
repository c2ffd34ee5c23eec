"""Disruption masking, gradient normalisation and the relearning adversary, on hand-made tensors and tiny models."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from lensunlearn.data.corpora import collate
from lensunlearn.train.loop import NonFiniteLossError
from lensunlearn.unlearning.mudman import (
    Adversary,
    disruption_mask,
    global_norm,
    lm_loss,
    mask_grads,
    normalise_grads,
)

from ..conftest import make_tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FORGET = ["the capital of france is paris .", "the capital of italy is rome", "the capital of spain is madrid , and"]
MORE_FORGET = ["paris is in france .", "rome is the capital of italy and an it"]

# ------------------------------------------------------------------------------------------ masking


def test_mask_zeroes_exactly_the_disagreeing_signs():
    forget = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, 0.0, -6.0, 7.0])
    retain = torch.tensor([2.0, -1.0, -3.0, 4.0, 0.0, 1.0, 0.0, 0.5])
    kept = torch.tensor([1.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0])
    before = forget.clone(), retain.clone()
    assert torch.equal(disruption_mask(forget, retain), kept)
    assert torch.equal(forget, before[0]) and torch.equal(retain, before[1])  # inputs untouched
    matrix_f, matrix_r = torch.tensor([[1.5, -1.0], [-2.0, 3.0]]), torch.tensor([[0.1, 0.2], [-9.0, -3.0]])
    assert torch.equal(disruption_mask(matrix_f, matrix_r), torch.tensor([[1.5, 0.0], [-2.0, 0.0]]))


def test_mask_grads_per_name_copy_and_inplace():
    forget = {"a": torch.tensor([1.0, -1.0]), "b": torch.tensor([[2.0], [-3.0]])}
    retain = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[-2.0], [-1.0]])}
    masked = mask_grads(forget, retain)
    assert torch.equal(masked["a"], torch.tensor([1.0, 0.0]))
    assert torch.equal(masked["b"], torch.tensor([[0.0], [-3.0]]))
    assert torch.equal(forget["a"], torch.tensor([1.0, -1.0]))
    same = mask_grads(forget, retain, inplace=True)
    assert same["a"] is forget["a"] and torch.equal(forget["a"], masked["a"]) and torch.equal(forget["b"], masked["b"])
    with pytest.raises(ValueError, match="only in forget"):
        mask_grads({"a": forget["a"], "c": forget["a"]}, retain)
    with pytest.raises(ValueError, match="shape"):
        mask_grads({"a": forget["a"], "b": forget["a"]}, retain)


@pytest.mark.parametrize("device", DEVICES)
def test_normalise_sets_the_global_norm_and_keeps_the_direction(device):
    grads = {"a": torch.tensor([[3.0, 0.0], [0.0, 4.0]], device=device), "b": torch.tensor([0.0, 0.0, 12.0],
                                                                                        device=device)}
    out = normalise_grads(grads)  # default: sqrt(7 elements), one per element on average
    assert global_norm(out).item() == pytest.approx(math.sqrt(7), rel=1e-6)
    for name, g in grads.items():
        assert torch.equal(out[name] == 0, g == 0)  # zeros stay zero
        assert torch.allclose(out[name], g * (math.sqrt(7) / 13))  # one positive factor: same direction
    assert global_norm(normalise_grads(grads, 1.0)).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(grads["b"], torch.tensor([0.0, 0.0, 12.0], device=device))  # not in place unless asked
    same = normalise_grads(grads, 2.0, inplace=True)
    assert same["a"] is grads["a"] and global_norm(grads).item() == pytest.approx(2.0, rel=1e-6)


def test_normalise_leaves_zero_and_negligible_gradients_at_zero():
    zeros = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    out = normalise_grads(zeros)
    assert all(torch.equal(out[n], zeros[n]) for n in zeros)
    tiny = normalise_grads({"a": torch.full((3,), 1e-20)}, eps=1e-12)
    assert torch.equal(tiny["a"], torch.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        normalise_grads(zeros, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        normalise_grads({})


def test_normalise_then_mask_is_the_mudman_update():
    # MUDMAN divides the masked gradient by the norm of the unmasked one
    forget = {"a": torch.tensor([1.0, -2.0, 2.0]), "b": torch.tensor([4.0])}
    retain = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([-1.0])}
    update = mask_grads(normalise_grads(forget, 1.0), retain)
    assert torch.allclose(update["a"], torch.tensor([1.0, 0.0, 2.0]) / 5) and torch.equal(update["b"], torch.zeros(1))


# ---------------------------------------------------------------------------------------- adversary


def _setup(kind: str, device: str = "cpu"):
    """A tiny 2-layer Llama, trainable in full or through LoRA adapters (non-zero B), and a padded forget batch."""
    model, tokenizer = make_tiny_model("llama", seed=0, layers=2)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    else:
        model.requires_grad_(True)
    model.to(device).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in params) == (kind == "lora")
    batches = [collate([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
               for texts in (FORGET, MORE_FORGET)]
    return model, params, batches


def _snapshot(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def _bitwise_equal(params, snapshot) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in params.items())


def test_lm_loss_is_next_token_cross_entropy_ignoring_padding():
    model, _, (batch, _) = _setup("full")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    assert lm_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    other_pad = {"input_ids": ids.masked_fill(mask == 0, 5), "attention_mask": mask}
    assert lm_loss(model, other_pad).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_gradients_inside_applied_are_those_of_the_attacked_fork(kind, device):
    model, params, (batch, more) = _setup(kind, device)
    adversary = Adversary(params, lambda b: lm_loss(model, b), lr=1e-2, optimizer="adam")
    adversary.relearn(batch)
    adversary.relearn(more)
    assert all(d.abs().sum() > 0 for d in adversary.delta.values())
    trained = _snapshot(params)

    # the loss evaluated independently, on a copy whose weights are set to trained + delta
    reference = copy.deepcopy(model)
    reference_params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in reference_params.items():
            p.add_(adversary.delta[name])
    lm_loss(reference, batch).backward()

    model.zero_grad(set_to_none=True)
    with adversary.applied():
        assert all(torch.equal(p, reference_params[n]) for n, p in params.items())
        lm_loss(model, batch).backward()
    assert _bitwise_equal(params, trained)
    for name, p in params.items():
        assert p is dict(model.named_parameters())[name]
        assert p.grad is not None and torch.equal(p.grad, reference_params[name].grad), name


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_an_exception_inside_applied_still_restores_the_trained_weights(kind):
    model, params, (batch, _) = _setup(kind)
    adversary = Adversary(params, lambda b: lm_loss(model, b), lr=1e-2, optimizer="adam")
    adversary.relearn(batch)
    trained = _snapshot(params)
    with pytest.raises(RuntimeError, match="boom"), adversary.applied():
        assert not _bitwise_equal(params, trained)
        lm_loss(model, batch).backward()
        with torch.no_grad():
            for p in params.values():
                p.mul_(3.0)  # even a body that scribbles on the weights
        raise RuntimeError("boom")
    assert _bitwise_equal(params, trained)
    assert all(p.grad is not None for p in params.values())
    with adversary.applied():  # usable again
        pass
    assert _bitwise_equal(params, trained)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_relearning_lowers_the_forget_loss_at_the_fork_only(kind):
    model, params, (batch, _) = _setup(kind)
    trained = _snapshot(params)
    adversary = Adversary(params, lambda b: lm_loss(model, b), lr=5e-2, steps_per_fork=100, optimizer="adam")
    with torch.no_grad():
        base = lm_loss(model, batch).item()
    losses = [adversary.relearn(batch) for _ in range(6)]
    with torch.no_grad(), adversary.applied():
        attacked = lm_loss(model, batch).item()
    assert losses[0] == pytest.approx(base, rel=1e-6)  # the first step starts at the trained weights
    assert attacked < base - 0.1 and losses[-1] < losses[0]
    assert _bitwise_equal(params, trained)
    with torch.no_grad():
        assert lm_loss(model, batch).item() == base


def test_relearn_keeps_the_callers_gradients():
    model, params, (batch, _) = _setup("full")
    for p in params.values():
        p.grad = torch.full_like(p, 7.0)
    grads = {n: p.grad for n, p in params.items()}
    adversary = Adversary(params, lambda b: lm_loss(model, b), lr=0.1)
    adversary.relearn(batch)  # outside applied()
    with adversary.applied():
        adversary.relearn(batch)  # and inside
    assert all(p.grad is grads[n] and torch.all(p.grad == 7.0) for n, p in params.items())


def test_sgd_step_is_minus_lr_times_the_gradient_then_decay():
    model, params, (batch, more) = _setup("full")
    lm_loss(model, batch).backward()
    gradient = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    adversary = Adversary(params, lambda b: lm_loss(model, b), lr=0.1, decay=0.5)
    adversary.relearn(batch)
    for name, g in gradient.items():
        assert torch.allclose(adversary.delta[name], -0.05 * g, rtol=1e-6, atol=1e-9), name
    # micro-batches average: two copies of a batch make the same step as the batch once
    twice = Adversary(params, lambda b: lm_loss(model, b), lr=0.1, decay=0.5)
    assert twice.relearn([batch, batch]) == pytest.approx(lm_loss(model, batch).item(), rel=1e-6)
    assert all(torch.allclose(twice.delta[n], adversary.delta[n], rtol=1e-6, atol=1e-9) for n in params)
    # reduce_grads (an all-reduce mean under DDP) sees the attacker's gradients before the step
    doubled = Adversary(params, lambda b: lm_loss(model, b), lr=0.1, decay=0.5,
                        reduce_grads=lambda grads: [g.mul_(2.0) for g in grads])
    doubled.relearn(batch)
    assert all(torch.allclose(doubled.delta[n], 2 * adversary.delta[n], rtol=1e-6, atol=1e-9) for n in params)


def test_reset_and_the_periodic_refork_start_from_scratch():
    model, params, (batch, more) = _setup("full")

    def fresh() -> Adversary:
        return Adversary(params, lambda b: lm_loss(model, b), lr=1e-2, steps_per_fork=2, optimizer="adam")

    first = fresh()
    first_loss = first.relearn(more)
    first_delta = _snapshot(first.delta)

    adversary = fresh()
    adversary.relearn(batch)
    adversary.relearn(batch)
    trained = _snapshot(params)
    with adversary.applied():
        adversary.reset()  # inside applied(): the fork is the trained weights again
        assert _bitwise_equal(params, trained)
    state = adversary.state_dict()
    assert state["steps_since_fork"] == 0
    assert all(torch.count_nonzero(t) == 0 for key in ("delta", "exp_avg", "exp_avg_sq") for t in state[key].values())
    assert adversary.relearn(more) == first_loss and _bitwise_equal(adversary.delta, first_delta)

    adversary.relearn(batch)  # step 2 of this fork
    assert adversary.relearn(more) == first_loss  # step 3 re-forks first
    assert adversary.steps_since_fork == 1 and _bitwise_equal(adversary.delta, first_delta)


def test_state_dict_round_trip_reproduces_the_next_steps_exactly():
    def build():
        model, params, batches = _setup("lora")
        return params, batches, Adversary(params, lambda b: lm_loss(model, b), lr=1e-2, steps_per_fork=3,
                                          optimizer="adam", decay=0.9)

    params, batches, adversary = build()
    adversary.relearn(batches[0])
    adversary.relearn(batches[1])
    state, buffer = adversary.state_dict(), io.BytesIO()
    torch.save(state, buffer)  # what a checkpoint does
    expected = [adversary.relearn(batches[k % 2]) for k in range(3)]  # crosses a re-fork
    expected_delta = _snapshot(adversary.delta)

    params2, batches2, resumed = build()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(torch.equal(state["delta"][n], saved["delta"][n]) for n in params)  # a copy, not live tensors
    resumed.load_state_dict(saved)
    assert resumed.steps_since_fork == 2
    assert [resumed.relearn(batches2[k % 2]) for k in range(3)] == expected
    assert _bitwise_equal(resumed.delta, expected_delta)


def test_bad_arguments_and_misuse_are_refused():
    model, params, (batch, _) = _setup("full")

    def loss(b):
        return lm_loss(model, b)

    with pytest.raises(ValueError, match="at least one"):
        Adversary({}, loss)
    for kwargs, message in ((dict(lr=0.0), "learning rate"), (dict(steps_per_fork=0), "steps_per_fork"),
                            (dict(optimizer="rmsprop"), "optimizer"), (dict(decay=0.0), "decay")):
        with pytest.raises(ValueError, match=message):
            Adversary(params, loss, **kwargs)
    frozen = dict(params)
    next(iter(frozen.values())).requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        Adversary(frozen, loss)
    next(iter(frozen.values())).requires_grad_(True)

    adversary = Adversary(params, loss)
    with adversary.applied():
        with pytest.raises(RuntimeError, match="nest"), adversary.applied():
            pass
        with pytest.raises(RuntimeError, match="outside"):
            adversary.load_state_dict(adversary.state_dict())
    other = Adversary(dict(list(params.items())[:2]), loss)
    with pytest.raises(ValueError, match="other parameters"):
        adversary.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="optimizer"):
        adversary.load_state_dict(Adversary(params, loss, optimizer="adam").state_dict())

    trained = _snapshot(params)
    broken = Adversary(params, lambda b: lm_loss(model, b) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="attacker"):
        broken.relearn(batch)
    assert _bitwise_equal(params, trained) and broken.steps_since_fork == 0
    assert all(torch.count_nonzero(d) == 0 for d in broken.delta.values())
