"""The one table writer: markdown and csv tables, and the formats of the numbers in their cells.

Every table the package prints or writes (`report`, `robustness.md`, `search.md`, evaluation,
fluency, the knowledge profile, the lens table) goes through `markdown_table`, and its numbers
through the formatters below, so a percentage or a missing number reads the same everywhere:

* `percent(0.1234)` -> `12.3`; `percent(0.1234, 2, unit="%")` -> `12.34%`; with `sd=` -> `12.3 ± 0.5`;
* `number(1.23456, 4)` -> `1.2346`; `plain(5.0)` -> `5.0`, `plain(32)` -> `32`, `plain(1.191)` -> `1.19`;
* `learning_rate(2e-5)` -> `2e-5`; `points(0.2679)` -> `+26.79 pts`;
* a number that is not there is `-` (not measured) or `pending` (not written yet), as the caller says.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MISSING = "-"  # a number the run did not measure (or that does not apply)
PENDING = "pending"  # a number a run in progress has not written yet


def is_number(value: Any) -> bool:
    """A real number (a bool is not one, though Python says it is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell(value: Any) -> str:
    """Text that keeps a markdown table row on one line and in its columns."""
    text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n").replace("\r", "\\r")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | Sequence[str] = "") -> str:
    """A markdown table. `align` holds one letter per column, `l` (the default) or `r` (numbers); a
    shorter `align` leaves the remaining columns left-aligned."""
    marks = ["---:" if k < len(align) and align[k] == "r" else "---" for k in range(len(header))]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_table(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    """A csv table of `fields` (a row lacking one leaves its cell empty), `\\n` line ends."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in fields} for row in rows)
    return buffer.getvalue()


# --- numbers -------------------------------------------------------------------------------------


def percent(value: Any, digits: int = 1, *, sd: Any = None, unit: str = "", missing: str = MISSING) -> str:
    """A fraction in percent with `digits` decimals (`unit` after it), `± sd` when a spread is given."""
    if not is_number(value):
        return missing
    return f"{100 * value:.{digits}f}{unit}" + (f" ± {100 * sd:.{digits}f}" if is_number(sd) else "")


def points(value: Any, digits: int = 2, missing: str = MISSING) -> str:
    """A difference of two fractions in signed percentage points: `+26.79 pts`."""
    return f"{100 * value:+.{digits}f} pts" if is_number(value) else missing


def number(value: Any, digits: int = 2, missing: str = MISSING) -> str:
    """A number with a fixed count of decimals."""
    return f"{value:.{digits}f}" if is_number(value) else missing


def plain(value: Any, missing: str = PENDING) -> str:
    """Integers as integers, whole floats with one decimal (5.0), others with two (1.19); text as it is."""
    if value is None:
        return missing
    if isinstance(value, (bool, str, int)):
        return str(value)
    return f"{value:.1f}" if float(value).is_integer() else f"{value:.2f}"


def learning_rate(value: Any, missing: str = PENDING) -> str:
    """Small learning rates in short scientific notation: 1e-3, 2e-5, 1.5e-4 (0.02 stays 0.02)."""
    if not is_number(value) or not 0 < abs(value) < 1e-2:
        return plain(value, missing) if not isinstance(value, float) else f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
