"""A run's saved config (run_config.json), read by one function for every command that fills options from a
run: each damaged shape is refused with one line naming the file and the key, before any model loads, by
`robustness`, `tamper` and `distill` alike (robustness used to crash with AttributeError or TypeError)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lensunlearn.core.errors import InputError
from lensunlearn.core.run_config import fill, read_run_config, run_tasks

from ..cli.test_errors import one_line

BAD_SHAPES = {
    "a list": (["model", "base"], "holds a JSON list, not a mapping of settings: re-create the run, or restore the "
                                  "file `lensunlearn unlearn` wrote"),
    "tasks a number": ({"model": "base", "forget": "facts:country_capital", "eval_tasks": 5},
                       "eval_tasks is 5, not a string or a list of task names: fix the file or re-create the run"),
    "a task a number": ({"model": "base", "forget": "facts:country_capital", "eval_tasks": ["facts:x", 3]},
                        "eval_tasks is ['facts:x', 3], not a string or a list of task names: fix the file or "
                        "re-create the run"),
    "model a mapping": ({"model": {"name": "base"}, "forget": "facts:country_capital"},
                        "model is {'name': 'base'}, not a string: fix the file or re-create the run"),
    "limit a string": ({"model": "base", "eval_limit": "64"},
                       "eval_limit is '64', not an integer: fix the file or re-create the run"),
}


def _finished_run(root: Path, saved) -> Path:
    """A folder every command takes for a finished unlearning run; its model must never be loaded here."""
    run = root / "run"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "config.json").write_text("{}")
    (run / "summary.json").write_text("{}")
    (run / "run_config.json").write_text(json.dumps(saved))
    return run


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the run's config was checked")

    for module in ("lensunlearn.attack.protocol", "lensunlearn.attack.tamper", "lensunlearn.unlearning.distill"):
        monkeypatch.setattr(f"{module}.load_model", refuse, raising=False)


@pytest.mark.parametrize("shape", BAD_SHAPES)
@pytest.mark.parametrize("command", ["robustness", "tamper", "distill"])
def test_a_damaged_run_config_is_one_line_before_any_model(command, shape, tmp_path, capsys, no_model):
    saved, message = BAD_SHAPES[shape]
    run = _finished_run(tmp_path, saved)
    argv = {"robustness": ["robustness", run, "--out", tmp_path / "out"],
            "tamper": ["tamper", "--run", run, "--out", tmp_path / "out"],
            "distill": ["distill", "--run", run, "--out", tmp_path / "out"]}[command]
    line = one_line(argv, capsys, status=1)
    assert line == f"lensunlearn {command}: error: {run / 'run_config.json'}" + \
        (" " if shape == "a list" else ": ") + message


def test_reading_and_filling(tmp_path):
    assert read_run_config(tmp_path) == {}  # no file: nothing to fill from
    run = _finished_run(tmp_path, {"model": "m", "eval_tasks": ["a", " b "], "eval_format": "", "eval_limit": None})
    saved = read_run_config(run)
    assert run_tasks(saved) == ["a", "b"] and run_tasks({"tasks": "x, y,"}) == ["x", "y"] and run_tasks({}) == []
    assert fill("given", saved, "model") == "given" and fill(None, saved, "model") == "m"
    assert fill(None, saved, "eval_format", "cloze") == "cloze"  # an empty saved value is no value
    assert fill(None, saved, "eval_limit", 7) == 7 and fill(0, saved, "eval_limit", 7) == 0
    (run / "run_config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"run_config.json line 1: invalid JSON"):
        read_run_config(run)
