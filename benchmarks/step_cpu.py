"""One lens-unlearning optimiser step on the embedded model: ours against a straightforward version.

The straightforward step is what one writes first: full forward passes with
`output_hidden_states=True` (every block and the [B, T, V] output logits), the lens applied to
whole [B, T, V] tensors per layer, and the original model's retain pass through the whole model.
Ours (`objective.UnlearnObjective`) stops each pass at the deepest target layer, never computes the
model's logits, and evaluates the lens a chunk of tokens at a time, differentiated at once. With
the original-model cache (`--original_cache_mb`) the retain documents' original streams come from
memory after their first visit, as they do when a run revisits its retain documents; the warm-up
step fills it. The bfloat16 variants autocast the model's passes (`--mixed_precision`) and run the
lens product in bfloat16; the lens, the losses and the adapters stay float32.
Both see the same batches (4 forget + 4 retain documents of 128 tokens), the same LoRA adapter
and the same weights, so their losses must agree. Timings are interleaved in this one process and
reported as ratios against the straightforward step; the rise of peak RSS during one step is
measured per variant in a fresh child (Linux: the peak is reset just before the step), so each
peak is its own.

    python benchmarks/step_cpu.py               # float32 and the bfloat16 lens product
    python benchmarks/step_cpu.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import math
import re
from pathlib import Path

import torch
import torch.multiprocessing as mp
from _timing import parse_args, time_interleaved

from lensunlearn.data.corpora import collate
from lensunlearn.data.facts import DOMAINS, corpus_texts
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model
from lensunlearn.modeling.losses import DEFAULT_CHUNK, masked_mean, retain_l2, uniform_ce
from lensunlearn.unlearning.objective import AdapterDisabled, OriginalCache, UnlearnObjective

LAYERS = (5, 10, 15, 20, 25)
CHUNK = DEFAULT_CHUNK  # tokens per lens chunk, as `unlearn --chunk` by default


def documents(tokenizer, domain: str, count: int, length: int) -> list[list[int]]:
    """`count` documents of exactly `length` tokens, made by joining a domain's fact sentences."""
    ids = tokenizer(" ".join(corpus_texts(domain)))["input_ids"]
    if len(ids) < count * length:
        raise ValueError(f"facts:{domain} has only {len(ids)} tokens, need {count * length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def setup(args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "float32", "cpu")
    lens = TunedLens.from_model(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial lens, so the losses are not at their trivial values
        for p in lens.translators.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    lens.requires_grad_(False)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, layers_to_transform=list(range(max(LAYERS))),
                      init_lora_weights=False)
    model = get_peft_model(model, lora)
    forget = collate(documents(tokenizer, "country_capital", args.batch, args.tokens), tokenizer.pad_token_id)
    retain = collate(documents(tokenizer, DOMAINS[1], args.batch, args.tokens), tokenizer.pad_token_id)
    retain["doc_ids"] = torch.arange(args.batch)  # for the original-model cache
    return model, lens, forget, retain


def straightforward_step(model, lens, forget, retain, weights) -> torch.Tensor:
    """The objective written plainly: whole forward passes, whole [B, T, V] lens logits."""
    retain_weight, forget_weight = weights
    hidden = model(**forget, output_hidden_states=True).hidden_states
    mask = forget["attention_mask"]
    vocab = lens.unembed.weight.shape[0]
    forget_loss = torch.stack([masked_mean(uniform_ce(lens(hidden[l], l)), mask) for l in LAYERS]).mean()
    forget_loss = forget_loss / math.log(vocab)
    with torch.no_grad(), model.disable_adapter():
        before = model(**retain, output_hidden_states=True).hidden_states
    after = model(**retain, output_hidden_states=True).hidden_states
    mask = retain["attention_mask"]
    retain_loss = torch.stack([masked_mean(retain_l2(after[l], before[l]), mask) for l in LAYERS]).mean()
    loss = retain_weight * retain_loss + forget_weight * forget_loss
    loss.backward()
    model.zero_grad(set_to_none=True)  # every variant clears its gradients inside its timed step
    return loss.detach()


def our_step(objective, forget, retain, weights, autocast: bool = False) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss, _, _ = objective(forget, retain, *weights)
    loss.backward()
    objective.model.zero_grad(set_to_none=True)
    return loss.detach()


def variants(model, lens, forget, retain):
    """name -> zero-argument callable running one step (forward + backward) and returning the loss."""
    weights = (2.5, 4.375)  # the schedule half-way through the first epoch: both losses active
    fast_lens = copy.deepcopy(lens).set_matmul_dtype(torch.bfloat16)

    def objective(lens_, cached: bool) -> UnlearnObjective:
        cache = OriginalCache(2**30) if cached else None
        return UnlearnObjective(model, lens_, LAYERS, AdapterDisabled(model), "l2", "uniform", chunk=CHUNK, cache=cache)

    ours, ours_cached = objective(lens, False), objective(lens, True)
    bf16, bf16_cached = objective(fast_lens, False), objective(fast_lens, True)
    half = copy.deepcopy(model)  # bfloat16 base weights (--dtype bfloat16); the adapters stay float32
    for name, param in half.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    bf16_weights = UnlearnObjective(half, fast_lens, LAYERS, AdapterDisabled(half), "l2", "uniform", chunk=CHUNK,
                                    cache=OriginalCache(2**30))
    return {
        "straightforward": lambda: straightforward_step(model, lens, forget, retain, weights),
        "ours float32": lambda: our_step(ours, forget, retain, weights),
        "ours float32 + cache": lambda: our_step(ours_cached, forget, retain, weights),
        "ours bf16 lens product": lambda: our_step(bf16, forget, retain, weights),
        "ours bf16 autocast": lambda: our_step(bf16, forget, retain, weights, autocast=True),
        "ours bf16 autocast+cache": lambda: our_step(bf16_cached, forget, retain, weights, autocast=True),
        "ours bf16 weights+cache": lambda: our_step(bf16_weights, forget, retain, weights),
    }


def arithmetic(model, tokens: int) -> dict[str, float]:
    """Multiply-add work of one step (GFLOP) for the float32 variants, from the model's shapes.

    A block costs 2 x (its weights) FLOPs per token forward and about as much again for the input
    gradients in backward (LoRA's own matrices are negligible); an unembedding product costs
    2 d V per token, as does its input gradient. The attention scores are left out (T = 128).
    """
    from lensunlearn.modeling.layers import model_parts

    parts = model_parts(model)
    block = 2 * sum(m.weight.numel() for m in parts.blocks[0].modules()
                    if isinstance(m, torch.nn.Linear) and m.weight.shape[0] > 64 and m.weight.shape[1] > 64)
    unembed = 2 * parts.unembed.weight.numel()
    depth, below = parts.num_layers, max(LAYERS)
    lens = len(LAYERS) * 2 * unembed  # forward product and input gradient at each target layer
    straight = (depth * block + unembed + lens + below * block  # forget pass, lens, backward
                + 2 * (depth * block + unembed) + below * block)  # original + updated retain passes, backward
    ours = below * block + lens + below * block + 3 * below * block
    cached = ours - below * block
    return {name: flops * tokens / 1e9 for name, flops in
            (("straightforward", straight), ("ours float32", ours), ("ours float32 + cache", cached))}


def _peak_child(name: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    model, lens, forget, retain = setup(args)
    step = variants(model, lens, forget, retain)[name]
    # The first step of each variant (for the cached ones, the step that fills the cache, as every
    # retain document's first visit in a run does): a step after a warm-up would reuse memory the
    # allocator kept and show almost no rise.
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
    before = _status_mib("VmRSS")
    step()
    queue.put(_status_mib("VmHWM") - before)


def _status_mib(key: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_rss(names, args) -> dict[str, float]:
    """Rise of peak RSS (MiB) during one step, each variant in its own fresh (spawned) process."""
    ctx = mp.get_context("spawn")  # a forked child of a process whose OpenMP pool is running can hang
    out = {}
    for name in names:
        queue = ctx.Queue()
        child = ctx.Process(target=_peak_child, args=(name, args, queue))
        child.start()
        out[name] = queue.get()
        child.join()
    return out


def main() -> None:
    args = parse_args(__doc__, batch=(4, "forget and retain documents per step"))
    model, lens, forget, retain = setup(args)
    steps = variants(model, lens, forget, retain)
    losses, times = time_interleaved(steps, args.repeats)  # the cached variants' timed steps hit their cache
    tokens = 2 * args.batch * args.tokens
    base = min(times["straightforward"])
    print("timed:", {name: [round(t, 2) for t in ts] for name, ts in times.items()}, flush=True)
    peaks = peak_rss(list(steps), args)
    print(f"lens-unlearning step, smollm2-135m, LoRA r16, layers {LAYERS}, {args.batch}+{args.batch} x {args.tokens} "
          f"tokens, {args.threads} threads, best of {args.repeats}")
    print(f"{'variant':<26} {'loss':>12} {'s/step':>8} {'tokens/s':>9} {'speedup':>8} {'peak RSS MiB':>13}")
    for name in steps:
        best = min(times[name])
        print(f"{name:<26} {losses[name]:>12.6f} {best:>8.2f} {tokens / best:>9.1f} {base / best:>7.2f}x "
              f"{peaks[name]:>13.0f}")
    for name in ("ours float32", "ours float32 + cache", "ours bf16 autocast", "ours bf16 weights+cache"):
        print(f"loss difference {name} vs straightforward: {abs(losses[name] - losses['straightforward']):.2e}")
    work = arithmetic(model, args.batch * args.tokens)
    print("arithmetic per step (float32 variants): " + ", ".join(
        f"{name} {flops:.0f} GFLOP ({work['straightforward'] / flops:.2f}x less)" for name, flops in work.items()))


if __name__ == "__main__":
    main()
