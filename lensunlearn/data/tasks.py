"""Evaluation tasks as data: where the questions come from and how they are prompted.

A task is a dataset (hub id, config, split, or a local jsonl file, or the fact benchmark) plus a
description; a group is a list of tasks aggregated by size. Prompts, descriptions, the target
delimiter and the choice strings are lm-evaluation-harness's:

* letter: `{description}{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:` with
  continuations " A" .. " D" (lm-eval's `mmlu`, `wmdp_bio`);
* cloze: the continuation is " " + the answer text; the context is the item's `prompt` when it
  has one, else `{description}Question: {question.strip()}\\nAnswer:` (lm-eval's
  `mmlu_continuation`, whose description says "questions" instead of "multiple choice questions").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..core.errors import InputError, read_text

log = logging.getLogger(__name__)

Format = Literal["letter", "cloze"]
FORMATS = ("letter", "cloze")
NUM_CHOICES = 4
LETTERS = ("A", "B", "C", "D")
TARGET_DELIMITER = " "
FACTS_PREFIX = "facts:"
REFERENCE_EVAL_TASKS = "wmdp_bio_robust,mmlu_stem"  # what the reference experiment reports

WMDP_BIO_ROBUST_CATEGORIES = (
    "bioweapons_and_bioterrorism",
    "dual_use_virology",
    "enhanced_potential_pandemic_pathogens",
    "expanding_access_to_threat_vectors",
    "reverse_genetics_and_easy_editing",
    "viral_vector_research",
)
MMLU_STEM = (
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
    "high_school_physics", "high_school_statistics", "machine_learning",
)
MMLU_SUBJECTS = tuple(sorted(MMLU_STEM + (
    "business_ethics", "clinical_knowledge", "college_medicine", "econometrics", "formal_logic",
    "global_facts", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_microeconomics",
    "high_school_psychology", "high_school_us_history", "high_school_world_history", "human_aging",
    "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)))


@dataclass(frozen=True)
class TaskSpec:
    """One task: its data source and its topic (used in the description)."""

    name: str
    dataset_path: str  # hub id, "json" for a local file, or "facts"
    dataset_name: str | None = None  # hub config, or the fact domain
    split: str = "test"
    topic: str | None = None  # "biology" -> "The following are ... about biology.\n\n"
    data_files: str | None = None
    group: str | None = None
    source: str | None = None  # the name as given, when it names a part of a split by fact (`splits`)

    def description(self, fmt: Format) -> str:
        if self.topic is None:
            return ""
        kind = "multiple choice questions" if fmt == "letter" else "questions"
        return f"The following are {kind} (with answers) about {self.topic}.\n\n"


def _wmdp_robust(category: str) -> TaskSpec:
    return TaskSpec(f"wmdp_bio_robust_{category}", "EleutherAI/wmdp_bio_robust_mcqa", category, "robust",
                    topic="biology", group="wmdp_bio_robust")


def _mmlu(subject: str, group: str) -> TaskSpec:
    return TaskSpec(f"mmlu_{subject}", "cais/mmlu", subject, "test", topic=subject.replace("_", " "), group=group)


HUB_TASKS: dict[str, TaskSpec] = {
    "wmdp_bio": TaskSpec("wmdp_bio", "cais/wmdp", "wmdp-bio", "test", topic="biology"),
    **{spec.name: spec for spec in map(_wmdp_robust, WMDP_BIO_ROBUST_CATEGORIES)},
    **{spec.name: spec for spec in (_mmlu(s, "mmlu") for s in MMLU_SUBJECTS)},
}
GROUPS: dict[str, tuple[str, ...]] = {
    "wmdp_bio_robust": tuple(f"wmdp_bio_robust_{c}" for c in WMDP_BIO_ROBUST_CATEGORIES),
    "mmlu": tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS),
    "mmlu_stem": tuple(f"mmlu_{s}" for s in MMLU_STEM),
}


def known_task_names() -> list[str]:
    return sorted(GROUPS) + ["wmdp_bio", "mmlu_<subject>", "facts:<domain>", "facts:<domain>@forget|retain|kept",
                             "<path>.jsonl", "<path>.jsonl@<part>", "lm_eval:<task>"]


def resolve_tasks(names: str | Sequence[str]) -> list[TaskSpec]:
    """Task specs for a comma-separated list (or a sequence) of names, groups and jsonl paths."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no tasks given: pass --eval_tasks, e.g. --eval_tasks wmdp_bio_robust,mmlu or "
                         "--eval_tasks facts:country_capital")
    specs: list[TaskSpec] = []
    for name in names:
        split = _split_spec(name)
        if split is not None:
            specs.append(split)
        elif name in GROUPS:
            specs.extend(TaskSpec(**{**HUB_TASKS[t].__dict__, "group": name}) for t in GROUPS[name])
        elif name in HUB_TASKS:
            specs.append(TaskSpec(**{**HUB_TASKS[name].__dict__, "group": None}))
        elif name.startswith(FACTS_PREFIX):
            from .facts import DOMAINS

            domain = name[len(FACTS_PREFIX):]
            if domain not in DOMAINS:
                raise ValueError(f"unknown fact domain {domain!r} in task {name!r}: use one of "
                                 f"{', '.join(FACTS_PREFIX + d for d in DOMAINS)}")
            specs.append(TaskSpec(name, "facts", domain))
        elif name.startswith("lm_eval:"):  # evaluate() hands these to lm-eval; other commands cannot
            raise ValueError(f"task {name!r} is run by lm-eval, which only evaluation supports (eval, unlearn's "
                             f"--eval_tasks): use a native task here")
        elif name.endswith(".jsonl") or Path(name).expanduser().is_file():
            path = Path(name).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"task file {name} does not exist: pass an existing .jsonl of "
                                        f'{{"question", "choices", "answer"}} rows')
            specs.append(TaskSpec(path.stem, "json", None, "train", data_files=str(path)))
        elif name.lower() == "none":  # the spelling other tools use for "no evaluation"
            raise ValueError(f"{name!r} is not a task: write an empty list ('') where a command may evaluate nothing")
        else:
            raise ValueError(f"unknown task {name!r}: use one of {', '.join(known_task_names())}")
    seen: set[str] = set()
    duplicates = [s.name for s in specs if s.name in seen or seen.add(s.name)]
    if duplicates:
        raise ValueError(f"task(s) {sorted(set(duplicates))} given twice (a group already includes its subtasks, and "
                         f"two files with the same stem clash): list each once")
    return specs


