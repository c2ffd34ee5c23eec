"""Atomic writes: every file the package writes goes through `atomic_path`.

A file is written under a temporary name in its own folder and renamed into place, so a reader
(a rerun, `report`, a user) sees the old file or the new one, never half of one, even when the
writer is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, rename it to `path`.

    The temporary name keeps the suffix (`.x.tmp12.png`), because some writers (matplotlib) pick
    the file type from it. On an error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (ending in a newline) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text if text.endswith("\n") or not text else text + "\n")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (values JSON cannot hold are written as strings)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write one JSON object per line atomically (non-ASCII text kept as is)."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_figure_atomic(fig, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure at its own size and `dpi` atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
