"""One held-out evaluation of a distillation on a CPU: the teacher run every time against its final streams
computed once.

`distill` scores the student against the frozen teacher on held-out text at every `--eval_every` step
(the share of the gap closed, and the `--stop_within` rule). The teacher does not change, so
`HeldoutScorer` computes its final streams once, when distillation starts, and each evaluation then runs
the student's forward and both unembeddings. Both variants score the same student on `distill`'s default
held-out text (`generic:heldout`, documents of at most 128 tokens, 16 to a batch), with the embedded
model as teacher and a shrunk and perturbed copy as student. The one-time teacher pass is timed apart.

    python benchmarks/heldout_scores_cpu.py --repeats 3 --threads 2
"""

from __future__ import annotations

import copy
import time

from _timing import parse_args, print_medians, time_interleaved

from lensunlearn.data.corpora import load_texts, tokenize
from lensunlearn.modeling.loading import load_model
from lensunlearn.unlearning.distill import HeldoutScorer, heldout_scores, shrink_perturb

GENERIC, MAX_LENGTH, EVAL_BATCH = "generic:heldout", 128, 16  # distill's defaults


def main() -> None:
    args = parse_args(__doc__, model="smollm2-135m")
    teacher, tokenizer = load_model(args.model, "float32", "cpu")
    teacher.requires_grad_(False).eval()
    student = shrink_perturb(copy.deepcopy(teacher), 0.25, 0.0, seed=0)
    docs = [d for d in tokenize(load_texts(GENERIC), tokenizer, MAX_LENGTH) if len(d) >= 2]
    pad = tokenizer.pad_token_id
    began = time.perf_counter()
    scorer = HeldoutScorer(teacher, docs, pad, EVAL_BATCH)
    setup = time.perf_counter() - began
    steps = {"teacher": lambda: heldout_scores(student, teacher, docs, pad, EVAL_BATCH)["heldout_ce"],
             "cached": lambda: scorer(student)["heldout_ce"]}
    values, times = time_interleaved(steps, args.repeats)
    assert abs(values["teacher"] - values["cached"]) < 1e-4 * values["teacher"], values
    print(f"One held-out evaluation of {len(docs)} documents ({sum(map(len, docs))} tokens) of {GENERIC}, "
          f"{EVAL_BATCH} to a batch; {args.threads} threads, {args.repeats} timed evaluations after one warm-up; "
          f"the cached teacher streams took {setup:.2f} s once; student cross-entropy {values['cached']:.4f} "
          f"either way")
    print_medians(times, "teacher")


if __name__ == "__main__":
    main()
