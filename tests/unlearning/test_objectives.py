"""`unlearn --objective`: each baseline's losses against their formulas written out here, RMU's steering,
the order in which sequential unlearning trains its blocks, resume after a kill, the refusals, the
objectives' own settings over a preset, and the lens objective left exactly as it was."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lensunlearn.cli import _config, _parse, configure, main
from lensunlearn.core.config import ConfigError
from lensunlearn.modeling.layers import model_parts
from lensunlearn.modeling.losses import (
    cosine_relu,
    mean_squared_error,
    npo_loss,
    pairwise_cosine_relu,
    rmu_control_vector,
    sequence_sums,
    simnpo_loss,
)
from lensunlearn.unlearning import run as unlearn_module
from lensunlearn.unlearning.baseline_options import OBJECTIVE_SETTINGS, OBJECTIVES
from lensunlearn.unlearning.baselines import (
    GradDiffObjective,
    NPOObjective,
    RerouteObjective,
    RMUObjective,
    SequentialObjective,
    SimNPOObjective,
    phase_starts,
    warn_if_saturated,
    weights,
)
from lensunlearn.unlearning.objective import FrozenCopy
from lensunlearn.unlearning.run import PRESETS, UnlearnConfig

from ..conftest import make_tiny_model, unlearn_argv, write_unlearn_inputs
from .test_run import _KILL_AFTER_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(tmp_path):
    return write_unlearn_inputs(tmp_path, "llama")


def _argv(tmp: Path, *extra: str) -> list[str]:
    """The tiny `unlearn` line without its --layers (each objective here names its own, or none)."""
    argv = unlearn_argv(tmp)
    at = argv.index("--layers")
    return [*argv[:at], *argv[at + 2:], *extra]


# --- the losses, against their formulas on small tensors ------------------------------------------


def test_tensor_losses_are_their_papers_formulas():
    # RMU's target: uniform in the unit cube, scaled to norm c, the same for the same seed
    u = rmu_control_vector(6, 4.0, seed=3)
    assert u.norm().item() == pytest.approx(4.0) and (u > 0).all() and torch.equal(u, rmu_control_vector(6, 4.0, 3))
    assert not torch.equal(u, rmu_control_vector(6, 4.0, 4))
    h, t = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([1.0, 0.0])
    assert mean_squared_error(h, t).tolist() == pytest.approx([(0 + 4) / 2, (1 + 1) / 2])

    def log_sigmoid(x: float) -> float:
        return math.log(1 / (1 + math.exp(-x)))

    nll, ref, beta = torch.tensor([2.0, 5.0]), torch.tensor([1.0, 5.5]), 0.5
    assert npo_loss(nll, ref, beta).tolist() == pytest.approx(
        [-(2 / beta) * log_sigmoid(beta * (2.0 - 1.0)), -(2 / beta) * log_sigmoid(beta * (5.0 - 5.5))])
    lengths, gamma = torch.tensor([4, 10]), 0.3
    assert simnpo_loss(nll, lengths, beta, gamma).tolist() == pytest.approx(
        [-(2 / beta) * log_sigmoid(beta * 2.0 / 4 - gamma), -(2 / beta) * log_sigmoid(beta * 5.0 / 10 - gamma)])
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    assert cosine_relu(a, b).tolist() == pytest.approx([1 / math.sqrt(2), 0.0, 1.0])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # ordered pairs: cos(0,1) = cos(1,0) = 1/sqrt(2); cos(0,2) = -1 and cos(1,2) = -1/sqrt(2) count as 0
    assert pairwise_cosine_relu(p).item() == pytest.approx(2 / math.sqrt(2) / 6)
    assert pairwise_cosine_relu(p[:1]).item() == 0.0
    assert sequence_sums(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 0]), 3).tolist() == [4.0, 0.0, 2.0]


def _objective_inputs(arch: str = "llama"):
    """A tiny model moved away from its frozen original, and a right-padded batch."""
    model, _ = make_tiny_model(arch)
    original = FrozenCopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return model, original, {"input_ids": ids, "attention_mask": mask}


def _token_nll(model, batch, skip_first: int) -> tuple[list[list[float]], list[int]]:
    """Next-token NLL written out: for each sequence, -log p(x_t | x_<t) at real targets t >= max(1, skip)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    per_seq = []
    for b in range(ids.shape[0]):
        per_seq.append([-logp[b, t - 1, ids[b, t]] for t in range(max(1, skip_first), ids.shape[1]) if mask[b, t]])
    return per_seq, [len(s) for s in per_seq]


