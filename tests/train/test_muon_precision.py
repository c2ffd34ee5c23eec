"""Muon and the lens's unembedding product on a CPU without native bfloat16: float32 instead of an
emulated bfloat16, with torch's own bfloat16 arithmetic kept wherever the hardware has it."""

from __future__ import annotations

import logging

import pytest
import torch

from lensunlearn.modeling import loading
from lensunlearn.train.optim import ShardedMuon, build_optimizer, newton_schulz, newton_schulz_spectral, orthogonalise

COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults


@pytest.fixture
def emulated(monkeypatch):
    """A CPU that would emulate bfloat16 (as an AVX2 one does), whatever this machine has."""
    monkeypatch.setattr(loading, "native_bfloat16", lambda device: False)
    monkeypatch.setattr(loading, "_warned_emulated", set())


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(loading, "native_bfloat16", lambda device: True)


def _muon_params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((12, 7), (5, 9))]


def _ours_and_torchs(ns_dtype: torch.dtype, weight_decay: float) -> tuple[list, list]:
    """The same matrices after three equal steps of our Muon step (orthogonalising in `ns_dtype`) and of
    torch's."""
    settings = dict(lr=0.02, weight_decay=weight_decay, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    ours, theirs = _muon_params(0), _muon_params(0)
    for params, optimizer in ((ours, ShardedMuon(ours, ns_dtype=ns_dtype, **settings)),
                              (theirs, torch.optim.Muon(theirs, **settings))):
        generator = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
    return ours, theirs


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (8, 8)])
def test_float32_orthogonalisation_is_the_bfloat16_iteration_without_its_rounding(shape):
    update = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = orthogonalise(update, COEFFICIENTS, 5, 1e-7, torch.float32)
    rounded = orthogonalise(update, COEFFICIENTS, 5, 1e-7, torch.bfloat16)
    assert exact.dtype == torch.float32 and exact.shape == update.shape
    torch.testing.assert_close(exact, rounded.float(), rtol=0.05, atol=0.03)
    # the quintic pushes every singular value into roughly [0.7, 1.2] (Muon's design), from any scale
    singular = torch.linalg.svdvals(exact)
    assert singular.min() > 0.6 and singular.max() < 1.25
    torch.testing.assert_close(orthogonalise(100 * update, COEFFICIENTS, 5, 1e-7, torch.float32), exact)


def _gradient_like(shape, rank: int, seed: int) -> torch.Tensor:
    """A few strong directions over weak noise, as a momentum of gradients is: the small singular values
    are where the quintic's gain (up to a^5, about 486) amplifies any rounding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) \
        + 1e-3 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("shape, rank", [((96, 40), 3), ((40, 96), 1), ((64, 64), 8), ((200, 80), 4)])
def test_the_eigen_form_is_the_iteration(shape, rank):
    """Through one eigendecomposition the map is the float64 iteration's to float32 precision on nearly
    rank-deficient updates, as the float32 iteration is (both within 1e-3 of the largest entry; torch's
    bfloat16 iteration differs by half the largest entry or more on such updates, where it amplifies its own
    rounding)."""
    update = _gradient_like(shape, rank, seed=rank)
    reference = orthogonalise(update.double(), COEFFICIENTS, 5, 1e-7, torch.float64)
    fast = orthogonalise(update, COEFFICIENTS, 5, 1e-7, torch.float32)
    x = update.T if shape[0] > shape[1] else update
    iterated = newton_schulz(x / x.norm(), COEFFICIENTS, 5)
    iterated = iterated.T if shape[0] > shape[1] else iterated
    scale = reference.abs().max()
    assert (fast.double() - reference).abs().max() < 1e-3 * scale
    assert (iterated.double() - reference).abs().max() < 1e-3 * scale
    # and not the identity map or a plain normalisation: the singular values moved into Muon's band
    top = torch.linalg.svdvals(fast)[:rank]
    assert top.min() > 0.6 and top.max() < 1.25


def test_the_eigen_form_keeps_a_zero_update_zero_and_falls_back_where_eigh_fails(monkeypatch):
    assert torch.equal(orthogonalise(torch.zeros(3, 5), COEFFICIENTS, 5, 1e-7, torch.float32), torch.zeros(3, 5))
    update = _gradient_like((20, 12), 2, seed=0)
    x = update.T / update.norm()

    def fails(matrix):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    assert torch.equal(orthogonalise(update, COEFFICIENTS, 5, 1e-7, torch.float32),
                       newton_schulz(x, COEFFICIENTS, 5).T)
    with pytest.raises(torch.linalg.LinAlgError):
        newton_schulz_spectral(x, COEFFICIENTS, 5)


def test_the_step_in_bfloat16_is_torchs_muon_exactly():
    ours, theirs = _ours_and_torchs(torch.bfloat16, weight_decay=0.01)
    for a, b, start in zip(ours, theirs, _muon_params(0)):
        assert not torch.equal(a, start) and torch.equal(a, b)


def test_the_step_in_float32_follows_it_closely():
    exact, rounded = _ours_and_torchs(torch.float32, weight_decay=0.0)
    for a, b, start in zip(exact, rounded, _muon_params(0)):
        moved = (b - start).abs().max()
        assert (a - b).abs().max() < 0.1 * moved  # the same step up to bfloat16's rounding


def test_build_optimizer_picks_float32_only_where_bfloat16_is_emulated(emulated, caplog):
    matrix, bias = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with caplog.at_level(logging.INFO):
        muon = build_optimizer([("w", matrix), ("b", bias)], "muon", 1e-3, 0.0).optimizers[0]
        build_optimizer([("w", matrix), ("b", bias)], "muon", 1e-3, 0.0)
    assert isinstance(muon, ShardedMuon) and muon.ns_dtype == torch.float32
    assert caplog.text.count("no native bfloat16") == 1  # said once, not at every optimiser


def test_build_optimizer_keeps_torchs_muon_where_bfloat16_is_native(native):
    matrix = torch.nn.Parameter(torch.randn(4, 4))
    muon = build_optimizer([("w", matrix)], "muon", 1e-3, 0.0).optimizers[0]
    assert type(muon) is torch.optim.Muon


def test_the_lens_product_stays_float32_where_bfloat16_is_emulated(emulated, native_lens):
    assert native_lens.set_matmul_dtype(torch.bfloat16)._matmul_weight is None  # the exact float32 product


def test_the_lens_product_is_bfloat16_where_it_is_native(native, native_lens):
    assert native_lens.set_matmul_dtype(torch.bfloat16)._matmul_weight.dtype == torch.bfloat16


@pytest.fixture
def native_lens():
    from lensunlearn.lens.tuned_lens import TunedLens

    unembed = torch.nn.Linear(6, 11, bias=False)
    return TunedLens(torch.nn.LayerNorm(6), unembed, 6, 2)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True),
                                                         (False, True, True), (None, None, True)])
def test_the_cpu_answer_follows_torchs_probes(monkeypatch, avx512_bf16, amx, expected):
    """Either instruction set makes bfloat16 native; where torch has no probe the answer is yes, and a GPU
    always is."""
    monkeypatch.delenv(loading.NATIVE_BF16_ENV, raising=False)
    for name, value in zip(loading._BF16_CPU_PROBES, (avx512_bf16, amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert loading.native_bfloat16(torch.device("cpu")) is expected
    assert loading.native_bfloat16("cuda")
    for value, native in (("0", False), ("1", True)):  # the variable decides over the probes
        monkeypatch.setenv(loading.NATIVE_BF16_ENV, value)
        assert loading.native_bfloat16("cpu") is native
