"""Property test of every command's parser: random values for random flags, and random junk words, through
the installed entry point `lensunlearn.cli.console` in this process. Nothing runs (each command's runner is
replaced by one that raises `Reached`), so each line either parses into a valid config or is refused with
exactly one line on stderr and exit status 2: never a traceback, never a usage block."""

from __future__ import annotations

import argparse
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensunlearn.cli import all_commands, build_parser, console
from lensunlearn.cli.reference import _subparser

COMMANDS = {" ".join(c.words): c for c in all_commands()}
PARSER = build_parser(list(COMMANDS.values()))
# Values that reach past the type check into each config's own checks, beside random text.
PLAIN = ["", "none", "0", "1", "-1", "3", "0.5", "1.5", "-0.5", "nan", "inf", "1e-3", "1e9", "a", "x,y", "1,2",
         "0,0", " 1, 2 ", "facts:country_capital", "generic:retain", "runs", "lr=1e-3", "lr=1e-3,1e-2", "k=",
         "--seeds 0", "--lr", "é", "a b"]


class Reached(Exception):
    """The command line parsed into a config: the command would run now."""


def _options(words: tuple[str, ...]) -> list[tuple[str, int, list[str]]]:
    """(flag, number of values, its choices) of every visible option of a command, `--help` aside."""
    found = []
    for action in _subparser(PARSER, words)._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        choices = re.findall(r"[\w.-]+", action.metavar) if isinstance(action.metavar, str) and \
            action.metavar.startswith("{") else []
        found.append((action.option_strings[0], 0 if action.nargs == 0 else 1, choices))
        if len(action.option_strings) > 1 and action.nargs == 0:  # --no-flag of a switch
            found.append((action.option_strings[1], 0, []))
    return found


def _junk() -> st.SearchStrategy[str]:
    words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
    # -h / --help and --version are not errors, and -v only changes logging
    return words.filter(lambda w: not re.match(r"^-(h|-h|-v|v$)", w))


def _lines(words: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    options = _options(words)

    @st.composite
    def line(draw) -> list[str]:
        argv = list(words)
        for _ in range(draw(st.integers(0, 5))):
            if draw(st.integers(0, 9)) == 0:
                argv.append(draw(_junk()))
                continue
            flag, nargs, choices = draw(st.sampled_from(options))
            argv.append(flag)
            if nargs:
                argv.append(draw(st.one_of(st.sampled_from(PLAIN + choices), _junk())))
        return argv

    return line()


@pytest.fixture
def nothing_runs(monkeypatch):
    def reached(config):
        raise Reached

    for command in COMMANDS.values():
        monkeypatch.setattr(command, "run", reached)


@pytest.mark.parametrize("name", COMMANDS)
def test_any_command_line_parses_or_is_refused_in_one_line(name, nothing_runs, capsys):
    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(_lines(COMMANDS[name].words))
    def check(argv: list[str]) -> None:
        capsys.readouterr()
        try:
            status = console(argv)
        except Reached:
            return
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2, (argv, err)
        assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, (argv, err)
        assert lines[0].startswith("lensunlearn"), (argv, err)

    check()
