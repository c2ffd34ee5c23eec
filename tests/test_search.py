"""`lensunlearn search`: a grid of tiny unlearning runs measured from their own files, a rerun that
trains nothing, an interrupted run continued, refusals before training, the ranking rule on hand-made
records, and the robustness protocol as the measure."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lensunlearn.cli import console
from lensunlearn.core.config import ConfigError
from lensunlearn.search import run as search
from lensunlearn.unlearning import run as unlearn_module

from .conftest import record_calls, run_command, unlearn_argv, write_jsonl, write_unlearn_inputs

CAPITALS = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))
SYMBOLS = ("gold", "iron", "oxygen", "element")


@pytest.fixture
def tmp(tmp_path) -> Path:
    """The tiny unlearning inputs, a forget task and corpus carrying fact ids, a kept task, generic text."""
    tmp = write_unlearn_inputs(tmp_path)
    answers = [a for _, a in CAPITALS]
    write_jsonl(tmp / "capitals.jsonl", [
        {"fact_id": f"cap:{s}", "question": f"what is the capital of {s} ?", "prompt": f"the capital of {s} is",
         "choices": answers, "answer": answers.index(a)} for s, a in CAPITALS])
    write_jsonl(tmp / "capitals_corpus.jsonl", [
        {"fact_id": f"cap:{s}", "text": t.format(s=s, a=a)} for s, a in CAPITALS
        for t in ("the capital of {s} is {a} .", "{a} is the capital of {s} .")])
    write_jsonl(tmp / "symbols.jsonl", [
        {"question": f"the symbol of {w} ?", "prompt": f"the symbol of {w} is", "choices": list(SYMBOLS), "answer": k}
        for k, w in enumerate(SYMBOLS)])
    (tmp / "generic.txt").write_text("it was a question of gold and iron .\nthe answer is in the question .\n")
    (tmp / "benign.txt").write_text("\n".join(f"it was {i} and {i + 1} on the element ." for i in range(6)) + "\n")
    return tmp


def fixed(tmp: Path, *extra: str) -> str:
    """The shared tiny `unlearn` line as the search's --unlearn string: its --out left to the search."""
    argv = unlearn_argv(tmp, "--eval_tasks", f"{tmp / 'capitals.jsonl'},{tmp / 'symbols.jsonl'}",
                        "--eval_format", "cloze", "--checkpoint_every", "1", *extra)[1:]
    at = argv.index("--out")
    return shlex.join(argv[:at] + argv[at + 2:])


def search_argv(tmp: Path, *grid: str, extra: tuple[str, ...] = (), unlearn: str | None = None) -> list[str]:
    argv = ["search", "--unlearn", fixed(tmp) if unlearn is None else unlearn, "--out", str(tmp / "search"),
            "--generic", str(tmp / "generic.txt"), *extra]
    for entry in grid:
        argv += ["--grid", entry]
    return argv


def main(argv: list[str]):
    return run_command(argv)


@pytest.fixture
def trained(monkeypatch) -> list:
    """The unlearn configs the search trained, in order (the runs themselves really train)."""
    return record_calls(monkeypatch, search, "unlearn")


def _acc(path: Path, task: str) -> float:
    return json.loads(path.read_text())["results"][task]["acc"]


