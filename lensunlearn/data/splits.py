"""Fact sources split by fact into named parts, and the checks that keep the parts apart.

A fact source is `facts:<domain>` or a `.jsonl` file whose rows carry `fact_id`. Any fact source
can name one part of a split of its facts, and options, wherever a corpus or a task is accepted:

    SOURCE[@PART][?OPTION=VALUE&OPTION=VALUE]
    facts:country_capital@forget            the forget part of country capitals
    facts:country_capital@kept              the part no command trains on: selectivity within the relation
    notes.jsonl@retain?split_seed=1         the retain part of a user's own relation, another split
    facts:country_capital@forget?phrasings=diverse   (a corpus option; see `facts.PHRASINGS`)

Parts: forget, retain and kept; shares 50/25/25 unless `shares=F/R/K` (percent) says otherwise.
The source's distinct fact ids are ordered by a SHA-256 hash of the split seed and the id, and cut
at the shares (rounded half up; the kept part takes the rest). The parts are thus a pure function
of the set of fact ids, the shares and the seed: the same in every command and every process
(whatever PYTHONHASHSEED). `facts:<domain>` always splits the whole domain, so its corpus and its
questions agree; two files of one relation agree when they hold the same facts, and a command
that names parts of two files which share some facts but split them differently is refused.

Bad input is refused here, before any model loads: an empty part, shares that do not add up to 100
(above it the parts would overlap), two parts of one relation split differently in one command
(their facts would overlap), and a retain source that states forget facts (`check_retain_sources`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from ..core.errors import InputError, read_text

FACTS_PREFIX = "facts:"
PARTS = ("forget", "retain", "kept")
DEFAULT_SHARES = (50.0, 25.0, 25.0)  # percent of the relation's facts in forget, retain, kept
DEFAULT_SPLIT_SEED = 0
PHRASING_OPTION = "phrasings"
_OPTIONS = ("shares", "split_seed", PHRASING_OPTION)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source name: the source itself, the part it names (if any) and its options."""

    base: str  # facts:<domain> or a file path (anything else: a hub id, generic:<part>)
    part: str | None = None
    shares: tuple[float, float, float] = DEFAULT_SHARES
    split_seed: int = DEFAULT_SPLIT_SEED
    phrasings: str | None = None  # a fact corpus's phrasings (None: the standard ones)

    @property
    def domain(self) -> str | None:
        return self.base[len(FACTS_PREFIX):] if self.base.startswith(FACTS_PREFIX) else None

    @property
    def split_key(self) -> tuple:
        """What decides the parts: two specs of one relation with the same key never overlap."""
        return self.shares, self.split_seed

    def split_text(self) -> str:
        """`@part` and the non-default split options, as written (empty without a part)."""
        if self.part is None:
            return ""
        options = []
        if self.shares != DEFAULT_SHARES:
            options.append("shares=" + "/".join(f"{s:g}" for s in self.shares))
        if self.split_seed != DEFAULT_SPLIT_SEED:
            options.append(f"split_seed={self.split_seed}")
        return f"@{self.part}" + ("?" + "&".join(options) if options else "")

    def task_name(self) -> str:
        """The name a task of this spec has in results: the source and its part (a corpus-only option such
        as phrasings is left out: it does not change the questions)."""
        base = self.base if self.domain is not None else Path(self.base).stem
        return base + self.split_text()


def _parse_shares(text: str, source: str) -> tuple[float, float, float]:
    try:
        shares = tuple(float(s) for s in text.split("/"))
    except ValueError:
        shares = ()
    if len(shares) != 3 or any(not 0 <= s <= 100 for s in shares):
        raise InputError(f"{source}: shares={text} must be three percentages F/R/K of the forget, retain and kept "
                         f"parts, e.g. shares=50/25/25")
    total = sum(shares)
    if abs(total - 100) > 1e-6:
        what = "the parts would overlap" if total > 100 else "some facts would be in no part"
        raise InputError(f"{source}: shares={text} add up to {total:g}, not 100, so {what}: give shares that add "
                         f"up to 100, e.g. shares=50/25/25")
    return shares  # type: ignore[return-value]


