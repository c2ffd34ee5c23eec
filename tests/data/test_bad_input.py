"""Errors about input files name the file and the line: invalid JSON, non-UTF-8 text, a text column
holding numbers or null, bad question rows; the column hint names the flag the command really has."""

from __future__ import annotations

import json

import pytest

from lensunlearn.data.corpora import load_texts
from lensunlearn.data.tasks import TaskSpec, load_items

GOOD = {"question": "the capital of france is", "choices": ["paris", "rome", "berlin", "madrid"], "answer": 0}


def _jsonl(path, rows) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_invalid_json_names_file_and_line(tmp_path):
    corpus = _jsonl(tmp_path / "notes.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c"'])
    with pytest.raises(ValueError, match=r"notes.jsonl line 3: invalid JSON \("):
        load_texts(corpus)
    tasks = _jsonl(tmp_path / "tasks.jsonl", [GOOD] * 6 + ["{oops"])
    with pytest.raises(ValueError, match=r"tasks.jsonl line 7: invalid JSON \("):
        load_items(TaskSpec("tasks", "json", data_files=tasks))
    (tmp_path / "whole.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ValueError, match=r"whole.json line 2: invalid JSON"):
        load_texts(str(tmp_path / "whole.json"))


def test_non_utf8_files_are_named(tmp_path):
    (tmp_path / "notes.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"notes.txt is not UTF-8 text"):
        load_texts(str(tmp_path / "notes.txt"))
    (tmp_path / "tasks.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"tasks.jsonl is not UTF-8 text"):
        load_items(TaskSpec("tasks", "json", data_files=str(tmp_path / "tasks.jsonl")))


@pytest.mark.parametrize("value,shown", [(12345, "int 12345"), (None, "null"), (["a"], "list")])
def test_text_column_must_hold_text(tmp_path, value, shown):
    corpus = _jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"text": "also fine"}, {"text": value}])
    with pytest.raises(ValueError, match=rf"c.jsonl line 3: 'text' holds {shown}.*, not text"):
        load_texts(corpus)
    page = _jsonl(tmp_path / "p.jsonl", [{"page": "fine"}, {"page": value}])
    with pytest.raises(ValueError, match=rf"p.jsonl line 2: 'page' holds {shown}.*--retain_column"):
        load_texts(page, column="page", column_flag="--retain_column")


def test_row_without_the_column_names_its_line(tmp_path):
    corpus = _jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"c.jsonl line 2 has no 'text' field"):
        load_texts(corpus)


def test_missing_column_hint_names_the_callers_flag(tmp_path):
    from lensunlearn.unlearning.run import load_corpus

    corpus = _jsonl(tmp_path / "c.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"pass the column to read with --retain_column$"):
        load_corpus(corpus, None, "train", None, 10, None, "retain")
    with pytest.raises(ValueError, match=r"no column 'page'.*pass --forget_column NAME$"):
        load_corpus(corpus, None, "train", "page", 10, None, "forget")


@pytest.mark.parametrize("bad,message", [
    ({k: v for k, v in GOOD.items() if k != "answer"}, r"line 3 lacks fields"),
    ({**GOOD, "answer": 4}, r"line 3 has answer 4, out of range"),
    ({**GOOD, "choices": ["a", "b"]}, r"line 3 has 2 choices"),
    ({**GOOD, "question": None}, r"line 3 has question None"),
])
def test_bad_question_rows_name_file_and_line(tmp_path, bad, message):
    tasks = _jsonl(tmp_path / "tasks.jsonl", [GOOD, "", bad])  # line 2 is blank
    with pytest.raises(ValueError, match=rf"tasks.jsonl {message}"):
        load_items(TaskSpec("tasks", "json", data_files=tasks))
