"""In-process, batched multiple-choice evaluation with lm-evaluation-harness's numbers.

Requests are tokenised exactly as lm-eval's HF backend does (context and continuation encoded
together, then split; trailing context whitespace moved to the continuation). Each question then
costs one packed row: the context once, followed by every choice's continuation tokens, with a
4-D attention mask that lets each choice see the context and itself only. The unembedding is
applied only at answer positions. With a lens the same pass also yields each layer's answer
log-likelihoods (the knowledge profile).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.atomic import write_json_atomic, write_jsonl_atomic
from ..core.paths import PREDICTIONS_SUFFIX, PROFILE_PLOT_SUFFIX, beside
from ..data.tasks import FORMATS, Format, TaskSpec, build_request, load_items, resolve_tasks
from ..modeling.layers import StopForward, capture_streams, model_parts
from ..report.tables import markdown_table as table
from ..report.tables import number
from .knowledge_profile import layer_accuracy, layer_logprobs, profile_table
from .options import EvalConfig

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One question's token ids: the shared context and one continuation per choice."""

    context: list[int]
    continuations: list[list[int]]


def _tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """lm-eval's HFLM.tok_encode with add_bos_token unset: the tokenizer's own default."""
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    prefix = _prefix_token_id(tokenizer)
    if add_special_tokens is None and prefix is not None and text.startswith(tokenizer.decode(prefix)):
        kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def _prefix_token_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_request(tokenizer, context: str, continuations: Sequence[str]) -> Encoded:
    """Token ids as lm-eval's `loglikelihood` builds them, for every choice of one question."""
    if context == "":
        prefix = _prefix_token_id(tokenizer)
        conts = []
        for continuation in continuations:
            ids = _tok_encode(tokenizer, continuation, add_special_tokens=False)
            if ids[0] == prefix:  # lm-eval then uses the first token as the context
                raise ValueError("a continuation that starts with the prefix token needs a non-empty context")
            conts.append(ids)
        return Encoded([prefix], conts)
    spaces = len(context) - len(context.rstrip())
    head, tail = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
    ctx = _tok_encode(tokenizer, head)
    conts = [_tok_encode(tokenizer, head + tail + c)[len(ctx):] for c in continuations]
    empty = [c for c, ids in zip(continuations, conts) if not ids]
    if empty:
        raise ValueError(f"continuation(s) {empty!r} tokenise to nothing after context {context[-40:]!r}")
    return Encoded(ctx, conts)


DEFAULT_CONTEXT_LIMIT = 2048
_UNSET_TOKENIZER_LIMIT = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


def context_limit(model, tokenizer) -> int:
    """The model's context length as lm-eval's HF backend resolves it when not told: the (text)
    config's n_positions, max_position_embeddings or n_ctx, else the tokenizer's model_max_length,
    else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != _UNSET_TOKENIZER_LIMIT else DEFAULT_CONTEXT_LIMIT


def truncate_left(enc: Encoded, max_length: int) -> list[Encoded]:
    """lm-eval's left truncation: a choice whose context + continuation exceeds max_length + 1 tokens
    keeps only the last max_length + 1 of them (the model reads all but the last).

    Returns [enc] when every choice fits. Otherwise each choice gets its own Encoded, because the
    choices of one question then keep different amounts of context and cannot share a packed row.
    """
    if all(len(enc.context) + len(cont) <= max_length + 1 for cont in enc.continuations):
        return [enc]
    parts = []
    for cont in enc.continuations:
        if len(cont) > max_length:
            raise ValueError(f"an answer of {len(cont)} tokens does not fit the context limit of {max_length}: "
                             f"raise --max_length or shorten the choices")
        keep = max_length + 1 - len(cont)  # context tokens left to this choice, at least one
        parts.append(Encoded(enc.context[-keep:], [cont]))
    return parts


def _pack(enc: Encoded) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """One row: context, then each choice's tokens but its last; reads (position, target, choice)."""
    ids, positions, segments = list(enc.context), list(range(len(enc.context))), [-1] * len(enc.context)
    reads = []
    for choice, cont in enumerate(enc.continuations):
        previous = len(enc.context) - 1
        for offset, token in enumerate(cont):
            reads.append((previous, token, choice))
            if offset < len(cont) - 1:
                ids.append(token)
                positions.append(len(enc.context) + offset)
                segments.append(choice)
                previous = len(ids) - 1
    return ids, positions, segments, reads


