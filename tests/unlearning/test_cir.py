"""Shared-direction projection: the bases, the projected per-token update, and the capture on tiny models."""

from __future__ import annotations

import pytest
import torch

from lensunlearn.data.corpora import collate
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.layers import model_parts
from lensunlearn.unlearning.cir import (
    SharedDirections,
    TokenCapture,
    is_transposed,
    mlp_linears,
    project_out,
    projected_update,
    shared_basis,
)
from lensunlearn.unlearning.objective import FrozenCopy, UnlearnObjective

from ..conftest import make_tiny_model

DOCS = ["the capital of france is paris .", "the symbol of gold is iron and oxygen", "rome is in italy , and spain",
        "question : the capital of germany ? answer : berlin"]


def _structured(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Vectors with a mean far from 0 and three directions of decreasing, well separated variance."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, 4, generator=g))[0]
    scales = torch.tensor([9.0, 5.0, 3.0])
    x = torch.randn(n, 3, generator=g) * scales @ directions[:, 1:].T + 0.1 * torch.randn(n, d, generator=g)
    return x + 4.0 * directions[:, 0]


def test_shared_basis_is_orthonormal_and_spans_the_mean_and_top_components():
    x = _structured(400, 24)
    basis = shared_basis(x, 4, seed=1)
    assert basis.shape == (24, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=0)
    mean = x.mean(0)
    torch.testing.assert_close(project_out(mean[None], basis)[0], torch.zeros(24), atol=1e-4, rtol=0)
    exact = torch.linalg.svd(x - mean, full_matrices=False)[2][:3]  # the top three principal components
    torch.testing.assert_close(project_out(exact, basis), torch.zeros(3, 24), atol=1e-3, rtol=0)
    assert torch.equal(shared_basis(x, 4, seed=1), basis)  # its own generator: the same basis every time
    assert shared_basis(x, 1).shape == (24, 1) and shared_basis(x, 0).shape == (24, 0)
    with pytest.raises(ValueError, match="at least 30 vectors"):
        shared_basis(x[:20], 30)


@pytest.mark.parametrize("transposed", [False, True])
def test_projected_update_has_no_component_along_the_removed_directions(transposed):
    g = torch.Generator().manual_seed(0)
    acts, grads = torch.randn(50, 12, generator=g) + 2.0, torch.randn(50, 7, generator=g) - 1.0
    act_basis, grad_basis = shared_basis(_structured(200, 12), 4), shared_basis(_structured(200, 7, seed=3), 3)
    update = projected_update(acts, grads, act_basis, grad_basis, transposed)
    weight_like = update.T if transposed else update  # as [out, in]
    assert weight_like.shape == (7, 12)
    scale = weight_like.abs().max()
    assert scale > 1e-2
    assert (weight_like @ act_basis).abs().max() < 1e-5 * scale  # W v = 0 for every removed input direction v
    assert (grad_basis.T @ weight_like).abs().max() < 1e-5 * scale  # u^T W = 0 for every removed gradient direction
    plain = projected_update(acts, grads, None, None, transposed)
    torch.testing.assert_close(plain, acts.T @ grads if transposed else grads.T @ acts)
    empty = projected_update(acts, grads, act_basis[:, :0], grad_basis[:, :0], transposed)
    torch.testing.assert_close(empty, plain)


def _objective(model, layers=(1, 3), skip_first=0):
    lens = TunedLens.from_model(model).requires_grad_(False)
    return UnlearnObjective(model, lens, layers, FrozenCopy(model), skip_first=skip_first)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_capture_with_no_components_gives_the_autograd_weight_gradients(arch, gradient_checkpointing):
    """Per-token inputs and output gradients of every MLP linear layer (gated, GPT-2's Conv1D, ...) rebuild the
    weight gradient that backward computes, so with nothing removed the projected update is the plain one."""
    model, tokenizer = make_tiny_model(arch)
    model.train()
    if gradient_checkpointing:
        from lensunlearn.modeling.loading import set_checkpointing

        set_checkpointing(model, True)
    modules = mlp_linears(model, range(3))
    assert len(modules) >= 2 * 3 and all(".mlp." in name for name in modules)
    model.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    objective = _objective(model)
    batch = collate([tokenizer(d)["input_ids"] for d in DOCS], tokenizer.pad_token_id)
    torch.manual_seed(0)  # the same dropout masks (GPT-2's) in both passes
    objective.forget_loss(batch).backward()
    expected = {name: m.weight.grad.clone() for name, m in modules.items()}
    directions = SharedDirections(modules, 0, 0)
    directions.bases = {name: (torch.zeros(1, 0), torch.zeros(1, 0)) for name in modules}
    capture = TokenCapture(modules)
    torch.manual_seed(0)
    with capture.capture(batch["attention_mask"]):
        pairs = capture.output_grads(objective.forget_loss(batch))
    for name, module in modules.items():
        got = directions.update(name, pairs[name])
        assert got.shape == module.weight.shape, name
        torch.testing.assert_close(got, expected[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert any(is_transposed(m) for m in modules.values()) == (arch == "gpt2")


def test_capture_keeps_only_masked_tokens_and_shares_a_gated_mlps_input():
    model, tokenizer = make_tiny_model("llama")
    modules = mlp_linears(model, [0])
    assert sorted(n.rsplit(".", 1)[-1] for n in modules) == ["down_proj", "gate_proj", "up_proj"]
    batch = collate([tokenizer(d)["input_ids"] for d in DOCS], tokenizer.pad_token_id)
    mask = batch["attention_mask"].clone()
    mask[:, :1] = 0
    capture = TokenCapture(modules)
    with capture.capture(mask):
        loss = _objective(model, skip_first=1).forget_loss(batch)
        pairs = capture.output_grads(loss)
    kept = int(mask.sum())
    gate, up = (pairs[n][0][0] for n in modules if n.endswith(("gate_proj", "up_proj")))
    assert gate is up and gate.shape == (kept, 32)  # one copy of the shared input, masked tokens only
    assert all(g.shape[0] == kept for n in modules for _, g in pairs[n])
    with pytest.raises(RuntimeError, match="inside capture"):
        capture.output_grads(loss)


def test_mlp_linears_names_every_mlp_layer_of_the_chosen_blocks(arch):
    model, _ = make_tiny_model(arch)
    modules = mlp_linears(model, [0, 2])
    blocks = model_parts(model).blocks
    expected = {id(m) for b in (0, 2) for m in blocks[b].mlp.modules() if m in modules.values()}
    assert {id(m) for m in modules.values()} == expected and len(modules) in (4, 6)


def test_directions_state_round_trip_and_refuse_other_layers():
    model, _ = make_tiny_model("llama")
    modules = mlp_linears(model, [0])
    directions = SharedDirections(modules, 2, 3)
    samples = {name: [(torch.randn(40, m.in_features), torch.randn(40, m.out_features))]
               for name, m in modules.items()}
    directions.estimate(samples, seed=5)
    restored = SharedDirections(modules, 2, 3)
    restored.load_state_dict(directions.state_dict())
    assert all(torch.equal(restored.bases[n][i], directions.bases[n][i]) for n in modules for i in (0, 1))
    with pytest.raises(ValueError, match="other layers"):
        SharedDirections(mlp_linears(model, [1]), 2, 3).load_state_dict(directions.state_dict())
