"""The README's and docs' commands, exactly as written (paths included), parse into valid configs and chain.

Every `lensunlearn ...` line of the bash blocks of README.md and docs/*.md goes through the real command line
(`cli.main`) up to the point where compute would start: the command's runner is replaced by one
that records the config it was given. That catches a renamed or removed flag, a value the config
refuses, and a path that one command writes and the next one reads under another name (the
README's `unlearn --lens` once named a folder that `lens train` never wrote).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lensunlearn import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# A synopsis line shows placeholders (RUN_DIR, CORPUS, ...) rather than values: it is not a command.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(,[A-Z0-9_]+)*$")


def readme_commands(path: Path = README) -> list[list[str]]:
    """argv (after `lensunlearn`) of every command line in the bash blocks of `path`, with shell
    variables set earlier in the same block substituted."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            words = shlex.split(re.sub(r"\$(\w+)", lambda m, v=variables: v.get(m.group(1), m.group(0)), line))
            for i, word in enumerate(words):
                if word.endswith("lensunlearn") and (i == 0 or words[i - 1] in ("-m", "&&")):
                    argv = words[i + 1:]
                    argv = argv[:argv.index("&&")] if "&&" in argv else argv
                    if not any(PLACEHOLDER.match(w) for w in argv):
                        commands.append(argv)
                    break
    return commands


@pytest.fixture
def recorded(monkeypatch):
    """Run README lines through `cli.main`, recording each command's config instead of running it."""
    configs: dict[str, list] = {}
    for command in cli.all_commands():
        name = " ".join(command.words)
        monkeypatch.setattr(command, "run", lambda cfg, name=name: configs.setdefault(name, []).append(cfg))
    for argv in readme_commands():
        cli.main(argv)
    return configs


def test_readme_has_the_commands_it_documents():
    names = {" ".join(argv[:2]) if argv[0] == "lens" else argv[0] for argv in readme_commands()}
    assert {"demo", "lens train", "unlearn", "eval", "tamper", "report"} <= names


def test_every_readme_command_parses_into_a_valid_config(recorded):
    assert sum(map(len, recorded.values())) == len(readme_commands())


def test_readme_lens_is_the_one_lens_train_writes(recorded):
    lens_out = recorded["lens train"][0].out
    small = [cfg for cfg in recorded["unlearn"] if cfg.forget.startswith("facts:")]
    assert small, "the README's small-preset unlearning command is missing"
    assert all(Path(cfg.lens) == Path(lens_out) for cfg in small)


def test_readme_reference_experiment_paths_chain(recorded):
    base_eval = Path(recorded["eval"][0].out)
    seed = next(cfg for cfg in recorded["unlearn"] if not cfg.forget.startswith("facts:"))
    run_dir = Path(seed.out) / seed.name
    tamper = recorded["tamper"][0]
    report = recorded["report"][0]
    assert Path(tamper.run) == run_dir
    assert Path(tamper.baseline) == base_eval == Path(report.baseline)
    assert [Path(r) for r in report.runs] == [run_dir]
    assert [Path(t) for t in report.tamper] == [Path(tamper.out)]


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documented_commands_use_the_current_flag_names(path, monkeypatch, capsys):
    """A command in the README or docs/ that spells a flag (or a preset, or a grid key) as an earlier
    version did still runs, printing its new name on stderr: that line fails here, naming the command."""
    for command in cli.all_commands():
        monkeypatch.setattr(command, "run", lambda cfg: None)
    old = []
    for argv in readme_commands(path):
        cli.main(argv)
        err = capsys.readouterr().err
        if " is now " in err or "now --run" in err:
            old.append(f"lensunlearn {shlex.join(argv)}: {err.strip()}")
    assert old == []
