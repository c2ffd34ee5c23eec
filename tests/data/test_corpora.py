"""Corpora from every supported source, text-column rules, truncation and padding."""

from __future__ import annotations

import json

import pytest

from lensunlearn.data.corpora import (
    batch_indices,
    chunk_documents,
    collate,
    length_groups,
    load_texts,
    tokenize,
)

from ..conftest import tiny_tokenizer

ROWS = [{"title": "T1", "abstract": "A1", "text": "B1"}, {"title": "T2", "abstract": "A2", "text": "B2"}]


def test_local_formats_agree(tmp_path):
    import datasets

    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "c.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    expected = ["T1\n\nA1\n\nB1", "T2\n\nA2\n\nB2"]
    for name in ("c.jsonl", "c.json", "c.parquet", "saved"):
        assert load_texts(str(tmp_path / name)) == expected, name
    assert load_texts(str(tmp_path / "c.jsonl"), column="abstract") == ["A1", "A2"]
    (tmp_path / "c.txt").write_text("first doc\n\nsecond doc\n")
    assert load_texts(str(tmp_path / "c.txt")) == ["first doc", "second doc"]


def test_limit_and_shuffle_are_deterministic(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(20)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_texts(str(tmp_path / "c.jsonl"), limit=3) == ["doc 0", "doc 1", "doc 2"]
    a = load_texts(str(tmp_path / "c.jsonl"), limit=5, shuffle_seed=42)
    assert a == load_texts(str(tmp_path / "c.jsonl"), limit=5, shuffle_seed=42) and a != [f"doc {i}" for i in range(5)]


def test_clear_errors(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'text' column.*\['body'\].*--column"):
        load_texts(str(tmp_path / "c.jsonl"))
    with pytest.raises(ValueError, match="no column 'page'"):
        load_texts(str(tmp_path / "c.jsonl"), column="page")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="is empty"):
        load_texts(str(tmp_path / "blank.jsonl"), what="forget corpus")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: invalid JSON"):
        load_texts(str(tmp_path / "bad.jsonl"))


def test_truncation_and_padding_to_longest():
    tokenizer = tiny_tokenizer()
    docs = tokenize(["the capital of france is paris", "gold", "the the the the the the the the"], tokenizer, 5)
    assert [len(d) for d in docs] == [5, 1, 5]
    batch = collate(docs[:2], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert collate([docs[1]], 0)["input_ids"].shape == (1, 1)
    chunks = chunk_documents(["the capital of france is paris ."], tokenizer, 3)
    assert [len(c) for c in chunks] == [3, 3]  # the 1-token tail has no next token to predict


def test_batch_indices_cover_each_epoch_once():
    seen = [i for step in range(5) for i in batch_indices(10, 2, step, seed=1)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 2, 3, seed=1) == batch_indices(10, 2, 3, seed=1)
    assert len(batch_indices(3, 4, 0, seed=0)) == 4


def test_facts_corpus_by_name():
    texts = load_texts("facts:country_capital")
    assert len(texts) > 100 and any("Paris" in t for t in texts)
    assert len(load_texts("facts:all")) > len(texts)


def _padded_cost(lengths, groups, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


@pytest.mark.parametrize("lengths", [[15, 128, 14, 16, 96, 15, 13, 17], [5, 5, 5, 5], [40], [3, 90, 4, 88, 5, 91]])
def test_length_groups_cover_every_index_once_and_pad_least(lengths):
    overhead = 16
    groups = length_groups(lengths, overhead=overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == length_groups(list(lengths), overhead=overhead)  # deterministic
    # no split of the indices into groups does better: brute force over every set partition of small inputs
    best = min(_padded_cost(lengths, p, overhead) for p in _partitions(list(range(len(lengths)))))
    assert _padded_cost(lengths, groups, overhead) == best


def test_length_groups_split_short_sentences_from_long_prose():
    lengths = [15, 128, 14, 16, 120, 15, 13, 17]
    groups = length_groups(lengths)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[13, 14, 15, 15, 16, 17], [120, 128]]
    assert _padded_cost(lengths, groups, 0) < len(lengths) * 128 / 2  # under half of one padded batch
    assert length_groups([7, 7, 7]) == [[0, 1, 2]]  # equal lengths: one batch
    assert length_groups([]) == []


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        for k in range(len(partition)):
            yield partition[:k] + [[first, *partition[k]]] + partition[k + 1:]
        yield [[first], *partition]
