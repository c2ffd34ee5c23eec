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
import difflib
import importlib
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from .. import __version__
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
        value = command.old_presets.get(value, value)
        if value in command.presets:
            return value
    return None


def _preset_type(command: Command):
    """`--preset NAME`: a preset of `command`; a former name is taken with a line naming the new one."""
    def preset(text: str) -> str:
        if text in command.old_presets:
            sys.stderr.write(f"lensunlearn: --preset {text} is now --preset {command.old_presets[text]}; the old "
                             f"name goes in the next release\n")
            text = command.old_presets[text]
        if text not in command.presets:
            close = difflib.get_close_matches(text, list(command.presets), 1)
            raise argparse.ArgumentTypeError(f"choose from {', '.join(command.presets)}, got {text!r}"
                                             + (f" (did you mean {close[0]}?)" if close else ""))
        return text
    return preset


class UsageError(ConfigError):
    """A command line that cannot be read (an unknown flag, a value of the wrong kind, a missing value):
    one line, naming the flag and what it accepts, in place of argparse's usage block."""

    def __init__(self, prog: str, message: str) -> None:
        self.prog = prog
        super().__init__(message)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, _plain_usage_error(self, message))

    def parse_known_args(self, args=None, namespace=None):
        """A command's own parser refuses what it does not know itself, so the error names that command
        and its close matches (argparse would hand the words back up to `lensunlearn`)."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and "_command" in self._defaults:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _options_of(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


def _close_option(word: str, options: list[str]) -> str:
    """' (did you mean --x?)' for the closest option, or ''. The names are compared without their dashes,
    which every option shares and which would otherwise make a short unrelated name look close (--full and
    --lr)."""
    bare = {option.lstrip("-"): option for option in options}
    close = difflib.get_close_matches(word.lstrip("-"), list(bare), 1)
    return f" (did you mean {bare[close[0]]}?)" if close else ""


def _plain_usage_error(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's message, said plainly and with a close match where a name was mistyped."""
    help_hint = f"see {parser.prog} --help"
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        word = unknown.group(1)
        if not word.startswith("-"):
            return f"{word} is not an argument of {parser.prog}: {help_hint}"
        hint = _close_option(word.split("=")[0], _options_of(parser))
        return f"{word.split('=')[0]} is not an option of {parser.prog}{hint}: {help_hint}"
    choice = re.match(r"argument (COMMAND|SUBCOMMAND): invalid choice: '([^']*)'", message)
    if choice:
        names = _subcommands(parser)
        close = difflib.get_close_matches(choice.group(2), names, 1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{choice.group(2)} is not a command of {parser.prog}{hint}: choose from {', '.join(names)}"
    missing = re.match(r"argument (\S+?)(/\S+)?: expected one argument", message)
    if missing:
        return f"{missing.group(1)} needs a value: {help_hint}"
    required = re.match(r"the following arguments are required: (.*)", message)
    if required and required.group(1) in ("COMMAND", "SUBCOMMAND"):
        return f"{parser.prog} needs a command: {', '.join(_subcommands(parser))}"
    if required:
        return f"{parser.prog} needs {required.group(1)}: {help_hint}"
    argument = re.match(r"argument (\S+?)(/\S+)?: (.*)", message)
    if argument:
        return f"{argument.group(1)}: {argument.group(3)}"
    return message


def _usage(command: Command) -> str:
    """A short usage line (the groups below list every option): the positional argument, then [options]."""
    positional = [(f.metadata.get("positional_metavar", f.name.upper()), f.metadata.get("nargs", "?"))
                  for f in dataclasses.fields(command.config) if f.metadata.get("positional")]
    return " ".join(["%(prog)s", *(f"[{name} ...]" if nargs == "*" else f"[{name}]" for name, nargs in positional),
                     "[options]"])


def _flags_on_line(argv: Sequence[str]) -> dict[str, str]:
    """`--name value` and `--name=value` pairs of `argv`, as written (for what `--help` shows)."""
    argv = list(argv)
    flags = {}
    for index, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            flags[name] = value
        elif arg.startswith("--") and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            flags[arg[2:]] = argv[index + 1]
    return flags


def build_parser(commands: Sequence[Command], argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; `argv` (the command line) only picks the preset whose defaults `--help` shows."""
    parser = _Parser(prog="lensunlearn",
                     description="Unlearn knowledge through tuned lenses, evaluate it, and attack the result.",
                     epilog="`lensunlearn COMMAND --help` lists a command's options by group. An option left out "
                            "takes the default its help states; '' (or none) is the same as leaving it out, except "
                            "where the help says that '' means none.")
    parser.add_argument("--version", action="version", version=f"lensunlearn {__version__}")
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
        sub = target.add_parser(command.words[-1], help=command.help, description=command.help,
                                usage=_usage(command))
        shown = _preset_on_line(command, argv) or command.default_preset
        base = command.presets.get(shown) if shown else None
        if base is not None and command.adjust_preset is not None and argv and \
                all(word in argv for word in command.words):
            try:  # --help shows the preset as the line's flags make it (unlearn --objective NAME)
                base = command.adjust_preset(base, _flags_on_line(argv))
            except (TypeError, ValueError):
                pass  # a bad value is reported when the line is parsed
        if command.presets:
            sub.add_argument("--preset", type=_preset_type(command), default=command.default_preset,
                             metavar="{" + ",".join(command.presets) + "}",
                             help=f"{command.preset_help} (default: {command.default_preset})")
        add_config_args(sub, command.config, base)
        sub.set_defaults(_command=command)
    return parser


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _parse(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, Command, argparse.Namespace]:
    """Parse the command line (a usage error raises `UsageError`); `--debug` is taken out wherever it is."""
    argv = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--debug"]
    parser = build_parser(all_commands(), argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return parser, args._command, args


def _config(command: Command, args: argparse.Namespace) -> Any:
    base = command.presets.get(getattr(args, "preset", None)) if command.presets else None
    return config_from_args(command.config, args, base, command.derived, command.adjust_preset,
                            command.derived_optional)


def _prog(command: Command | None) -> str:
    return " ".join(("lensunlearn", *(command.words if command else ())))


def configure(argv: Sequence[str]) -> tuple[Command, Any]:
    """The command a command line names and its config; a bad option value raises `ConfigError`."""
    _, command, args = _parse(argv)
    return command, _config(command, args)


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of library callers and tests (`main([...])`): a command line that cannot be read and a
    bad option value print one line and exit 2 (as argparse does); other errors propagate as exceptions."""
    command: Command | None = None
    try:
        _, command, args = _parse(argv)
        config = _config(command, args)
    except ConfigError as err:
        sys.stderr.write(f"{_where(err, command)}: error: {describe(err)}\n")
        raise SystemExit(2) from None
    return command(config)


def _where(err: BaseException, command: Command | None) -> str:
    """The program an error line names: the (sub)command whose line could not be read, else the command."""
    return err.prog if isinstance(err, UsageError) else _prog(command)


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
        print(f"{_where(err, command)}: error: {describe(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(console())