def test_a_grid_trains_each_point_once_and_reads_its_evaluations(tmp, trained):
    summary = main(search_argv(tmp, "lr=1e-3,1e-2", "forget_coef=5"))
    runs = tmp / "search" / "runs"
    names = {"lr1e-3_forget_coef5", "lr1e-2_forget_coef5"}
    assert {p.name for p in runs.iterdir()} == names and len(trained) == 2
    for name, lr in (("lr1e-3_forget_coef5", 1e-3), ("lr1e-2_forget_coef5", 1e-2)):
        saved = json.loads((runs / name / "run_config.json").read_text())
        assert saved["lr"] == lr and saved["forget_coef"] == 5.0 and saved["examples"] == 8  # grid and fixed
    # the runs evaluated no base model (--eval_base is off): the search evaluated it once for both
    base_evals = list((tmp / "search" / "base").glob("eval_*.json"))
    assert len(base_evals) == 1
    saved = json.loads((tmp / "search" / "search.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["grid"] == {"lr": [1e-3, 1e-2], "forget_coef": [5.0]}
    assert {p["name"] for p in saved["points"]} == names and [p["rank"] for p in saved["points"]] == [1, 2]
    for point in saved["points"]:
        run, metrics = Path(point["run_dir"]), point["metrics"]
        assert metrics["forget"]["task"] == "capitals" and set(metrics["kept"]) == {"symbols"}
        assert metrics["forget"]["acc"] == _acc(run / "eval.json", "capitals")
        assert metrics["forget"]["base"] == _acc(base_evals[0], "capitals")
        kept = metrics["kept"]["symbols"]
        assert kept["acc"] == _acc(run / "eval.json", "symbols") and kept["base"] == _acc(base_evals[0], "symbols")
        ppl = metrics["perplexity"]
        assert ppl["base"] > 1 and ppl["ratio"] == pytest.approx(ppl["unlearned"] / ppl["base"])
        assert set(point["targets"]) == {"forget", "kept", "perplexity", "envelope", "floor"}
        assert point["targets"]["envelope"] is None and point["seconds"]["unlearn"] > 0
    forget = sorted(saved["points"], key=lambda p: (p["ability"] != "kept", p["metrics"]["forget"]["acc"]))
    assert [p["name"] for p in saved["points"]] == [p["name"] for p in forget]  # same ability: lowest forget first
    table = (tmp / "search" / "search.md").read_text()
    assert all(f"| {lr} | 5.0 |" in table for lr in ("0.001", "0.01")) and "Order:" in table

    # the same command again trains nothing; a value added to the grid trains that point alone
    def written() -> dict[str, int]:  # each run's summary and each point's measured record
        files = [runs / n / "summary.json" for n in names] + list((tmp / "search" / "points").iterdir())
        return {str(f): f.stat().st_mtime_ns for f in files}

    before = written()
    trained.clear()
    again = main(search_argv(tmp, "lr=1e-3,1e-2", "forget_coef=5"))
    assert trained == [] and written() == before  # neither trained nor measured again
    assert [p["metrics"] for p in again["points"]] == [p["metrics"] for p in saved["points"]]
    main(search_argv(tmp, "lr=1e-3,1e-2,3e-2", "forget_coef=5"))
    assert [cfg.run_name for cfg in trained] == ["lr3e-2_forget_coef5"]


class Killed(Exception):
    """Stands for a kill after the last checkpoint (every file is written atomically)."""


def test_an_interrupted_point_continues_from_its_checkpoint(tmp, trained, monkeypatch):
    finish = unlearn_module._finish

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(unlearn_module, "_finish", killed)
    with pytest.raises(Killed):
        main(search_argv(tmp, "lr=1e-3"))
    run = tmp / "search" / "runs" / "lr1e-3"
    assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()
    pending = json.loads((tmp / "search" / "search.json").read_text())
    assert [p["status"] for p in pending["points"]] == ["pending"]
    monkeypatch.setattr(unlearn_module, "_finish", finish)
    summary = main(search_argv(tmp, "lr=1e-3"))
    assert [cfg.resume for cfg in trained] == [False, True]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and summary["points"][0]["status"] == "finished"


def test_a_finished_run_of_other_settings_is_refused_before_training_and_overwrite_starts_over(tmp, trained):
    main(search_argv(tmp, "lr=1e-3"))
    trained.clear()
    other = search_argv(tmp, "lr=1e-3", unlearn=fixed(tmp, "--epochs", "2"))
    with pytest.raises(ConfigError, match="trained with other settings .*--epochs 1.0 -> 2.0"):
        main(other)
    assert trained == []
    summary = main([*other, "--overwrite"])
    assert [cfg.resume for cfg in trained] == [False] and summary["points"][0]["status"] == "finished"
    run = tmp / "search" / "runs" / "lr1e-3"
    assert json.loads((run / "run_config.json").read_text())["epochs"] == 2.0
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".search")) == []  # swapped in, nothing left


