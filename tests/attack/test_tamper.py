"""Tamper attack: results schema, held-out split, sweep plots, run-directory defaults, and a killed attack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from lensunlearn.attack.tamper import TamperConfig, fact_records, split_fact_ids
from lensunlearn.core.config import ConfigError
from lensunlearn.report.plots import DPI, TAMPER_SIZE
from lensunlearn.report.tamper_results import recovery

from ..conftest import run_command, save_tiny_model, write_jsonl

CAPITALS = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))
PHRASINGS = ("the capital of {s} is {a} .", "{a} is the capital of {s} .", "{s} , capital : {a} .")
TAMPER_PIXELS = (int(TAMPER_SIZE[1] * DPI), int(TAMPER_SIZE[0] * DPI))


def main(argv: list[str]):
    """The `lensunlearn tamper` command line, built from this module's command alone."""
    return run_command(argv)


_write_jsonl = write_jsonl


@pytest.fixture
def fact_files(tmp_path) -> dict[str, Path]:
    """A 4-fact corpus tagged with fact_id, its cloze questions, and an unrelated retain task."""
    answers = [a for _, a in CAPITALS]
    corpus = [{"fact_id": f"cap:{s}", "text": p.format(s=s, a=a)} for s, a in CAPITALS for p in PHRASINGS]
    questions = [{"fact_id": f"cap:{s}", "question": f"what is the capital of {s} ?",
                  "prompt": f"the capital of {s} is",
                  "choices": answers, "answer": answers.index(a)} for s, a in CAPITALS]
    symbols = ["gold", "iron", "oxygen", "element"]
    retain = [{"question": f"the symbol of {w} ?", "prompt": f"the symbol of {w} is", "choices": symbols,
               "answer": k} for k, w in enumerate(symbols)]
    return {"corpus": _write_jsonl(tmp_path / "capitals_corpus.jsonl", corpus),
            "forget": _write_jsonl(tmp_path / "capitals.jsonl", questions),
            "retain": _write_jsonl(tmp_path / "symbols.jsonl", retain)}


