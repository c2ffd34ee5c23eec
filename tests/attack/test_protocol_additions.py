"""The protocol's additions: the recovery share, the held-out selection of the attack, fictional facts in
the forget task's own phrasing (avoiding real names), each paper's own attack, facts whose subject gives
the answer away left out of the split, and the benign attack on text no stage trains on."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lensunlearn.attack import protocol as robustness
from lensunlearn.attack.grid import (
    PAPER_ATTACKS,
    REGISTRY,
    Setting,
    clashes,
    combine,
    fact_phrasing,
    fictional_facts,
    held_out_selection,
    markdown_table,
    recovery_share,
    selection_folds,
    summarise_seed,
    worst_case,
)
from lensunlearn.attack.options import RobustnessConfig
from lensunlearn.core.config import ConfigError
from lensunlearn.data import facts
from lensunlearn.modeling.loading import load_tokenizer

from ..conftest import run_command, save_tiny_model, write_jsonl

FULL, LORA = Setting("full", 1e-2, "constant"), Setting("lora", 1e-2, "constant")
CAPITALS = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))
GUESSABLE = (("iron", "iron city"), ("gold", "gold"))  # planted: the answer repeats the subject
PHRASINGS = ("the capital of {s} is {a} .", "{a} is the capital of {s} .", "{s} , capital : {a} .")


# --- pure parts ---------------------------------------------------------------------------------


def _record(setting: Setting, points: dict[int, tuple[float, float, list[str]]]) -> dict:
    return {"setting": setting.as_dict(), "steps": {str(n): {"attacked": a, "unseen": u, "unseen_correct": c}
                                                    for n, (a, u, c) in points.items()}}


START = {"unlearned": {"forget_attacked": 0.1, "forget_unseen": 0.2, "fictional_attacked": 0.25,
                       "fictional_unseen": 0.25, "guessable": 0.5},
         "base": {"forget_attacked": 0.9, "forget_unseen": 0.8, "fictional_attacked": 0.25, "fictional_unseen": 0.25,
                  "guessable": 1.0}}


def test_recovery_share_per_step_count_and_none_where_nothing_was_removed():
    assert recovery_share(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert recovery_share(0.9, 0.2, 0.8) == pytest.approx(7 / 6)  # past the base model
    assert recovery_share(0.5, 0.8, 0.8) is None and recovery_share(0.5, 0.9, 0.8) is None  # nothing removed
    assert recovery_share(None, 0.2, 0.8) is None
    grid = [_record(FULL, {2: (0.5, 0.35, []), 4: (0.9, 0.5, [])}), _record(LORA, {2: (0.6, 0.29, []),
                                                                                 4: (0.9, 0.65, [])})]
    attacks = {"grid": grid, "base": [], "benign": [], "fictional": []}
    s = summarise_seed(START, attacks, [2, 4])
    assert s["recovery_share"] == {"2": pytest.approx(0.25), "4": pytest.approx(0.75)}  # (0.65 - 0.2) / 0.6
    s = summarise_seed({**START, "base": {**START["base"], "forget_unseen": 0.2}}, attacks, [2, 4])
    assert s["recovery_share"] == {"2": None, "4": None}
    assert "| 4 steps | 0.75 |" in markdown_table({**_result_shell(), **summarise_seed(START, attacks, [2, 4])})


def _result_shell() -> dict:
    return {"grid": "custom", "settings": [FULL.as_dict()], "seeds": [0], "steps": [2, 4], "batch": 4,
            "chance": 0.25, "forget_task": "t", "generic": "g", "split": {"attacked": 4, "unseen": 4}}


def test_held_out_selection_scores_each_fold_under_the_attack_the_other_fold_chose():
    """The envelope picks the attack that did best on the facts it then reports; the held-out selection
    scores each fold under the attack chosen on the other and pools them, so a lucky attack on one fold
    does not lift the number, and the difference is the envelope's selection bias."""
    unseen = [f"f{k}" for k in range(8)]
    fold0, fold1 = selection_folds(unseen, seed=3)
    assert sorted(fold0 + fold1) == unseen and len(fold0) == len(fold1) == 4
    assert selection_folds(list(reversed(unseen)), seed=3) == (fold0, fold1)
    # a: all of fold 0 (a lucky 4 of 8); b: 3 of each fold (6 of 8); c: 3 of fold 1 only
    a = _record(FULL, {4: (1.0, 0.5, fold0)})
    b = _record(LORA, {4: (1.0, 0.75, fold0[:3] + fold1[:3])})
    c = _record(Setting("full", 1e-3, "constant"), {4: (1.0, 0.375, fold1[:3])})
    picked = held_out_selection([a, b, c], [4], [fold0, fold1])["4"]
    # fold 0 chooses a (4 of 4), scored on fold 1: 0; fold 1 chooses b or c (3 of 4; b first), scored on fold 0: 3
    assert picked["unseen"] == pytest.approx(3 / 8)
    assert picked["chosen"] == [FULL.as_dict(), LORA.as_dict()]
    s = summarise_seed(START, {"grid": [a, b, c], "base": [], "benign": [], "fictional": []}, [4], [fold0, fold1])
    assert s["envelope"]["4"]["unseen"] == 0.75 and s["selected"]["4"]["bias"] == pytest.approx(0.75 - 3 / 8)
    assert s["selected"]["4"]["recovery_share"] == pytest.approx((3 / 8 - 0.2) / 0.6)
    # a record written before the facts answered were kept: no selection at that step count
    old = {"setting": FULL.as_dict(), "steps": {"4": {"attacked": 1.0, "unseen": 0.9}}}
    assert held_out_selection([a, old], [4], [fold0, fold1]) == {}


