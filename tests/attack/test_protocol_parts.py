"""The robustness protocol on a split relation: it attacks and measures within the forget part, and a kept
part of the same relation is measured beside the other kept tasks."""

from __future__ import annotations

import json

import pytest

from lensunlearn.attack.options import RobustnessConfig
from lensunlearn.attack.protocol import check_inputs, resolve
from lensunlearn.data import facts
from lensunlearn.data.splits import split_ids
from lensunlearn.modeling.loading import load_tokenizer

from ..conftest import save_tiny_model

CC = "facts:country_capital"


@pytest.fixture
def split_run(tmp_path):
    """An unlearning run's folder whose run_config names the forget part of country capitals."""
    base = save_tiny_model(tmp_path / "base")
    save_tiny_model(tmp_path / "run" / "merged", seed=2)
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({
        "model": str(base), "forget": f"{CC}@forget", "eval_tasks": f"{CC}@forget,{CC}@kept,facts:element_symbol",
        "eval_format": "cloze"}))
    return tmp_path


def test_the_protocol_attacks_and_measures_only_within_the_forget_part(split_run):
    cfg = resolve(RobustnessConfig(run=str(split_run / "run"), seeds=(0, 1)))
    assert cfg.forget_task == f"{CC}@forget" and cfg.kept_tasks == f"{CC}@kept,facts:element_symbol"
    inputs = check_inputs(cfg, load_tokenizer(str(split_run / "base")))
    parts = split_ids([f.fact_id for f in facts.facts("country_capital")])
    assert {i["fact_id"] for i in inputs.forget_items} == set(parts["forget"])
    assert {r["fact_id"] for r in inputs.corpus} == set(parts["forget"])
    # the facts whose subject gives the answer away are left out of the halves and reported apart
    assert inputs.guessable and set(inputs.guessable) < set(parts["forget"])
    for attacked, unseen in inputs.splits.values():
        assert set(attacked) | set(unseen) | set(inputs.guessable) == set(parts["forget"])
        assert not set(attacked) & set(unseen) and not (set(attacked) | set(unseen)) & set(inputs.guessable)
    assert inputs.kept == [f"{CC}@kept", "facts:element_symbol"]


def test_a_kept_part_split_otherwise_than_the_forget_part_is_refused(split_run):
    cfg = resolve(RobustnessConfig(run=str(split_run / "run"), kept_tasks=f"{CC}@kept?split_seed=4"))
    with pytest.raises(ValueError, match="split the facts they share differently"):
        check_inputs(cfg, load_tokenizer(str(split_run / "base")))


EIGHT = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"), ("peru", "lima"),
         ("japan", "tokyo"), ("egypt", "cairo"), ("kenya", "nairobi"))


def test_a_kept_part_is_reported_beside_the_other_kept_tasks(tmp_path):
    """A whole protocol run on a split relation of a user's own files: the halves are drawn from the forget
    part alone, and the kept part is measured and tabled under its name beside another kept task."""
    from lensunlearn.cli import main

    base = save_tiny_model(tmp_path / "base", seed=1)
    save_tiny_model(tmp_path / "run" / "merged", seed=2)
    answers = [a for _, a in EIGHT]
    corpus = tmp_path / "capitals_corpus.jsonl"
    corpus.write_text("".join(json.dumps({"fact_id": f"cap:{s}", "text": t.format(s=s, a=a)}) + "\n"
                              for s, a in EIGHT for t in ("the capital of {s} is {a} .", "{a} is in {s} .")))
    task = tmp_path / "capitals.jsonl"

    def choices(i: int) -> list[str]:  # the answer and the next three, the answer at position i % 4
        four = [answers[(i + k) % len(answers)] for k in range(4)]
        return four[-(i % 4):] + four[:-(i % 4)] if i % 4 else four

    task.write_text("".join(json.dumps({"fact_id": f"cap:{s}", "subject": s, "question": f"capital of {s} ?",
                                        "prompt": f"the capital of {s} is", "choices": choices(i),
                                        "answer": choices(i).index(a)}) + "\n" for i, (s, a) in enumerate(EIGHT)))
    symbols = ["gold", "iron", "oxygen", "element"]
    kept = tmp_path / "symbols.jsonl"
    kept.write_text("".join(json.dumps({"question": f"symbol of {w} ?", "prompt": f"the symbol of {w} is",
                                        "choices": symbols, "answer": k}) + "\n" for k, w in enumerate(symbols)))
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({
        "model": str(base), "forget": f"{corpus}@forget", "eval_format": "cloze",
        "eval_tasks": [f"{task}@forget", f"{task}@kept", str(kept)]}))
    generic = tmp_path / "generic.txt"
    generic.write_text("it was a question of gold and iron .\nthe answer is in the question .\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(f"it was {i} and {i + 1} on the element ." for i in range(6)) + "\n")
    out = tmp_path / "robust"
    main(["robustness", str(tmp_path / "run"), "--generic", str(generic), "--benign", str(benign), "--kinds", "lora",
          "--lrs", "1e-2", "--steps", "2", "--batch", "4", "--lora_rank", "4", "--max_new_tokens", "2",
          "--fluency_prompts", "1", "--seeds", "0", "--out", str(out)])
    saved = json.loads((out / "robustness.json").read_text())
    parts = split_ids([f"cap:{s}" for s, _ in EIGHT])
    halves = json.loads((out / "seeds" / "seed0" / "split.json").read_text())
    assert set(halves["attacked"]) | set(halves["unseen"]) == set(parts["forget"])
    assert saved["split"]["attacked"] + saved["split"]["unseen"] == len(parts["forget"]) == 4
    assert set(saved["kept"]) == {"capitals@kept", "symbols"}
    assert set(saved["kept"]["capitals@kept"]) == {"base", "unlearned", "after_best_attack"}
    assert "| capitals@kept |" in (out / "robustness.md").read_text()


def test_a_run_that_forgot_other_phrasings_is_measured_on_its_forget_part_questions(split_run):
    """Phrasings change the forget text, not the questions: a run whose forget source asks for other
    phrasings is measured on its forget part's questions, which are no kept task; the attack text is that
    run's forget text unless --forget names another."""
    config = split_run / "run" / "run_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "forget": f"{CC}@forget?phrasings=all"}))
    cfg = resolve(RobustnessConfig(run=str(split_run / "run"), seeds=(0,)))
    assert cfg.forget_task == f"{CC}@forget" and cfg.kept_tasks == f"{CC}@kept,facts:element_symbol"
    inputs = check_inputs(cfg, load_tokenizer(str(split_run / "base")))
    parts = split_ids([f.fact_id for f in facts.facts("country_capital")])
    assert {r["fact_id"] for r in inputs.corpus} == set(parts["forget"])
    assert len(inputs.corpus) == len(parts["forget"]) * len(facts.phrasings("country_capital", "all"))
    standard = resolve(RobustnessConfig(run=str(split_run / "run"), forget=f"{CC}@forget", seeds=(0,)))
    assert standard.forget_task == f"{CC}@forget"
    assert len(check_inputs(standard, load_tokenizer(str(split_run / "base"))).corpus) == \
        len(parts["forget"]) * len(facts.phrasings("country_capital"))