def _args(model: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["tamper", "--model", str(model), "--forget", str(files["corpus"]),
            "--eval_tasks", f"{files['forget']},{files['retain']}", "--eval_format", "cloze",
            "--max_length", "16", "--batch", "4", "--per_device_batch", "2", "--out", str(out), *extra]


def _png_shape(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    return matplotlib.image.imread(path).shape[:2]


def test_heldout_attack_from_run_directory(tmp_path, fact_files):
    """A run directory supplies model, forget corpus, tasks and the original line; halves are reported apart."""
    run = tmp_path / "tiny_lens_ex8_rm5.0_ret5.0"
    save_tiny_model(run / "merged")
    (run / "run_config.json").write_text(json.dumps({"forget": str(fact_files["corpus"]), "eval_format": "cloze",
                                                     "eval_tasks": [str(fact_files["forget"]),
                                                                    str(fact_files["retain"])]}))
    (run / "base_eval.json").write_text(json.dumps({"results": {"capitals": {"acc": 0.75, "acc_norm": 0.75},
                                                                "symbols": {"acc": 0.5, "acc_norm": 0.5}}}))
    out = tmp_path / "attack"
    results = main(["tamper", "--run", str(run), "--holdout", "0.5", "--lr", "1e-2", "--epochs", "3",
                    "--batch", "4", "--per_device_batch", "2", "--eval_every", "2", "--max_length", "16",
                    "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["config"]["num_attacked_facts"] == 2 and saved["config"]["chunks"] == 6  # 2 facts x 3 phrasings
    steps = [r["step"] for r in saved["records"]]
    assert steps == [0, 2, 4, 5] and saved["records"][0]["train_loss"] is None
    assert all(r["train_loss"] > 0 for r in saved["records"][1:])
    assert set(saved["records"][0]["tasks"]) == {"capitals:attacked", "capitals:heldout", "symbols"}
    assert saved["records"][0]["tasks"]["capitals:heldout"]["n"] == 2
    assert saved["original"]["capitals:heldout"]["acc"] == 0.75  # whole-task value for each half
    first, last = saved["records"][0]["tasks"], saved["records"][-1]["tasks"]
    assert saved["recovery"]["capitals:heldout"] == pytest.approx(last["capitals:heldout"]["acc"]
                                                                  - first["capitals:heldout"]["acc"])
    split = json.loads((out / "split.json").read_text())
    trained = {r["fact_id"] for r in fact_records(str(fact_files["corpus"]))} - set(split["heldout"])
    assert set(split["attacked"]) == trained and not set(split["attacked"]) & set(split["heldout"])
    assert _png_shape(out / "tamper.png") == TAMPER_PIXELS


def test_lr_sweep_with_lora_and_muon(tmp_path, fact_files):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "sweep"
    summary = main(_args(model, fact_files, out, "--lrs", "1e-3,4e-3", "--lora", "--rank", "4",
                         "--optimizer", "muon", "--eval_every", "1", "--original", str(model)))
    assert [r["label"] for r in summary["runs"]] == ["lr0.001", "lr0.004"]
    first = [json.loads((out / r["dir"] / "results.json").read_text())["records"][0] for r in summary["runs"]]
    assert first[0]["tasks"] == first[1]["tasks"]  # every attack starts from the same weights
    for run in summary["runs"]:
        results = json.loads((out / run["dir"] / "results.json").read_text())
        assert results["config"]["lr"] == run["lr"] and not results["config"]["full"]  # --lora: a LoRA attack
        assert [r["step"] for r in results["records"]] == [0, 1, 2, 3]  # 12 chunks / batch 4
        assert set(results["original"]) == {"capitals", "symbols"}
        assert _png_shape(out / run["dir"] / "tamper.png") == TAMPER_PIXELS
    assert json.loads((out / "original_eval.json").read_text())["model"] == str(model)
    assert _png_shape(out / "sweep.png") == TAMPER_PIXELS
    with pytest.raises(FileExistsError):
        main(_args(model, fact_files, out, "--lrs", "1e-3"))


def test_steps_cycles_the_chunks_for_exactly_that_many_steps(tmp_path, fact_files):
    """--steps 7 over 12 chunks in batches of 4 (3 steps an epoch) cycles them past the first pass."""
    model = save_tiny_model(tmp_path / "tiny")
    main(_args(model, fact_files, tmp_path / "long", "--steps", "7", "--eval_every", "3"))
    saved = json.loads((tmp_path / "long" / "results.json").read_text())
    assert saved["config"]["chunks"] == 12 and saved["config"]["steps"] == 7
    assert [r["step"] for r in saved["records"]] == [0, 3, 6, 7] and saved["finished"]
    with pytest.raises(ConfigError, match="--steps"):
        TamperConfig(steps=0)


def test_killed_attack_keeps_its_results(tmp_path, fact_files):
    """SIGKILL mid-attack: results.json still parses and holds every evaluation made so far."""
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = ("import sys; from tests.attack.test_tamper import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", script, *_args(model, fact_files, out, "--epochs", "1000", "--eval_every", "1",
                                                      "--lr", "1e-3")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[2])
    path = out / "results.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.is_file() and len(json.loads(path.read_text())["records"]) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    results = json.loads(path.read_text())
    steps = [r["step"] for r in results["records"]]
    assert len(steps) >= 3 and steps == list(range(len(steps)))
    assert results["config"]["steps"] == 3000 and steps[-1] < 3000
    assert all(set(r["tasks"]) == {"capitals", "symbols"} for r in results["records"])
    assert results["recovery"] == pytest.approx(recovery(results["records"]))


def test_facts_domain_records_and_split():
    records = fact_records("facts:country_capital")
    from lensunlearn.data.facts import corpus_texts, questions

    assert [r["text"] for r in records] == corpus_texts("country_capital")
    subjects = {q["fact_id"]: q["prompt"].removeprefix("The capital of ").removesuffix(" is")
                for q in questions("country_capital")}
    assert all(subjects[r["fact_id"]] in r["text"] for r in records)
    attacked, held = split_fact_ids("facts:country_capital", [r["fact_id"] for r in records], 0.5, 0)
    assert not attacked & held and attacked | held == set(subjects)
    assert abs(len(attacked) - len(held)) <= 1


@pytest.mark.parametrize("kwargs", [{"batch": 6, "per_device_batch": 4}, {"holdout": 1.0}, {"eval_every": 0},
                                    {"schedules": ("linear", "step")}, {"lrs": (1e-5, -1.0)}])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ConfigError):
        TamperConfig(**kwargs)


def test_sweep_settings():
    cfg = TamperConfig(lrs=(1e-5, 2e-5), schedules=("linear", "cosine"))
    assert cfg.sweep == [(1e-5, "linear"), (2e-5, "linear"), (1e-5, "cosine"), (2e-5, "cosine")]
    assert TamperConfig(lr=3e-5).sweep == [(3e-5, "linear")]
