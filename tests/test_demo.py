"""The whole story at tiny scale through `main(argv)`, with warnings turned into errors."""

from __future__ import annotations

import json
import re

import pytest

from lensunlearn.cli import main

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
    assert set(base["results"]) == {"facts:country_capital", "facts:element_symbol", "facts:us_state_capital"}
    assert len(base["profile"]["layers"]) == 4
    assert json.loads((out / "lens_eval.json").read_text())["documents"] == 128  # the demo's share of the held-out text
    report = (out / "report.md").read_text()
    assert "| baseline" in report.lower() or "baseline" in report.lower()
    # every kept domain in the demo's table, the runs table and the attack's table; every figure linked
    for domain in ("element symbol", "us state capital"):
        assert f"| {domain} (kept) |" in report.replace("_", " ") or f"{domain} (kept)" in report.replace("_", " ")
    for task in ("facts:element_symbol", "facts:us_state_capital"):
        assert f"{task} (↑)" in report and f"| {task} |" in report.split("## Tampering resistance")[1]
    drawn = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert drawn == set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)) and "tamper/tamper.png" in drawn
    summary = json.loads((out / "unlearn" / "summary.json").read_text())
    taken = max(json.loads(line)["step"] for line in (out / "unlearn" / "metrics.jsonl").read_text().splitlines())
    steps = f"{taken} of {summary['steps']}" if taken != summary["steps"] else str(taken)
    assert f"| {steps} |" in report.split("## Unlearning runs")[1]  # the steps the run took
    records = json.loads((out / "tamper" / "results.json").read_text())["records"]
    assert [r["step"] for r in records] == [0, 32, 33]  # the attack cycles its 16 chunks for --tamper_steps
    assert "facts:country_capital:heldout" in records[-1]["tasks"]  # the unseen half is measured apart
    run_config = json.loads((out / "unlearn" / "run_config.json").read_text())
    # the robust preset as a user runs it: its own retain corpus, never the kept domains it is judged on
    assert run_config["retain"] == "generic:retain" and run_config["examples"] == 32
    assert run_config["layers"] == [1, 3] and run_config["forget"] == "facts:country_capital"
    assert run_config["cir"] and run_config["cir_grad_components"] == 4 and run_config["optimizer"] == "muon"
    assert run_config["cir_on_loss_rise"] == "stop"  # the preset's shrink rule would not fit the demo's time
    caplog.clear()
    with caplog.at_level("INFO"):
        main(argv)
    assert caplog.text.count("already done") == 7
