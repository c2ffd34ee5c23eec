"""The commands of the README and of docs/, exactly as written (paths included), parse into valid
configs and chain.

Every `lensunlearn ...` line of the bash blocks of README.md and docs/*.md goes through the real
command line (`cli.configure`: the parser, the preset and the config's own checks) up to the point
where compute would start. That catches a renamed or removed flag, a value the config refuses, and a
path that one command writes and the next one reads under another name (a README's `unlearn --lens`
that names a folder `lens train` never writes).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lensunlearn import cli
from lensunlearn.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# docs/CLI.md is the parser's own output (usage lines, not commands to run).
DOCS = [README] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "CLI.md"]
# A synopsis line shows placeholders (RUN_DIR, CORPUS, ...) rather than values: it is not a command.
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(,[A-Z0-9_]+)*$")
EVERY_COMMAND = {"lens train", "lens eval", "eval", "locate", "unlearn", "distill", "tamper", "robustness", "search",
                 "report", "demo"}


@dataclass
class Line:
    path: Path
    block: int  # the bash block's index in its file
    argv: list[str]  # after `lensunlearn`

    @property
    def name(self) -> str:
        return " ".join(self.argv[:2]) if self.argv[0] == "lens" else self.argv[0]


def doc_commands(paths=tuple(DOCS)) -> list[Line]:
    """Every command line in the bash blocks of `paths`, with shell variables set earlier in the same
    block substituted."""
    commands = []
    for path in paths:
        for block_no, block in enumerate(re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)):
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
                        if argv and not any(PLACEHOLDER.match(w) for w in argv):
                            commands.append(Line(path, block_no, argv))
                        break
    return commands


def readme_commands() -> list[list[str]]:
    return [line.argv for line in doc_commands([README])]


@pytest.fixture
def recorded() -> list[tuple[Line, object]]:
    """Every README and docs line as the command line parses it into its command's config (nothing
    runs), in document order."""
    out = []
    for line in doc_commands():
        where = f"{line.path.name}: `lensunlearn {' '.join(line.argv)}`"
        try:
            command, config = cli.configure(line.argv)
        except SystemExit as exit_:
            raise AssertionError(f"{where} exits {exit_.code}") from None
        except ConfigError as err:
            raise AssertionError(f"{where} is refused: {err}") from None
        assert command.words == tuple(line.name.split()), where
        out.append((line, config))
    return out


def configs_of(recorded, name: str, path: Path | None = None) -> list:
    return [cfg for line, cfg in recorded if line.name == name and (path is None or line.path == path)]


def test_readme_has_the_commands_it_documents():
    names = {line.name for line in doc_commands([README])}
    assert {"demo", "lens train", "unlearn", "eval", "tamper", "robustness", "report"} <= names


def test_the_docs_show_every_command():
    assert EVERY_COMMAND <= {line.name for line in doc_commands()}


def test_every_readme_and_docs_command_parses_into_a_valid_config(recorded):
    assert len(recorded) == len(doc_commands()) > 0


def test_readme_lens_is_the_one_lens_train_writes(recorded):
    lens_out = configs_of(recorded, "lens train", README)[0].out
    small = [cfg for cfg in configs_of(recorded, "unlearn", README)
             if cfg.forget.startswith("facts:") and cfg.objective == "lens"]
    assert small, "the README's unlearning command on the fact benchmark is missing"
    assert all(Path(cfg.lens) == Path(lens_out) for cfg in small)  # the baselines read no lens


def test_every_local_lens_the_docs_read_is_one_lens_train_writes(recorded):
    """A lens folder named in any command is written by a `lens train` line of the docs (a hub id is not
    a local folder and is left out)."""
    from lensunlearn.lens.tuned_lens import default_lens_path

    written = {Path(cfg.out) if cfg.out else Path(default_lens_path(cfg.model))
               for cfg in configs_of(recorded, "lens train")}
    read = {Path(cfg.lens) for _, cfg in recorded if isinstance(getattr(cfg, "lens", None), str)
            and cfg.lens.startswith("runs/")}
    assert read and read <= written, read - written


def test_readme_reference_experiment_paths_chain(recorded):
    """The reference experiment's block: its baseline evaluation, unlearning run, attack and report
    name the same files."""
    block = next(line.block for line, cfg in recorded if line.path == README and line.name == "unlearn"
                 and not cfg.forget.startswith("facts:"))
    chain = [(line, cfg) for line, cfg in recorded if line.path == README and line.block == block]
    by_name = {line.name: cfg for line, cfg in chain}
    assert {"eval", "unlearn", "tamper", "report"} <= set(by_name), [line.name for line, _ in chain]
    base_eval = Path(by_name["eval"].out)
    unlearn = by_name["unlearn"]
    run_dir = Path(unlearn.out) / unlearn.name
    tamper, report = by_name["tamper"], by_name["report"]
    assert Path(tamper.run) == run_dir
    assert Path(tamper.baseline) == base_eval == Path(report.baseline)
    assert [Path(r) for r in report.runs] == [run_dir]
    assert [Path(t) for t in report.tamper] == [Path(tamper.out)]



@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documented_commands_use_the_current_flag_names(path, monkeypatch, capsys):
    """A command in the README or docs/ that spells a flag (or a preset, or a grid key) as an earlier
    version did still runs, printing its new name on stderr: that line fails here, naming the command."""
    for command in cli.all_commands():
        monkeypatch.setattr(command, "run", lambda cfg: None)
    old = []
    for line in doc_commands([path]):
        cli.main(line.argv)
        err = capsys.readouterr().err
        if " is now " in err or "now --run" in err:
            old.append(f"lensunlearn {shlex.join(line.argv)}: {err.strip()}")
    assert old == []
