"""Checks that run before any model is loaded or trained, so a bad option costs seconds, not a run.

Option values (`require_positive`, `require_nonnegative`) are checked by the configs themselves;
evaluation tasks are resolved and loaded (`check_tasks`); a resumed run's settings are compared
with the ones it was started with (`check_resumed_config`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .config import ConfigError, to_jsonable

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


def check_tasks(tasks: str | Sequence[str], flag: str = "--eval_tasks", loader=None,
                lm_eval_include: str | None = None) -> list:
    """Resolve task names and load their questions once, so an unknown name, an unreadable file or a
    hub dataset that cannot be reached (offline) fails now rather than after training.

    `lm_eval:<task>` names are checked against lm-eval's registry (and `lm_eval_include`) only: lm-eval
    loads their data when it runs them. The native tasks' specs are returned."""
    from .lm_eval_tasks import check_names, split_names
    from .tasks import load_items, resolve_tasks

    try:
        native, theirs = split_names(tasks)
        check_names(theirs, lm_eval_include)
        specs = resolve_tasks(native) if native or not theirs else []
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{flag}: {err}") from err
    for spec in specs:
        try:
            load_items(spec, loader)
        except (ConnectionError, TimeoutError) as err:
            raise FileNotFoundError(
                f"{flag}: task {spec.name} needs the hub dataset {spec.dataset_path} ({spec.dataset_name}), which "
                f"cannot be loaded ({err}): go online once so it is cached, or use tasks that need no download "
                f"(facts:<domain>, a .jsonl file)") from err
        except FileNotFoundError as err:  # datasets' DatasetNotFoundError is one
            raise FileNotFoundError(f"{flag}: task {spec.name} cannot be loaded: {err}") from err
    return specs


def check_resumed_config(saved: dict[str, Any], cfg: Any, ignored: Iterable[str], where: str) -> None:
    """Refuse to resume a run with settings other than the ones it was started with.

    `saved` is the run's saved config; fields in `ignored` may change on resume (they do not change
    the result, e.g. the device or how often checkpoints are written). Fields the saved config
    lacks (written by an older version) are not compared.
    """
    now = to_jsonable(cfg)
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