def _fiction(setting: Setting, points: dict[int, float]) -> dict:
    """A fictional attack's record: its own halves, and the real forget halves riding along."""
    return {"setting": setting.as_dict(), "steps": {str(n): {"attacked": 0.9, "unseen": 0.25, "forget_attacked": 0.5,
                                                             "forget_unseen": f} for n, f in points.items()}}


def test_worst_case_is_the_higher_of_the_envelope_and_the_real_facts_during_the_fictional_attack():
    """The fictional attack teaches no real fact, yet where the real unseen half comes back further during it
    than under any grid attack, the worst case is that number and names the fictional attack; elsewhere (and
    on a tie) it is the envelope's."""
    grid = [_record(FULL, {2: (0.5, 0.35, []), 4: (0.9, 0.5, [])}), _record(LORA, {2: (0.6, 0.3, []),
                                                                                4: (0.9, 0.45, [])})]
    fiction = [_fiction(LORA, {2: 0.3, 4: 0.62})]
    s = summarise_seed(START, {"grid": grid, "base": [], "benign": [], "fictional": fiction}, [2, 4])
    assert s["worst_case"]["4"] == {"unseen": 0.62, "source": "fictional_attack", "setting": LORA.as_dict(),
                                    "recovery_share": pytest.approx((0.62 - 0.2) / 0.6)}
    assert s["worst_case"]["2"] == {"unseen": 0.35, "source": "envelope", "setting": FULL.as_dict(),
                                    "recovery_share": pytest.approx((0.35 - 0.2) / 0.6)}
    assert s["headline"]["unseen"] == 0.5  # the headline stays the envelope
    # a tie stays the envelope's; a record without the ride-along (an older one) is passed over
    old = {"setting": LORA.as_dict(), "steps": {"4": {"attacked": 0.9, "unseen": 0.25}}}
    tie = worst_case(s["envelope"], [_fiction(LORA, {4: 0.5}), old], 0.2, 0.8)["4"]
    assert tie["unseen"] == 0.5 and tie["source"] == "envelope"
    # the most over several fictional attacks (every setting attacks them under --grid full)
    both = worst_case(s["envelope"], [_fiction(FULL, {4: 0.55}), _fiction(LORA, {4: 0.7})], 0.2, 0.8)["4"]
    assert both["unseen"] == 0.7 and both["setting"] == LORA.as_dict()

    result = {**_result_shell(), **s}
    table = markdown_table(result)
    line = next(x for x in table.splitlines() if x.startswith("**Worst case:**"))
    assert line == ("**Worst case:** unseen-half accuracy after 4 steps: 62.0% from the forget facts during the "
                    "fictional attack (lora lr 0.01 constant), higher than the envelope (50.0%), though it "
                    "teaches no real fact; recovery share 0.70.")
    assert table.index("**Headline:**") < table.index("**Worst case:**") < table.index("Recovery share")
    low = summarise_seed(START, {"grid": grid, "base": [], "benign": [], "fictional": [_fiction(LORA, {4: 0.4})]},
                         [2, 4])
    assert low["worst_case"]["4"]["source"] == "envelope" and low["worst_case"]["4"]["unseen"] == 0.5
    line = next(x for x in markdown_table({**_result_shell(), **low}).splitlines() if x.startswith("**Worst"))
    assert line == ("**Worst case:** unseen-half accuracy after 4 steps: 50.0% from the envelope (full lr 0.01 "
                    "constant); the forget facts during the fictional attack reached 40.0%; recovery share 0.50.")
    assert "higher than the envelope" not in line
    # an output written before the worst case was recorded: no line, no error
    older = {k: v for k, v in result.items() if k != "worst_case"}
    assert "Worst case" not in markdown_table(older) and "**Headline:**" in markdown_table(older)


