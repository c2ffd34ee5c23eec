"""The model's layer structure and the one hidden-state convention.

For a decoder with L blocks, stream 0 is the embedding output and stream l (1 <= l < L) is the
residual stream after block l-1, i.e. the input of block l. This equals `hidden_states[l]` of a
Hugging Face forward pass with `output_hidden_states=True`. Lens l reads stream l, and "target
layer l" means stream l everywhere in this package. Stream l depends on blocks 0 .. l-1 only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ModelParts:
    """The pieces of a decoder-only LM that the lens and the objective touch."""

    blocks: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Module
    embed: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model under peft, DDP or FSDP wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module  # DDP
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()  # peft
        else:
            return model


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return None if config is None else config_depth(config)


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_depth(config: Any) -> int | None:
    """The number of decoder blocks a model's config names (a `transformers` config, loaded without the
    weights), or None when it names none: what `model_parts(model).num_layers` will be."""
    text = _text_config(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(text, key, None):
            return int(getattr(text, key))
    return None


def config_mlp_widths(config: Any) -> tuple[int, int] | None:
    """(hidden size, MLP width) from a model's config, or None when it does not name them; GPT-2's MLP
    width is `n_inner`, 4x the hidden size when unset."""
    text = _text_config(config)
    hidden = next((int(v) for k in ("hidden_size", "n_embd", "d_model") if (v := getattr(text, k, None))), None)
    if hidden is None:
        return None
    inner = next((int(v) for k in ("intermediate_size", "n_inner", "ffn_dim") if (v := getattr(text, k, None))), None)
    if inner is None and getattr(text, "model_type", None) == "gpt2":
        inner = 4 * hidden
    return None if inner is None else (hidden, inner)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks: the longest one, matching the config depth."""
    depth = _num_hidden_layers(model)
    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    if depth is not None:
        matching = [c for c in candidates if len(c[1]) == depth]
        candidates = matching or candidates
    if not candidates:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of layers")
    return max(candidates, key=lambda c: len(c[1]))


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and not list(module.children())


def model_parts(model: nn.Module) -> ModelParts:
    """Find blocks, final norm, unembedding and embedding from the module tree, for any decoder."""
    base = unwrap(model)
    block_path, blocks = _find_blocks(base)
    parent = base.get_submodule(block_path.rsplit(".", 1)[0]) if "." in block_path else base
    norms = [m for _, m in parent.named_children() if _is_norm(m)]
    if not norms:
        raise ValueError(f"cannot find the final norm of {type(base).__name__} beside its blocks at {block_path!r}")
    unembed = base.get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(base).__name__} has no output embedding: a causal LM head is required")
    return ModelParts(blocks=blocks, final_norm=norms[-1], unembed=unembed, embed=base.get_input_embeddings())


def check_layers(layers: Sequence[int], num_layers: int, what: str = "layer",
                 allow_output: bool = False) -> tuple[int, ...]:
    """Refuse layers outside 0 .. L-1 (0 .. L with `allow_output`) with a message naming the valid range."""
    top = num_layers if allow_output else num_layers - 1
    bad = [l for l in layers if not 0 <= int(l) <= top]
    if bad:
        output = f" ({num_layers} is the model's output)" if allow_output else ""
        raise ValueError(f"{what} {bad} out of range: this model has {num_layers} layers, so use 0..{top}{output}")
    if not layers:
        raise ValueError(f"no {what}s given: pass at least one, e.g. --layers 5,10")
    return tuple(int(l) for l in layers)


def clip_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Keep the layers that exist in a shallower model (5..30 on a 30-block model: 5..25); at least the last."""
    kept = tuple(l for l in layers if 0 <= l < num_layers)
    return kept or (num_layers - 1,)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed stream is captured."""


