"""The optimisers `build_optimizer` makes: fused AdamW where torch has the kernel, the same update."""

from __future__ import annotations

import pytest
import torch

from lensunlearn.train.optim import MultiOptimizer, adamw, build_optimizer


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((6, 5), (5,), (3, 6))]


def test_cpu_adamw_is_fused_and_takes_the_default_step():
    fused, default = _params(0), _params(0)
    optimizers = [adamw(fused, 1e-2, 0.1), torch.optim.AdamW(default, lr=1e-2, weight_decay=0.1)]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in fused]
        for params, optimizer in zip((fused, default), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, start in zip(fused, default, _params(0)):
        assert not torch.equal(a, start)  # it moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_build_optimizer_uses_fused_adamw_for_adamw_and_muons_remainder(monkeypatch):
    monkeypatch.setattr("lensunlearn.modeling.loading.native_bfloat16", lambda device: True)
    matrix, bias = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    plain = build_optimizer([("w", matrix), ("b", bias)], "adamw", 1e-3, 0.0)
    assert [type(o).__name__ for o in plain.optimizers] == ["AdamW"] and plain.optimizers[0].defaults["fused"]
    muon = build_optimizer([("w", matrix), ("b", bias)], "muon", 1e-3, 0.0)
    assert [type(o).__name__ for o in muon.optimizers] == ["Muon", "AdamW"] and muon.optimizers[1].defaults["fused"]


def test_parameters_without_a_fused_kernel_keep_the_default_adamw():
    # a device torch has no fused AdamW for (here: meta) must get the loop implementation, not an error
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert not adamw([meta], 1e-3, 0.0).defaults["fused"]
    assert adamw([torch.nn.Parameter(torch.zeros(3))], 1e-3, 0.0).defaults["fused"]


def test_a_checkpoint_from_the_default_adamw_resumes_fused_with_its_moments():
    """Loading an optimiser state saved by the unfused AdamW keeps this optimiser's fused kernel and
    takes the saved moments and step: the resumed step equals the default one continued."""
    old_params, new_params = _params(0), _params(0)
    old = MultiOptimizer([torch.optim.AdamW(old_params, lr=1e-2)])
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) for p in old_params]
    for p, g in zip(old_params, grads):
        p.grad = g.clone()
    old.step()
    new = build_optimizer([(str(k), p) for k, p in enumerate(new_params)], "adamw", 1e-2, 0.01)
    with torch.no_grad():
        for a, b in zip(new_params, old_params):
            a.copy_(b)
    new.load_state_dict(old.state_dict())
    assert new.optimizers[0].param_groups[0]["fused"] is True
    moments = [o.optimizers[0].state[p[0]]["exp_avg"] for o, p in ((new, new_params), (old, old_params))]
    assert torch.equal(*moments)
    for params in (old_params, new_params):
        for p, g in zip(params, grads):
            p.grad = g.clone()
    old.step()
    new.step()
    for a, b in zip(new_params, old_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sgd_momentum_is_an_option_and_zero_is_plain_sgd():
    from lensunlearn.core.config import ConfigError
    from lensunlearn.train.optim import TrainingOptions

    params, start = _params(0), [p.detach().clone() for p in _params(0)]
    plain = build_optimizer([(str(i), p) for i, p in enumerate(params)], "sgd", 0.1, 0.0, momentum=0.0)
    group = plain.optimizers[0].param_groups[0]
    assert group["momentum"] == 0.0 and group["nesterov"] is False
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):  # each step is -lr x that step's gradient: nothing is carried over
        before = [p.detach().clone() for p in params]
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        plain.step()
        for p, b, g in zip(params, before, grads):
            torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(p, s) for p, s in zip(params, start))
    default = build_optimizer([("w", _params(1)[0])], "sgd", 0.1, 0.0).optimizers[0].param_groups[0]
    assert default["momentum"] == 0.9 and default["nesterov"] is True  # what --optimizer sgd always was
    muon = build_optimizer([("w", _params(1)[0])], "muon", 0.1, 0.0, momentum=0.5).optimizers[0].param_groups[0]
    assert muon["momentum"] == 0.5
    assert TrainingOptions(optimizer="sgd", momentum=0.0).momentum == 0.0
    for bad, match in (({"optimizer": "sgd", "momentum": 1.0}, r"\[0, 1\)"), ({"momentum": 0.5}, "own betas")):
        with pytest.raises(ConfigError, match=match):
            TrainingOptions(**bad)