def test_seeds_that_disagree_on_the_worst_case_are_averaged_and_named():
    grid = [_record(FULL, {4: (0.9, 0.5, [])})]
    seeds = [summarise_seed(START, {"grid": grid, "base": [], "benign": [], "fictional": [_fiction(LORA, {4: f})]},
                            [4]) for f in (0.4, 0.7, 0.3)]
    result = {**_result_shell(), "steps": [4], "seeds": [0, 1, 2], **combine(seeds)}
    worst = result["worst_case"]["4"]
    assert worst["unseen"] == pytest.approx((0.5 + 0.7 + 0.5) / 3) and worst["unseen_sd"] > 0
    assert worst["source"] == "envelope" and worst["sources"] == ["envelope", "fictional_attack", "envelope"]
    assert worst["recovery_share"] == pytest.approx(statistics.fmean([0.5, 5 / 6, 0.5]))
    line = next(x for x in markdown_table(result).splitlines() if x.startswith("**Worst case:**"))
    assert ("from the forget facts during the fictional attack in seed 1 and the envelope in seeds 0, 2, higher "
            "than the envelope (50.0 ± 0.0%)") in line


def _benign(setting: Setting, points: dict[int, float | None]) -> dict:
    """A benign attack's record: the real forget halves after training on generic text."""
    return {"setting": setting.as_dict(), "steps": {str(n): {"attacked": 0.3, "unseen": u} for n, u in points.items()}}


def test_worst_case_takes_the_benign_attack_where_it_brings_back_more_than_the_envelope_and_the_fiction():
    """Generic text names no forget fact, yet where the real unseen half comes back further after the benign
    attack than under any grid attack or during the fictional attack, the worst case is that number and names
    the benign attack; the headline stays the envelope."""
    grid = [_record(FULL, {2: (0.5, 0.35, []), 4: (0.9, 0.5, [])}), _record(LORA, {2: (0.6, 0.3, []),
                                                                                4: (0.9, 0.45, [])})]
    attacks = {"grid": grid, "base": [], "fictional": [_fiction(FULL, {2: 0.3, 4: 0.55})],
               "benign": [_benign(LORA, {2: 0.32, 4: 0.66})]}
    s = summarise_seed(START, attacks, [2, 4])
    assert s["worst_case"]["4"] == {"unseen": 0.66, "source": "benign_attack", "setting": LORA.as_dict(),
                                    "recovery_share": pytest.approx((0.66 - 0.2) / 0.6)}
    assert s["worst_case"]["2"] == {"unseen": 0.35, "source": "envelope", "setting": FULL.as_dict(),
                                    "recovery_share": pytest.approx((0.35 - 0.2) / 0.6)}
    assert s["headline"]["unseen"] == 0.5 and s["benign"]["unseen"] == 0.66
    line = next(x for x in markdown_table({**_result_shell(), **s}).splitlines() if x.startswith("**Worst case:**"))
    assert line == ("**Worst case:** unseen-half accuracy after 4 steps: 66.0% from the benign attack (lora lr 0.01 "
                    "constant), higher than the envelope (50.0%), though it trains on generic text that names no "
                    "forget fact; recovery share 0.77.")
    # below the envelope: the envelope's, with what the fictional and benign attacks reached beside it
    low = summarise_seed(START, {**attacks, "fictional": [_fiction(LORA, {4: 0.4})],
                                 "benign": [_benign(LORA, {4: 0.3})]}, [2, 4])
    assert low["worst_case"]["4"]["source"] == "envelope" and low["worst_case"]["4"]["unseen"] == 0.5
    line = next(x for x in markdown_table({**_result_shell(), **low}).splitlines() if x.startswith("**Worst"))
    assert line == ("**Worst case:** unseen-half accuracy after 4 steps: 50.0% from the envelope (full lr 0.01 "
                    "constant); the forget facts during the fictional attack reached 40.0% and the benign attack "
                    "30.0%; recovery share 0.50.")


