"""Fact splits within a relation (`facts:<domain>@forget`), the checks that keep parts apart, diverse
phrasings and the weighted mix of retain sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from lensunlearn.data import facts, splits
from lensunlearn.data.corpora import load_texts, weighted_order
from lensunlearn.data.tasks import check_tasks, load_items, resolve_tasks
from lensunlearn.report.tamper_results import task_display

from ..conftest import write_jsonl

CC = "facts:country_capital"


def _ids(domain: str) -> list[str]:
    return [f.fact_id for f in facts.facts(domain)]


@pytest.mark.parametrize("domain", facts.DOMAINS)
def test_parts_are_disjoint_cover_the_relation_and_take_their_shares(domain):
    ids = _ids(domain)
    parts = splits.split_ids(ids)
    chosen = [set(parts[p]) for p in splits.PARTS]
    assert all(a.isdisjoint(b) for i, a in enumerate(chosen) for b in chosen[i + 1:])
    assert set().union(*chosen) == set(ids)
    n = len(ids)
    assert len(parts["forget"]) == int(0.5 * n + 0.5) and abs(len(parts["retain"]) - n / 4) <= 1
    assert abs(len(parts["kept"]) - n / 4) <= 1
    # a pure function of the ids and the seed: their order and repeats do not matter, another seed moves them
    assert splits.split_ids(list(reversed(ids)) + ids[:3]) == parts
    assert splits.split_ids(ids, seed=1) != parts
    other = splits.split_ids(ids, (60, 20, 20))
    assert len(other["forget"]) == int(0.6 * n + 0.5)


def test_a_part_is_the_same_in_every_loader_and_every_command():
    part = set(splits.split_ids(_ids("country_capital"))["forget"])
    rows = splits.fact_rows(f"{CC}@forget")
    assert {r["fact_id"] for r in rows} == part and len(rows) == 5 * len(part)
    assert load_texts(f"{CC}@forget") == [r["text"] for r in rows]
    spec, = resolve_tasks(f"{CC}@forget")
    assert spec.name == f"{CC}@forget" and {i["fact_id"] for i in load_items(spec)} == part
    from lensunlearn.attack.protocol import corpus_rows
    from lensunlearn.attack.tamper import fact_records

    assert corpus_rows(f"{CC}@forget") == [{"fact_id": r["fact_id"], "text": r["text"]} for r in rows]
    assert fact_records(f"{CC}@forget") == corpus_rows(f"{CC}@forget")
    kept = {i["fact_id"] for i in load_items(resolve_tasks(f"{CC}@kept")[0])}
    retain = {r["fact_id"] for r in splits.fact_rows(f"{CC}@retain")}
    assert kept.isdisjoint(part) and retain.isdisjoint(part) and kept.isdisjoint(retain)
    assert len(part | kept | retain) == len(_ids("country_capital"))


def test_parts_do_not_depend_on_the_hash_seed():
    code = ("import json; from lensunlearn.data import splits; from lensunlearn.data.tasks import load_items, "
            "resolve_tasks; print(json.dumps([splits.fact_texts('facts:us_state_capital@kept?split_seed=3'), "
            "[i['fact_id'] for i in load_items(resolve_tasks('facts:country_currency@retain')[0])]]))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1] and json.loads(outs[0])[0]


def test_a_question_file_and_a_corpus_file_split_alike(tmp_path):
    write_jsonl(tmp_path / "mine.jsonl", [{"fact_id": f"m{i}", "text": f"fact {i} is {i}"} for i in range(20)])
    write_jsonl(tmp_path / "mine_q.jsonl", [{"fact_id": f"m{i}", "question": f"fact {i}?", "answer": 0,
                                             "choices": ["a", "b", "c", "d"], "subject": f"fact {i}"}
                                            for i in range(20)])
    forget = {r["fact_id"] for r in splits.fact_rows(f"{tmp_path / 'mine.jsonl'}@forget")}
    spec, = resolve_tasks(f"{tmp_path / 'mine_q.jsonl'}@forget")
    assert spec.name == "mine_q@forget" and task_display(f"{tmp_path / 'mine_q.jsonl'}@forget") == spec.name
    assert {i["fact_id"] for i in load_items(spec)} == forget and len(forget) == 10


@pytest.mark.parametrize("case", ["empty", "shares", "part", "option", "plain", "no_fact_id", "split_mismatch",
                                  "file_mismatch", "retain_id", "retain_subject", "kept_trained"])
def test_bad_splits_are_one_line_errors(case, tmp_path):
    few = write_jsonl(tmp_path / "few.jsonl", [{"fact_id": "a", "text": "a is 1"}, {"fact_id": "b", "text": "b 2"}])
    if case == "empty":  # two facts: one in forget, one in retain, none kept
        call, match = lambda: splits.fact_rows(f"{few}@kept"), "few.jsonl@kept is empty: none of its 2 facts"
    elif case == "shares":
        call, match = lambda: splits.parse_source(f"{CC}@forget?shares=60/30/30"), "add up to 120.*overlap"
    elif case == "part":
        call, match = lambda: splits.parse_source(f"{CC}@forgotten"), "unknown part @forgotten"
    elif case == "option":
        call, match = lambda: splits.parse_source(f"{CC}@forget?seed=1"), "unknown option 'seed'"
    elif case == "plain":
        call, match = lambda: load_texts("generic:retain@forget"), "need a fact source"
    elif case == "no_fact_id":
        path = write_jsonl(tmp_path / "plain.jsonl", [{"text": "x"}])
        call, match = lambda: splits.fact_rows(f"{path}@forget"), "line 1 has no fact_id"
    elif case == "split_mismatch":
        call, match = (lambda: splits.check_consistent_splits([("--forget", f"{CC}@forget"), (
            "--eval_tasks", f"{CC}@kept?split_seed=1")])), "split the facts they share differently.*overlap"
    elif case == "file_mismatch":  # the same relation in two files that hold different facts
        write_jsonl(tmp_path / "all.jsonl", [{"fact_id": f"m{i}", "text": f"{i}"} for i in range(20)])
        write_jsonl(tmp_path / "half.jsonl", [{"fact_id": f"m{i}", "text": f"{i}"} for i in range(10)])
        call, match = (lambda: splits.check_consistent_splits([("--forget", f"{tmp_path / 'all.jsonl'}@forget"), (
            "--retain", f"{tmp_path / 'half.jsonl'}@retain")])), "split the facts they share differently"
    elif case == "retain_id":
        call, match = (lambda: splits.check_retain_sources(f"{CC}@forget", [CC])), \
            r"--retain facts:country_capital states 80 fact\(s\) of --forget .*the same fact_id"
    elif case == "retain_subject":  # another file restating a forget fact under other ids
        fact = next(f for f in facts.facts("country_capital") if f.fact_id in splits.split_ids(
            _ids("country_capital"))["forget"])
        path = write_jsonl(tmp_path / "mine.jsonl", [{"fact_id": "x1", "subject": fact.subject,
                                                      "text": f"{fact.answer} lies in {fact.subject}."}])
        call, match = (lambda: splits.check_retain_sources(f"{CC}@forget", [str(path)])), \
            f"the same subject '{fact.subject}' with its answer"
    else:
        call, match = (lambda: splits.check_kept_untrained([f"{CC}@kept"], [f"{CC}@forget", CC])), \
            "is a kept part, but facts:country_capital trains on 40 of its facts"
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert len(str(info.value).splitlines()) == 1


def test_same_relation_parts_and_a_subjects_other_relations_may_be_retained(tmp_path):
    forget = f"{CC}@forget"
    assert splits.retain_conflicts(forget, f"{CC}@retain") == []
    assert splits.retain_conflicts(forget, "facts:country_language") == []  # France's language, not its capital
    assert splits.retain_conflicts(forget, "facts:us_state_capital@retain") == []  # Georgia the state
    assert splits.retain_conflicts(forget, "generic:retain") == []  # no facts to check
    splits.check_consistent_splits([("--forget", forget), ("--retain", f"{CC}@retain"),
                                    ("--eval_tasks", f"{CC}@kept"), ("--eval_tasks", "facts:element_symbol@kept")])
    splits.check_kept_untrained([f"{CC}@kept"], [forget, f"{CC}@retain", "generic:retain"])


def test_tasks_name_their_part_and_check_tasks_loads_it():
    specs = check_tasks(f"{CC}@kept,facts:us_state_capital@forget?phrasings=diverse", "--eval_tasks")
    assert [s.name for s in specs] == [f"{CC}@kept", "facts:us_state_capital@forget"]
    assert task_display("facts:us_state_capital@forget?phrasings=diverse") == "facts:us_state_capital@forget"
    assert task_display("facts:country_capital:attacked") == "facts:country_capital:attacked"
    item = load_items(specs[0])[0]
    assert item["subject"] in item["prompt"]


@pytest.mark.parametrize("domain", facts.DOMAINS)
def test_diverse_phrasings_state_each_fact_in_other_structures(domain):
    standard = facts.corpus_rows(domain)
    diverse = facts.corpus_rows(domain, "diverse")
    both = facts.corpus_rows(domain, "all")
    per_fact = len(facts.phrasings(domain, "diverse"))
    assert per_fact >= 10 and len(diverse) == per_fact * len(facts.facts(domain))
    assert len(both) == len(standard) + len(diverse)
    assert not {r["text"] for r in standard} & {r["text"] for r in diverse}
    by_id = {f.fact_id: f for f in facts.facts(domain)}
    for row in diverse:
        fact = by_id[row["fact_id"]]
        assert fact.subject in row["text"] and fact.answer in row["text"]
    # the default corpus is unchanged; the option goes through every loader
    assert load_texts(f"facts:{domain}") == [r["text"] for r in standard]
    part = {r["fact_id"] for r in splits.fact_rows(f"facts:{domain}@forget")}
    texts = load_texts(f"facts:{domain}@forget?phrasings=diverse")
    assert texts == [r["text"] for r in diverse if r["fact_id"] in part]
    with pytest.raises(ValueError, match="unknown phrasings"):
        load_texts(f"facts:{domain}?phrasings=poetic")


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (1, 2, 1), (0.5, 0.25, 0.25)])
def test_the_weighted_order_gives_each_source_its_share_in_every_prefix(weights):
    order = weighted_order(weights, 400)
    total = sum(weights)
    for n in (7, 50, 400):
        counts = Counter(order[:n])
        for index, weight in enumerate(weights):
            assert abs(counts[index] - n * weight / total) <= 1
    assert weighted_order(weights, 400) == order


def test_a_text_states_an_answer_only_outside_the_subjects_own_name():
    lux = splits.FactRef("country_capital:LU", "Luxembourg", "Luxembourg")
    assert not splits._states("The official language of Luxembourg is Luxembourgish.", lux)
    assert splits._states("Luxembourg is the capital of Luxembourg.", lux)
    mexico = splits.FactRef("country_capital:MX", "Mexico", "Mexico City")
    assert splits._states("Mexico City is the capital of Mexico.", mexico)
    assert not splits._states("The currency of Mexico is the Mexican peso.", mexico)
    sao = splits.FactRef("x", "Sao Tome and Principe", "Sao Tome")
    assert not splits._states("The language of Sao Tome and Principe is Portuguese.", sao)
    assert splits._states("Sao Tome is the capital of Sao Tome and Principe.", sao)


def test_a_jsonl_fact_source_names_the_line_that_lacks_a_fact_id_or_a_text(tmp_path):
    """The protocol's split and the @part splits read a local fact corpus through one reader."""
    from lensunlearn.attack.protocol import corpus_rows
    from lensunlearn.core.errors import InputError

    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"fact_id": 3, "text": "Paris is the capital of France."}) + "\n\n"
                    + json.dumps({"fact_id": "b"}) + "\n")
    with pytest.raises(InputError, match="line 3 has no text"):
        corpus_rows(str(path))
    assert splits.jsonl_fact_rows(path, str(path))[0] == {"fact_id": "3", "text": "Paris is the capital of France."}
    path.write_text(json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(InputError, match="line 1 has no fact_id"):
        corpus_rows(str(path))


def test_shared_answers_finds_retain_facts_that_give_a_forget_answer_to_another_subject(tmp_path):
    """Country languages repeat their answers (many countries speak Arabic), so the retain part gives half of the
    forget part's answers to other countries; capitals never repeat, and a file's own rows are compared alike."""
    pairs = splits.shared_answers("facts:country_language@forget", "facts:country_language@retain")
    forget = splits.fact_refs("facts:country_language@forget")
    assert len(forget) == 52 and len(pairs) == 26
    for ref, other in pairs:
        assert ref.fact_id in forget and ref.answer == other.answer and ref.subject != other.subject
    assert splits.shared_answers(f"{CC}@forget", f"{CC}@retain") == []
    assert splits.shared_answers(f"{CC}@forget", "generic:retain") == []  # not a fact source: nothing to compare
    rows = [{"fact_id": "a", "subject": "Ann", "answer": "tea", "text": "Ann drinks tea"},
            {"fact_id": "b", "subject": "Bob", "answer": "Tea", "text": "Bob drinks Tea"},
            {"fact_id": "c", "subject": "Cid", "answer": "milk", "text": "Cid drinks milk"}]
    forget, retain = write_jsonl(tmp_path / "f.jsonl", rows[:1]), write_jsonl(tmp_path / "r.jsonl", rows[1:])
    assert [(r.fact_id, o.fact_id) for r, o in splits.shared_answers(str(forget), str(retain))] == [("a", "b")]


def test_unlearn_warns_before_loading_when_retain_answers_repeat_forget_answers(caplog):
    """The check runs with the other input checks, before any model loads, and names the counts, an example and
    what to expect; a relation with distinct answers gets no warning."""
    import logging

    from lensunlearn.unlearning import run as run_module

    cfg = run_module.UnlearnConfig(forget="facts:country_language@forget",
                                   retain="generic:retain,facts:country_language@retain", eval_tasks="")
    with caplog.at_level(logging.WARNING, logger="lensunlearn"):
        run_module.check_inputs(cfg)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(
        "--retain facts:country_language@retain gives 26 of the 52 forget facts' answers to other subjects (e.g. ")
    assert "can hold the forget facts in place" in said[0]
    caplog.clear()
    cfg = run_module.UnlearnConfig(forget=f"{CC}@forget", retain=f"generic:retain,{CC}@retain", eval_tasks="")
    with caplog.at_level(logging.WARNING, logger="lensunlearn"):
        run_module.check_inputs(cfg)
    assert caplog.records == []


def test_unlearn_warns_when_no_evaluation_task_asks_the_forget_part(tmp_path, caplog):
    """A relation of your own split by fact, its questions in a file apart: evaluating only other relations is
    warned about before any model loads, naming the fix; asking the forget part, or no tasks at all, is not."""
    import logging

    from lensunlearn.unlearning import run as run_module

    rows = [{"fact_id": f"f{i}", "subject": f"S{i}", "text": f"S{i} likes A{i}."} for i in range(8)]
    text = write_jsonl(tmp_path / "text.jsonl", rows)
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question": f"What does S{i} like?", "choices": [f"A{i}", "B", "C", "D"], "answer": 0,
         "prompt": f"S{i} likes", "fact_id": f"f{i}", "subject": f"S{i}"} for i in range(8)])
    said = {}
    for name, tasks in [("other", "facts:element_symbol"), ("own", f"{questions}@forget,facts:element_symbol"),
                        ("whole", f"{questions}"), ("none", "")]:
        caplog.clear()
        cfg = run_module.UnlearnConfig(forget=f"{text}@forget", retain="generic:retain", eval_tasks=tasks)
        with caplog.at_level(logging.WARNING, logger="lensunlearn"):
            run_module.check_inputs(cfg)
        said[name] = [r.getMessage() for r in caplog.records]
    assert len(said["other"]) == 1 and said["other"][0].startswith(
        f"--eval_tasks asks none of the 4 facts of --forget {text}@forget: eval.json will not show what was ")
    assert "questions.jsonl@forget,questions.jsonl@kept" in said["other"][0]
    assert said["own"] == said["whole"] == said["none"] == []
