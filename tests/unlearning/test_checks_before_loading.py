"""What `unlearn` and `distill` can check before compute, they check before compute: the layers and CIR
options against the model's config.json (read without the weights), the --cir_corpus, `lm_eval:` tasks'
data; and a run whose training finished but whose saving or evaluation failed is resumed without
training again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lensunlearn.cli import console, main
from lensunlearn.core.config import ConfigError
from lensunlearn.core.errors import InputError
from lensunlearn.unlearning import distill as distill_module
from lensunlearn.unlearning import run as unlearn_module

from ..conftest import ARCHITECTURES, make_tiny_model, unlearn_argv, write_jsonl, write_unlearn_inputs

CIR = ("--full", "--cir", "--optimizer", "muon", "--weight_decay", "0")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_unlearn_inputs(tmp_path_factory.mktemp("checks"))


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or the tokenizer the corpora need) fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    for module in (unlearn_module, distill_module):
        monkeypatch.setattr(module, "load_model", refuse)
        monkeypatch.setattr(module, "load_tokenizer", refuse, raising=False)


def _argv(inputs: Path, tmp_path: Path, *extra: str) -> list[str]:
    """The tiny unlearn line into tmp_path/runs/r, its target layers the default unless `extra` names them."""
    argv = unlearn_argv(inputs, "--run_name", "r")
    at = argv.index("--layers")
    argv = argv[:at] + argv[at + 2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "runs")
    return [*argv, *extra]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_config_names_the_depth_and_widths_the_loaded_model_has(arch, tmp_path):
    from lensunlearn.modeling.layers import config_depth, config_mlp_widths, model_parts
    from lensunlearn.modeling.loading import load_model_config

    model, _ = make_tiny_model(arch, layers=3)
    model.save_pretrained(tmp_path)
    config = load_model_config(str(tmp_path))
    assert config_depth(config) == model_parts(model).num_layers == 3
    hidden, inner = config_mlp_widths(config)
    from lensunlearn.unlearning.cir import is_transposed, mlp_linears

    shapes = [m.weight.shape[::-1] if is_transposed(m) else m.weight.shape for m in mlp_linears(model, [0]).values()]
    assert min(min(s) for s in shapes) == min(hidden, inner)


@pytest.mark.parametrize("case, extra, error, match", [
    # the default layers of a 4-block model are (3,): block 7 cannot change stream 3
    ("cir_blocks", (*CIR, "--cir_blocks", "7"), ConfigError, r"--cir_blocks \[7\]: .*blocks 0..2"),
    ("cir_act_components", (*CIR, "--layers", "1,3", "--cir_act_components", "100"), ConfigError,
     r"--cir_act_components 100 is more than the 32 dimensions .*hidden size 32, MLP width 64.*at most 32"),
    ("cir_grad_components", (*CIR, "--layers", "1,3", "--cir_grad_components", "33"), ConfigError,
     r"--cir_grad_components 33 is more than the 32"),
    ("cir_corpus", (*CIR, "--layers", "1,3", "--cir_corpus", "no-such-text.jsonl"), InputError,
     r"^--cir_corpus no-such-text.jsonl: .*does not exist"),
    ("layers", ("--layers", "2,9"), ValueError, r"target layer \[9\] out of range: this model has 4 layers.*--layers"),
    ("preset_robust", ("--preset", "robust"), ValueError,
     r"target layer \[20, 25, 29\] out of range: this model has 4 layers.*a preset's layers"),
])
def test_options_the_model_cannot_take_fail_before_it_loads(inputs, tmp_path, no_model, capsys, case, extra, error,
                                                            match):
    """Before: each of these failed after the model had loaded (and --cir_corpus without naming the flag)."""
    argv = _argv(inputs, tmp_path, *extra)
    with pytest.raises(error, match=match):
        main(argv)
    assert console(argv) == (2 if error is ConfigError else 1)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # no half-made run folder either


# --- lm_eval: tasks whose data cannot be loaded --------------------------------------------------


def offline_task(folder: Path) -> Path:
    """An lm-eval task whose dataset is a hub dataset that is not in the local cache (tests run offline)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ll_offline.yaml").write_text(
        "task: ll_offline\ndataset_path: lensunlearn-tests/not-cached\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def test_an_lm_eval_task_whose_data_cannot_load_fails_before_unlearning(inputs, tmp_path, no_model):
    """Before: only the name was checked, and the run failed after training, in its evaluation."""
    pytest.importorskip("lm_eval")
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
    include = offline_task(tmp_path / "tasks")
    argv = _argv(inputs, tmp_path, "--layers", "1,3", "--lm_eval_include", str(include))
    argv[argv.index("--eval_tasks") + 1] = "lm_eval:ll_offline"
    with pytest.raises(FileNotFoundError, match=r"^--eval_tasks: task lm_eval:ll_offline cannot load its data "
                                                r"\(.*not-cached.*\): go online once"):
        main(argv)
    assert not (tmp_path / "runs").exists()