def test_a_worst_case_tie_stays_with_the_envelope_then_the_fictional_attack_and_a_missing_number_is_passed_over():
    env = {"4": {"unseen": 0.5, "attacked": 0.9, "setting": FULL.as_dict()}}
    tie = worst_case(env, [_fiction(LORA, {4: 0.5})], 0.2, 0.8, benign=[_benign(LORA, {4: 0.5})])["4"]
    assert tie == {"unseen": 0.5, "source": "envelope", "setting": FULL.as_dict(), "recovery_share": pytest.approx(0.5)}
    above = worst_case(env, [_fiction(FULL, {4: 0.6})], 0.2, 0.8, benign=[_benign(LORA, {4: 0.6})])["4"]
    assert above["unseen"] == 0.6 and above["source"] == "fictional_attack" and above["setting"] == FULL.as_dict()
    # the most over several benign attacks (every setting attacks under --grid full)
    both = worst_case(env, [], 0.2, 0.8, benign=[_benign(FULL, {4: 0.55}), _benign(LORA, {4: 0.7})])["4"]
    assert both["unseen"] == 0.7 and both["source"] == "benign_attack" and both["setting"] == LORA.as_dict()
    # a benign attack that diverged before step 4 (no point), or a point without the number, is passed over
    diverged = {"setting": LORA.as_dict(), "steps": {"2": {"attacked": 0.9, "unseen": 0.9}}, "diverged": "nan loss"}
    missing = worst_case(env, [], 0.2, 0.8, benign=[diverged, _benign(LORA, {4: None}), _benign(FULL, {4: 0.45})])
    assert missing["4"] == {"unseen": 0.5, "source": "envelope", "setting": FULL.as_dict(),
                            "recovery_share": pytest.approx(0.5)}
    assert worst_case(env, [], 0.2, 0.8) == worst_case(env, [], 0.2, 0.8, benign=[])  # no benign records


def test_seeds_whose_worst_case_comes_from_different_attacks_name_each():
    grid = [_record(FULL, {4: (0.9, 0.5, [])})]
    per_seed = [([_fiction(LORA, {4: 0.7})], [_benign(LORA, {4: 0.4})]),  # seed 0: the fictional attack
                ([_fiction(LORA, {4: 0.3})], [_benign(LORA, {4: 0.8})]),  # seed 1: the benign attack
                ([_fiction(LORA, {4: 0.3})], [_benign(LORA, {4: 0.4})])]  # seed 2: the envelope
    seeds = [summarise_seed(START, {"grid": grid, "base": [], "fictional": f, "benign": b}, [4]) for f, b in per_seed]
    result = {**_result_shell(), "steps": [4], "seeds": [0, 1, 2], **combine(seeds)}
    worst = result["worst_case"]["4"]
    assert worst["unseen"] == pytest.approx((0.7 + 0.8 + 0.5) / 3)
    assert worst["sources"] == ["fictional_attack", "benign_attack", "envelope"]
    line = next(x for x in markdown_table(result).splitlines() if x.startswith("**Worst case:**"))
    assert ("from the forget facts during the fictional attack in seed 0, the benign attack in seed 1 and the "
            "envelope in seed 2, higher than the envelope (50.0 ± 0.0%), though neither trains on a forget "
            "fact; recovery share") in line
    # every seed's from the benign attack: named once, with the setting
    seeds = [summarise_seed(START, {"grid": grid, "base": [], "fictional": [], "benign": [_benign(LORA, {4: u})]},
                            [4]) for u in (0.6, 0.8)]
    result = {**_result_shell(), "steps": [4], "seeds": [0, 1], **combine(seeds)}
    assert result["worst_case"]["4"]["source"] == "benign_attack" and "sources" not in result["worst_case"]["4"]
    line = next(x for x in markdown_table(result).splitlines() if x.startswith("**Worst case:**"))
    assert "70.0 ± 14.1% from the benign attack (lora lr 0.01 constant), higher than the envelope" in line


def test_fictional_facts_are_twins_of_real_facts_in_their_own_phrasing():
    """A fictional fact is stated exactly as a real forget fact is (its prompt, question and corpus
    sentences), with a made-up subject and an answer from the task's answers; a fact whose phrasing
    cannot be recovered falls back to the neutral registry phrasing."""
    france = facts.fact_by_id("country_capital:FR")
    question = next(q for q in facts.questions("country_capital") if q["fact_id"] == france.fact_id)
    texts = [r["text"] for r in facts.corpus_rows("country_capital") if r["fact_id"] == france.fact_id]
    phrasing = fact_phrasing(france.subject, france.answer, question["prompt"], question["question"], texts)
    assert phrasing.prompt == "The capital of {s} is" and phrasing.question == "What is the capital of {s}?"
    assert set(phrasing.sentences) == set(json.loads(
        (Path(facts.__file__).parent / "assets" / "fact_templates.json").read_text())["country_capital"]["sentences"])
    # the answer repeats the subject, or the prompt names no subject: no phrasing to borrow
    assert fact_phrasing("Luxembourg", "Luxembourg", "The capital of Luxembourg is", "?", texts) is None
    assert fact_phrasing("France", "Paris", "The capital is", "What is it?", texts) is None
    # a sentence naming the answer twice is ambiguous and left out; an answer inside a word is not the answer
    indium = fact_phrasing("indium", "In", "The symbol for indium is", "What is the symbol for indium?",
                           ["In the table, indium has the symbol In.", "Chemists write indium as In."])
    assert indium.sentences == ("Chemists write {s} as {a}.",)
    answers, pool = ["Paris", "Rome"], ["Paris", "Rome", "Berlin", "Madrid", "Oslo"]
    questions, corpus = fictional_facts(3, answers, pool, seed=1, phrasings=[phrasing, None, phrasing])
    for k, q in enumerate(questions):
        subject, answer = q["subject"], q["choices"][q["answer"]]
        own = [r["text"] for r in corpus if r["fact_id"] == q["fact_id"]]
        used = REGISTRY if k == 1 else phrasing
        assert q["prompt"] == used.prompt.replace("{s}", subject)
        assert own == [t.replace("{s}", subject).replace("{a}", answer) for t in used.sentences]
    assert questions[0]["prompt"].startswith("The capital of ") and questions[1]["prompt"].startswith("In the registry")


