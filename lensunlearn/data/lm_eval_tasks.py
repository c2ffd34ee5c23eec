"""Tasks from lm-evaluation-harness's registry, run in-process on the model already loaded.

`lm_eval:<task>` in a task list names a task (or group) of lm-eval's registry, or one defined by a
YAML file in the folder given as `lm_eval_include`. lensunlearn scores its own tasks natively; every
other task is handed to lm-eval itself (`simple_evaluate` through its HF backend, `HFLM`, wrapping
the model object), so its numbers are lm-eval's by construction.

Results take the native shape, `results["lm_eval:<task>"] = {"n", metric: value, ...}`, with lm-eval's
metric names minus their filter suffix: lm-eval reports "acc,none" and "acc_stderr,none" for the
"none" filter, which become "acc" and "acc_stderr". A metric reported under several filters (e.g.
"exact_match,strict-match" and "exact_match,flexible-extract") keeps lm-eval's full keys, so that no
value hides another. A standard error lm-eval cannot compute ("N/A") becomes None.

lm-eval is an optional dependency, imported only when such a task is asked for.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "lm_eval:"
INSTALL_HINT = "pip install 'lensunlearn[lm_eval]'"


def is_lm_eval_task(name: str) -> bool:
    return name.startswith(PREFIX)


def split_names(names: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """(native names, lm-eval task names without the prefix), in the order given."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    native, theirs = [], []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if is_lm_eval_task(name):
            task = name[len(PREFIX):].strip()
            if not task:
                raise ValueError(f"task {name!r} names no lm-eval task: write lm_eval:<task>, e.g. lm_eval:arc_easy")
            theirs.append(task)
        else:
            native.append(name)
    return native, theirs


def import_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise UserError(f"lm_eval: tasks need lm-evaluation-harness, which is not installed ({err}): "
                        f"{INSTALL_HINT}") from err
    return lm_eval


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
    """lm-eval's TaskManager with its own tasks and those under `include_path`; built once per folder
    and process, because indexing lm-eval's thousands of YAML files takes seconds."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_names(tasks: Sequence[str], include_path: str | None = None) -> None:
    """Refuse task names lm-eval does not know, suggesting close matches (`tasks` without the prefix)."""
    if not tasks:
        return
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--lm_eval_include {include_path} is not a folder: pass the folder holding "
                                    f"your lm-eval task YAML files")
    known = task_manager(include_path).all_tasks
    known_set = set(known)
    for task in tasks:
        if task not in known_set:
            broken = malformed_yaml(include_path) if include_path is not None else None
            if broken is not None:  # lm-eval skips a file it cannot parse, and with it the tasks it defines
                path, problem = broken
                raise ValueError(f"unknown task {PREFIX}{task}: {path} in --lm_eval_include {include_path} is not "
                                 f"valid YAML ({problem}), so lm-eval skipped it and any task it defines: fix the file")
            close = difflib.get_close_matches(task, known, n=5)
            hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "no close match"
            where = (f" or in {include_path}" if include_path
                     else " (pass --lm_eval_include DIR for your own YAML tasks)")
            raise ValueError(f"unknown task {PREFIX}{task}: lm-eval has no such task{where}; {hint}")


def malformed_yaml(include_path: str | Path) -> tuple[Path, str] | None:
    """The first YAML file under `include_path` that does not parse, with the line and the problem; lm-eval's
    tags (`!function ...`) are accepted without being resolved."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for path in sorted(Path(include_path).glob("**/*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
        except UnicodeDecodeError as err:
            return path, f"not UTF-8 text, byte {err.start}"
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            return path, (f"line {mark.line + 1}: {problem}" if mark is not None else problem)
    return None


def check_data(tasks: Sequence[str], include_path: str | None = None) -> None:
    """Build lm-eval's task objects, which loads their data, so that a dataset that cannot be loaded (offline
    and not in the local cache, say) fails before any model is loaded or trained rather than in the evaluation
    after training (`tasks` without the prefix; their names checked by `check_names` first)."""
    manager = task_manager(include_path) if tasks else None
    for task in tasks:
        try:
            (manager.load if hasattr(manager, "load") else manager.load_task_or_group)([task])
        except (OSError, ValueError, ImportError) as err:
            offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on") or \
                os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            fix = ("go online once (without HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) so that its data is cached, or "
                   "drop the task") if offline else "check the task's dataset, or drop the task"
            raise FileNotFoundError(f"task {PREFIX}{task} cannot load its data ({' '.join(str(err).split())}): "
                                    f"{fix}") from err


def _metric_name(key: str, clashing: set[str]) -> str:
    metric = key.partition(",")[0]
    return key if metric in clashing else metric


def strip_filters(metrics: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's "metric,filter" keys as "metric" where that is unambiguous; "N/A" as None."""
    keyed = {k: v for k, v in metrics.items() if "," in k}
    seen: dict[str, int] = {}
    for key in keyed:
        metric = key.partition(",")[0]
        seen[metric] = seen.get(metric, 0) + 1
    clashing = {m for m, count in seen.items() if count > 1}
    return {_metric_name(k, clashing): (None if v == "N/A" else v) for k, v in keyed.items()}


def evaluate_lm_eval(model, tokenizer, tasks: Sequence[str], batch_size: int = 16, limit: int | None = None,
                     include_path: str | None = None, max_length: int | None = None) -> dict:
    """Run lm-eval's tasks on `model`; returns {"results": {...}, "groups": {...}} keyed "lm_eval:<name>".

    Global random seeds are left alone (lm-eval would reseed Python, NumPy and torch), so evaluating
    in the middle of training does not change the rest of the run.
    """
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    check_names(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=None, limit=limit,
                                  task_manager=task_manager(include_path), log_samples=False,
                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    return convert_results(out)


def convert_results(out: dict) -> dict:
    """lm-eval's `simple_evaluate` output in the native shape (tasks in "results", groups in "groups")."""
    group_names = set(out.get("groups", {}))
    samples = out.get("n-samples", {})
    subtasks = out.get("group_subtasks", {})
    results: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    for name, metrics in out.get("results", {}).items():
        row: dict[str, Any] = {"n": samples.get(name, {}).get("effective")}
        if name in group_names:
            row["n"] = sum(samples.get(t, {}).get("effective", 0) for t in subtasks.get(name, ()))
            row["tasks"] = [PREFIX + t for t in subtasks.get(name, ())]
            groups[PREFIX + name] = {**row, **strip_filters(metrics)}
        else:
            results[PREFIX + name] = {**row, **strip_filters(metrics)}
    for name, metrics in out.get("groups", {}).items():  # a group lm-eval lists only under "groups"
        if PREFIX + name not in groups:
            groups[PREFIX + name] = {"n": sum(samples.get(t, {}).get("effective", 0) for t in subtasks.get(name, ())),
                                     "tasks": [PREFIX + t for t in subtasks.get(name, ())], **strip_filters(metrics)}
    return {"results": results, "groups": groups}
