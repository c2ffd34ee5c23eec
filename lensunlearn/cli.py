"""The `lensunlearn` command: one subcommand per config dataclass.

Each command module exposes `COMMANDS`, a list of `Command`s; `main(argv)` builds the parser
from their configs, so `--help` always shows every field with its default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import ConfigError, add_config_args, config_from_args

# Modules that define commands, in the order of the data flow.
COMMAND_MODULES = (
    "lensunlearn.lens_train",
    "lensunlearn.evaluate",
    "lensunlearn.unlearn",
    "lensunlearn.tamper",
    "lensunlearn.report",
    "lensunlearn.demo",
)


@dataclass
class Command:
    """A subcommand: its words (`("lens", "train")`), config class, runner and named presets."""

    words: tuple[str, ...]
    help: str
    config: type
    run: Callable[[Any], Any]
    presets: dict[str, Any] = field(default_factory=dict)
    default_preset: str | None = None


def all_commands() -> list[Command]:
    commands: list[Command] = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a command not built yet
                continue
            raise
        commands.extend(module.COMMANDS)
    return commands


def build_parser(commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensunlearn", description="Unlearn knowledge through tuned lenses, evaluate it, and attack the result.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
        base = command.presets.get(command.default_preset) if command.default_preset else None
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


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the `lensunlearn` command (and of tests, through `main([...])`)."""
    commands = all_commands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    command: Command = args._command
    base = command.presets.get(getattr(args, "preset", None)) if command.presets else None
    try:
        config = config_from_args(command.config, args, base)
    except ConfigError as err:
        parser.exit(2, f"lensunlearn {' '.join(command.words)}: error: {err}\n")
    return command.run(config)


def console() -> int:
    """The installed `lensunlearn` command. It exits 0 on success: what `main` returns (a run folder,
    a lens) is for library callers, and `sys.exit` would print it and exit 1."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(console())
