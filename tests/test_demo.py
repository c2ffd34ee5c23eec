"""The whole story at tiny scale through `main(argv)`, with warnings turned into errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from lensunlearn.cli import configure, main
from lensunlearn.demo import run as demo_run
from lensunlearn.demo.options import SELECTIVE_EXAMPLES, SELECTIVE_LR
from lensunlearn.demo.run import (
    BUDGET_STOP_STEPS,
    LENS_SECONDS_PER_STEP,
    STAGE_SECONDS,
    UNLEARN_SECONDS_PER_STEP,
    Stages,
    expected_seconds,
)

from .conftest import save_tiny_model


# Warnings are errors, except one from third-party code: peft 0.21 asks transformers 5 for a renamed attribute.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("error")
def test_demo_runs_every_stage_and_skips_them_on_rerun(tmp_path, caplog):
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", layers=4)
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(model_dir), "--out", str(out), "--lens_steps", "2", "--unlearn_examples", "32",
            "--unlearn_layers", "1,3", "--tamper_limit", "16", "--tamper_steps", "33",
            "--cir_act_components", "3", "--cir_grad_components", "4"]
    main(argv)
    for name in ("facts/country_capital.jsonl", "lens/params.pt", "lens_eval.json", "base_eval.json",
                 "base_eval.profile.png", "unlearn/eval.json", "unlearn/merged/config.json", "unlearned_eval.json",
                 "tamper/results.json", "tamper/tamper.png", "report.md"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    base = json.loads((out / "base_eval.json").read_text())
    # the forget part and the never-trained parts: the neighbour's retain part is trained on, so its kept part
    assert set(base["results"]) == {"facts:country_capital@forget", "facts:country_capital@kept",
                                    "facts:element_symbol", "facts:us_state_capital@kept"}
    assert len(base["profile"]["layers"]) == 4
    assert json.loads((out / "lens_eval.json").read_text())["documents"] == 128  # the demo's share of the held-out text
    report = (out / "report.md").read_text()
    assert "| baseline" in report.lower() or "baseline" in report.lower()
    # every kept domain in the demo's table, the runs table and the attack's table; every figure linked
    for domain in ("country capital, kept part", "element symbol", "us state capital, kept part"):
        assert f"| {domain} (kept) |" in report
    assert "| country capital, forget part (forgotten) |" in report
    for task in ("facts:element_symbol", "facts:us_state_capital@kept"):
        assert f"{task} (↑)" in report and f"| {task} |" in report.split("## Tampering resistance")[1]
    drawn = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert drawn == set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)) and "tamper/tamper.png" in drawn
    summary = json.loads((out / "unlearn" / "summary.json").read_text())
    taken = max(json.loads(line)["step"] for line in (out / "unlearn" / "metrics.jsonl").read_text().splitlines())
    steps = f"{taken} of {summary['steps']}" if taken != summary["steps"] else str(taken)
    assert f"| {steps} |" in report.split("## Unlearning runs")[1]  # the steps the run took
    records = json.loads((out / "tamper" / "results.json").read_text())["records"]
    assert [r["step"] for r in records] == [0, 32, 33]  # the attack cycles its 16 chunks for --tamper_steps
    assert "facts:country_capital@forget:heldout" in records[-1]["tasks"]  # the unseen half is measured apart
    attack = json.loads((out / "tamper" / "results.json").read_text())["config"]
    assert attack["num_attacked_facts"] == 40  # half of the forget part (80 of 160 capitals)
    run_config = json.loads((out / "unlearn" / "run_config.json").read_text())
    # the robust preset on a split relation: everyday text and the retain parts, never a part it is judged on
    assert run_config["retain"] == "generic:retain,facts:country_capital@retain,facts:us_state_capital@retain"
    assert run_config["examples"] == 32 and run_config["lr"] == SELECTIVE_LR  # the line's, and the demo's
    assert run_config["cir_budget_text"] == "generic:heldout"
    assert run_config["layers"] == [1, 3] and run_config["forget"] == "facts:country_capital@forget"
    assert run_config["cir"] and run_config["cir_grad_components"] == 4 and run_config["optimizer"] == "muon"
    assert run_config["cir_on_loss_rise"] == "shrink"  # the preset's own rule: the short run meets its budget early
    caplog.clear()
    with caplog.at_level("INFO"):
        main(argv)
    assert caplog.text.count("already done") == 7


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_demo_with_a_trained_lens_scores_it_and_trains_none(tmp_path, monkeypatch):
    """--lens DIR: every stage reads that lens, and the lens stage only writes its table."""
    from lensunlearn.lens import train as lens_train

    model_dir = save_tiny_model(tmp_path / "tiny", "llama", layers=2)
    lens_dir = tmp_path / "my_lens"
    main(["lens", "train", "--model", str(model_dir), "--steps", "1", "--out", str(lens_dir)])
    weights = (lens_dir / "params.pt").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained a lens although --lens named one")

    monkeypatch.setattr(lens_train, "train_lens", no_training)
    out = tmp_path / "demo"
    main(["demo", "--model", str(model_dir), "--out", str(out), "--lens", str(lens_dir), "--unlearn_examples", "16",
          "--unlearn_layers", "0,1", "--tamper_limit", "8", "--tamper_steps", "2", "--cir_act_components", "2",
          "--cir_grad_components", "2", "--no-selective"])
    assert not (out / "lens").exists() and (lens_dir / "params.pt").read_bytes() == weights
    assert json.loads((out / "lens_eval.json").read_text())["lens"] == str(lens_dir)
    assert json.loads((out / "unlearn" / "run_config.json").read_text())["lens"] == str(lens_dir)
    assert (out / "report.md").exists()


def test_demo_refuses_a_lens_folder_without_a_lens(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--lens", str(folder), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert f"--lens {folder} is not a tuned lens folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_demo_tasks_and_retain_data_with_and_without_selective():
    """--selective forgets the forget part and measures the kept parts; --no-selective the earlier story:
    the whole domain forgotten, everyday text retained, whole domains measured."""
    cfg = configure(["demo"])[1]
    assert cfg.forget_source == "facts:country_capital@forget"
    assert cfg.tasks == ["facts:country_capital@forget", "facts:country_capital@kept", "facts:element_symbol",
                         "facts:us_state_capital@kept"]
    cfg = configure(["demo", "--neighbour_domains", ""])[1]
    assert cfg.retain == "generic:retain,facts:country_capital@retain"
    assert cfg.tasks[2:] == ["facts:element_symbol", "facts:us_state_capital"]
    cfg = configure(["demo", "--kept_domains", "element_symbol"])[1]  # a neighbour trained on, not measured
    assert cfg.retain.endswith("facts:us_state_capital@retain") and cfg.tasks[2:] == ["facts:element_symbol"]
    assert configure(["demo"])[1].unlearn_settings() == dict(examples=SELECTIVE_EXAMPLES, lr=SELECTIVE_LR,
                                                             cir_on_loss_rise="shrink")
    cfg = configure(["demo", "--no-selective"])[1]
    assert (cfg.forget_source, cfg.retain) == ("facts:country_capital", "generic:retain")
    assert cfg.tasks == ["facts:country_capital", "facts:element_symbol", "facts:us_state_capital"]
    assert cfg.unlearn_settings() == dict(cir_on_loss_rise="stop")  # the robust preset's steps and rate
    cfg = configure(["demo", "--unlearn_lr", "5e-4", "--cir_on_loss_rise", "stop", "--unlearn_examples", "64"])[1]
    assert cfg.unlearn_settings() == dict(examples=64, lr=5e-4, cir_on_loss_rise="stop")  # flags win


def test_demo_eta_follows_the_flags_and_then_the_machine(tmp_path, monkeypatch, caplog):
    """The first ETA counts the lens and unlearning steps these flags plan (a whole-relation run stops at
    its budget); once a stage has run, the rest is scaled by how fast this machine has been."""
    cfg = configure(["demo"])[1]
    table = expected_seconds(cfg)
    assert table["unlearn"] == STAGE_SECONDS["unlearn"] + UNLEARN_SECONDS_PER_STEP * SELECTIVE_EXAMPLES / 16
    short = expected_seconds(configure(["demo", "--unlearn_examples", "160", "--lens_steps", "60"])[1])
    fewer_steps = (SELECTIVE_EXAMPLES - 160) / 16
    assert table["unlearn"] - short["unlearn"] == pytest.approx(UNLEARN_SECONDS_PER_STEP * fewer_steps)
    assert table["lens"] - short["lens"] == pytest.approx(LENS_SECONDS_PER_STEP * 60)
    whole = expected_seconds(configure(["demo", "--no-selective"])[1])
    assert whole["unlearn"] == STAGE_SECONDS["unlearn"] + UNLEARN_SECONDS_PER_STEP * BUDGET_STOP_STEPS
    for name in ("params.pt", "config.json"):
        (tmp_path / name).write_text("")
    assert expected_seconds(dataclasses.replace(cfg, lens=str(tmp_path)))["lens"] == STAGE_SECONDS["lens"]  # scored

    clock = iter([0.0, 0.0, 200.0, 200.0, 200.0, 230.0, 230.0])  # stage a takes 200 s, twice its estimate
    monkeypatch.setattr(demo_run.time, "perf_counter", lambda: next(clock))
    stages = Stages({"a": 100.0, "b": 50.0, "c": 70.0})
    with caplog.at_level("INFO"):
        stages.run("a", Path("unused"), lambda: None)
        stages.run("b", Path("unused"), lambda: None)
    assert "[1/3] a (ETA for the rest: ~4 min)" in caplog.text  # 220 s, before anything has run
    assert "[2/3] b (ETA for the rest: ~4 min)" in caplog.text  # (50 + 70) s at twice the pace
    assert "[2/3] b finished in 30 s" in caplog.text


def test_demo_refuses_the_forget_domain_as_a_neighbour(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--neighbour_domains", "country_capital"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--forget_domain must not also be a neighbour domain" in err and len(err.splitlines()) == 1
