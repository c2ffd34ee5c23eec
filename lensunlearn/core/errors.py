"""Mistakes a user can make and fix, and readers that turn damaged input files into such mistakes.

The `lensunlearn` command prints an error of one of the `USER_ERRORS` types as one line that names
the problem and the fix, without a traceback; any other exception is a bug in lensunlearn and keeps
its traceback. Library callers get the exceptions themselves.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in what the user asked for or gave (a flag, a file, a machine); the message names the fix."""


class InputError(UserError, ValueError):
    """A malformed input file or row (invalid JSON, not UTF-8, a damaged torch file, a field of the wrong
    type); the message names the file and, where there is one, the line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying how to continue (`hint`), for a command that continues by being run again rather than
    with --resume (`search`, `demo`)."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


# Raised by our own checks (UserError, ConfigError) or by the standard library on user input: missing or
# clashing paths and unreadable files (OSError and its FileNotFoundError, FileExistsError, ...), malformed
# values and files (ValueError, with json.JSONDecodeError and UnicodeDecodeError), and rows lacking a field.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError, ValueError, KeyError)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`; a file in another encoding (or a binary file) is named in the error."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}): save it as UTF-8, "
                        f"or pass the right file") from err


def read_json(path: str | Path) -> Any:
    """A JSON file; a malformed one is named in the error with the line of the fault."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"{path} line {err.lineno}: invalid JSON ({err.msg}, column {err.colno}): fix or "
                        f"re-create the file") from err


def load_torch_file(path: str | Path, remake: str) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a truncated or foreign file names `remake`, the way to
    write it again, instead of torch's zip-reader message."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError) as err:
        # a file cut short raises RuntimeError or OSError (zip reader) or EOFError (empty); a text file KeyError
        raise InputError(f"{path} is truncated or not a torch file: {remake}") from err