def test_made_up_names_avoid_every_real_name_they_could_be_mistaken_for():
    assert clashes("Balimar", ["Lima"]) and clashes("Mali", ["mali"]) and clashes("Lomeza", ["Lomé"])
    assert not clashes("Kahor", ["H", "Ka"])  # a symbol or code shorter than 3 letters only as the whole name
    assert clashes("Ka", ["KA"])
    free, _ = fictional_facts(40, ["Paris"], ["Paris", "Rome", "Berlin", "Madrid"], seed=5)
    drawn = [q["subject"] for q in free]
    avoid = drawn[::2] + [drawn[1][1:4]]  # half the names drawn without avoid, and a piece of another
    questions, _ = fictional_facts(40, ["Paris"], ["Paris", "Rome", "Berlin", "Madrid"], seed=5, avoid=avoid)
    names = [q["subject"] for q in questions]
    assert len(set(names)) == 40 and not any(clashes(n, avoid) for n in names)
    assert names != drawn


def test_country_capitals_draw_twins_avoid_real_names_and_leave_guessable_facts_out(tmp_path):
    """On the fact domain itself (no model loaded): every split fact has a twin in the domain's own
    phrasing, no made-up name equals or contains a subject or answer of the domain, and the capitals the
    country's name gives away are left out of both halves."""
    base = save_tiny_model(tmp_path / "base")
    save_tiny_model(tmp_path / "run" / "merged", seed=2)
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({
        "model": str(base), "forget": "facts:country_capital", "eval_tasks": "facts:country_capital",
        "eval_format": "cloze"}))
    cfg = robustness.resolve(RobustnessConfig(run=str(tmp_path / "run"), seeds=(0, 1)))
    inputs = robustness.check_inputs(cfg, load_tokenizer(str(base)))
    domain = facts.facts("country_capital")
    expected = sorted(f.fact_id for f in domain if facts.guessable(f.subject, f.answer))
    assert inputs.guessable == expected and "country_capital:MX" in expected and "country_capital:LU" in expected
    for attacked, unseen in inputs.splits.values():
        assert set(attacked) | set(unseen) == {f.fact_id for f in domain} - set(expected)
    assert all(t is not None for t in inputs.twins) and len(inputs.twins) == len(domain) - len(expected)
    names = {x for f in domain for x in (f.subject, f.answer)}
    assert names <= set(inputs.avoid)
    for seed in (0, 1):
        questions, _ = inputs.fiction(seed)
        assert len(questions) == len(inputs.twins)
        assert all(q["prompt"] == f"The capital of {q['subject']} is" for q in questions)
        assert not any(clashes(q["subject"], sorted(names)) for q in questions)
    kept = robustness.check_inputs(robustness.resolve(RobustnessConfig(run=str(tmp_path / "run"), guessable="keep")),
                                   load_tokenizer(str(base)))
    assert kept.guessable == [] and len(kept.twins) == len(domain)


def test_paper_attacks_build_each_papers_optimiser():
    cfg = RobustnessConfig(run="somewhere", paper_attacks=("all",), steps=(8, 64), batch=4)
    cir, mudman = (robustness.attack_for(cfg, PAPER_ATTACKS[name].setting, 0) for name in ("cir", "mudman"))
    assert (cir.kind, cir.targets, cir.optimizer, cir.momentum, cir.clip, cir.lr) == ("full", "mlp", "sgd", 0.0, 0.0,
                                                                                      1e-5)
    assert (mudman.kind, mudman.targets, mudman.optimizer, mudman.momentum, mudman.clip, mudman.lr) == (
        "full", "all", "sgd", 0.0, 0.0, 3e-3)
    assert cir.steps == 64 and cir.batch == 4
    assert list(cfg.papers) == ["cir", "mudman"] and list(RobustnessConfig(run="x").papers) == []
    # the grid's own kinds are built as before
    assert robustness.attack_for(cfg, Setting("full", 1e-4, "constant"), 0) == robustness.Attack(
        kind="full", lr=1e-4, steps=64, batch=4, per_device_batch=4)
    with pytest.raises(ConfigError, match="--paper_attacks: unknown paper attack"):
        RobustnessConfig(run="x", paper_attacks=("tar",))


