"""Every fact domain can be split by fact; the generic corpus names no evaluated fact; the small
preset keeps what it does not evaluate."""

from __future__ import annotations

import json
import re

import pytest

from lensunlearn.data import facts
from lensunlearn.data.corpora import load_texts


@pytest.mark.parametrize("domain", facts.DOMAINS)
def test_questions_and_corpus_rows_share_unique_fact_ids(domain):
    items = facts.facts(domain)
    ids = [f.fact_id for f in items]
    assert len(set(ids)) == len(ids) and all(i.startswith(f"{domain}:") for i in ids)
    answer_of = {f.fact_id: f.answer for f in items}
    questions = facts.questions(domain)
    assert [q["fact_id"] for q in questions] == ids
    for q in questions:
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        assert q["choices"][q["answer"]] == answer_of[q["fact_id"]]
    rows = facts.corpus_rows(domain)
    assert {r["fact_id"] for r in rows} == set(ids)
    assert all(set(r) == {"fact_id", "text"} for r in rows)
    assert facts.corpus_texts(domain) == [r["text"] for r in rows]
    for row in rows:  # each sentence states its own fact
        assert answer_of[row["fact_id"]] in row["text"]


def test_new_domains_ask_about_the_countries_of_the_capital_domain():
    countries = {f.fact_id.split(":")[1]: f.subject for f in facts.facts("country_capital")}
    for domain in ("country_language", "country_currency"):
        items = facts.facts(domain)
        assert len(items) >= 100
        for fact in items:  # same code, same name: a fact about the same entity
            assert countries[fact.fact_id.split(":")[1]] == fact.subject


def test_known_facts_of_the_new_domains():
    answer = {f.fact_id: f.answer for d in facts.DOMAINS for f in facts.facts(d)}
    assert answer["country_language:FR"] == "French" and answer["country_language:GR"] == "Greek"
    assert answer["country_currency:JP"] == "yen" and answer["country_currency:DE"] == "euro"
    assert answer["country_currency:GB"] == "pound sterling" and answer["country_currency:KR"] == "South Korean won"
    assert answer["us_state_abbreviation:TX"] == "TX"
    # ambiguous facts are left out: several official languages, a retired currency
    assert "country_language:CH" not in answer
    assert "country_currency:HR" not in answer


def test_write_corpus_round_trips_through_the_tamper_loader(tmp_path):
    from lensunlearn.attack.tamper import fact_records

    path = facts.write_corpus("country_language", tmp_path / "language.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == facts.corpus_rows("country_language")
    assert fact_records(str(path)) == rows
    assert load_texts(str(path)) == facts.corpus_texts("country_language")


def _all_generic_rows():
    return [row for part in facts.GENERIC_PARTS for row in facts.generic_rows(part)]


def test_shipped_generic_file_is_small_and_already_clean():
    raw = [json.loads(line) for line in facts.GENERIC_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert facts.GENERIC_FILE.stat().st_size < 300_000
    assert len(raw) >= 200
    # the file itself holds no fact mention (the load-time filter drops nothing)
    assert sorted(r["id"] for r in _all_generic_rows()) == sorted(r["id"] for r in raw)
    assert len({r["id"] for r in raw}) == len(raw) and len({r["text"] for r in raw}) == len(raw)


def _phrases(text: str, longest: int = 6) -> set[str]:
    """Every run of up to `longest` words of `text`, lowercased, joined by single spaces."""
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1)}


def test_generic_corpus_names_no_evaluated_subject_or_answer():
    # Checked independently of `fact_mentions`: every subject and answer, ignoring case and
    # punctuation, as whole words; state codes in capitals; element symbols are ordinary words
    # ("I", "He", "In") and are not checked.
    texts = [r["text"] for r in _all_generic_rows()]
    phrases = set().union(*map(_phrases, texts))
    capital_words = {w for t in texts for w in re.findall(r"\w+", t) if w.isupper()}
    for domain in facts.DOMAINS:
        for fact in facts.facts(domain):
            terms = [fact.subject] + ([] if domain in ("element_symbol", "us_state_abbreviation") else [fact.answer])
            for term in terms:
                key = " ".join(re.findall(r"\w+", term.lower()))
                assert key.count(" ") < 6 and key not in phrases, f"{fact.fact_id}: {term!r} in the generic corpus"
            if domain == "us_state_abbreviation":
                assert fact.answer not in capital_words, fact.fact_id


def test_fact_mentions_matches_whole_words_only():
    assert facts.fact_mentions("We flew to paris for the weekend.") == ["paris"]
    assert facts.fact_mentions("A cast-iron pan heats evenly.") == ["iron"]
    assert facts.fact_mentions("Ship it to TX by Friday.") == ["TX"]
    assert facts.fact_mentions("I wrote it in C, then ok, tx.") == []  # symbols and lowercase codes are words
    assert facts.fact_mentions("Parisian cafes and ironic jokes.") == []


