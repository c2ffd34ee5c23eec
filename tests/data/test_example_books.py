"""The book -> author relation under examples/: a fact relation the package does not ship, written as a
user's own data, on which the split-relation settings are checked (docs/results.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

from lensunlearn.core.errors import InputError
from lensunlearn.data.splits import check_retain_sources, fact_rows
from lensunlearn.data.tasks import load_items, resolve_tasks

HERE = Path(__file__).resolve().parents[2] / "examples" / "book_authors"


def _make():
    spec = importlib.util.spec_from_file_location("book_authors_make", HERE / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_files_are_what_make_writes():
    # The shipped files must not drift from the script that documents how they were made.
    text, questions = _make().rows()
    assert _lines(HERE / "text.jsonl") == text
    assert _lines(HERE / "questions.jsonl") == questions


def test_every_answer_belongs_to_one_fact_and_every_question_has_its_answer_among_four():
    make = _make()
    questions = _lines(HERE / "questions.jsonl")
    answers = [q["choices"][q["answer"]] for q in questions]
    assert len(set(answers)) == len(answers) == len(make.BOOKS)
    for q in questions:
        assert len(set(q["choices"])) == 4 and q["prompt"].startswith("The book ")


def test_text_and_questions_split_into_the_same_disjoint_parts():
    text_src, task_src = str(HERE / "text.jsonl"), str(HERE / "questions.jsonl")
    parts = {}
    for part in ("forget", "retain", "kept"):
        text_ids = {r["fact_id"] for r in fact_rows(f"{text_src}@{part}")}
        task_ids = {q["fact_id"] for q in load_items(resolve_tasks(f"{task_src}@{part}")[0])}
        assert text_ids == task_ids and text_ids
        parts[part] = text_ids
    assert not (parts["forget"] & parts["retain"]) and not (parts["forget"] & parts["kept"])
    assert not (parts["retain"] & parts["kept"])
    assert len(parts["forget"]) + len(parts["retain"]) + len(parts["kept"]) == len(_make().BOOKS)
    # what --preset robust derives for this forget part is accepted: the retain part states no forget fact
    check_retain_sources(f"{text_src}@forget", ["generic:retain", f"{text_src}@retain"])
    with pytest.raises(InputError, match="states 42 fact"):  # while the whole relation, forget part included, is not
        check_retain_sources(f"{text_src}@forget", ["generic:retain", text_src])
