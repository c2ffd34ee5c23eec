"""`unlearn`: make a model forget a corpus through its tuned lens.

Data flow: config -> model, lens and layers (validated) -> paired forget/retain corpora -> LoRA
adapters or full parameters (DDP / FSDP2 under torchrun) -> `UnlearnObjective` in the one training
loop -> run directory (config, metrics, adapter, merged model, evaluation).

Several retain sources (`--retain A,B` with `--retain_weights`) are mixed by sampling: each pair's
retain document comes from the source a smooth weighted round-robin names for it, so every
source gives its weight's share of the retain documents and every (shuffled) batch holds the mix
in expectation. Sampling rather than weighting the loss keeps one retain pass per step and the
retain loss a mean over one batch's tokens; weighting would need a pass per source. The shares are
of documents: a source of longer documents weighs more per document in the token mean.

`--blocks` localises the update (`blocks`): LoRA adapters only on the band's MLP linear layers (or
all its linear layers), or in full mode only the band's parameters trainable (CIR: the band's MLPs
are its blocks); every other weight is frozen and saved exactly as it was.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import write_json_atomic
from ..core.checks import check_resumed_config
from ..core.config import ConfigError, to_jsonable
from ..core.outputs import Output, prepare_output
from ..core.paths import (
    ADAPTER_DIR,
    BASE_EVAL_FILE,
    EVAL_FILE,
    EVAL_KEY_PREFIX,
    MERGED_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
)
from ..data.corpora import batch_indices, collate, label_length_groups, load_texts, tokenize, weighted_order
from ..data.splits import (
    check_consistent_splits,
    check_kept_untrained,
    check_parts_nonempty,
    check_retain_sources,
    fact_refs,
    fact_rows,
    is_fact_base,
    parse_source,
    shared_answers,
)
from ..data.tasks import check_tasks, load_items, resolve_tasks
from ..lens.tuned_lens import TunedLens, default_lens_path, find_lens
from ..modeling.layers import (
    block_component,
    check_layers,
    clip_layers,
    config_depth,
    config_mlp_widths,
    model_parts,
    unwrap,
)
from ..modeling.loading import (
    DTYPES,
    check_device,
    load_model,
    load_model_config,
    load_tokenizer,
    model_depth,
    set_checkpointing,
)
from ..train.checkpoint import load_checkpoint, remove_checkpoint, restore_checkpoint, save_checkpoint
from ..train.distributed import (
    World,
    average_over_ranks,
    barrier,
    cleanup,
    device_for,
    full_state_dict,
    init_distributed,
    mean_over_ranks,
    no_sync,
    shard,
    shard_fsdp,
    wrap_ddp,
)
from ..train.loop import LoopSpec, MetricsLog, run_loop
from ..train.optim import MultiOptimizer, build_optimizer, embedding_parameters, lr_factor
from ..train.tracking import TRACKING_FIELDS, Tracker, check_tracker, open_tracker
from .baseline_options import needs_original
from .baselines import (
    GradDiffObjective,
    NPOObjective,
    RerouteObjective,
    RMUObjective,
    SequentialObjective,
    SimNPOObjective,
    default_layers,
    phase_of,
    phase_starts,
    trained_blocks,
    uses_lens,
    weights,
)
from .blocks import TRAINED_BLOCKS_KEY, resolve_blocks
from .objective import AdapterDisabled, FrozenCopy, OriginalCache, UnlearnObjective
from .options import (  # noqa: F401 (re-exported)
    PRESETS,
    REFERENCE,
    REFERENCE_LAYERS,
    ROBUST,
    SAVED_PLAN_KEYS,
    SEED,
    SEED_LAYERS,
    SMALL,
    UnlearnConfig,
    check_lora_layers,
    resolve_confuse_blocks,
    retain_sources,
)
from .robust_step import (
    ROBUST_LOGGED,
    ROBUST_SUMMARY_KEYS,
    build_robust_step,
    check_general_corpus,
    cir_modules,
    freeze_all_but_cir,
    full_target_names,
    resolve_cir_blocks,
)

log = logging.getLogger(__name__)

LOGGED = ("step", "retain_loss", "forget_loss", "retain_weight", "forget_weight", "lr", "grad_norm", "tokens_per_s",
          "original_cached", "seconds") + ROBUST_LOGGED


# --- data -------------------------------------------------------------------------------------------


def load_corpus(source: str, cfg_config: str | None, split: str, column: str | None, limit: int,
                shuffle_seed: int | None, what: str) -> list[str]:
    """Documents of one corpus, or of several joined by '+', interleaved round-robin."""
    parts = [p for p in source.split("+") if p.strip()]
    if not parts:
        raise ValueError(f"{what} corpus is empty: pass --{what} with a dataset, a file or facts:<domain>")
    corpora = [load_texts(p.strip(), config=cfg_config if len(parts) == 1 else None, split=split,
                          column=column if len(parts) == 1 else None, limit=limit, shuffle_seed=shuffle_seed,
                          what=f"{what} corpus", column_flag=f"--{what}_column") for p in parts]
    mixed = [c[i] for i in range(max(map(len, corpora))) for c in corpora if i < len(c)]
    return mixed[:limit]


@dataclass
class PairedData:
    """Tokenised forget and retain documents; pair k is (forget[k % F], retain[k % R]), or with several retain
    sources (forget[k % F], retain[retain_order[k % len(retain_order)]])."""

    forget: list[list[int]]
    retain: list[list[int]]
    pairs: int
    pad_id: int
    retain_order: list[int] | None = None  # the retain document of each pair, mixing the sources by weight
    retain_mix: list[dict] | None = None  # per source: its weight, documents and share of the pairs

    def retain_doc(self, pair: int) -> int:
        if self.retain_order is None:
            return pair % len(self.retain)
        return self.retain_order[pair % len(self.retain_order)]

    def micro_batch(self, pair_ids: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        """Collated forget and retain documents; the retain side carries its document ids (for the cache) and,
        where it mixes long and short documents, a `length_group` label per row (`label_length_groups`)."""
        retain_ids = [self.retain_doc(k) for k in pair_ids]
        retain = label_length_groups(collate([self.retain[k] for k in retain_ids], self.pad_id),
                                     [len(self.retain[k]) for k in retain_ids])
        retain["doc_ids"] = torch.tensor(retain_ids)
        return {"forget": collate([self.forget[k % len(self.forget)] for k in pair_ids], self.pad_id),
                "retain": retain}


def load_retain(cfg: UnlearnConfig, tokenizer) -> tuple[list[list[int]], list[int] | None, list[dict] | None]:
    """(retain documents, the document of each pair, the mix per source). One source: its documents, cycled
    (no order). Several: pair k takes the next document of the source `weighted_order` names for k, so each
    source gives its weight's share of the pairs, and every batch (a shuffled draw of pairs) holds the
    mix in expectation; the documents are listed in the order they are first used."""
    sources = retain_sources(cfg.retain)
    per_source = [tokenize(load_corpus(source, cfg.retain_config, cfg.retain_split, cfg.retain_column, cfg.examples,
                                       cfg.retain_shuffle_seed, "retain"), tokenizer, cfg.max_length)
                  for source in sources]
    for source, docs in zip(sources, per_source):
        if not docs:
            raise ValueError(f"retain corpus {source} has no documents left after tokenisation")
    if len(sources) == 1:
        return per_source[0], None, None
    weights = cfg.retain_weights or (1.0,) * len(sources)
    order = weighted_order(weights, cfg.examples)
    docs, position, taken, seen = [], [], [0] * len(sources), {}
    for source in order:
        key = (source, taken[source] % len(per_source[source]))
        taken[source] += 1
        if key not in seen:
            seen[key] = len(docs)
            docs.append(per_source[key[0]][key[1]])
        position.append(seen[key])
    mix = [{"source": src, "weight": weight, "documents": len(per_source[i]), "pairs": order.count(i),
            "share": order.count(i) / len(order)} for i, (src, weight) in enumerate(zip(sources, weights))]
    log.info("retain mix: %s", ", ".join(f"{m['source']} {100 * m['share']:.1f}% ({m['documents']} documents)"
                                          for m in mix))
    return docs, position, mix


def load_pairs(cfg: UnlearnConfig, tokenizer) -> PairedData:
    """Load, truncate and pair the corpora; refuse empty ones before any training."""
    forget = load_corpus(cfg.forget, cfg.forget_config, cfg.forget_split, cfg.forget_column, cfg.examples, None,
                         "forget")
    retain, order, mix = load_retain(cfg, tokenizer)
    data = PairedData(tokenize(forget, tokenizer, cfg.max_length), retain, cfg.examples, tokenizer.pad_token_id,
                      order, mix)
    for what, docs in (("forget", data.forget), ("retain", data.retain)):
        if not docs:
            raise ValueError(f"{what} corpus {getattr(cfg, what)} has no documents left after tokenisation")
        if len(docs) < cfg.examples:
            log.info("%s corpus has %d documents < %d examples: it is cycled", what, len(docs), cfg.examples)
    return data


# --- model ------------------------------------------------------------------------------------------


def resolve_layers(cfg: UnlearnConfig, num_layers: int) -> tuple[int, ...]:
    """Explicit layers as given (they must exist); without --layers, the reference layers this model has (for
    the baselines, their papers' choice scaled to this model's depth: `baselines.default_layers`), or with
    --forget_loss mlp_confuse the stream right after the deepest confused block (CIR retains one block later).
    Sequential phases are returned deepest first, every other objective's layers in ascending order."""
    if cfg.layers is not None:
        layers = cfg.layers
    elif cfg.objective != "lens":
        layers = default_layers(cfg.objective, num_layers)
    elif cfg.forget_loss == "mlp_confuse":
        layers = (max(resolve_confuse_blocks(cfg, num_layers)) + 1,)
    else:
        layers = clip_layers(REFERENCE_LAYERS, num_layers)
    layers = tuple(sorted(set(check_layers(layers, num_layers, "target layer", allow_output=True)),
                          reverse=cfg.objective == "sequential"))
    check_lora_layers(layers, cfg.full)
    return layers