def parse_source(text: str) -> SourceSpec:
    """Split `SOURCE[@PART][?OPTIONS]` into its pieces; a name without either is returned as it is.

    An existing file is taken as it is, whatever its name holds, so that a file whose name has '@' or
    '?' still loads.
    """
    text = text.strip()
    if "@" not in text and "?" not in text or Path(text).expanduser().is_file():
        return SourceSpec(text)
    head, _, query = text.partition("?")
    base, part = head, None
    if "@" in head:
        base, _, part = head.rpartition("@")
        if part not in PARTS:
            raise InputError(f"{text}: unknown part @{part}: name one of {', '.join('@' + p for p in PARTS)} (e.g. "
                             f"facts:country_capital@forget)")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise InputError(f"{text}: unknown option {unknown[0]!r}: a source takes {', '.join(_OPTIONS)} (e.g. "
                         f"?shares=50/25/25&split_seed=0&phrasings=diverse)")
    shares = _parse_shares(options["shares"], text) if "shares" in options else DEFAULT_SHARES
    try:
        seed = int(options.get("split_seed", DEFAULT_SPLIT_SEED))
    except ValueError as err:
        raise InputError(f"{text}: split_seed={options['split_seed']} must be an integer") from err
    if part is None and ("shares" in options or "split_seed" in options):
        raise InputError(f"{text}: shares and split_seed choose a split, but no part is named: add @forget, "
                         f"@retain or @kept")
    spec = SourceSpec(base, part, shares, seed, options.get(PHRASING_OPTION) or None)
    if not is_fact_base(base):
        raise InputError(f"{text}: parts and options need a fact source, facts:<domain> or a .jsonl whose rows "
                         f"carry fact_id; {base} is neither")
    return spec


def question_source(text: str) -> str:
    """The task that asks a fact source's questions: the source with a corpus-only option such as
    phrasings dropped (`facts:country_capital@forget?phrasings=all` -> `facts:country_capital@forget`);
    any other name as it is."""
    spec = parse_source(text)
    return text if spec.phrasings is None else spec.task_name()


def is_fact_base(base: str) -> bool:
    return base.startswith(FACTS_PREFIX) or base.endswith(".jsonl")


def has_options(text: str) -> bool:
    """Whether `text` names a part or options (and so needs `parse_source`), rather than a plain source."""
    spec = parse_source(text)
    return spec.part is not None or spec.phrasings is not None


# --- the split ------------------------------------------------------------------------------------


def _rank_key(seed: int, fact_id: str) -> tuple[bytes, str]:
    """Where a fact stands in the seed's order: a SHA-256 of the seed and its id (the id breaks ties)."""
    return hashlib.sha256(f"lensunlearn-fact-split:{seed}:{fact_id}".encode()).digest(), fact_id


def _counts(n: int, shares: Sequence[float]) -> tuple[int, int, int]:
    """Facts per part: the forget and retain shares rounded half up, the kept part the rest."""
    forget = min(n, math.floor(shares[0] / 100 * n + 0.5))
    retain = min(n - forget, math.floor(shares[1] / 100 * n + 0.5))
    return forget, retain, n - forget - retain


def split_ids(ids: Iterable[str], shares: Sequence[float] = DEFAULT_SHARES,
              seed: int = DEFAULT_SPLIT_SEED) -> dict[str, list[str]]:
    """{part: sorted fact ids} of the distinct ids: disjoint, together every id, each part its share of them
    (rounded). The ids are ordered by a hash of the seed and the id, and cut at the shares."""
    ordered = sorted(set(ids), key=lambda i: _rank_key(seed, i))
    out, start = {}, 0
    for part, count in zip(PARTS, _counts(len(ordered), shares)):
        out[part] = sorted(ordered[start:start + count])
        start += count
    return out


