"""The command line: every subcommand documents every flag with its default."""

from __future__ import annotations

import dataclasses

import pytest

from lensunlearn.cli import all_commands, build_parser, main
from lensunlearn.cli.reference import _subparser
from lensunlearn.core.config import GROUPS

# Options without a default, which the command refuses to run without (the help says "required").
REQUIRED = {("lens", "eval"): {"lens"}, ("distill",): {"run"}, ("robustness",): {"run"}, ("report",): {"runs"},
            ("search",): {"grid"}, ("locate",): {"eval_tasks", "out"}}


def test_help_documents_every_field_with_default():
    commands = all_commands()
    assert {c.words for c in commands} == {("lens", "train"), ("lens", "eval"), ("eval",), ("unlearn",), ("distill",),
                                           ("tamper",), ("robustness",), ("search",), ("report",), ("demo",),
                                           ("locate",)}
    parser = build_parser(commands)
    for command in commands:
        text = _subparser(parser, command.words).format_help()
        fields = [f for f in dataclasses.fields(command.config) if f.metadata.get("cli") is not False]
        for field in fields:
            flag = field.metadata.get("positional_metavar", field.name.upper()) if field.metadata.get("positional") \
                else f"--{field.name}"
            assert flag in text, (command.words, field.name)
        assert text.count("(default:") >= len(fields) - len(REQUIRED.get(command.words, ())), command.words


def test_help_says_in_words_what_a_missing_default_means():
    """No help shows a Python value for "not given" (None, an empty string or list): it says what happens
    ("from the run", "all", "none: ..."), and every such option says it, except the required ones."""
    parser = build_parser(all_commands())
    for command in all_commands():
        text = " ".join(_subparser(parser, command.words).format_help().split())
        assert "(default: None)" not in text and "(default: )" not in text, command.words
        assert "None" not in text, (command.words, text[max(0, text.find("None") - 80):text.find("None") + 20])
        for field in dataclasses.fields(command.config):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if default in (None, "", ()) and field.name not in REQUIRED.get(command.words, ()):
                assert field.metadata.get("default_text"), (command.words, field.name)


def test_help_shows_the_option_groups(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["options", "model", "data", "objective", "optimisation", "LoRA", "robust update",
                        "evaluation", "tracking", "run"]
    assert text.startswith("usage: lensunlearn unlearn [options]\n")
    for command in all_commands():  # every option of every command sits in a group the command shows
        for field in dataclasses.fields(command.config):
            assert field.metadata.get("group", "run") in GROUPS, (command.words, field.name)


def test_version(capsys):
    import lensunlearn

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"lensunlearn {lensunlearn.__version__}\n"


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
        if field.metadata.get("cli") is False or field.metadata.get("nargs") == "*":  # report's folders: no flag
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
    `--examples` (forget/retain pairs per epoch of unlearn, an epoch's size; tamper's old name for
    the attack chunks kept, a document count).
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
                            "retain_domains", "data", "data_config", "split", "column", "max_docs", "max_documents",
                            "examples", "remove_coef", "robustness_args", "tamper_examples", "run_dir"}
    assert {name for name in retired if name in visible_anywhere} == {"batch", "examples"}
    # concepts that once had several flag names: one name each, wherever the concept appears
    for name, commands_using in (("holdout", {"lens train", "lens eval", "tamper", "robustness", "demo"}),
                                 ("eval_batch", {"lens eval", "eval", "unlearn", "distill", "tamper", "robustness",
                                                 "demo"}),
                                 ("eval_format", {"eval", "unlearn", "distill", "tamper", "robustness"}),
                                 ("full", {"unlearn", "tamper"}), ("lora_rank", {"unlearn", "tamper", "robustness"}),
                                 ("corpus", {"lens train", "lens eval", "distill"}),
                                 ("corpus_limit", {"lens train", "lens eval", "distill"}),
                                 ("eval_limit", {"lens eval", "eval", "unlearn", "distill", "tamper"}),
                                 ("run", {"distill", "tamper", "robustness"}), ("forget_coef", {"unlearn"})):
        assert visible_anywhere[name] == commands_using, name
    for role in ("corpus", "forget", "retain"):  # every corpus: --<role>, --<role>_config, _split, _column, _limit
        for suffix in ("_config", "_column"):
            assert f"{role}{suffix}" in visible_anywhere, role + suffix


# What a command needs on its line besides the flag under test, and values the config accepts.
_NEEDS = {("lens", "eval"): ["--lens", "x"], ("distill",): ["--run", "x"], ("robustness",): ["x"], ("report",): ["r"],
          ("search",): ["--grid", "lr=1e-3", "--unlearn", "--eval_tasks a.jsonl"]}
