"""`lens train` and `lens eval`: fit a tuned lens to a frozen model and measure it per layer."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cli import Command
from .config import ConfigError, option, to_jsonable, write_json_atomic
from .data import batch_indices, collate, load_texts, tokenize
from .layers import forward_streams, model_parts
from .lens import PARAMS_FILE, TunedLens
from .losses import lens_kl, select_tokens
from .loop import LoopSpec, MetricsLog, load_checkpoint, restore_checkpoint, run_loop, save_checkpoint
from .models import DTYPES, ModelOptions, load_model, model_short_name
from .optim import build_optimizer, lr_factor

log = logging.getLogger(__name__)

DEFAULT_LENS_DATA = "facts:all"
RUN_CONFIG_FILE = "train_config.json"


@dataclass
class CorpusOptions:
    """Where lens text comes from and how it is split into train and held-out parts."""

    data: str = option(DEFAULT_LENS_DATA, "corpus: hub dataset id, local jsonl/json/parquet/txt file or saved "
                                          "dataset folder, or facts:<domain> / facts:all")
    data_config: str | None = option(None, "hub dataset config name")
    split: str = option("train", "dataset split")
    column: str | None = option(None, "text column; None reads text, or title/abstract/text joined")
    limit: int | None = option(None, "use only the first N documents")
    heldout: float = option(0.1, "fraction of documents held out for `lens eval` (same seed, same split)")
    max_length: int = option(128, "truncate documents to this many tokens")
    seed: int = option(0, "seed for the train/held-out split, data order and initialisation")

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout < 1.0:
            raise ConfigError(f"--heldout must be in [0, 1), got {self.heldout}")
        if self.max_length < 2:
            raise ConfigError(f"--max_length must be at least 2, got {self.max_length}")


@dataclass
class LensTrainConfig(CorpusOptions, ModelOptions):
    out: str | None = option(None, "output folder for the lens; None means runs/lens_<model>")
    steps: int | None = option(None, "optimiser steps; None means one epoch over the training documents")
    batch: int = option(8, "documents per optimiser step")
    per_device_batch: int = option(8, "documents per forward pass; batch / per_device_batch = grad accumulation")
    optimizer: Literal["muon", "adamw", "sgd"] = option("muon", "muon (2-D weights) + adamw (biases), adamw, "
                                                                "or sgd with Nesterov momentum")
    lr: float = option(1e-2, "peak learning rate (Muon's, matched to AdamW's update size: 1e-3 leaves one epoch far "
                             "short, 5e-2 overshoots the last layers; sgd wants about 0.1)")
    weight_decay: float = option(0.01, "weight decay")
    warmup: int = option(0, "warmup steps")
    schedule: Literal["linear", "cosine", "constant"] = option("linear", "lr schedule after warmup")
    clip: float = option(1.0, "gradient-norm clip (0 disables)")
    chunk: int = option(512, "tokens per chunk of full-vocabulary KL (bounds memory)")
    lens_matmul: Literal["bfloat16", "float32"] = option("bfloat16", "dtype of the lens's unembedding product during "
                                                                     "training (bfloat16 is several times faster; the "
                                                                     "KL and the translators stay float32)")
    checkpoint_every: int = option(50, "write a resumable checkpoint every N steps (0 disables)")
    resume: bool = option(False, "continue from the checkpoint in --out")
    overwrite: bool = option(False, "replace a finished lens in --out")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch % self.per_device_batch:
            raise ConfigError(f"--batch {self.batch} is not a multiple of --per_device_batch {self.per_device_batch}: "
                              f"choose them so batch = per_device_batch x grad accumulation")
        if self.out is None:
            self.out = str(Path("runs") / f"lens_{model_short_name(self.model)}")


@dataclass
class LensEvalConfig(CorpusOptions, ModelOptions):
    lens: str = option("", "lens folder (params.pt + config.json) or hub id")
    out: str | None = option(None, "write the per-layer table as JSON here (and a PNG plot beside it)")
    batch: int = option(8, "documents per forward pass")
    chunk: int = option(512, "tokens per chunk of full-vocabulary KL")
    lens_matmul: Literal["float32", "bfloat16"] = option("float32", "dtype of the lens's unembedding product "
                                                                    "(bfloat16: faster, KL to about 3 digits)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lens:
            raise ConfigError("--lens is required: the folder written by `lensunlearn lens train`")


def split_documents(cfg: CorpusOptions, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenised (train, held-out) documents: a seeded shuffle, the last `heldout` share held out."""
    texts = load_texts(cfg.data, config=cfg.data_config, split=cfg.split, column=cfg.column, limit=cfg.limit)
    docs = tokenize(texts, tokenizer, cfg.max_length)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_held = int(round(len(docs) * cfg.heldout))
    held = [docs[i] for i in order[len(docs) - n_held:]]
    train = [docs[i] for i in order[:len(docs) - n_held]]
    if not train:
        raise ValueError(f"corpus {cfg.data} leaves no training documents after holding out {cfg.heldout:.0%}")
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


