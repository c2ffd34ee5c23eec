"""The robustness protocol: grids, split, fictional facts, envelope and seed averaging on hand-made
records; the whole protocol on tiny models (shape of robustness.json, controls, resume); bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lensunlearn.attack import protocol as robustness
from lensunlearn.attack.grid import (
    DEFAULT_SETTINGS,
    Setting,
    combine,
    envelope,
    fictional_facts,
    grid_settings,
    split_ids,
    strongest,
    summarise_seed,
)
from lensunlearn.core.config import ConfigError

from ..conftest import run_command, save_tiny_model, write_jsonl

CAPITALS = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))
PHRASINGS = ("the capital of {s} is {a} .", "{a} is the capital of {s} .", "{s} , capital : {a} .")
FULL, LORA = Setting("full", 1e-2, "constant"), Setting("lora", 1e-2, "constant")


def main(argv: list[str]):
    return run_command(argv)


_jsonl = write_jsonl


# --- pure parts ---------------------------------------------------------------------------------


def _record(setting: Setting, points: dict[int, tuple[float, float]], **extra) -> dict:
    return {"setting": setting.as_dict(), "steps": {str(n): {"attacked": a, "unseen": u} for n, (a, u) in
                                                    points.items()}, **extra}


def test_envelope_takes_the_best_unseen_accuracy_per_step_count():
    a = _record(Setting("full", 1e-5, "constant"), {8: (0.5, 0.10), 32: (0.9, 0.30)})
    b = _record(Setting("full", 1e-3, "constant"), {8: (0.4, 0.20), 32: (1.0, 0.30)})
    c = _record(Setting("lora", 1e-3, "constant"), {8: (0.9, 0.05)})  # diverged before 32
    env = envelope([a, b, c], [8, 32])
    assert env["8"] == {"unseen": 0.20, "attacked": 0.4, "setting": b["setting"]}
    assert env["32"] == {"unseen": 0.30, "attacked": 0.9, "setting": a["setting"]}  # a tie: the first in grid order
    assert strongest([a, b, c], [8, 32]) is a
    assert envelope([a, b, c], [8], key="attacked")["8"]["setting"] == c["setting"]


def test_grids():
    assert grid_settings("default") == list(DEFAULT_SETTINGS)
    full = grid_settings("full")
    assert len(full) == 16 and {s.kind for s in full} == {"full", "lora"} and {s.schedule for s in full} == {
        "constant", "cosine"} and min(s.lr for s in full) == 1e-6 and max(s.lr for s in full) == 1e-3
    assert grid_settings("default", kinds=["lora"], lrs=[1e-2, 1e-3]) == [Setting("lora", 1e-2, "constant"),
                                                                           Setting("lora", 1e-3, "constant")]
    with pytest.raises(ValueError, match="kind"):
        grid_settings("default", kinds=["qlora"])
    with pytest.raises(ValueError, match="schedule"):
        grid_settings("default", schedules=["step"])


def test_split_is_disjoint_complete_and_fixed_by_the_seed():
    ids = [f"fact:{k:02d}" for k in range(21)]
    attacked, unseen = split_ids(ids, 0.5, seed=3)
    assert not set(attacked) & set(unseen) and set(attacked) | set(unseen) == set(ids)
    assert len(unseen) == 10 and len(attacked) == 11
    assert split_ids(list(reversed(ids)) + ids[:3], 0.5, seed=3) == (attacked, unseen)  # order and repeats
    assert split_ids(ids, 0.5, seed=4) != (attacked, unseen)
    with pytest.raises(ValueError, match="both halves"):
        split_ids(ids[:4], 0.1, seed=0)


def test_fictional_facts_are_made_up_deterministic_and_well_formed():
    answers, pool = ["paris", "rome"], ["paris", "rome", "berlin", "madrid", "oslo"]
    questions, corpus = fictional_facts(12, answers, pool, seed=1)
    assert (questions, corpus) == fictional_facts(12, answers, pool, seed=1)
    assert questions != fictional_facts(12, answers, pool, seed=2)[0]
    subjects = {q["prompt"] for q in questions}
    assert len(questions) == 12 and len(subjects) == 12
    for q in questions:
        assert q["choices"][q["answer"]] in answers and len(set(q["choices"])) == 4
        texts = [r["text"] for r in corpus if r["fact_id"] == q["fact_id"]]
        assert texts and all(q["choices"][q["answer"]] in t for t in texts)


def test_controls_are_wired_into_the_seed_summary():
    start = {"unlearned": {"forget_attacked": 0.1, "forget_unseen": 0.2, "fictional_attacked": 0.25,
                           "fictional_unseen": 0.3},
             "base": {"forget_attacked": 0.9, "forget_unseen": 0.8, "fictional_attacked": 0.2,
                      "fictional_unseen": 0.25}}
    low = _record(FULL, {2: (0.5, 0.3), 4: (0.8, 0.4)}, kept={"k": 0.7}, perplexity=11.0)
    high = _record(LORA, {2: (0.6, 0.35), 4: (0.9, 0.6)}, kept={"k": 0.6}, perplexity=12.0)
    attacks = {"grid": [low, high],
               "base": [_record(LORA, {2: (0.95, 0.85), 4: (1.0, 0.9)})],
               "benign": [_record(LORA, {2: (0.1, 0.2), 4: (0.15, 0.25)}, perplexity=10.0)],
               "fictional": [_record(LORA, {2: (0.5, 0.3), 4: (0.9, 0.35)})]}
    s = summarise_seed(start, attacks, [2, 4])
    assert s["unlearned"] == {"attacked": 0.1, "unseen": 0.2} and s["base"] == {"attacked": 0.9, "unseen": 0.8}
    assert s["headline"] == {"steps": 4, "unseen": 0.6, "attacked": 0.9, "setting": LORA.as_dict()}
    assert s["floor"] == {"0": 0.3, "2": 0.3, "4": 0.35}
    assert s["benign"]["unseen"] == 0.25 and s["benign"]["steps"]["2"]["unseen"] == 0.2
    assert s["base_model_envelope"]["4"]["unseen"] == 0.9
    assert s["kept"] == {"k": {"after_best_attack": 0.6}}  # the best attack's, not the first's
    assert s["perplexity"] == {"after_best_attack": 12.0, "benign": 10.0,
                               "attacks": {FULL.label: 11.0, LORA.label: 12.0}}


def test_seeds_are_averaged_with_their_spread():
    one = {"unseen": 0.2, "setting": FULL.as_dict(), "steps": 4, "inner": {"acc": 0.5}}
    two = {"unseen": 0.4, "setting": LORA.as_dict(), "steps": 4, "inner": {"acc": 0.7}}
    out = combine([one, two, dict(one)])
    assert out["unseen"] == pytest.approx(0.8 / 3) and out["unseen_sd"] == pytest.approx(0.11547, abs=1e-4)
    assert out["setting"] == FULL.as_dict() and out["settings"] == [FULL.as_dict(), LORA.as_dict(), FULL.as_dict()]
    assert out["steps"] == 4 and out["inner"]["acc"] == pytest.approx(1.7 / 3)
    assert combine([one]) == one  # one seed: no spreads


# --- the protocol on tiny models ------------------------------------------------------------------


@pytest.fixture
def run_files(tmp_path) -> dict[str, Path]:
    """An unlearning run (tiny Llama in merged/, a run_config naming its base model), a forget corpus and
    task with fact_id, a kept task, generic text and benign text."""
    base = save_tiny_model(tmp_path / "base", seed=1)
    run = tmp_path / "run"
    save_tiny_model(run / "merged", seed=2)
    answers = [a for _, a in CAPITALS]
    corpus = _jsonl(tmp_path / "capitals_corpus.jsonl", [{"fact_id": f"cap:{s}", "text": p.format(s=s, a=a)}
                                                         for s, a in CAPITALS for p in PHRASINGS])
    task = _jsonl(tmp_path / "capitals.jsonl", [
        {"fact_id": f"cap:{s}", "question": f"what is the capital of {s} ?", "prompt": f"the capital of {s} is",
         "choices": answers, "answer": answers.index(a)} for s, a in CAPITALS])
    symbols = ["gold", "iron", "oxygen", "element"]
    kept = _jsonl(tmp_path / "symbols.jsonl", [
        {"question": f"the symbol of {w} ?", "prompt": f"the symbol of {w} is", "choices": symbols, "answer": k}
        for k, w in enumerate(symbols)])
    generic = tmp_path / "generic.txt"
    generic.write_text("it was a question of gold and iron .\nthe answer is in the question .\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("\n".join(f"it was {i} and {i + 1} on the element ." for i in range(6)) + "\n")
    (run / "run_config.json").write_text(json.dumps({"model": str(base), "forget": str(corpus),
                                                     "eval_tasks": [str(task), str(kept)], "eval_format": "cloze"}))
    return {"base": base, "run": run, "corpus": corpus, "task": task, "kept": kept, "generic": generic,
            "benign": benign, "tmp": tmp_path}


def _argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["robustness", str(files["run"]), "--generic", str(files["generic"]), "--benign", str(files["benign"]),
            "--kinds", "full,lora", "--lrs", "1e-2", "--steps", "2,3", "--batch", "4", "--lora_rank", "4",
            "--max_new_tokens", "3", "--fluency_prompts", "1", "--seeds", "0", "--out", str(out), *extra]


def test_the_documented_interface_with_explicit_files(run_files):
    """`robustness RUN --forget C --forget_task T --kept_tasks K --generic G --seeds 0 --out D` on a run whose
    run_config.json names only its base model: every input comes from the flags."""
    (run_files["run"] / "run_config.json").write_text(json.dumps({"model": str(run_files["base"])}))
    out = run_files["tmp"] / "explicit"
    main(["robustness", str(run_files["run"]), "--forget", str(run_files["corpus"]),
          "--forget_task", str(run_files["task"]), "--kept_tasks", str(run_files["kept"]),
          "--generic", str(run_files["generic"]), "--benign", str(run_files["benign"]), "--kinds", "lora",
          "--lrs", "1e-2", "--steps", "2", "--batch", "4", "--lora_rank", "4", "--max_new_tokens", "2",
          "--fluency_prompts", "1", "--seeds", "0", "--out", str(out)])
    saved = json.loads((out / "robustness.json").read_text())
    for key in ("unlearned", "envelope", "floor", "benign", "base_model_envelope", "kept", "perplexity"):
        assert key in saved
    assert set(saved["kept"]) == {"symbols"} and set(saved["envelope"]) == {"2"}
    assert 0 <= saved["envelope"]["2"]["unseen"] <= 1 and saved["perplexity"]["base"] > 1


def test_protocol_on_a_tiny_run(run_files):
    """The documented interface: defaults from the run directory, the documented JSON shape, one file per attack."""
    out = run_files["tmp"] / "robust"
    result = main(_argv(run_files, out))
    saved = json.loads((out / "robustness.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["unlearned"]) == {"attacked", "unseen"} and saved["split"] == {"holdout": 0.5, "attacked": 2,
                                                                                     "unseen": 2, "guessable": 0}
    assert set(saved["envelope"]) == {"2", "3"} and set(saved["envelope"]["3"]) == {"unseen", "attacked", "setting"}
    grid = {Setting(**s).label for s in saved["settings"]}
    assert grid == {FULL.label, LORA.label} and saved["grid"] == "custom"
    best = saved["headline"]["setting"]
    assert saved["headline"]["unseen"] == max(a["steps"]["3"]["unseen"] for a in saved["attacks"].values())
    assert set(saved["floor"]) == {"0", "2", "3"} and 0 <= saved["floor"]["3"] <= 1
    assert set(saved["benign"]) >= {"unseen", "attacked"} and set(saved["base_model_envelope"]["3"]) >= {"unseen"}
    assert set(saved["kept"]) == {"symbols"} and set(saved["kept"]["symbols"]) == {"base", "unlearned",
                                                                                  "after_best_attack"}
    assert saved["kept"]["symbols"]["after_best_attack"] == saved["attacks"][Setting(**best).label]["kept"]["symbols"]
    assert saved["perplexity"]["base"] > 1 and saved["perplexity"]["unlearned"] > 1
    assert set(saved["perplexity"]["attacks"]) == grid
    # controls: one attack each with the strongest setting; the base model attacked from its own weights
    attacks = out / "seeds" / "seed0" / "attacks"
    names = sorted(p.name for p in attacks.iterdir())
    assert names == sorted([f"grid_{FULL.label}.json", f"grid_{LORA.label}.json"]
                           + [f"{role}_{Setting(**best).label}.json" for role in ("base", "benign", "fictional")])
    base_attack = json.loads((attacks / f"base_{Setting(**best).label}.json").read_text())
    grid_attack = json.loads((attacks / f"grid_{Setting(**best).label}.json").read_text())
    assert base_attack["chunks"] == grid_attack["chunks"] == 6  # 2 attacked facts x 3 phrasings
    assert json.loads((attacks / f"benign_{Setting(**best).label}.json").read_text())["chunks"] == 6  # benign lines
    split = json.loads((out / "seeds" / "seed0" / "split.json").read_text())
    unseen_tasks = [json.loads(line)["fact_id"] for line in
                    (out / "seeds" / "seed0" / "tasks" / "forget_unseen.jsonl").read_text().splitlines()]
    assert sorted(unseen_tasks) == split["unseen"] and not set(split["unseen"]) & set(split["attacked"])
    fluency = saved["fluency"]["groups"]
    assert set(fluency) == {"forget (attacked half)", "forget (unseen half)", "kept"}
    assert set(fluency["kept"]["models"]) == {"base", "unlearned", "best attack"}
    # the other phrasing (cloze format: the questions asked as Q/A) on both halves, before and after
    qa_unseen = [json.loads(line) for line in
                 (out / "seeds" / "seed0" / "tasks" / "phrasing_qa_unseen.jsonl").read_text().splitlines()]
    assert sorted(r["fact_id"] for r in qa_unseen) == sorted(split["unseen"])
    assert all(r["prompt"] == f"Q: {r['question']}\nA:" for r in qa_unseen)
    qa = saved["phrasings"]["qa"]
    assert set(qa) == {"base", "unlearned", "after_best_attack", "envelope"}
    assert qa["after_best_attack"] == grid_attack["phrasings"]["qa"]
    ends = [json.loads((attacks / f"grid_{s.label}.json").read_text())["phrasings"]["qa"]["unseen"]
            for s in (FULL, LORA)]
    assert qa["envelope"]["unseen"] == max(ends) and 0 <= qa["unlearned"]["attacked"] <= 1
    table = (out / "robustness.md").read_text()
    assert "Headline" in table and "fictional facts (floor), 3 steps" in table and "| symbols |" in table
    assert "| qa |" in table and "| the task's own |" in table
    _assert_phrasing_is_plotted(saved, out / "again.png")
    assert (out / "robustness.png").stat().st_size > 0


def _assert_phrasing_is_plotted(result: dict, path: Path) -> None:
    """robustness.png draws each other phrasing from the unlearned model (step 0) to its envelope at the
    last step."""
    from lensunlearn.report import plots

    drawn = []
    real = plots.save_figure
    try:
        plots.save_figure = lambda fig, p: drawn.append(fig) or real(fig, p)
        plots.plot_robustness(result, path)
    finally:
        plots.save_figure = real
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    qa = lines["asked as qa: unlearned, then best attack"]
    row = result["phrasings"]["qa"]
    assert list(qa.get_xdata()) == [0, 3]
    assert list(qa.get_ydata()) == pytest.approx([100 * row["unlearned"]["unseen"], 100 * row["envelope"]["unseen"]])


class Killed(Exception):
    """Stands for SIGKILL: every file is written atomically, so a kill leaves what an exception leaves."""


def test_a_killed_protocol_resumes_without_redoing_finished_attacks(run_files, monkeypatch):
    out = run_files["tmp"] / "robust"
    calls: list[str] = []
    kill_at = [3]
    real = robustness.train

    def counting(protocol, setting, chunks, seed, role, prompts):
        calls.append(f"{role}_{setting.label}")
        if len(calls) == kill_at[0]:
            raise Killed  # killed during the third attack
        return real(protocol, setting, chunks, seed, role, prompts)

    monkeypatch.setattr(robustness, "train", counting)
    with pytest.raises(Killed):
        main(_argv(run_files, out))
    done = sorted(p.name for p in (out / "seeds" / "seed0" / "attacks").iterdir())
    assert len(done) == 2 and not (out / "robustness.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        main(_argv(run_files, out))
    with pytest.raises(ConfigError, match="--batch 4 -> 2"):
        main(_argv(run_files, out, "--resume", "--batch", "2"))
    calls.clear()
    kill_at[0] = 0
    result = main(_argv(run_files, out, "--resume"))
    assert len(calls) == 3 and not {f"{n[:-5]}" for n in done} & set(calls)  # only the unfinished attacks ran
    assert result["headline"]["steps"] == 3 and (out / "robustness.json").is_file()


def test_several_seeds_report_means_and_spreads(run_files):
    out = run_files["tmp"] / "robust"
    result = main(_argv(run_files, out, "--seeds", "0,1", "--kinds", "full", "--fluency_prompts", "0"))
    assert set(result["per_seed"]) == {"0", "1"} and "unseen_sd" in result["unlearned"]
    means = [result["per_seed"][s]["headline"]["unseen"] for s in ("0", "1")]
    assert result["headline"]["unseen"] == pytest.approx(sum(means) / 2)
    assert result["fluency"] is None


def test_a_phrasing_file_is_measured_like_the_task(run_files):
    """A question file whose rows repeat the forget task's own (plus a fact the task does not have) must
    score exactly as the task's halves do, before and after the attack; `qa` is left out when not named."""
    rows = [json.loads(line) for line in run_files["task"].read_text().splitlines()]
    copy = _jsonl(run_files["tmp"] / "same_words.jsonl", [*rows, {**rows[0], "fact_id": "cap:atlantis"}])
    out = run_files["tmp"] / "robust"
    result = main(_argv(run_files, out, "--phrasings", str(copy), "--kinds", "full", "--fluency_prompts", "0"))
    row = result["phrasings"]["same_words"]
    assert set(result["phrasings"]) == {"same_words"}
    for half in ("attacked", "unseen"):
        assert row["base"][half] == result["base"][half] and row["unlearned"][half] == result["unlearned"][half]
        assert row["after_best_attack"][half] == result["headline"][half] == row["envelope"][half]