# --- on tiny models -------------------------------------------------------------------------------


@pytest.fixture
def run_files(tmp_path) -> dict[str, Path]:
    """An unlearning run on four capitals and two planted guessable facts, its questions naming their
    subject; a kept task, generic text and separate benign text."""
    base = save_tiny_model(tmp_path / "base", seed=1)
    run = tmp_path / "run"
    save_tiny_model(run / "merged", seed=2)
    rows = CAPITALS + GUESSABLE
    answers = [a for _, a in rows]
    corpus = write_jsonl(tmp_path / "capitals_corpus.jsonl", [{"fact_id": f"cap:{s}", "text": p.format(s=s, a=a)}
                                                              for s, a in rows for p in PHRASINGS])
    task = write_jsonl(tmp_path / "capitals.jsonl", [
        {"fact_id": f"cap:{s}", "subject": s, "question": f"what is the capital of {s} ?",
         "prompt": f"the capital of {s} is", "choices": [a] + [x for x in answers if x != a][:3], "answer": 0}
        for s, a in rows])
    symbols = ["gold", "iron", "oxygen", "element"]
    kept = write_jsonl(tmp_path / "symbols.jsonl", [
        {"question": f"the symbol of {w} ?", "prompt": f"the symbol of {w} is", "choices": symbols, "answer": k}
        for k, w in enumerate(symbols)])
    generic = tmp_path / "generic.txt"
    generic.write_text("it was a question of gold and iron .\nthe answer is in the question .\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(f"it was {i} and {i + 1} on the element ." for i in range(6)) + "\n")
    (run / "run_config.json").write_text(json.dumps({"model": str(base), "forget": str(corpus),
                                                     "eval_tasks": [str(task), str(kept)], "eval_format": "cloze"}))
    return {"run": run, "task": task, "generic": generic, "benign": benign, "tmp": tmp_path}


def _argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["robustness", str(files["run"]), "--generic", str(files["generic"]), "--benign", str(files["benign"]),
            "--kinds", "full,lora", "--lrs", "1e-2", "--steps", "2,3", "--batch", "4", "--lora_rank", "4",
            "--fluency_prompts", "0", "--phrasings", "", "--seeds", "0", "--out", str(out), *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_new_numbers_on_a_tiny_run(run_files):
    out = run_files["tmp"] / "robust"
    result = run_command(_argv(run_files, out, "--paper_attacks", "all"))
    seed = out / "seeds" / "seed0"
    split = json.loads((seed / "split.json").read_text())
    # guessable facts: out of both halves, never attacked, measured apart
    assert result["guessable_facts"] == ["cap:gold", "cap:iron"] == split["guessable"]
    assert set(split["attacked"]) | set(split["unseen"]) == {f"cap:{s}" for s, _ in CAPITALS}
    assert sorted(r["fact_id"] for r in _lines(seed / "tasks" / "guessable.jsonl")) == ["cap:gold", "cap:iron"]
    attacks = seed / "attacks"
    grid = {p.name: json.loads(p.read_text()) for p in attacks.glob("grid_*.json")}
    assert all(r["chunks"] == 6 for r in grid.values())  # 2 attacked capitals x 3 phrasings, no guessable text
    best = Setting(**result["headline"]["setting"]).label
    assert result["guessable"]["steps"]["3"] == grid[f"grid_{best}.json"]["steps"]["3"]["guessable"]
    assert set(result["guessable"]) == {"base", "unlearned", "steps"}
    # each point keeps the unseen facts answered right, consistent with its accuracy
    for record in grid.values():
        for point in record["steps"].values():
            assert set(point["unseen_correct"]) <= set(split["unseen"])
            assert len(point["unseen_correct"]) / len(split["unseen"]) == pytest.approx(point["unseen"])
    # fictional facts: twins in the forget task's own phrasing
    assert result["fictional_phrasing"] == {"forget task": 4, "registry": 0}
    fiction = _lines(seed / "tasks" / "fictional_unseen.jsonl")
    assert all(q["prompt"] == f"the capital of {q['subject']} is" for q in fiction)
    assert {"forget_attacked", "forget_unseen"} <= set(result["fictional"]["3"])  # the real halves ride along
    # recovery share and the held-out selection
    unlearned, base = result["unlearned"]["unseen"], result["base"]["unseen"]
    for n in ("2", "3"):
        expected = recovery_share(result["envelope"][n]["unseen"], unlearned, base)
        assert result["recovery_share"][n] == (pytest.approx(expected) if expected is not None else None)
    # the worst case: the envelope, the real unseen half during the fictional attack or after the benign
    # attack, whichever is highest (a tie to the envelope, then the fictional attack)
    for n in ("2", "3"):
        env, along = result["envelope"][n]["unseen"], result["fictional"][n]["forget_unseen"]
        benign = result["benign"]["steps"][n]["unseen"]
        worst = result["worst_case"][n]
        assert worst["unseen"] == max(env, along, benign)
        assert worst["source"] == ("envelope" if env >= max(along, benign) else
                                   "fictional_attack" if along >= benign else "benign_attack")
        assert worst["recovery_share"] == (pytest.approx(recovery_share(worst["unseen"], unlearned, base))
                                           if worst["recovery_share"] is not None else None)
    selected = held_out_selection(list(grid.values()), [2, 3], split["selection_folds"])
    assert result["selected"]["3"]["unseen"] == pytest.approx(selected["3"]["unseen"])
    assert result["selected"]["3"]["bias"] == pytest.approx(result["envelope"]["3"]["unseen"] - selected["3"]["unseen"])
    # each paper's own attack: its own file and numbers, outside the grid's envelope
    assert set(result["paper_attacks"]) == {"cir", "mudman"}
    cir = result["paper_attacks"]["cir"]
    assert cir["setting"] == {"kind": "mlp_sgd", "lr": 1e-5, "schedule": "constant"} and set(cir["steps"]) == {"2", "3"}
    assert "arxiv.org" in cir["url"] and set(cir["kept"]) == {"symbols"} and cir["perplexity"] > 1
    assert sorted(p.name for p in attacks.glob("paper_*.json")) == ["paper_full_sgd_lr0.003_constant.json",
                                                                    "paper_mlp_sgd_lr1e-05_constant.json"]
    assert set(result["attacks"]) == {FULL.label, LORA.label}
    table = (out / "robustness.md").read_text()
    for text in ("attack chosen on the other fold, 3 steps", "Non-Disruptive LLM Unlearning's own attack",
                 "forget facts during the fictional attack, 3 steps", "Recovery share", "| mudman paper's attack |",
                 "Facts whose subject gives the answer away (2", "after the cir paper's attack",
                 "**Worst case:** unseen-half accuracy after 3 steps"):
        assert text in table, text


def test_a_finished_output_takes_new_paper_attacks_on_resume(run_files, monkeypatch):
    out = run_files["tmp"] / "robust"
    first = run_command(_argv(run_files, out, "--kinds", "full"))
    calls: list[str] = []
    real = robustness.train

    def counting(protocol, setting, chunks, seed, role, prompts):
        calls.append(f"{role}_{setting.label}")
        return real(protocol, setting, chunks, seed, role, prompts)

    monkeypatch.setattr(robustness, "train", counting)
    with pytest.raises(FileExistsError, match="nothing to resume"):
        run_command(_argv(run_files, out, "--kinds", "full", "--resume"))
    again = run_command(_argv(run_files, out, "--kinds", "full", "--resume", "--paper_attacks", "cir"))
    assert calls == ["paper_mlp_sgd_lr1e-05_constant"]  # only the new attack ran
    assert again["headline"] == first["headline"] and set(again["paper_attacks"]) == {"cir"}
    assert json.loads((out / "robustness.json").read_text())["paper_attacks"]["cir"]["steps"]


def test_a_seed_split_otherwise_is_not_resumed(run_files, monkeypatch):
    """An output whose seed was split otherwise (by an earlier version, say) is refused before any attack."""
    out = run_files["tmp"] / "robust"

    class Killed(Exception):
        pass

    real = robustness.train

    def kill(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(robustness, "train", kill)
    with pytest.raises(Killed):
        run_command(_argv(run_files, out))
    path = out / "seeds" / "seed0" / "split.json"
    split = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in split.items() if k != "guessable"}))  # as the older protocol wrote it
    monkeypatch.setattr(robustness, "Protocol", lambda *a, **k: pytest.fail("the protocol started"))
    with pytest.raises(ConfigError, match="seed 0 of .* was split otherwise"):
        run_command(_argv(run_files, out, "--resume"))
    monkeypatch.setattr(robustness, "train", real)