def in_part(spec: SourceSpec, ids: Iterable[str]) -> set[str]:
    """The ids (of one source) that fall in `spec`'s part; refuses an empty part."""
    ids = set(ids)
    chosen = set(split_ids(ids, spec.shares, spec.split_seed)[spec.part])
    if not chosen:
        raise InputError(f"{spec.base}{spec.split_text()} is empty: none of its {len(ids)} facts falls in the "
                         f"{spec.part} part (shares {'/'.join(f'{s:g}' for s in spec.shares)}): give that part a "
                         f"larger share, or use a source with more facts")
    return chosen


def part_sizes(ids: Iterable[str], shares: Sequence[float] = DEFAULT_SHARES,
               seed: int = DEFAULT_SPLIT_SEED) -> dict[str, int]:
    return {part: len(chosen) for part, chosen in split_ids(ids, shares, seed).items()}


# --- rows of a fact source --------------------------------------------------------------------------


def jsonl_fact_rows(path: Path, source: str, need_text: bool = False) -> list[dict]:
    """The rows of a local .jsonl fact source, each with its fact_id as a string (and, with `need_text`, a
    text); one line naming the file and line for anything else."""
    if not path.is_file():
        raise FileNotFoundError(f"{source}: {path} does not exist: pass an existing .jsonl whose rows carry fact_id")
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {number}: invalid JSON ({err.msg}, column {err.colno})") from err
        if not isinstance(row, dict) or not row.get("fact_id"):
            raise InputError(f"{path} line {number} has no fact_id: splitting {source} by fact needs a fact_id on "
                             f"every row")
        if need_text and not isinstance(row.get("text"), str):
            raise InputError(f"{path} line {number} has no text: every row of {source} needs its sentence in text")
        rows.append({**row, "fact_id": str(row["fact_id"])})
    if not rows:
        raise InputError(f"{source}: {path} holds no rows")
    return rows


def fact_rows(source: str) -> list[dict]:
    """Corpus rows {"fact_id", "text", ...} of a fact source, restricted to its part when it names one.

    `facts:<domain>` rows also carry the fact's subject and answer (in `facts.PHRASINGS` phrasings,
    the option `phrasings`); a .jsonl's rows are its own (each must carry fact_id and text).
    """
    spec = parse_source(source)
    if spec.domain is not None:
        from .facts import corpus_rows

        rows = corpus_rows(spec.domain, spec.phrasings)
    else:
        if spec.phrasings is not None:
            raise InputError(f"{source}: phrasings= is an option of the fact benchmark's corpora (facts:<domain>); "
                             f"a file's rows are its own text")
        rows = jsonl_fact_rows(Path(spec.base).expanduser(), source)
        bad = next((r for r in rows if not isinstance(r.get("text"), str)), None)
        if bad is not None:
            raise InputError(f"{source}: the row of fact {bad['fact_id']} has no text: every corpus row needs fact_id "
                             f"and text")
    if spec.part is None:
        return rows
    keep = in_part(spec, (r["fact_id"] for r in rows))
    return [r for r in rows if r["fact_id"] in keep]


def fact_texts(source: str) -> list[str]:
    return [row["text"] for row in fact_rows(source)]


def filter_items(items: list[dict], spec: SourceSpec, name: str) -> list[dict]:
    """The questions of `spec`'s part (all of them without a part); every row must carry fact_id."""
    if spec.part is None:
        return items
    missing = sum(not item.get("fact_id") for item in items)
    if missing:
        raise InputError(f"task {name}: {missing} of {len(items)} questions have no fact_id, which the split into "
                         f"parts needs: add a fact_id to every row")
    keep = in_part(spec, (item["fact_id"] for item in items))
    return [item for item in items if item["fact_id"] in keep]


# --- facts named by a source, for the checks ---------------------------------------------------------


@dataclass(frozen=True)
class FactRef:
    fact_id: str
    subject: str | None
    answer: str | None


def _question_answer(row: dict) -> str | None:
    choices, answer = row.get("choices"), row.get("answer")
    if isinstance(choices, list) and isinstance(answer, int) and not isinstance(answer, bool) \
            and 0 <= answer < len(choices):
        return str(choices[answer])
    return answer if isinstance(answer, str) else None


