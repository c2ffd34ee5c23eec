"""Outputs are never lost or clobbered, and what can be checked before compute is checked before compute.

Replacing an output is a transaction (staging folder, swap on success); `--overwrite` replaces only
this tool's outputs of the same kind; a resumed run keeps its settings; stale or unfinished results
are never shown as current ones. A "killed" run is simulated by raising KeyboardInterrupt from inside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lensunlearn.cli import main
from lensunlearn.core.config import ConfigError
from lensunlearn.core.errors import USER_ERRORS
from lensunlearn.core.outputs import (
    MARKER_FILE,
    prepare_output,
    recover,
    staging_path,
    trash_path,
)
from lensunlearn.core.paths import write_marker

from ..conftest import save_tiny_model, unlearn_argv, write_unlearn_inputs


@pytest.fixture
def setup(tmp_path):
    return write_unlearn_inputs(tmp_path, "llama")


def _unlearn_args(tmp: Path, *extra: str) -> list[str]:
    return unlearn_argv(tmp, *extra)


def _no_model(monkeypatch, *modules: str) -> None:
    """Make loading a model fail the test: the refusal must come before any model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    for module in modules:
        monkeypatch.setattr(f"{module}.load_model", refuse)


def _kill_at_checkpoint(monkeypatch, module: str = "lensunlearn.unlearning.run") -> None:
    import importlib

    save = importlib.import_module(module).save_checkpoint

    def save_then_die(run_dir, step, *args, **kwargs):
        save(run_dir, step, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(f"{module}.save_checkpoint", save_then_die)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _task(path: Path) -> Path:
    path.write_text("".join(json.dumps({"question": f"the capital of {c} is", "choices": ["paris", "rome", "madrid",
                                                                                        "berlin"], "answer": a}) + "\n"
                            for c, a in (("france", 0), ("italy", 1))))
    return path


# ----------------------------------------------------------------------- the transaction itself


def _output(folder: Path, text: str, kind: str = "unlearn") -> Path:
    """A marked output folder holding one file."""
    folder.mkdir()
    write_marker(folder, kind)
    (folder / "v").write_text(text)
    return folder


def test_a_swap_interrupted_at_any_point_leaves_one_complete_version(tmp_path):
    final = tmp_path / "run"
    for crash_after in ("moved_old_aside", "moved_new_in"):
        _output(final, "old")
        staging = _output(staging_path(final), "new")
        final.rename(trash_path(final))
        if crash_after == "moved_new_in":
            staging.rename(final)
        recover(final, "unlearn")
        assert (final / "v").read_text() == "new" and not trash_path(final).exists() and not staging.exists()
        shutil.rmtree(final)
    _output(final, "old")
    final.rename(trash_path(final))  # the old version moved aside and no new one: roll back
    recover(final, "unlearn")
    assert (final / "v").read_text() == "old"


def test_overwrite_refuses_a_folder_that_is_not_its_own(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("keep me")
    for kind in ("unlearn", "lens", "tamper"):
        with pytest.raises(FileExistsError, match="is not an? .* written by lensunlearn"):
            prepare_output(notes, kind, overwrite=True, finished=lambda p: True)
    assert _snapshot(notes) == {"ideas.txt": b"keep me"}


# ------------------------------------------------------------------------------------ unlearn


def test_overwrite_killed_at_its_first_checkpoint_keeps_the_old_run_and_resume_finishes_it(setup, monkeypatch):
    args = _unlearn_args(setup, "--examples", "16", "--checkpoint_every", "2", "--run_name", "r")
    run_dir = main(args)
    old = _snapshot(run_dir)
    _kill_at_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--overwrite", "--lr", "5e-3"])
    assert _snapshot(run_dir) == old  # the finished run is untouched
    staging = staging_path(run_dir)
    assert (staging / "checkpoint.pt").is_file() and not (staging / "summary.json").exists()
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="interrupted replacement.*--resume"):
        main([*args, "--lr", "5e-3"])
    assert main([*args, "--resume", "--lr", "5e-3"]) == run_dir
    assert not staging.exists() and not trash_path(run_dir).exists()
    assert json.loads((run_dir / "run_config.json").read_text())["lr"] == 5e-3
    assert json.loads((run_dir / "run_config.json").read_text())["run_dir"] == str(run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (run_dir / "summary.json").is_file()


@pytest.mark.parametrize("name", ["/abs/dir", "../up", "a/b", ".hidden"])
def test_run_name_is_a_name_not_a_path(setup, name):
    with pytest.raises(ConfigError, match="--run_name .* plain folder name"):
        from lensunlearn.unlearning.run import UnlearnConfig

        UnlearnConfig(run_name=name)


def test_unlearn_overwrite_refuses_a_foreign_folder_with_the_run_name(setup, monkeypatch):
    foreign = setup / "runs" / "mine"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    _no_model(monkeypatch, "lensunlearn.unlearning.run")
    with pytest.raises(FileExistsError, match="is not an unlearning run written by lensunlearn"):
        main(_unlearn_args(setup, "--run_name", "mine", "--overwrite"))
    assert _snapshot(foreign) == {"notes.txt": b"keep me"}


def test_resume_with_other_settings_is_refused_before_loading(setup, monkeypatch):
    args = _unlearn_args(setup, "--examples", "16", "--checkpoint_every", "2", "--run_name", "r")
    _kill_at_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    _no_model(monkeypatch, "lensunlearn.unlearning.run")
    with pytest.raises(ConfigError, match=r"other settings .*--examples 16 -> 32") as refused:
        main([*args, "--resume", "--examples", "32", "--lr", "2e-3"])
    assert "--lr 0.001 -> 0.002" in str(refused.value)
    saved = json.loads((setup / "runs" / "r" / "run_config.json").read_text())
    assert saved["examples"] == 16 and saved["lr"] == 1e-3


def test_a_stale_base_eval_is_measured_again(setup, monkeypatch):
    task = _task(setup / "task.jsonl")
    args = _unlearn_args(setup, "--run_name", "r", "--eval_tasks", str(task), "--eval_format", "cloze",
                         "--eval_base")

    def fail(*a, **k):
        raise RuntimeError("training failed")

    monkeypatch.setattr("lensunlearn.unlearning.run.run_loop", fail)
    with pytest.raises(RuntimeError):
        main(args)
    monkeypatch.undo()
    base = setup / "runs" / "r" / "base_eval.json"
    stale = json.loads(base.read_text())
    stale["request"]["limit"] = 1  # as if measured with --eval_limit 1 (or by a version that did not say)
    stale["results"]["task"]["acc"] = 0.123
    base.write_text(json.dumps(stale))
    main([*args, "--resume"])
    fresh = json.loads(base.read_text())
    assert fresh["request"]["limit"] is None and fresh["results"]["task"]["acc"] != 0.123


@pytest.mark.parametrize("tasks, error, match", [
    ("mmlu_anatomy", FileNotFoundError, "needs the hub dataset cais/mmlu"),
    ("facts:country_capitals", ValueError, "unknown fact domain"),
    ("wmdp_bio_robustt", ValueError, "unknown task"),
])
def test_evaluation_tasks_are_loaded_before_the_model(setup, monkeypatch, tasks, error, match):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr("datasets.load_dataset", offline)
    _no_model(monkeypatch, "lensunlearn.unlearning.run")
    with pytest.raises(error, match=match):
        main(_unlearn_args(setup, "--eval_tasks", tasks))
    assert not (setup / "runs").exists() or not any((setup / "runs").iterdir())


# ------------------------------------------------------------------------- option values


@pytest.mark.parametrize("command, kwargs", [
    ("unlearn", {"lr": float("nan")}), ("unlearn", {"lr": -1.0}), ("unlearn", {"eval_limit": 0}),
    ("unlearn", {"eval_batch": 0}), ("unlearn", {"weight_decay": float("nan")}), ("unlearn", {"warmup": -1}),
    ("lens", {"batch": 0}), ("lens", {"steps": -1}), ("lens", {"per_device_batch": 0}), ("lens", {"lr": float("inf")}),
    ("lens", {"steps": 0}), ("tamper", {"lrs": (1e-5, float("nan"))}), ("tamper", {"lr": float("nan")}),
    ("tamper", {"eval_limit": 0}),
])
def test_bad_values_are_refused_on_construction(command, kwargs):
    from lensunlearn.attack.tamper import TamperConfig
    from lensunlearn.lens.train import LensTrainConfig
    from lensunlearn.unlearning.run import UnlearnConfig

    cls = {"unlearn": UnlearnConfig, "lens": LensTrainConfig, "tamper": TamperConfig}[command]
    with pytest.raises(ConfigError, match="--" + next(iter(kwargs))):
        cls(**kwargs)


# ---------------------------------------------------------------------------------- lens train


def test_lens_overwrite_with_a_bad_corpus_keeps_the_finished_lens(tmp_path, text_corpus):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "lens"
    args = ["lens", "train", "--model", str(model), "--corpus", str(text_corpus), "--steps", "1", "--out", str(out),
            "--device", "cpu"]
    main(args)
    old = _snapshot(out)
    with pytest.raises(USER_ERRORS):
        main([*args[:5], str(tmp_path / "typo.jsonl"), *args[6:], "--overwrite"])
    assert _snapshot(out) == old and (out / "params.pt").is_file()
    assert not staging_path(out).exists()


# -------------------------------------------------------------------------------------- tamper


def _fake_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """runs/ holding an unlearning run (its merged model) and unrelated notes; a corpus and a task."""
    runs = tmp_path / "runs"
    run = runs / "run1"
    save_tiny_model(run / "merged")
    (run / "run_config.json").write_text(json.dumps({"eval_format": "cloze"}))
    (runs / "notes.md").write_text("keep me")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the capital of {c} is {p} ."}) + "\n"
                              for c, p in (("france", "paris"), ("italy", "rome"), ("spain", "madrid"))))
    return runs, corpus, _task(tmp_path / "task.jsonl")


