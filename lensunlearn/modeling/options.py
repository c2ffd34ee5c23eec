"""Which model a command loads and how: `ModelOptions`, torch-free so that `--help` never imports torch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ..core.config import Options, option

EMBEDDED_MODEL = "smollm2-135m"
# Tokens per slice of a full-vocabulary loss: [tokens, vocabulary] logits exist for one slice at a time.
DEFAULT_CHUNK = 1024


@dataclass
class ModelOptions(Options):
    """Which model to load and how (every command that loads a model takes these)."""

    help_group = "model"

    model: str = option(EMBEDDED_MODEL, "hub id, local folder, or smollm2-135m (the embedded default)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "weights dtype: auto is float32 on CPU, "
                                                                              "bfloat16 on GPU")
    device: str | None = option(None, "cpu, cuda or cuda:N", default_text="cuda when there is a GPU, else cpu")
    trust_remote_code: bool = option(False, "allow the model's own code from the hub (only if you trust it)")

    def model_options(self) -> dict[str, Any]:
        """These fields as keywords, to hand on to another command's config (the demo's stages)."""
        return {f.name: getattr(self, f.name) for f in fields(ModelOptions)}


def model_short_name(name: str) -> str:
    """A filesystem-friendly short name for run directories: the last path component."""
    return Path(str(name).rstrip("/")).name or "model"
