"""`lensunlearn demo`: the whole loop on the embedded model, with nothing to download.

Stages: fact benchmark -> lens -> base evaluation (with knowledge profile) -> unlearning
(`--preset robust` stopping at its general-text loss budget, retaining on the preset's everyday
text) -> evaluation after unlearning ->
held-out relearning attack with the strongest setting the robustness protocol found -> report. Each stage
writes its output atomically. The folder keeps the demo's flags and the stages finished with them
(`layout.DEMO_STATE_FILE`): a rerun with the same flags skips those stages and continues an interrupted
one from its checkpoint; a rerun with other flags is refused (they would mix results of two
settings) unless `--overwrite` asks to run every stage again, each stage's old output being
replaced only once its new one is complete.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """`lensunlearn.demo.X` as before the package was split: the options first (no torch), else the runner."""
    for module in ("options", "run"):
        loaded = importlib.import_module(f"{__name__}.{module}")
        if hasattr(loaded, name):
            return getattr(loaded, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
