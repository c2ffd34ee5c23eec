"""One distillation step on a CPU: the micro-batch padded as one batch against padded by length groups.

`distill`'s corpus that covers every fact domain mixes 15-token fact sentences with everyday prose of up
to 128 tokens, and a batch of 16 documents drawn from it is padded to its longest: about four positions
computed for each real one. `padded_groups` pads each group of similar lengths to its own longest
instead (`data.corpora.length_groups`); the loss sums the same positions. Both variants take the same
batches (the first `--repeats` + 1 steps' documents of the corpus, as `distill` draws them): the
student's forward and backward and the teacher's forward, as `distill_kl` runs them, with the
embedded model as both (the KL is then zero, the arithmetic the same).

    python benchmarks/distill_step_cpu.py --repeats 4 --threads 2
"""

from __future__ import annotations

import copy

from _timing import parse_args, print_medians, time_interleaved

from lensunlearn.data.corpora import batch_indices, collate, load_texts, tokenize
from lensunlearn.modeling.loading import load_model
from lensunlearn.unlearning.distill import distill_kl, padded_groups

CORPUS = ("generic:retain", "facts:country_capital", "facts:us_state_capital", "facts:country_language",
          "facts:country_currency", "facts:element_symbol", "facts:us_state_abbreviation")
BATCH, MAX_LENGTH, SEED = 16, 128, 0  # distill's defaults


def main() -> None:
    args = parse_args(__doc__, model="smollm2-135m")
    teacher, tokenizer = load_model(args.model, "float32", "cpu")
    corpora = [load_texts(name) for name in CORPUS]
    texts = [c[i] for i in range(max(map(len, corpora))) for c in corpora if i < len(c)]  # as --corpus A+B+...
    docs = [d for d in tokenize(texts, tokenizer, MAX_LENGTH) if len(d) >= 2]
    student = copy.deepcopy(teacher).train()
    batches = [[docs[k] for k in batch_indices(len(docs), BATCH, step, SEED)] for step in range(args.repeats + 1)]
    pad = tokenizer.pad_token_id
    counters = {"padded": 0, "groups": 0}

    def step(name: str) -> float:
        chosen = batches[counters[name] % len(batches)]
        counters[name] += 1
        batch = collate(chosen, pad) if name == "padded" else padded_groups(chosen, pad)
        total, count = distill_kl(student, teacher, batch)
        (total / count).backward()
        student.zero_grad(set_to_none=True)
        return float(count)

    _, times = time_interleaved({name: lambda n=name: step(n) for name in ("padded", "groups")}, args.repeats)
    real = sum(len(d) for batch in batches for d in batch) / len(batches)
    positions = {"padded": sum(collate(b, pad)["input_ids"].numel() for b in batches) / len(batches),
                 "groups": sum(g["input_ids"].numel() for b in batches for g in padded_groups(b, pad)) / len(batches)}
    print(f"One distillation step (student forward and backward, teacher forward) of {BATCH} documents of "
          f"{' + '.join(CORPUS)}, up to {MAX_LENGTH} tokens; {args.threads} threads, {args.repeats} timed steps "
          f"after one warm-up, each variant on the same batches; {real:.0f} real tokens a step on average")
    print_medians(times, "padded", {"positions": positions})


if __name__ == "__main__":
    main()