@pytest.mark.parametrize("full", [True, False], ids=["frozen-unembedding", "trained-unembedding"])
def test_next_token_objectives_are_their_formulas(full):
    model, original, batch = _objective_inputs()
    model.requires_grad_(not full)  # a frozen unembedding takes the fused cross-entropy, a trained one plain
    args = (model, (model_parts(model).num_layers,), original)
    skip = 1
    per_seq, lengths = _token_nll(model, batch, skip)
    ref_seq, _ = _token_nll(original.model, batch, skip)
    flat = [v for s in per_seq for v in s]
    with torch.no_grad():
        graddiff = GradDiffObjective(*args, "nll", skip_first=skip)
        assert graddiff.forget_loss(batch).item() == pytest.approx(-(sum(flat) / len(flat)).item(), rel=1e-5)
        assert graddiff.retain_loss(batch).item() == pytest.approx((sum(flat) / len(flat)).item(), rel=1e-5)
        beta = 0.7
        npo = NPOObjective(*args, "nll", skip_first=skip, beta=beta)
        expected = [-(2 / beta) * math.log(1 / (1 + math.exp(-beta * (sum(s) - sum(r)).item())))
                    for s, r in zip(per_seq, ref_seq)]
        assert npo.forget_loss(batch).item() == pytest.approx(sum(expected) / 3, rel=1e-5)
        gamma = 0.4
        simnpo = SimNPOObjective(*args, "nll", skip_first=skip, beta=beta, gamma=gamma)
        expected = [-(2 / beta) * math.log(1 / (1 + math.exp(-(beta * sum(s).item() / n - gamma))))
                    for s, n in zip(per_seq, lengths)]
        assert simnpo.forget_loss(batch).item() == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_simnpo_warns_once_when_its_loss_starts_saturated(caplog):
    """beta x the mean token loss far above 1 leaves SimNPO's forget gradient near 0: the first batch says so
    and names a beta near 1 / token loss; a beta in the live range says nothing."""
    model, original, batch = _objective_inputs()
    args = (model, (model_parts(model).num_layers,), original, "nll")
    per_seq, lengths = _token_nll(model, batch, 1)
    mean_nll = torch.tensor([sum(s).item() / n for s, n in zip(per_seq, lengths)])
    typical = mean_nll.mean().item()
    saturated_beta, live_beta = 20 / typical, 0.5 / typical
    weight = warn_if_saturated(mean_nll, saturated_beta, 0.0)
    assert weight == pytest.approx(torch.sigmoid(-saturated_beta * mean_nll).mean().item(), rel=1e-6)
    assert weight < 1e-6
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        saturated = SimNPOObjective(*args, skip_first=1, beta=saturated_beta, gamma=0.0)
        saturated.forget_loss(batch)
        saturated.forget_loss(batch)  # checked once: the forget loss is meant to saturate as the model forgets
        SimNPOObjective(*args, skip_first=1, beta=live_beta, gamma=0.0).forget_loss(batch)
    warnings = [r.getMessage() for r in caplog.records if "saturated" in r.getMessage()]
    assert len(warnings) == 1
    assert f"lower --beta to about {1 / typical:.2g}" in warnings[0] and f"{typical:.2f}" in warnings[0]
    assert warn_if_saturated(mean_nll, live_beta, 0.0) == pytest.approx(
        torch.sigmoid(-live_beta * mean_nll).mean().item(), rel=1e-6) and live_beta * typical == pytest.approx(0.5)


