"""The options of every command that trains (`TrainingOptions`) or mirrors a run to a tracker
(`TrackingOptions`), torch-free so that `--help` never imports torch."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from ..core.checks import require_nonnegative, require_positive
from ..core.config import ConfigError, Options, option

OptimizerName = Literal["adamw", "muon", "sgd"]
ScheduleName = Literal["linear", "cosine", "constant"]
SCHEDULES = ("linear", "cosine", "constant")
# Momentum when --momentum is not given: the tuned-lens library's SGD (Nesterov) and torch's Muon default.
DEFAULT_MOMENTUM = {"sgd": 0.9, "muon": 0.95}


@dataclass
class TrainingOptions(Options):
    """The optimiser, its schedule and the batch of every command that trains (a config that needs
    other defaults redeclares a field with `config.redefault`)."""

    help_group = "optimisation"

    optimizer: OptimizerName = option("adamw", "adamw; muon for 2-D hidden matrices (LoRA A and B included) with "
                                               "adamw for the rest; or sgd (Nesterov momentum, see --momentum)")
    momentum: float | None = option(None, "momentum of sgd (Nesterov) and muon; 0 with sgd: plain SGD, each step "
                                          "-lr x gradient", default_text="0.9 for sgd, 0.95 for muon")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.01, "weight decay")
    warmup: int = option(0, "linear warmup steps")
    schedule: ScheduleName = option("linear", "lr schedule after warmup")
    clip: float = option(1.0, "clip the gradient's norm to this (0: no clipping)")
    batch: int = option(32, "examples per optimiser step = per_device_batch x grad accumulation x processes")
    per_device_batch: int = option(8, "examples per forward pass on one device")

    def __post_init__(self) -> None:
        require_positive(batch=self.batch, per_device_batch=self.per_device_batch, lr=self.lr)
        require_nonnegative(weight_decay=self.weight_decay, warmup=self.warmup, clip=self.clip)
        if self.momentum is not None:
            if not 0 <= self.momentum < 1:
                raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
            if self.optimizer == "adamw":
                raise ConfigError("--momentum sets the momentum of sgd and muon; adamw has its own betas: drop "
                                  "--momentum or pass --optimizer sgd or muon")
        if self.batch % self.per_device_batch:
            raise ConfigError(f"--batch {self.batch} is not a multiple of --per_device_batch {self.per_device_batch}: "
                              f"batch = per_device_batch x grad accumulation x number of processes")
        super().__post_init__()


# tracker -> (module imported, package installed, extra of lensunlearn that installs it)
TRACKERS = {"wandb": ("wandb", "wandb", "wandb"),
            "tensorboard": ("torch.utils.tensorboard", "tensorboard", "tensorboard")}
# Fields that say where a run is mirrored, not what it computes: a resumed run may change them.
TRACKING_FIELDS = ("tracker",)


def install_hint(tracker: str) -> str:
    _, package, extra = TRACKERS[tracker]
    return f"--tracker {tracker} needs the {package} package: pip install 'lensunlearn[{extra}]'"


@dataclass
class TrackingOptions(Options):
    help_group = "tracking"

    tracker: str | None = option(None, "also log the run (config, metrics, evaluations, plots) to wandb (offline "
                                       "unless WANDB_MODE is set; project $WANDB_PROJECT or lensunlearn) or "
                                       "tensorboard, in the output folder",
                                 metavar="{" + ",".join(TRACKERS) + "}", default_text="none: metrics.jsonl only")

    def __post_init__(self) -> None:
        if self.tracker is not None:
            if self.tracker not in TRACKERS:
                raise ConfigError(f"--tracker {self.tracker!r} is not a tracker: choose one of "
                                  f"{', '.join(TRACKERS)}, or leave it out")
            # found without importing it, so the error comes before any model loads
            if importlib.util.find_spec(TRACKERS[self.tracker][1]) is None:
                raise ConfigError(install_hint(self.tracker))
        super().__post_init__()