def _batch_tensors(packed: list, pad_id: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(p[0]) for p in packed)
    ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    segments = torch.full((len(packed), width), -2, dtype=torch.long)  # -2: padding, -1: context
    for row, (row_ids, row_pos, row_seg, _) in enumerate(packed):
        ids[row, :len(row_ids)] = torch.tensor(row_ids)
        positions[row, :len(row_pos)] = torch.tensor(row_pos)
        segments[row, :len(row_seg)] = torch.tensor(row_seg)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = ((key == -1) | (key == query)) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return {"input_ids": ids.to(device), "position_ids": positions.to(device), "attention_mask": mask.to(device)}


def _final_logits(model, hidden: torch.Tensor, unembed: torch.nn.Module) -> torch.Tensor:
    logits = unembed(hidden).float()
    config = getattr(model, "config", None)
    cap = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                  "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def score_batch(model, encoded: Sequence[Encoded], pad_id: int, lens=None
                ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per question: choice log-likelihoods [choices], and with a lens [layers, choices]."""
    parts = model_parts(model)
    device, dtype = parts.unembed.weight.device, parts.unembed.weight.dtype
    packed = [_pack(e) for e in encoded]
    batch = _batch_tensors(packed, pad_id, dtype, device)
    captured: dict[str, torch.Tensor] = {}

    def grab_final(_module, args):
        captured["final"] = args[0]
        raise StopForward

    handle = parts.unembed.register_forward_pre_hook(grab_final)
    streams_cm = capture_streams(model, range(parts.num_layers)) if lens is not None else contextlib.nullcontext({})
    try:
        with streams_cm as streams:
            try:
                model(**batch, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    # Every choice's first token is read at the last context position: unembed each position once.
    width = batch["input_ids"].shape[1]
    flat = torch.tensor([r * width + pos for r, p in enumerate(packed) for pos, _, _ in p[3]])
    unique, inverse = torch.unique(flat, return_inverse=True)
    rows, cols = (unique // width).to(device), (unique % width).to(device)
    targets = torch.tensor([t for p in packed for _, t, _ in p[3]], device=device)
    inverse = inverse.to(device)
    logprobs = torch.log_softmax(_final_logits(model, captured["final"][rows, cols], parts.unembed), dim=-1)
    read = logprobs[inverse, targets].double().cpu().numpy()
    lens_read = (layer_logprobs(lens, streams, rows, cols, targets, inverse).double().cpu().numpy()
                 if lens is not None else None)
    finals, per_layer, start = [], [], 0
    for enc, (_, _, _, reads) in zip(encoded, packed):
        choice = np.array([c for _, _, c in reads])
        n = len(enc.continuations)
        finals.append(np.bincount(choice, weights=read[start:start + len(reads)], minlength=n))
        if lens_read is not None:
            chunk = lens_read[:, start:start + len(reads)]
            per_layer.append(np.stack([np.bincount(choice, weights=row, minlength=n) for row in chunk]))
        start += len(reads)
    return finals, (per_layer if lens is not None else None)


def score_all(model, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 16, lens=None,
              progress: bool = True, max_length: int | None = None
              ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Score every question in batches of similar length (longest first), in the input order.

    With `max_length`, questions longer than it are truncated from the left as lm-eval does
    (`truncate_left`); their choices are scored as separate rows and put back together.
    """
    units: list[Encoded] = []
    starts, truncated = [], 0  # question q's units are units[starts[q]:starts[q + 1]]
    for enc in encoded:
        parts = [enc] if max_length is None else truncate_left(enc, max_length)
        truncated += parts[0] is not enc
        starts.append(len(units))
        units += parts
    starts.append(len(units))
    if truncated:
        log.warning("%d of %d questions exceed the context limit of %d tokens and lose tokens from the left, "
                    "as in lm-eval", truncated, len(encoded), max_length)
    order = sorted(range(len(units)), key=lambda i: -len(_pack(units[i])[0]))
    finals: list[Any] = [None] * len(units)
    layers: list[Any] = [None] * len(units)
    with tqdm(total=len(units), desc="scoring questions", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out, per_layer = score_batch(model, [units[i] for i in chunk], pad_id, lens)
            for k, i in enumerate(chunk):
                finals[i] = out[k]
                layers[i] = per_layer[k] if per_layer is not None else None
            bar.update(len(chunk))
    if truncated:  # a truncated question's units are its choices: join them along the choice axis
        spans = list(zip(starts[:-1], starts[1:]))
        finals = [np.concatenate(finals[a:b]) for a, b in spans]
        if lens is not None:
            layers = [np.concatenate(layers[a:b], axis=1) for a, b in spans]
    return finals, (layers if lens is not None else None)


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation over sqrt(n) (None for n < 2)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """lm-eval's `pooled_sample_stderr`, used for groups weighted by size."""
    if any(s is None for s in stderrs) or sum(sizes) <= len(sizes):
        return None
    variance = sum((n - 1) * s ** 2 * n for n, s in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(variance / sum(sizes))


def question_predictions(lls: np.ndarray, choices: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm) as lm-eval picks them: argmax of ll and of ll / len(choice in characters)."""
    lengths = np.array([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def task_metrics(correct: Sequence[float], correct_norm: Sequence[float]) -> dict:
    n = len(correct)
    return {"acc": sum(correct) / n, "acc_stderr": mean_stderr(correct),
            "acc_norm": sum(correct_norm) / n, "acc_norm_stderr": mean_stderr(correct_norm), "n": n}


def group_metrics(results: dict[str, dict], members: Sequence[str]) -> dict:
    """Size-weighted accuracy of a group, with lm-eval's pooled standard error."""
    sizes = [results[m]["n"] for m in members]
    out: dict[str, Any] = {"n": sum(sizes), "tasks": list(members)}
    for metric in ("acc", "acc_norm"):
        out[metric] = sum(results[m][metric] * n for m, n in zip(members, sizes)) / sum(sizes)
        out[f"{metric}_stderr"] = pooled_stderr([results[m][f"{metric}_stderr"] for m in members], sizes)
    return out


def _load_tasks(specs: Sequence[TaskSpec], limit: int | None, loader) -> list[tuple[TaskSpec, list[dict]]]:
    loaded = []
    for spec in tqdm(specs, desc="loading tasks", disable=len(specs) < 4):
        items = load_items(spec, loader)
        loaded.append((spec, items[:limit] if limit is not None else items))
    return loaded


def evaluate(model, tokenizer, tasks: str | Sequence[str], format: Format = "letter", batch_size: int = 16,
             limit: int | None = None, lens=None, predictions_path: str | Path | None = None,
             dataset_loader=None, progress: bool = True, model_name: str | None = None,
             max_length: int | None = None, lm_eval_include: str | Path | None = None) -> dict:
    """Evaluate `model` on tasks; returns {"model", "format", "max_length", "results", "groups"[, "profile"]}.

    `tasks` names hub tasks and groups, `facts:<domain>` or local jsonl paths, scored here, and
    `lm_eval:<task>` tasks of lm-eval's registry (or YAML files under `lm_eval_include`), which
    lm-eval itself runs on the same model (`lm_eval_tasks`); `lens` (a TunedLens) adds the
    knowledge profile of the native tasks; `dataset_loader` replaces `datasets.load_dataset`.
    Questions longer than `max_length` tokens (default: `context_limit`) lose tokens from the
    left, as in lm-eval.
    """
    from ..data.lm_eval_tasks import split_names

    native, theirs = split_names(tasks)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    if batch_size < 1 or (limit is not None and limit < 1) or (max_length is not None and max_length < 1):
        raise ValueError(f"batch_size, limit and max_length must be positive, got batch_size={batch_size}, "
                         f"limit={limit}, max_length={max_length}")
    max_length = max_length or context_limit(model, tokenizer)
    started = time.perf_counter()
    if theirs:  # before any scoring: an unknown name or a missing lm-eval fails in seconds
        from ..data.lm_eval_tasks import check_names

        check_names(theirs, None if lm_eval_include is None else str(lm_eval_include))
    out: dict[str, Any] = {"results": {}, "groups": {}}
    count = 0
    if native or not theirs:
        out, count = _evaluate_native(model, tokenizer, native, format, batch_size, limit, lens, predictions_path,
                                      dataset_loader, progress, max_length)
    elif lens is not None:
        log.warning("the knowledge profile covers native tasks only: lm_eval: tasks have none")
    if theirs:
        from ..data.lm_eval_tasks import evaluate_lm_eval

        was_training = model.training
        model.eval()
        try:
            extra = evaluate_lm_eval(model, tokenizer, theirs, batch_size, limit,
                                     None if lm_eval_include is None else str(lm_eval_include), max_length)
        finally:
            model.train(was_training)
        out["results"].update(extra["results"])
        out["groups"].update(extra["groups"])
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    result = {"model": name, "format": format, "max_length": max_length, **out,
              "wall_time_s": time.perf_counter() - started}
    log.info("evaluated %d native questions and %d lm-eval task(s) in %.1f s", count, len(theirs),
             result["wall_time_s"])
    return result


def _evaluate_native(model, tokenizer, tasks, format, batch_size, limit, lens, predictions_path, dataset_loader,
                     progress, max_length) -> tuple[dict, int]:
    """The tasks lensunlearn scores itself: (results, groups[, profile]) and the number of questions."""
    loaded = _load_tasks(resolve_tasks(tasks), limit, dataset_loader)
    requests, encoded = [], []
    for spec, items in loaded:
        description = spec.description(format)
        for index, item in enumerate(items):
            context, continuations, choices = build_request(item, format, description)
            requests.append((spec, index, item, choices))
            encoded.append(encode_request(tokenizer, context, continuations))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        finals, layers = score_all(model, encoded, pad_id, batch_size, lens, progress, max_length)
    finally:
        model.train(was_training)
    return _collect(requests, finals, layers, loaded, predictions_path), len(encoded)


def _collect(requests, finals, layers, loaded, predictions_path) -> dict:
    per_task: dict[str, dict[str, list]] = {spec.name: {"c": [], "cn": [], "ll": [], "gold": [], "len": []}
                                           for spec, _ in loaded}
    rows = []
    for (spec, index, item, choices), lls, layer_lls in zip(requests, finals, layers or [None] * len(finals)):
        pred, pred_norm = question_predictions(lls, choices)
        gold = item["answer"]
        acc = per_task[spec.name]
        acc["c"].append(float(pred == gold))
        acc["cn"].append(float(pred_norm == gold))
        acc["ll"].append(layer_lls)
        acc["gold"].append(gold)
        acc["len"].append([len(c) for c in choices])
        row = {"task": spec.name, "index": index, "gold": gold, "pred": pred, "pred_norm": pred_norm,
               "loglikelihoods": [float(x) for x in lls]}
        if "fact_id" in item:
            row["fact_id"] = item["fact_id"]
        if layer_lls is not None:
            row["layer_pred"] = [int(np.argmax(x)) for x in layer_lls]
        rows.append(row)
    results = {name: task_metrics(v["c"], v["cn"]) for name, v in per_task.items()}
    members: dict[str, list[str]] = {}
    for spec, _ in loaded:
        if spec.group:
            members.setdefault(spec.group, []).append(spec.name)
    out: dict[str, Any] = {"results": results, "groups": {g: group_metrics(results, m) for g, m in members.items()}}
    if layers is not None:
        out["profile"] = _profile(per_task, results, len(layers[0]) if layers else 0)
    if predictions_path is not None:
        write_predictions(predictions_path, rows)
    return out


def _profile(per_task: dict, results: dict, num_layers: int) -> dict:
    tasks = {}
    for name, v in per_task.items():
        acc, acc_norm = layer_accuracy(v["ll"], v["gold"], v["len"])
        tasks[name] = {"acc": acc, "acc_norm": acc_norm, "final_acc": results[name]["acc"]}
    return {"layers": list(range(num_layers)), "tasks": tasks, "chance": 0.25}


def write_predictions(path: str | Path, rows: Sequence[dict]) -> Path:
    """Per-question predictions as jsonl (one row per question, in task order), atomically."""
    return write_jsonl_atomic(path, rows)


def _fmt(value: float | None) -> str:
    return number(value, 4)


_TABLE_KEYS = {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


def results_table(results: dict) -> str:
    """The results as a markdown table: tasks, then groups."""
    rows, others = [], []
    for kind in ("results", "groups"):
        for name, r in results.get(kind, {}).items():
            label = f"**{name}**" if kind == "groups" else name
            rows.append([label, r.get("n", "-"), _fmt(r.get("acc")), _fmt(r.get("acc_stderr")), _fmt(r.get("acc_norm")),
                         _fmt(r.get("acc_norm_stderr"))])
            # lm_eval: tasks may report other metrics (exact_match, f1, ...): list them below the table
            extra = {k: v for k, v in r.items() if k not in _TABLE_KEYS and isinstance(v, (int, float))}
            if extra:
                others.append(f"{name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in extra.items()))
    lines = [f"model: {results.get('model', '')}   format: {results.get('format', '')}",
             table(["task", "n", "acc", "±", "acc_norm", "±"], rows, "lrrrrr"), *others]
    if "profile" in results:
        lines += ["", "knowledge profile (accuracy through lens l):", profile_table(results["profile"])]
    return "\n".join(lines)


def _beside(out: str | None, suffix: str) -> Path | None:
    return None if out is None else beside(out, suffix)


def _is_eval_json(path: Path) -> bool:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and "results" in result


def check_outputs(cfg: EvalConfig) -> None:
    """Before any scoring: the tasks are known, and every file this run writes may be written
    (its folder is writable; an existing file is replaced only with --overwrite, and --out only
    when it is an evaluation result)."""
    from ..core.outputs import check_file_output
    from ..data.lm_eval_tasks import check_names, split_names

    native, theirs = split_names(list(cfg.eval_tasks))
    if native:
        resolve_tasks(native)
    if theirs or cfg.lm_eval_include:
        check_names(theirs, cfg.lm_eval_include)
    if cfg.out:
        check_file_output(Path(cfg.out), cfg.overwrite, "--out", recognise=_is_eval_json)
    predictions = Path(cfg.predictions) if cfg.predictions else _beside(cfg.out, PREDICTIONS_SUFFIX)
    plot = (Path(cfg.plot) if cfg.plot else _beside(cfg.out, PROFILE_PLOT_SUFFIX)) if cfg.lens else None
    for flag, path in (("--predictions", predictions), ("--plot", plot)):
        if path is not None:
            check_file_output(path, cfg.overwrite, flag)


def run_eval(cfg: EvalConfig) -> dict:
    """The `eval` command: load, evaluate, write JSON, predictions and profile plot, print the table."""
    from ..lens.tuned_lens import TunedLens
    from ..modeling.loading import load_model
    from ..report.plots import plot_profile

    check_outputs(cfg)

    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    lens = TunedLens.load(cfg.lens, model) if cfg.lens else None
    predictions = Path(cfg.predictions) if cfg.predictions else _beside(cfg.out, PREDICTIONS_SUFFIX)
    results = evaluate(model, tokenizer, list(cfg.eval_tasks), cfg.eval_format, cfg.eval_batch, cfg.eval_limit, lens,
                       predictions, model_name=cfg.model, max_length=cfg.max_length,
                       lm_eval_include=cfg.lm_eval_include)
    results["config"] = {"eval_tasks": list(cfg.eval_tasks), "eval_batch": cfg.eval_batch,
                         "eval_limit": cfg.eval_limit, "max_length": cfg.max_length, "lens": cfg.lens,
                         "dtype": cfg.dtype, "lm_eval_include": cfg.lm_eval_include}
    if lens is not None:
        plot = Path(cfg.plot) if cfg.plot else _beside(cfg.out, PROFILE_PLOT_SUFFIX)
        if plot is not None:
            results["profile"]["plot"] = str(plot_profile(results["profile"], plot,
                                                          title=f"{cfg.model}: knowledge profile"))
    if cfg.out:
        write_json_atomic(cfg.out, results)
        log.info("wrote %s%s", cfg.out, f" and {predictions}" if predictions else "")
    print(results_table(results))
    return results