def check_model_fit(cfg: UnlearnConfig, model_config: Any) -> tuple[int, ...] | None:
    """The target layers, and with --cir its blocks and component counts, checked against the model's
    config.json before the model is loaded (the same checks run again on the loaded model). Returns the
    resolved layers, or None when the config does not name the model's depth."""
    depth = config_depth(model_config)
    if depth is None:
        return None
    try:
        layers = resolve_layers(cfg, depth)
    except ConfigError:
        raise
    except ValueError as err:  # the model does not fit the option: as when the loaded model is checked (exit 1)
        raise ValueError(f"{err} in {cfg.model}: pass --layers that this model has (a preset's layers fit the "
                         f"model it was tuned on)") from None
    if cfg.cir:
        resolve_cir_blocks(cfg, layers, depth)
        widths = config_mlp_widths(model_config)
        if widths is not None:
            limit = min(widths)
            for flag, count in (("--cir_act_components", cfg.cir_act_components),
                                ("--cir_grad_components", cfg.cir_grad_components)):
                if count > limit:
                    raise ConfigError(f"{flag} {count} is more than the {limit} dimensions of the inputs and outputs "
                                      f"of {cfg.model}'s MLP layers (hidden size {widths[0]}, MLP width {widths[1]}): "
                                      f"choose at most {limit}")
    return layers


def check_before_loading(cfg: UnlearnConfig) -> tuple[int, ...] | None:
    """What `unlearn` checks before it loads the model, creates its run folder or trains: the lens exists
    (for the lens objective, the only one that reads one), the tracker can start, and the layers and CIR
    options fit the model's config.json (read without the weights). Returns the target layers as resolved
    for this model (None when the config does not say)."""
    if uses_lens(cfg.objective):
        find_lens(cfg.lens, cfg.model)
    check_tracker(cfg)
    check_general_corpus(cfg)
    return check_model_fit(cfg, load_model_config(cfg.model, cfg.trust_remote_code))


def target_linears(model: torch.nn.Module, names: tuple[str, ...], blocks: range) -> dict[str, torch.nn.Module]:
    """The linear layers named `names` (leaf names) inside `blocks`, by their full name in the unwrapped model."""
    from transformers.pytorch_utils import Conv1D

    base = unwrap(model)
    found = {}
    for index in blocks:
        block = model_parts(base).blocks[index]
        prefix = next(n for n, m in base.named_modules() if m is block)
        found.update({f"{prefix}.{n}": m for n, m in block.named_modules()
                      if isinstance(m, (torch.nn.Linear, Conv1D)) and n.rsplit(".", 1)[-1] in names})
    if not found:
        raise ConfigError(f"--full_targets {','.join(names)} names no linear layer of blocks {blocks.start}.."
                          f"{blocks.stop - 1}; this model's are {','.join(_linear_names(base))}")
    return found


