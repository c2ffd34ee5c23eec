"""The tuned lens, stored in the tuned-lens library's file layout.

Translator l maps stream l residually, h + A_l h + b_l, with A and b starting at zero so that an
untrained lens is the logit lens; the model's final norm and unembedding (frozen copies) then
give logits. Translators are float32 whatever the model's dtype.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.atomic import torch_save_atomic, write_json_atomic
from ..core.errors import InputError, load_torch_file, read_json
from ..core.paths import LENS_CONFIG_FILE as CONFIG_FILE
from ..core.paths import LENS_PARAMS_FILE as PARAMS_FILE
from ..modeling.layers import model_parts
from ..modeling.loading import fast_matmul_dtype, hub_cache_miss, looks_local
from ..modeling.losses import vocab_cross_entropy
from .options import default_lens_path


class TunedLens(nn.Module):
    """One affine translator per layer, then the frozen final norm and unembedding."""

    def __init__(self, final_norm: nn.Module, unembed: nn.Module, d_model: int, num_layers: int,
                 bias: bool = True, base_model_name: str = "") -> None:
        super().__init__()
        self.d_model, self.num_layers, self.bias, self.base_model_name = d_model, num_layers, bias, base_model_name
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model, bias=bias) for _ in range(num_layers))
        for translator in self.translators:
            nn.init.zeros_(translator.weight)
            if bias:
                nn.init.zeros_(translator.bias)
        self.final_norm = _plain_copy(final_norm)
        self.unembed = _plain_copy(unembed)
        self.register_buffer("_matmul_weight", None, persistent=False)

    def set_matmul_dtype(self, dtype: torch.dtype | None) -> TunedLens:
        """Run the unembedding product in `dtype` (bfloat16: ~3-7x faster on CPUs with AVX-512 BF16).

        The weight is cast once; norms, translators and everything computed from the logits stay
        float32. None or float32 restores the exact float32 product, and so does bfloat16 on a CPU
        that would emulate it (`fast_matmul_dtype`).
        """
        dtype = fast_matmul_dtype(dtype, self.unembed.weight.device, "the lens's unembedding product")
        if dtype in (None, torch.float32):
            self._matmul_weight = None
        else:
            self._matmul_weight = self.unembed.weight.detach().to(dtype)
        return self

    @classmethod
    def from_model(cls, model: nn.Module, bias: bool = True) -> TunedLens:
        """A fresh (logit-lens-equivalent) lens for `model`."""
        parts = model_parts(model)
        d_model = parts.unembed.weight.shape[1]
        name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
        lens = cls(parts.final_norm, parts.unembed, d_model, parts.num_layers, bias=bias, base_model_name=name)
        return lens.to(parts.unembed.weight.device)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The translated stream h + A h + b, in float32."""
        h = h.float()
        return h + self.translators[layer](h)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding, the logit lens; float32 logits."""
        return self.decode_normed(self.final_norm(h))

    def decode_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """The unembedding of an already normed stream; float32 logits."""
        if self._matmul_weight is None:
            return self.unembed(normed)
        logits = F.linear(normed.to(self._matmul_weight.dtype), self._matmul_weight).float()
        bias = getattr(self.unembed, "bias", None)
        return logits if bias is None else logits + bias

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of lens `layer`; layer L (the number of blocks) is the model's own output, untranslated."""
        if layer == self.num_layers:
            return self.decode(h.float())
        return self.decode(self.transform(h, layer))

    def cross_entropy(self, h: torch.Tensor, layer: int, targets: torch.Tensor | None = None,
                      target_mean: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Per-row cross-entropy of lens `layer`'s distribution against a uniform target, the given
        token ids or a distribution's `expected_unembedding`, computed fused (`vocab_cross_entropy`):
        `uniform_ce(self(h, layer))` without a target."""
        normed = self.final_norm(h.float() if layer == self.num_layers else self.transform(h, layer))
        return vocab_cross_entropy(normed, self._product_weight(), getattr(self.unembed, "bias", None), targets,
                                   target_mean)

    def expected_unembedding(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(probs W, probs . b) for distributions `probs` [rows, V]: what `cross_entropy` needs of a
        target distribution, computed once and shared by every layer."""
        weight = self._product_weight()
        rows = torch.mm(probs.to(weight.dtype), weight).float()
        bias = getattr(self.unembed, "bias", None)
        return rows, None if bias is None else probs @ bias.float()

    def _product_weight(self) -> torch.Tensor:
        return self.unembed.weight if self._matmul_weight is None else self._matmul_weight

    def translator_parameters(self) -> list[nn.Parameter]:
        return list(self.translators.parameters())

    def config_dict(self) -> dict:
        return {"base_model_name_or_path": self.base_model_name, "d_model": self.d_model,
                "num_hidden_layers": self.num_layers, "bias": self.bias, "lens_type": "linear_tuned_lens"}

    def save(self, path: str | Path) -> None:
        """Write `params.pt` (keys `0.weight`, `0.bias`, ...) and `config.json`, atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.translators.state_dict().items()}
        torch_save_atomic(state, path / PARAMS_FILE)
        write_json_atomic(path / CONFIG_FILE, self.config_dict())

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> TunedLens:
        """Load a lens saved by us, by the tuned-lens library or from the hub, refusing misfits."""
        path = resolve_lens_path(path)
        config = read_json(path / CONFIG_FILE)
        parts = model_parts(model)
        d_model = parts.unembed.weight.shape[1]
        for key in ("d_model", "num_hidden_layers"):
            if not isinstance(config, dict) or key not in config:
                raise ValueError(f"{path / CONFIG_FILE} has no {key!r}: it is not a tuned-lens config")
        if config["num_hidden_layers"] != parts.num_layers or config["d_model"] != d_model:
            name = getattr(getattr(model, "config", None), "name_or_path", "") or "..."
            raise ValueError(
                f"lens {path} was made for a model with {config['num_hidden_layers']} layers of width "
                f"{config['d_model']}, but this model has {parts.num_layers} layers of width {d_model}: "
                f"train a lens for this model with `lensunlearn lens train --model {name}`")
        lens = cls(parts.final_norm, parts.unembed, d_model, parts.num_layers, bias=config.get("bias", True),
                   base_model_name=config.get("base_model_name_or_path", ""))
        state = load_torch_file(path / PARAMS_FILE, f"train the lens again with `lensunlearn lens train --out {path} "
                                                    f"--overwrite` (or copy it again)")
        try:
            lens.translators.load_state_dict({k: v.float() for k, v in state.items()})
        except (RuntimeError, AttributeError) as err:
            raise InputError(f"{path / PARAMS_FILE} does not match its {CONFIG_FILE} ({' '.join(str(err).split())}): "
                            f"train the lens again with `lensunlearn lens train --out {path} --overwrite`") from err
        return lens.to(parts.unembed.weight.device)


def _plain_copy(module: nn.Module) -> nn.Module:
    """A frozen float32 copy without the hooks that training tools (checkpointing, peft) leave on modules."""
    clone = copy.deepcopy(module).float().requires_grad_(False)
    for sub in clone.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks):
            hooks.clear()
    return clone


def find_lens(lens: str | Path | None, model: str) -> Path:
    """The lens folder to use, checked before any model is loaded: `lens`, else the default for `model`,
    which must then exist (a newcomer has to train it first)."""
    if lens:
        return resolve_lens_path(lens)
    default = default_lens_path(model)
    if not default.is_dir():
        raise FileNotFoundError(f"no --lens given and {default} does not exist: train a lens first: "
                                f"lensunlearn lens train --model {model} (writes {default}), or pass --lens")
    return resolve_lens_path(default)


def resolve_lens_path(path: str | Path) -> Path:
    """A local lens folder, or a hub repo id (from the local hub cache offline, else downloaded)."""
    local = Path(path).expanduser()
    if local.is_dir():
        missing = [f for f in (PARAMS_FILE, CONFIG_FILE) if not (local / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"lens folder {path} lacks {', '.join(missing)}: a lens folder holds {PARAMS_FILE} and {CONFIG_FILE}, "
                f"as written by `lensunlearn lens train`")
        return local
    if local.exists():
        raise NotADirectoryError(f"lens {path} is a file: pass the folder that holds params.pt and config.json")
    if looks_local(str(path)) or str(path).count("/") != 1:
        raise FileNotFoundError(f"lens folder {path} does not exist: pass a folder written by `lensunlearn lens "
                                f"train` or a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(path), allow_patterns=[PARAMS_FILE, CONFIG_FILE]))
    except OSError as err:  # offline without a cached copy, no network, no such repo (all OSErrors)
        raise FileNotFoundError(hub_cache_miss(str(path), "lens", err)) from err
    return resolve_lens_path(folder)

