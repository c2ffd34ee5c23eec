"""The robust gradient step of `unlearn` on tiny models: what each option does inside the step, that
all options off trains exactly as before, the bad inputs, resume after a kill, and two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lensunlearn.cli import main
from lensunlearn.core.config import ConfigError
from lensunlearn.core.errors import InputError
from lensunlearn.data.corpora import collate
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model
from lensunlearn.train.distributed import World
from lensunlearn.unlearning.mudman import disruption_mask, lm_loss
from lensunlearn.unlearning.objective import AdapterDisabled, FrozenCopy, UnlearnObjective
from lensunlearn.unlearning.robust_step import RobustStep, StepInputs, cir_modules, freeze_all_but_cir
from lensunlearn.unlearning.run import UnlearnConfig, add_lora, target_linears, unlearn

from ..conftest import unlearn_argv, write_unlearn_inputs
from .test_run import _KILL_AFTER_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
FORGET = ["the capital of france is paris .", "the capital of italy is rome and a"]
RETAIN = ["the symbol of gold is 1 and iron 2", "it was in the question at this answer"]
CIR = dict(full=True, cir=True, optimizer="sgd", weight_decay=0.0, cir_act_components=3, cir_grad_components=4)
# MUDMAN's update rule: plain SGD on full-rank weights, no clip (masking and normalisation need it)
SGD = dict(full=True, optimizer="sgd", momentum=0.0, clip=0.0, weight_decay=0.0)


@pytest.fixture
def setup(tmp_path):
    return write_unlearn_inputs(tmp_path, "llama")


def _config(tmp: Path, **kw) -> UnlearnConfig:
    base = dict(model=str(tmp / "tiny"), lens=str(tmp / "lens"), layers=(1, 3), forget=str(tmp / "forget.jsonl"),
                retain=str(tmp / "retain.jsonl"), retain_config=None, retain_column=None, examples=8, batch=4,
                per_device_batch=2, max_length=16, out=str(tmp / "runs"), eval_tasks="", device="cpu")
    return UnlearnConfig(**{**base, **kw})


def _step(tmp: Path, **kw) -> tuple[RobustStep, UnlearnObjective, dict, dict, dict]:
    """A `RobustStep` on the tiny model (LoRA, or the --cir parameter set), one micro-batch per step."""
    cfg = _config(tmp, lora_dropout=0.0, **kw)
    model, tokenizer = load_model(str(tmp / "tiny"), device="cpu")
    lens = TunedLens.load(tmp / "lens", model).requires_grad_(False)
    modules = {}
    if cfg.cir:
        original = FrozenCopy(model)
        modules = cir_modules(model, cfg, (1, 3), 4)
        freeze_all_but_cir(model, modules)
    elif cfg.full:
        original = FrozenCopy(model)
        freeze_all_but_cir(model, target_linears(model, ("gate_proj", "up_proj", "down_proj"), range(3)))
    else:
        torch.manual_seed(0)
        model = add_lora(model, cfg, (1, 3))
        original = AdapterDisabled(model)
    model.train()
    objective = UnlearnObjective(model, lens, (1, 3), original, skip_first=cfg.skip_first)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # LoRA B starts at 0, which makes A's gradient 0: give both a gradient
        for name, p in trainable.items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    forget = collate([tokenizer(t)["input_ids"] for t in FORGET], tokenizer.pad_token_id)
    retain = collate([tokenizer(t)["input_ids"] for t in RETAIN], tokenizer.pad_token_id)
    docs = [tokenizer(t)["input_ids"] for t in RETAIN * 3]
    step = RobustStep(StepInputs(cfg, World(), model, objective, trainable, 1, 10, 100, lambda s: [forget], docs,
                                 tokenizer.pad_token_id, modules))
    return step, objective, trainable, forget, retain


def _grads(loss, trainable) -> dict[str, torch.Tensor]:
    return dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values()), allow_unused=True), strict=True))


def test_sign_mask_zeroes_the_forget_update_where_it_disagrees_with_the_retain_gradient(setup):
    step, objective, trainable, forget, retain = _step(setup, **SGD, disruption_mask=True, mask_momentum=0.5)
    forget_grads = _grads(objective.forget_loss(forget, 7), trainable)
    retain_grads = _grads(lm_loss(objective.model, retain), trainable)  # next-token loss on the retain text
    step(forget, retain, 0.0, 5.0, 7, 0)  # retain weight 0: param.grad is the masked forget gradient alone
    kept = disagree = 0
    for name, p in trainable.items():
        expected = 5.0 * disruption_mask(forget_grads[name], 0.5 * retain_grads[name])
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-9)
        against = torch.sign(p.grad) * torch.sign(retain_grads[name]) < 0
        assert not against.any(), name  # no element of the final update moves against the retain gradient
        disagree += int((torch.sign(forget_grads[name]) * torch.sign(retain_grads[name]) < 0).sum())
        kept += int(torch.count_nonzero(p.grad))
    assert kept > 0 and disagree > 0  # the mask had something to remove and something to keep
    assert 0 < step.step_metrics["masked_fraction"] < 1
    # a later step with the retain weight on: what is left after its retain part still obeys the running average
    for p in trainable.values():
        p.grad = None
    step(forget, retain, 2.0, 4.0, 8, 1)
    retain_part = _grads(objective.retain_loss(retain), trainable)
    for name, p in trainable.items():
        forget_part = p.grad - 2.0 * retain_part[name]
        clear = forget_part.abs() > 1e-5 * forget_part.abs().max()  # not rounding left by the subtraction
        assert not ((torch.sign(forget_part) * torch.sign(step.retain_average[name]) < 0) & clear).any(), name


def test_adversary_takes_the_forget_gradient_at_its_fork_and_leaves_the_trained_weights(setup):
    step, objective, trainable, forget, retain = _step(setup, adversary_steps=2, adversary_lr=0.5)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    at_trained = _grads(objective.forget_loss(forget, 3), trainable)
    step(forget, retain, 0.0, 1.0, 3, 0)
    assert all(torch.equal(p, before[n]) for n, p in trainable.items())  # bitwise: the fork was undone
    delta = step.adversary.delta
    assert any(d.abs().max() > 0 for d in delta.values()) and step.adversary.steps_since_fork == 2
    with torch.no_grad():
        for n, p in trainable.items():
            p.add_(delta[n])
    at_fork = _grads(objective.forget_loss(forget, 3), trainable)
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(before[n])
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, at_fork[name], rtol=1e-4, atol=1e-8)
    assert any(not torch.allclose(at_fork[n], at_trained[n], rtol=1e-3, atol=1e-8) for n in trainable)
    assert step.step_metrics["adversary_loss"] > 0


def test_normalised_forget_gradient_keeps_the_first_steps_norm(setup):
    step, objective, trainable, forget, retain = _step(setup, **SGD, normalise_grad=True)
    step(forget, retain, 0.0, 1.0, 1, 0)
    first = torch.stack([p.grad.norm() for p in trainable.values()]).norm()
    assert step.target_norm == pytest.approx(float(first), rel=1e-5)
    with torch.no_grad():
        for p in trainable.values():
            p.mul_(1.5)  # a step later the raw gradient has another norm
            p.grad = None
    step(forget, retain, 0.0, 3.0, 2, 1)
    assert step.step_metrics["forget_grad_norm"] != pytest.approx(step.target_norm, rel=1e-3)
    now = torch.stack([p.grad.norm() for p in trainable.values()]).norm()
    assert float(now) == pytest.approx(3.0 * step.target_norm, rel=1e-5)


def test_cir_step_writes_projected_updates_of_the_mlp_weights_only(setup):
    step, objective, trainable, forget, retain = _step(setup, **CIR)
    assert trainable and all(".mlp." in n and n.endswith(".weight") for n in trainable)
    assert {int(n.split(".")[2]) for n in trainable} == {0, 1, 2}  # blocks below the deepest target layer
    step(forget, retain, 0.0, 2.0, 5, 0)
    assert step.step_metrics["cir_refreshed"] == 1.0
    for name, module in step.inputs.cir_modules.items():
        grad = module.weight.grad
        act_basis, grad_basis = step.directions.bases[name]
        assert act_basis.shape[1] == 3 and grad_basis.shape[1] == 4
        scale = grad.abs().max()
        assert scale > 0, name
        assert (grad @ act_basis).abs().max() < 1e-4 * scale, name
        assert (grad_basis.T @ grad).abs().max() < 1e-4 * scale, name


def test_cir_with_no_components_is_the_plain_gradient_of_the_mlp_weights(setup):
    step, objective, trainable, forget, retain = _step(setup, **{**CIR, "cir_act_components": 0,
                                                                 "cir_grad_components": 0})
    plain = _grads(2.0 * objective.forget_loss(forget, 5), trainable)
    step(forget, retain, 0.0, 2.0, 5, 0)
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-4, atol=1e-8)


def test_robust_step_with_nothing_on_forms_the_loops_gradients(setup, monkeypatch):
    """The step's own gradient assembly (micro-batches, weights, the retain ramp) against the loop's backward."""
    plain = unlearn(_config(setup, examples=16, run_name="plain"))
    monkeypatch.setattr(UnlearnConfig, "robust_step", property(lambda self: True))
    assembled = unlearn(_config(setup, examples=16, run_name="assembled"))
    a = load_file(plain / "adapter" / "adapter_model.safetensors")
    b = load_file(assembled / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    lines = [json.loads(line) for line in (assembled / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and "forget_grad_norm" in lines[0] and "masked_fraction" not in lines[0]


def test_all_options_off_never_build_the_step_and_leave_training_unchanged(setup, monkeypatch):
    import lensunlearn.unlearning.run as unlearn_module

    defaults = unlearn(_config(setup, run_name="defaults"))

    def refuse(*args, **kwargs):
        raise AssertionError("the robust step was built with every option off")

    monkeypatch.setattr(unlearn_module, "build_robust_step", refuse)
    explicit = unlearn(_config(setup, run_name="explicit", cir=False, disruption_mask=False, normalise_grad=False,
                               adversary_steps=0))
    a = load_file(defaults / "adapter" / "adapter_model.safetensors")
    b = load_file(explicit / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((explicit / "run_config.json").read_text())
    assert config["cir"] is False and config["adversary_steps"] == 0 and config["cir_act_components"] == 24


@pytest.mark.parametrize("case", ["cir_lora", "cir_adamw", "cir_decay", "cir_blocks", "momentum", "adversary_every",
                                  "act_over_width", "grad_over_tokens", "forget_tokens", "empty_corpus",
                                  "empty_budget", "budget_in_forget", "shrink_without_cir", "shrink_without_budget",
                                  "shrink_factor", "mask_lora", "mask_adamw", "normalise_muon", "mask_momentum",
                                  "normalise_clip", "grad_norm_alone", "adversary_decay", "targets_lora",
                                  "targets_unknown", "cir_targets_unknown", "confuse_without_loss",
                                  "confuse_layers", "confuse_default_layers", "confuse_range", "sgd_momentum_adamw",
                                  "confuse_other_objective", "relative_other_objective", "targets_with_blocks"])
def test_bad_input_fails_before_training(setup, case):
    cir = {**CIR}
    kw, match = {
        "cir_lora": ({**cir, "full": False}, "cannot use LoRA adapters: add --full"),
        "cir_adamw": ({**cir, "optimizer": "adamw"}, "--optimizer adamw"),
        "cir_decay": ({**cir, "weight_decay": 0.01}, "pass --weight_decay 0"),
        "cir_blocks": ({**cir, "cir_blocks": (1, 3)}, "not below the deepest target layer 3"),
        "momentum": ({"disruption_mask": True, "mask_momentum": 1.0}, r"--mask_momentum must be in \[0, 1\)"),
        "adversary_every": ({"adversary_steps": 1, "adversary_every": 0}, "--adversary_every"),
        "act_over_width": ({**cir, "cir_act_components": 33}, "more than the 32 dimensions of the inputs"),
        "grad_over_tokens": ({**cir, "cir_grad_components": 30, "cir_pca_docs": 2, "cir_corpus": "retain"},
                             "need at least 30 general-text tokens.*hold 18"),
        # the first estimate reads the forget tokens of --cir_refresh steps: 1 step of 4 documents of 7 tokens
        "forget_tokens": ({**cir, "cir_grad_components": 30, "cir_refresh": 1},
                          "need at least 30 forget tokens in each estimate.*1 steps of one estimate .* hold 28"),
        "empty_corpus": ({**cir, "cir_corpus": str(setup / "empty.jsonl")}, "--cir_corpus corpus .* is empty"),
        "empty_budget": ({**cir, "cir_budget_text": str(setup / "empty.jsonl")},
                         "--cir_budget_text corpus .* is empty"),
        "budget_in_forget": ({**cir, "cir_budget_text": None}, "which unlearning raises on purpose"),
        "shrink_without_cir": ({"cir_on_loss_rise": "shrink"}, "--cir_on_loss_rise shrink acts on --cir's"),
        "shrink_without_budget": ({**cir, "cir_on_loss_rise": "shrink", "cir_max_loss_rise": 0.0},
                                  "a --cir_max_loss_rise above 0"),
        "shrink_factor": ({**cir, "cir_shrink": 1.0}, r"--cir_shrink must be in \(0, 1\)"),
        "mask_lora": ({"disruption_mask": True}, "--disruption_mask with LoRA adapters.*add --full"),
        "mask_adamw": ({"disruption_mask": True, "full": True}, "with --optimizer adamw: AdamW divides"),
        "normalise_muon": ({**SGD, "normalise_grad": True, "optimizer": "muon", "momentum": None},
                           "--normalise_grad with --optimizer muon: Muon orthogonalises"),
        "mask_momentum": ({**SGD, "disruption_mask": True, "momentum": None}, "SGD momentum 0.9.*pass --momentum 0"),
        "normalise_clip": ({**SGD, "normalise_grad": True, "clip": 1.0}, "pass --clip 0"),
        "grad_norm_alone": ({**SGD, "grad_norm": 1.0}, "--grad_norm is the norm --normalise_grad"),
        "adversary_decay": ({"adversary_steps": 1, "adversary_decay": 0.0}, r"--adversary_decay must be in \(0, 1\]"),
        "targets_lora": ({"full_targets": "gate_proj"}, "picks the weights --full trains: add --full"),
        "targets_unknown": ({**SGD, "full_targets": "dense"}, "names no linear layer of blocks 0..2; this model's"),
        "cir_targets_unknown": ({**cir, "full_targets": "dense"}, "names none of the MLP layers --cir trains"),
        "confuse_without_loss": ({"confuse_blocks": (1,)}, "add it, or drop --confuse_blocks"),
        "confuse_layers": ({"forget_loss": "mlp_confuse", "confuse_blocks": (1, 2), "layers": (2,)},
                           r"past the deepest confused block \(3 or later\)"),
        "confuse_default_layers": ({"forget_loss": "mlp_confuse", "layers": (2,)},
                                   r"confused blocks up to 2: .* \(3 or later\)"),
        "confuse_range": ({"forget_loss": "mlp_confuse", "confuse_blocks": (4,), "layers": None},
                          r"--confuse_blocks \[4\] out of range"),
        "sgd_momentum_adamw": ({"momentum": 0.0}, "adamw has its own betas"),
        "confuse_other_objective": ({"forget_loss": "mlp_confuse", "objective": "graddiff", "layers": None,
                                     "retain_loss": "nll"}, "--objective graddiff has its own: drop --forget_loss"),
        "relative_other_objective": ({"objective": "graddiff", "layers": None, "retain_loss": "relative"},
                                     "--retain_loss relative does not apply to --objective graddiff"),
        "targets_with_blocks": ({**SGD, "full_targets": "gate_proj", "blocks": "1-2"},
                                "--full_targets gate_proj with --blocks 1-2: both pick the weights"),
    }[case]
    (setup / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    error = InputError if case in ("empty_corpus", "empty_budget") else ConfigError
    with pytest.raises(error, match=match):
        unlearn(_config(setup, **kw))
    assert not list((setup / "runs").glob("*/metrics.jsonl")) and not list((setup / "runs").glob("*/run_config.json"))


def test_the_command_line_reports_a_bad_combination_as_a_usage_error(setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(unlearn_argv(setup, "--cir", "--optimizer", "sgd", "--weight_decay", "0"))
    assert exit_info.value.code == 2 and "add --full" in capsys.readouterr().err


def test_general_loss_budget_stops_training_and_the_summary_says_where(setup, monkeypatch):
    """Checked every --cir_budget_every steps against the loss before training: 2.1 is within 10 % of 2.0, 2.3 is
    not (the general-text variant, whose directions are re-estimated before steps 0 and 2)."""
    measured = iter([2.0, 2.1, 2.3])
    monkeypatch.setattr(RobustStep, "general_loss", lambda self: next(measured))
    run_dir = unlearn(_config(setup, **CIR, examples=32, cir_refresh=2, cir_budget_every=2, cir_max_loss_rise=0.1,
                              cir_corpus="retain"))
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 8 and summary["stopped_early_at_step"] == 4 and len(lines) == 4
    assert [line.get("general_loss") for line in lines] == [None, 2.1, None, 2.3]
    assert summary["general_loss_start"] == 2.0 and summary["general_loss_end"] == 2.3
    assert [line.get("cir_refreshed") for line in lines] == [1.0, None, 1.0, None]
    assert (run_dir / "merged" / "model.safetensors").exists()




def test_a_budget_crossed_at_the_last_check_is_warned_and_recorded(setup, monkeypatch, caplog):
    """Checks after steps 4 and 8 against 2.0 with a 10 % budget: 2.3 at the last step has nothing left to stop,
    so the run ends, but over its budget, and says so."""
    measured = iter([2.0, 2.1, 2.3])
    monkeypatch.setattr(RobustStep, "general_loss", lambda self: next(measured))
    with caplog.at_level("WARNING", logger="lensunlearn"):
        run_dir = unlearn(_config(setup, **CIR, examples=32, cir_budget_every=4, cir_max_loss_rise=0.1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["stopped_early_at_step"] is None
    assert summary["over_budget_at_end"] is True and summary["general_loss_end"] == 2.3
    assert any("the run ends over its budget" in r.getMessage() for r in caplog.records)


def test_a_budget_within_reach_at_the_end_is_not_flagged(setup, monkeypatch):
    measured = iter([2.0, 2.1, 2.15])
    monkeypatch.setattr(RobustStep, "general_loss", lambda self: next(measured))
    run_dir = unlearn(_config(setup, **CIR, examples=32, cir_budget_every=4, cir_max_loss_rise=0.1))
    assert json.loads((run_dir / "summary.json").read_text())["over_budget_at_end"] is False


def test_budget_every_zero_checks_once_per_pass_over_the_forget_documents(setup, monkeypatch):
    """Three forget documents at 2 per step: a pass is 2 steps, so 16 examples (8 steps) are checked after
    steps 2, 4, 6 and 8, as CIR's code checks once per epoch."""
    measured = iter([2.0, 2.01, 2.02, 2.03, 2.04])
    monkeypatch.setattr(RobustStep, "general_loss", lambda self: next(measured))
    run_dir = unlearn(_config(setup, **CIR, examples=16, batch=2, cir_budget_every=0, cir_max_loss_rise=0.1))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "general_loss" in line] == [2, 4, 6, 8]


