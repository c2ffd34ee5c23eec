"""What `unlearn --objective` accepts, checked before anything loads, and each objective's own settings.

Torch-free on purpose: the config checks and the settings table are read when a command line is
parsed. The objectives themselves live in `baselines` (and the lens objective in `objective`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..core.checks import require_nonnegative, require_positive
from ..core.config import ConfigError

OBJECTIVES = ("lens", "rmu", "graddiff", "npo", "simnpo", "rr", "sequential")
# Objectives whose losses read the model's output distribution (next-token losses): their "layer" is the
# model's output, and every block can change it.
OUTPUT_OBJECTIVES = ("graddiff", "npo", "simnpo")
# The retain losses each objective accepts, its paper's first.
RETAIN_CHOICES = {"lens": ("l2", "kl", "relative"), "rmu": ("mse",), "graddiff": ("nll", "kl"), "npo": ("nll", "kl"),
                  "simnpo": ("nll", "kl"), "rr": ("l2",), "sequential": ("l2", "kl")}
# Objectives whose forget loss is a cross-entropy against a uniform or sampled token (--forget_target).
TARGETED = ("lens", "sequential")
# Objectives that compare with the original model (a frozen copy in full-parameter mode), beside those
# whose retain loss does (kl, l2, mse).
NEEDS_ORIGINAL = ("lens", "rmu", "npo", "rr", "sequential")

# Each objective's own settings: `unlearn --objective NAME` (and a search's points) start from the preset
# and take these over it; the budget (examples, batch, per_device_batch, max_length, epochs) stays the
# preset's. Objectives whose losses read no layer clear --layers. Each paper's coefficients and layer
# choice are scaled to a 30-block model (the embedded SmolLM2-135M). rmu's steering norm and learning rate
# come from a search on that model (country capitals, the small preset's budget): of c in {150, 400} and lr
# in {5e-5, 2e-4, 1e-3}, c 400 at lr 2e-4 was the one point to forget to 40 % or less (35.6 %) at
# perplexity within 1.10x (1.02x) without taking a kept domain below half its base; it also took country
# languages to 15 % when they were the forget domain. simnpo's beta: the paper's 2.5 starts saturated on
# fact sentences (beta x their mean token loss, about 3.6 nats, is about 9, so the forget gradient vanishes
# and nothing is forgotten); 0.25 keeps the loss in its live range and forgets country capitals to 42.5 %
# at lr 1e-4, 28.7 % at lr 2e-4 (the one point within the targets, at heavy cost to the kept domains).
# rr's learning rate: at 1e-3 the rerouting loss (the cosine to the original streams) stayed at 0.99999
# over the first 21 steps, the streams being dominated by a few large channels that small LoRA updates do
# not turn; at 1e-2 it falls to about 0.15 and forgets country capitals to 25.6 % at 1.00x perplexity.
# sequential's layers and learning rate: streams 29, 27, 25, 23 at 1e-3 forgot nothing (90.0 %), at 1e-2
# only to 48.8 %; streams 22, 18, 14, 10 at 1e-2 forget to 30.6 %: the phases have to reach the middle
# blocks.
# npo's and graddiff's learning rates are points of a search too (docs/baselines.md has every search
# point); tune them with `lensunlearn search` on data of your own.
OBJECTIVE_SETTINGS: dict[str, dict[str, Any]] = {
    "rmu": dict(layers=(8,), full=True, lr=2e-4, retain_loss="mse", retain_coef=100.0, forget_coef=1.0,
                steering_coef=400.0, weight_decay=0.0, lora_targets="mlp"),
    "graddiff": dict(layers=None, lr=1e-4, retain_loss="nll", retain_coef=1.0, forget_coef=1.0),
    "npo": dict(layers=None, lr=1e-4, retain_loss="nll", retain_coef=1.0, forget_coef=1.0, beta=0.1),
    "simnpo": dict(layers=None, lr=2e-4, retain_loss="nll", retain_coef=1.0, forget_coef=1.0, beta=0.25, gamma=0.0),
    "rr": dict(layers=(10, 20), lr=1e-2, retain_loss="l2", retain_coef=10.0, forget_coef=10.0, orth_coef=0.0),
    "sequential": dict(layers=(22, 18, 14, 10), lr=1e-2, retain_loss="l2", retain_coef=5.0, forget_coef=10.0),
}


def objective_preset(base: Any, values: Mapping[str, Any]) -> Any:
    """The preset `base` with the chosen objective's own settings over it (OBJECTIVE_SETTINGS), when
    `values` (a config file's and the command line's options) or `base` names an objective other than
    lens; `base` itself for the lens objective. Explicit values still override the result."""
    objective = values.get("objective", getattr(base, "objective", "lens"))
    if objective == "lens" or objective not in OBJECTIVE_SETTINGS:
        return base
    return dataclasses.replace(base, objective=objective, **OBJECTIVE_SETTINGS[objective])


def uses_layers(objective: str) -> bool:
    """Whether --layers means something to the objective (the next-token objectives read the output)."""
    return objective not in OUTPUT_OBJECTIVES


def needs_original(cfg: Any) -> bool:
    """Whether the run compares with the original model (in full-parameter mode: keeps a frozen copy)."""
    return cfg.objective in NEEDS_ORIGINAL or cfg.retain_loss != "nll"


def check_objective(cfg: Any) -> None:
    """Refuse, in one line each, settings the chosen objective cannot use (UnlearnConfig calls this)."""
    objective = cfg.objective
    require_positive(beta=cfg.beta)
    require_nonnegative(steering_coef=cfg.steering_coef, orth_coef=cfg.orth_coef)
    allowed = RETAIN_CHOICES[objective]
    if cfg.retain_loss not in allowed:
        raise ConfigError(f"--retain_loss {cfg.retain_loss} does not apply to --objective {objective}: use "
                          f"{' or '.join(allowed)}")
    if cfg.forget_target != "uniform" and objective not in TARGETED:
        raise ConfigError(f"--forget_target {cfg.forget_target} sets the lens and sequential objectives' "
                          f"cross-entropy target, and --objective {objective} has none: drop it")
    if cfg.orth_coef and objective != "rr":
        raise ConfigError(f"--orth_coef weights a term of --objective rr, not of {objective}: drop it")
    if cfg.orth_coef and cfg.per_device_batch < 2:
        raise ConfigError(f"--orth_coef compares the forget sequences of one micro-batch, and --per_device_batch "
                          f"{cfg.per_device_batch} holds one: pass --per_device_batch 2 or more, or --orth_coef 0")
    if cfg.layers is not None:
        if not uses_layers(objective):
            raise ConfigError(f"--objective {objective} trains on next-token loss at the model's output and reads "
                              f"no layer: drop --layers")
        if objective == "rmu" and len(cfg.layers) != 1:
            raise ConfigError(f"--objective rmu steers one layer, got --layers {','.join(map(str, cfg.layers))}: "
                              f"pass one, e.g. --layers 8")
        if objective in ("rmu", "sequential") and min(cfg.layers) < 1:
            raise ConfigError(f"--objective {objective} trains the blocks below each target layer, and layer 0 (the "
                              f"embedding output) has none: choose layers >= 1")
    if objective != "sequential":
        return
    if cfg.robust_step:
        raise ConfigError("--objective sequential trains one block per phase, which the robust step (--cir, "
                          "--disruption_mask, --normalise_grad, --adversary_steps) cannot follow: drop those "
                          "options or choose another objective")
    steps = max(1, math.ceil(cfg.examples * cfg.epochs / cfg.batch))
    if cfg.layers is not None and steps < len(cfg.layers):
        raise ConfigError(f"--objective sequential gives each of its {len(cfg.layers)} layers a phase of the run's "
                          f"{steps} steps: pass more --examples or fewer --layers")