def test_representation_objectives_are_their_formulas():
    model, original, batch = _objective_inputs()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    skip = 1
    keep = mask.clone()
    keep[:, :skip] = 0
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hidden0 = original.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    tokens = [(b, t) for b in range(ids.shape[0]) for t in range(ids.shape[1]) if keep[b, t]]
    with torch.no_grad():
        # RMU: mean over tokens of the mean squared distance to c u; retain: to the original's stream
        rmu = RMUObjective(model, (2,), original, "mse", skip_first=skip, steering_coef=5.0, seed=0)
        u = rmu_control_vector(32, 5.0, 0)
        expected = sum(((hidden[2][b, t] - u) ** 2).mean() for b, t in tokens) / len(tokens)
        assert rmu.forget_loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)
        expected = sum(((hidden[2][b, t] - hidden0[2][b, t]) ** 2).mean() for b, t in tokens) / len(tokens)
        assert rmu.retain_loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)

        # rerouting: mean over layers and tokens of relu(cos(h, h0)); the orthogonal term on pooled streams
        layers, orth = (1, 3), 0.5
        rr = RerouteObjective(model, layers, original, "l2", skip_first=skip, orth_coef=orth)

        def cos(x, y):
            return (x @ y / (x.norm() * y.norm())).item()

        reroute = sum(sum(max(0.0, cos(hidden[l][b, t], hidden0[l][b, t])) for b, t in tokens) / len(tokens)
                      for l in layers) / len(layers)
        counts = [sum(1 for bb, _ in tokens if bb == b) for b in range(3)]
        orth_terms = []
        for l in layers:
            pooled = [sum(hidden[l][b, t] for bb, t in tokens if bb == b) / counts[b] for b in range(3)]
            orth_terms.append(sum(max(0.0, cos(pooled[i], pooled[j])) for i in range(3) for j in range(3) if i != j)
                              / 6)
        expected = reroute + orth * (sum(orth_terms) / len(layers)) * (sum(counts) / 3)
        assert rr.forget_loss(batch).item() == pytest.approx(expected, rel=1e-5)
        expected = sum(sum((hidden[l][b, t] - hidden0[l][b, t]).norm() for b, t in tokens) / len(tokens)
                       for l in layers) / len(layers)
        assert rr.retain_loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("target", ["uniform", "random"])
def test_sequential_forget_loss_reads_the_trained_stream_through_the_original_blocks(target):
    """The probe: the original model with its stream s replaced (by a hook, here) by the trained model's."""
    model, original, batch = _objective_inputs()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    skip, layer = 1, 2
    keep = mask.clone().bool()
    keep[:, :skip] = False
    stream = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]

    def replace(_module, args, kwargs):
        return (stream, *args[1:]), kwargs

    block = model_parts(original.model).blocks[layer]
    handle = block.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        logits = original.model(input_ids=ids, attention_mask=mask).logits.float()[keep]
    finally:
        handle.remove()
    vocab = logits.shape[-1]
    if target == "uniform":
        per_token = torch.logsumexp(logits, -1) - logits.mean(-1)
    else:
        from lensunlearn.modeling.losses import random_targets

        picked = random_targets(logits.shape[0], vocab, 7 * 1009)
        per_token = torch.logsumexp(logits, -1) - logits.gather(-1, picked[:, None]).squeeze(-1)
    blocks = model_parts(model).blocks
    objective = SequentialObjective(model, (3, 2), original, "l2", skip_first=skip, forget_target=target,
                                    phase_params=[list(blocks[2].parameters()), list(blocks[1].parameters())])
    objective.set_phase(1)
    with torch.no_grad():
        assert objective.forget_loss(batch, target_seed=7).item() == pytest.approx(
            (per_token.mean() / math.log(vocab)).item(), rel=1e-5)
    assert all(p.requires_grad for p in blocks[1].parameters()) and not any(p.requires_grad
                                                                             for p in blocks[2].parameters())


def test_schedules_follow_each_paper():
    plan = {"steps": 10, "steps_per_epoch": 10}
    assert weights("rmu", 3, plan, 100.0, 1.0) == (100.0, 1.0)
    assert weights("npo", 0, plan, 1.0, 2.0) == (1.0, 2.0)
    assert weights("rr", 4, plan, 10.0, 8.0) == pytest.approx((10.0 * 4 / 20, 8.0 * (1 - 4 / 20)))
    assert weights("lens", 5, plan, 4.0, 8.0) == pytest.approx((4.0 * 0.5, 8.0 * (1 - 0.25 * 0.5)))
    starts = phase_starts(10, 3)
    assert starts == [0, 3, 7]
    assert weights("sequential", 3, plan, 4.0, 8.0, starts) == (0.0, 8.0)  # each phase ramps again
    assert weights("sequential", 5, plan, 4.0, 8.0, starts) == pytest.approx((4.0 * 2 / 4, 8.0 * (1 - 0.25 * 0.5)))


