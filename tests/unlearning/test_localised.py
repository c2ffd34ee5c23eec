"""Localised updates (`--blocks`), several weighted retain sources, and the bad input of both, on tiny models."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lensunlearn.core.config import ConfigError
from lensunlearn.modeling.loading import load_tokenizer
from lensunlearn.unlearning import distill as distill_module
from lensunlearn.unlearning import run as run_module

from ..conftest import run_command, unlearn_argv, write_jsonl, write_unlearn_inputs

BAND = 1  # the tiny model's blocks are 0-3; target layers 1,3 read blocks 0-2


@pytest.fixture
def setup(tmp_path):
    return write_unlearn_inputs(tmp_path, "llama")


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def _changed(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after)
    return {name for name in before if not before[name].equal(after[name])}


def _in_band(name: str, block: int, weights: str) -> bool:
    return f"layers.{block}." in name and (weights == "all" or ".mlp." in name)


@pytest.mark.parametrize("mode", ["lora", "full", "full_all", "cir", "lora_all"])
def test_localised_unlearning_changes_the_band_and_no_other_weight(setup, mode):
    extra = {"lora": [], "lora_all": ["--block_weights", "all", "--lora_targets", "all"],
             "full": ["--full"], "full_all": ["--full", "--block_weights", "all"],
             "cir": ["--full", "--cir", "--optimizer", "muon", "--weight_decay", "0", "--cir_act_components", "3",
                     "--cir_grad_components", "4", "--cir_max_loss_rise", "0"]}[mode]
    run_dir = run_command(unlearn_argv(setup, "--blocks", str(BAND), "--lr", "1e-2", *extra))
    changed = _changed(_weights(setup / "tiny"), _weights(run_dir / "merged"))
    weights = "all" if mode.endswith("_all") else "mlp"
    assert changed and all(_in_band(name, BAND, weights) for name in changed), sorted(changed)
    if weights == "all":
        assert any(".self_attn." in name for name in changed)
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["trained_blocks"] == [BAND] and config["blocks"] == str(BAND)
    assert run_dir.name.endswith(f"_blocks{BAND}" + ("_all" if weights == "all" else ""))  # not the unlocalised run


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished unlearning run of blocks 1-2, and text to distil on."""
    tmp = write_unlearn_inputs(tmp_path_factory.mktemp("localised"))
    run_command(unlearn_argv(tmp, "--run_name", "src", "--blocks", "1-2", "--full", "--lr", "1e-2"))
    write_jsonl(tmp / "text.jsonl", [{"text": f"the capital of france is paris and {i}"} for i in range(16)])
    return tmp


@pytest.mark.parametrize("blocks", ["1", "run"])
def test_localised_distillation_perturbs_and_trains_the_band_only(source, blocks):
    out = run_command(["distill", "--run", source / "runs" / "src", "--corpus", source / "text.jsonl", "--generic",
                       source / "text.jsonl", "--max_length", "16", "--batch", "4", "--per_device_batch", "4",
                       "--steps", "2", "--eval_every", "0", "--warmup", "0", "--alpha", "0.3", "--device", "cpu",
                       "--blocks", blocks, "--out", source / "distilled", "--run_name", f"d{blocks}"])
    teacher = _weights(source / "runs" / "src" / "merged")
    changed = _changed(teacher, _weights(out / "merged"))
    band = (1,) if blocks == "1" else (1, 2)
    assert changed == {n for n in teacher if any(_in_band(n, b, "mlp") for b in band)}
    assert json.loads((out / "run_config.json").read_text())["trained_blocks"] == list(band)


