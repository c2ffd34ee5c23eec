"""lensunlearn: unlearn knowledge from a language model through its tuned lenses.

The public names below load on first use, so `import lensunlearn` (and the command line's `--help`)
does not import torch. The subpackages, in the order the data flows through them: `core` (configs,
errors, files, output folders), `data` (corpora, facts, tasks), `modeling` (loading, layers,
losses), `train` (loop, optimisers, checkpoints, torchrun, trackers), `report` (tables, plots,
result readers), `lens` (the tuned lens), `eval` (evaluation), `unlearning` (objectives, presets,
robust updates, distillation), `attack` (fine-tuning attacks and the robustness protocol), then
`search`, `demo` and `cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> the module that defines it
_PUBLIC = {
    "load_model": "lensunlearn.modeling.loading",
    "TunedLens": "lensunlearn.lens.tuned_lens",
    "evaluate": "lensunlearn.eval.evaluate",
    "unlearn": "lensunlearn.unlearning.run",
    "UnlearnConfig": "lensunlearn.unlearning.options",
    "PRESETS": "lensunlearn.unlearning.options",
    "REFERENCE": "lensunlearn.unlearning.options",
    "SMALL": "lensunlearn.unlearning.options",
    "ROBUST": "lensunlearn.unlearning.options",
    "distill": "lensunlearn.unlearning.distill",
    "DistillConfig": "lensunlearn.unlearning.options",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lensunlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