def _tamper_args(run: Path, corpus: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return ["tamper", "--run", str(run), "--forget", str(corpus), "--eval_tasks", str(task),
            "--eval_format", "cloze", "--max_length", "16", "--batch", "2", "--per_device_batch", "2",
            "--eval_every", "1", "--lr", "1e-3", "--device", "cpu", "--out", str(out), *extra]


def test_tamper_overwrite_of_a_parent_folder_is_refused(tmp_path, monkeypatch):
    runs, corpus, task = _fake_run(tmp_path)
    before = _snapshot(runs)
    _no_model(monkeypatch, "lensunlearn.attack.tamper")
    for out in (runs, runs / "run1"):
        with pytest.raises(FileExistsError, match="not a tamper output|holds the run being attacked"):
            main(_tamper_args(runs / "run1", corpus, task, out, "--overwrite"))
    assert _snapshot(runs) == before


def test_killed_attack_is_marked_unfinished_and_a_killed_overwrite_keeps_the_old_results(tmp_path, monkeypatch):
    from lensunlearn.attack import tamper
    from lensunlearn.report.command import ReportConfig, build_report

    runs, corpus, task = _fake_run(tmp_path)
    out = tmp_path / "attack"
    args = _tamper_args(runs / "run1", corpus, task, out, "--epochs", "2")
    main(args)
    finished = json.loads((out / "results.json").read_text())
    assert finished["finished"] is True and finished["config"]["steps"] == 3
    old = _snapshot(out)
    measure, calls = tamper.measure, []

    def measure_then_die(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return measure(*a, **k)

    monkeypatch.setattr(tamper, "measure", measure_then_die)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--overwrite", "--lr", "2e-3"])
    assert _snapshot(out) == old  # the finished attack is untouched
    partial = json.loads((staging_path(out) / "results.json").read_text())
    assert partial["finished"] is False and [r["step"] for r in partial["records"]] == [0, 1]
    report = build_report(ReportConfig(tamper=(str(out), str(staging_path(out))), out=str(tmp_path / "report")))
    labels = [row["attack"] for row in report["tamper"]]
    assert labels == ["attack", ".attack.incoming (unfinished, step 1 of 3)"]
    assert "(unfinished, step 1 of 3)" in report["markdown"]


# ---------------------------------------------------------------------------------------- eval


def test_eval_out_needs_overwrite_and_a_writable_folder_before_scoring(tmp_path, monkeypatch):
    task = _task(tmp_path / "task.jsonl")
    existing = tmp_path / "eval.json"
    existing.write_text(json.dumps({"results": {}}))
    (tmp_path / "afile").write_text("")
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    _no_model(monkeypatch, "lensunlearn.modeling.loading")
    base = ["eval", "--model", str(tmp_path / "none"), "--tasks", str(task)]
    with pytest.raises(FileExistsError, match="--out .* already exists: pass --overwrite"):
        main([*base, "--out", str(existing)])
    with pytest.raises(NotADirectoryError, match="cannot write to .*afile is a file"):
        main([*base, "--out", str(tmp_path / "afile" / "eval.json")])
    with pytest.raises(FileExistsError, match="is not a file this command wrote"):
        main([*base, "--out", str(notes), "--overwrite"])
    assert existing.read_text() == json.dumps({"results": {}}) and notes.read_text() == "{}"


def test_lens_eval_out_needs_overwrite_before_any_model_is_loaded(tmp_path, monkeypatch, text_corpus):
    existing = tmp_path / "lens_eval.json"
    existing.write_text(json.dumps({"lens": "x", "layers": []}))
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    _no_model(monkeypatch, "lensunlearn.lens.evaluate")
    base = ["lens", "eval", "--model", str(tmp_path / "none"), "--corpus", str(text_corpus), "--lens", "x"]
    with pytest.raises(FileExistsError, match="--out .* already exists: pass --overwrite"):
        main([*base, "--out", str(existing)])
    with pytest.raises(FileExistsError, match="is not a file this command wrote"):
        main([*base, "--out", str(notes), "--overwrite"])
    with pytest.raises(AssertionError, match="a model was loaded"):  # a result of ours may be replaced
        main([*base, "--out", str(existing), "--overwrite"])
    assert json.loads(existing.read_text()) == {"lens": "x", "layers": []} and notes.read_text() == "{}"


# ---------------------------------------------------------------------------------------- demo


def test_demo_rerun_with_other_flags_or_on_a_foreign_folder_is_refused(tmp_path, monkeypatch):
    from lensunlearn.demo import DemoConfig, claim_out

    out = tmp_path / "demo"
    claim_out(DemoConfig(out=str(out), lens_steps=2))
    _no_model(monkeypatch, "lensunlearn.modeling.loading")
    with pytest.raises(ConfigError, match=r"other flags \(--lens_steps 2 -> 3\): pass --overwrite"):
        main(["demo", "--out", str(out), "--lens_steps", "3"])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a demo folder"):
        main(["demo", "--out", str(notes), "--overwrite"])
    assert _snapshot(notes) == {"ideas.txt": b"keep me"}
    assert (out / MARKER_FILE).is_file()
