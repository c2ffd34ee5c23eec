"""`lensunlearn demo`: the whole loop on the embedded model, with nothing to download (see `demo.run`)."""

from __future__ import annotations

from ..core.lazy import attributes_from

# `lensunlearn.<package>.X` as before the package was split: the options first (no torch), else the runner.
__getattr__ = attributes_from(__name__, ("options", "run"))
