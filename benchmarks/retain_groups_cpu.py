"""The retain loss of one unlearning step on a CPU: the retain batch padded as one against padded by length groups.

`--preset robust --forget SRC@forget` retains on everyday text (up to 64 tokens) and on the relation's
retain part (fact sentences of about 12 tokens), half each, so a batch of 16 retain documents padded to
its longest computes about twice the positions it holds. `PairedData.micro_batch` labels the rows by
length group (`data.corpora.label_length_groups`) and the lens objective's retain loss runs one pass per
group; the loss is the padded batch's. Both variants take the same batches of the preset's mix
(`generic:retain` and `facts:country_capital@retain`, alternating), the original-model cache on as in the
preset (filled by the warm-up): the updated model's forward to the deepest lens layer and the backward
into every weight, as a full-parameter run does.

    python benchmarks/retain_groups_cpu.py --repeats 4 --threads 2
"""

from __future__ import annotations

import torch
from _timing import parse_args, print_medians, time_interleaved

from lensunlearn.data.corpora import collate, label_length_groups, load_texts, tokenize
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model
from lensunlearn.unlearning.objective import FrozenCopy, OriginalCache, UnlearnObjective
from lensunlearn.unlearning.options import ROBUST

SOURCES = ("generic:retain", "facts:country_capital@retain")


def main() -> None:
    args = parse_args(__doc__, model="smollm2-135m")
    model, tokenizer = load_model(args.model, "float32", "cpu")
    model.train()
    per_source = [tokenize(load_texts(source), tokenizer, ROBUST.max_length) for source in SOURCES]
    docs = [d for pair in zip(*per_source) for d in pair]
    size, batches = ROBUST.per_device_batch, args.repeats + 1
    chosen = [list(range(k * size, (k + 1) * size)) for k in range(batches)]
    layers = list(ROBUST.layers)
    objective = UnlearnObjective(model, TunedLens.from_model(model).requires_grad_(False), layers, FrozenCopy(model),
                                 ROBUST.retain_loss, skip_first=ROBUST.skip_first,
                                 cache=OriginalCache(ROBUST.original_cache_mb * 2**20))
    pad = tokenizer.pad_token_id

    def batch(ids: list[int], grouped: bool) -> dict[str, torch.Tensor]:
        out = collate([docs[k] for k in ids], pad)
        if grouped:
            out = label_length_groups(out, [len(docs[k]) for k in ids])
        out["doc_ids"] = torch.tensor(ids)
        return out

    counters = {"padded": 0, "groups": 0}

    def step(name: str) -> float:
        ids = chosen[counters[name] % batches]
        counters[name] += 1
        loss = objective.retain_loss(batch(ids, name == "groups"))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    _, times = time_interleaved({name: lambda n=name: step(n) for name in ("padded", "groups")}, args.repeats)
    real = sum(len(docs[k]) for ids in chosen for k in ids) / batches
    padded = sum(collate([docs[k] for k in ids], pad)["input_ids"].numel() for ids in chosen) / batches
    print(f"The retain loss of one step ({ROBUST.retain_loss} streams at layers {layers}, full parameters, forward "
          f"and backward) on {size} documents of {' and '.join(SOURCES)}, alternating, up to {ROBUST.max_length} "
          f"tokens; {args.threads} threads, {args.repeats} timed steps after one warm-up, each variant on the same "
          f"batches; {real:.0f} real tokens in {padded:.0f} padded positions a batch on average")
    print_medians(times, "padded")


if __name__ == "__main__":
    main()
