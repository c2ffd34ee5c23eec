"""The command line: every subcommand documents every flag with its default."""

from __future__ import annotations

import dataclasses

import pytest

from lensunlearn.cli import all_commands, build_parser, main
from lensunlearn.cli_reference import _subparser


def test_help_documents_every_field_with_default():
    commands = all_commands()
    assert {c.words for c in commands} == {("lens", "train"), ("lens", "eval"), ("eval",), ("unlearn",), ("tamper",),
                                           ("report",), ("demo",)}
    parser = build_parser(commands)
    for command in commands:
        text = _subparser(parser, command.words).format_help()
        for field in dataclasses.fields(command.config):
            if field.metadata.get("cli") is False:
                continue
            flag = field.name.upper() if field.metadata.get("positional") else f"--{field.name}"
            assert flag in text, (command.words, field.name)
        assert text.count("(default:") >= len(dataclasses.fields(command.config)) - 1, command.words


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lens", "train", "--help"])
    assert exit_info.value.code == 0
    assert "--max_length" in capsys.readouterr().out


def test_cli_reference_is_in_sync():
    from pathlib import Path

    from lensunlearn.cli_reference import cli_reference

    committed = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"
    assert committed.read_text() == cli_reference(), \
        "docs/CLI.md is stale: run `python -m lensunlearn.cli_reference > docs/CLI.md`"
