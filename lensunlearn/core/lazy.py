"""Lazy attribute access for packages whose names live in submodules that import torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any


def attributes_from(package: str, submodules: Sequence[str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that finds a name in the first of `submodules` holding it,
    importing them in order only when a name is asked for: list the torch-free one first, so that
    `package.SomeConfig` does not import torch."""

    def __getattr__(name: str) -> Any:
        for module in submodules:
            loaded = importlib.import_module(f"{package}.{module}")
            if hasattr(loaded, name):
                return getattr(loaded, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
