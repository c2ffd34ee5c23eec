"""`lensunlearn unlearn` end to end on a tiny model: run directory, refusals, bad input, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lensunlearn.cli import main
from lensunlearn.core.config import ConfigError
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model
from lensunlearn.unlearning.run import PRESETS, UnlearnConfig, unlearn

from ..conftest import save_tiny_model, unlearn_argv, write_unlearn_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(tmp_path):
    return write_unlearn_inputs(tmp_path, "llama")


def _args(tmp: Path, *extra: str) -> list[str]:
    return unlearn_argv(tmp, *extra)


def _config(tmp: Path, **kw) -> UnlearnConfig:
    base = dict(model=str(tmp / "tiny"), lens=str(tmp / "lens"), layers=(1, 3), forget=str(tmp / "forget.jsonl"),
                retain=str(tmp / "retain.jsonl"), retain_config=None, retain_column=None, examples=8, batch=4,
                per_device_batch=2, max_length=16, out=str(tmp / "runs"), eval_tasks="", device="cpu")
    return UnlearnConfig(**{**base, **kw})


def test_cli_run_writes_the_run_directory_and_refuses_to_overwrite(setup):
    run_dir = main(_args(setup, "--optimizer", "muon"))
    assert run_dir.name == "tiny_lens_ex8_rm5.0_ret5.0_muon"
    for name in ("run_config.json", "metrics.jsonl", "summary.json", "adapter", "merged"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "checkpoint.pt").exists()
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["steps"] == 2 and config["grad_accum"] == 2 and config["world_size"] == 1
    assert config["layers"] == [1, 3] and config["optimizer"] == "muon"
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    for key in ("retain_loss", "forget_loss", "retain_weight", "forget_weight", "lr", "grad_norm", "tokens_per_s"):
        assert key in lines[0]
    assert lines[0]["retain_weight"] == 0.0 and lines[0]["forget_weight"] == 5.0 and lines[0]["retain_loss"] == 0.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_forget_loss"] >= 1.0
    merged, _ = load_model(str(run_dir / "merged"), device="cpu")
    base = load_file(setup / "tiny" / "model.safetensors")
    changed = [k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed and all(int(k.split(".")[2]) < 3 for k in changed)  # LoRA on blocks 0 .. max(layers) - 1
    with pytest.raises(FileExistsError, match="finished unlearning run"):
        main(_args(setup, "--optimizer", "muon"))
    assert main(_args(setup, "--optimizer", "muon", "--overwrite")) == run_dir


def test_full_mode_with_kl_retain_and_random_targets(setup):
    run_dir = unlearn(_config(setup, full=True, retain_loss="kl", forget_target="random", gradient_checkpointing=True))
    assert run_dir.name.endswith("_full_kl_random")
    assert (run_dir / "merged" / "model.safetensors").exists() and not (run_dir / "adapter").exists()
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["retain_loss"] > 0.0


def test_presets_and_run_name():
    assert PRESETS["reference"] == UnlearnConfig()
    assert UnlearnConfig(examples=400).name == "smollm2-135m_lens_ex400_rm5.0_ret5.0"
    # The robust preset's two budget rules train for different lengths: their default names differ.
    robust = PRESETS["robust"]
    assert robust.name == "smollm2-135m_lens_ex1600_rm20.0_ret1.0_full_muon_cir_shrink"
    assert replace(robust, cir_on_loss_rise="stop").name == "smollm2-135m_lens_ex1600_rm20.0_ret1.0_full_muon_cir"
    small = PRESETS["small"]
    assert small.forget == "facts:country_capital" and small.eval_format == "cloze"
    with pytest.raises(ConfigError, match="multiple of --per_device_batch"):
        UnlearnConfig(batch=10, per_device_batch=4)


def test_robust_preset_runs_on_the_users_corpora_and_tasks(setup, capsys):
    """`--preset robust` brings its method (CIR under Muon) and keeps the user's forget, retain and eval tasks;
    the preset's PCA sizes are cut to what the tiny model's width allows, as a user would."""
    tasks = str(setup / "forget_questions.jsonl")
    (setup / "forget_questions.jsonl").write_text(json.dumps(
        {"question": "q", "prompt": "the capital of france is", "choices": ["paris", "rome", "oslo", "bern"],
         "answer": 0}) + "\n")
    run_dir = main(_args(setup, "--preset", "robust", "--eval_tasks", tasks, "--eval_format", "cloze",
                         "--cir_act_components", "3", "--cir_grad_components", "4", "--no-eval_base",
                         "--original_cache_mb", "0", "--lens_matmul", "float32"))
    config = json.loads((run_dir / "run_config.json").read_text())
    robust = PRESETS["robust"]
    assert robust.cir and robust.full and robust.optimizer == "muon" and robust.weight_decay == 0.0
    assert {k: config[k] for k in ("cir", "full", "optimizer", "lr", "cir_refresh", "cir_max_loss_rise",
                                   "cir_on_loss_rise")} == \
        {"cir": True, "full": True, "optimizer": "muon", "lr": robust.lr, "cir_refresh": robust.cir_refresh,
         "cir_max_loss_rise": robust.cir_max_loss_rise, "cir_on_loss_rise": "shrink"}
    assert config["forget"] == str(setup / "forget.jsonl") and config["retain"] == str(setup / "retain.jsonl")
    assert config["eval_tasks"] == tasks and config["layers"] == [1, 3]
    assert "general_loss_start" in json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "eval.json").is_file() and not (run_dir / "adapter").exists()
    with pytest.raises(SystemExit):
        main(_args(setup, "--preset", "robust", "--no-full", "--run_name", "lora"))
    assert "cannot use LoRA adapters: add --full" in capsys.readouterr().err
    assert not (setup / "runs" / "lora").exists()


@pytest.mark.parametrize("case", ["other_model_lens", "layer_out_of_range", "empty_forget", "empty_retain",
                                  "batch_over_ranks", "layer_zero_lora"])
def test_bad_input_fails_before_training(setup, case, monkeypatch):
    kw: dict = {}
    if case == "other_model_lens":
        other, _ = load_model(str(save_tiny_model(setup / "deeper", "llama", layers=5)), device="cpu")
        TunedLens.from_model(other).save(setup / "other_lens")
        kw, match = {"lens": str(setup / "other_lens")}, "was made for a model with 5 layers"
    elif case == "layer_out_of_range":
        kw, match = {"layers": (1, 7)}, r"out of range.*0\.\.4 \(4 is the model's output\)"
    elif case in ("empty_forget", "empty_retain"):
        empty = setup / "empty.jsonl"
        empty.write_text(json.dumps({"text": "   "}) + "\n")
        what = case.split("_")[1]
        kw, match = {what: str(empty)}, f"{what} corpus .* is empty"
    elif case == "batch_over_ranks":
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setattr("lensunlearn.train.distributed.dist.init_process_group", lambda *a, **k: None)
        kw, match = {}, "not divisible by --per_device_batch 2 x 3 processes"
    else:
        kw, match = {"layers": (0,)}, "embedding output"
    with pytest.raises(ValueError, match=match):
        unlearn(_config(setup, **kw))
    assert not list((setup / "runs").glob("*/metrics.jsonl"))


_KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import lensunlearn.unlearning.run as u
from lensunlearn.cli import main
original = u.save_checkpoint
def save_then_die(run_dir, step, *args, **kwargs):
    original(run_dir, step, *args, **kwargs)
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
u.save_checkpoint = save_then_die
main(sys.argv[1:])
"""


