"""One step of `unlearn --preset small` on the embedded model: LoRA dropout from torch against ours.

The small preset puts LoRA (dropout 0.05) on every linear layer of blocks 0-28 and feeds 16 short
fact sentences per batch, so each step runs some 400 dropouts on small tensors. torch's CPU dropout
draws one number per element from its sequential generator; `unlearn.BulkDropout` draws a quarter
as many. Both variants below are the preset's model, lens and objective on the same batches,
timed interleaved in this one process; only the adapters' dropout modules differ. (Their masks
differ too, but with fresh adapters, whose B matrices are zero, the losses agree.)

    python benchmarks/small_step_cpu.py --repeats 6 --threads 2
"""

from __future__ import annotations

from dataclasses import replace

import torch
from _timing import parse_args, time_interleaved

from lensunlearn.data.corpora import collate
from lensunlearn.data.facts import corpus_texts
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model
from lensunlearn.unlearning.objective import AdapterDisabled, OriginalCache, UnlearnObjective
from lensunlearn.unlearning.run import SMALL, BulkDropout, add_lora


def setup():
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "float32", "cpu")
    lens = TunedLens.from_model(model).requires_grad_(False).set_matmul_dtype(torch.bfloat16)
    model = add_lora(model, replace(SMALL, lens="unused"), SMALL.layers)
    objective = UnlearnObjective(model, lens, SMALL.layers, AdapterDisabled(model), "l2", "uniform",
                                 skip_first=SMALL.skip_first, cache=OriginalCache(2**30))
    texts = {"forget": corpus_texts("country_capital"), "retain": corpus_texts("element_symbol")}
    batches = {name: collate([tokenizer(t)["input_ids"][:SMALL.max_length] for t in docs[:SMALL.batch]],
                             tokenizer.pad_token_id) for name, docs in texts.items()}
    batches["retain"]["doc_ids"] = torch.arange(SMALL.batch)
    return model, objective, batches


def set_dropout(model: torch.nn.Module, bulk: bool) -> None:
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                dropouts[name] = BulkDropout(dropout.p) if bulk else torch.nn.Dropout(dropout.p)


def step(model, objective, batches) -> float:
    loss, _, _ = objective(batches["forget"], batches["retain"], 0.5, 19.0)  # both losses active
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    args = parse_args(__doc__)
    model, objective, batches = setup()
    variants = {"torch nn.Dropout": False, "ours BulkDropout": True}
    steps = {name: lambda bulk=bulk: (set_dropout(model, bulk), step(model, objective, batches))[1]
             for name, bulk in variants.items()}  # swapping ~400 modules costs about a millisecond
    losses, times = time_interleaved(steps, args.repeats)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches.values())
    base = min(times["torch nn.Dropout"])
    print(f"small-preset step, smollm2-135m, LoRA r16 on all linears of blocks 0-{max(SMALL.layers) - 1}, "
          f"{SMALL.batch}+{SMALL.batch} fact sentences ({tokens} tokens), {args.threads} threads, "
          f"best of {args.repeats}")
    print(f"{'variant':<20} {'loss':>10} {'s/step':>8} {'median':>8} {'speedup':>8}")
    for name in variants:
        best, median = min(times[name]), sorted(times[name])[len(times[name]) // 2]
        print(f"{name:<20} {losses[name]:>10.4f} {best:>8.2f} {median:>8.2f} {base / best:>7.2f}x")


if __name__ == "__main__":
    main()