def test_a_negative_budget_period_is_refused(setup):
    with pytest.raises(ConfigError, match="cir_budget_every"):
        _config(setup, **CIR, cir_budget_every=-1)


def test_shrink_rule_halves_the_learning_rate_past_the_budget_and_goes_on(setup, monkeypatch):
    """Checks after steps 2, 4, 6 and 8 against 2.0 with a 10 % budget: 2.1 passes, 2.3 and 2.25 each halve the
    learning rate from the next step on; the last step's 2.3 changes nothing (the run ends there anyway)."""
    from lensunlearn.train.optim import lr_factor

    measured = iter([2.0, 2.1, 2.3, 2.25, 2.3])
    monkeypatch.setattr(RobustStep, "general_loss", lambda self: next(measured))
    cfg = _config(setup, **CIR, examples=32, cir_budget_every=2, cir_max_loss_rise=0.1, cir_on_loss_rise="shrink")
    run_dir = unlearn(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 8 and len(lines) == 8 and summary["stopped_early_at_step"] is None
    assert summary["lr_shrunk_at_steps"] == [4, 6]
    scales = [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]
    for step, (line, scale) in enumerate(zip(lines, scales, strict=True)):
        assert line["lr"] == pytest.approx(cfg.lr * lr_factor(step, 8, cfg.warmup, cfg.schedule) * scale)
    assert [line["lr_scale"] for line in lines] == scales


def test_shrink_rule_stops_once_the_learning_rate_would_fall_below_a_hundredth(setup, monkeypatch):
    measured = iter([2.0, 2.3, 2.3, 2.3])
    monkeypatch.setattr(RobustStep, "general_loss", lambda self: next(measured))
    run_dir = unlearn(_config(setup, **CIR, examples=32, cir_budget_every=2, cir_max_loss_rise=0.1,
                              cir_on_loss_rise="shrink", cir_shrink=0.05))
    summary = json.loads((run_dir / "summary.json").read_text())
    # 0.05 after step 2; 0.0025 would be below 0.01, so step 4 stops the run
    assert summary["lr_shrunk_at_steps"] == [2] and summary["stopped_early_at_step"] == 4


def test_the_shrunk_learning_rate_is_in_the_checkpoint_state(setup):
    step, *_ = _step(setup, **CIR, cir_max_loss_rise=0.1, cir_on_loss_rise="shrink")
    step.refresh(0)  # a checkpoint is written after the first estimate of the shared directions
    step.lr_scale, step.shrunk_at = 0.25, [4, 6]
    fresh, *_ = _step(setup, **CIR, cir_max_loss_rise=0.1, cir_on_loss_rise="shrink")
    assert fresh.lr_scale == 1.0
    fresh.load_state_dict(step.state_dict())
    assert fresh.lr_scale == 0.25 and fresh.shrunk_at == [4, 6]


def test_resume_after_a_kill_ends_with_the_same_weights(setup):
    """Every piece of the step's state is in the checkpoint: the shared directions (estimated before step 0
    and after step 3), the forget-token moments of the window under way (the kill comes after step 2, one step
    into the second window), the running retain average, the first step's norm, the attacker's offset (forked
    at 0 and 3) and the general loss at the start."""
    extra = ["--examples", "20", "--checkpoint_every", "2", "--full", "--cir", "--optimizer", "sgd", "--weight_decay",
             "0", "--cir_act_components", "3", "--cir_grad_components", "4", "--cir_refresh", "3",
             "--disruption_mask", "--normalise_grad", "--momentum", "0", "--clip", "0", "--adversary_steps", "1",
             "--adversary_every", "3", "--adversary_decay", "0.5", "--forget_target", "random"]
    straight = main(unlearn_argv(setup, *extra, "--run_name", "straight"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT,
                             *unlearn_argv(setup, *extra, "--run_name", "killed")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (setup / "runs" / "killed" / "checkpoint.pt").exists()
    resumed = main(unlearn_argv(setup, *extra, "--run_name", "killed", "--resume"))
    a = load_file(straight / "merged" / "model.safetensors")
    b = load_file(resumed / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(setup / "tiny" / "model.safetensors")
    assert any(not torch.equal(base[k], a[k]) for k in base)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    """The step bypasses DDP (and FSDP: full weights stay whole on every process) and averages its own
    gradients: two processes with half the micro-batches each end where one process does."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from _dist_worker import run

    write_unlearn_inputs(tmp_path, "gpt_neox")
    base = dict(model=str(tmp_path / "tiny"), lens=str(tmp_path / "lens"), layers=(1, 3),
                forget=str(tmp_path / "forget.jsonl"), retain=str(tmp_path / "retain.jsonl"), retain_config=None,
                retain_column=None, examples=8, batch=4, per_device_batch=1, max_length=16, eval_tasks="",
                lora_dropout=0.0, device="cpu", checkpoint_every=0)
    runs = {"full_mudman": dict(**SGD, disruption_mask=True, normalise_grad=True, adversary_steps=1),
            "full_cir": dict(**CIR, momentum=0.0, disruption_mask=True, cir_refresh=1)}
    two = [{**base, **extra, "out": str(tmp_path / "two"), "run_name": name} for name, extra in runs.items()]
    mp.spawn(run, args=(2, _free_port(), two), nprocs=2, join=True)
    threads = torch.get_num_threads()
    try:
        run(0, 1, _free_port(), [{**c, "out": str(tmp_path / "one")} for c in two])
    finally:  # the worker runs on one thread; later tests in this process compare with subprocesses
        torch.set_num_threads(threads)
    for name in runs:
        a = load_file(tmp_path / "one" / name / "merged" / "model.safetensors")
        b = load_file(tmp_path / "two" / name / "merged" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
        original = load_file(tmp_path / "tiny" / "model.safetensors")
        assert any(not torch.equal(original[k], a[k]) for k in original if k in a), name
        m1, m2 = ([json.loads(line) for line in (tmp_path / d / name / "metrics.jsonl").read_text().splitlines()]
                  for d in ("one", "two"))
        for x, y in zip(m1, m2, strict=True):
            assert x["masked_fraction"] == pytest.approx(y["masked_fraction"], abs=1e-3)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