def test_resume_after_a_kill_ends_with_the_same_weights(setup):
    extra = ["--examples", "16", "--checkpoint_every", "2", "--forget_target", "random", "--lora_dropout", "0.3"]
    straight = main(_args(setup, *extra, "--run_name", "straight"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    argv = _args(setup, *extra, "--run_name", "killed")
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT, *argv],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = setup / "runs" / "killed"
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        main(_args(setup, *extra, "--run_name", "killed"))
    resumed = main(_args(setup, *extra, "--run_name", "killed", "--resume"))
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_at_another_thread_count_says_so_and_matches_to_rounding(setup, caplog):
    """A run killed while using 2 torch threads and resumed with 1: the checkpoint records its count, the
    resume says in one line that the result matches only to float rounding, and it does."""
    extra = ["--examples", "16", "--checkpoint_every", "2", "--forget_target", "random"]
    straight = main(_args(setup, *extra, "--run_name", "straight"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT,
                             *_args(setup, *extra, "--run_name", "killed")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(setup / "runs" / "killed" / "checkpoint.pt", weights_only=True)["threads"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level("WARNING", logger="lensunlearn"):
            resumed = main(_args(setup, *extra, "--run_name", "killed", "--resume"))
    finally:
        torch.set_num_threads(threads)
    said = [r.getMessage() for r in caplog.records if "torch threads" in r.getMessage()]
    assert said == ["the checkpoint was written with 2 torch threads and this process uses 1: the resumed run "
                    "matches an uninterrupted one only to float rounding (set OMP_NUM_THREADS=2 for identical "
                    "weights)"]
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_final_evaluation_on_a_local_task(setup):
    task = setup / "task.jsonl"
    task.write_text("".join(json.dumps({"question": f"the capital of {c} is", "choices": ["paris", "rome", "madrid",
                                                                                          "berlin"], "answer": a})
                            + "\n" for c, a in (("france", 0), ("italy", 1))))
    run_dir = unlearn(_config(setup, eval_tasks=str(task), eval_format="cloze", eval_base=True))
    for name in ("eval.json", "base_eval.json"):
        result = json.loads((run_dir / name).read_text())
        assert result["format"] == "cloze" and len(result["results"]) == 1


def test_original_cache_gives_the_same_run_and_logs_its_hit_rate(setup):
    extra = ["--examples", "16", "--retain_coef", "50", "--lr", "1e-2"]
    plain = main(_args(setup, *extra, "--run_name", "plain"))
    cached = main(_args(setup, *extra, "--run_name", "cached", "--original_cache_mb", "16"))
    a = load_file(plain / "adapter" / "adapter_model.safetensors")
    b = load_file(cached / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    lines = [json.loads(l) for l in (cached / "metrics.jsonl").read_text().splitlines()]
    assert "original_cached" not in lines[0]  # retain weight 0 at step 0: no original pass at all
    rates = [l["original_cached"] for l in lines[1:]]
    assert rates[0] == 0.0 and 0 < rates[-1] <= 1  # 8 retain documents, 16 pairs: the second pass hits
    assert [l["retain_loss"] for l in lines] == pytest.approx(
        [json.loads(l)["retain_loss"] for l in (plain / "metrics.jsonl").read_text().splitlines()], rel=1e-5)
    assert json.loads((cached / "run_config.json").read_text())["original_cache_mb"] == 16


def test_mixed_precision_trains_on_cpu_with_float32_adapters(setup):
    run_dir = main(_args(setup, "--mixed_precision", "--run_name", "bf16"))
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(l["forget_loss"])) and l["forget_loss"] >= 1.0 for l in lines)
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())
    with pytest.raises(ValueError, match="--dtype float32"):  # a ConfigError, so the command line exits 2
        _config(setup, mixed_precision=True, dtype="bfloat16", run_name="bad")
    with pytest.raises(SystemExit) as exit_info:
        main(_args(setup, "--mixed_precision", "--dtype", "bfloat16", "--run_name", "bad"))
    assert exit_info.value.code == 2


def test_negative_original_cache_is_refused(setup):
    with pytest.raises(ConfigError, match="--original_cache_mb must be >= 0"):
        _config(setup, original_cache_mb=-1)


def test_bulk_dropout_drops_at_its_rate_without_bias_and_follows_the_seed():
    import math

    from lensunlearn.unlearning.run import BulkDropout

    dropout = BulkDropout(0.05).train()
    torch.manual_seed(0)
    first = dropout(torch.ones(1000, 1000))
    torch.manual_seed(0)
    assert torch.equal(dropout(torch.ones(1000, 1000)), first)
    rate, scale = 3277 / 65536, 65536 / (65536 - 3277)  # 0.05 rounded to a multiple of 1/65536
    assert abs((first == 0).float().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / 1e6)
    assert first.unique().tolist() == [0.0, pytest.approx(scale)]
    assert first.mean().item() == pytest.approx(1.0, abs=5 * math.sqrt(rate / (1 - rate) / 1e6))
    x = torch.randn(50, 40, requires_grad=True)
    out = dropout(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() * scale)  # the gradient is the same mask
    x = torch.randn(3, 4)
    assert torch.equal(dropout.eval()(x), x)


@pytest.mark.parametrize("lora_dropout", [0.05, 0.0])
def test_lora_adapters_get_bulk_dropout(setup, lora_dropout):
    from lensunlearn.unlearning.run import BulkDropout, add_lora

    model, _ = load_model(str(setup / "tiny"), "float32", "cpu")
    model = add_lora(model, _config(setup, lora_dropout=lora_dropout, lora_targets="all"), (1, 3))
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for d in m.lora_dropout.values()]
    assert dropouts
    if lora_dropout:
        assert all(isinstance(d, BulkDropout) and d.p == lora_dropout for d in dropouts)
    else:
        assert not any(isinstance(d, (BulkDropout, torch.nn.Dropout)) for d in dropouts)


def test_explicit_layers_are_used_as_given_and_only_the_default_is_clipped():
    from lensunlearn.unlearning.run import SEED_LAYERS, resolve_layers

    assert UnlearnConfig().layers is None
    assert resolve_layers(UnlearnConfig(), 30) == (5, 10, 15, 20, 25)  # the default, clipped to 30 blocks
    assert resolve_layers(UnlearnConfig(layers=SEED_LAYERS), 30) == SEED_LAYERS  # 30 is the model's output
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(UnlearnConfig(layers=SEED_LAYERS), 20)  # given explicitly: never clipped
    with pytest.raises(ConfigError, match="embedding output"):
        UnlearnConfig(layers=(0,))