def check_against_model(cfg: UnlearnConfig, model: torch.nn.Module, layers: tuple[int, ...]) -> None:
    """The confused blocks and --full_targets against the loaded model, before anything is evaluated or trained."""
    num_layers = model_parts(model).num_layers
    blocks = resolve_confuse_blocks(cfg, num_layers)
    if blocks and max(layers) <= max(blocks):
        raise ConfigError(f"--layers {','.join(map(str, layers))} with confused blocks up to {max(blocks)}: the "
                          f"retain loss must read a stream past the deepest confused block ({max(blocks) + 1} or "
                          f"later); pass such --layers or lower --confuse_blocks")
    if cfg.full and cfg.full_targets != "all":
        if cfg.cir:
            cir_modules(model, cfg, layers, num_layers)
        else:
            target_linears(model, full_target_names(cfg), range(min(max(layers), num_layers)))


def _blocks_name(model: torch.nn.Module) -> str:
    blocks = model_parts(model).blocks
    return next(name for name, module in model.named_modules() if module is blocks).rsplit(".", 1)[-1]


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of every linear layer inside the blocks (peft's "all-linear" cannot be limited to blocks)."""
    from transformers.pytorch_utils import Conv1D

    blocks = model_parts(model).blocks
    return sorted({name.rsplit(".", 1)[-1] for name, module in blocks.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D))})


class BulkDropout(torch.nn.Module):
    """Dropout that draws a quarter of the random numbers nn.Dropout draws on CPU.

    torch's CPU dropout takes one number per element from its sequential generator; with LoRA on
    every linear layer that was 29 % of a small-preset step. Here each 64-bit draw yields four
    16-bit numbers, so the drop probability is rounded to a multiple of 1/65536 (0.05 becomes
    0.0500031) and kept values are scaled by the exact inverse keep rate. On other devices (where
    dropout is one fused kernel) and in eval mode it is plain dropout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.threshold = p, round(p * 65536)
        self.scale = 65536 / (65536 - self.threshold) if self.threshold < 65536 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0 or x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold - 32768
        return x * keep * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_bulk_dropout(model: torch.nn.Module) -> int:
    """Replace the nn.Dropout of every LoRA adapter by `BulkDropout`; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    dropouts[name] = BulkDropout(dropout.p)
                    replaced += 1
    return replaced


def _mlp_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the blocks' MLPs."""
    from .cir import mlp_linears

    return sorted({name.rsplit(".", 1)[-1] for name in mlp_linears(model, range(model_parts(model).num_layers))})


def band_linears(model: torch.nn.Module, blocks: Sequence[int], weights: str) -> list[str]:
    """Full names of the linear layers of the band's MLPs (`weights` mlp) or of the whole blocks (all)."""
    from transformers.pytorch_utils import Conv1D

    parts = model_parts(model)
    names = {module: name for name, module in unwrap(model).named_modules()}
    found = []
    for index in blocks:
        scope = block_component(parts.blocks[index], "mlp") if weights == "mlp" else parts.blocks[index]
        found += [names[m] for m in scope.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    if not found:
        raise ValueError(f"blocks {list(blocks)} of {type(unwrap(model)).__name__} hold no linear layer to adapt")
    return found


def add_lora(model: torch.nn.Module, cfg: UnlearnConfig, layers: tuple[int, ...],
             blocks: list[int] | None = None, band: tuple[int, ...] | None = None) -> torch.nn.Module:
    """LoRA on `blocks`; by default blocks 0 .. max(layers) - 1, the only blocks that the target streams
    depend on (an objective that trains fewer passes its own: `baselines.trained_blocks`). With `band`
    (`--blocks`), on the linear layers of those blocks' MLPs (or of the whole blocks) only."""
    from peft import LoraConfig, get_peft_model

    if cfg.lora_targets == "all":
        targets = _linear_names(model)
    elif cfg.lora_targets == "mlp":
        targets = _mlp_names(model)
    else:
        targets = None if cfg.lora_targets == "auto" else [t for t in cfg.lora_targets.split(",") if t]
    blocks = list(range(max(layers))) if blocks is None else blocks
    placement = dict(target_modules=targets, layers_to_transform=blocks, layers_pattern=_blocks_name(model))
    if band is not None:  # exact module names: peft matches a regular expression against each full name
        names = band_linears(model, band, cfg.block_weights)
        placement = dict(target_modules="|".join(re.escape(name) for name in names))
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      task_type="CAUSAL_LM", **placement)
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise ValueError(f"cannot place LoRA adapters on {type(model).__name__}: {err}. "
                         f"Pass --lora_targets all or a list of module names") from err
    use_bulk_dropout(model)
    return model


def _evaluate(cfg: UnlearnConfig, model, tokenizer, lens, path: Path) -> dict | None:
    if not cfg.eval_tasks.strip():
        return None
    from ..eval.evaluate import evaluate

    result = evaluate(model, tokenizer, cfg.eval_tasks, format=cfg.eval_format, batch_size=cfg.eval_batch,
                      limit=cfg.eval_limit, model_name=cfg.model, lm_eval_include=cfg.lm_eval_include)
    result["request"] = eval_request(cfg)
    write_json_atomic(path, result)
    log.info("evaluation -> %s: %s", path, {k: round(v.get("acc", float("nan")), 4)
                                            for k, v in result.get("results", {}).items()})
    return result


def curve_point(result: dict) -> dict[str, float]:
    """An evaluation as flat `eval/<task>/<metric>` numbers: a metrics line stays one level deep, so a
    tracker can log it as it is and a plot finds the curves by prefix. A group stands for its members,
    as in the report's table."""
    groups = result.get("groups", {})
    members = {m for info in groups.values() for m in info.get("tasks", [])}
    tasks = {**{k: v for k, v in result.get("results", {}).items() if k not in members}, **groups}
    return {f"{EVAL_KEY_PREFIX}{task}/{metric}": float(values[metric]) for task, values in tasks.items()
            for metric in ("acc", "acc_norm") if values.get(metric) is not None}


def tracked_evals(run_dir: Path) -> dict[str, float]:
    """The evaluations after and before unlearning as `final/eval/<task>/<metric>` and `base/eval/...`
    (apart from the curve's own `eval/...` keys, whose points may be on --eval_limit questions)."""
    files = {"final": run_dir / EVAL_FILE, "base": run_dir / BASE_EVAL_FILE}
    return {f"{when}/{key}": value for when, path in files.items() if path.is_file()
            for key, value in curve_point(json.loads(path.read_text())).items()}


