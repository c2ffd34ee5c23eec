"""The one fine-tuning attack: `tamper` and the robustness protocol build the same attack for the same
settings, each through its own command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lensunlearn.attack import finetune, protocol, tamper
from lensunlearn.attack.finetune import Attack

from ..conftest import run_command, save_tiny_model, write_jsonl

CAPITALS = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))


class Built(Exception):
    """Raised by the recording `run_attack` once it has seen the attack: nothing needs to train."""


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """An unlearning run (tiny Llama in merged/, its base model), a fact corpus and task, a kept task."""
    base = save_tiny_model(tmp_path / "base", seed=1)
    run = tmp_path / "run"
    save_tiny_model(run / "merged", seed=2)
    answers = [a for _, a in CAPITALS]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"fact_id": f"cap:{s}", "text": f"the capital of {s} is {a} ."}
                                                     for s, a in CAPITALS])
    task = write_jsonl(tmp_path / "capitals.jsonl", [
        {"fact_id": f"cap:{s}", "question": f"what is the capital of {s} ?", "prompt": f"the capital of {s} is",
         "choices": answers, "answer": answers.index(a)} for s, a in CAPITALS])
    symbols = ["gold", "iron", "oxygen", "element"]
    kept = write_jsonl(tmp_path / "symbols.jsonl", [
        {"question": f"the symbol of {w} ?", "prompt": f"the symbol of {w} is", "choices": symbols, "answer": k}
        for k, w in enumerate(symbols)])
    (tmp_path / "text.txt").write_text("it was a question of gold and iron .\nthe answer is in the question .\n")
    (tmp_path / "benign.txt").write_text("it was a day of rain and wind .\nthe walk was long and the road dry .\n")
    (run / "run_config.json").write_text(json.dumps({"model": str(base), "forget": str(corpus), "eval_format": "cloze",
                                                     "eval_tasks": [str(task), str(kept)]}))
    return run


def _built(monkeypatch, module, argv: list[str]) -> dict:
    """What `module`'s command line hands to the shared attack: its settings, and the trained module's
    adapter settings and trainable parameters."""
    seen = {}

    def record(trainable, chunks, pad_id, attack, on_step=None, desc=""):
        names = [n for n, _ in finetune.trainable_parameters(trainable)]
        lora = getattr(trainable, "peft_config", {}).get("default")
        seen.update(attack=attack, names=names, count=sum(p.numel() for _, p in finetune.trainable_parameters(
            trainable)), lora=None if lora is None else {
                "targets": sorted(lora.target_modules), "r": lora.r, "alpha": lora.lora_alpha,
                "dropout": lora.lora_dropout},
            weights=[p.detach().clone() for _, p in finetune.trainable_parameters(trainable)] if lora else None,
            all_names=[n for n, _ in trainable.named_parameters()])
        raise Built

    monkeypatch.setattr(module, "run_attack", record)
    with pytest.raises(Built):
        run_command(argv)
    return seen


def _tamper(run: Path, *flags: str) -> list[str]:
    tmp = run.parent  # the model folder itself and explicit inputs: no run-directory defaults involved
    return ["tamper", "--model", str(run / "merged"), "--forget", str(tmp / "corpus.jsonl"), "--eval_tasks",
            f"{tmp / 'capitals.jsonl'},{tmp / 'symbols.jsonl'}", "--lr", "1e-3", "--schedule", "constant",
            "--steps", "8", "--batch", "4", "--per_device_batch", "4", "--eval_format", "cloze",
            "--out", str(run.parent / "tamper"), *flags]


def _robustness(run: Path, kind: str, *flags: str) -> list[str]:
    return ["robustness", str(run), "--kinds", kind, "--lrs", "1e-3", "--schedules", "constant", "--steps", "8",
            "--batch", "4", "--seeds", "0", "--generic", str(run.parent / "text.txt"), "--benign",
            str(run.parent / "benign.txt"), "--fluency_prompts", "0", "--out", str(run.parent / "robust"), *flags]


def test_tamper_and_the_protocol_build_the_same_lora_attack(run_dir, monkeypatch):
    by_tamper = _built(monkeypatch, tamper, _tamper(run_dir, "--no-full", "--lora_rank", "4"))
    by_protocol = _built(monkeypatch, protocol, _robustness(run_dir, "lora", "--lora_rank", "4"))
    assert by_tamper["attack"] == by_protocol["attack"] == Attack(
        kind="lora", lr=1e-3, steps=8, schedule="constant", batch=4, per_device_batch=4, lora_rank=4)
    assert by_tamper["lora"] == by_protocol["lora"]
    lora = by_tamper["lora"]
    # every linear layer of the blocks, alpha = rank, no dropout (peft's default was q and v with dropout 0.05)
    assert lora["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (4, 4, 0.0)
    assert by_tamper["names"] == by_protocol["names"] and by_tamper["count"] == by_protocol["count"] > 0
    assert all("lora_A" in n or "lora_B" in n for n in by_tamper["names"])
    assert len(by_tamper["names"]) == 2 * 7 * 4  # A and B of 7 projections in each of the 4 blocks
    assert all(a.equal(b) for a, b in zip(by_tamper["weights"], by_protocol["weights"], strict=True))  # same init


def test_a_full_attack_trains_every_weight_in_both(run_dir, monkeypatch):
    by_tamper = _built(monkeypatch, tamper, _tamper(run_dir))
    by_protocol = _built(monkeypatch, protocol, _robustness(run_dir, "full"))
    assert by_tamper["attack"] == by_protocol["attack"] and by_tamper["attack"].kind == "full"
    assert by_tamper["lora"] is None and by_protocol["lora"] is None
    assert by_tamper["names"] == by_protocol["names"] == by_tamper["all_names"]
    assert by_tamper["count"] == by_protocol["count"]


def test_tamper_passes_its_momentum_to_the_attack(run_dir, monkeypatch):
    """`tamper --optimizer sgd --momentum 0` is the papers' plain-SGD relearning: the attack gets the momentum
    and builds SGD without it (Muon takes a momentum too; AdamW, which has its own betas, is refused)."""
    attack = _built(monkeypatch, tamper, _tamper(run_dir, "--optimizer", "sgd", "--momentum", "0", "--clip", "0",
                                                 "--weight_decay", "0"))["attack"]
    assert (attack.optimizer, attack.momentum, attack.clip) == ("sgd", 0.0, 0.0)
    sgd = finetune.attack_optimizer(torch.nn.Linear(2, 2), [("w", torch.nn.Parameter(torch.ones(2, 2)))], attack)
    assert [(g["momentum"], g["nesterov"]) for g in sgd.optimizers[0].param_groups] == [(0.0, False)]
    assert Attack(kind="full", lr=1e-3, steps=1, optimizer="muon", momentum=0.5).momentum == 0.5
    with pytest.raises(ValueError, match="momentum is that of sgd or muon"):
        Attack(kind="full", lr=1e-3, steps=1, optimizer="adamw", momentum=0.5)


def test_attach_and_detach_leave_the_weights_as_they_were(tmp_path):
    from lensunlearn.modeling.loading import load_model

    model, tokenizer = load_model(str(save_tiny_model(tmp_path / "tiny")), "float32", "cpu", False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = Attack(kind="lora", lr=1e-2, steps=3, batch=2, lora_rank=2)
    chunks = [tokenizer("the capital of france is paris .")["input_ids"]] * 3
    losses = []
    with finetune.attached(model, attack) as trainable:
        finetune.run_attack(trainable, chunks, tokenizer.pad_token_id, attack,
                            lambda step, metrics: losses.append(metrics["loss"]))
    assert len(losses) == 3 and losses[-1] < losses[0]  # the adapter learned the sentence
    after = model.state_dict()
    assert set(after) == set(before) and all(after[k].equal(v) for k, v in before.items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


# --- the papers' own attacks: plain SGD, MLP weights only ---------------------------------------------


def _tiny(tmp_path):
    from lensunlearn.modeling.loading import load_model

    model, tokenizer = load_model(str(save_tiny_model(tmp_path / "tiny")), "float32", "cpu", False)
    chunks = [tokenizer(t)["input_ids"] for t in ("the capital of france is paris .", "rome is in italy .")]
    return model, tokenizer, chunks


def test_plain_sgd_takes_minus_lr_times_the_gradient(tmp_path):
    """`optimizer="sgd", momentum=0, clip=0`: one step moves each weight by exactly -lr x its gradient (no
    momentum, no clipping, no Adam normalisation), the relearning step of CIR and MUDMAN."""
    model, tokenizer, chunks = _tiny(tmp_path)
    attack = Attack(kind="full", lr=0.5, steps=1, batch=2, optimizer="sgd", momentum=0.0, clip=0.0)
    batch = finetune.micro_batches(chunks, attack, tokenizer.pad_token_id, 0)[0]
    model.zero_grad()
    finetune.lm_loss(model.train(), batch, torch.device("cpu"))[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    expected = {n: p.detach().add(grads[n], alpha=-0.5) for n, p in model.named_parameters()}
    model.zero_grad()
    assert max(g.norm() for g in grads.values()) > 1.0  # a clip at 1 would have changed the step
    with finetune.attached(model, attack) as trainable:
        finetune.run_attack(trainable, chunks, tokenizer.pad_token_id, attack)
    for name, param in model.named_parameters():
        assert torch.allclose(param, expected[name], rtol=0, atol=1e-7), name
    with pytest.raises(ValueError, match="momentum is that of sgd"):
        Attack(kind="full", lr=1e-3, steps=1, momentum=0.0)  # AdamW has no such momentum


def test_an_mlp_attack_trains_only_the_mlp_weights(tmp_path):
    """`targets="mlp"`: a full attack changes the blocks' MLP weights and leaves every other weight
    bitwise as it was; a LoRA attack adapts only the MLP projections."""
    model, tokenizer, chunks = _tiny(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = Attack(kind="full", lr=1e-1, steps=2, batch=2, optimizer="sgd", momentum=0.0, clip=0.0, targets="mlp")
    with finetune.attached(model, attack) as trainable:
        names = [n for n, _ in finetune.trainable_parameters(trainable)]
        finetune.run_attack(trainable, chunks, tokenizer.pad_token_id, attack)
    assert names and all(".mlp." in n for n in names)
    assert {n.split(".mlp.")[1] for n in names} == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert len(names) == 3 * 4  # three projections in each of the 4 blocks
    for key, value in model.state_dict().items():
        assert value.equal(before[key]) != (".mlp." in key), key
    lora = Attack(kind="lora", lr=1e-3, steps=1, batch=2, lora_rank=2, targets="mlp")
    with finetune.attached(model, lora) as trainable:
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in finetune.trainable_parameters(trainable)}
    assert adapted == {"gate_proj", "up_proj", "down_proj"}