_VALUES = {"retain_domains": "element_symbol", "robustness_args": "--seeds 0", "heldout": "0.25"}
_EXTRA = {"robustness_args": ["--measure", "robustness"], "run_dir": []}


def _old_spellings() -> list:
    """(argv, field, value, new flag) for every old spelling of every command, built from the configs."""
    import typing

    from lensunlearn.core.config import _base_type, _converter

    cases = []
    for command in all_commands():
        hints = typing.get_type_hints(command.config)
        for field in dataclasses.fields(command.config):
            old_names = field.metadata.get("old_names", ())
            needs = [] if field.metadata.get("positional") else _NEEDS.get(command.words, [])
            for old in old_names:
                base, _ = _base_type(hints[field.name])
                if base is bool:
                    for flag, value in ((old, old_names[old]), (f"no-{old}", not old_names[old])):
                        new = field.name if value else f"no-{field.name}"
                        cases.append(pytest.param([*command.words, *needs, f"--{flag}"], field.name, value, f"--{new}",
                                                  id=f"{' '.join(command.words)} --{flag}"))
                    continue
                choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else ()
                text = _VALUES.get(old, choices[-1] if choices else {int: "3", float: "0.5"}.get(base, "x"))
                value = _converter(hints[field.name], field.metadata)(text)
                if field.name == "robustness":
                    value = text
                argv = [*command.words, *needs, *_EXTRA.get(old, []), f"--{old}", text]
                cases.append(pytest.param(argv, field.name, value, f"--{field.name}",
                                          id=f"{' '.join(command.words)} --{old}"))
    return cases


@pytest.mark.parametrize("argv,field,value,new", _old_spellings())
def test_old_flag_spellings_still_work(argv, field, value, new, capsys):
    from lensunlearn.cli import configure

    _, config = configure(argv)
    assert getattr(config, field) == value
    err = capsys.readouterr().err
    assert f"is now {new};" in err and len(err.splitlines()) == 1  # one line tells the user the new name


def test_every_old_spelling_is_covered():
    names = {p.id.split(" --")[-1] for p in _old_spellings()}
    assert {"data", "data_config", "split", "column", "limit", "max_docs", "max_documents", "examples",
            "remove_coef", "robustness_args", "tamper_examples", "run_dir", "lora", "no-lora"} <= names


def test_old_preset_and_grid_names_and_run_folders_given_as_model(tmp_path, capsys):
    from lensunlearn.cli import configure
    from lensunlearn.unlearning.options import REFERENCE

    _, config = configure(["unlearn", "--preset", "seed"])
    assert config == REFERENCE
    from lensunlearn import REFERENCE as exported
    from lensunlearn.unlearning.run import SEED, UnlearnConfig

    assert exported is REFERENCE is SEED and REFERENCE == UnlearnConfig()
    assert capsys.readouterr().err == ("lensunlearn: --preset seed is now --preset reference; the old name goes in "
                                       "the next release\n")
    _, search = configure(["search", "--preset", "seed", "--grid", "remove_coef=5,10", "--unlearn",
                           "--eval_tasks a.jsonl"])
    assert search.preset == "reference" and [p.name for p in search.plan.points] == ["forget_coef5", "forget_coef10"]
    assert search.plan.points[1].config.forget_coef == 10.0
    err = capsys.readouterr().err.splitlines()
    assert err == ["lensunlearn: the value seed is now reference; the old name goes in the next release",
                   "lensunlearn: --grid remove_coef is now --grid forget_coef; the old name goes in the next release"]
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    _, tamper = configure(["tamper", "--model", str(run)])
    assert (tamper.run, tamper.model, tamper.attacked) == (str(run), None, str(run))
    assert capsys.readouterr().err == (f"lensunlearn: tamper --model {run} names an unlearning run: that is now --run "
                                       f"{run}; the old spelling goes in the next release\n")
    _, robustness = configure(["robustness", "--run", str(run)])
    assert robustness.run == str(run) == configure(["robustness", str(run)])[1].run


def test_list_options_strip_spaces_around_their_items():
    from lensunlearn.attack.protocol import RobustnessConfig
    from lensunlearn.core.config import config_from_args, parse_str_list

    assert parse_str_list(" full, lora ,,") == ("full", "lora") == parse_str_list(["full ", "", " lora"])
    config = RobustnessConfig(run="run", kinds="full, lora", schedules=" constant", phrasings="qa ,")
    assert (config.kinds, config.schedules, config.phrasings) == (("full", "lora"), ("constant",), ("qa",))
    args = build_parser(all_commands()).parse_args(["demo", "--kept_domains", "element_symbol, us_state_capital"])
    assert config_from_args(args._command.config, args).kept_domains == ("element_symbol", "us_state_capital")
