"""One optimiser step of each `unlearn --objective` against a lens-objective step, at the same batch.

Each objective is set up as `unlearn --preset small --objective NAME` sets it up (its own settings from
`OBJECTIVE_SETTINGS`: LoRA or full parameters, its layers, its retain loss; the small preset's batch of
16 forget fact sentences and 16 documents of its retain corpus, everyday text cut at its 64 tokens, as in
a run; the original-model cache on), through the run's own
`setup_training`. A step is what the training loop does per optimiser step: the objective's forward and
backward with both losses weighted in, gradient clipping, the optimiser's step. The lens step and the
objective's step are timed interleaved in this one process, so machine load hits both alike; the ratio
is objective / lens (best of the repeats).

    python benchmarks/objective_step_cpu.py --repeats 5 --threads 2
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from _timing import parse_args, time_interleaved

from lensunlearn.data.corpora import collate, load_texts
from lensunlearn.data.facts import corpus_texts
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.layers import model_parts
from lensunlearn.modeling.loading import load_model
from lensunlearn.train.distributed import World
from lensunlearn.unlearning.baseline_options import OBJECTIVE_SETTINGS, OBJECTIVES
from lensunlearn.unlearning.baselines import phase_starts, weights
from lensunlearn.unlearning.run import SMALL, UnlearnJob, resolve_layers, setup_training


def batches(tokenizer, size: int, max_length: int) -> dict:
    texts = {"forget": corpus_texts("country_capital"), "retain": load_texts(SMALL.retain, what="retain")}
    out = {name: collate([tokenizer(t)["input_ids"][:max_length] for t in docs[:size]], tokenizer.pad_token_id)
           for name, docs in texts.items()}
    out["retain"]["doc_ids"] = torch.arange(size)
    return out


def make_step(objective: str, base_model, tokenizer, data: dict, model_name: str):
    """The step function of `objective` on a fresh copy of the model, set up as a small-preset run."""
    cfg = replace(SMALL, model=model_name, objective=objective, **OBJECTIVE_SETTINGS.get(objective, {}))
    num_layers = model_parts(base_model).num_layers
    if cfg.layers is not None and max(cfg.layers) > num_layers:  # a shallower model than the embedded one
        cfg = replace(cfg, layers=None)
    torch.manual_seed(0)
    model = copy.deepcopy(base_model)
    lens = None
    if objective == "lens":
        lens = TunedLens.from_model(model).requires_grad_(False).set_matmul_dtype(torch.bfloat16)
    layers = resolve_layers(cfg, num_layers)
    job = UnlearnJob(cfg, World(), torch.device("cpu"), model, tokenizer, lens, layers, None, None, 0.0)
    setup = setup_training(job)
    plan = {"steps": 100, "steps_per_epoch": 100}
    starts = phase_starts(100, len(layers)) if objective == "sequential" else ()
    retain_weight, forget_weight = weights(objective, 50, plan, cfg.retain_coef, cfg.forget_coef, starts)
    retain_weight = retain_weight or cfg.retain_coef  # both losses active in the timed step
    params = list(setup.trainable.values())

    def step() -> float:
        loss, _, _ = setup.objective(data["forget"], data["retain"], retain_weight, forget_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    what = "full" if cfg.full else f"LoRA r{cfg.lora_rank}"
    return step, f"{what}, layers {','.join(map(str, layers))}, retain {cfg.retain_loss}"


def main() -> None:
    args = parse_args(__doc__, model="smollm2-135m")
    base_model, tokenizer = load_model(args.model, "float32", "cpu")
    data = batches(tokenizer, SMALL.batch, SMALL.max_length)
    tokens = sum(int(b["attention_mask"].sum()) for b in data.values())
    lens_step, lens_setup = make_step("lens", base_model, tokenizer, data, args.model)
    print(f"one optimiser step, {args.model}, small preset batch: {SMALL.batch} fact sentences + {SMALL.batch} "
          f"{SMALL.retain} documents "
          f"({tokens} tokens), {args.threads} threads, best of {args.repeats} after one warm-up, each objective "
          f"interleaved with the lens objective ({lens_setup})")
    print(f"{'objective':<11} {'s/step':>7} {'lens s/step':>11} {'ratio':>6}  setup")
    for objective in OBJECTIVES[1:]:
        step, described = make_step(objective, base_model, tokenizer, data, args.model)
        _, times = time_interleaved({"lens": lens_step, objective: step}, args.repeats)
        ours, lens = min(times[objective]), min(times["lens"])
        print(f"{objective:<11} {ours:>7.3f} {lens:>11.3f} {ours / lens:>5.2f}x  {described}", flush=True)
        del step


if __name__ == "__main__":
    main()