def test_letter_format_has_no_qa_phrasing_by_default(run_files):
    cfg = robustness.resolve(robustness.RobustnessConfig(run=str(run_files["run"]), eval_format="letter"))
    assert cfg.phrasings == ()
    cfg = robustness.resolve(robustness.RobustnessConfig(run=str(run_files["run"])))
    assert cfg.phrasings == ("qa",) and cfg.eval_format == "cloze"


# --- bad input: one clear error before any attack -----------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the protocol started although the input is bad")

    monkeypatch.setattr(robustness, "Protocol", refuse)


@pytest.mark.parametrize("extra, error, match", [
    (["--kinds", "qlora"], ConfigError, "kind"),
    (["--schedules", "step"], ConfigError, "schedule"),
    (["--lrs", "0"], ConfigError, "--lrs must be"),
    (["--lrs=-1e-3"], ConfigError, "--lrs must be"),
    (["--steps", "0,2"], ConfigError, "--steps must be"),
    (["--holdout", "0.1"], ValueError, "both halves"),
    (["--holdout", "1"], ConfigError, "--holdout"),
    (["--phrasings", "questions"], ConfigError, "--phrasings questions: name qa, auto or a .jsonl"),
    (["--phrasings", "auto,qa"], ConfigError, "auto stands alone"),
    (["--phrasings", "qa", "--eval_format", "letter"], ConfigError, "drop qa or pass --eval_format cloze"),
])
def test_bad_options_are_refused(run_files, no_compute, extra, error, match):
    with pytest.raises(error, match=match):
        main(_argv(run_files, run_files["tmp"] / "robust", *extra))


