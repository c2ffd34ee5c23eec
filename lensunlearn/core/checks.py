"""Checks that run before any model is loaded or trained, so a bad option costs seconds, not a run.

Option values (`require_positive`, `require_nonnegative`) are checked by the configs themselves;
evaluation tasks are resolved and loaded by `data.tasks.check_tasks`; a resumed run's settings are compared
with the ones it was started with (`check_resumed_config`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

from .config import ConfigError, current_names, to_jsonable

log = logging.getLogger(__name__)


def require_positive(**values: float | None) -> None:
    """Each value (None skipped) must be a finite number > 0; `nan <= 0` is False, hence isfinite."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name} must be a finite number > 0, got {value}")


def require_nonnegative(**values: float | None) -> None:
    """Each value (None skipped) must be a finite number >= 0."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")


def check_resumed_config(saved: dict[str, Any], cfg: Any, ignored: Iterable[str], where: str) -> None:
    """Refuse to resume a run with settings other than the ones it was started with.

    `saved` is the run's saved config; fields in `ignored` may change on resume (they do not change
    the result, e.g. the device or how often checkpoints are written). Fields the saved config
    lacks (written by an older version) are not compared.
    """
    now, saved = to_jsonable(cfg), current_names(type(cfg), saved)
    skip = set(ignored)
    differ = [f.name for f in dataclasses.fields(cfg)
              if f.name not in skip and f.name in saved and _normal(saved[f.name]) != _normal(now[f.name])]
    if differ:
        changes = ", ".join(f"--{name} {_show(saved[name])} -> {_show(now[name])}" for name in differ)
        raise ConfigError(f"--resume: {where} was started with other settings ({changes}): resume with the "
                          f"saved values, or start over with --overwrite")


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)