def _hidden_from_call(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("cannot find the hidden states among a decoder block's inputs")


@contextlib.contextmanager
def capture_streams(model: nn.Module, layers: Sequence[int], stop: bool = False,
                    final: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Capture stream l (the input of block l) for each l in `layers` during forward passes.

    With `final=True`, or with L = number of blocks among `layers`, the output of the last block
    (the final norm's input) is captured too, under key L; the model's logits are
    `unembed(final_norm(that))`.
    With `stop=True` the forward pass ends as soon as everything asked for is captured, so the
    later blocks (and, with `final`, the unembedding) never run; call the model through
    `forward_streams`, which catches the stop. Hooks are always removed on exit.
    """
    parts = model_parts(model)
    final = final or parts.num_layers in layers
    layers = [l for l in layers if l != parts.num_layers]
    layers = check_layers(layers, parts.num_layers) if layers or not final else ()
    last = parts.num_layers if final else max(layers)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(_module, args, kwargs):
            captured[index] = _hidden_from_call(args, kwargs)
            if stop and index == last:
                raise StopForward
        return hook

    modules = [(l, parts.blocks[l]) for l in sorted(set(layers))]
    if final:
        modules.append((parts.num_layers, parts.final_norm))
    handles = [module.register_forward_pre_hook(make_hook(l), with_kwargs=True) for l, module in modules]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_streams(model: nn.Module, layers: Sequence[int], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, stop: bool = True,
                    final: bool = False) -> dict[int, torch.Tensor]:
    """Run the model only as far as needed and return the requested streams (and the final one)."""
    with capture_streams(model, layers, stop=stop, final=final) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return dict(captured)


# Names a decoder block gives its MLP child in the supported architectures.
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def block_mlp(model: nn.Module, index: int) -> nn.Module:
    """The MLP of block `index`: the block's child named mlp (every supported architecture), feed_forward or ffn."""
    base = unwrap(model)
    block = model_parts(base).blocks[index]
    mlp = next((child for name, child in block.named_children() if name in MLP_NAMES), None)
    if mlp is None:
        raise ValueError(f"block {index} of {type(base).__name__} has no MLP child named one of {MLP_NAMES}: "
                         f"its children are {[n for n, _ in block.named_children()]}")
    return mlp


@contextlib.contextmanager
def capture_mlp_outputs(model: nn.Module, blocks: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """The output of the MLP of each block in `blocks` during forward passes inside, by block index.

    A pass recomputed in backward (gradient checkpointing) overwrites an entry with an equal tensor;
    read the outputs before calling backward. Hooks are always removed on exit.
    """
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(_module, _args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [block_mlp(model, b).register_forward_hook(make_hook(b)) for b in sorted(set(blocks))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class BlockCall:
    """What block l was called with in a forward pass: its hidden-state input (stream l) and the rest of
    its arguments (attention mask, position embeddings, ...), so that blocks l .. L-1 can be run again
    from another stream (`run_blocks_from`)."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def call_of_block(model: nn.Module, layer: int, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> BlockCall:
    """Run `model` up to block `layer` (0 <= layer < L) and return that block's call; later blocks never run."""
    parts = model_parts(model)
    check_layers((layer,), parts.num_layers)
    seen: list[BlockCall] = []

    def hook(_module, args, kwargs):
        seen.append(BlockCall(_hidden_from_call(args, kwargs), args, kwargs))
        raise StopForward

    handle = parts.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


def run_blocks_from(model: nn.Module, layer: int, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Blocks `layer` .. L-1 of `model` applied to `hidden` (a stream-`layer` tensor), with the other
    arguments `call` recorded for block `layer`; returns the final norm's input (stream L).

    Every block of the supported architectures gets the same mask and position arguments, which is
    what makes one recorded call serve them all; a model whose blocks differ in attention type (a
    sliding-window layer among full ones) is refused rather than run with the wrong mask.
    """
    blocks = model_parts(model).blocks
    kinds = {getattr(block, "attention_type", None) for block in list(blocks)[layer:]}
    if len(kinds) > 1:
        raise ValueError(f"blocks {layer}.. of {type(unwrap(model)).__name__} mix attention types "
                         f"{sorted(map(str, kinds))}: their masks differ, so one recorded call cannot rerun them")
    from_kwargs = "hidden_states" in call.kwargs and not (call.args and isinstance(call.args[0], torch.Tensor))
    for block in list(blocks)[layer:]:
        if from_kwargs:
            out = block(*call.args, **{**call.kwargs, "hidden_states": hidden})
        else:
            out = block(hidden, *call.args[1:], **call.kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


# A block's MLP and attention, by the child names of every supported architecture (GPT-NeoX, Llama,
# GPT-2, Qwen2, OLMo2) and the common alternatives.
COMPONENT_NAMES = {"mlp": ("mlp", "feed_forward", "ffn"), "attn": ("self_attn", "attn", "attention", "self_attention")}


def block_component(block: nn.Module, component: str) -> nn.Module:
    """The block's MLP (`component` "mlp") or attention ("attn") module: the child of one of the names in
    `COMPONENT_NAMES`."""
    names = COMPONENT_NAMES[component]
    found = next((child for name, child in block.named_children() if name in names), None)
    if found is None:
        raise ValueError(f"a {type(block).__name__} block has no {component} child named one of {names}: its "
                         f"children are {[n for n, _ in block.named_children()]}")
    return found
