"""The optimisers `build_optimizer` makes: fused AdamW where torch has the kernel, the same update."""

from __future__ import annotations

import torch

from lensunlearn.optim import adamw, build_optimizer


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


def test_build_optimizer_uses_fused_adamw_for_adamw_and_muons_remainder():
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
