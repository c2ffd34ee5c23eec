"""One lens-unlearning optimiser step on the embedded model: ours against a straightforward version.

The straightforward step is what one writes first: full forward passes with
`output_hidden_states=True` (every block and the [B, T, V] output logits), the lens applied to
whole [B, T, V] tensors per layer, and the original model's retain pass through the whole model.
Ours (`objective.UnlearnObjective`) stops each pass at the deepest target layer, never computes the
model's logits, and evaluates the lens a chunk of tokens at a time, differentiated at once.
Both see the same batches (4 forget + 4 retain documents of 128 tokens), the same LoRA adapter
and the same weights, so their losses must agree. Timings are interleaved in this one process and
reported as ratios against the straightforward step; peak RSS is measured per variant in a forked
child so each peak is its own.

    python benchmarks/step_cpu.py               # float32 and the bfloat16 lens product
    python benchmarks/step_cpu.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import math
import resource
import time

import torch
import torch.multiprocessing as mp

from lensunlearn.data import collate
from lensunlearn.facts import DOMAINS, corpus_texts
from lensunlearn.lens import TunedLens
from lensunlearn.losses import masked_mean, retain_l2, uniform_ce
from lensunlearn.models import load_model
from lensunlearn.objective import AdapterDisabled, UnlearnObjective

LAYERS = (5, 10, 15, 20, 25)


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
    return loss.detach()


def our_step(objective, forget, retain, weights) -> torch.Tensor:
    loss, _, _ = objective(forget, retain, *weights)
    loss.backward()
    return loss.detach()


def variants(model, lens, forget, retain):
    """name -> zero-argument callable running one step (forward + backward) and returning the loss."""
    weights = (2.5, 4.375)  # the schedule half-way through the first epoch: both losses active
    ours = UnlearnObjective(model, lens, LAYERS, AdapterDisabled(model), "l2", "uniform", chunk=256)
    fast_lens = copy.deepcopy(lens).set_matmul_dtype(torch.bfloat16)
    ours_bf16 = UnlearnObjective(model, fast_lens, LAYERS, AdapterDisabled(model), "l2", "uniform", chunk=256)
    return {
        "straightforward": lambda: straightforward_step(model, lens, forget, retain, weights),
        "ours float32": lambda: our_step(ours, forget, retain, weights),
        "ours bf16 lens product": lambda: our_step(ours_bf16, forget, retain, weights),
    }


def _peak_child(name: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    model, lens, forget, retain = setup(args)
    step = variants(model, lens, forget, retain)[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def peak_rss(names, args) -> dict[str, float]:
    """Rise of peak RSS (MiB) during one step, each variant in its own forked process."""
    ctx = mp.get_context("fork")
    out = {}
    for name in names:
        queue = ctx.Queue()
        child = ctx.Process(target=_peak_child, args=(name, args, queue))
        child.start()
        out[name] = queue.get()
        child.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="forget and retain documents per step")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per document")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, lens, forget, retain = setup(args)
    steps = variants(model, lens, forget, retain)
    losses = {name: float(step()) for name, step in steps.items()}  # warm-up, and the loss values
    model.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every variant alike
        for name, step in steps.items():
            began = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - began)
            model.zero_grad(set_to_none=True)
    peaks = peak_rss(list(steps), args)
    tokens = 2 * args.batch * args.tokens
    base = min(times["straightforward"])
    print(f"lens-unlearning step, smollm2-135m, LoRA r16, layers {LAYERS}, {args.batch}+{args.batch} x {args.tokens} "
          f"tokens, {args.threads} threads, best of {args.repeats}")
    print(f"{'variant':<24} {'loss':>12} {'s/step':>8} {'tokens/s':>9} {'speedup':>8} {'peak RSS MiB':>13}")
    for name in steps:
        best = min(times[name])
        print(f"{name:<24} {losses[name]:>12.6f} {best:>8.2f} {tokens / best:>9.1f} {base / best:>7.2f}x "
              f"{peaks[name]:>13.0f}")
    print(f"loss difference ours float32 vs straightforward: {abs(losses['ours float32'] - losses['straightforward']):.2e}")


if __name__ == "__main__":
    main()