def evaluate_in_training(cfg: UnlearnConfig, model: torch.nn.Module, tokenizer, device: torch.device) -> dict:
    """Evaluate the model being trained without changing its training: eval mode and no gradients
    inside, train mode after, and torch's random state (CPU and the training device) put back, so the
    dropout masks and random targets of later steps are those of a run that never evaluates and
    --eval_every leaves the adapter exactly as it is."""
    from ..eval.evaluate import evaluate

    began, was_training = time.perf_counter(), model.training
    accelerator = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(accelerator, device_type=None if device.type == "cpu" else device.type), \
            torch.no_grad():
        try:
            model.eval()
            result = evaluate(model, tokenizer, cfg.eval_tasks, format=cfg.eval_format, batch_size=cfg.eval_batch,
                              limit=cfg.eval_limit, model_name=cfg.model, progress=False,
                              lm_eval_include=cfg.lm_eval_include)
        finally:
            model.train(was_training)
    return {**curve_point(result), f"{EVAL_KEY_PREFIX}seconds": time.perf_counter() - began}


def first_curve_point(cfg: UnlearnConfig, model: torch.nn.Module, tokenizer, device: torch.device,
                      run_dir: Path) -> dict:
    """The curve at step 0: the model before any step is the base model (LoRA starts as a no-op), so a
    base evaluation of the same request is reused rather than measured twice."""
    base = run_dir / BASE_EVAL_FILE
    if cfg.eval_base and reusable_eval(base, cfg):
        return curve_point(json.loads(base.read_text()))
    return evaluate_in_training(cfg, model, tokenizer, device)


# --- run directory ----------------------------------------------------------------------------------


def eval_request(cfg: UnlearnConfig) -> dict:
    """What an evaluation of this run measures; saved in eval.json and base_eval.json so that a base
    evaluation left by an earlier attempt with other tasks, format, limit or model is never reused."""
    return {"model": cfg.model, "dtype": cfg.dtype, "tasks": cfg.eval_tasks, "format": cfg.eval_format,
            "limit": cfg.eval_limit}


def reusable_eval(path: Path, cfg: UnlearnConfig) -> bool:
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text()).get("request")
    except (OSError, ValueError, AttributeError):
        saved = None
    if saved != eval_request(cfg):
        log.info("%s was measured with other settings (%s, now %s): evaluating again", path, saved,
                 eval_request(cfg))
        return False
    return True


# Settings that may change when a run is resumed: where it runs and is tracked, how often it checkpoints, how much
# memory it trades for speed (the cache and recomputation give the same numbers), the evaluations'
# batch size and how often training is evaluated (neither changes the weights). Everything else
# shapes the result and must match the saved run_config.json.
RESUME_MAY_CHANGE = ("resume", "overwrite", "device", "checkpoint_every", "original_cache_mb",
                     "gradient_checkpointing", "eval_batch", "eval_every", "out", "run_name", "layers",
                     *TRACKING_FIELDS)


# Evaluation settings: they change no weight, so a resumed run may change them (after an evaluation failed,
# say) unless --eval_every draws a training curve, whose points must all measure the same thing.
EVAL_SETTINGS = ("eval_tasks", "eval_format", "eval_limit", "lm_eval_include", "eval_base")


def read_paths(cfg: UnlearnConfig) -> list[tuple[str, str | None]]:
    """What a run reads from disk, by the flag that names it: its run folder may never hold one of them."""
    pairs: list[tuple[str, str | None]] = [("--model", cfg.model),
                                           ("--lens", cfg.lens or str(default_lens_path(cfg.model))),
                                           ("--lm_eval_include", cfg.lm_eval_include), ("--cir_corpus", cfg.cir_corpus)]
    pairs += [(f"--{flag}", part.strip()) for flag in ("forget", "retain") for part in getattr(cfg, flag).split("+")]
    pairs += [("--eval_tasks", task.strip()) for task in cfg.eval_tasks.split(",")]
    return pairs


def check_run_dir(cfg: UnlearnConfig) -> Output:
    """Where this run writes (see `outputs.prepare_output`), after refusing anything that would lose or
    clobber a run or its inputs, resume with other settings, or fail on its evaluation tasks after training."""
    if cfg.eval_tasks.strip():
        check_tasks(cfg.eval_tasks, lm_eval_include=cfg.lm_eval_include)
    output = prepare_output(Path(cfg.out) / cfg.name, "unlearn", overwrite=cfg.overwrite, resume=cfg.resume,
                            finished=lambda p: (p / SUMMARY_FILE).is_file(), flag="--run_name",
                            reads=read_paths(cfg))
    saved = output.work / RUN_CONFIG_FILE
    if cfg.resume and saved.is_file():
        may_change = RESUME_MAY_CHANGE + (() if cfg.eval_every else EVAL_SETTINGS)
        try:
            check_resumed_config(json.loads(saved.read_text()), cfg, may_change, str(output.final))
        except ConfigError:
            output.discard_if_empty()
            raise
    return output


def _check_resumed_layers(run_dir: Path, cfg: UnlearnConfig, layers: tuple[int, ...]) -> None:
    """The layers as resolved against the model (the default is clipped to its depth) must be the saved ones."""
    path = run_dir / RUN_CONFIG_FILE
    if cfg.resume and path.is_file():
        saved = json.loads(path.read_text()).get("layers")
        if saved is not None and list(saved) != list(layers):
            raise ConfigError(f"--resume: {run_dir} was started with --layers {','.join(map(str, saved))}, now "
                              f"{','.join(map(str, layers))}: resume with the saved layers, or start over with "
                              f"--overwrite")


def prepare_run_dir(cfg: UnlearnConfig, world: World) -> Output:
    """`check_run_dir` on rank 0, its answer (or its error) shared with every rank."""
    answer: Output | BaseException | None = None
    if world.is_main:
        try:
            answer = check_run_dir(cfg)
        except (OSError, ValueError) as err:
            answer = err
    if world.distributed:
        import torch.distributed as dist

        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    if isinstance(answer, BaseException):
        raise answer
    return answer


