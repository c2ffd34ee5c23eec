"""The one fine-tuning attack: next-token training on attack text, of every weight or of a LoRA adapter.

`tamper` (one attack curve on a corpus of the user's choice), the robustness protocol (a grid of
these attacks on held-out facts, with its controls) and the demo (through `tamper`) all attack
through here, so "LoRA r16 at lr 1e-3" or "full at lr 1e-5" is the same attack wherever it is named.

The LoRA attack adapts every linear layer of the blocks (peft's `all-linear`: the attention and MLP
projections, not the unembedding) with alpha = rank and no dropout, as a determined attacker would;
peft's default (the q and v projections, dropout 0.05) is a weaker attack that overstates how well
a model resists. The full attack trains every weight. Both use AdamW without weight decay by default
and clip the gradient norm at 1: the relearning attacks of "Tamper-Resistant Safeguards for
Open-Weight LLMs" (https://arxiv.org/abs/2408.00761) and "An Adversarial Perspective on Machine
Unlearning for AI Safety" (https://arxiv.org/abs/2409.18025) are plain fine-tuning of this kind.

Two choices reproduce the weaker attacks that unlearning papers test themselves against: `targets="mlp"`
trains only the MLP weights of the blocks (a full attack) or adapts only the MLP projections (LoRA),
and `optimizer="sgd"` with `momentum=0` is plain SGD, each step -lr x gradient. "Collapse of Irrelevant
Representations (CIR) Ensures Robust and Non-Disruptive LLM Unlearning" (https://arxiv.org/abs/2509.11816)
relearns with plain SGD at lr 1e-5 on the MLP
weights; MUDMAN ("Robust LLM Unlearning with MUDMAN", https://arxiv.org/abs/2506.12484) with plain
SGD on every weight (lr 3e-3 for SmolLM-135M). Neither clips the gradient (`clip=0`).

Data order is a pure function of the step and the seed (`data.batch_indices`), so the attacked text is
cycled when the attack runs longer than one pass over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..data.corpora import batch_indices, collate
from ..train.loop import LoopSpec, run_loop
from ..train.optim import MultiOptimizer, OptimizerName, build_optimizer, embedding_parameters, lr_factor

AttackKind = Literal["full", "lora"]
KINDS: tuple[AttackKind, ...] = ("full", "lora")
AttackTargets = Literal["all", "mlp"]
TARGETS: tuple[AttackTargets, ...] = ("all", "mlp")
# A block's MLP, by the child name of every supported architecture (Llama, Qwen2, OLMo2 and GPT-2: mlp)
# and the common alternatives.
MLP_NAMES = ("mlp", "feed_forward", "ffn")
# every linear layer of the blocks (peft resolves it per architecture and leaves the unembedding out)
LORA_TARGETS = "all-linear"
LORA_DROPOUT = 0.0
LORA_RANK = 16
WEIGHT_DECAY = 0.0
CLIP = 1.0


@dataclass(frozen=True)
class Attack:
    """One fine-tuning attack's settings: what is trained, and how."""

    kind: AttackKind
    lr: float
    steps: int
    schedule: str = "constant"
    warmup: int = 0
    batch: int = 8  # sequences per optimiser step
    per_device_batch: int | None = None  # sequences per forward pass; None: the whole batch at once
    optimizer: OptimizerName = "adamw"
    weight_decay: float = WEIGHT_DECAY
    clip: float = CLIP  # gradient-norm clip; 0: none
    lora_rank: int = LORA_RANK
    seed: int = 0  # the LoRA initialisation and the data order
    momentum: float | None = None  # of sgd (Nesterov above 0; 0: plain SGD) or muon; None: the optimiser's default
    targets: AttackTargets = "all"  # all: every weight (full) or every linear layer (LoRA); mlp: the MLPs only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attack kind {self.kind!r}: use {' or '.join(KINDS)}")
        if self.targets not in TARGETS:
            raise ValueError(f"unknown attack targets {self.targets!r}: use {' or '.join(TARGETS)}")
        if self.momentum is not None and (self.optimizer == "adamw" or not 0 <= self.momentum < 1):
            raise ValueError(f"an attack's momentum is that of sgd or muon, in [0, 1): got {self.momentum} with "
                             f"{self.optimizer}")

    @property
    def micro_batch(self) -> int:
        return self.per_device_batch or self.batch


