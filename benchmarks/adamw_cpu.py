"""A full-parameter optimiser step on the embedded model: torch's default AdamW against the fused one.

Full-parameter training (`tamper --full`, `distill`, `unlearn --full` and the AdamW half of Muon)
updates all 135M parameters each step. torch's default CPU AdamW loops over the parameters with
several elementwise passes each; `optim.adamw` asks for the fused kernel, one pass. Both start
from the same weights and gradients (a fact-sentence batch's language-model loss), so their
updated weights agree to float rounding; the table gives the largest difference. Timings are
interleaved in this one process and reported as ratios.

    python benchmarks/adamw_cpu.py --repeats 5 --threads 2
"""

from __future__ import annotations

import torch
from _timing import parse_args, time_interleaved

from lensunlearn.data.facts import corpus_texts
from lensunlearn.modeling.loading import load_model


def main() -> None:
    args = parse_args(__doc__)
    model, tokenizer = load_model("smollm2-135m", "float32", "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    batch = tokenizer(corpus_texts("country_capital")[:8], return_tensors="pt", padding=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad.clone() for p in params]
    start = [p.detach().clone() for p in params]
    copies = {name: [torch.nn.Parameter(w.clone()) for w in start] for name in ("default", "fused")}
    optimizers = {name: torch.optim.AdamW(copies[name], lr=1e-5, weight_decay=0.01, fused=name == "fused")
                  for name in copies}
    for ps in copies.values():
        for p, g in zip(ps, grads, strict=True):
            p.grad = g

    def step(name: str) -> float:
        optimizers[name].step()
        return 0.0

    _, times = time_interleaved({name: lambda name=name: step(name) for name in copies}, args.repeats)
    # both took the same number of steps with the same gradients: their weights must agree
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(copies["default"], copies["fused"], strict=True))
    moved = max(float((a.detach() - w).abs().max()) for a, w in zip(copies["fused"], start, strict=True))
    base = min(times["default"])
    print(f"AdamW step over {sum(p.numel() for p in params) / 1e6:.1f}M parameters of smollm2-135m, "
          f"{args.threads} threads, best of {args.repeats} (after one warm-up)")
    print(f"{'variant':<10} {'s/step':>8} {'median':>8} {'speedup':>8}")
    for name in copies:
        best, median = min(times[name]), sorted(times[name])[len(times[name]) // 2]
        print(f"{name:<10} {best:>8.3f} {median:>8.3f} {base / best:>7.2f}x")
    print(f"largest weight difference default vs fused: {diff:.2e} (largest update: {moved:.2e})")


if __name__ == "__main__":
    main()
