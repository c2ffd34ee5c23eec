"""The options of `lens train` and `lens eval`, and the lens corpus they share, torch-free so that
`--help` never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.checks import require_nonnegative, require_positive
from ..core.config import Command, ConfigError, Options, option, redefault
from ..core.paths import LENS_CONFIG_FILE, LENS_PARAMS_FILE
from ..modeling.options import ModelOptions, model_short_name
from ..train.options import OptimizerName, TrackingOptions, TrainingOptions


def default_lens_path(model: str) -> Path:
    """Where `lensunlearn lens train` writes the lens of `model` unless told otherwise: runs/lens_<model>."""
    return Path("runs") / f"lens_{model_short_name(model)}"


DEFAULT_LENS_DATA = "facts:all"


@dataclass
class CorpusOptions(Options):
    """Where lens text comes from and how it is split into train and held-out parts (`lens train` and
    `lens eval` split it alike, so `lens eval` measures on documents the lens never saw)."""

    help_group = "data"

    corpus: str = option(DEFAULT_LENS_DATA, "text the lens is fitted on: hub dataset id, local jsonl/json/parquet/txt "
                                            "file or saved dataset folder, or facts:<domain> / facts:all",
                         old_names=("data",))
    corpus_config: str | None = option(None, "hub dataset config of --corpus", default_text="none",
                                       old_names=("data_config",))
    corpus_split: str = option("train", "dataset split of --corpus", old_names=("split",))
    corpus_column: str | None = option(None, "text column of --corpus", old_names=("column",),
                                       default_text="text, or title/abstract/text joined")
    corpus_limit: int | None = option(None, "use only the first N documents of --corpus", default_text="all",
                                      old_names=("limit",))
    holdout: float = option(0.1, "fraction of documents held out for `lens eval` (same seed, same split)",
                            old_names=("heldout",))
    max_length: int = option(128, "truncate documents to this many tokens")
    seed: int = option(0, "seed for the train/held-out split, data order and initialisation", group="run")

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.max_length < 2:
            raise ConfigError(f"--max_length must be at least 2, got {self.max_length}")
        super().__post_init__()


@dataclass
class LensTrainConfig(TrackingOptions, CorpusOptions, TrainingOptions, ModelOptions):
    optimizer: OptimizerName = redefault(TrainingOptions, "optimizer", "muon")
    batch: int = redefault(TrainingOptions, "batch", 8)
    out: str | None = option(None, "the lens folder", metavar="DIR", default_text="runs/lens_<model>")
    steps: int | None = option(None, "optimiser steps", default_text="one epoch over the training documents")
    lr: float = option(1e-2, "peak learning rate (Muon's, matched to AdamW's update size: 1e-3 leaves one epoch far "
                             "short, 5e-2 overshoots the last layers; sgd wants about 0.1)")
    chunk: int = option(512, "tokens per chunk of full-vocabulary KL (bounds memory)", group="optimisation")
    lens_matmul: Literal["bfloat16", "float32"] = option("bfloat16", "dtype of the lens's unembedding product during "
                                                                     "training (bfloat16 is several times faster; the "
                                                                     "KL and the translators stay float32)",
                                                         group="optimisation")
    checkpoint_every: int = option(50, "write a resumable checkpoint every N steps (0: none)")
    resume: bool = option(False, "continue from the checkpoint in --out")
    overwrite: bool = option(False, "replace a finished lens in --out")

    def __post_init__(self) -> None:
        super().__post_init__()
        # an untrained lens saved as if trained is the failure these prevent
        require_positive(steps=self.steps, chunk=self.chunk, corpus_limit=self.corpus_limit)
        require_nonnegative(checkpoint_every=self.checkpoint_every)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pick one")
        if self.out is None:
            self.out = str(default_lens_path(self.model))


@dataclass
class LensEvalConfig(CorpusOptions, ModelOptions):
    lens: str = option("", f"lens folder ({LENS_PARAMS_FILE} + {LENS_CONFIG_FILE}) or hub id (required)",
                       group="model", metavar="DIR")
    out: str | None = option(None, "JSON file for the per-layer table (a PNG plot is written beside it)",
                             metavar="FILE", default_text="print the table only")
    eval_batch: int = option(8, "documents per evaluation forward pass", old_names=("batch",), group="evaluation")
    eval_limit: int | None = option(None, "score only the first N held-out documents (the table's cost grows with "
                                          "them)", default_text="all", old_names=("max_docs",), group="evaluation")
    chunk: int = option(512, "tokens per chunk of full-vocabulary KL", group="evaluation")
    lens_matmul: Literal["float32", "bfloat16"] = option("float32", "dtype of the lens's unembedding product "
                                                                    "(bfloat16: faster, KL to about 3 digits)",
                                                         group="evaluation")
    overwrite: bool = option(False, "replace an existing --out written by `lens eval`")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(eval_batch=self.eval_batch, eval_limit=self.eval_limit)
        if not self.lens:
            raise ConfigError("--lens is required: the folder written by `lensunlearn lens train`")


COMMANDS = [
    Command(("lens", "train"), "train a tuned lens for a model", LensTrainConfig, "lensunlearn.lens.train:train_lens"),
    Command(("lens", "eval"), "per-layer KL and top-1 agreement of a tuned lens vs the logit lens", LensEvalConfig,
            "lensunlearn.lens.evaluate:eval_lens"),
]
