"""`lensunlearn locate`: causal tracing finds a fact planted in one block's MLP, and bad input fails first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lensunlearn.eval import causal_trace as ct
from lensunlearn.eval import locate as locate_module
from lensunlearn.modeling.layers import block_component, model_parts

from ..conftest import make_tiny_model, run_command, write_jsonl

FACTS = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))
CHOICES = ["paris", "berlin", "rome", "madrid"]
PLANTED = 2


def _output_projection(mlp: torch.nn.Module) -> torch.nn.Module:
    """The MLP's last linear layer (down_proj, c_proj, dense_4h_to_h): what it writes to the stream."""
    return [m for name, m in mlp.named_modules() if name.split(".")[-1] in ("down_proj", "c_proj", "dense_4h_to_h")][0]


def plant(arch: str, block: int, steps: int = 60):
    """A tiny model that stores the capitals of FACTS in the MLP of `block` alone: every other MLP writes
    nothing (its output projection zeroed), and only that MLP is trained, to complete "the capital of X"
    with X's capital. The unembedding is scaled up so that a 32-wide model can put its mass on one word."""
    model, tokenizer = make_tiny_model(arch, seed=0, layers=4)
    parts = model_parts(model)
    with torch.no_grad():
        parts.unembed.weight.mul_(30)
        for index, b in enumerate(parts.blocks):
            if index != block:
                out = _output_projection(block_component(b, "mlp"))
                out.weight.zero_()
                if getattr(out, "bias", None) is not None:
                    out.bias.zero_()
    model.requires_grad_(False)
    trained = list(block_component(parts.blocks[block], "mlp").parameters())
    for p in trained:
        p.requires_grad_(True)
    ids = torch.tensor([tokenizer.encode(f"the capital of {s} {a}") for s, a in FACTS])
    optimizer = torch.optim.Adam(trained, lr=3e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, -2], ids[:, -1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    return model.eval(), tokenizer


def _questions(path: Path, rows=None) -> Path:
    rows = rows or [{"question": f"capital of {s}?", "prompt": f"the capital of {s}", "choices": CHOICES,
                     "answer": CHOICES.index(a), "subject": s, "fact_id": f"cap:{s}"} for s, a in FACTS]
    return write_jsonl(path, rows)


@pytest.mark.parametrize("arch, stream", [("llama", 1), ("gpt2", 0), ("gpt_neox", 1)])
def test_locate_finds_the_block_that_stores_a_planted_fact(arch, stream, tmp_path):
    model, tokenizer = plant(arch, PLANTED)
    model.save_pretrained(tmp_path / "planted")
    tokenizer.save_pretrained(tmp_path / "planted")
    out = run_command(["locate", "--model", tmp_path / "planted", "--eval_tasks", _questions(tmp_path / "q.jsonl"),
                       "--out", tmp_path / "loc", "--device", "cpu", "--noise_samples", "4", "--corrupt_stream",
                       stream])
    result = json.loads((out / "locate.json").read_text())
    assert result["band"] == [PLANTED, PLANTED] and result["num_blocks"] == 4
    mlp = result["recovered_share"]["mlp"]
    # restoring that one MLP brings the answer back; restoring another (which writes nothing) does nothing;
    # the blocks before the noised stream are not traced
    assert mlp[PLANTED] > 0.9 and all(abs(v) < 1e-6 for b, v in enumerate(mlp) if stream <= b != PLANTED)
    assert all(mlp[b] is None and result["recovered_share"]["attn"][b] is None for b in range(stream))
    assert result["peak_share"] == mlp[PLANTED] and result["weak"] is False
    assert result["facts"] == {"given": 4, "known": 4, "traced": 4}
    assert result["p_clean"] > 0.9 and result["p_corrupt"] < result["p_clean"] - 0.1
    assert (out / "locate.png").stat().st_size > 1000
    with pytest.raises(FileExistsError, match="finished locate result"):
        run_command(["locate", "--model", tmp_path / "planted", "--eval_tasks", tmp_path / "q.jsonl", "--out",
                     tmp_path / "loc", "--device", "cpu"])


def test_a_trace_does_not_depend_on_how_its_rows_are_batched():
    """Every restored run of a fact is a row of a batch; splitting the rows over several forward passes
    (and the noise draws over rows) gives the same probabilities."""
    model, tokenizer = make_tiny_model("llama", layers=3)
    context = tokenizer.encode("the capital of france is")
    item = ct.TraceItem("f", "france", "paris", context, tokenizer.encode("paris rome"), 3, 4)
    noise = ct.noise_for(0, 0, 3, 1, 32, 1.0)
    whole = ct.trace_fact(model, item, noise, window=2, batch=256)
    split = ct.trace_fact(model, item, noise, window=2, batch=3)
    assert whole["p_corrupt"] == pytest.approx(split["p_corrupt"], rel=1e-5)
    for component in ct.COMPONENTS:
        assert whole["p_restored"][component] == pytest.approx(split["p_restored"][component], rel=1e-5)
    assert whole["p_corrupt"] != pytest.approx(whole["p_clean"], rel=1e-4)  # the noise did something
    # a two-token answer's probability is the product of its tokens' (teacher-forced)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + item.answer_ids[:1]])).logits[0].log_softmax(-1)
    expected = (logits[len(context) - 1, item.answer_ids[0]] + logits[len(context), item.answer_ids[1]]).exp()
    assert whole["p_clean"] == pytest.approx(float(expected), rel=1e-4)


def test_the_band_is_the_peak_and_its_neighbours_above_the_threshold():
    assert ct.band([0.0, 0.2, 0.6, 1.0, 0.5, 0.49, 0.9], 0.5) == (2, 4)
    assert ct.band([0.0, 0.2, 0.6, 1.0, 0.5, 0.49, 0.9], 0.4) == (2, 6)
    assert ct.band([0.3, 0.3, 0.1], 0.5) == (0, 1)  # a tie goes to the shallower block
    assert ct.band([0.0, 0.0], 0.5) == (0, 0)
    assert ct.band([None, 0.5, 0.9, None, 0.9], 0.5) == (1, 2)  # a block not traced ends a band
    traces = [{"p_clean": 1.0, "p_corrupt": 0.2, "p_restored": {"mlp": [0.6, 0.2], "attn": [0.2, 1.0]}},
              {"p_clean": 0.5, "p_corrupt": 0.3, "p_restored": {"mlp": [0.4, 0.3], "attn": [0.3, 0.3]}}]
    share = ct.recovered_share(traces, ("mlp", "attn"))
    assert share["mlp"] == pytest.approx([0.5, 0.0]) and share["attn"] == pytest.approx([0.0, 0.8])
    assert ct.mean_effect(traces, ("mlp",))["mlp"] == pytest.approx([0.25, 0.0])


@pytest.mark.parametrize("case", ["no_subject", "subject_not_in_prompt", "no_tasks", "unknown_task"])
def test_bad_questions_fail_before_the_model_loads(case, tmp_path, tiny_model_dir, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("lensunlearn.modeling.loading.load_model", no_model)
    row = {"question": "capital of france?", "prompt": "the capital of france", "choices": CHOICES, "answer": 0,
           "fact_id": "cap:fr", "subject": "france"}
    error, tasks = ValueError, str(tmp_path / "q.jsonl")
    if case == "no_subject":
        row.pop("subject")
        match = "cap:fr has no subject: locate corrupts the subject's tokens"
    elif case == "subject_not_in_prompt":
        row["subject"] = "France"
        match = "the subject 'France' of cap:fr is not in its prompt"
    elif case == "no_tasks":
        tasks, match = "", "--eval_tasks is required"
    else:
        tasks, match = "facts:rivers", "unknown fact domain 'rivers'"
    write_jsonl(tmp_path / "q.jsonl", [row])
    with pytest.raises(error, match=match) as info:
        run_command(["locate", "--model", tiny_model_dir, "--eval_tasks", tasks, "--out", tmp_path / "loc"])
    assert len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "loc").exists()


def test_the_fact_benchmarks_subjects_are_found_in_their_prompts(tiny_model_dir):
    questions = locate_module.load_questions("facts:country_capital@kept,facts:element_symbol")
    assert len(questions) == 40 + 56
    from lensunlearn.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    # the tiny word-level tokenizer knows "france": the subject's token is found by character offsets
    row = [q for q in locate_module.load_questions("facts:country_capital") if q.item["subject"] == "France"]
    assert row and row[0].context == "The capital of France is"
    item = ct.TraceItem("x", "france", "paris", tokenizer.encode("the capital of france is"), [], 0, 0)
    assert ct.subject_tokens(tokenizer, "the capital of france is", item.context, "france") == (3, 4)