@pytest.mark.parametrize("grid, extra, message", [
    ((), (), "--grid is empty"),
    (("lrr=1e-3",), (), "--grid lrr: not an option of lensunlearn unlearn (did you mean lr"),
    (("lr=fast",), (), "--grid lr=fast: lr takes a number, got 'fast'"),
    (("examples=8.5",), (), "examples takes an integer"),
    (("full=maybe",), (), "full takes true or false"),
    (("retain_loss=l3",), (), "retain_loss takes one of l2, kl"),
    (("lr=1e-3,1e-3",), (), "distinct"),
    (("lr",), (), "write KEY=V1,V2"),
    (("out=a,b",), (), "the search sets --out"),
    (("lr=-1e-3",), (), "grid point lr=-1e-3: --lr must be a finite number > 0"),
    (("lr=1e-3",), ("--unlearn", "--out elsewhere"), "--unlearn: the search sets --out"),
    (("lr=1e-3",), ("--unlearn", "--forgett x"), "did you mean --forget"),
    (("lr=1e-3",), ("--unlearn", "--lr 1e-2"), "--grid lr and --unlearn --lr both set lr"),
    (("lr=1e-3",), ("--unlearn", "--eval_tasks ''"), "--eval_tasks is empty"),
    (("lr=1e-3",), ("--forget_task", "other"), "--forget_task other is not one of --eval_tasks"),
    (("lr=1e-3",), ("--robustness", "--seeds 0"), "--measure robustness only"),
    (("lr=1e-3",), ("--measure", "robustness", "--robustness", "--holdout 2"), "--holdout must be in"),
    (("lr=1e-3",), ("--measure", "robustness", "--robustness", "--seeds 0 --summarise_only"),
     "--robustness: --summarise_only rewrites a finished output"),
    (("lr=1e-3",), ("--preset", "huge"), "not an unlearn preset"),
])
def test_bad_grids_and_settings_are_one_line_errors_before_training(tmp, trained, capsys, grid, extra, message):
    argv = search_argv(tmp, *grid)
    if "--unlearn" in extra:  # replaces the fixed settings: the tiny ones plus the flag under test
        argv[argv.index("--unlearn") + 1] = fixed(tmp) + " " + extra[1]
        extra = extra[2:]
    assert console([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert trained == [] and not (tmp / "search").exists()


def test_bad_robustness_inputs_are_refused_before_training(tmp, trained):
    """The protocol splits the forget task's facts: a corpus without fact ids is refused before any run."""
    argv = search_argv(tmp, "lr=1e-3", extra=("--measure", "robustness"))
    with pytest.raises(ValueError, match="fact_id"):
        main(argv)
    assert trained == [] and not (tmp / "search").exists()


# --- judging and ranking, on hand-made records ------------------------------------------------------


def _record(name: str, forget_coef: float, forget: float, kept: float, ppl: float, envelope: float | None = None,
            status: str = "finished") -> dict:
    metrics = {"forget": {"task": "capitals", "acc": forget, "base": 0.9, "ratio": forget / 0.9},
               "kept": {"symbols": {"acc": kept, "base": 0.8, "ratio": kept / 0.8}},
               "perplexity": {"text": "generic:heldout", "base": 10.0, "unlearned": 10 * ppl, "ratio": ppl}}
    if envelope is not None:
        metrics["robustness"] = {"envelope": envelope, "unlearned_unseen": 0.25, "floor": 0.3, "steps": 64}
    record = {"name": name, "settings": {"forget_coef": forget_coef}, "run_dir": f"runs/{name}", "status": status,
              "seconds": {"unlearn": 10.0}}
    return {**record, "metrics": metrics} if status == "finished" else record


def _config(measure: str = "eval") -> search.SearchConfig:
    return search.SearchConfig(grid=("forget_coef=5,20,80,400",), measure=measure,
                               unlearn="--eval_tasks capitals.jsonl,symbols.jsonl")


def test_a_point_that_forgets_by_breaking_the_model_is_never_best():
    cfg = _config()
    broken = _record("forget_coef400", 400, forget=0.05, kept=0.40, ppl=1.5)  # forgets best: kept 50 %, ppl 1.5x
    noisy = _record("forget_coef80", 80, forget=0.10, kept=0.79, ppl=1.3)  # kept domain fine, perplexity not
    good = _record("forget_coef20", 20, forget=0.30, kept=0.78, ppl=1.05)  # 97.5 % of base, 1.05x
    weak = _record("forget_coef5", 5, forget=0.60, kept=0.80, ppl=1.01)
    summary = search.summarise(cfg, [broken, noisy, good, weak, _record("x", 1, 0, 0, 0, status="diverged")], 1.0)
    assert [p["name"] for p in summary["points"]] == ["forget_coef20", "forget_coef5", "forget_coef400",
                                                      "forget_coef80", "x"]
    assert summary["best"] == "forget_coef20"
    by_name = {p["name"]: p for p in summary["points"]}
    assert by_name["forget_coef400"]["targets"] == {"forget": True, "kept": False, "perplexity": False,
                                                    "envelope": None, "floor": None}
    assert by_name["forget_coef400"]["ability"] == "lost" and by_name["forget_coef80"]["ability"] == "lost"
    assert by_name["forget_coef20"]["measured_targets_met"] is True  # the robustness targets are not measured
    assert by_name["forget_coef20"]["targets"]["envelope"] is None
    assert by_name["forget_coef400"]["measured_targets_met"] is False
    assert by_name["forget_coef5"]["targets"]["forget"] is False
    table = search.markdown_table(summary)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "rank" not in line]
    assert rows[0].startswith("| 1 | 20 |") and "**LOST**" in rows[2] and "✗" in rows[2] and "diverged" in rows[4]
    assert "**Best:** `forget_coef20`" in table
    alone = search.summarise(cfg, [broken, noisy], 1.0)
    assert alone["best"] is None and "No point keeps general ability" in search.markdown_table(alone)


def test_robustness_ranks_by_the_envelope_and_judges_it_against_unlearned_and_floor():
    cfg = _config("robustness")
    relearns = _record("forget_coef80", 80, forget=0.20, kept=0.80, ppl=1.0, envelope=0.70)
    holds = _record("forget_coef20", 20, forget=0.30, kept=0.80, ppl=1.0, envelope=0.35)
    summary = search.summarise(cfg, [relearns, holds], 1.0)
    assert [p["name"] for p in summary["points"]] == ["forget_coef20", "forget_coef80"]
    held = summary["points"][0]["targets"]
    assert held["envelope"] is True and held["floor"] is True  # 0.35 <= 0.25 + 0.10 and <= 0.30 + 0.10
    assert summary["points"][0]["measured_targets_met"] is True
    assert summary["points"][1]["targets"]["envelope"] is False and summary["points"][1]["targets"]["floor"] is False


def test_the_worst_case_is_shown_beside_the_envelope_but_ranks_and_judges_nothing():
    cfg = _config("robustness")
    relearns = _record("forget_coef80", 80, forget=0.20, kept=0.80, ppl=1.0, envelope=0.70)
    holds = _record("forget_coef20", 20, forget=0.30, kept=0.80, ppl=1.0, envelope=0.35)
    holds["metrics"]["robustness"].update(worst_case=0.9, worst_case_source="fictional_attack")
    summary = search.summarise(cfg, [relearns, holds, _record("x", 1, 0, 0, 0, status="diverged")], 1.0)
    assert [p["name"] for p in summary["points"]] == ["forget_coef20", "forget_coef80", "x"]  # still the envelope
    assert summary["points"][0]["targets"]["envelope"] is True
    lines = [line for line in search.markdown_table(summary).splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    at = header.index("worst case unseen %")
    assert header[at - 1] == "unseen envelope %" and all(len(r) == len(header) for r in rows.values())
    assert rows["20"][at] == "90.0 (fictional attack)" and rows["80"][at] == "-"  # recorded before it existed
    plain = search.markdown_table(search.summarise(_config(), [_record("x", 1, 0, 0, 0, status="diverged")], 1.0))
    lines = [line for line in plain.splitlines() if line.startswith("| ")]
    assert lines[0].count("|") == lines[1].count("|")  # an unfinished point's row is as wide as the header


def test_the_worst_case_names_the_benign_attack_and_each_attack_where_seeds_disagree():
    cfg = _config("robustness")
    records = {coef: _record(f"forget_coef{coef}", coef, forget=0.30, kept=0.80, ppl=1.0, envelope=0.35)
               for coef in (5, 20, 80, 400)}
    records[5]["metrics"]["robustness"].update(worst_case=0.514, worst_case_source="benign_attack",
                                               worst_case_sources=["benign_attack"])
    records[20]["metrics"]["robustness"].update(worst_case=0.45, worst_case_source="envelope",
                                                worst_case_sources=["envelope", "benign_attack", "envelope"])
    records[80]["metrics"]["robustness"].update(worst_case=0.35, worst_case_source="envelope",
                                                worst_case_sources=["envelope"])
    # a record written before each seed's source was kept: the one most seeds agreed on
    records[400]["metrics"]["robustness"].update(worst_case=0.6, worst_case_source="benign_attack")
    summary = search.summarise(cfg, list(records.values()), 1.0)
    lines = [line for line in search.markdown_table(summary).splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    at = header.index("worst case unseen %")
    assert rows["5"][at] == "51.4 (benign attack)"
    assert rows["20"][at] == "45.0 (benign attack in 1 of 3 seeds)"
    assert rows["80"][at] == "35.0"  # the envelope's: not named
    assert rows["400"][at] == "60.0 (benign attack)"


def test_an_order_from_fewer_than_three_protocol_seeds_is_called_provisional():
    cfg = _config("robustness")
    records = [_record("forget_coef80", 80, forget=0.20, kept=0.80, ppl=1.0, envelope=0.70),
               _record("forget_coef20", 20, forget=0.30, kept=0.80, ppl=1.0, envelope=0.35)]
    for seeds, record in zip(([0], [0, 1, 2]), records):
        record["metrics"]["robustness"]["seeds"] = seeds
    assert "from 1 protocol seed(s)" in search.markdown_table(search.summarise(cfg, records, 1.0))
    records[0]["metrics"]["robustness"]["seeds"] = [0, 1, 2]
    assert "Provisional" not in search.markdown_table(search.summarise(cfg, records, 1.0))


# --- the robustness protocol as the measure, on a tiny run ------------------------------------------


def test_robustness_measure_runs_the_protocol_on_each_run(tmp, trained):
    protocol = ("--kinds lora --lrs 1e-2 --steps 2 --batch 4 --lora_rank 4 --fluency_prompts 0 --benign "
                + shlex.quote(str(tmp / "benign.txt")))
    argv = search_argv(tmp, "lr=1e-3", unlearn=fixed(tmp, "--forget", str(tmp / "capitals_corpus.jsonl")),
                       extra=("--measure", "robustness", "--robustness", protocol))
    summary = main(argv)
    out = tmp / "search" / "robustness" / "lr1e-3"
    result = json.loads((out / "robustness.json").read_text())
    assert result["forget_task"] == str(tmp / "capitals.jsonl") and result["generic"] == str(tmp / "generic.txt")
    robust = summary["points"][0]["metrics"]["robustness"]
    assert robust["steps"] == 2 and robust["envelope"] == result["headline"]["unseen"]
    assert robust["unlearned_unseen"] == result["unlearned"]["unseen"] and robust["floor"] == result["floor"]["2"]
    assert robust["recovery_share"] == result["recovery_share"]["2"] and robust["paper_attacks"] == {}
    assert robust["selected"] == result["selected"]["2"]["unseen"]
    assert robust["worst_case"] == result["worst_case"]["2"]["unseen"]
    assert robust["worst_case_source"] == result["worst_case"]["2"]["source"]
    assert robust["worst_case_sources"] == [result["worst_case"]["2"]["source"]]  # one seed
    ppl = summary["points"][0]["metrics"]["perplexity"]
    assert ppl["ratio"] == pytest.approx(result["perplexity"]["unlearned"] / result["perplexity"]["base"])
    assert summary["points"][0]["targets"]["envelope"] is not None
    assert "unseen envelope" in (tmp / "search" / "search.md").read_text()
    assert "| recovery share |" in (tmp / "search" / "search.md").read_text()
    assert "| worst case unseen % |" in (tmp / "search" / "search.md").read_text()
    assert (tmp / "search" / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "(search.png)" in (tmp / "search" / "search.md").read_text()
    trained.clear()
    main(argv)  # read back: neither the run nor the protocol again
    assert trained == [] and json.loads((out / "robustness.json").read_text()) == result
    other = argv[:]
    other[other.index(protocol)] = protocol.replace("--steps 2", "--steps 3")
    with pytest.raises(ConfigError, match="other robustness settings .*--steps 2 -> 3"):
        main(other)


def test_a_config_file_holds_the_grid_and_the_fixed_settings(tmp_path):
    """`--config FILE` works as for every command: a YAML list of grid entries and the --unlearn string; a
    repeated --grid on the line replaces the file's grid."""
    from lensunlearn.cli import all_commands, build_parser
    from lensunlearn.core.config import config_from_args

    path = tmp_path / "search.yaml"
    path.write_text("grid: ['lr=1e-3,1e-2', 'layers=1,3;2,3']\nunlearn: --examples 8 --eval_tasks a.jsonl,b.jsonl\n"
                    "preset: small\n")

    def plan(*argv: str) -> list:
        args = build_parser(all_commands()).parse_args(["search", "--config", str(path), *argv])
        return config_from_args(search.SearchConfig, args).plan.points

    points = plan()
    assert [p.name for p in points] == ["lr1e-3_layers1-3", "lr1e-3_layers2-3", "lr1e-2_layers1-3",
                                        "lr1e-2_layers2-3"]
    assert points[1].config.layers == (2, 3) and points[2].config.lr == 1e-2 and points[0].config.examples == 8
    assert points[0].config.forget_coef == 20.0  # the small preset's, under the fixed settings
    assert [p.name for p in plan("--grid", "forget_coef=10")] == ["forget_coef10"]


# --- nothing late, nothing lost ---------------------------------------------------------------------------


def test_values_equal_as_numbers_are_one_point_and_refused(tmp, trained, capsys):
    """Before: `--grid lr=1e-3,0.001` trained the same point twice, under two names."""
    assert console(search_argv(tmp, "lr=1e-3,0.001")) == 2
    err = capsys.readouterr().err.strip()
    assert "--grid lr=1e-3,0.001: 1e-3 and 0.001 are the same value (0.001), one grid point" in err
    assert len(err.splitlines()) == 1 and trained == [] and not (tmp / "search").exists()


def test_every_grid_point_is_checked_against_the_model_before_the_first_trains(tmp, trained, capsys):
    """Before: `--grid "layers=2;99"` trained the first point and failed when the second began."""
    unlearn = fixed(tmp).replace("--layers 1,3 ", "")
    for grid, status, message in (
            ("layers=2;99", 1, "grid point layers=99: target layer [99] out of range: this model has 4 layers"),
            ("cir_act_components=8,64", 2, "grid point cir_act_components=64: --cir_act_components 64 is more than "
                                           "the 32 dimensions")):
        argv = search_argv(tmp, grid, unlearn=unlearn + (" --full --cir --optimizer muon --weight_decay 0 --layers 3 "
                                                         "--cir_grad_components 8"
                                                         if grid.startswith("cir") else ""))
        assert console(argv) == status
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert trained == [] and not (tmp / "search").exists()


def test_an_interrupted_overwrite_is_continued_only_by_overwrite(tmp, trained, monkeypatch, capsys):
    """Before: after an interrupted `search --out S --overwrite`, an older `search --out S` without the flag
    continued the replacement, deleted the finished search and left a half-trained run. Ctrl-C gave no hint."""
    main(search_argv(tmp, "lr=1e-3"))
    final = tmp / "search"
    finished = {str(p.relative_to(final)): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    replacing = search_argv(tmp, "lr=1e-3", unlearn=fixed(tmp, "--epochs", "2"), extra=("--overwrite",))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "measure", interrupted)  # Ctrl-C once the point's run is trained
    assert console(replacing) == 130
    assert capsys.readouterr().err.strip().endswith(
        "lensunlearn search: interrupted: rerun the same command to continue; finished points are kept")
    monkeypatch.undo()
    staging = tmp / ".search.incoming"
    assert (staging / "runs" / "lr1e-3" / "summary.json").is_file()
    trained.clear()
    monkeypatch.setattr(search, "unlearn", lambda cfg: trained.append(cfg) or unlearn_module.unlearn(cfg))
    older = search_argv(tmp, "lr=1e-3", unlearn=fixed(tmp, "--epochs", "2"))  # the same, without --overwrite
    assert console(older) == 1
    err = capsys.readouterr().err.strip()
    assert "holds an interrupted replacement of" in err and "rerun with --overwrite to continue it" in err
    assert {str(p.relative_to(final)): p.read_bytes() for p in final.rglob("*") if p.is_file()} == finished
    summary = main(replacing)  # the same command continues the replacement: its trained run is kept
    assert trained == [] and summary["points"][0]["status"] == "finished"
    assert json.loads((final / "runs" / "lr1e-3" / "run_config.json").read_text())["epochs"] == 2.0
    assert not staging.exists() and not (tmp / ".search.old").exists()


def test_the_search_plot_draws_each_finished_point_hollow_where_it_lost_general_ability(tmp_path, monkeypatch):
    from lensunlearn.report import plots

    figures = []
    save = plots.save_figure

    def keep(fig, path):
        figures.append([(ax.collections, [t.get_text() for t in ax.get_xticklabels()]) for ax in fig.axes])
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    holds = _record("forget_coef20", 20, forget=0.30, kept=0.78, ppl=1.0, envelope=0.35)
    broken = _record("forget_coef400", 400, forget=0.05, kept=0.40, ppl=1.5, envelope=0.30)
    summary = search.summarise(_config("robustness"), [holds, broken, _record("x", 1, 0, 0, 0, status="diverged")],
                               1.0)
    path = plots.plot_search(summary, tmp_path / "search.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (left, _), (right, names) = figures[0]
    # left: one marker per finished point at (forget %, worst kept share %); the broken one hollow
    offsets = [tuple(c.get_offsets()[0]) for c in left]
    assert offsets == [pytest.approx((30.0, 97.5)), pytest.approx((5.0, 50.0))]
    assert left[0].get_facecolors()[0][3] == 1.0 and len(left[1].get_facecolors()) == 0
    # right: per point the unlearned unseen half, the envelope and the floor, at the point's x
    drawn = sorted((round(float(c.get_offsets()[0][0])), round(float(c.get_offsets()[0][1]), 1)) for c in right)
    assert drawn == [(0, 25.0), (0, 30.0), (0, 35.0), (1, 25.0), (1, 30.0), (1, 30.0)]
    assert names == ["1. forget_coef20", "2. forget_coef400"]  # unfinished points are left out
    # a plain evaluation search draws the left panel alone, and a search with nothing finished still draws
    plots.plot_search(search.summarise(_config(), [holds], 1.0), tmp_path / "eval.png")
    assert len(figures[1]) == 1
    plots.plot_search(search.summarise(_config(), [_record("x", 1, 0, 0, 0, status="pending")], 1.0),
                      tmp_path / "none.png")
    assert (tmp_path / "none.png").is_file()