def fact_refs(source: str) -> dict[str, FactRef] | None:
    """{fact_id: its subject and answer (where the rows say)} of a fact source's part, or None for a source
    that is not one (a hub corpus, generic text, a file without fact_id): those carry no facts to check."""
    spec = parse_source(source)
    if spec.domain is not None:
        from .facts import facts

        found = {f.fact_id: FactRef(f.fact_id, f.subject, f.answer) for f in facts(spec.domain)}
    elif spec.base.endswith(".jsonl") and Path(spec.base).expanduser().is_file():
        path = Path(spec.base).expanduser()
        if spec.part is None:  # a plain corpus or task file: a fact source only when every row names its fact
            rows = [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
            if not rows or not all(isinstance(r, dict) and r.get("fact_id") for r in rows):
                return None
        else:
            rows = jsonl_fact_rows(path, source)
        found = {}
        for row in rows:
            fact_id = str(row["fact_id"])
            subject = row.get("subject") if isinstance(row.get("subject"), str) else None
            found.setdefault(fact_id, FactRef(fact_id, subject, _question_answer(row)))
    else:
        return None
    if spec.part is not None:
        keep = in_part(spec, found)
        found = {k: v for k, v in found.items() if k in keep}
    return found


def _all_ids(spec: SourceSpec) -> set[str]:
    """Every fact id of the source a spec names (before its part is taken)."""
    if spec.domain is not None:
        from .facts import facts

        return {f.fact_id for f in facts(spec.domain)}
    return {row["fact_id"] for row in jsonl_fact_rows(Path(spec.base).expanduser(), spec.base)}


def check_consistent_splits(sources: Iterable[tuple[str, str]]) -> None:
    """Refuse two part-naming sources of one command that put a fact they share in different parts: other
    shares or split_seed for one relation, or two files of one relation that hold different sets of facts.
    Their parts would overlap (a kept fact trained as a retain fact elsewhere in the same command).

    `sources` are (flag, source) pairs, e.g. ("--forget", "facts:country_capital@forget")."""
    named = []
    for flag, source in sources:
        spec = parse_source(source)
        if spec.part is not None:
            ids = _all_ids(spec)
            parts = {i: part for part, chosen in split_ids(ids, spec.shares, spec.split_seed).items() for i in chosen}
            named.append((flag, source, parts))
    for index, (flag, source, parts) in enumerate(named):
        for other_flag, other, other_parts in named[:index]:
            shared = set(parts) & set(other_parts)
            moved = sorted(i for i in shared if parts[i] != other_parts[i])
            if moved:
                raise InputError(f"{flag} {source} and {other_flag} {other} split the facts they share differently "
                                 f"({len(moved)} of {len(shared)}, e.g. {moved[0]}: {parts[moved[0]]} in one, "
                                 f"{other_parts[moved[0]]} in the other), so their parts overlap: give every part "
                                 f"of one relation the same shares and split_seed, and split files that hold the "
                                 f"same facts")


def _spans(term: str, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(rf"(?<!\w){re.escape(term)}(?!\w)", text, flags=re.IGNORECASE)]


def _states(text: str, ref: FactRef) -> bool:
    """Whether `text` names the fact's answer other than as (part of) a mention of the subject: "Luxembourg is
    the capital of Luxembourg" does, "the language of Luxembourg is Luxembourgish" does not."""
    if not ref.answer:
        return True
    answers = _spans(ref.answer, text)
    if not ref.subject:
        return bool(answers)
    if ref.answer.casefold() == ref.subject.casefold():
        return len(answers) >= 2
    subjects = _spans(ref.subject, text)
    return any(not any(a <= start and end <= b for a, b in subjects) for start, end in answers)


def retain_conflicts(forget: str, retain: str) -> list[tuple[FactRef, str]]:
    """(forget fact, why) for every forget fact that the retain source states.

    A retain row states a forget fact when it has the same fact_id, or when it is about the same
    subject and names that fact's answer (a subject's other relations, such as a forgotten country's
    language, are what a same-subject retain set is for, and pass). Rows without a subject are
    checked by fact_id only. Sources that are not fact sources (hub corpora, generic text) are not
    checked: they name no facts.
    """
    forgotten = fact_refs(forget)
    if not forgotten:
        return []
    kept = fact_refs(retain)
    if kept is None:
        return []
    found = [(forgotten[i], "the same fact_id") for i in sorted(set(forgotten) & set(kept))]
    by_subject: dict[str, list[FactRef]] = {}
    for ref in forgotten.values():
        if ref.subject:
            by_subject.setdefault(ref.subject.casefold(), []).append(ref)
    if not by_subject:
        return found
    texts = _texts_by_fact(retain, kept)
    for fact_id, ref in kept.items():
        if fact_id in forgotten or not ref.subject:
            continue
        for target in by_subject.get(ref.subject.casefold(), []):
            if any(_states(t, target) for t in texts.get(fact_id, [""])):
                found.append((target, f"the same subject {target.subject!r} with its answer {target.answer!r} "
                                      f"(retain fact {fact_id})"))
    return found


def shared_answers(forget: str, retain: str) -> list[tuple[FactRef, FactRef]]:
    """(forget fact, retain fact) pairs where a retain fact about another subject has the same answer.

    Not a contradiction, so not refused: but where a relation's answers repeat (many countries speak
    Arabic), the retain loss rewards the very answer each such forget fact should lose, after the
    same prompt, and holds it in place. Sources that are not fact sources give no pairs."""
    forgotten, kept = fact_refs(forget), fact_refs(retain)
    if not forgotten or not kept:
        return []
    by_answer: dict[str, FactRef] = {}
    for fact_id, ref in sorted(kept.items()):
        if ref.answer and fact_id not in forgotten:
            by_answer.setdefault(ref.answer.casefold(), ref)
    pairs = []
    for ref in forgotten.values():
        other = by_answer.get(ref.answer.casefold()) if ref.answer else None
        if other is not None and (other.subject or "").casefold() != (ref.subject or "").casefold():
            pairs.append((ref, other))
    return pairs


def _texts_by_fact(source: str, refs: dict[str, FactRef]) -> dict[str, list[str]]:
    """The texts that state each fact of a source: its corpus rows, or a question's prompt with its answer."""
    try:
        rows = fact_rows(source)
    except InputError:  # a question file (no text): its facts' answers are their own
        return {i: [f"{r.subject} {r.answer}"] for i, r in refs.items() if r.answer}
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row["fact_id"], []).append(row["text"])
    return out


