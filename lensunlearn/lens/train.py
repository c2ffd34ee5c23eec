"""`lens train`: fit a tuned lens to a frozen model, and the lens corpus that `lens eval` shares."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..core.atomic import write_json_atomic
from ..core.checks import check_resumed_config
from ..core.config import to_jsonable
from ..core.outputs import Output, prepare_output
from ..core.paths import LENS_PARAMS_FILE, LENS_TRAIN_CONFIG_FILE, METRICS_FILE
from ..data.corpora import batch_indices, collate, load_texts, tokenize
from ..modeling.layers import forward_streams, model_parts
from ..modeling.loading import DTYPES, load_model
from ..modeling.losses import lens_kl, select_tokens
from ..train.checkpoint import load_checkpoint, remove_checkpoint, restore_checkpoint, save_checkpoint
from ..train.loop import LoopSpec, MetricsLog, run_loop
from ..train.optim import build_optimizer, lr_factor
from ..train.tracking import TRACKING_FIELDS, check_tracker, open_tracker
from .options import DEFAULT_LENS_DATA, CorpusOptions, LensTrainConfig  # noqa: F401 (re-exported)
from .tuned_lens import TunedLens

log = logging.getLogger(__name__)


def split_documents(cfg: CorpusOptions, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenised (train, held-out) documents: a seeded shuffle, the last `holdout` share held out."""
    texts = load_texts(cfg.corpus, config=cfg.corpus_config, split=cfg.corpus_split, column=cfg.corpus_column,
                       limit=cfg.corpus_limit, column_flag="--corpus_column")
    docs = tokenize(texts, tokenizer, cfg.max_length)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_held = int(round(len(docs) * cfg.holdout))
    held = [docs[i] for i in order[len(docs) - n_held:]]
    train = [docs[i] for i in order[:len(docs) - n_held]]
    if not train:
        raise ValueError(f"--corpus {cfg.corpus} leaves no training documents after holding out {cfg.holdout:.0%}")
    return train, held


def lens_streams(model, batch: dict[str, torch.Tensor], num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([tokens, L, d] streams 0..L-1, [tokens, d] final pre-norm stream) at real tokens, no grad."""
    device = next(model.parameters()).device
    with torch.no_grad():
        captured = forward_streams(model, range(num_layers), batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device), final=True)
    mask = batch["attention_mask"].to(device)
    # detach: a model prepared for checkpointing makes its embedding output require grad even here
    streams = torch.stack([select_tokens(captured[l], mask).detach() for l in range(num_layers)], dim=1)
    return streams, select_tokens(captured[num_layers], mask).detach()


# Settings a resumed lens training may change: where it runs, how often it checkpoints, where it is tracked.
RESUME_MAY_CHANGE = ("resume", "overwrite", "device", "checkpoint_every", "out", *TRACKING_FIELDS)


def _prepare_out(cfg: LensTrainConfig) -> Output:
    """Where the lens is written (see `outputs.prepare_output`): a finished lens is replaced only with
    --overwrite and only once the new one is saved; a resumed run must keep its settings."""
    check_tracker(cfg)
    output = prepare_output(cfg.out, "lens", overwrite=cfg.overwrite, resume=cfg.resume,
                            finished=lambda p: (p / LENS_PARAMS_FILE).is_file(),
                            reads=(("--model", cfg.model), ("--corpus", cfg.corpus)))
    saved = output.work / LENS_TRAIN_CONFIG_FILE
    if cfg.resume and saved.is_file():
        check_resumed_config(json.loads(saved.read_text()), cfg, RESUME_MAY_CHANGE, str(output.final))
    return output


def train_lens(cfg: LensTrainConfig) -> TunedLens:
    """Fit a tuned lens to a frozen model: KL(p_final || q_lens) summed over layers, mean over tokens."""
    output = _prepare_out(cfg)
    lens = output.run(lambda work: _train(cfg, work))
    log.info("lens saved to %s", output.final)
    return lens


def _train(cfg: LensTrainConfig, out: Path) -> TunedLens:
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    model.requires_grad_(False)
    num_layers = model_parts(model).num_layers
    train_docs, _ = split_documents(cfg, tokenizer)
    steps = cfg.steps or max(1, math.ceil(len(train_docs) / cfg.batch))
    accumulation = cfg.batch // cfg.per_device_batch
    lens = TunedLens.from_model(model).set_matmul_dtype(DTYPES[cfg.lens_matmul])
    optimizer = build_optimizer(lens.translators.named_parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                momentum=cfg.momentum)
    trainable = dict(lens.translators.state_dict(keep_vars=True))
    start = 0
    state = load_checkpoint(out) if cfg.resume else None
    if state is not None:
        start = restore_checkpoint(state, trainable, optimizer)
        log.info("resuming lens training at step %d of %d", start, steps)
    write_json_atomic(out / LENS_TRAIN_CONFIG_FILE, to_jsonable(cfg))
    log.info("lens for %s: %d layers, %d training documents, %d steps of %d documents (%.2f epochs)",
             cfg.model, num_layers, len(train_docs), steps, cfg.batch, steps * cfg.batch / len(train_docs))
    tracker = open_tracker(cfg, out, Path(cfg.out).name, "lens", resume_step=start, final=cfg.out)
    tracker.log_config({**to_jsonable(cfg), "steps": steps, "num_layers": num_layers})
    metrics_log = MetricsLog(out / METRICS_FILE, resume_step=start, tracker=tracker)
    layers = list(range(num_layers))

    def micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
        idx = batch_indices(len(train_docs), cfg.batch, step, cfg.seed)
        return [collate([train_docs[i] for i in idx[k:k + cfg.per_device_batch]], tokenizer.pad_token_id)
                for k in range(0, cfg.batch, cfg.per_device_batch)]

    def loss_fn(batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        streams, final = lens_streams(model, batch, num_layers)
        # Summed over layers, not averaged: translator l gets its own layer's gradient whatever the
        # depth, so one learning rate fits every model (averaging divided it by the layer count).
        scale = 1.0 / (streams.shape[0] * accumulation)
        loss = lens_kl(lens, layers, streams, final, chunk=cfg.chunk, backward_scale=scale).sum() * scale * accumulation
        return loss, {"loss": loss.item(), "tokens": float(streams.shape[0])}

    spec = LoopSpec(params=lens.translator_parameters(), optimizer=optimizer, base_lr=cfg.lr, total_steps=steps,
                    micro_batches=micro_batches, loss_fn=loss_fn, clip=cfg.clip,
                    lr_factor=lambda s: lr_factor(s, steps, cfg.warmup, cfg.schedule),
                    on_step=lambda s, m: metrics_log.write(m),
                    checkpoint=lambda s: save_checkpoint(out, s, trainable, optimizer),
                    checkpoint_every=cfg.checkpoint_every, desc="lens train", postfix=("loss", "tokens_per_s"))
    began = time.perf_counter()
    with tracker:  # closed before the lens folder is swapped in; marked failed on an error
        last = run_loop(spec, start_step=start)
        lens.save(out)
        remove_checkpoint(out)
        tracker.log_summary({"steps": steps, "final_loss": last.get("loss"), "train_seconds":
                             time.perf_counter() - began})
    log.info("lens trained in %.1f s", time.perf_counter() - began)
    return lens