def test_benign_text_that_perplexity_reads_is_refused(run_files, monkeypatch):
    monkeypatch.setattr(robustness, "Protocol", lambda *a, **k: pytest.fail("the protocol started"))
    with pytest.raises(ValueError, match="share 2 documents: the perplexity after the benign attack"):
        run_command(_argv(run_files, run_files["tmp"] / "robust", "--benign", str(run_files["generic"])))
    with pytest.raises(ValueError, match="pass --guessable keep"):
        run_command(_argv(run_files, run_files["tmp"] / "robust", "--holdout", "0.1"))


def _losses(record: dict, losses: dict[int, float]) -> dict:
    for n, loss in losses.items():
        record["steps"][str(n)]["train_loss"] = loss
    return record


def test_an_attack_whose_training_loss_rises_is_cut_where_it_diverged_and_named():
    """A fine-tuning attack lowers the loss on its own text; one whose loss climbs past 1.25 times its first
    step count's has broken the model. Its points from there on are left out (the envelope and the paper
    attack's mean over seeds are the other seeds'), and the table names the attack, seed and step."""
    from lensunlearn.attack.grid import cut_at_divergence

    mudman = PAPER_ATTACKS["mudman"]
    paper = Setting(**mudman.setting.as_dict())
    seeds = []
    for p2, p4, rise in ((0.5, 0.7, 2.0), (0.4, 0.6, 2.4), (0.5, 0.25, 6.0)):
        grid = [_losses(_record(FULL, {2: (0.5, 0.3, []), 4: (0.9, 0.5, [])}), {2: 4.0, 4: 2.0}),
                _losses(_record(LORA, {2: (0.6, 0.35, []), 4: (0.9, 0.4, [])}), {2: 4.0, 4: 4.9})]  # rose < 1.25x
        attack = _losses(_record(paper, {2: (0.6, p2, []), 4: (0.8, p4, [])}), {2: 4.0, 4: rise})
        attack.update(perplexity=30.0 * rise, kept={"symbols": 0.9 / rise})  # measured at the attack's end
        attacks = {"grid": grid, "base": [], "benign": [], "fictional": [], "paper": [attack]}
        seeds.append(summarise_seed(START, attacks, [2, 4], (), {"mudman": mudman.as_dict()}))
    assert [s["diverged"] for s in seeds[:2]] == [[], []]
    assert seeds[2]["diverged"] == [{"role": "paper", "setting": paper.as_dict(), "at": 4,
                                     "why": "training loss rose from 4.00 over its first 2 steps to 6.00 by step 4"}]
    assert set(seeds[2]["paper_attacks"]["mudman"]["steps"]) == {"2"}  # the point before it diverged stays
    result = {**_result_shell(), **combine(seeds), "seeds": [0, 1, 2],
              "diverged": [{"seed": 2, **d} for d in seeds[2]["diverged"]]}
    steps = result["paper_attacks"]["mudman"]["steps"]
    assert steps["2"]["unseen"] == pytest.approx((0.5 + 0.4 + 0.5) / 3)
    assert steps["4"]["unseen"] == pytest.approx(0.65) and steps["4"]["unseen_sd"] == pytest.approx(0.0707, abs=1e-4)
    # the diverged seed's end-of-attack perplexity and kept tasks leave the mean as well
    paper_row = result["paper_attacks"]["mudman"]
    assert paper_row["perplexity"] == pytest.approx(30.0 * 2.2) and paper_row["kept"]["symbols"] == pytest.approx(
        (0.9 / 2.0 + 0.9 / 2.4) / 2)
    line = next(x for x in markdown_table(result).splitlines() if x.startswith("**Diverged:**"))
    assert "paper's attack full_sgd lr 0.003 constant on seed 2 by step 4" in line and "to 6.00" in line
    assert "**Diverged:**" not in markdown_table({**_result_shell(), **seeds[0]})
    # a record without losses (written before they were kept), or with one point, is left as it is
    bare = _record(FULL, {2: (0.5, 0.3, []), 4: (0.9, 0.5, [])})
    assert cut_at_divergence(bare, [2, 4]) is bare
    one = _losses(_record(FULL, {2: (0.5, 0.3, [])}), {2: 9.0})
    assert cut_at_divergence(one, [2, 4]) is one


def test_a_seed_that_lacks_a_point_is_passed_over_in_the_mean_whichever_seed_it_is():
    with_point = {"steps": {"2": {"unseen": 0.2}, "4": {"unseen": 0.6}}}
    without = {"steps": {"2": {"unseen": 0.4}}}
    for seeds in ([without, with_point, with_point], [with_point, without, with_point]):
        out = combine(seeds)
        assert out["steps"]["4"]["unseen"] == pytest.approx(0.6) and out["steps"]["4"]["unseen_sd"] == 0.0
        assert out["steps"]["2"]["unseen"] == pytest.approx(0.8 / 3)
