"""The installed command turns every expected error into one line naming the problem and the fix:
exit 1 (2 for a bad option value, as argparse), 130 on Ctrl-C; `--debug` or LENSUNLEARN_DEBUG=1 adds
the traceback, and an unexpected exception (a bug) is not swallowed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lensunlearn.cli import console
from lensunlearn.lens.tuned_lens import default_lens_path

from ..conftest import save_tiny_model, write_unlearn_inputs
from ..modeling.test_loading import offline_hub  # noqa: F401  (a fixture)

GOOD = {"question": "the capital of france is", "choices": ["paris", "rome", "berlin", "madrid"], "answer": 0}


PROGRESS_BAR = re.compile(r"\d+%\|")  # transformers' bars while a model loads, not messages


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and the non-blank stderr lines (progress bars left out) of `lensunlearn ARGV`, run in
    this process."""
    capsys.readouterr()
    try:
        status = console([str(a) for a in argv])
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]


def one_line(argv: list[str], capsys, status: int = 1) -> str:
    """The single stderr line of a failing command, after checking its status and that no traceback came."""
    got, lines = run(argv, capsys)
    assert got == status, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture
def inputs(tmp_path) -> Path:
    """tmp/tiny (a 4-layer Llama), tmp/lens (its lens), tmp/forget.jsonl, tmp/retain.jsonl."""
    return write_unlearn_inputs(tmp_path)


def test_bad_option_value_exits_2(capsys):
    line = one_line(["unlearn", "--batch", "5", "--per_device_batch", "2"], capsys, status=2)
    assert line.startswith("lensunlearn unlearn: error: --batch 5 is not a multiple of --per_device_batch 2")


def test_missing_model_folder(tmp_path, capsys):
    line = one_line(["eval", "--model", tmp_path / "nope", "--eval_tasks", "facts:country_capital"], capsys)
    assert line == (f"lensunlearn eval: error: model folder {tmp_path / 'nope'} does not exist: pass an existing "
                    f"folder, a hub id (owner/name) or smollm2-135m")


def test_hub_id_not_in_the_cache_offline(offline_hub, capsys):  # noqa: F811
    line = one_line(["eval", "--model", "EleutherAI/deep-ignorance-unfiltered",
                     "--eval_tasks", "facts:country_capital"], capsys)
    assert "EleutherAI/deep-ignorance-unfiltered is neither a local folder nor in the local hub cache" in line
    assert "hf download EleutherAI/deep-ignorance-unfiltered" in line


def test_finished_lens_is_not_overwritten(inputs, capsys):
    line = one_line(["lens", "train", "--model", inputs / "tiny", "--corpus", inputs / "retain.jsonl",
                     "--out", inputs / "lens"], capsys)
    assert line.startswith("lensunlearn lens train: error: ") and "--overwrite" in line


def test_input_files_name_file_and_line(inputs, capsys):
    tasks = inputs / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(6)) + "{oops\n")
    base = ["eval", "--model", inputs / "tiny", "--eval_format", "cloze", "--eval_tasks"]
    assert f"error: {tasks} line 7: invalid JSON (" in one_line([*base, tasks], capsys)
    tasks.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "answer": 7}) + "\n")
    assert f"error: {tasks} line 2 has answer 7, out of range" in one_line([*base, tasks], capsys)

    train = ["lens", "train", "--model", inputs / "tiny", "--out", inputs / "new_lens", "--corpus"]
    notes = inputs / "notes.txt"
    notes.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    assert f"error: {notes} is not UTF-8 text" in one_line([*train, notes], capsys)
    numbers = inputs / "numbers.jsonl"
    numbers.write_text('{"text": "the capital"}\n{"text": "of france"}\n{"text": 12345}\n')
    assert f"error: {numbers} line 3: 'text' holds int 12345, not text" in one_line([*train, numbers], capsys)
    assert not (inputs / "new_lens" / "params.pt").exists()


def test_column_hint_names_the_commands_flag(inputs, capsys):
    line = one_line(["unlearn", "--model", inputs / "tiny", "--lens", inputs / "lens", "--forget",
                     inputs / "forget.jsonl", "--retain", inputs / "retain.jsonl", "--retain_column", "page",
                     "--eval_tasks", "", "--out", inputs / "runs"], capsys)
    assert line.endswith("pass --retain_column NAME"), line


def test_truncated_lens_file(inputs, capsys):
    params = inputs / "lens" / "params.pt"
    params.write_bytes(params.read_bytes()[:100])
    line = one_line(["lens", "eval", "--model", inputs / "tiny", "--lens", inputs / "lens", "--corpus",
                     inputs / "retain.jsonl"], capsys)
    assert f"error: {params} is truncated or not a torch file: train the lens again" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(inputs, capsys):
    line = one_line(["eval", "--model", inputs / "tiny", "--device", "cuda", "--eval_tasks", "facts:country_capital"],
                    capsys)
    assert line == "lensunlearn eval: error: CUDA is not available on this machine: use --device cpu"


