"""A run's saved settings (`run_config.json`): read and checked in one place for every command that
fills the options left out from the run it is given (`tamper --run`, `robustness`, `distill --run`).

A hand-edited or damaged file is refused with one line naming the file and the key, before any model
loads, rather than failing deep inside a command on a list where a mapping was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError, read_json
from .paths import RUN_CONFIG_FILE

# The keys other commands read from a run's saved config, and the JSON types each may hold (null aside).
SAVED_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "forget": (str,), "eval_tasks": (str, list), "tasks": (str, list), "eval_format": (str,),
    "eval_limit": (int,), "lm_eval_include": (str,)}
_TYPE_WORDS = {str: "a string", list: "a list", int: "an integer"}


def read_run_config(run: str | Path) -> dict[str, Any]:
    """The settings `run` saved, checked: a JSON mapping whose keys in `SAVED_TYPES` have those types;
    {} when the folder holds no run_config.json."""
    path = Path(run).expanduser() / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise InputError(f"{path} holds a JSON {_json_name(saved)}, not a mapping of settings: re-create the run, "
                         f"or restore the file `lensunlearn unlearn` wrote")
    for key, kinds in SAVED_TYPES.items():
        value = saved.get(key)
        if value is None:
            continue
        if not isinstance(value, kinds) or isinstance(value, bool) or (
                isinstance(value, list) and not all(isinstance(item, str) for item in value)):
            wanted = " or ".join(_TYPE_WORDS[kind] for kind in kinds) + (" of task names" if list in kinds else "")
            raise InputError(f"{path}: {key} is {value!r}, not {wanted}: fix the file or re-create the run")
    return saved


def run_tasks(saved: Mapping[str, Any]) -> list[str]:
    """The evaluation tasks a run saved (a comma-separated string or a list), as names."""
    tasks = saved.get("eval_tasks") or saved.get("tasks") or ""
    return [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]


def fill(given: Any, saved: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """An option filled from a run: `given` when the command line set it (None: left out), else the
    run's saved value, else `default`."""
    if given is not None:
        return given
    value = saved.get(key)
    return default if value is None or value == "" else value


def _json_name(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "value")
