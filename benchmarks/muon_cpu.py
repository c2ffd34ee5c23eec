"""Muon's orthogonalisation of the embedded model's MLP updates on a CPU: the Newton-Schulz iteration
against the same map through one eigendecomposition (`newton_schulz_spectral`).

The robust preset orthogonalises the momentum of every trained MLP matrix at each step: 87 matrices of
576 x 1536 on SmolLM2-135M (gate, up and down projections of blocks 0-28). On a CPU without native
bfloat16 that runs in float32 (see `modeling.loading.native_bfloat16`). The updates here are
gradient-like: a few strong directions over weak noise. Both variants see the same updates; the table
gives each one's largest difference from the float64 iteration. torch's own bfloat16 iteration is timed
only on one matrix where `--bfloat16` asks for it: a CPU that emulates bfloat16 takes seconds.

    python benchmarks/muon_cpu.py --repeats 3 --threads 2
"""

from __future__ import annotations

import torch
from _timing import parse_args, time_interleaved

from lensunlearn.train.optim import newton_schulz, newton_schulz_spectral, orthogonalise

COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults
STEPS = 5


def updates(count: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        strong = torch.randn(shape[0], 8, generator=generator) @ torch.randn(8, shape[1], generator=generator)
        out.append(strong + 0.05 * torch.randn(shape, generator=generator))
    return out


def wide_unit(update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = update.to(dtype)
    x = x.T if x.size(0) > x.size(1) else x
    return x / x.norm()


def main() -> None:
    args = parse_args(__doc__)
    matrices = updates(87, (1536, 576))
    variants = {"iteration": newton_schulz, "eigen": newton_schulz_spectral}

    def run(fn) -> float:
        for m in matrices:
            fn(wide_unit(m, torch.float32), COEFFICIENTS, STEPS)
        return 0.0

    _, times = time_interleaved({name: lambda fn=fn: run(fn) for name, fn in variants.items()}, args.repeats)
    probe = matrices[:4]
    errors = {}
    for name, fn in variants.items():
        errors[name] = max(float((fn(wide_unit(m, torch.float32), COEFFICIENTS, STEPS).double()
                                  - newton_schulz(wide_unit(m, torch.float64), COEFFICIENTS, STEPS)).abs().max())
                           for m in probe)
    scale = max(float(orthogonalise(m, COEFFICIENTS, STEPS, 1e-7, torch.float64).abs().max()) for m in probe)
    base = min(times["iteration"])
    print(f"Muon orthogonalisation of 87 matrices of 576 x 1536 in float32, {args.threads} threads, "
          f"best of {args.repeats} (after one warm-up)")
    print(f"{'variant':<10} {'s/step':>8} {'median':>8} {'speedup':>8} {'max error vs float64':>21}")
    for name in variants:
        best, median = min(times[name]), sorted(times[name])[len(times[name]) // 2]
        print(f"{name:<10} {best:>8.3f} {median:>8.3f} {base / best:>7.2f}x {errors[name]:>21.1e}")
    print(f"(largest entry of an orthogonalised update: {scale:.2e}; bfloat16 rounds at about {scale / 256:.1e})")


if __name__ == "__main__":
    main()
