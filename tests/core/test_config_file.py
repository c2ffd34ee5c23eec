"""`--config FILE`: a run's run_config.json or a hand-written YAML/JSON file sets options; flags win."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lensunlearn.cli import _config, _parse, console, main

from ..conftest import write_unlearn_inputs


def _cfg(argv: list[str]):
    """The config the command line builds (what `console` would run), without running it."""
    _, command, args = _parse(argv)
    return _config(command, args)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rerun_from_run_config_gives_the_same_adapter(tmp_path):
    tmp = write_unlearn_inputs(tmp_path, "llama")
    # --overwrite (harmless on a new folder) is saved in run_config.json; it must not carry over
    first = main(["unlearn", "--model", str(tmp / "tiny"), "--lens", str(tmp / "lens"), "--layers", "1,3",
                  "--forget", str(tmp / "forget.jsonl"), "--retain", str(tmp / "retain.jsonl"),
                  "--retain_config", "none", "--retain_column", "none", "--examples", "8", "--batch", "4",
                  "--per_device_batch", "2", "--max_length", "16", "--out", str(tmp / "runs"), "--eval_tasks", "",
                  "--device", "cpu", "--run_name", "X", "--overwrite"])
    saved = first / "run_config.json"
    assert json.loads(saved.read_text())["overwrite"] is True
    with pytest.raises(FileExistsError, match="finished unlearning run"):  # not silently replaced
        main(["unlearn", "--config", str(saved)])
    second = main(["unlearn", "--config", str(saved), "--run_name", "X2"])
    assert second == first.parent / "X2"
    original, again = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (first, second))
    assert original.keys() == again.keys() and original
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert any(k.endswith("lora_B.weight") and original[k].abs().sum() > 0 for k in original)  # it did train
    config = json.loads((second / "run_config.json").read_text())
    assert config["run_name"] == "X2" and config["overwrite"] is False and config["resume"] is False


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = _write(tmp_path, "c.yaml", "examples: 10\nlr: 1e-3\n")
    from_preset = _cfg(["unlearn", "--preset", "small", "--config", str(path)])
    assert from_preset.examples == 10 and from_preset.lr == 1e-3  # the file is above the preset ...
    assert from_preset.max_length == 64 and from_preset.forget == "facts:country_capital"  # ... which fills the rest
    flagged = _cfg(["unlearn", "--config", str(path), "--examples", "12", "--preset", "small"])
    assert flagged.examples == 12 and flagged.lr == 1e-3  # an explicit flag is above the file
    plain = _cfg(["unlearn", "--config", str(path)])
    assert plain.examples == 10 and plain.max_length == 2048  # the default preset (seed) below the file


def test_yaml_values_become_field_types(tmp_path):
    path = _write(tmp_path, "c.yml", "layers: [1, 3]\nretain_config: null\nfull: true\nretain_loss: kl\n"
                                     "epochs: 2\neval_limit: 5\n# a comment\nlora_targets: all\n")
    cfg = _cfg(["unlearn", "--config", str(path)])
    assert cfg.layers == (1, 3) and cfg.retain_config is None and cfg.full is True and cfg.retain_loss == "kl"
    assert cfg.epochs == 2.0 and isinstance(cfg.epochs, float) and cfg.eval_limit == 5 and cfg.lora_targets == "all"
    assert _cfg(["unlearn", "--config", str(_write(tmp_path, "e.yaml", ""))]) == _cfg(["unlearn"])  # empty: nothing


def test_resume_and_overwrite_come_only_from_the_line(tmp_path, caplog):
    path = _write(tmp_path, "c.json", json.dumps({"resume": True, "overwrite": False}))
    with caplog.at_level(logging.WARNING):
        cfg = _cfg(["unlearn", "--config", str(path)])
    assert cfg.resume is False and "pass --resume on the command line" in caplog.text
    assert _cfg(["unlearn", "--config", str(path), "--resume"]).resume is True


def test_config_is_accepted_by_other_commands(tmp_path):
    path = _write(tmp_path, "eval.yaml", "eval_tasks: [a.jsonl, mmlu]\neval_limit: 3\neval_format: cloze\n")
    cfg = _cfg(["eval", "--config", str(path)])
    assert cfg.eval_tasks == ("a.jsonl", "mmlu") and cfg.eval_limit == 3 and cfg.eval_format == "cloze"
    tamper = _cfg(["tamper", "--config", str(_write(tmp_path, "t.json", '{"lr": 0.001, "full": true}'))])
    assert tamper.lr == 1e-3 and tamper.full is True


def _error(argv: list[str], capsys) -> str:
    """`console`'s one-line error for a bad config file, with exit status 2 (a usage error)."""
    assert console(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("text,message", [
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"examples": 1.5}, "examples must be an integer, got 1.5"),
    ({"examples": True}, "examples must be an integer, got True"),
    ({"full": "yes"}, "full must be true or false, got 'yes'"),
    ({"retain_loss": "l1"}, "retain_loss must be one of l2, kl, relative, nll, mse, got 'l1'"),
    ({"layers": [1, "x"]}, "layers must be an integer, got 'x'"),
    ({"layers": 3}, "layers must be a list, got 3"),
    ({"forget": None}, "forget must be a string, got null"),
    ({"model": 7}, "model must be a string, got 7"),
])
def test_wrong_types_name_the_key_and_type(tmp_path, capsys, text, message):
    path = _write(tmp_path, "c.json", json.dumps(text))
    err = _error(["unlearn", "--config", str(path)], capsys)
    assert err == f"lensunlearn unlearn: error: --config {path}: {message}"


def test_unknown_keys_are_errors_except_a_runs_own_plan(tmp_path, capsys):
    path = _write(tmp_path, "c.yaml", "exampels: 3\nsteps: 5\nbogus: 1\n")
    err = _error(["unlearn", "--config", str(path)], capsys)
    assert "unknown options exampels (did you mean examples?), bogus" in err and "steps" not in err
    # `steps` is part of unlearn's saved plan, not an option of eval
    err = _error(["eval", "--config", str(_write(tmp_path, "e.yaml", "steps: 5\n"))], capsys)
    assert "unknown option steps" in err


@pytest.mark.parametrize("name,text,message", [
    ("bad.json", '{"lr": 1e-3,\n "examples": }\n', "bad.json line 2: invalid JSON"),
    ("bad.yaml", "lr: 1e-3\nexamples: [1, 2\n", "bad.yaml line 3: invalid YAML"),
    ("list.yaml", "- lr\n- examples\n", "list.yaml: expected a mapping of option names to values, got a list"),
    ("missing.yaml", None, "missing.yaml: no such file"),
])
def test_unparsable_file_is_one_line_with_file_and_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert message in _error(["unlearn", "--config", str(path)], capsys)


def test_help_documents_the_precedence(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE" in help_text
    assert "built-in defaults < --preset (where the command has one) < FILE < flags" in help_text