def _split_spec(name: str) -> TaskSpec | None:
    """The spec of a task that names a part of a fact source (`facts:<domain>@kept`, `notes.jsonl@forget`), or
    None for any other name."""
    from .splits import has_options, parse_source

    if not has_options(name):
        return None
    spec = parse_source(name)
    if spec.domain is not None:
        from .facts import DOMAINS

        if spec.domain not in DOMAINS:
            raise ValueError(f"unknown fact domain {spec.domain!r} in task {name!r}: use one of "
                             f"{', '.join(FACTS_PREFIX + d for d in DOMAINS)}")
        return TaskSpec(spec.task_name(), "facts", spec.domain, source=name)
    path = Path(spec.base).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task file {spec.base} (in {name}) does not exist: pass an existing .jsonl of "
                                f'{{"question", "choices", "answer", "fact_id"}} rows')
    return TaskSpec(spec.task_name(), "json", None, "train", data_files=str(path), source=name)


DatasetLoader = Callable[..., Any]


def load_items(spec: TaskSpec, loader: DatasetLoader | None = None) -> list[dict]:
    """The task's rows as {"question", "choices", "answer"[, "prompt", "fact_id", "subject"]}, validated (only
    those of its part, when it names a part of a split by fact).

    `loader` defaults to `datasets.load_dataset` and is called as lm-eval calls it
    (`loader(path, name, split=..., data_files=...)`), so tests can serve local copies.
    """
    if spec.dataset_path == "facts":
        from .facts import questions

        rows = questions(spec.dataset_name)
    elif spec.dataset_path == "json":
        located = _read_jsonl(Path(spec.data_files))
        return _part(validate_items([row for _, row in located], spec.name, [where for where, _ in located]), spec)
    else:
        if loader is None:
            import datasets

            loader = datasets.load_dataset
        rows = list(loader(spec.dataset_path, spec.dataset_name, split=spec.split))
    return _part(validate_items(rows, spec.name), spec)