def test_shrink_and_perturb_of_named_parameters_leaves_the_rest(source):
    from lensunlearn.modeling.loading import load_model

    model, _ = load_model(str(source / "tiny"), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = set(run_module.band_parameters(model, (2,), "mlp"))
    noise = distill_module.perturbation_noise(model, 3, names)
    distill_module.shrink_perturb(model, 0.5, 1.0, 3, names)
    assert set(noise) == names
    for name, value in model.state_dict().items():
        if name in names:
            assert value.allclose(0.5 * before[name] + 0.5 * noise[name])
        else:
            assert value.equal(before[name])


def test_blocks_auto_takes_the_band_locate_found(setup):
    write_jsonl(setup / "q.jsonl", [{"question": "capital?", "prompt": f"the capital of {c} is", "subject": c,
                                     "choices": ["paris", "rome", "madrid", "berlin"], "answer": a}
                                    for c, a in (("france", 0), ("italy", 1), ("spain", 2))])
    located = run_command(["locate", "--model", setup / "tiny", "--eval_tasks", setup / "q.jsonl", "--out",
                           setup / "loc", "--device", "cpu", "--no-known_only", "--noise_samples", "2"])
    band = json.loads((located / "locate.json").read_text())["band"]
    run_dir = run_command(unlearn_argv(setup, "--blocks", "auto", "--locate", located, "--layers", "1,4"))
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["trained_blocks"] == list(range(band[0], band[1] + 1)) and config["locate"] == str(located)


def test_blocks_auto_warns_when_the_band_is_not_told_apart_from_noise(tmp_path, caplog):
    """A locate result whose best MLP restores almost nothing (what the embedded model's capitals give at the
    defaults) is taken by --blocks auto with a warning naming the share and what to try."""
    from lensunlearn.unlearning.blocks import resolve_blocks

    write_json = (tmp_path / "locate.json").write_text
    write_json(json.dumps({"band": [2, 2], "num_blocks": 4, "peak_share": 0.0026, "weak": True}))
    cfg = run_module.UnlearnConfig(blocks="auto", locate=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert resolve_blocks(cfg, 4) == (2,)
    assert [r.getMessage() for r in caplog.records] == [
        f"--blocks auto: the locate result in {tmp_path} is weak: its best single MLP restores 0.0026 of what the "
        f"noise destroyed (below 0.05), so its band is not told apart from noise; try --window 5 or "
        f"--corrupt_stream 0, or set --blocks a-b by hand"]
    caplog.clear()
    write_json(json.dumps({"band": [1, 2], "num_blocks": 4, "peak_share": 0.4, "weak": False}))
    with caplog.at_level(logging.WARNING):
        assert resolve_blocks(cfg, 4) == (1, 2)
    assert caplog.records == []


def test_several_retain_sources_are_mixed_by_weight_and_recorded(setup):
    write_jsonl(setup / "other.jsonl", [{"text": f"an iron symbol {i} and gold"} for i in range(5)])
    cfg = run_module.UnlearnConfig(
        model=str(setup / "tiny"), lens=str(setup / "lens"), layers=(1, 3), forget=str(setup / "forget.jsonl"),
        retain=f"{setup / 'retain.jsonl'},{setup / 'other.jsonl'}", retain_weights=(3.0, 1.0), retain_config=None,
        retain_column=None, examples=64, batch=8, per_device_batch=4, max_length=16, out=str(setup / "runs"),
        eval_tasks="", device="cpu")
    tokenizer = load_tokenizer(str(setup / "tiny"))
    data = run_module.load_pairs(cfg, tokenizer)
    other = {tuple(ids) for ids in run_module.tokenize([f"an iron symbol {i} and gold" for i in range(5)], tokenizer,
                                                       16)}
    seen = Counter()
    steps_per_epoch = cfg.examples // cfg.batch
    for step in range(steps_per_epoch):  # what the optimiser steps of one epoch see
        for _, ids in run_module.global_micro_batches(cfg, data, step):
            for row in data.micro_batch(ids)["retain"]["input_ids"].tolist():
                seen["other" if tuple(t for t in row if t != tokenizer.pad_token_id) in other else "retain"] += 1
    assert seen == {"retain": 48, "other": 16}  # 3:1 over the epoch
    assert [m["share"] for m in data.retain_mix] == [0.75, 0.25]
    assert len(data.retain) == 8 + 5  # each document once, repeats point back to it (the original-model cache)
    run_dir = run_command(unlearn_argv(setup, "--retain", f"{setup / 'retain.jsonl'},{setup / 'other.jsonl'}",
                                       "--retain_weights", "1,3"))
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["retain_weights"] == [1.0, 3.0]
    assert [(m["source"], m["share"]) for m in config["retain_mix"]] == \
        [(str(setup / "retain.jsonl"), 0.25), (str(setup / "other.jsonl"), 0.75)]
    # one source: the data and the run are as before (no order, no mix recorded)
    single = run_module.load_pairs(replace(cfg, retain=str(setup / "retain.jsonl"), retain_weights=()), tokenizer)
    assert single.retain_order is None and single.retain_mix is None


CC = "facts:country_capital"


@pytest.mark.parametrize("case", ["retain_states_forget", "overlapping_parts", "empty_part", "kept_trained",
                                  "blocks_outside", "blocks_auto_without_locate", "locate_without_result",
                                  "blocks_above_layers", "blocks_and_cir_blocks", "weights_count", "locate_alone",
                                  "bad_blocks", "blocks_other_objective"])
def test_bad_input_is_one_line_before_any_model_loads(setup, case, monkeypatch, tmp_path):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", no_model)
    few = write_jsonl(tmp_path / "few.jsonl", [{"fact_id": "a", "text": "a"}, {"fact_id": "b", "text": "b"}])
    error = ValueError
    extra = {
        "retain_states_forget": ["--forget", f"{CC}@forget", "--retain", f"generic:retain,{CC}"],
        "overlapping_parts": ["--forget", f"{CC}@forget", "--retain", f"{CC}@retain?split_seed=2"],
        "empty_part": ["--forget", f"{few}@kept"],
        "kept_trained": ["--forget", f"{CC}@forget", "--retain", f"generic:retain,{CC}@kept", "--eval_tasks",
                         f"{CC}@kept"],
        "blocks_outside": ["--blocks", "2-9"],
        "blocks_auto_without_locate": ["--blocks", "auto"],
        "locate_without_result": ["--blocks", "auto", "--locate", str(tmp_path)],
        "blocks_above_layers": ["--blocks", "2-3"],
        "blocks_and_cir_blocks": ["--blocks", "1", "--cir_blocks", "0", "--full", "--cir", "--optimizer", "muon",
                                  "--weight_decay", "0"],
        "weights_count": ["--retain_weights", "1,2"],
        "locate_alone": ["--locate", str(tmp_path)],
        "bad_blocks": ["--blocks", "3-1"],
        "blocks_other_objective": ["--blocks", "1", "--objective", "graddiff", "--layers", "none"],
    }[case]
    match = {
        "retain_states_forget": r"--retain facts:country_capital states 80 fact\(s\) of --forget",
        "overlapping_parts": "split the facts they share differently .* so their parts overlap",
        "empty_part": "few.jsonl@kept is empty",
        "kept_trained": "is a kept part, but facts:country_capital@kept trains on 40 of its facts",
        "blocks_outside": "--blocks 2-9 is outside the model: it has 4 blocks, 0-3",
        "blocks_auto_without_locate": "--blocks auto takes the band of a `lensunlearn locate` result: pass --locate",
        "locate_without_result": "holds no locate.json: run `lensunlearn locate",
        "blocks_above_layers": "reaches block 3, not below the deepest target layer 3",
        "blocks_and_cir_blocks": "--blocks and --cir_blocks both choose",
        "weights_count": "--retain_weights gives 2 weights for 1 --retain sources",
        "locate_alone": "--locate is read by --blocks auto",
        "bad_blocks": "--blocks 3-1: name a band of blocks a-b",
        "blocks_other_objective": "--blocks trains a band with --objective lens only; --objective graddiff",
    }[case]
    if case in ("blocks_auto_without_locate", "blocks_and_cir_blocks", "weights_count", "locate_alone",
                "bad_blocks", "blocks_above_layers", "blocks_other_objective"):
        error = ConfigError
    with pytest.raises(error, match=match) as info:
        run_command(unlearn_argv(setup, "--run_name", "bad", *extra))
    assert len(str(info.value).splitlines()) == 1
    assert not (setup / "runs" / "bad").exists()


@pytest.mark.parametrize("blocks, match", [("2-9", "--blocks 2-9 is outside the model: it has 4 blocks"),
                                           ("auto", "--blocks auto takes the band of a `lensunlearn locate`")])
def test_distill_refuses_a_band_outside_the_model_before_it_loads(source, blocks, match, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(distill_module, "load_model", no_model)
    with pytest.raises(ValueError, match=match) as info:
        run_command(["distill", "--run", source / "runs" / "src", "--corpus", source / "text.jsonl", "--generic",
                     source / "text.jsonl", "--device", "cpu", "--blocks", blocks, "--out", source / "bad"])
    assert len(str(info.value).splitlines()) == 1 and not (source / "bad").exists()


@pytest.mark.parametrize("budget_text, watched, advice", [
    (None, " and the loss budget", "; pass --cir_budget_text generic:heldout to watch text nothing trains on"),
    ("retain", "", "")])
def test_the_general_text_variant_says_when_its_sample_mixes_retain_sources(setup, caplog, budget_text, watched,
                                                                            advice):
    """Several --retain sources are interleaved by weight, so --cir_corpus retain reads a sample of every source,
    facts included; the run says so once, naming the sources and the flag that moves the budget off them."""
    write_jsonl(setup / "other.jsonl", [{"text": f"an iron symbol {i} and gold"} for i in range(5)])
    sources = f"{setup / 'retain.jsonl'},{setup / 'other.jsonl'}"
    budget = [] if budget_text is None else ["--cir_budget_text", str(setup / "retain.jsonl")]
    with caplog.at_level(logging.WARNING, logger="lensunlearn"):
        run_command(unlearn_argv(setup, "--retain", sources, "--full", "--cir", "--optimizer", "muon",
                                 "--weight_decay", "0", "--cir_corpus", "retain", "--cir_budget_text", "none",
                                 "--cir_act_components", "3", "--cir_grad_components", "4", "--cir_pca_docs", "6",
                                 *budget))
    said = [r.getMessage() for r in caplog.records if "--retain sources" in r.getMessage()]
    assert said == [f"--cir_corpus retain with 2 --retain sources: the shared directions{watched} come from the "
                    f"first 6 retain documents, which mix every source ({sources.replace(',', ', ')}), not general "
                    f"text alone{advice}"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lensunlearn"):  # one source: general text as before, no word
        run_command(unlearn_argv(setup, "--full", "--cir", "--optimizer", "muon", "--weight_decay", "0",
                                 "--cir_corpus", "retain", "--cir_budget_text", "none", "--cir_act_components", "3",
                                 "--cir_grad_components", "4", "--cir_pca_docs", "6", "--overwrite", *budget))
    assert not [r for r in caplog.records if "--retain sources" in r.getMessage()]