def save_model(cfg: UnlearnConfig, model, tokenizer, run_dir: Path, world: World):
    """LoRA: adapter/ and merged/; full: merged/. Returns the merged model (rank 0; None elsewhere)."""
    if cfg.full:
        state = full_state_dict(model, world)
        if not world.is_main:
            return None
        base = unwrap(model)
        base.save_pretrained(run_dir / MERGED_DIR, state_dict=state)
        tokenizer.save_pretrained(run_dir / MERGED_DIR)
        if world.distributed:  # the live model is sharded: evaluate a plain copy
            return load_model(str(run_dir / MERGED_DIR), cfg.dtype, "cpu" if not torch.cuda.is_available() else None)[0]
        return base
    if not world.is_main:
        return None
    model.save_pretrained(run_dir / ADAPTER_DIR)
    merged = model.merge_and_unload()
    merged.save_pretrained(run_dir / MERGED_DIR)
    tokenizer.save_pretrained(run_dir / MERGED_DIR)
    return merged


# --- the command ------------------------------------------------------------------------------------


def unlearn(cfg: UnlearnConfig) -> Path:
    """Unlearn the forget corpus through the lens; return the run directory."""
    began = time.perf_counter()
    world = init_distributed()
    try:
        return _unlearn(cfg, world, began)
    finally:
        cleanup(world)


def check_inputs(cfg: UnlearnConfig) -> tuple[int, ...] | None:
    """What can be wrong with the corpora, the tasks and the band, found before any model loads: parts of one
    relation split differently, a retain source that states forget facts, a kept part that is trained on, a
    band outside the model or above the deepest target layer. Returns the blocks that train (None: the
    method's default)."""
    forget = [p.strip() for p in cfg.forget.split("+") if p.strip()]
    retain = [p.strip() for source in retain_sources(cfg.retain) for p in source.split("+") if p.strip()]
    tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip() and not t.strip().startswith("lm_eval:")]
    check_parts_nonempty(forget + retain + tasks)
    check_consistent_splits([("--forget", s) for s in forget] + [("--retain", s) for s in retain] +
                            [("--eval_tasks", t) for t in tasks])
    for source in forget:
        check_retain_sources(source, retain)
        for other in retain:
            warn_shared_answers(source, other)
    warn_unmeasured_forget(forget, tasks)
    check_kept_untrained([t for t in tasks], forget + retain)
    if cfg.blocks is None:
        return None
    if cfg.objective != "lens":
        raise ConfigError(f"--blocks trains a band with --objective lens only; --objective {cfg.objective} trains "
                          f"its own blocks: drop --blocks")
    depth = model_depth(cfg.model, cfg.trust_remote_code)
    blocks = resolve_blocks(cfg, depth)
    deepest = max(resolve_layers(cfg, depth))
    if max(blocks) >= deepest:
        raise ConfigError(f"--blocks {cfg.blocks} reaches block {max(blocks)}, not below the deepest target layer "
                          f"{deepest}: block b changes only the streams after it, so the forget loss cannot train "
                          f"it; choose blocks below {deepest} or deeper --layers")
    return blocks


def warn_shared_answers(forget: str, retain: str) -> None:
    """Warn when a retain source gives forget facts' answers to other subjects (see `shared_answers`)."""
    pairs = shared_answers(forget, retain)
    if pairs:
        ref, other = pairs[0]
        total = len(fact_refs(forget) or {})
        log.warning("--retain %s gives %d of the %d forget facts' answers to other subjects (e.g. %r: %s in "
                    "--forget, %s in --retain): its retain loss rewards those answers after the same prompt "
                    "and can hold the forget facts in place; expect them to be forgotten less, or retain on "
                    "another relation of the same subjects", retain, len(pairs), total, ref.answer,
                    ref.subject, other.subject)


def warn_unmeasured_forget(forget: Sequence[str], tasks: Sequence[str]) -> None:
    """Warn when the forget corpus is a part of a split relation and evaluation tasks are given, but none of
    them asks any of its facts: eval.json would then not show what was forgotten. A relation of your own keeps
    its questions in a file apart from its sentences, which `--preset robust` cannot infer from the text
    file. Only fact tasks (facts:<domain>, .jsonl files) are read: a hub benchmark asks no fact by id."""
    parts = [source for source in forget if parse_source(source).part is not None]
    if not parts or not tasks:
        return
    ids = {row["fact_id"] for source in parts for row in fact_rows(source)}
    for task in (task for task in tasks if is_fact_base(parse_source(task).base)):
        if any(str(item.get("fact_id")) in ids for spec in resolve_tasks([task]) for item in load_items(spec)):
            return
    log.warning("--eval_tasks asks none of the %d facts of --forget %s: eval.json will not show what was "
                "forgotten; add the questions that ask them (for a relation of your own, its question file's "
                "@forget and @kept parts, e.g. questions.jsonl@forget,questions.jsonl@kept)", len(ids),
                "+".join(parts))


def _unlearn(cfg: UnlearnConfig, world: World, began: float) -> Path:
    if cfg.batch % (cfg.per_device_batch * world.world_size):
        raise ConfigError(f"--batch {cfg.batch} is not divisible by --per_device_batch {cfg.per_device_batch} x "
                         f"{world.world_size} processes: batch = per_device_batch x grad accumulation x processes")
    if cfg.eval_every and cfg.full and world.distributed:
        raise ConfigError("--eval_every with --full under torchrun is not supported: FSDP shards the model over the "
                          "processes, and only rank 0 evaluates; train with LoRA or drop --eval_every")
    check_device(cfg.device)
    device = device_for(world, cfg.device)
    check_before_loading(cfg)
    blocks = check_inputs(cfg)
    output = prepare_run_dir(cfg, world)
    try:
        return _load_and_train(cfg, world, device, output, began, blocks)
    except BaseException:
        if world.is_main:
            output.discard_if_empty()  # a folder this attempt created and never wrote to
        raise


def _load_and_train(cfg: UnlearnConfig, world: World, device: torch.device, output: Output, began: float,
                    blocks: tuple[int, ...] | None = None) -> Path:
    run_dir = output.work
    # the corpora need only the tokenizer: a missing or empty one is reported before the model loads
    data = load_pairs(cfg, load_tokenizer(cfg.model, cfg.trust_remote_code))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.dtype, device, cfg.trust_remote_code)
    lens = None
    if uses_lens(cfg.objective):
        lens = TunedLens.load(find_lens(cfg.lens, cfg.model), model)
        lens.requires_grad_(False).set_matmul_dtype(DTYPES[cfg.lens_matmul])
    layers = resolve_layers(cfg, model_parts(model).num_layers)
    _check_resumed_layers(run_dir, cfg, layers)
    check_against_model(cfg, model, layers)
    barrier(world)
    if world.is_main and cfg.eval_base and not reusable_eval(run_dir / BASE_EVAL_FILE, cfg):
        _evaluate(cfg, model, tokenizer, lens, run_dir / BASE_EVAL_FILE)
    barrier(world)
    return train(UnlearnJob(cfg, world, device, model, tokenizer, lens, layers, data, output, began, blocks))