def check_retain_sources(forget: str, retain: Sequence[str], flag: str = "--retain") -> None:
    """Refuse a retain source that states facts of the forget source (see `retain_conflicts`)."""
    for source in retain:
        conflicts = retain_conflicts(forget, source)
        if conflicts:
            ref, why = conflicts[0]
            raise InputError(f"{flag} {source} states {len(conflicts)} fact(s) of --forget {forget} (e.g. "
                             f"{ref.fact_id} by {why}): training to keep what is being forgotten contradicts it; "
                             f"use the same relation's retain part (@retain, with the forget part's shares and "
                             f"split_seed) or drop those rows")


def check_kept_untrained(tasks: Sequence[str], trained: Sequence[str], flag: str = "--eval_tasks") -> None:
    """Refuse a kept part (`@kept`) among the tasks whose facts a training source holds (by fact_id): the kept
    part measures what was never trained on."""
    sources = [(source, fact_refs(source)) for source in trained]
    for task in tasks:
        if parse_source(task).part != "kept":
            continue
        kept = fact_refs(task) or {}
        for source, refs in sources:
            shared = sorted(set(kept) & set(refs or {}))
            if shared:
                raise InputError(f"{flag} {task} is a kept part, but {source} trains on {len(shared)} of its facts "
                                 f"(e.g. {shared[0]}): the kept part must be in no training corpus; train on the "
                                 f"forget and retain parts only")


def check_parts_nonempty(sources: Iterable[str]) -> None:
    """Refuse a part-naming fact source whose part holds no fact (see `in_part`), before anything loads."""
    for source in sources:
        if parse_source(source).part is not None:
            fact_refs(source)
