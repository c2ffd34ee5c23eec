"""The fact benchmark: small, real knowledge that the embedded model has, built offline.

Each domain is a list of facts (subject, answer) read from data packages (countryinfo, pycountry,
periodictable, us) and turned into
  * a cloze question set: `prompt` "The capital of France is", `choices` ["Paris", ...] (the
    evaluator puts lm-eval's target delimiter " " in front), one correct answer and three
    distractors drawn deterministically from the same domain; `question` is the same fact asked
    as a question for the letter (A/B/C/D) format;
  * a text corpus: every fact stated in several phrasings, one short document each, tagged with
    the fact's id (`corpus_rows`), so that any domain can be split by fact.
The country domains ask about the same countries (and share the country's code in their fact
ids): unlearning one relation of a country (its capital) can then be checked for damage to the
others (its language, its currency). Every domain is one the embedded model knows (cloze accuracy
0.83 to 1.0); a country's continent (0.69) and an element's atomic number (0.54) were measured and
left out.

Next to the facts ships a generic corpus (`generic_texts`): short everyday texts (cooking, sports,
hobbies, software, ...) that the embedded model itself wrote, from which every document naming a
subject or an answer of any domain is dropped. It is split deterministically into a retain part
(`generic:retain`, a retain corpus that teaches nothing about the evaluated facts), a held-out part
(`generic:heldout`, in no corpus, for measuring perplexity on text never trained on) and a benign
part (`generic:benign`, which only the robustness protocol's benign attack trains on: text that no
unlearning or distillation stage saw, and not the text perplexity is measured on).
`scripts/make_generic_corpus.py` wrote it.

Everything is derived from sorted data with string-seeded RNGs or hashes, so the output never
depends on dict/set order or PYTHONHASHSEED. `facts:<domain>` names a domain in `eval --eval_tasks` and
as a corpus, `generic:retain` / `generic:heldout` name the generic corpus. `facts:<domain>@forget` (and
`@retain`, `@kept`) names one part of the domain split by fact, and `?phrasings=diverse` other
phrasings of its corpus (`splits`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import write_jsonl_atomic

DOMAINS = ("country_capital", "element_symbol", "us_state_capital", "country_language", "country_currency",
           "us_state_abbreviation")
NUM_CHOICES = 4
GENERIC_PREFIX = "generic:"
GENERIC_PARTS = ("retain", "heldout", "benign")
_DATA = Path(__file__).parent / "assets"
GENERIC_FILE = _DATA / "generic_texts.jsonl"
_HELDOUT_SHARE = 0.2  # of the generic documents, kept out of every corpus
# Of the generic documents, the benign attack's text: a slice of what was the retain part (the held-out
# part, and so every perplexity number, is unchanged), so that the benign attack trains on text the
# retain loss never protected.
_BENIGN_SHARE = 0.1

# Dependencies and territories, disputed or renamed capitals, duplicates and countries with
# several capitals: left out so that every question has one unambiguous answer.
_EXCLUDED_COUNTRIES = frozenset({
    "AW", "BO", "BJ", "CI", "CS", "EH", "GF", "GP", "GU", "HK", "IL", "JE", "KZ", "LK", "MM", "MO", "MQ",
    "NC", "PF", "PR", "PS", "RE", "SZ", "TW", "TZ", "YT", "ZA", "MY", "NL", "KI", "FM", "TL",
})
_MIN_POPULATION = 250_000  # well-known countries only, so the base model knows most answers
_MAX_ELEMENT = 56  # hydrogen .. barium

# pycountry's ISO 639 names where they are not what English prose calls the language.
_LANGUAGE_NAMES = {"Modern Greek (1453-)": "Greek", "Malay (macrolanguage)": "Malay",
                   "Nepali (macrolanguage)": "Nepali", "Swahili (macrolanguage)": "Swahili", "Pushto": "Pashto",
                   "Kirghiz": "Kyrgyz"}
# Non-circulating ISO 4217 codes (funds, units of account, next-day dollars) that countryinfo lists
# next to the currency people pay with.
_FUND_CURRENCIES = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "CUC", "MXV", "USN", "USS", "UYI"})
# ISO 4217 names that English prose does not use, as prose names them.
_CURRENCY_NAMES = {
    "Yuan Renminbi": "Chinese yuan", "Pound Sterling": "pound sterling", "Won": "South Korean won",
    "Sol": "Peruvian sol", "Som": "Kyrgyz som", "Rial Omani": "Omani rial", "Peso Uruguayo": "Uruguayan peso",
    "Cabo Verde Escudo": "Cape Verdean escudo", "Lao Kip": "Lao kip", "Cordoba Oro": "Nicaraguan córdoba",
    "Turkmenistan New Manat": "Turkmen manat", "Uzbekistan Sum": "Uzbek som", "Azerbaijan Manat": "Azerbaijani manat",
    "CFA Franc BCEAO": "CFA franc", "CFA Franc BEAC": "CFA franc", "US Dollar": "US dollar", "UAE Dirham": "UAE dirham",
    "Convertible Mark": "convertible mark",
}
# Zimbabwe: countryinfo's US dollar is no longer its only currency.
_EXCLUDED_CURRENCY_COUNTRIES = frozenset({"ZW"})


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
    diverse: tuple[str, ...]  # more phrasings: questions, list and table rows, other word orders, longer sentences


# The phrasings of each domain are data (one prompt, one question, five corpus sentences and twelve
# diverse ones each), kept beside the generic corpus so that adding a domain's wording is an edit to a table.
_TEMPLATES = {domain: _Templates(row["prompt"], row["question"], tuple(row["sentences"]), tuple(row["diverse"]))
              for domain, row in json.loads(_DATA.joinpath("fact_templates.json").read_text()).items()}
# A fact corpus's phrasings (the source option `phrasings=`): the five standard sentences (the default,
# and what attacks train on), the diverse ones alone, or both. Relearning is driven more by shared
# sentence structure than by shared topic ("benign relearning", arXiv 2602.03379), so forget text
# in other structures than the attack's shares less with it.
PHRASINGS = ("standard", "diverse", "all")


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown fact domain {domain!r}: use one of {', '.join(DOMAINS)} "
                         f"(e.g. facts:country_capital)")


@functools.cache
def _countries() -> tuple[tuple[str, str, str, object], ...]:
    """(ISO code, name, capital, countryinfo record) of the well-known countries, by code."""
    import countryinfo

    rows = []
    for country in countryinfo.all_countries():
        try:
            code, name = country.iso()["alpha2"], country.name()
            capital, population = country.capital(), country.population()
        except (KeyError, TypeError, AttributeError):
            continue
        if code and capital and name and (population or 0) >= _MIN_POPULATION and code not in _EXCLUDED_COUNTRIES:
            rows.append((code, name, capital, country))
    by_code: dict[str, tuple] = {}
    for row in sorted(rows, key=lambda r: r[:3]):  # of two records with one code, the first by name wins
        by_code.setdefault(row[0], row)
    return tuple(by_code.values())


def _country_facts() -> list[Fact]:
    return [Fact(f"country_capital:{code}", name, capital) for code, name, capital, _ in _countries()]


def _listed(country, field: str) -> list:
    try:
        return list(getattr(country, field)() or [])
    except (KeyError, TypeError, AttributeError):
        return []


def _language_facts() -> list[Fact]:
    """Countries with exactly one official language, named as English prose names it."""
    import pycountry

    out = []
    for code, name, _, country in _countries():
        languages = _listed(country, "languages")
        record = pycountry.languages.get(alpha_2=languages[0]) if len(languages) == 1 else None
        if record is not None:
            out.append(Fact(f"country_language:{code}", name, _LANGUAGE_NAMES.get(record.name, record.name)))
    return out


def _currency_name(iso_name: str) -> str:
    """'Algerian Dinar' -> 'Algerian dinar': the unit is a common noun, the words before it name the country."""
    if iso_name in _CURRENCY_NAMES:
        return _CURRENCY_NAMES[iso_name]
    *country, unit = iso_name.split()
    return " ".join([*country, unit.lower()])


def _currency_facts() -> list[Fact]:
    """Countries with exactly one circulating currency that ISO 4217 still lists (withdrawn codes, e.g.
    a currency since replaced by the euro, are not in pycountry and so left out)."""
    import pycountry

    out = []
    for code, name, _, country in _countries():
        codes = [c for c in _listed(country, "currencies") if c not in _FUND_CURRENCIES]
        record = pycountry.currencies.get(alpha_3=codes[0]) if len(codes) == 1 else None
        if record is not None and code not in _EXCLUDED_CURRENCY_COUNTRIES:
            out.append(Fact(f"country_currency:{code}", name, _currency_name(record.name)))
    return out


def _element_facts() -> list[Fact]:
    import periodictable

    return [Fact(f"element_symbol:{e.number:03d}", e.name, e.symbol)
            for e in periodictable.elements if 1 <= e.number <= _MAX_ELEMENT]


def _us_states() -> list:
    import us

    return sorted(us.states.STATES, key=lambda s: s.abbr)


def _us_state_facts() -> list[Fact]:
    return [Fact(f"us_state_capital:{s.abbr}", s.name, s.capital) for s in _us_states() if s.capital]


def _us_abbreviation_facts() -> list[Fact]:
    return [Fact(f"us_state_abbreviation:{s.abbr}", s.name, s.abbr) for s in _us_states()]


_LOADERS = {"country_capital": _country_facts, "element_symbol": _element_facts, "us_state_capital": _us_state_facts,
            "country_language": _language_facts, "country_currency": _currency_facts,
            "us_state_abbreviation": _us_abbreviation_facts}


@functools.cache
def _facts(domain: str) -> tuple[Fact, ...]:
    _check_domain(domain)
    return tuple(sorted(_LOADERS[domain](), key=lambda f: f.fact_id))


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
                    "prompt": templates.prompt.format(s=fact.subject), "fact_id": fact.fact_id,
                    "subject": fact.subject})
    return out


def phrasings(domain: str, which: str | None = None) -> tuple[str, ...]:
    """The corpus templates of a domain for a `PHRASINGS` choice (None: standard)."""
    _check_domain(domain)
    templates = _TEMPLATES[domain]
    which = which or "standard"
    if which not in PHRASINGS:
        raise ValueError(f"unknown phrasings {which!r}: use one of {', '.join(PHRASINGS)} (e.g. "
                         f"facts:{domain}?phrasings=diverse)")
    return {"standard": templates.sentences, "diverse": templates.diverse,
            "all": templates.sentences + templates.diverse}[which]


def corpus_rows(domain: str, which: str | None = None) -> list[dict]:
    """{"fact_id", "text"} per document: every fact of the domain in several phrasings (`phrasings`), fact by
    fact."""
    sentences = phrasings(domain, which)
    return [{"fact_id": fact.fact_id, "text": sentence.format(s=fact.subject, a=fact.answer)}
            for fact in _facts(domain) for sentence in sentences]


def corpus_texts(domain: str, which: str | None = None) -> list[str]:
    """Plain sentences stating every fact of the domain in several phrasings, one per document."""
    return [row["text"] for row in corpus_rows(domain, which)]


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
    return write_jsonl_atomic(path, questions(domain))


def write_corpus(domain: str, path: str | Path) -> Path:
    """Write the domain's corpus rows ({"fact_id", "text"}) as jsonl, atomically: a corpus file that
    `tamper --holdout` and the loaders accept, and that a user can split by fact."""
    return write_jsonl_atomic(path, corpus_rows(domain))


# --- the generic corpus --------------------------------------------------------------------------


def _banned_terms(domains: Iterable[str] = DOMAINS) -> tuple[list[str], list[str]]:
    """(terms matched ignoring case, terms matched exactly) that a generic document must not contain.

    Every subject and answer of every domain, ignoring case (an element is "oxygen" in prose), with
    two exceptions. Element symbols are not matched: one- and two-letter symbols ("I", "C", "He",
    "In", "As") are ordinary words, and a document states a symbol fact only next to the element's
    name, which is matched. US state codes are matched in capitals only ("OR", "ME", "IN"), as
    codes are written.
    """
    loose, exact = set(), set()
    for domain in domains:
        for fact in _facts(domain):
            loose.add(fact.subject)
            if domain == "us_state_abbreviation":
                exact.add(fact.answer)
            elif domain != "element_symbol":
                loose.add(fact.answer)
    return sorted(loose), sorted(exact)


def _pattern(terms: list[str], flags: int = 0) -> re.Pattern | None:
    if not terms:
        return None
    # longest first, so that "South Korean won" is reported rather than "won"
    alternatives = "|".join(re.escape(t) for t in sorted(terms, key=lambda t: (-len(t), t)))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", flags)


@functools.cache
def _banned_patterns() -> tuple[re.Pattern | None, re.Pattern | None]:
    loose, exact = _banned_terms()
    return _pattern(loose, re.IGNORECASE), _pattern(exact)


def fact_mentions(text: str) -> list[str]:
    """The subjects and answers of the fact domains that `text` names (whole words; see `_banned_terms`)."""
    found = []
    for pattern in _banned_patterns():
        if pattern is not None:
            found.extend(m.group(0) for m in pattern.finditer(text))
    return found


def generic_part(doc_id: str) -> str:
    """"heldout" for about a fifth of the document ids, "benign" for about a tenth, "retain" for the
    rest, by a hash of the id alone: a document keeps its side when others are added or dropped."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % 1000
    if bucket < _HELDOUT_SHARE * 1000:
        return "heldout"
    return "benign" if bucket < (_HELDOUT_SHARE + _BENIGN_SHARE) * 1000 else "retain"