def test_lens_of_another_model_and_layer_out_of_range(inputs, capsys):
    shallow = save_tiny_model(inputs / "shallow", layers=2)
    line = one_line(["lens", "eval", "--model", shallow, "--lens", inputs / "lens", "--corpus",
                     inputs / "retain.jsonl"], capsys)
    assert "was made for a model with 4 layers" in line and f"lensunlearn lens train --model {shallow}`" in line
    line = one_line(["unlearn", "--model", inputs / "tiny", "--lens", inputs / "lens", "--layers", "9", "--forget",
                     inputs / "forget.jsonl", "--retain", inputs / "retain.jsonl", "--eval_tasks", "",
                     "--out", inputs / "runs"], capsys)
    assert "target layer [9] out of range: this model has 4 layers" in line


def test_report_of_a_folder_that_is_not_a_run(inputs, capsys):
    (inputs / "empty").mkdir()
    for folder in (inputs / "empty", inputs / "lens"):
        line = one_line(["report", folder, "--out", inputs / "report"], capsys)
        assert line.startswith("lensunlearn report: error: ") and str(folder) in line


def test_unlearn_without_a_lens_says_train_one_first_before_loading(offline_hub, capsys):  # noqa: F811
    # The model is a hub id absent from the cache: had it been loaded first, its error would show instead.
    Path("forget.jsonl").write_text('{"text": "the capital of france is paris"}\n')
    line = one_line(["unlearn", "--model", "tiny-org/tiny-llama", "--forget", "forget.jsonl", "--retain",
                     "forget.jsonl", "--eval_tasks", ""], capsys)
    assert line == ("lensunlearn unlearn: error: no --lens given and runs/lens_tiny-llama does not exist: train a lens "
                    "first: lensunlearn lens train --model tiny-org/tiny-llama (writes runs/lens_tiny-llama), or "
                    "pass --lens")


def _interrupt(config):
    raise KeyboardInterrupt


def test_ctrl_c_exits_130_and_names_resume_where_there_is_one(monkeypatch, capsys):
    monkeypatch.setattr("lensunlearn.unlearning.run.unlearn", _interrupt)  # the runner is looked up when it runs
    monkeypatch.setattr("lensunlearn.eval.evaluate.run_eval", _interrupt)
    line = one_line(["unlearn"], capsys, status=130)
    assert line == ("lensunlearn unlearn: interrupted: the run can continue from its last checkpoint: rerun the same "
                    "command with --resume")
    assert one_line(["eval"], capsys, status=130) == "lensunlearn eval: interrupted"


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["eval", "--model", tmp_path / "nope", "--eval_tasks", "facts:country_capital"]
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("LENSUNLEARN_DEBUG", env)
        status, lines = run([*argv, *extra], capsys)
        assert status == 1 and lines[0].startswith("Traceback") and len(lines) > 3
        assert lines[-1].startswith("lensunlearn eval: error: model folder")


def test_unexpected_errors_keep_their_traceback_and_key_errors_are_one_line(monkeypatch, capsys):
    def bug(config):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("lensunlearn.eval.evaluate.run_eval", bug)
    with pytest.raises(ZeroDivisionError):
        console(["eval"])

    def missing_field(config):
        return {}["results"]

    monkeypatch.setattr("lensunlearn.eval.evaluate.run_eval", missing_field)
    line = one_line(["eval"], capsys)
    assert line == ("lensunlearn eval: error: missing field 'results': an input file or row lacks it (--debug shows "
                    "where)")


def test_help_shows_the_defaults_of_the_preset_on_the_line(capsys):
    from lensunlearn.unlearning.run import PRESETS

    for argv, preset in ((["unlearn", "--help"], "reference"), (["unlearn", "--preset", "small", "--help"], "small"),
                         (["unlearn", "--preset=small", "--help"], "small")):
        with pytest.raises(SystemExit):
            console(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert f"pairs per epoch (a shorter corpus is cycled) (default: {PRESETS[preset].examples})" in text, argv


def test_readme_reads_the_lens_where_lens_train_writes_it():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    default = str(default_lens_path("smollm2-135m"))
    used = set(re.findall(r"runs/lens_[\w.-]+", readme))
    assert used == {default}, used


def test_installed_command_prints_one_line(tmp_path):
    command = Path(sys.executable).parent / "lensunlearn"
    result = subprocess.run([str(command), "eval", "--model", str(tmp_path / "nope"), "--eval_tasks",
                             "facts:country_capital"], capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "LENSUNLEARN_DEBUG": ""})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [(f"lensunlearn eval: error: model folder {tmp_path / 'nope'} does not "
                                           f"exist: pass an existing folder, a hub id (owner/name) or smollm2-135m")]