def mlp_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of the MLP of every block (the child named one of `MLP_NAMES`)."""
    from ..modeling.layers import model_parts, unwrap

    blocks = model_parts(unwrap(model)).blocks
    found = {id(child) for block in blocks for name, child in block.named_children() if name in MLP_NAMES}
    named = {name: module for name, module in model.named_modules() if id(module) in found}
    if len(named) != len(blocks):
        raise ValueError(f"an MLP-only attack needs an MLP child named one of {MLP_NAMES} in every block of "
                         f"{type(unwrap(model)).__name__}; found {len(named)} of {len(blocks)}")
    return named


def lora_config(rank: int, target_modules: str | list[str] = LORA_TARGETS):
    """The LoRA attack's adapter: every linear layer of the blocks (or those named), alpha = rank, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=LORA_DROPOUT, target_modules=target_modules,
                      task_type="CAUSAL_LM")


def attach(model: nn.Module, attack: Attack) -> nn.Module:
    """The module to train: `model` itself with every weight (or every MLP weight) trainable, or `model`
    wrapped in a fresh LoRA adapter (seeded by `attack.seed`) with only the adapter trainable."""
    torch.manual_seed(attack.seed)
    if attack.kind == "full" and attack.targets == "all":
        return model.requires_grad_(True)
    if attack.kind == "full":
        model.requires_grad_(False)
        for module in mlp_modules(model).values():
            module.requires_grad_(True)
        return model
    from peft import get_peft_model

    targets: str | list[str] = LORA_TARGETS
    if attack.targets == "mlp":  # the linear layers inside the blocks' MLPs, by their full names
        targets = [f"{name}.{sub}" for name, mlp in mlp_modules(model).items()
                   for sub, child in mlp.named_modules() if isinstance(child, nn.Linear)]
    model.requires_grad_(False)
    return get_peft_model(model, lora_config(attack.lora_rank, targets))


def detach(trainable: nn.Module, model: nn.Module, attack: Attack) -> None:
    """Undo `attach`: remove a LoRA adapter (the weights beneath are as they were), freeze, eval mode."""
    if attack.kind == "lora":
        trainable.unload()
    model.requires_grad_(False)
    model.eval()


@contextmanager
def attached(model: nn.Module, attack: Attack) -> Iterator[nn.Module]:
    """`attach` for the block, `detach` after it, also when the attack fails."""
    trainable = attach(model, attack)
    try:
        yield trainable
    finally:
        detach(trainable, model, attack)


def trainable_parameters(trainable: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in trainable.named_parameters() if p.requires_grad]


def micro_batches(chunks: Sequence[Sequence[int]], attack: Attack, pad_id: int, step: int
                  ) -> list[dict[str, torch.Tensor]]:
    """The token chunks of optimiser step `step`, padded, in micro-batches of `attack.micro_batch`."""
    idx = batch_indices(len(chunks), attack.batch, step, attack.seed)
    size = attack.micro_batch
    return [collate([chunks[i] for i in idx[k:k + size]], pad_id) for k in range(0, attack.batch, size)]


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the real tokens of a padded batch."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    return loss, {"loss": loss.item(), "tokens": float(mask.sum())}


def attack_optimizer(trainable: nn.Module, named: list[tuple[str, nn.Parameter]], attack: Attack
                     ) -> MultiOptimizer:
    """The attack's optimiser (`build_optimizer`) with the attack's own momentum when it names one (0 with
    sgd: plain SGD, the relearning of CIR and MUDMAN)."""
    return build_optimizer(named, attack.optimizer, attack.lr, attack.weight_decay,
                           exclude_from_muon=embedding_parameters(trainable), momentum=attack.momentum)


def run_attack(trainable: nn.Module, chunks: Sequence[Sequence[int]], pad_id: int, attack: Attack,
               on_step: Callable[[int, dict[str, float]], None] | None = None, desc: str = "attack") -> None:
    """`attack.steps` optimiser steps of next-token training on `chunks` (cycled), through the package's
    one training loop; `on_step(step, metrics)` after each (where the caller measures). A non-finite
    loss raises `loop.NonFiniteLossError` after the steps before it."""
    named = trainable_parameters(trainable)
    optimizer = attack_optimizer(trainable, named, attack)
    device = next(trainable.parameters()).device
    spec = LoopSpec(params=[p for _, p in named], optimizer=optimizer, base_lr=attack.lr, total_steps=attack.steps,
                    micro_batches=lambda step: micro_batches(chunks, attack, pad_id, step),
                    loss_fn=lambda batch, step: lm_loss(trainable, batch, device), clip=attack.clip,
                    lr_factor=lambda s: lr_factor(s, attack.steps, attack.warmup, attack.schedule),
                    on_step=on_step, desc=desc, postfix=("loss",))
    trainable.train()
    try:
        run_loop(spec)
    finally:
        del optimizer
