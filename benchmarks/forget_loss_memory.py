"""Peak memory and time of the chunked forget loss against the naive one, at a realistic vocabulary.

The naive loss materialises [layers, tokens, vocab] logits at once; `losses.lens_forget_loss`
holds one [chunk, vocab] slice at a time and recomputes it in the backward pass. Each variant runs
in its own process so that its peak (CPU: the rise of max RSS; GPU: max allocated) is its own.
The two losses must agree to 1e-5 and their gradients to float tolerance.

    python benchmarks/forget_loss_memory.py                      # CPU, V = 50304
    python benchmarks/forget_loss_memory.py --device cuda --tokens 8192 --d_model 4096
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch
import torch.multiprocessing as mp
from torch import nn

from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.losses import lens_forget_loss, uniform_ce


def make_inputs(args: argparse.Namespace) -> tuple[TunedLens, list[int], list[torch.Tensor]]:
    torch.manual_seed(0)
    unembed = nn.Linear(args.d_model, args.vocab, bias=False)
    nn.init.normal_(unembed.weight, std=args.d_model ** -0.5)
    layers = list(range(args.layers))
    lens = TunedLens(nn.LayerNorm(args.d_model), unembed, args.d_model, args.layers).to(args.device)
    for translator in lens.translators:
        nn.init.normal_(translator.weight, std=0.02)
    lens.requires_grad_(False)
    streams = [torch.randn(args.tokens, args.d_model, device=args.device, requires_grad=True) for _ in layers]
    return lens, layers, streams


def naive_forget_loss(lens: TunedLens, layers: list[int], streams: list[torch.Tensor]) -> torch.Tensor:
    """All layers' logits at once: [layers, tokens, vocab]."""
    logits = torch.stack([lens(h, l) for h, l in zip(streams, layers)])
    return uniform_ce(logits).mean() / math.log(logits.shape[-1])


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)


def measure(variant: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    lens, layers, streams = make_inputs(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _peak()
    began = time.perf_counter()
    if variant == "naive":
        loss = naive_forget_loss(lens, layers, streams)
    else:
        loss = lens_forget_loss(lens, layers, streams, chunk=args.chunk)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak()) - base
    queue.put((variant, float(loss.detach()), [s.grad.cpu().numpy() for s in streams], peak, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512, help="real tokens in the forget batch")
    parser.add_argument("--layers", type=int, default=4, help="target layers")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = {}
    for variant in ("naive", "chunked"):
        queue = context.Queue()
        process = context.Process(target=measure, args=(variant, args, queue))
        process.start()
        results[variant] = queue.get()
        process.join()
    (_, naive_loss, naive_grads, naive_peak, naive_s), (_, loss, grads, peak, seconds) = results.values()
    grad_diff = max(float(abs(a - b).max()) for a, b in zip(naive_grads, grads))
    grad_scale = max(float(abs(a).max()) for a in naive_grads)
    logits_mib = args.layers * args.tokens * args.vocab * 4 / 2**20
    report = {"vocab": args.vocab, "tokens": args.tokens, "layers": args.layers, "chunk": args.chunk,
              "device": args.device, "all_logits_mib": logits_mib,
              "one_chunk_logits_mib": args.chunk * args.vocab * 4 / 2**20,
              "naive": {"loss": naive_loss, "peak_mib": naive_peak, "seconds": naive_s},
              "chunked": {"loss": loss, "peak_mib": peak, "seconds": seconds},
              "loss_abs_diff": abs(loss - naive_loss), "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale}
    print(json.dumps(report, indent=2))
    assert abs(loss - naive_loss) <= 1e-5, "chunked and naive losses differ"
    assert grad_diff <= 1e-5 * max(grad_scale, 1e-12) + 1e-9, "chunked and naive gradients differ"
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
