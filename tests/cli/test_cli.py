"""The command line: every subcommand documents every flag with its default."""

from __future__ import annotations

import dataclasses

import pytest

from lensunlearn.cli import all_commands, build_parser, main
from lensunlearn.cli.reference import _subparser


def test_help_documents_every_field_with_default():
    commands = all_commands()
    assert {c.words for c in commands} == {("lens", "train"), ("lens", "eval"), ("eval",), ("unlearn",), ("distill",),
                                           ("tamper",), ("robustness",), ("search",), ("report",), ("demo",)}
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

    from lensunlearn.cli.reference import cli_reference

    committed = Path(__file__).resolve().parents[2] / "docs" / "CLI.md"
    assert committed.read_text() == cli_reference(), \
        "docs/CLI.md is stale: run `python -m lensunlearn.cli.reference > docs/CLI.md`"


def _flags(command) -> tuple[dict[str, object], dict[str, str]]:
    """({visible flag name: its field}, {old spelling: the field it now sets}) of one command."""
    visible, old = {}, {}
    for field in dataclasses.fields(command.config):
        if field.metadata.get("cli") is False or field.metadata.get("positional"):
            continue
        visible[field.name] = field
        for name in field.metadata.get("old_names", ()):
            old[name] = field.name
    return visible, old


@pytest.mark.parametrize("words", [c.words for c in all_commands()], ids=lambda w: " ".join(w))
def test_every_command_help_runs(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    assert "--help" in capsys.readouterr().out


def test_one_flag_name_per_concept():
    """A concept has one flag name in every command; renamed flags keep their old spelling hidden.

    Every old spelling is declared on the field it now sets (`old_names`), so a command that still
    showed one (say `--heldout` beside another command's `--holdout`) fails here. Two old spellings
    stay visible elsewhere because they name another concept there: `--batch` (examples per
    optimiser step in the training commands; lens eval's old name for its evaluation batch) and
    `--limit` (documents of the lens corpus; eval's old name for questions per task).
    """
    commands = all_commands()
    parser = build_parser(commands)
    visible_anywhere: dict[str, set[str]] = {}
    retired: dict[str, str] = {}
    for command in commands:
        visible, old = _flags(command)
        help_text = _subparser(parser, command.words).format_help()
        for name in visible:
            visible_anywhere.setdefault(name, set()).add(" ".join(command.words))
        for name, new in old.items():
            assert f"--{name} " not in help_text and f"--{name}\n" not in help_text, (command.words, name)
            assert name not in visible, (command.words, name)
            retired[name] = new
    assert set(retired) == {"heldout", "batch_size", "tasks", "format", "limit", "batch", "lora", "rank", "original",
                            "retain_domains"}
    assert {name for name in retired if name in visible_anywhere} == {"batch", "limit"}
    # the pairs, resolved: one name each, wherever the concept appears
    for name, commands_using in (("holdout", {"lens train", "lens eval", "tamper", "robustness", "demo"}),
                                 ("eval_batch", {"lens eval", "eval", "unlearn", "distill", "tamper", "robustness",
                                                 "demo"}),
                                 ("eval_format", {"eval", "unlearn", "distill", "tamper", "robustness"}),
                                 ("full", {"unlearn", "tamper"}), ("lora_rank", {"unlearn", "tamper", "robustness"})):
        assert visible_anywhere[name] == commands_using, name


@pytest.mark.parametrize("argv,field,value", [
    (["lens", "train", "--heldout", "0.2"], "holdout", 0.2),
    (["lens", "eval", "--lens", "x", "--batch", "3"], "eval_batch", 3),
    (["eval", "--batch_size", "3"], "eval_batch", 3),
    (["eval", "--format", "cloze"], "eval_format", "cloze"),
    (["eval", "--tasks", "a.jsonl,mmlu"], "eval_tasks", ("a.jsonl", "mmlu")),
    (["eval", "--limit", "5"], "eval_limit", 5),
    (["tamper", "--lora"], "full", False),
    (["tamper", "--no-lora"], "full", True),
    (["tamper", "--rank", "4"], "lora_rank", 4),
    (["tamper", "--original", "base.json"], "baseline", "base.json"),
    (["report", "run", "--format", "csv"], "table_format", "csv"),
])
def test_old_flag_spellings_still_work(argv, field, value, capsys):
    from lensunlearn.core.config import config_from_args

    args = build_parser(all_commands()).parse_args(argv)
    assert getattr(config_from_args(args._command.config, args), field) == value
    assert "next release" in capsys.readouterr().err  # the user is told the new name


def test_list_options_strip_spaces_around_their_items():
    from lensunlearn.attack.protocol import RobustnessConfig
    from lensunlearn.core.config import config_from_args, parse_str_list

    assert parse_str_list(" full, lora ,,") == ("full", "lora") == parse_str_list(["full ", "", " lora"])
    config = RobustnessConfig(run_dir="run", kinds="full, lora", schedules=" constant", phrasings="qa ,")
    assert (config.kinds, config.schedules, config.phrasings) == (("full", "lora"), ("constant",), ("qa",))
    args = build_parser(all_commands()).parse_args(["demo", "--kept_domains", "element_symbol, us_state_capital"])
    assert config_from_args(args._command.config, args).kept_domains == ("element_symbol", "us_state_capital")
