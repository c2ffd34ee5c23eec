"""The fact benchmark: real facts from data packages, deterministic questions and corpora."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lensunlearn.data import facts
from lensunlearn.data.corpora import load_texts
from lensunlearn.data.tasks import load_items, resolve_tasks


@pytest.mark.parametrize("domain", facts.DOMAINS)
def test_questions_are_well_formed(domain):
    items = facts.questions(domain)
    assert len(items) >= 40
    ids = [q["fact_id"] for q in items]
    assert len(set(ids)) == len(ids)
    for q in items:
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        assert 0 <= q["answer"] < 4 and q["prompt"] and q["question"].endswith("?")
    answers = [q["answer"] for q in items]
    assert len(set(answers)) == 4  # the gold position varies


def test_known_facts_are_right():
    by_id = {q["fact_id"]: q for d in facts.DOMAINS for q in facts.questions(d)}
    france = by_id["country_capital:FR"]
    assert france["prompt"] == "The capital of France is" and france["choices"][france["answer"]] == "Paris"
    oxygen = by_id["element_symbol:008"]
    assert oxygen["prompt"] == "The chemical symbol for oxygen is" and oxygen["choices"][oxygen["answer"]] == "O"
    texas = by_id["us_state_capital:TX"]
    assert texas["choices"][texas["answer"]] == "Austin"
    assert len(facts.questions("country_capital")) >= 150


def test_output_does_not_depend_on_the_hash_seed():
    code = ("import json; from lensunlearn.data import facts; "
            "print(json.dumps([facts.questions(d) for d in facts.DOMAINS] "
            "+ [facts.split_facts('country_capital', 0.2, 1)]))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("domain", facts.DOMAINS)
def test_corpus_states_each_fact_several_ways(domain):
    texts = facts.corpus_texts(domain)
    assert 200 <= len(texts) <= 1000 and len(set(texts)) == len(texts)
    first = facts.facts(domain)[0]
    mentioning = [t for t in texts if first.subject in t and first.answer in t]
    assert len(mentioning) >= 4
    assert load_texts(f"facts:{domain}") == texts


def test_split_facts_is_a_deterministic_partition():
    attacked, held = facts.split_facts("element_symbol", 0.25, seed=3)
    assert set(attacked).isdisjoint(held)
    assert sorted(attacked + held) == sorted(f.fact_id for f in facts.facts("element_symbol"))
    assert len(held) == round(0.25 * len(facts.facts("element_symbol")))
    assert facts.split_facts("element_symbol", 0.25, seed=3) == (attacked, held)
    assert facts.split_facts("element_symbol", 0.25, seed=4) != (attacked, held)
    with pytest.raises(ValueError, match="holdout"):
        facts.split_facts("element_symbol", 1.5)


def test_questions_round_trip_through_a_jsonl_task(tmp_path):
    path = facts.write_questions("us_state_capital", tmp_path / "states.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == facts.questions("us_state_capital")
    spec, = resolve_tasks(str(path))
    assert spec.name == "states" and load_items(spec) == rows
    assert load_items(resolve_tasks("facts:us_state_capital")[0]) == rows


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="unknown fact domain"):
        facts.questions("rivers")
    with pytest.raises(ValueError, match="unknown fact domain"):
        facts.corpus_texts("rivers")