def global_micro_batches(cfg: UnlearnConfig, data: PairedData, step: int) -> list[tuple[int, list[int]]]:
    """(index, pair ids) of every micro-batch of global step `step`; each process takes its share."""
    ids = batch_indices(data.pairs, cfg.batch, step, cfg.seed)
    return [(k // cfg.per_device_batch, ids[k:k + cfg.per_device_batch])
            for k in range(0, cfg.batch, cfg.per_device_batch)]


def _plan(cfg: UnlearnConfig, data: PairedData, world: World, layers: tuple[int, ...] = ()) -> dict:
    """Steps, accumulation and effective epochs; logged before training and saved in run_config.json."""
    steps = max(1, math.ceil(cfg.examples * cfg.epochs / cfg.batch))
    steps_per_epoch = max(1, math.ceil(cfg.examples / cfg.batch))
    unique = min(cfg.examples, len(data.forget))
    plan = {"steps": steps, "steps_per_epoch": steps_per_epoch, "world_size": world.world_size,
            "grad_accum": cfg.batch // (cfg.per_device_batch * world.world_size), "examples": cfg.examples,
            "unique_forget_examples": unique, "unique_retain_examples": min(cfg.examples, len(data.retain)),
            "effective_epochs": steps * cfg.batch / unique}
    if cfg.objective == "sequential":
        plan["phase_starts"] = phase_starts(steps, len(layers))
        if steps < len(layers):
            raise ConfigError(f"--objective sequential gives each of its {len(layers)} layers "
                              f"({','.join(map(str, layers))}) a phase of the run's {steps} steps: pass more "
                              f"--examples or fewer --layers")
    if data.retain_mix is not None:
        plan["retain_mix"] = data.retain_mix
    log.info("%d unique forget examples (%d retain), %d optimiser steps of %d pairs (%d per device x %d accumulation "
             "x %d processes), %.2f effective epochs over the forget set", unique, plan["unique_retain_examples"],
             steps, cfg.batch, cfg.per_device_batch, plan["grad_accum"], world.world_size, plan["effective_epochs"])
    if plan["effective_epochs"] > 1:
        log.warning("effective epochs %.2f > 1: each forget document is seen %.1f times on average",
                    plan["effective_epochs"], plan["effective_epochs"])
    return plan


@dataclass
class UnlearnJob:
    """A checked run, ready to train: the config, the processes and device, the loaded model and lens,
    the resolved target layers, the paired data and the run directory."""

    cfg: UnlearnConfig
    world: World
    device: torch.device
    model: torch.nn.Module
    tokenizer: Any
    lens: TunedLens | None  # None for an objective that reads no lens
    layers: tuple[int, ...]
    data: PairedData
    output: Output
    began: float
    blocks: tuple[int, ...] | None = None  # --blocks: the only blocks that train (None: the method's default)


@dataclass
class TrainingSetup:
    """What `setup_training` hands to the loop."""

    objective: torch.nn.Module  # what each micro-step calls (under DDP with LoRA on several processes)
    model: torch.nn.Module  # the model being trained (peft-wrapped with LoRA)
    trainable: dict[str, torch.Tensor]  # what the optimiser updates and the checkpoint saves
    optimizer: MultiOptimizer
    cache: OriginalCache | None


def sharded(cfg: UnlearnConfig, world: World) -> bool:
    """Full parameters under torchrun are sharded with FSDP2, except with the robust step (it forms the
    gradients by hand and averages them itself) and with the sequential objective (it trains one block
    per phase and averages its gradients itself), so every process holds the whole model (as under DDP)."""
    return cfg.full and world.distributed and not cfg.robust_step and not averages_by_hand(cfg, world)


def averages_by_hand(cfg: UnlearnConfig, world: World) -> bool:
    """The sequential objective under torchrun: the trained tensors change from phase to phase, which DDP's
    and FSDP's fixed sets cannot follow, so the loop's loss function averages the gradients itself."""
    return cfg.objective == "sequential" and world.distributed


def full_trainable(job: UnlearnJob, model: torch.nn.Module) -> None:
    """With --full, what trains: every weight for the lens, next-token and rerouting objectives; the MLPs of
    the three blocks below the layer for rmu (the WMDP paper's); the blocks of its phases for sequential;
    with --cir only the MLP weights it projects; with --full_targets only the named linear layers below the
    deepest target layer."""
    cfg = job.cfg
    num_layers = model_parts(model).num_layers
    if cfg.cir:
        freeze_all_but_cir(model, cir_modules(model, cfg, job.layers, num_layers))
    elif cfg.full_targets != "all":
        blocks = range(min(max(job.layers), num_layers))
        freeze_all_but_cir(model, target_linears(model, full_target_names(cfg), blocks))
    elif cfg.objective == "rmu":
        from .cir import mlp_linears

        model.requires_grad_(False)
        for module in mlp_linears(model, trained_blocks(cfg.objective, job.layers)).values():
            module.weight.requires_grad_(True)
    elif cfg.objective == "sequential":
        model.requires_grad_(False)
        blocks = model_parts(model).blocks
        for index in trained_blocks(cfg.objective, job.layers):
            blocks[index].requires_grad_(True)
    else:
        model.requires_grad_(True)


def build_objective(job: UnlearnJob, model: torch.nn.Module, original, cache: OriginalCache | None) -> torch.nn.Module:
    """The objective module of `--objective` (see `baselines`)."""
    cfg, layers = job.cfg, job.layers
    if cfg.objective == "lens":
        return UnlearnObjective(model, job.lens, layers, original, cfg.retain_loss, cfg.forget_target, cfg.chunk,
                                cfg.skip_first, cache, cfg.forget_loss,
                                resolve_confuse_blocks(cfg, model_parts(model).num_layers))
    common = dict(chunk=cfg.chunk, skip_first=cfg.skip_first, cache=cache)
    args = (model, layers, original, cfg.retain_loss)
    if cfg.objective == "graddiff":
        return GradDiffObjective(*args, **common)
    if cfg.objective == "npo":
        return NPOObjective(*args, **common, beta=cfg.beta)
    if cfg.objective == "simnpo":
        return SimNPOObjective(*args, **common, beta=cfg.beta, gamma=cfg.gamma)
    if cfg.objective == "rmu":
        return RMUObjective(*args, **common, steering_coef=cfg.steering_coef, seed=cfg.seed)
    if cfg.objective == "rr":
        return RerouteObjective(*args, **common, orth_coef=cfg.orth_coef)
    blocks = model_parts(model).blocks
    phase_params = [[p for p in blocks[layer - 1].parameters() if p.requires_grad] for layer in layers]
    return SequentialObjective(*args, **common, forget_target=cfg.forget_target, phase_params=phase_params)


def setup_training(job: UnlearnJob) -> TrainingSetup:
    """LoRA adapters (original model: adapters off) or the objective's parameters (original model: a frozen
    copy, when the objective compares with it; FSDP2 under torchrun), the objective and the optimiser."""
    cfg, model = job.cfg, job.model
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True)
    original = None
    if cfg.full:
        if needs_original(cfg):
            original = FrozenCopy(model)
        if job.blocks is not None and not cfg.cir:  # --cir takes the band through its own modules
            freeze_all_but_band(model, job.blocks, cfg.block_weights)
        else:
            full_trainable(job, model)
        if sharded(cfg, job.world):
            shard_fsdp(model)
        elif job.world.distributed:
            log.info("the gradients are averaged by hand: every process holds the whole model (no FSDP)")
    else:
        torch.manual_seed(cfg.seed)
        blocks = None if cfg.objective == "lens" else trained_blocks(cfg.objective, job.layers)
        model = add_lora(model, cfg, job.layers, blocks, job.blocks)
        original = AdapterDisabled(model)
    model.train()
    cache = OriginalCache(cfg.original_cache_mb * 2**20) if cfg.original_cache_mb else None
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(list(trainable.items()), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                exclude_from_muon=embedding_parameters(unwrap(model)), momentum=cfg.momentum)
    # after the optimiser, which takes what requires grad: the sequential objective freezes all but its phase's block
    objective = build_objective(job, model, original, cache)
    if job.world.distributed and not cfg.full and not cfg.robust_step and not averages_by_hand(cfg, job.world):
        objective = wrap_ddp(objective, job.device)  # the robust step and the sequential one average by themselves
    return TrainingSetup(objective, model, trainable, optimizer, cache)