def test_an_lm_eval_task_whose_data_cannot_load_fails_before_distilling(inputs, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    run = main(unlearn_argv(inputs, "--run_name", "teacher_lm_eval"))
    monkeypatch.setattr(distill_module, "load_model", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("a model was loaded before the refusal")))
    include = offline_task(tmp_path / "tasks")
    with pytest.raises(FileNotFoundError, match="task lm_eval:ll_offline cannot load its data"):
        main(["distill", "--run", str(run), "--out", str(tmp_path / "d"), "--corpus", str(inputs / "retain.jsonl"),
              "--generic", str(inputs / "forget.jsonl"), "--eval_tasks", "lm_eval:ll_offline", "--lm_eval_include",
              str(include), "--device", "cpu", "--steps", "2", "--max_length", "16"])
    assert not (tmp_path / "d").exists()


# --- a run that trained, then failed ------------------------------------------------------------


def _count_loops(monkeypatch, module) -> list[int]:
    calls, real = [], module.run_loop

    def counting(spec, start_step=0):
        calls.append(start_step)
        return real(spec, start_step=start_step)

    monkeypatch.setattr(module, "run_loop", counting)
    return calls


def test_a_run_whose_evaluation_failed_resumes_without_training_again(inputs, tmp_path, monkeypatch):
    """Before: the last step was never checkpointed, so --resume trained again from step 0 (or from the last
    periodic checkpoint), and the evaluation tasks could not be changed on resume."""
    task = write_jsonl(tmp_path / "task.jsonl", [{"question": "the capital of france is", "answer": 0,
                                                  "choices": ["paris", "rome", "madrid", "berlin"]}])
    argv = _argv(inputs, tmp_path, "--layers", "1,3")
    argv[argv.index("--eval_tasks") + 1] = str(task)
    real = unlearn_module._evaluate

    def unreachable(cfg, *args, **kwargs):
        raise OSError("the evaluation data went away")

    monkeypatch.setattr(unlearn_module, "_evaluate", unreachable)
    loops = _count_loops(monkeypatch, unlearn_module)
    with pytest.raises(OSError, match="went away"):
        main(argv)
    run = tmp_path / "runs" / "r"
    assert loops == [0] and (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()
    trained = (run / "metrics.jsonl").read_text()
    monkeypatch.setattr(unlearn_module, "_evaluate", real)
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "the capital of italy is", "answer": 1,
                                                    "choices": ["paris", "rome", "madrid", "berlin"]}])
    resumed = main([*argv[:argv.index("--eval_tasks") + 1], str(other), *argv[argv.index("--eval_tasks") + 2:],
                    "--resume"])
    assert loops == [0]  # no training on resume: the trained weights were in the checkpoint
    assert (resumed / "metrics.jsonl").read_text() == trained
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_forget_loss"] is not None
    assert set(json.loads((resumed / "eval.json").read_text())["results"]) == {"other"}
    assert not (resumed / "checkpoint.pt").exists()
    # with --eval_every the curve's points must all measure the same tasks: changing them stays refused
    curve = _argv(inputs, tmp_path, "--layers", "1,3", "--eval_every", "1", "--run_name", "curve")
    curve[curve.index("--eval_tasks") + 1] = str(task)
    monkeypatch.setattr(unlearn_module, "_evaluate", unreachable)
    with pytest.raises(OSError):
        main(curve)
    monkeypatch.setattr(unlearn_module, "_evaluate", real)
    changed = [str(other) if a == str(task) else a for a in curve]
    with pytest.raises(ConfigError, match="--eval_tasks"):
        main([*changed, "--resume"])


def test_a_distillation_whose_evaluation_failed_resumes_without_distilling_again(inputs, tmp_path, monkeypatch):
    run = main(unlearn_argv(inputs, "--run_name", "teacher_resume"))
    argv = ["distill", "--run", str(run), "--out", str(tmp_path / "d"), "--run_name", "s", "--corpus",
            str(inputs / "retain.jsonl"), "--generic", str(inputs / "forget.jsonl"), "--eval_tasks", "",
            "--device", "cpu", "--steps", "3", "--max_length", "16", "--batch", "4", "--per_device_batch", "4",
            "--eval_every", "0"]
    straight = main([*argv[:6], "straight", *argv[7:]])
    real = distill_module._finish

    def failing(*args, **kwargs):
        raise OSError("the disk filled up")

    monkeypatch.setattr(distill_module, "_finish", failing)
    loops = _count_loops(monkeypatch, distill_module)
    with pytest.raises(OSError, match="disk"):
        main(argv)
    assert loops == [0] and (tmp_path / "d" / "s" / "checkpoint.pt").is_file()
    monkeypatch.setattr(distill_module, "_finish", real)
    resumed = main([*argv, "--resume"])
    assert loops == [0]
    from safetensors.torch import load_file

    a, b = load_file(straight / "merged" / "model.safetensors"), load_file(resumed / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    keys = ("steps", "stop_reason", "recovered", "heldout_ce", "final_kl")
    assert {k: json.loads((resumed / "summary.json").read_text())[k] for k in keys} == \
        {k: json.loads((straight / "summary.json").read_text())[k] for k in keys}
