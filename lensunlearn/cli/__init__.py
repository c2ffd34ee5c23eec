"""The `lensunlearn` command: one subcommand per config dataclass.

Each module of `COMMAND_MODULES` (torch-free: configs, presets and the runners' names) exposes
`COMMANDS`, a list of `Command`s; `main(argv)` builds the parser from their configs, so `--help`
always shows every field with its default, and imports a command's code only to run it.

Exit status of the installed command (`console`): 0 on success; 2 when the command line is wrong
(argparse's usage errors and a `ConfigError`, a bad option value), found before anything runs;
1 when the run stops on a user's mistake (an error of `errors.USER_ERRORS`: a missing or damaged
file, a model or lens that does not fit, a device this machine lacks), printed as one line naming
the problem and the fix; 130 on Ctrl-C. `--debug` (anywhere on the line) or LENSUNLEARN_DEBUG=1
adds the traceback. Any other exception is a bug and prints its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..core.config import Command, ConfigError, add_config_args, config_from_args
from ..core.errors import USER_ERRORS, Interrupted, UserError

# The torch-free modules that declare the commands (their configs, and their runners by name), in the
# order of the data flow: building the parser imports these alone, so `--help` never imports torch.
COMMAND_MODULES = (
    "lensunlearn.lens.options",
    "lensunlearn.eval.options",
    "lensunlearn.unlearning.options",
    "lensunlearn.attack.options",
    "lensunlearn.search.options",
    "lensunlearn.report.command",
    "lensunlearn.demo.options",
)


def all_commands() -> list[Command]:
    commands: list[Command] = []
    for name in COMMAND_MODULES:
        commands.extend(importlib.import_module(name).COMMANDS)
    return commands


def _preset_on_line(command: Command, argv: Sequence[str] | None) -> str | None:
    """The preset `argv` names for `command` (`--preset small`, `--preset=small`), so that its `--help`
    shows that preset's defaults; None when there is none."""
    if not argv or not command.presets or not all(word in argv for word in command.words):
        return None
    argv = list(argv)
    for index, arg in enumerate(argv):
        value = argv[index + 1] if arg == "--preset" and index + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith("--preset=") else None
        if value in command.presets:
            return value
    return None


def build_parser(commands: Sequence[Command], argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; `argv` (the command line) only picks the preset whose defaults `--help` shows."""
    parser = argparse.ArgumentParser(
        prog="lensunlearn", description="Unlearn knowledge through tuned lenses, evaluate it, and attack the result.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also "
                                                               "LENSUNLEARN_DEBUG=1; accepted anywhere on the line)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in commands:
        target = subparsers
        if len(command.words) == 2:
            head = command.words[0]
            if head not in groups:
                group_parser = subparsers.add_parser(head, help=f"{head} subcommands")
                groups[head] = group_parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            target = groups[head]
        sub = target.add_parser(command.words[-1], help=command.help, description=command.help)
        shown = _preset_on_line(command, argv) or command.default_preset
        base = command.presets.get(shown) if shown else None
        if command.presets:
            sub.add_argument("--preset", choices=sorted(command.presets), default=command.default_preset,
                             help=f"named defaults that explicit flags override (default: {command.default_preset})")
        add_config_args(sub, command.config, base)
        sub.set_defaults(_command=command)
    return parser


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _parse(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, Command, argparse.Namespace]:
    """Parse the command line (argparse exits 2 on a usage error); `--debug` is taken out wherever it is."""
    argv = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--debug"]
    parser = build_parser(all_commands(), argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return parser, args._command, args


def _config(command: Command, args: argparse.Namespace) -> Any:
    base = command.presets.get(getattr(args, "preset", None)) if command.presets else None
    return config_from_args(command.config, args, base, command.derived)


def _prog(command: Command | None) -> str:
    return " ".join(("lensunlearn", *(command.words if command else ())))


def configure(argv: Sequence[str]) -> tuple[Command, Any]:
    """The command a command line names and its config; a bad option value raises `ConfigError`."""
    _, command, args = _parse(argv)
    return command, _config(command, args)


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of library callers and tests (`main([...])`): errors other than a bad option value
    (exit 2, as argparse) propagate as exceptions."""
    parser, command, args = _parse(argv)
    try:
        config = _config(command, args)
    except ConfigError as err:
        parser.exit(2, f"{_prog(command)}: error: {describe(err)}\n")
    return command(config)


def describe(err: BaseException) -> str:
    """An expected error as one line. Our messages name the file and the fix; the standard library's
    JSON, encoding and key errors do not name the file, so the line says where to look."""
    if isinstance(err, UserError) or not isinstance(err, (KeyError, json.JSONDecodeError, UnicodeDecodeError)):
        text = str(err) or type(err).__name__
    elif isinstance(err, json.JSONDecodeError):
        text = (f"an input file holds invalid JSON ({err.msg}, line {err.lineno} column {err.colno}): fix or re-create "
                f"it (--debug shows which file)")
    elif isinstance(err, UnicodeDecodeError):
        text = (f"an input file is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8 "
                "(--debug shows which)")
    else:
        text = f"missing field {err.args[0] if err.args else ''!r}: an input file or row lacks it (--debug shows where)"
    return " ".join(text.split())


def _debugging(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("LENSUNLEARN_DEBUG", "").lower() not in ("", "0", "false", "no")


def console(argv: Sequence[str] | None = None) -> int:
    """The installed `lensunlearn` command; returns the exit status (see the module docstring). What
    `main` returns (a run folder, a lens) is for library callers: `sys.exit` would print it and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debugging(argv)
    command: Command | None = None
    try:
        _, command, args = _parse(argv)
        command(_config(command, args))
    except KeyboardInterrupt as err:
        if debug:
            traceback.print_exc()
        resumable = command is not None and any(f.name == "resume" for f in dataclasses.fields(command.config))
        hint = f": {err.hint}" if isinstance(err, Interrupted) else \
            ": the run can continue from its last checkpoint: rerun the same command with --resume" if resumable else ""
        print(f"{_prog(command)}: interrupted{hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"{_prog(command)}: error: {describe(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(console())
