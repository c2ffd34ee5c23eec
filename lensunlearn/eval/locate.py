"""`locate`: where a model stores a set of facts, and the band of blocks to unlearn them in.

Causal tracing (`causal_trace`) of a seeded sample of the facts the model knows, from any question
file whose rows name their `subject` (the fact benchmark's do). The noise goes on the stream after
block 0 by default (`--corrupt_stream 1`; 0 is the paper's token embeddings): see `causal_trace`
for why. Writes OUT/locate.json (the
recovered share and the average indirect effect per block and component, the band, every traced
fact's probabilities) and OUT/locate.png (the heat map: blocks across, MLP and attention down).

The band is the rule of `causal_trace.band` on the MLP row: the block whose restored MLP output
brings back the largest share of what the noise destroyed, and its neighbours on either side as far
as each keeps at least `--band_threshold` of that share. MLPs because the lookup of a subject's
attributes runs through the MLPs at the subject's tokens in an early-to-middle band (the paper's
finding, and where "Mechanistic Unlearning" (Guo et al. 2025, https://arxiv.org/abs/2410.12949)
found localised unlearning held best against relearning). `unlearn --blocks auto --locate OUT`
and `distill --blocks auto --locate OUT` train that band.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import write_json_atomic
from ..core.config import to_jsonable
from ..core.errors import InputError
from ..core.paths import LOCATE_FILE, LOCATE_PLOT_FILE
from .options import LOCATE_COMPONENTS as COMPONENTS
from .options import WEAK_SHARE, LocateConfig, weak_band_message

log = logging.getLogger(__name__)

# --- inputs, checked before the model loads ---------------------------------------------------------


@dataclass
class Question:
    task: str
    item: dict
    context: str  # the cloze prompt


def load_questions(tasks: str) -> list[Question]:
    """Every row of the tasks, refusing rows without a subject or whose prompt does not contain it."""
    from ..data.tasks import build_request, check_tasks, load_items

    out = []
    for spec in check_tasks(tasks, "--eval_tasks"):
        for index, item in enumerate(load_items(spec)):
            fact = item.get("fact_id", f"question {index}")
            subject = item.get("subject")
            if not isinstance(subject, str) or not subject.strip():
                raise InputError(f"--eval_tasks {spec.name}: {fact} has no subject: locate corrupts the subject's "
                                 f"tokens, so every row needs a \"subject\" field naming it as the prompt writes it")
            context = build_request(item, "cloze")[0]
            if subject not in context:
                raise InputError(f"--eval_tasks {spec.name}: the subject {subject!r} of {fact} is not in its prompt "
                                 f"{context!r}: write the subject exactly as the prompt does")
            out.append(Question(spec.name, item, context))
    return out


def encode_questions(questions: list[Question], tokenizer) -> list[tuple]:
    """(Encoded request of every choice, TraceItem, the correct choice) per question; refuses a subject no
    token covers."""
    from ..data.tasks import build_request
    from .causal_trace import TraceItem, subject_tokens
    from .evaluate import encode_request

    out = []
    for q in questions:
        _, continuations, choices = build_request(q.item, "cloze")
        encoded = encode_request(tokenizer, q.context, continuations)
        head = q.context.rstrip()
        span = subject_tokens(tokenizer, head, encoded.context, q.item["subject"])
        fact = q.item.get("fact_id", q.item["subject"])
        if span is None:
            raise InputError(f"--eval_tasks {q.task}: no token of the prompt {head!r} covers the subject "
                             f"{q.item['subject']!r} of {fact} (or the tokenizer cannot map characters to tokens: "
                             f"locate needs a fast tokenizer)")
        gold = q.item["answer"]
        out.append((encoded, TraceItem(str(fact), q.item["subject"], choices[gold], encoded.context,
                                       encoded.continuations[gold], span[0], span[1]), gold))
    return out


# --- the command ------------------------------------------------------------------------------------


def locate(cfg: LocateConfig) -> Path:
    """Trace the facts, write locate.json and the heat map; return the output folder."""
    from ..core.outputs import prepare_output
    from ..modeling.loading import load_tokenizer, model_depth

    began = time.perf_counter()
    questions = load_questions(cfg.eval_tasks)
    depth = model_depth(cfg.model, cfg.trust_remote_code)
    if cfg.corrupt_stream >= depth:
        raise InputError(f"--corrupt_stream {cfg.corrupt_stream} leaves no block to trace: {cfg.model} has {depth} "
                         f"blocks; choose a stream below {depth}")
    output = prepare_output(Path(cfg.out), "locate", overwrite=cfg.overwrite, resumable=False,
                            finished=lambda p: (p / LOCATE_FILE).is_file())
    try:
        encoded = encode_questions(questions, load_tokenizer(cfg.model, cfg.trust_remote_code))
        return output.run(lambda folder: _locate(cfg, encoded, folder, began))
    except BaseException:
        output.discard_if_empty()
        raise


def _locate(cfg: LocateConfig, encoded: list[tuple], folder: Path, began: float) -> Path:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from ..modeling.layers import model_parts
    from ..modeling.loading import load_model
    from ..report.plots import plot_locate
    from . import causal_trace as ct
    from .evaluate import score_all

    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    parts = model_parts(model)
    items = [item for _, item, _ in encoded]
    if cfg.known_only:
        lls, _ = score_all(model, [e for e, _, _ in encoded], tokenizer.pad_token_id, progress=False)
        known = [item for (_, item, gold), ll in zip(encoded, lls) if int(np.argmax(ll)) == gold]
        log.info("the model knows %d of %d facts (its cloze choice is the correct one)", len(known), len(items))
        if not known:
            raise InputError(f"{cfg.model} knows none of the {len(items)} facts of --eval_tasks {cfg.eval_tasks} "
                             f"(it ranks a wrong choice first on every one): there is nothing to locate; pass "
                             f"--no-known_only to trace them anyway")
        items = known
    chosen = ct.sample_items(items, cfg.sample, cfg.seed)
    scale = ct.noise_scale(model, chosen, cfg.corrupt_stream)
    width = parts.embed.weight.shape[1]  # every stream has the embedding's width
    traces = []
    for index, item in enumerate(tqdm(chosen, desc="causal tracing", dynamic_ncols=True)):
        noise = ct.noise_for(index, cfg.seed, cfg.noise_samples, item.subject_end - item.subject_start, width,
                             cfg.noise * scale)
        traces.append({"fact_id": item.fact_id, "subject": item.subject, "answer": item.answer,
                       **ct.trace_fact(model, item, noise, cfg.window, cfg.batch, COMPONENTS, cfg.corrupt_stream)})
    share = ct.recovered_share(traces, COMPONENTS)
    first, last = ct.band(share["mlp"], cfg.band_threshold)
    peak = max(v for v in share["mlp"] if v is not None)
    result = {
        "model": cfg.model, "num_blocks": parts.num_layers, "band": [first, last], "band_component": "mlp",
        "peak_share": peak, "weak": peak < WEAK_SHARE,
        "band_rule": f"the block of the largest MLP recovered share and its neighbours keeping at least "
                     f"{cfg.band_threshold} of it",
        "recovered_share": share, "mean_effect": ct.mean_effect(traces, COMPONENTS),
        "facts": {"given": len(encoded), "known": len(items), "traced": len(traces)},
        "p_clean": sum(t["p_clean"] for t in traces) / len(traces),
        "p_corrupt": sum(t["p_corrupt"] for t in traces) / len(traces),
        "corrupt_stream": cfg.corrupt_stream, "noise_std": cfg.noise * scale, "config": to_jsonable(cfg),
        "traces": traces,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "wall_seconds": time.perf_counter() - began}
    write_json_atomic(folder / LOCATE_FILE, result)
    plot_locate(result, folder / LOCATE_PLOT_FILE, title=f"{Path(cfg.model).name}: {cfg.eval_tasks}")
    log.info("band: blocks %d-%d (the MLP recovered share peaks at %.4f); %d facts traced in %.0f s -> %s", first,
             last, peak, len(traces), time.perf_counter() - began, folder)
    if result["weak"]:
        log.warning(weak_band_message(folder, peak))
    return folder
