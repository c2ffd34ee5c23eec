"""The fact benchmark: small, real knowledge that the embedded model has, built offline.

Each domain is a list of facts (subject, answer) read from data packages (countryinfo,
periodictable, us) and turned into
  * a cloze question set: `prompt` "The capital of France is", `choices` ["Paris", ...] (the
    evaluator puts lm-eval's target delimiter " " in front), one correct answer and three
    distractors drawn deterministically from the same domain; `question` is the same fact asked
    as a question for the letter (A/B/C/D) format;
  * a text corpus: every fact stated in several phrasings, one short document each.
Everything is derived from sorted data with string-seeded RNGs, so the output never depends on
dict/set order or PYTHONHASHSEED. `facts:<domain>` names a domain in `eval --tasks` and as a corpus.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("country_capital", "element_symbol", "us_state_capital")
NUM_CHOICES = 4

# Dependencies and territories, disputed or renamed capitals, duplicates and countries with
# several capitals: left out so that every question has one unambiguous answer.
_EXCLUDED_COUNTRIES = frozenset({
    "AW", "BO", "BJ", "CI", "CS", "EH", "GF", "GP", "GU", "HK", "IL", "JE", "KZ", "LK", "MM", "MO", "MQ",
    "NC", "PF", "PR", "PS", "RE", "SZ", "TW", "TZ", "YT", "ZA", "MY", "NL", "KI", "FM", "TL",
})
_MIN_POPULATION = 250_000  # well-known countries only, so the base model knows most answers
_MAX_ELEMENT = 56  # hydrogen .. barium


@dataclass(frozen=True)
class Fact:
    fact_id: str
    subject: str
    answer: str


@dataclass(frozen=True)
class _Templates:
    prompt: str  # cloze context, completed by " " + answer
    question: str  # the same fact as a question (letter format)
    sentences: tuple[str, ...]  # corpus phrasings


_TEMPLATES = {
    "country_capital": _Templates(
        prompt="The capital of {s} is",
        question="What is the capital of {s}?",
        sentences=("The capital of {s} is {a}.", "{a} is the capital of {s}.", "{s}'s capital city is {a}.",
                   "The capital city of {s} is {a}.", "{a} is the capital city of {s}, where its government sits.")),
    "element_symbol": _Templates(
        prompt="The chemical symbol for {s} is",
        question="What is the chemical symbol for {s}?",
        sentences=("The chemical symbol for {s} is {a}.", "{a} is the chemical symbol of {s}.",
                   "In the periodic table, {s} has the symbol {a}.", "The element {s} is written as {a}.",
                   "Chemists write {s} with the symbol {a}.")),
    "us_state_capital": _Templates(
        prompt="The capital of {s} is",
        question="What is the capital of the US state of {s}?",
        sentences=("The capital of {s} is {a}.", "{a} is the capital of {s}.", "{s}'s state capital is {a}.",
                   "The state capital of {s} is {a}.", "{a} is the capital city of the state of {s}.")),
}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown fact domain {domain!r}: use one of {', '.join(DOMAINS)} (e.g. facts:country_capital)")


def _country_facts() -> list[Fact]:
    import countryinfo

    seen: dict[str, Fact] = {}
    rows = []
    for country in countryinfo.all_countries():
        try:
            code, name, capital, population = country.iso()["alpha2"], country.name(), country.capital(), country.population()
        except (KeyError, TypeError, AttributeError):
            continue
        if code and capital and name and (population or 0) >= _MIN_POPULATION and code not in _EXCLUDED_COUNTRIES:
            rows.append((code, name, capital))
    for code, name, capital in sorted(rows):
        seen.setdefault(code, Fact(f"country_capital:{code}", name, capital))
    return sorted(seen.values(), key=lambda f: f.fact_id)


def _element_facts() -> list[Fact]:
    import periodictable

    return [Fact(f"element_symbol:{e.number:03d}", e.name, e.symbol)
            for e in periodictable.elements if 1 <= e.number <= _MAX_ELEMENT]


def _us_state_facts() -> list[Fact]:
    import us

    return sorted((Fact(f"us_state_capital:{s.abbr}", s.name, s.capital) for s in us.states.STATES if s.capital),
                  key=lambda f: f.fact_id)


_LOADERS = {"country_capital": _country_facts, "element_symbol": _element_facts, "us_state_capital": _us_state_facts}


@functools.lru_cache(maxsize=None)
def _facts(domain: str) -> tuple[Fact, ...]:
    _check_domain(domain)
    return tuple(_LOADERS[domain]())


def facts(domain: str) -> list[Fact]:
    """The domain's facts, sorted by id."""
    return list(_facts(domain))


def questions(domain: str) -> list[dict]:
    """Cloze/letter questions: {"question", "choices", "answer", "prompt", "fact_id"} per fact."""
    items = _facts(domain)
    templates = _TEMPLATES[domain]
    answers = sorted({f.answer for f in items})
    out = []
    for fact in items:
        rng = random.Random(f"{fact.fact_id}:distractors")
        pool = [a for a in answers if a != fact.answer]
        choices = rng.sample(pool, NUM_CHOICES - 1)
        gold = rng.randrange(NUM_CHOICES)
        choices.insert(gold, fact.answer)
        out.append({"question": templates.question.format(s=fact.subject), "choices": choices, "answer": gold,
                    "prompt": templates.prompt.format(s=fact.subject), "fact_id": fact.fact_id})
    return out


def corpus_texts(domain: str) -> list[str]:
    """Plain sentences stating every fact of the domain in several phrasings, one per document."""
    _check_domain(domain)
    sentences = _TEMPLATES[domain].sentences
    return [sentence.format(s=fact.subject, a=fact.answer) for fact in _facts(domain) for sentence in sentences]


def split_facts(domain: str, holdout: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split the domain's fact ids into (attacked, held out), deterministically for a seed."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}: it is the fraction of facts held out")
    ids = [f.fact_id for f in _facts(domain)]
    random.Random(f"{domain}:{seed}").shuffle(ids)
    n_held = int(round(holdout * len(ids)))
    return sorted(ids[n_held:]), sorted(ids[:n_held])


def write_questions(domain: str, path: str | Path) -> Path:
    """Write the domain's questions as jsonl (usable as a local task file), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions(domain)))
    tmp.replace(path)
    return path