def _part(items: list[dict], spec: TaskSpec) -> list[dict]:
    """The questions of the part the task names (all of them when it names none)."""
    if spec.source is None:
        return items
    from .splits import filter_items, parse_source

    return filter_items(items, parse_source(spec.source), spec.name)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(where, row) of every non-blank line, where is "tasks.jsonl line 7"."""
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {number}: invalid JSON ({err.msg}, column {err.colno}): each line must be "
                            f'one {{"question", "choices", "answer"}} object') from err
    return rows


def validate_items(rows: Sequence[dict], task: str, locations: Sequence[str] | None = None) -> list[dict]:
    """Refuse empty tasks, missing fields, a wrong number of choices and answers out of range.

    `locations` names where each row came from (file and line), for the errors; else "task T, question i".
    """
    if not rows:
        raise ValueError(f"task {task} is empty: it holds no questions; fill the file or pick another task")
    items = []
    for index, row in enumerate(rows):
        where = locations[index] if locations is not None else f"task {task}, question {index}"
        if not isinstance(row, dict) or any(k not in row for k in ("question", "choices", "answer")):
            raise ValueError(f'{where} lacks fields: each row needs "question", "choices" and "answer" '
                             f"(got {sorted(row) if isinstance(row, dict) else type(row).__name__})")
        question = row["question"]
        if not isinstance(question, str) or not (question.strip() or row.get("prompt")):
            raise ValueError(f"{where} has question {question!r}: the question must be non-empty text (it may be "
                             f"empty only when the row has a prompt)")
        choices = row["choices"]
        if not isinstance(choices, (list, tuple)) or len(choices) != NUM_CHOICES:
            count = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
            raise ValueError(f"{where} has {count} choices, but every question needs exactly {NUM_CHOICES} "
                             f"(A/B/C/D): fix the row or drop it")
        if any(not isinstance(c, str) or not c for c in choices):
            raise ValueError(f"{where} has an empty or non-text choice {list(choices)!r}: choices must be non-empty "
                             f"strings")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < NUM_CHOICES:
            raise ValueError(f"{where} has answer {answer!r}, out of range: the answer is the index "
                             f"0..{NUM_CHOICES - 1} of the correct choice")
        item = {"question": str(row["question"]), "choices": [str(c) for c in choices], "answer": int(answer)}
        for key in ("prompt", "fact_id", "subject"):
            if row.get(key):  # a missing, null or empty prompt means: build it from the question
                item[key] = str(row[key])
        items.append(item)
    return items


def build_request(item: dict, fmt: Format, description: str = "") -> tuple[str, list[str], list[str]]:
    """(context, continuations, choice strings) for one question, as lm-eval builds them."""
    if fmt == "letter":
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item["choices"]))
        context = f"{description}{item['question'].strip()}{options}\nAnswer:"
        choices = list(LETTERS)
    elif fmt == "cloze":
        if "prompt" in item:
            context = item["prompt"]
        else:
            context = f"{description}Question: {item['question'].strip()}\nAnswer:"
        choices = list(item["choices"])
    else:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return context, [TARGET_DELIMITER + c for c in choices], choices


def check_tasks(tasks: str | Sequence[str], flag: str = "--eval_tasks", loader=None,
                lm_eval_include: str | None = None) -> list:
    """Resolve task names and load their questions once, so an unknown name, an unreadable file or a
    hub dataset that cannot be reached (offline) fails now rather than after training.

    `lm_eval:<task>` names are checked against lm-eval's registry (and `lm_eval_include`), and their data
    loaded by lm-eval once (`lm_eval_tasks.check_data`). The native tasks' specs are returned."""
    from .lm_eval_tasks import check_data, check_names, split_names

    try:
        native, theirs = split_names(tasks)
        check_names(theirs, lm_eval_include)
        check_data(theirs, lm_eval_include)
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