def band_parameters(model: torch.nn.Module, blocks: Sequence[int], weights: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of the band's MLPs (`weights` mlp) or of the whole blocks (all), by name."""
    parts = model_parts(model)
    chosen = {id(p) for index in blocks for p in (block_component(parts.blocks[index], "mlp") if weights == "mlp"
                                                  else parts.blocks[index]).parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def freeze_all_but_band(model: torch.nn.Module, blocks: Sequence[int], weights: str) -> None:
    """Only the band's weights train (`band_parameters`); every other parameter is frozen."""
    model.requires_grad_(False)
    for param in band_parameters(model, blocks, weights).values():
        param.requires_grad_(True)


def curve_at(job: UnlearnJob, model: torch.nn.Module, step: int) -> dict:
    """The training curve's point after `step` steps. Rank 0 evaluates, as for the final evaluation (a
    LoRA model is whole on every rank), and the others wait for it; their point is empty."""
    point = {}
    if job.world.is_main:
        point = (first_curve_point(job.cfg, model, job.tokenizer, job.device, job.output.work) if step == 0 else
                 evaluate_in_training(job.cfg, model, job.tokenizer, job.device))
        log.info("step %d: %s", step, {k: round(v, 4) for k, v in point.items() if k.endswith("/acc")})
    barrier(job.world)
    return point


def train(job: UnlearnJob) -> Path:
    """Resume or start, run the loop, save the model, evaluate it and write the summary; return the run."""
    cfg, world, run_dir, data = job.cfg, job.world, job.output.work, job.data
    plan = _plan(cfg, data, world, job.layers)
    setup = setup_training(job)
    robust = None  # with any robust option on, the step that forms the gradients (checked before training)
    if cfg.robust_step:
        robust = build_robust_step(job, setup, plan, lambda step: [
            data.micro_batch(ids)["forget"] for _, ids in global_micro_batches(cfg, data, step)])
    cache = setup.cache
    if cache is not None:
        revisits = max(0, plan["steps"] * cfg.batch - plan["unique_retain_examples"])
        log.info("original-model cache: up to %d MiB of retain streams; %d of %d retain documents processed are "
                 "revisits", cfg.original_cache_mb, revisits, plan["steps"] * cfg.batch)
    fsdp = sharded(cfg, world)
    start = 0
    trained = None  # the last step's metrics, when an earlier attempt finished training (and failed after it)
    state = load_checkpoint(run_dir) if cfg.resume else None
    if state is not None:
        start = restore_checkpoint(state, setup.trainable, setup.optimizer)
        if robust is not None:
            robust.load_state_dict(state["extra"]["robust"])
        trained = state["extra"].get("trained")
        log.info("resuming %s at step %d of %d%s", run_dir, start, plan["steps"],
                 ": training is done, saving and evaluating the model" if trained is not None else "")
    unwrapped = getattr(setup.objective, "module", setup.objective)  # under DDP, the wrapped module
    if start > 0 and hasattr(unwrapped, "check_saturation"):
        unwrapped.check_saturation = False  # a resumed model has forgotten: its loss is meant to saturate by now
    # a sequential run's phase starts follow from its steps and layers: left out, so that every run's saved
    # config holds the same plan keys (a file that holds them all reads back as the run's own config)
    saved_plan = {key: value for key, value in plan.items() if key != "phase_starts"}
    run_config = {**to_jsonable(cfg), **saved_plan, "layers": list(job.layers), "run_dir": str(job.output.final)}
    if job.blocks is not None:
        run_config[TRAINED_BLOCKS_KEY] = list(job.blocks)
    if world.is_main:
        write_json_atomic(run_dir / RUN_CONFIG_FILE, run_config)
    tracker = open_tracker(cfg, run_dir, job.output.final.name, "unlearn", resume_step=start,
                           final=job.output.final)
    tracker.log_config(run_config)
    metrics_log = MetricsLog(run_dir / METRICS_FILE, resume_step=start, tracker=tracker)
    if cfg.eval_every > plan["steps"]:
        log.warning("--eval_every %d is more than the run's %d steps: only step 0 is evaluated during training",
                    cfg.eval_every, plan["steps"])
    if cfg.eval_every and start == 0:
        metrics_log.write({"step": 0, **curve_at(job, setup.model, 0)})

    def micro_batches(step: int) -> list:
        return [(index, data.micro_batch(pair_ids)) for index, pair_ids in
                shard(global_micro_batches(cfg, data, step), world)]

    starts = plan.get("phase_starts", ())
    by_hand = averages_by_hand(cfg, world)
    micro_done = [0]  # micro-batches of the current step done (sequential under torchrun)

    def loss_fn(item, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        index, batch = item
        retain_weight, forget_weight = weights(cfg.objective, step, plan, cfg.retain_coef, cfg.forget_coef, starts)
        target_seed = (cfg.seed * 1_000_003 + step) * 1_009 + index
        if starts and setup.objective.phase != phase_of(step, starts):
            setup.objective.set_phase(phase_of(step, starts))
        with torch.autocast(job.device.type, torch.bfloat16, enabled=cfg.mixed_precision):
            if robust is not None:  # forms and writes the gradients itself: the loss comes back detached
                loss, forget, retain = robust(batch["forget"], batch["retain"], retain_weight, forget_weight,
                                              target_seed, step)
            else:
                loss, forget, retain = setup.objective(batch["forget"], batch["retain"], retain_weight,
                                                       forget_weight, target_seed=target_seed)
        if by_hand:  # backward here, and the gradients averaged over processes after the step's last micro-batch
            (loss / plan["grad_accum"]).backward()
            loss = loss.detach()
            micro_done[0] += 1
            if micro_done[0] == plan["grad_accum"]:
                micro_done[0] = 0
                average_over_ranks([p.grad for p in setup.trainable.values() if p.grad is not None], world)
        extra = {}
        if cache is not None and retain_weight:
            hits, misses = cache.take_counts()
            extra["original_cached"] = hits / max(1, hits + misses)
        tokens = batch["forget"]["attention_mask"].sum() + (batch["retain"]["attention_mask"].sum()
                                                            if retain_weight else 0)
        return loss, {"forget_loss": forget.item(), "retain_loss": retain.item(), "retain_weight": retain_weight,
                      "forget_weight": forget_weight, "tokens": float(tokens), **extra}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        metrics.update(mean_over_ranks(metrics, ("forget_loss", "retain_loss"), world))
        metrics["tokens_per_s"] = metrics.get("tokens_per_s", 0.0) * world.world_size
        if robust is not None:
            metrics.update(robust.after_step(step, metrics))
        line = {k: metrics[k] for k in LOGGED if k in metrics}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            line.update(curve_at(job, setup.model, step + 1))
        metrics_log.write(line)

    def checkpoint(step: int, trained: dict | None = None) -> None:
        if world.is_main or fsdp:  # under FSDP every rank writes its own shards
            extra = {"run": cfg.name, **({"robust": robust.state_dict()} if robust is not None else {}),
                     **({"trained": trained} if trained is not None else {})}
            save_checkpoint(run_dir, step, setup.trainable, setup.optimizer, extra=extra)
        barrier(world)

    spec = LoopSpec(params=list(setup.trainable.values()), optimizer=setup.optimizer, base_lr=cfg.lr,
                    total_steps=plan["steps"], micro_batches=micro_batches, loss_fn=loss_fn, clip=cfg.clip,
                    lr_factor=lambda s: step_lr_factor(cfg, plan, s) * (
                        robust.lr_scale if robust is not None else 1.0),
                    no_sync=no_sync(setup.objective if not fsdp else unwrap(setup.model)), on_step=on_step,
                    checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every, desc="unlearn",
                    postfix=("forget_loss", "retain_loss", "forget_weight", "retain_weight", "lr", "tokens_per_s"),
                    stop=robust.should_stop if robust is not None else None)
    trained_at = time.perf_counter()
    with tracker:  # closed before the run is committed; marked failed on an error
        if trained is not None:
            last = dict(trained)
        else:
            last = run_loop(spec, start_step=start)
            if robust is not None:
                last.update(robust.summary(last))
            if cfg.checkpoint_every:
                # the trained weights, kept until the run is saved and evaluated: should either fail, --resume
                # goes straight back to them instead of training again
                checkpoint(int(last.get("step", start)), trained=last)
        return _finish(job, setup.model, plan, last, time.perf_counter() - trained_at, tracker)


def step_lr_factor(cfg: UnlearnConfig, plan: dict, step: int) -> float:
    """The schedule's learning-rate factor at `step`; the sequential objective restarts it in each phase
    (EleutherAI's runs trained each phase as a run of its own)."""
    starts = plan.get("phase_starts")
    if not starts:
        return lr_factor(step, plan["steps"], cfg.warmup, cfg.schedule)
    phase = phase_of(step, starts)
    end = starts[phase + 1] if phase + 1 < len(starts) else plan["steps"]
    return lr_factor(step - starts[phase], end - starts[phase], cfg.warmup, cfg.schedule)


def _finish(job: UnlearnJob, model: torch.nn.Module, plan: dict, last: dict[str, float], train_seconds: float,
            tracker: Tracker | None = None) -> Path:
    """Save the trained model, evaluate it, drop the checkpoint and write the summary, which marks the run done;
    the tracker gets the summary and the evaluations before and after unlearning."""
    cfg, world, run_dir = job.cfg, job.world, job.output.work
    merged = save_model(cfg, model, job.tokenizer, run_dir, world)
    if world.is_main:
        _evaluate(cfg, merged, job.tokenizer, job.lens, run_dir / EVAL_FILE)
        remove_checkpoint(run_dir)
        summary = {
            "examples": cfg.examples, "epochs": plan["effective_epochs"], "steps": plan["steps"],
            "final_retain_loss": last.get("retain_loss"), "final_forget_loss": last.get("forget_loss"),
            "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - job.began,
            "layers": list(job.layers), "world_size": world.world_size,
            **{k: last[k] for k in ROBUST_SUMMARY_KEYS if k in last}}
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
        if tracker is not None:
            tracker.log_summary({**summary, **tracked_evals(run_dir)})
            tracker.close()  # its files are complete before the run folder is swapped in
        job.output.commit()
        log.info("run finished in %.1f s -> %s", time.perf_counter() - job.began, job.output.final)
    barrier(world)
    return job.output.final