def _prepare_out(cfg: LensTrainConfig) -> Path:
    out = Path(cfg.out)
    if (out / PARAMS_FILE).exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a finished lens: pass --overwrite to replace it, "
                              f"or choose another --out")
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    if (out / "checkpoint.pt").exists() and not cfg.resume:
        raise FileExistsError(f"{out} holds an unfinished run: pass --resume to continue it or --overwrite to restart")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train_lens(cfg: LensTrainConfig) -> TunedLens:
    """Fit a tuned lens to a frozen model: KL(p_final || q_lens) summed over layers, mean over tokens."""
    out = _prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    model.requires_grad_(False)
    num_layers = model_parts(model).num_layers
    train_docs, _ = split_documents(cfg, tokenizer)
    steps = cfg.steps or max(1, math.ceil(len(train_docs) / cfg.batch))
    accumulation = cfg.batch // cfg.per_device_batch
    lens = TunedLens.from_model(model).set_matmul_dtype(DTYPES[cfg.lens_matmul])
    optimizer = build_optimizer(lens.translators.named_parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    trainable = dict(lens.translators.state_dict(keep_vars=True))
    start = 0
    state = load_checkpoint(out) if cfg.resume else None
    if state is not None:
        start = restore_checkpoint(state, trainable, optimizer)
        log.info("resuming lens training at step %d of %d", start, steps)
    write_json_atomic(out / RUN_CONFIG_FILE, to_jsonable(cfg))
    log.info("lens for %s: %d layers, %d training documents, %d steps of %d documents (%.2f epochs)",
             cfg.model, num_layers, len(train_docs), steps, cfg.batch, steps * cfg.batch / len(train_docs))
    metrics_log = MetricsLog(out / "metrics.jsonl", resume_step=start)
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
    run_loop(spec, start_step=start)
    lens.save(out)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    log.info("lens saved to %s after %.1f s", out, time.perf_counter() - began)
    return lens


def lens_table(model, lens: TunedLens, docs: list[list[int]], pad_id: int, batch: int, chunk: int) -> list[dict]:
    """Per-layer mean token KL to the model's output and top-1 agreement, tuned lens vs logit lens."""
    num_layers = lens.num_layers
    sums = torch.zeros(num_layers, 4, dtype=torch.float64)  # logit kl, tuned kl, logit top1, tuned top1
    n_tokens = 0
    for start in tqdm(range(0, len(docs), batch), desc="lens eval", dynamic_ncols=True):
        streams, final = lens_streams(model, collate(docs[start:start + batch], pad_id), num_layers)
        n_tokens += streams.shape[0]
        with torch.no_grad():
            for s in range(0, streams.shape[0], chunk):
                target = F.log_softmax(lens.decode(final[s:s + chunk].float()), dim=-1)
                top = target.argmax(-1)
                for layer in range(num_layers):
                    h = streams[s:s + chunk, layer].float()
                    for column, logits in ((0, lens.decode(h)), (1, lens(h, layer))):
                        pred = F.log_softmax(logits, dim=-1)
                        sums[layer, column] += (target.exp() * (target - pred)).sum().double()
                        sums[layer, column + 2] += (pred.argmax(-1) == top).sum().double()
    means = (sums / max(n_tokens, 1)).tolist()
    return [{"layer": l, "logit_lens_kl": m[0], "tuned_lens_kl": m[1], "logit_lens_top1": m[2],
             "tuned_lens_top1": m[3]} for l, m in enumerate(means)]


def format_lens_table(rows: list[dict]) -> str:
    lines = ["layer  logit_lens_kl  tuned_lens_kl  logit_top1  tuned_top1"]
    lines += [f"{r['layer']:>5}  {r['logit_lens_kl']:>13.4f}  {r['tuned_lens_kl']:>13.4f}  "
              f"{r['logit_lens_top1']:>10.3f}  {r['tuned_lens_top1']:>10.3f}" for r in rows]
    return "\n".join(lines)


def plot_lens_table(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["logit_lens_kl"] for r in rows], marker="o", label="logit lens")
    ax.plot(layers, [r["tuned_lens_kl"] for r in rows], marker="o", label="tuned lens")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(model || lens) [nats]")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def eval_lens(cfg: LensEvalConfig) -> dict:
    """Per-layer KL and top-1 agreement of the tuned and logit lenses on held-out text."""
    model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    lens = TunedLens.load(cfg.lens, model).set_matmul_dtype(DTYPES[cfg.lens_matmul])
    train_docs, held = split_documents(cfg, tokenizer)
    docs = held or train_docs
    if not held:
        log.warning("--heldout is 0: evaluating on the training documents")
    rows = lens_table(model, lens, docs, tokenizer.pad_token_id, cfg.batch, cfg.chunk)
    result = {"model": cfg.model, "lens": cfg.lens, "data": cfg.data, "documents": len(docs), "layers": rows}
    print(format_lens_table(rows))
    if cfg.out:
        out = Path(cfg.out)
        write_json_atomic(out, result)
        plot_lens_table(rows, out.with_suffix(".png"), f"{model_short_name(cfg.model)}: lens KL by layer")
        log.info("wrote %s and %s", out, out.with_suffix(".png"))
    return result


COMMANDS = [
    Command(("lens", "train"), "train a tuned lens for a model", LensTrainConfig, train_lens),
    Command(("lens", "eval"), "per-layer KL and top-1 agreement of a tuned lens vs the logit lens", LensEvalConfig,
            eval_lens),
]
