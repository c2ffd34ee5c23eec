"""Generate the CLI reference (docs/CLI.md) from the parser itself, so docs and `--help` agree.

Run `python -m lensunlearn.cli.reference > docs/CLI.md` after changing a config; a test fails
when the committed file and the generated text differ.
"""

from __future__ import annotations

import os

from ..cli import all_commands, build_parser


def _subparser(parser, words):
    for word in words:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[word]
    return parser


def cli_reference() -> str:
    """Markdown with the `--help` text of every subcommand, in data-flow order."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for stable output
    commands = all_commands()
    parser = build_parser(commands)
    parts = ["# lensunlearn command reference", "",
             "Generated from the parser by `python -m lensunlearn.cli.reference`; a test keeps it in sync.", ""]
    for command in commands:
        name = " ".join(command.words)
        help_text = _subparser(parser, command.words).format_help().rstrip()
        parts += [f"## lensunlearn {name}", "", "```text", help_text, "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(cli_reference(), end="")
