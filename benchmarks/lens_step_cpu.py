"""One tuned-lens training step on the embedded model: ours against a straightforward version.

The straightforward step runs the model with `output_hidden_states=True`, takes the model's
distribution from its [B, T, V] logits, applies every layer's lens to its whole [B, T, V] stream,
sums the KL divergences and calls backward once. Ours (`lens_train.lens_streams` and
`losses.lens_kl`) reads the streams at real tokens without the model's logits, unembeds the final
stream a chunk at a time, and differentiates each chunk and layer at once with the fused
cross-entropy (`losses.vocab_cross_entropy`). Both see the same documents and the same lens, so in
float32 their losses agree; the last variant is the default `lens train --lens_matmul bfloat16`.
Timings are interleaved in this one process and reported as ratios.

    python benchmarks/lens_step_cpu.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _timing import parse_args, time_interleaved

from lensunlearn.data.corpora import collate
from lensunlearn.data.facts import DOMAINS, corpus_texts
from lensunlearn.lens.train import lens_streams
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model
from lensunlearn.modeling.losses import DEFAULT_CHUNK, lens_kl


def setup(args: argparse.Namespace):
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "float32", "cpu")
    model.requires_grad_(False)
    lens = TunedLens.from_model(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial lens, so the KL is not at its logit-lens value
        for p in lens.translators.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    ids = tokenizer(" ".join(text for domain in DOMAINS for text in corpus_texts(domain)))["input_ids"]
    docs = [ids[i * args.tokens:(i + 1) * args.tokens] for i in range(args.batch)]
    return model, lens, collate(docs, tokenizer.pad_token_id)


def straightforward_step(model, lens, batch) -> float:
    """Every layer's KL from whole [B, T, V] tensors, summed, one backward."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        target = F.log_softmax(out.logits.float(), dim=-1)
    mask = batch["attention_mask"].bool()
    total = sum(((target.exp() * (target - F.log_softmax(lens(h, layer), dim=-1))).sum(-1)[mask]).sum()
                for layer, h in enumerate(out.hidden_states[:lens.num_layers]))
    total.backward()
    lens.zero_grad(set_to_none=True)
    return float(total.detach())


def our_step(model, lens, batch) -> float:
    streams, final = lens_streams(model, batch, lens.num_layers)
    total = lens_kl(lens, range(lens.num_layers), streams, final, chunk=DEFAULT_CHUNK, backward_scale=1.0).sum()
    lens.zero_grad(set_to_none=True)
    return float(total)


def main() -> None:
    args = parse_args(__doc__, batch=(2, "documents per step"))
    model, lens, batch = setup(args)
    fast = copy.deepcopy(lens).set_matmul_dtype(torch.bfloat16)
    steps = {"straightforward": lambda: straightforward_step(model, lens, batch),
             "ours float32": lambda: our_step(model, lens, batch),
             "ours bf16 lens product": lambda: our_step(model, fast, batch)}
    losses, times = time_interleaved(steps, args.repeats)
    tokens = args.batch * args.tokens
    base = min(times["straightforward"])
    print(f"lens-training step, smollm2-135m, all {lens.num_layers} layers, {args.batch} x {args.tokens} tokens, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'variant':<24} {'summed KL':>14} {'s/step':>8} {'tokens/s':>9} {'speedup':>8}")
    for name in steps:
        best = min(times[name])
        print(f"{name:<24} {losses[name]:>14.6f} {best:>8.2f} {tokens / best:>9.1f} {base / best:>7.2f}x")


if __name__ == "__main__":
    main()
