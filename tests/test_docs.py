"""The documentation describes the product as it is: no development history, no developer's machine.

README.md, CHANGELOG.md, any other markdown file at the top and every page under docs/ are read. They
must not name development rounds ("the ninth session", "in an earlier round"), commit hashes, issue
numbers or absolute paths of a developer's machine (/work/..., /root/..., /tmp/...): the history
belongs in git, and a newcomer cannot reproduce a path on someone else's disk. The README is a
front page: at most 300 lines, its first screen shows the two setup commands and the demo's result
table, and every relative link in it and in docs/ points to a file (and heading) that exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_COMMAND = "bash scripts/bootstrap.sh && .venv/bin/lensunlearn demo"
TEST_COMMAND = "bash scripts/bootstrap.sh && .venv/bin/python -m pytest -n 2"

ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
            "fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|"
            r"\d+(?:st|nd|rd|th)|last|previous|next|earlier|later|this|that")
# What a lab journal says and a product page does not. Each pattern names one way of saying it.
HISTORY = {
    "a development round by its ordinal": re.compile(
        rf"\b(?:{ORDINALS})(?:[\s-]+(?:development|work|dev))?[\s-]+(?:sessions?|rounds?|iterations?|sprints?)\b",
        re.I),
    "the word 'session' (a development round)": re.compile(r"\bsessions?\b", re.I),
    "a development round": re.compile(r"\b(?:development|dev|work)[\s-]+(?:rounds?|iterations?)\b", re.I),
    "the developer's working tree": re.compile(r"\bworking[\s-]+tree\b", re.I),
    "the machine's mood": re.compile(r"\b(?:on\s+)?an?\s+(?:slow|middling|good|bad|quiet|busy)\s+day\b|"
                                     r"\b(?:slow|middling|good|bad)\s+days\b", re.I),
    "an issue or pull-request number": re.compile(r"\b(?:issue|pr|pull request)\s*#?\d+\b|(?<![\w&/])#\d+\b", re.I),
    "an issue as the reason": re.compile(r"\bthe issue's\b", re.I),
    "a commit as a point in time": re.compile(r"\b(?:parent|previous|earlier|this|that|last)\s+commit\b", re.I),
}
# A commit hash: 7 to 40 hex digits with at least one digit and one letter, standing alone (a word of
# its own, in backticks or not, or after `@`). Words made only of a-f ("decade", "facade") have no digit,
# numbers ("1234567") no letter, and hex inside a longer word or path is not matched.
HASH = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])")
# Absolute paths of someone's machine. `~/.cache/lensunlearn` (the documented cache) and system
# tools are not matched; a path inside a URL is preceded by a word character and is not matched.
MACHINE_PATH = re.compile(r"(?<![\w.~])(?:/(?:work|root|home|Users|tmp|mnt|scratch|private|data)/[\w.-]+|"
                          r"[A-Z]:\\Users\\)")


def doc_files() -> list[Path]:
    files = sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def history_findings(text: str) -> list[str]:
    """Every place `text` speaks of development history or a developer's machine, as 'line N: what: match'."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in HISTORY.items():
            found += [f"line {number}: {what}: {m.group(0)!r}" for m in pattern.finditer(line)]
        found += [f"line {number}: a commit hash: {m.group(0)!r}" for m in HASH.finditer(line)]
        found += [f"line {number}: a developer's machine path: {m.group(0)!r}" for m in MACHINE_PATH.finditer(line)]
    return found


@pytest.mark.parametrize("text", [
    "the ninth session's run took 10 min", "since the tenth session", "in an earlier session", "Third session:",
    "(seventh session)", "the 3rd round of tuning", "first development round", "a session later",
    "measured in the working tree", "12 min on a slow day", "on a middling day", "see issue 26", "fixed in #41",
    "a fresh clone at `29dadcd`", "at c7fe3f7,", "commit 8f472da5c0ffee", "from /work/runs", "--out /tmp/rb/lens",
    "/root/.cache", "/home/alice/runs", "cd /work/main && make", "the issue's 2x target", "from the parent commit",
])
def test_history_patterns_catch_the_journal(text):
    assert history_findings(text), text


@pytest.mark.parametrize("text", [
    "the first seed", "after the first step", "each round of the attack grid is", "rounding to 1e-8",
    "float rounding", "a second seed", "the decade", "a facade", "1234567 tokens", "lr 1e-3, 2e-5",
    "`~/.cache/lensunlearn`", "https://github.com/EleutherAI/tuned-lens/tree/main/tuned_lens",
    "runs/lens_smollm2-135m", "sha256sum", "bf16", "facts:country_capital", "# Heading", "1e-5 x 64 steps",
    "arXiv 2410.08827", "pip install torch==2.13.0", "`cafe`", "accbeef", "on a fresh clone",
])
def test_history_patterns_spare_ordinary_text(text):
    assert not history_findings(text), history_findings(text)


def test_docs_name_no_development_history_and_no_machine_paths():
    files = doc_files()
    assert README in files and (ROOT / "CHANGELOG.md") in files and any(f.parent.name == "docs" for f in files)
    found = [f"{f.relative_to(ROOT)} {finding}" for f in files for finding in history_findings(f.read_text())]
    assert not found, "\n".join(found)


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it at most 300 and move detail to docs/"
    first_screen = "\n".join(lines[:40])
    assert DEMO_COMMAND in first_screen and TEST_COMMAND in first_screen
    assert re.search(r"^\|.*\|\n\|[-:| ]+\|\n\|.*\|$", first_screen, flags=re.M), \
        "the README's first 40 lines must show the demo's result table"


def test_readme_commands_are_the_ones_setup_and_ci_run():
    """The README's two commands call the bootstrap that exists, and its test command is what CI runs."""
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert ".venv/bin/python -m pip install -q -e '.[test]'" in bootstrap  # pytest and xdist come with it
    ci = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ["bash", "scripts/bootstrap.sh"] in ci
    readme_test = shlex.split(TEST_COMMAND.split("&&")[1])
    assert any(argv[:len(readme_test)] == readme_test for argv in ci), (ci, readme_test)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        name, n = slug(heading), 0
        while (name if n == 0 else f"{name}-{n}") in found:
            n += 1
        found.add(name if n == 0 else f"{name}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_every_relative_link_points_to_a_file_and_heading_that_exist():
    broken = []
    files = [README] + sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "CHANGELOG.md"]
    for path in files:
        for link in relative_links(path):
            target, _, anchor = link.partition("#")
            resolved = (path.parent / target).resolve() if target else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{path.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in relative_links(README)}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages and not [p.name for p in pages if p.resolve() not in linked]


def test_license_and_changelog():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 the lensunlearn authors" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", changelog, flags=re.M)
    assert headings[0] == "Unreleased" and "0.1.0" in " ".join(headings)


def test_architecture_page_names_every_module():
    """docs/architecture.md describes the package as it is: each subpackage's row names each of its modules."""
    import lensunlearn

    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)/` \|.*$", (ROOT / "docs" / "architecture.md")
                                                         .read_text(), flags=re.M)}
    package = Path(lensunlearn.__file__).parent
    missing = [f"{path.parent.name}/{path.name}" for path in sorted(package.glob("*/*.py"))
               if path.name != "__init__.py" and f"`{path.name}`" not in rows.get(path.parent.name, "")]
    assert not missing, f"docs/architecture.md does not describe {missing}"