def test_generic_split_is_deterministic_and_disjoint():
    parts = {part: facts.generic_rows(part) for part in facts.GENERIC_PARTS}
    retain, heldout, benign = parts["retain"], parts["heldout"], parts["benign"]
    for a, b in ((retain, heldout), (retain, benign), (heldout, benign)):
        assert {r["id"] for r in a}.isdisjoint(r["id"] for r in b)
        assert {r["text"] for r in a}.isdisjoint(r["text"] for r in b)
    total = len(_all_generic_rows())
    assert 0.1 <= len(heldout) / total <= 0.3 and 0.05 <= len(benign) / total <= 0.15
    # the side of a document depends on its id alone (a hash, not Python's salted hash())
    assert facts.generic_part("generic:0000") == facts.generic_part("generic:0000")
    assert [facts.generic_part(f"generic:{i:04d}") for i in range(8)] == \
        ["retain", "retain", "retain", "retain", "retain", "heldout", "retain", "retain"]
    assert facts.generic_texts("retain") == [r["text"] for r in retain]
    with pytest.raises(ValueError, match="generic:retain, generic:heldout, generic:benign"):
        facts.generic_texts("train")


def test_the_benign_attack_trains_on_text_no_stage_trains_on_nor_perplexity_reads():
    """The protocol's default benign text shares no document with the defaults of unlearn's --retain,
    distill's --corpus (and the --preset small/robust retain corpus), nor with the perplexity text."""
    import dataclasses

    from lensunlearn.attack.options import RobustnessConfig
    from lensunlearn.unlearning.options import PRESETS, DistillConfig

    def default(config, name):
        return next(f.default for f in dataclasses.fields(config) if f.name == name)

    benign = set(load_texts(default(RobustnessConfig, "benign")))
    assert len(benign) >= 40
    # the reference preset retains on a hub corpus (wikitext), which shares no text with the shipped one
    for source in (PRESETS["small"].retain, PRESETS["robust"].retain, default(DistillConfig, "corpus"),
                   default(RobustnessConfig, "generic"), default(DistillConfig, "generic")):
        assert benign.isdisjoint(load_texts(source)), source


def test_guessable_facts_on_planted_pairs():
    """A fact is guessable when its answer repeats the subject (whole or in part, ignoring case and accents)."""
    for subject, answer in (("Mexico", "Mexico City"), ("Kuwait", "Kuwait City"), ("Luxembourg", "Luxembourg"),
                            ("Singapore", "singapore"), ("Tunisia", "Tunis"), ("Guinea-Bissau", "Bissau"),
                            ("São Tomé and Príncipe", "Sao Tome"), ("Indiana", "Indianapolis"),
                            ("Mexico", "Mexican peso"), ("Laos", "Lao")):
        assert facts.guessable(subject, answer), (subject, answer)
    for subject, answer in (("France", "Paris"), ("Republic of the Congo", "Brazzaville"), ("Hydrogen", "H"),
                            ("California", "CA"), ("Tin", "Sn"), ("Brazil", "Brasília"), ("Iran", "Tehran")):
        assert not facts.guessable(subject, answer), (subject, answer)
    capitals = {f.subject for f in facts.facts("country_capital") if facts.guessable(f.subject, f.answer)}
    assert {"Mexico", "Kuwait", "Luxembourg", "Singapore", "Panama", "Guatemala", "Djibouti"} <= capitals
    assert len(capitals) < 20 and "France" not in capitals
    assert facts.fact_by_id("country_capital:MX") == facts.Fact("country_capital:MX", "Mexico", "Mexico City")
    assert facts.fact_by_id("cap:france") is None and facts.fact_by_id("country_capital:XX") is None


def test_generic_corpus_loads_by_name():
    assert load_texts("generic:retain") == facts.generic_texts("retain")
    assert load_texts("generic:heldout", limit=5) == facts.generic_texts("heldout")[:5]
    with pytest.raises(ValueError, match="unknown generic corpus part"):
        load_texts("generic:everything")


def test_small_preset_retains_no_evaluated_domain():
    from lensunlearn.unlearning.run import SMALL

    retain = [p.strip() for p in SMALL.retain.split("+")]
    evaluated = [t.strip() for t in SMALL.eval_tasks.split(",")]
    assert retain and not any(p.startswith("facts:") for p in retain)
    assert not set(retain) & set(evaluated)
    assert SMALL.forget in evaluated and "generic:heldout" not in retain
    for part in retain:  # and every retain document is clean
        assert not any(facts.fact_mentions(t) for t in load_texts(part))