def test_bad_inputs_are_refused_before_any_attack(run_files, no_compute):
    tmp, out = run_files["tmp"], run_files["tmp"] / "robust"
    empty = tmp / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no unlearned model"):
        main(_argv({**run_files, "run": empty}, out))
    rows = [json.loads(line) for line in run_files["task"].read_text().splitlines()]
    no_ids = _jsonl(tmp / "no_ids.jsonl", [{k: v for k, v in r.items() if k != "fact_id"} for r in rows])
    with pytest.raises(ValueError, match="lack fact_id"):
        main(_argv(run_files, out, "--forget_task", str(no_ids)))
    untagged = _jsonl(tmp / "untagged.jsonl", [{"text": "the capital of france is paris ."}])
    with pytest.raises(ValueError, match="fact_id"):
        main(_argv(run_files, out, "--forget", str(untagged)))
    other = _jsonl(tmp / "other.jsonl", [{"fact_id": "elsewhere", "text": "the capital of france is paris ."}])
    with pytest.raises(ValueError, match="0 chunks"):
        main(_argv(run_files, out, "--forget", str(other)))
    with pytest.raises(ValueError, match="--phrasings .*no_ids.jsonl: 4 of 4 questions lack fact_id"):
        main(_argv(run_files, out, "--phrasings", str(no_ids)))
    strangers = _jsonl(tmp / "strangers.jsonl", [{**rows[0], "fact_id": "cap:atlantis"}])
    with pytest.raises(ValueError, match="none of the forget task's facts"):
        main(_argv(run_files, out, "--phrasings", str(strangers)))
    twin = tmp / "twin"
    twin.mkdir()
    with pytest.raises(ValueError, match="two phrasings are named 'capitals'"):
        main(_argv(run_files, out, "--phrasings", f"{run_files['task']},{_jsonl(twin / 'capitals.jsonl', rows)}"))
    assert not out.exists()