# --- training ----------------------------------------------------------------------------------------


def _streams(model_dir: Path, texts: list[str], layer: int) -> torch.Tensor:
    from lensunlearn.modeling.loading import load_model

    model, tokenizer = load_model(str(model_dir), device="cpu")
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer]
    keep = enc["attention_mask"].bool()
    keep[:, 0] = False
    return hidden[keep]


def test_rmu_steers_forget_activations_to_its_target_and_keeps_retain_ones(setup):
    layer, coef = 3, 8.0
    run_dir = main(unlearn_argv(setup, "--objective", "rmu", "--layers", str(layer), "--steering_coef", str(coef),
                                "--lr", "1e-2", "--examples", "96", "--skip_first", "1", "--retain_coef", "1"))
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["objective"] == "rmu" and config["full"] and config["retain_loss"] == "mse"
    forget = [json.loads(l)["text"] for l in (setup / "forget.jsonl").read_text().splitlines()]
    retain = [json.loads(l)["text"] for l in (setup / "retain.jsonl").read_text().splitlines()]
    target = rmu_control_vector(32, coef, 0)
    before, after = _streams(setup / "tiny", forget, layer), _streams(run_dir / "merged", forget, layer)
    to_target = lambda h: (h - target).norm(dim=-1).mean().item()  # noqa: E731
    assert to_target(after) < 0.3 * to_target(before)
    assert (after.norm(dim=-1).mean().item() - coef) < 0.3 * abs(before.norm(dim=-1).mean().item() - coef)
    assert F.cosine_similarity(after, target[None], dim=-1).mean() > 0.9 > F.cosine_similarity(before, target[None],
                                                                                                 dim=-1).mean()
    kept, kept_before = _streams(run_dir / "merged", retain, layer), _streams(setup / "tiny", retain, layer)
    drift = (kept - kept_before).norm(dim=-1).mean().item()
    assert drift < 0.2 * (after - before).norm(dim=-1).mean().item()
    # only the MLPs of the three blocks below the layer changed
    base = load_file(setup / "tiny" / "model.safetensors")
    merged = load_file(run_dir / "merged" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".mlp." in k and int(k.split(".")[2]) in (0, 1, 2) for k in changed)


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_sequential_trains_its_blocks_back_to_front(setup, monkeypatch, caplog, full):
    """Streams 3, 2, 1 on a 4-block model: steps 1-2 change block 2 only, steps 3-4 block 1, steps 5-6 block 0."""
    changed_at: list[set[int]] = []
    real_loop = unlearn_module.run_loop

    def recording_loop(spec, start_step=0):
        params = {id(p): p for p in spec.params}
        blocks = model_parts(spec_model[0]).blocks
        owner = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
        last = {k: p.detach().clone() for k, p in params.items()}
        on_step = spec.on_step

        def snapshot(step, metrics):
            on_step(step, metrics)
            changed_at.append({owner[k] for k, p in params.items() if not torch.equal(p.detach(), last[k])})
            last.update({k: p.detach().clone() for k, p in params.items()})

        spec.on_step = snapshot
        return real_loop(spec, start_step)

    spec_model: list = []
    real_setup = unlearn_module.setup_training

    def remember(job):
        setup_ = real_setup(job)
        spec_model.append(setup_.model)
        return setup_

    monkeypatch.setattr(unlearn_module, "run_loop", recording_loop)
    monkeypatch.setattr(unlearn_module, "setup_training", remember)
    run_dir = main(unlearn_argv(setup, "--objective", "sequential", "--layers", "3,2,1", "--examples", "24",
                                "--lr", "1e-2", "--retain_coef", "1", *(["--full"] if full else [])))
    assert changed_at == [{2}, {2}, {1}, {1}, {0}, {0}]
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["layers"] == [3, 2, 1] and "phase_starts" not in config  # they follow from steps and layers
    with caplog.at_level(logging.WARNING):  # its saved config reads back as the run's own: no plan-key warning
        _, again = configure(["unlearn", "--config", str(run_dir / "run_config.json")])
    assert again.objective == "sequential" and again.layers == (3, 2, 1)
    assert not [r for r in caplog.records if r.name == "lensunlearn.core.config"]
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["retain_weight"] for l in lines] == [0.0, 0.5, 0.0, 0.5, 0.0, 0.5]  # the ramp restarts each phase
    assert [l["lr"] for l in lines] == pytest.approx([1e-2, 5e-3] * 3)  # and so does the learning rate's decay


