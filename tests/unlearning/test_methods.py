"""CIR, MUDMAN and their update rule as the papers run them, on tiny models: shared directions from the
forget tokens, the exact plain-SGD step with a global-norm rescale, the masked step on full-rank
gate_proj weights, the MLP-output forget loss and the relative retain loss, the held-out budget text,
the presets, and resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lensunlearn.cli import main
from lensunlearn.data.corpora import collate, tokenize
from lensunlearn.data.facts import generic_texts
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.layers import block_mlp, capture_mlp_outputs, forward_streams
from lensunlearn.modeling.loading import load_model
from lensunlearn.modeling.losses import mlp_confuse, relative_distance, select_tokens
from lensunlearn.unlearning.cir import Moments, TokenCapture, shared_basis, top_eigenvectors
from lensunlearn.unlearning.mudman import lm_loss
from lensunlearn.unlearning.objective import FrozenCopy, UnlearnObjective
from lensunlearn.unlearning.robust_step import RobustStep, budget_documents, loss_mask
from lensunlearn.unlearning.run import PRESETS, UnlearnConfig, target_linears, unlearn

from ..conftest import unlearn_argv, write_jsonl, write_unlearn_inputs
from .test_robust_step import CIR, RETAIN, _step
from .test_run import _KILL_AFTER_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
GATES = ("gate_proj",)


@pytest.fixture
def setup(tmp_path):
    """The tiny inputs, plus a forget and a retain corpus of one document each: every batch is then the
    same text, so a step can be recomputed by hand whatever the data order."""
    write_unlearn_inputs(tmp_path, "llama")
    write_jsonl(tmp_path / "one_forget.jsonl", [{"text": "the capital of france is paris ."}])
    write_jsonl(tmp_path / "one_retain.jsonl", [{"text": "the symbol of gold is 1 and iron 2"}])
    return tmp_path


def _config(tmp: Path, **kw) -> UnlearnConfig:
    base = dict(model=str(tmp / "tiny"), lens=str(tmp / "lens"), layers=(1, 3), forget=str(tmp / "one_forget.jsonl"),
                retain=str(tmp / "one_retain.jsonl"), retain_config=None, retain_column=None, examples=8, batch=4,
                per_device_batch=2, max_length=16, out=str(tmp / "runs"), eval_tasks="", device="cpu")
    return UnlearnConfig(**{**base, **kw})


def _batch(tokenizer, text: str) -> dict[str, torch.Tensor]:
    return collate([tokenizer(text)["input_ids"]], tokenizer.pad_token_id)


def _projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


# --- the shared directions -----------------------------------------------------------------------


def test_moments_are_the_mean_and_covariance_of_the_vectors_even_far_from_zero():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=generator) @ torch.randn(12, 12, generator=generator) + 1000.0
    moments = Moments()
    for part in torch.split(x, [1, 7, 92, 200]):  # batches of any size merge into the same moments
        moments.add(part)
    x64 = x.double()
    assert moments.count == 300
    torch.testing.assert_close(moments.mean.double(), x64.mean(0), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(moments.scatter.double() / 300, torch.cov(x64.T, correction=0), rtol=1e-3, atol=1e-3)
    # a far-off mean is what a one-pass sum of squares gets wrong in float32; the pairwise merge does not
    naive = (x.T @ x) / 300 - torch.outer(x.mean(0), x.mean(0))
    assert (naive.double() - torch.cov(x64.T, correction=0)).abs().max() > 10 * \
        (moments.scatter.double() / 300 - torch.cov(x64.T, correction=0)).abs().max()
    # its basis spans the mean and the top principal components, as `shared_basis` of the vectors does
    basis = moments.basis(4, seed=1)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(_projector(basis), _projector(shared_basis(x, 4, seed=1)), rtol=0, atol=1e-3)


def test_top_eigenvectors_span_the_leading_eigenspace():
    generator = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator))
    values = torch.cat([torch.tensor([50.0, 20.0, 9.0, 5.0]), torch.rand(36, generator=generator)])
    matrix = q @ torch.diag(values) @ q.T
    top = top_eigenvectors(matrix, 4, seed=0)
    torch.testing.assert_close(_projector(top), _projector(q[:, :4]), rtol=0, atol=1e-4)


def test_cir_directions_come_from_the_forget_tokens_and_the_update_is_orthogonal_to_them(setup):
    """Before the first update the step estimates its directions on the forget batches of the first window
    (here ten steps of the same batch) at the current weights: its bases are those of the forget tokens'
    own inputs and output gradients, not the retain text's. During each step the same forget tokens feed the
    next window's moments, from the pass that forms the update (no extra forward), and every weight update
    is free of the directions."""
    step, objective, trainable, forget, retain = _step(setup, **CIR)
    modules = step.inputs.cir_modules
    capture = TokenCapture(modules)
    with capture.capture(loss_mask(forget, 0)):
        pairs = capture.output_grads(objective.forget_loss(forget, 5))
    with capture.capture(loss_mask(retain, 0)):
        retain_pairs = capture.output_grads(objective.forget_loss(retain, 5))
    forwards = []
    handle = objective.model.register_forward_pre_hook(lambda *args: forwards.append(1))  # passes stop early
    step(forget, retain, 0.0, 1.0, 5, 0)
    handle.remove()
    assert step.step_metrics["cir_refreshed"] == 1.0
    # 10 forwards of the first estimate (no update) and 1 for the update; none for the moments
    assert len(forwards) == 11
    tokens = int(loss_mask(forget, 0).sum())
    assert step.moments.tokens == tokens
    for name, module in modules.items():
        (acts, grads), = pairs[name]
        act_basis, grad_basis = step.directions.bases[name]
        assert act_basis.shape[1] == 3 and grad_basis.shape[1] == 4
        for found, vectors, count in ((act_basis, acts, 3), (grad_basis, grads, 4)):
            expected = shared_basis(vectors, count)
            torch.testing.assert_close(_projector(found), _projector(expected), rtol=0, atol=2e-3)
            mean = vectors.mean(0)
            assert (mean - _projector(found) @ mean).norm() < 1e-4 * mean.norm()  # the forget mean is removed
        (retain_acts, _), = retain_pairs[name]
        assert (_projector(act_basis) - _projector(shared_basis(retain_acts, 3))).abs().max() > 0.05
        # the window of this step: exactly its forget tokens, as met before the update
        window_acts, window_grads = step.moments.moments[name]
        torch.testing.assert_close(window_acts.mean, acts.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(window_grads.mean, grads.mean(0), rtol=1e-5, atol=1e-9)
        grad = module.weight.grad
        scale = grad.abs().max()
        assert scale > 0, name
        assert (grad @ act_basis).abs().max() < 1e-4 * scale and (grad_basis.T @ grad).abs().max() < 1e-4 * scale


def test_directions_are_re_estimated_every_window_from_the_tokens_of_that_window(setup, monkeypatch):
    """--cir_refresh 2 over 6 steps: the first estimate before step 0, then after steps 2 and 4 (not after the
    last: nothing follows it); each from the forget tokens the steps since the last estimate read."""
    estimated = []
    original = RobustStep._estimate_from_window

    def record(self, done):
        estimated.append((done, self.moments.tokens))
        original(self, done)

    monkeypatch.setattr(RobustStep, "_estimate_from_window", record)
    run_dir = unlearn(_config(setup, **{**CIR, "momentum": 0.0}, examples=24, cir_refresh=2, cir_max_loss_rise=0.0))
    per_step = 4 * 7  # four forget documents of seven tokens a step
    assert estimated == [(2, 2 * per_step), (4, 2 * per_step)]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("cir_refreshed") for line in lines] == [1.0, 1.0, None, 1.0, None, None]


def test_the_budget_is_measured_on_held_out_generic_text_by_default(setup, monkeypatch):
    cfg = _config(setup, **CIR)
    assert cfg.cir_budget_text == "generic:heldout"
    _, tokenizer = load_model(str(setup / "tiny"), device="cpu")
    docs = budget_documents(cfg, [], tokenizer)
    assert docs == [d for d in tokenize(generic_texts("heldout"), tokenizer, cfg.max_length) if len(d) >= 2]
    assert not set(generic_texts("heldout")) & set(generic_texts("retain"))  # nothing trains on it
    measured = []
    monkeypatch.setattr(RobustStep, "general_loss", lambda self: measured.append(self.inputs.budget_docs) or 2.0)
    unlearn(_config(setup, **CIR, examples=16, cir_budget_every=2))
    assert len(measured) == 3 and all(m == docs for m in measured)  # the start, after steps 2 and 4


# --- the update rule -----------------------------------------------------------------------------


def _hand_model(setup: Path, blocks=range(3), names=GATES):
    model, tokenizer = load_model(str(setup / "tiny"), device="cpu")
    lens = TunedLens.load(setup / "lens", model).requires_grad_(False)
    trained = target_linears(model, names, blocks)
    model.requires_grad_(False)
    for module in trained.values():
        module.weight.requires_grad_(True)
    objective = UnlearnObjective(model, lens, (1, 3), FrozenCopy(model))
    return model, tokenizer, objective, {n: m.weight for n, m in trained.items()}


def test_plain_sgd_with_a_global_norm_rescale_takes_exactly_the_expected_steps(setup):
    """Two steps of lr 0.3 with the forget gradient rescaled to global norm 0.5: each step moves the
    gate_proj weights by lr x forget weight x 0.5 along that step's gradient direction and nothing else
    (momentum 0: the second step carries nothing of the first; clip 0; retain weight 0)."""
    run_dir = unlearn(_config(setup, full=True, full_targets="gate_proj", optimizer="sgd", momentum=0.0, clip=0.0,
                              weight_decay=0.0, schedule="constant", normalise_grad=True, grad_norm=0.5, lr=0.3,
                              forget_coef=2.0, retain_coef=0.0))
    model, tokenizer, objective, weights = _hand_model(setup)
    batch = _batch(tokenizer, "the capital of france is paris .")
    for forget_weight in (2.0, 2.0 * (1 - 0.25 * 1 / 2)):  # the schedule: s = step / 2 steps per epoch
        grads = torch.autograd.grad(objective.forget_loss(batch), list(weights.values()))
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        with torch.no_grad():
            for w, g in zip(weights.values(), grads):
                w -= 0.3 * forget_weight * 0.5 * g / norm
    trained = load_file(run_dir / "merged" / "model.safetensors")
    base = load_file(setup / "tiny" / "model.safetensors")
    for name, w in weights.items():
        torch.testing.assert_close(trained[f"{name}.weight"], w.detach(), rtol=1e-5, atol=1e-7)
        assert not torch.equal(trained[f"{name}.weight"], base[f"{name}.weight"])
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed == {f"{n}.weight" for n in weights}  # only the full-rank gate_proj weights of blocks 0-2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["grad_norm"] for line in lines] == pytest.approx([2.0 * 0.5, 1.75 * 0.5], rel=1e-5)


def test_mudman_masks_the_normalised_gradient_and_applies_it_directly_to_gate_proj(setup):
    """One step of MUDMAN's update: the forget gradient rescaled to global norm 1 (measured before the mask),
    kept where its sign agrees with the running average of retain next-token-loss gradients (momentum 0.9:
    0.1 x the first one), and subtracted from the full-rank gate_proj weights at lr x forget weight."""
    run_dir = unlearn(_config(setup, full=True, full_targets="gate_proj", optimizer="sgd", momentum=0.0, clip=0.0,
                              weight_decay=0.0, normalise_grad=True, grad_norm=1.0, disruption_mask=True, lr=0.05,
                              forget_coef=3.0, retain_coef=0.0, examples=4))
    model, tokenizer, objective, weights = _hand_model(setup)
    forget = _batch(tokenizer, "the capital of france is paris .")
    retain = _batch(tokenizer, "the symbol of gold is 1 and iron 2")
    grads = torch.autograd.grad(objective.forget_loss(forget), list(weights.values()))
    retain_grads = torch.autograd.grad(lm_loss(model, retain), list(weights.values()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    trained = load_file(run_dir / "merged" / "model.safetensors")
    kept = masked = 0
    for (name, w), g, r in zip(weights.items(), grads, retain_grads):
        keep = torch.sign(g) == torch.sign(0.1 * r)
        expected = w.detach() - 0.05 * 3.0 * (g / norm) * keep
        torch.testing.assert_close(trained[f"{name}.weight"], expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(trained[f"{name}.weight"][~keep], w.detach()[~keep])  # masked elements do not move
        kept, masked = kept + int(keep.sum()), masked + int((~keep).sum())
    assert kept and masked
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["masked_fraction"] == pytest.approx(masked / (kept + masked), abs=1e-6)


# --- the losses ------------------------------------------------------------------------------------


def test_mlp_confuse_is_its_formula_and_stops_pushing_at_zero():
    org = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])  # mean norm (1 + 1 + 1 + 5) / 4 = 2
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 4.0]], requires_grad=True)
    loss = mlp_confuse([out], [org])
    # dots / 2^2: 0.5, 0 (orthogonal), -0.25 (pointing away), 6.25; clipped at 0 and averaged over 4 tokens
    assert loss.item() == pytest.approx((0.5 + 0 + 0 + 6.25) / 4)
    (grad,) = torch.autograd.grad(loss, out)
    torch.testing.assert_close(grad[[0, 3]], org[[0, 3]] / 4 / 4)
    assert torch.equal(grad[[1, 2]], torch.zeros(2, 2))  # orthogonal or past it: no push at all
    two = mlp_confuse([out, out.detach() * 0], [org, org])  # blocks are averaged; an all-zero output adds 0
    assert two.item() == pytest.approx(loss.item() / 2)


def test_relative_distance_is_the_mean_distance_over_the_mean_norm():
    h0 = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    h = torch.tensor([[3.0, 0.0], [0.0, 1.0]], requires_grad=True)
    assert float(relative_distance(h, h0)) == pytest.approx((4.0 + 0.0) / 2 / ((5.0 + 1.0) / 2))
    assert float(relative_distance(h0 * 100, h0 * 100 + 1)) == pytest.approx(
        float(relative_distance(h0, h0 + 0.01)), rel=1e-5)  # scale-free


def _confuse_objective(setup: Path, blocks, **kw):
    model, tokenizer = load_model(str(setup / "tiny"), device="cpu")
    lens = TunedLens.load(setup / "lens", model).requires_grad_(False)
    original = FrozenCopy(model)
    objective = UnlearnObjective(model, lens, (max(blocks) + 1,), original, forget_loss="mlp_confuse",
                                 confuse_blocks=blocks, **kw)
    return model, tokenizer, original, objective


def test_mlp_confuse_objective_reads_the_chosen_mlps_and_is_zero_once_they_point_away(setup):
    model, tokenizer, original, objective = _confuse_objective(setup, (1, 2), skip_first=1)
    batch = _batch(tokenizer, "the capital of france is paris .")
    mask = loss_mask(batch, 1)
    with torch.no_grad(), capture_mlp_outputs(original.model, (1, 2)) as outs:
        forward_streams(original.model, (3,), batch["input_ids"], batch["attention_mask"])
        expected = [(select_tokens(outs[b], mask).norm(dim=-1) ** 2).mean() /
                    select_tokens(outs[b], mask).norm(dim=-1).mean() ** 2 for b in (1, 2)]
    loss = objective.forget_loss(batch)
    assert float(loss) == pytest.approx(float(sum(expected) / 2), rel=1e-5)  # the model is still the original
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    assert grads["model.layers.2.mlp.down_proj.weight"].abs().max() > 0
    assert all(grads[n] is None or not grads[n].any() for n in params if n.startswith("model.layers.3."))
    # flip the MLP of block 2: its output is the original's negated, every token's term is below 0
    model2, tokenizer, _, only_block_2 = _confuse_objective(setup, (2,))
    with torch.no_grad():
        block_mlp(model2, 2).down_proj.weight.neg_()
    loss = only_block_2.forget_loss(batch)
    params = [p for p in model2.parameters() if p.requires_grad]
    assert float(loss) == 0.0
    assert all(g is None or not g.any() for g in torch.autograd.grad(loss, params, allow_unused=True))


def test_relative_retain_loss_in_the_objective_is_its_formula(setup):
    model, tokenizer, original, objective = _confuse_objective(setup, (1,), retain_loss="relative")
    with torch.no_grad():
        block_mlp(model, 0).down_proj.weight.mul_(1.5)
    batch = _batch(tokenizer, RETAIN[0])
    after = forward_streams(model, (2,), batch["input_ids"], batch["attention_mask"])[2][0]
    before = forward_streams(original.model, (2,), batch["input_ids"], batch["attention_mask"])[2][0]
    expected = (after - before).norm(dim=-1).mean() / before.norm(dim=-1).mean()
    assert float(objective.retain_loss(batch)) == pytest.approx(float(expected), rel=1e-5) and expected > 0


# --- presets and whole runs ------------------------------------------------------------------------


def test_the_paper_presets_hold_their_papers_update_rule():
    cir, cir_mlp, mudman = PRESETS["cir"], PRESETS["cir_mlp"], PRESETS["mudman"]
    for preset in (cir, cir_mlp, mudman):
        assert (preset.full, preset.optimizer, preset.momentum, preset.clip, preset.weight_decay) == \
            (True, "sgd", 0.0, 0.0, 0.0)
        assert preset.normalise_grad and preset.grad_norm == 1.0 and preset.schedule == "constant"
    assert cir.cir and cir.cir_from_forget and cir.cir_budget_text == "generic:heldout" and cir.forget_loss == "lens"
    assert cir_mlp.forget_loss == "mlp_confuse" and cir_mlp.layers is None
    # the relative stream distance, bounded by the streams' scale: the L2 distance swamped the unit forget step
    assert cir.retain_loss == cir_mlp.retain_loss == mudman.retain_loss == "relative"
    assert mudman.full_targets == "gate_proj" and mudman.disruption_mask and mudman.adversary_steps == 1
    assert not mudman.cir
    robust = PRESETS["robust"]  # the general-text variant it was measured with, budget on the same text
    assert robust.cir and not robust.cir_from_forget and robust.cir_corpus == "retain"
    assert robust.cir_budget_text is None


@pytest.mark.parametrize("preset", ["cir_mlp", "mudman"])
def test_the_paper_presets_run_on_the_users_data(setup, preset):
    extra = ["--cir_act_components", "3", "--cir_grad_components", "4"] if preset.startswith("cir") else []
    layers = ["--layers", "1,3"] if preset == "mudman" else []  # cir_mlp: the stream after its confused block
    argv = unlearn_argv(setup, "--preset", preset, "--no-eval_base", "--original_cache_mb", "0",
                        "--lens_matmul", "float32", "--eval_tasks", "", *extra)
    argv = [a for a in argv if a not in ("--layers", "1,3")] + layers
    run_dir = main(argv)
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["optimizer"] == "sgd" and config["momentum"] == 0.0
    base = load_file(setup / "tiny" / "model.safetensors")
    trained = load_file(run_dir / "merged" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    if preset == "mudman":
        assert changed and all(k.endswith("mlp.gate_proj.weight") for k in changed)
    else:  # the default confused block of a 4-block model is block 2, retained at stream 3: MLPs 0-2 train
        assert config["layers"] == [3] and changed
        assert all(".mlp." in k and int(k.split(".")[2]) <= 2 for k in changed)


def test_resume_after_a_kill_ends_with_the_same_weights_for_cir_with_its_own_losses(setup):
    """CIR as the paper runs it (forget-token directions, MLP-output loss, relative retain loss, plain SGD
    rescaled to a global norm), killed after step 2, two steps into a window of three (--cir_refresh 3): the
    resumed run ends bit for bit where an uninterrupted one does."""
    extra = ["--preset", "cir_mlp", "--examples", "24", "--checkpoint_every", "2", "--cir_refresh", "3",
             "--cir_act_components", "3", "--cir_grad_components", "4", "--no-eval_base", "--original_cache_mb", "0",
             "--lens_matmul", "float32", "--retain_coef", "0.5"]

    def argv(name: str, *more: str) -> list[str]:
        args = unlearn_argv(setup, *extra, "--run_name", name, *more)
        return [a for a in args if a not in ("--layers", "1,3")] + ["--layers", "3"]

    straight = main(argv("straight"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # float sums depend on it: the same as this process
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT, *argv("killed")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = torch.load(setup / "runs" / "killed" / "checkpoint.pt", weights_only=True)
    assert state["extra"]["robust"]["moments"]  # a half-filled window was saved
    resumed = main(argv("killed", "--resume"))
    a = load_file(straight / "merged" / "model.safetensors")
    b = load_file(resumed / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(setup / "tiny" / "model.safetensors")
    assert any(not torch.equal(base[k], a[k]) for k in base)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cir_trains_layers_the_forget_loss_does_not_reach_by_the_retain_loss_alone(setup):
    """MLP-output loss on block 1, retain loss at stream 3: --cir trains the MLPs of blocks 0-2, and block 2's has
    no forget tokens to estimate directions on (none to remove either); only the retain loss moves it."""
    base = load_file(setup / "tiny" / "model.safetensors")
    runs = {}
    for retain_coef in (0.0, 1.0):
        runs[retain_coef] = load_file(unlearn(_config(
            setup, **{**CIR, "momentum": 0.0}, forget_loss="mlp_confuse", confuse_blocks=(1,), layers=(3,),
            retain_loss="relative", retain_coef=retain_coef, examples=16, cir_refresh=2, cir_max_loss_rise=0.0,
            run_name=f"ret{retain_coef}")) / "merged" / "model.safetensors")
    block2 = [k for k in base if k.startswith("model.layers.2.mlp.")]
    assert all(torch.equal(runs[0.0][k], base[k]) for k in block2)
    assert any(not torch.equal(runs[1.0][k], base[k]) for k in block2)
    assert any(not torch.equal(runs[0.0][k], base[k]) for k in base if k.startswith("model.layers.1.mlp."))
