"""`lens eval` on the embedded model: per-layer log-softmax against ours (logsumexp and argmax only).

Both compute, for every layer, the mean token KL(p_model || q) of the logit lens and of the tuned
lens and their top-1 agreement with the model, on the same held-out fact documents with the same
(trained, if given) lens and the bfloat16 lens product. The straightforward version turns each
layer's logits into a log-distribution and sums p (log p - log q) over the vocabulary; ours
(`lens_eval.lens_table`) takes p . z from the expected unembedding, so each layer's logits are read
only for their logsumexp and argmax. Timings are interleaved in this one process and reported as
ratios; the table gives the largest difference in KL between the two.

    python benchmarks/lens_eval_cpu.py --repeats 3 --threads 2 --lens runs/lens_smollm2-135m
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _timing import time_interleaved
from tqdm import tqdm

from lensunlearn.data.corpora import collate
from lensunlearn.lens.evaluate import lens_table
from lensunlearn.lens.train import LensTrainConfig, lens_streams, split_documents
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model


def straightforward_table(model, lens: TunedLens, docs, pad_id: int, batch: int, chunk: int) -> list[dict]:
    """Every layer's two log-distributions in full, then KL and top-1 from them."""
    num_layers = lens.num_layers
    sums = torch.zeros(num_layers, 4, dtype=torch.float64)
    n_tokens = 0
    for start in tqdm(range(0, len(docs), batch), desc="straightforward", leave=False):
        streams, final = lens_streams(model, collate(docs[start:start + batch], pad_id), num_layers)
        n_tokens += streams.shape[0]
        with torch.no_grad():
            for s in range(0, streams.shape[0], chunk):
                target = F.log_softmax(lens.decode(final[s:s + chunk].float()), dim=-1)
                top = target.argmax(-1)
                for layer in range(num_layers):
                    h = streams[s:s + chunk, layer].float()
                    for column, logits in ((0, lens.decode(h)), (1, lens(h, layer))):
                        pred = F.log_softmax(logits, dim=-1)
                        sums[layer, column] += (target.exp() * (target - pred)).sum().double()
                        sums[layer, column + 2] += (pred.argmax(-1) == top).sum().double()
    means = (sums / max(n_tokens, 1)).tolist()
    return [{"layer": l, "logit_lens_kl": m[0], "tuned_lens_kl": m[1], "logit_lens_top1": m[2],
             "tuned_lens_top1": m[3]} for l, m in enumerate(means)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lens", default=None, help="a trained lens folder; None uses the untrained (logit) lens")
    parser.add_argument("--docs", type=int, default=64, help="held-out fact documents evaluated per repeat")
    parser.add_argument("--batch", type=int, default=8, help="documents per forward pass (`lens eval --eval_batch`)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", "float32", "cpu")
    model.requires_grad_(False)
    lens = TunedLens.load(args.lens, model) if args.lens else TunedLens.from_model(model)
    lens.set_matmul_dtype(torch.bfloat16)
    _, held = split_documents(LensTrainConfig(model="smollm2-135m", corpus="facts:all"), tokenizer)
    docs = held[:args.docs]
    tables: dict[str, list[dict]] = {}

    def run(name: str, fn) -> float:
        tables[name] = fn(model, lens, docs, tokenizer.pad_token_id, args.batch, 512)
        return sum(r["tuned_lens_kl"] for r in tables[name])

    variants = {"straightforward": straightforward_table, "ours": lens_table}
    _, times = time_interleaved({name: lambda name=name, fn=fn: run(name, fn) for name, fn in variants.items()},
                                args.repeats)
    diff = max(abs(a[k] - b[k]) for a, b in zip(tables["straightforward"], tables["ours"], strict=True)
               for k in ("logit_lens_kl", "tuned_lens_kl"))
    top1 = max(abs(a[k] - b[k]) for a, b in zip(tables["straightforward"], tables["ours"], strict=True)
               for k in ("logit_lens_top1", "tuned_lens_top1"))
    tokens = sum(len(d) for d in docs)
    base = min(times["straightforward"])
    print(f"lens eval, smollm2-135m, all {lens.num_layers} layers, {len(docs)} held-out fact documents ({tokens} "
          f"tokens), batch {args.batch}, bfloat16 lens product, {args.threads} threads, best of {args.repeats}")
    print(f"{'variant':<16} {'s':>7} {'median':>7} {'speedup':>8}")
    for name in variants:
        best, median = min(times[name]), sorted(times[name])[len(times[name]) // 2]
        print(f"{name:<16} {best:>7.2f} {median:>7.2f} {base / best:>7.2f}x")
    print(f"largest difference in a layer's mean KL: {diff:.2e} nats; in top-1 agreement: {top1:.4f}")


if __name__ == "__main__":
    main()