# tiny-model settings for each objective (the table's layers are for a 30-block model)
TINY = {"lens": ["--layers", "1,3"], "rmu": ["--layers", "3"], "rr": ["--layers", "1,3", "--orth_coef", "0.5"],
        "sequential": ["--layers", "3,2,1", "--lora_dropout", "0.3"], "graddiff": [], "npo": ["--full"],
        "simnpo": ["--gamma", "0.5", "--beta", "50"]}  # saturated from the start: the straight run warns


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o != "lens"])
def test_resume_after_a_kill_ends_with_the_same_weights(setup, caplog, objective):
    """Each objective killed right after its step-2 checkpoint and resumed ends as the run never killed."""
    extra = ["--objective", objective, *TINY[objective], "--examples", "16", "--checkpoint_every", "2"]
    straight = main(_argv(setup, *extra, "--run_name", "straight"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT,
                             *_argv(setup, *extra, "--run_name", "killed")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = main(_argv(setup, *extra, "--run_name", "killed", "--resume"))
    if objective == "simnpo":  # the killed run warned at its first step; the resumed model has forgotten
        assert "loss is saturated at the first step" in killed.stderr
        assert not [r for r in caplog.records if "saturated" in r.getMessage()]
    saved = json.loads((resumed / "run_config.json").read_text())
    assert saved["objective"] == objective
    name = "adapter/adapter_model.safetensors" if (straight / "adapter").is_dir() else "merged/model.safetensors"
    a, b = load_file(straight / name), load_file(resumed / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(setup / "tiny" / "model.safetensors")
    merged = load_file(straight / "merged" / "model.safetensors")
    assert any(not torch.equal(base[k], merged[k]) for k in base), "training changed nothing"
    steps = [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_objectives_that_read_no_lens_never_ask_for_one(setup, monkeypatch):
    """No lens anywhere (not even runs/lens_<model>): the lens objective stops on it, the others run."""
    monkeypatch.chdir(setup)
    argv = _argv(setup)
    at = argv.index("--lens")
    del argv[at:at + 2]
    with pytest.raises(FileNotFoundError, match="lens"):
        main([*argv, *TINY["lens"], "--run_name", "lens_run"])
    for objective in ("graddiff", "rmu"):
        run_dir = main([*argv, "--objective", objective, *TINY[objective]])
        assert json.loads((run_dir / "run_config.json").read_text())["lens"] is None


@pytest.mark.parametrize("extra,message", [
    (["--objective", "rmu", "--layers", "1,2"], "rmu steers one layer"),
    (["--objective", "rmu", "--layers", "0"], "layer 0 .* has none"),
    (["--objective", "graddiff", "--layers", "2"], "reads no layer: drop --layers"),
    (["--objective", "npo", "--retain_loss", "l2"], "--retain_loss l2 does not apply to --objective npo: "
                                                     "use nll or kl"),
    (["--objective", "rmu", "--retain_loss", "kl"], "use mse"),
    (["--objective", "simnpo", "--forget_target", "random"], "--forget_target random .* has none"),
    (["--objective", "npo", "--orth_coef", "1"], "--orth_coef weights a term of --objective rr"),
    (["--objective", "npo", "--beta", "0"], "beta"),
    (["--objective", "rr", "--layers", "1,3", "--orth_coef", "0.5", "--per_device_batch", "1"],
     "--orth_coef compares the forget sequences of one micro-batch, and --per_device_batch 1 holds one"),
    (["--objective", "sequential", "--layers", "3,2", "--disruption_mask"], "sequential trains one block per phase"),
    (["--objective", "sequential", "--layers", "3,2,1", "--examples", "8"], "phase of the run's 2 steps"),
    (["--objective", "lens", "--retain_loss", "nll"], "use l2 or kl"),
])
def test_settings_an_objective_cannot_use_are_refused_in_one_line(setup, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(setup, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (setup / "runs").exists() or not list((setup / "runs").iterdir())


def _parsed(*argv: str) -> UnlearnConfig:
    _, command, args = _parse(["unlearn", *argv])
    return _config(command, args)


def test_an_objective_brings_its_own_settings_over_the_presets_budget():
    small = PRESETS["small"]
    assert _parsed("--preset", "small") == small and _parsed("--preset", "small", "--objective", "lens") == small
    for objective, settings in OBJECTIVE_SETTINGS.items():
        cfg = _parsed("--preset", "small", "--objective", objective)
        assert cfg.objective == objective
        assert {k: getattr(cfg, k) for k in settings} == settings
        for budget in ("examples", "batch", "per_device_batch", "max_length", "epochs", "forget", "retain",
                       "eval_tasks", "skip_first"):
            assert getattr(cfg, budget) == getattr(small, budget), budget
    explicit = _parsed("--preset", "small", "--objective", "rmu", "--lr", "3e-4", "--layers", "12")
    assert explicit.lr == 3e-4 and explicit.layers == (12,) and explicit.steering_coef == \
        OBJECTIVE_SETTINGS["rmu"]["steering_coef"]
    assert _parsed("--objective", "npo").examples == PRESETS["reference"].examples  # the default preset's budget
    with pytest.raises(ConfigError):
        UnlearnConfig(objective="npo", layers=(3,))
    assert typing.get_args(typing.get_type_hints(UnlearnConfig)["objective"]) == OBJECTIVES


def test_run_names_say_the_objective():
    assert UnlearnConfig(examples=400).name == "smollm2-135m_lens_ex400_rm5.0_ret5.0"
    cfg = _parsed("--preset", "small", "--objective", "npo")
    assert cfg.name.startswith("smollm2-135m_npo_ex1600_") and f"_beta{cfg.beta}" in cfg.name


# The lens objective's losses and gradient norms, as the code before the baselines existed wrote them
# (one torch thread, where this code writes the same numbers bit for bit); other thread counts and
# CPUs round float sums differently, by about 1e-7 here, hence the tolerance.
LENS_BEFORE = {
    "lora": [(1.0017985701560974, 0.0, 0.008253436535596848),
             (1.001696527004242, 0.00366573897190392, 0.38118353486061096),
             (1.0017555356025696, 0.0017288440722040832, 0.5142669677734375),
             (1.0017268061637878, 0.0012664919486269355, 0.8418149948120117)],
    "full_kl_random": [(0.9976799786090851, 0.0, 1.0602390766143799),
                       (1.0056613087654114, 0.00026935996720567346, 1.1526199579238892),
                       (1.0018304586410522, 0.00026420020731166005, 0.9683213233947754),
                       (1.0001471638679504, 0.0001596252914168872, 0.9214000105857849)],
}


@pytest.mark.parametrize("case", list(LENS_BEFORE))
def test_the_default_lens_objective_is_unchanged(setup, case):
    extra = ["--examples", "16"] + (["--full", "--retain_loss", "kl", "--forget_target", "random"]
                                    if case != "lora" else [])
    run_dir = main(unlearn_argv(setup, *extra))
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [(l["forget_loss"], l["retain_loss"], l["grad_norm"]) for l in lines]
    for row, want in zip(got, LENS_BEFORE[case], strict=True):
        assert row == pytest.approx(want, rel=1e-5, abs=1e-7)


# --- under torchrun -----------------------------------------------------------------------------------

DIST_RUNS = {
    "sequential_lora": dict(objective="sequential", layers=(3, 2), retain_loss="l2"),  # gradients averaged by hand
    "sequential_full": dict(objective="sequential", layers=(3, 2), retain_loss="l2", full=True),
    "rmu_full": dict(objective="rmu", layers=(3,), retain_loss="mse", full=True, lr=1e-2),  # FSDP2, frozen rest
    "npo_lora": dict(objective="npo", layers=None, retain_loss="nll", beta=0.5),  # DDP
    # FSDP2; two sequences per micro-batch for the orthogonal term to compare (2 per device x 1 x 2 ranks)
    "rr_full": dict(objective="rr", layers=(1, 3), orth_coef=0.5, full=True, per_device_batch=2),
}


def test_two_gloo_processes_match_one_process(tmp_path):
    """Each objective's run by two processes (global batch 4 = 1 per device x 2 accumulation x 2; rr: 2 per
    device x 1 x 2) ends with the weights of the same run by one process."""
    import socket

    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT / "tests" / "train"))
    from _dist_worker import run

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    write_unlearn_inputs(tmp_path, "gpt_neox")
    base = dict(model=str(tmp_path / "tiny"), forget=str(tmp_path / "forget.jsonl"),
                retain=str(tmp_path / "retain.jsonl"), retain_config=None, retain_column=None, examples=8, batch=4,
                per_device_batch=1, max_length=16, eval_tasks="", lora_dropout=0.0, device="cpu",
                checkpoint_every=0)
    two = [{**base, **extra, "out": str(tmp_path / "two"), "run_name": name} for name, extra in DIST_RUNS.items()]
    mp.spawn(run, args=(2, port(), two), nprocs=2, join=True)
    run(0, 1, port(), [{**c, "out": str(tmp_path / "one")} for c in two])
    for name in DIST_RUNS:
        a = load_file(tmp_path / "one" / name / "merged" / "model.safetensors")
        b = load_file(tmp_path / "two" / name / "merged" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            # float32 sums in another order (FSDP2's reduce-scatter): a few 1e-6 apart after the steps
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name, k=key: f"{n} {k}: {m}")
        original = load_file(tmp_path / "tiny" / "model.safetensors")
        assert any(not torch.equal(original[k], a[k]) for k in original if k in a), f"{name}: training changed nothing"
        m1 = [json.loads(l) for l in (tmp_path / "one" / name / "metrics.jsonl").read_text().splitlines()]
        m2 = [json.loads(l) for l in (tmp_path / "two" / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["forget_loss"] for x in m1] == pytest.approx([y["forget_loss"] for y in m2], rel=1e-5)
        assert [x["grad_norm"] for x in m1] == pytest.approx([y["grad_norm"] for y in m2], rel=1e-4)


# --- with the robust step, distillation and search ----------------------------------------------------


@pytest.mark.parametrize("objective,extra", [
    ("graddiff", ["--full", "--full_targets", "gate_proj", "--optimizer", "sgd", "--momentum", "0", "--weight_decay",
                  "0", "--clip", "0", "--disruption_mask", "--normalise_grad", "--adversary_steps", "1"]),
    ("npo", ["--full", "--cir", "--optimizer", "sgd", "--weight_decay", "0", "--cir_act_components", "3",
             "--cir_grad_components", "4", "--cir_max_loss_rise", "0"]),
    ("rmu", ["--layers", "3", "--cir", "--optimizer", "muon", "--cir_act_components", "3",
             "--cir_grad_components", "4", "--cir_blocks", "1,2", "--cir_max_loss_rise", "0"]),
    ("rr", ["--layers", "1,3", "--full", "--optimizer", "sgd", "--momentum", "0", "--weight_decay", "0", "--clip", "0",
            "--normalise_grad"]),
])
def test_baselines_take_the_robust_step(setup, objective, extra):
    """CIR's projection and MUDMAN's masking, normalisation and adversary form the gradients of a baseline's
    losses as they do the lens objective's."""
    run_dir = main(_argv(setup, "--objective", objective, "--examples", "8", *extra))
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["objective"] == objective
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all("forget_grad_norm" in l for l in lines)
    if "--disruption_mask" in extra:
        assert all(0 <= l["masked_fraction"] <= 1 for l in lines)
    base = load_file(setup / "tiny" / "model.safetensors")
    merged = load_file(run_dir / "merged" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed
    if "--full_targets" in extra:  # MUDMAN's own target: only gate_proj weights train
        assert all(".mlp.gate_proj." in k for k in changed)
    if "--cir" in extra:  # only the projected MLP weights train
        assert all(".mlp." in k and k.endswith(".weight") for k in changed)
        if objective == "rmu":
            assert {int(k.split(".")[2]) for k in changed} <= {1, 2}


def test_a_baseline_run_can_be_distilled(setup):
    """UNDO's distillation reads a baseline's run as it reads a lens run."""
    from ..conftest import run_command, write_jsonl

    source = main(_argv(setup, "--objective", "simnpo", "--run_name", "src"))
    write_jsonl(setup / "text.jsonl", [{"text": f"the symbol of iron is {i} and gold {i + 2} ."} for i in range(8)])
    out = run_command(["distill", "--run", str(source), "--corpus", str(setup / "text.jsonl"),
                                         "--generic", str(setup / "text.jsonl"), "--max_length", "16", "--batch", "4",
                                         "--per_device_batch", "4", "--steps", "2", "--device", "cpu", "--out",
                                         str(setup / "distilled")])
    assert (out / "merged" / "model.safetensors").is_file()
    assert json.loads((out / "run_config.json").read_text())["forget"] == str(setup / "forget.jsonl")


def test_a_search_over_objectives_and_their_settings(setup):
    """`search --grid objective=...`: each point takes its objective's own settings, then the grid's; no lens."""
    import shlex

    from ..conftest import run_command, write_jsonl

    write_jsonl(setup / "capitals.jsonl", [
        {"question": f"the capital of {c} ?", "prompt": f"the capital of {c} is",
         "choices": ["paris", "rome", "madrid", "berlin"], "answer": a}
        for c, a in (("france", 0), ("italy", 1), ("spain", 2))])
    (setup / "generic.txt").write_text("it was a question of gold and iron .\n")
    fixed = _argv(setup, "--eval_tasks", str(setup / "capitals.jsonl"), "--eval_format", "cloze")[1:]
    at = fixed.index("--out")
    del fixed[at:at + 2]
    at = fixed.index("--lens")
    del fixed[at:at + 2]
    summary = run_command([
        "search", "--unlearn", shlex.join(fixed), "--out", str(setup / "search"), "--generic",
        str(setup / "generic.txt"), "--grid", "objective=graddiff,npo", "--grid", "beta=0.1,1"])
    points = {p["name"]: p for p in summary["points"]}
    assert set(points) == {f"objective{o}_beta{b}" for o in ("graddiff", "npo") for b in ("0.1", "1")}
    for name, point in points.items():
        saved = json.loads((Path(point["run_dir"]) / "run_config.json").read_text())
        objective = name.split("_")[0][len("objective"):]
        assert saved["objective"] == objective and saved["beta"] == float(name.split("beta")[1])
        assert saved["retain_loss"] == "nll" and saved["lr"] == OBJECTIVE_SETTINGS[objective]["lr"]
        assert point["metrics"]["forget"]["task"] == "capitals"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_help_shows_the_objectives_own_defaults(capsys, objective):
    """`unlearn --objective NAME --help` shows NAME's own settings as the defaults (the lens objective: the
    preset's), and the help of --objective names each objective's paper."""
    with pytest.raises(SystemExit):
        main(["unlearn", "--preset", "small", "--objective", objective, "--help"])
    text = " ".join(capsys.readouterr().out.split())

    def shown(flag: str) -> str:
        match = re.search(rf"--{flag} (X|LR|LIST|\{{[^}}]*\}}) (.*?)\(default: ([^)]*)\)", text)
        assert match, flag
        return match.group(3)

    settings = {**{k: getattr(PRESETS["small"], k) for k in ("lr", "retain_loss", "retain_coef", "forget_coef")},
                **OBJECTIVE_SETTINGS.get(objective, {})}
    assert shown("lr") == str(settings["lr"]) and shown("retain_coef") == str(settings["retain_coef"])
    assert shown("forget_coef") == str(settings["forget_coef"])
    assert shown("retain_loss") == settings["retain_loss"]
    layers = settings.get("layers", PRESETS["small"].layers)
    in_words = "lens: 5,10,15,20,25,30, keeping those a shallower model has; graddiff, npo, simnpo: none"
    assert shown("layers") == (",".join(map(str, layers)) if layers else in_words)
    for name, value in OBJECTIVE_SETTINGS.get(objective, {}).items():
        if name in ("steering_coef", "beta", "gamma", "orth_coef"):
            assert shown(name) == str(value), name
    for paper in ("The WMDP Benchmark", "Negative Preference Optimization", "Simplicity Prevails", "Circuit Breakers"):
        assert paper in text