@functools.cache
def _generic_rows() -> tuple[dict, ...]:
    rows = [json.loads(line) for line in GENERIC_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Filtered again on load, so that a fact domain added after the file was made cannot leak into it.
    return tuple(row for row in rows if row["text"].strip() and not fact_mentions(row["text"]))


def generic_rows(part: str) -> list[dict]:
    """{"id", "topic", "text"} of the generic documents in one part of the split (`GENERIC_PARTS`)."""
    if part not in GENERIC_PARTS:
        names = ", ".join(GENERIC_PREFIX + p for p in GENERIC_PARTS)
        raise ValueError(f"unknown generic corpus part {part!r}: use {names}")
    return [dict(row) for row in _generic_rows() if generic_part(row["id"]) == part]


def generic_texts(part: str) -> list[str]:
    """The generic documents in one part of the split (`GENERIC_PARTS`), in file order."""
    return [row["text"] for row in generic_rows(part)]


# --- facts the subject gives away -------------------------------------------------------------------

# Words too common to tie an answer to its subject ("Republic of the Congo").
_GUESS_STOPWORDS = frozenset({"the", "and", "of"})
# Two words that begin with the same five letters name one thing (Tunis / Tunisia, Algiers / Algeria,
# Indianapolis / Indiana, Mexican peso / Mexico); four would also pair unrelated words.
_GUESS_PREFIX = 5


def fold(text: str) -> str:
    """Lowercase ASCII: accents dropped ("São Tomé" -> "sao tome"), so spellings compare."""
    import unicodedata

    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


def _guess_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", fold(text)) if len(w) >= 3 and w not in _GUESS_STOPWORDS}


def guessable(subject: str, answer: str) -> bool:
    """Whether a fact's answer can be guessed from its subject alone, so that a model answering it proves
    no recall (Mexico City for Mexico, Luxembourg for Luxembourg, Tunis for Tunisia).

    The rule, on lowercase text with accents dropped: one is a substring of the other (the shorter of
    3+ letters); or they share a word (3+ letters, not "the", "and", "of"); or a word of each begins
    with the same 5+ letters. One-letter and two-letter answers (element symbols, state codes) are
    never guessable by it: they abbreviate the subject rather than repeat it.
    """
    s, a = fold(subject).strip(), fold(answer).strip()
    shorter = min(s, a, key=len)
    if len(shorter) >= 3 and (s in a or a in s):
        return True
    subject_words, answer_words = _guess_words(subject), _guess_words(answer)
    if subject_words & answer_words:
        return True
    return any(len(x) >= _GUESS_PREFIX and len(y) >= _GUESS_PREFIX and x[:_GUESS_PREFIX] == y[:_GUESS_PREFIX]
               for x in subject_words for y in answer_words)


def fact_by_id(fact_id: str) -> Fact | None:
    """The fact of a domain with this id (`country_capital:FR`), or None for an id of no fact domain
    (a user's own facts)."""
    domain = str(fact_id).split(":", 1)[0]
    if domain not in DOMAINS:
        return None
    return {f.fact_id: f for f in _facts(domain)}.get(str(fact_id))
