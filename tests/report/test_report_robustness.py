"""`report` over robustness outputs: one row per run with the file's numbers, seeds' spreads, the
capability verdict, csv/json tables, the comparison plot, and one-line refusals of wrong folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from lensunlearn import cli
from lensunlearn.attack import grid as robustness_grid
from lensunlearn.cli import all_commands, build_parser
from lensunlearn.core.config import config_from_args
from lensunlearn.core.errors import InputError, UserError
from lensunlearn.core.paths import ROBUSTNESS_CURVES_FILE, is_robustness_output, write_marker
from lensunlearn.report.plots import DPI, ROBUSTNESS_SIZE
from lensunlearn.report.robustness_results import (
    ATTACKED,
    UNSEEN,
    capability_failures,
    fmt_worst,
    unseen_curves,
    worst_case_sources,
)

FULL = {"kind": "full", "lr": 1e-4, "schedule": "constant"}
LORA = {"kind": "lora", "lr": 1e-3, "schedule": "constant"}


def main(argv: list[str]):
    """The `lensunlearn report` command line, built from the report command alone."""
    args = build_parser(all_commands()).parse_args(["report", *argv])
    return args._command(config_from_args(args._command.config, args))


def _point(unseen: float, attacked: float, setting: dict | None = None, sd: float | None = None) -> dict:
    point = {"unseen": unseen, "attacked": attacked, **({"setting": setting} if setting else {})}
    return {**point, "unseen_sd": sd, "attacked_sd": sd} if sd is not None else point


def _result(*, unseen: tuple[float, float, float], kept: float, ppl: float, sd: float | None = None,
            grid: str = "default", fluency: dict | None = None) -> dict:
    """A robustness.json as `robustness` writes it, at 8 and 64 steps; `sd` adds seeds' spreads."""
    spread = (lambda key, v: {key: v, f"{key}_sd": sd}) if sd is not None else (lambda key, v: {key: v})
    seeds = [0, 1, 2] if sd is not None else [0]
    return {
        "grid": grid, "settings": [FULL, LORA], "steps": [8, 64], "seeds": seeds, "chance": 0.25,
        "forget_task": "facts:country_capital", "split": {"holdout": 0.5, "attacked": 40, "unseen": 40},
        "unlearned": {**spread("attacked", 0.10), **spread("unseen", unseen[0])},
        "base": {"attacked": 0.9, "unseen": 0.85},
        "envelope": {"8": _point(unseen[1], 0.5, FULL, sd), "64": _point(unseen[2], 0.95, LORA, sd)},
        "headline": {"steps": 64, **_point(unseen[2], 0.95, LORA, sd)},
        "floor": {"0": 0.2, **spread("8", 0.25), **spread("64", 0.3)},
        "benign": {**spread("unseen", 0.15), "attacked": 0.12, "steps": {}},
        "base_model_envelope": {"8": _point(0.9, 0.95, LORA), "64": _point(0.92, 1.0, LORA)},
        "kept": {"element_symbol": {"base": 0.96, "unlearned": kept, **spread("after_best_attack", 0.9)}},
        "perplexity": {"base": 20.0, "unlearned": ppl, "after_best_attack": 21.0, "attacks": {}},
        "fluency": fluency,
    }


def _fluency(forget: float, neighbour: float) -> dict:
    """A fluency record as `robustness` writes it: median continuation perplexities per group and model."""
    def models(unlearned: float) -> dict:
        return {"models": {"base": {"summary": {"median": 3.0}}, "unlearned": {"summary": {"median": unlearned}},
                           "best attack": {"summary": {"median": 9.0}}}}
    return {"max_new_tokens": 12, "best_attack": LORA,
            "groups": {"forget (attacked half)": models(999.0), "forget (unseen half)": models(forget),
                       "neighbour": models(neighbour), "kept": models(2.5)}}


def _output(root: Path, name: str, result: dict | None) -> Path:
    """A robustness output folder: its marker and (unless None, a run in progress) robustness.json."""
    folder = root / name
    folder.mkdir(parents=True)
    write_marker(folder, "robustness")
    if result is not None:
        (folder / "robustness.json").write_text(json.dumps(result))
    return folder


@pytest.fixture
def outputs(tmp_path) -> dict[str, Path]:
    """Two runs: `seeded` (three seeds, holds up, keeps capability) and `wrecked` (one seed, resists only
    because its perplexity rose 30% and a kept task fell to 60% of base)."""
    return {"seeded": _output(tmp_path, "seeded", _result(unseen=(0.2, 0.4, 0.55), kept=0.95, ppl=21.0, sd=0.05,
                                                           fluency=_fluency(412.5, 4.25))),
            "wrecked": _output(tmp_path, "wrecked", _result(unseen=(0.05, 0.1, 0.15), kept=0.576, ppl=26.0,
                                                            grid="full"))}


def _rows(markdown: str) -> dict[str, list[str]]:
    """The robustness table's body rows by run name, as lists of cells."""
    table = markdown.split("## Robustness to relearning attacks")[1]
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def _header(markdown: str) -> list[str]:
    table = markdown.split("## Robustness to relearning attacks")[1]
    return [c.strip() for c in next(line for line in table.splitlines() if line.startswith("| ")).strip("|").split("|")]


def test_the_table_holds_each_runs_numbers_spreads_and_verdict(outputs, tmp_path):
    out = main(["--robustness", f"{outputs['seeded']},{outputs['wrecked']}", "--out", str(tmp_path / "rep")])
    header, rows = _header(out["markdown"]), _rows(out["markdown"])
    assert header == ["run", "grid", "forget ↓", "element_symbol ↑", "perplexity ratio", "unseen, 8 steps",
                      "unseen, 64 steps", "recovery share, 8 steps", "recovery share, 64 steps",
                      "attacked half, 64 steps", "floor, 64 steps", "benign, 64 steps",
                      "fluency: forget ↓", "fluency: neighbour ↓", "best attack", "capability"]
    seeded, wrecked = rows["seeded"], rows["wrecked"]
    assert seeded[1] == "default (2 attacks, seeds 0,1,2)" and wrecked[1] == "full (2 attacks, seeds 0)"
    assert seeded[2] == "20.0 ± 5.0 (base 85.0)" and wrecked[2] == "5.0 (base 85.0)"
    assert seeded[3] == "95.0 (base 96.0)" and seeded[4] == "1.05"
    # an output written before the recovery share was recorded: computed from its means, (0.4 - 0.2) / (0.85 - 0.2)
    assert seeded[7:9] == ["0.31", "0.54"]
    assert seeded[5:7] + seeded[9:12] == ["40.0 ± 5.0 (base 90.0)", "55.0 ± 5.0 (base 92.0)", "95.0 ± 5.0",
                                          "30.0 ± 5.0", "15.0 ± 5.0"]
    # the unseen half's continuations (not the attacked half's 999) and the neighbours', beside the base model's
    assert seeded[12:14] == ["412.5 (base 3.0)", "4.2 (base 3.0)"] and wrecked[12:14] == ["-", "-"]
    assert seeded[14] == "lora lr 0.001 constant" and seeded[15] == "ok"
    assert wrecked[4] == "1.30" and wrecked[6] == "15.0 (base 92.0)"
    assert wrecked[15] == "**fails**: perplexity x1.30 of base; element_symbol at 60% of base"
    assert "grid `full` (full lr 0.0001 constant, lora lr 0.001 constant), evaluated after 8, 64 steps" \
        in out["markdown"]
    written = (tmp_path / "rep" / "report.md").read_text()
    assert written.strip() == out["markdown"].strip() and "wrecking general ability" in written


def test_other_phrasings_get_columns_and_older_outputs_a_dash(outputs, tmp_path):
    """An output that measured the Q/A phrasing shows its unseen half unlearned (beside the base model's)
    and after the attacks; one written before phrasings existed shows dashes in those columns."""
    result = json.loads((outputs["seeded"] / "robustness.json").read_text())
    result["phrasings"] = {"qa": {"base": {"attacked": 0.7, "unseen": 0.75}, "unlearned": {"attacked": 0.3,
                                                                                         "unseen": 0.35},
                                  "after_best_attack": {"attacked": 0.8, "unseen": 0.5},
                                  "envelope": {"attacked": 0.8, "unseen": 0.6, "unseen_sd": 0.1, "setting": FULL}}}
    (outputs["seeded"] / "robustness.json").write_text(json.dumps(result))
    out = main(["--robustness", f"{outputs['seeded']},{outputs['wrecked']}", "--out", str(tmp_path / "rep")])
    header, rows = _header(out["markdown"]), _rows(out["markdown"])
    at = header.index("qa: forget ↓")
    assert header[at + 1] == "qa: unseen, 64 steps"
    assert rows["seeded"][at:at + 2] == ["35.0 (base 75.0)", "60.0 ± 10.0"]
    assert rows["wrecked"][at:at + 2] == ["-", "-"]


@pytest.mark.parametrize("ppl, kept, fails", [(22.0, 0.96, False), (22.1, 0.96, True), (20.0, 0.913, False),
                                              (20.0, 0.911, True)])
def test_capability_fails_just_past_either_limit(ppl, kept, fails):
    result = _result(unseen=(0.1, 0.1, 0.1), kept=kept, ppl=ppl)
    assert bool(capability_failures(result)) is fails


def test_plot_is_written_with_one_line_set_per_run(outputs, tmp_path):
    main([str(outputs["seeded"]), str(outputs["wrecked"]), "--out", str(tmp_path / "rep")])
    image = matplotlib.image.imread(tmp_path / "rep" / ROBUSTNESS_CURVES_FILE)
    assert image.shape[:2] == (int(ROBUSTNESS_SIZE[1] * DPI), int(ROBUSTNESS_SIZE[0] * DPI))
    curves = unseen_curves(json.loads((outputs["seeded"] / "robustness.json").read_text()))
    assert curves["best attack"] == ([0, 8, 64], [0.2, 0.4, 0.55], [0.05, 0.05, 0.05])
    assert curves["base model"][1] == [0.85, 0.9, 0.92] and curves["floor"][1:] == ([0.2, 0.25, 0.3],
                                                                                     [None, 0.05, 0.05])


def test_csv_and_json_tables(outputs, tmp_path):
    main([str(outputs["seeded"]), "--robustness", str(outputs["wrecked"]), "--out", str(tmp_path / "c"),
          "--table_format", "csv"])
    rows = list(csv.DictReader((tmp_path / "c" / "report_robustness.csv").open()))
    assert [r["run"] for r in rows] == ["wrecked", "seeded"]  # the flag's folders first, as for --tamper
    assert float(rows[1]["unseen_64"]) == 0.55 and float(rows[1]["unseen_64_sd"]) == 0.05
    assert rows[0]["unseen_64_sd"] == "" and rows[0]["capability"] == "fails" and rows[1]["capability"] == "ok"
    main([str(outputs["seeded"]), str(outputs["wrecked"]), "--out", str(tmp_path / "j"), "--table_format", "json"])
    table = json.loads((tmp_path / "j" / "report.json").read_text())["robustness"]
    assert table[1]["perplexity_ratio"] == pytest.approx(1.3) and table[1]["kept_element_symbol"] == 0.576
    assert table[0]["grid"] == "default" and table[0]["floor"] == 0.3


def test_positional_robustness_folders_are_recognised_beside_runs_and_in_progress(outputs, tmp_path):
    running = _output(tmp_path, "running", None)  # marker only: the protocol has not finished
    assert is_robustness_output(outputs["seeded"]) and is_robustness_output(running)
    assert not is_robustness_output(tmp_path)
    out = main([str(outputs["seeded"]), str(running), "--out", str(tmp_path / "rep")])
    assert out["rows"] == [] and [r["run"] for r in out["robustness"]] == ["seeded", "running"]
    assert set(_rows(out["markdown"])["running"][1:]) == {"pending"}


def test_halves_keys_match_what_robustness_writes():
    assert (ATTACKED, UNSEEN) == (robustness_grid.ATTACKED, robustness_grid.UNSEEN)


def test_a_folder_that_is_not_a_robustness_output_is_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError, match="not a robustness output"):
        main(["--robustness", str(tmp_path / "notes"), "--out", str(tmp_path / "rep")])
    assert cli.console(["report", "--robustness", str(tmp_path / "notes"), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "notes is not a robustness output" in err
    assert not (tmp_path / "rep").exists()  # refused before anything was written


@pytest.mark.parametrize("drop, named", [("envelope", "'envelope'"), ("perplexity.base", "perplexity.base"),
                                         ("unlearned.unseen", "unlearned.unseen")])
def test_a_summary_missing_a_key_is_refused_naming_it(tmp_path, capsys, drop, named):
    result = _result(unseen=(0.1, 0.2, 0.3), kept=0.9, ppl=20.0)
    outer, _, inner = drop.partition(".")
    del (result[outer] if inner else result)[inner or outer]
    folder = _output(tmp_path, "broken", result)
    with pytest.raises(InputError, match=named):
        main([str(folder), "--out", str(tmp_path / "rep")])
    assert cli.console(["report", str(folder), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "re-create it with `lensunlearn robustness RUN_DIR`" in err


def test_recovery_share_selection_paper_attacks_guessable_facts_and_kept_parts_get_columns(outputs, tmp_path):
    """An output with the protocol's newer numbers shows each in its own column (dashes for an older
    output beside it); a kept part of a split relation is a kept column like any kept task."""
    result = json.loads((outputs["seeded"] / "robustness.json").read_text())
    cir = {"kind": "mlp_sgd", "lr": 1e-5, "schedule": "constant"}
    result.update(
        recovery_share={"8": 0.3, "8_sd": 0.02, "64": 0.5},
        selected={"64": {"unseen": 0.48, "bias": 0.07, "recovery_share": 0.43, "chosen": [FULL, LORA]}},
        paper_attacks={"cir": {"setting": cir, "title": "Collapse of Irrelevant Representations", "what": "plain SGD",
                               "steps": {"8": {"attacked": 0.2, "unseen": 0.21},
                                         "64": {"attacked": 0.3, "unseen": 0.26}},
                               "recovery_share": {"8": 0.02, "64": 0.09}}},
        fictional={"64": {"attacked": 0.9, "unseen": 0.3, "forget_unseen": 0.61}},
        guessable={"base": 1.0, "unlearned": 0.5, "steps": {"64": 0.9}}, guessable_facts=["cc:MX", "cc:KW"])
    result["kept"]["facts:country_capital@kept"] = {"base": 0.9, "unlearned": 0.85, "after_best_attack": 0.9}
    (outputs["seeded"] / "robustness.json").write_text(json.dumps(result))
    out = main(["--robustness", f"{outputs['seeded']},{outputs['wrecked']}", "--out", str(tmp_path / "rep")])
    header, rows = _header(out["markdown"]), _rows(out["markdown"])
    seeded, wrecked = rows["seeded"], rows["wrecked"]

    def cell(name: str, row: list[str]) -> str:
        return row[header.index(name)]

    assert cell("facts:country_capital@kept ↑", seeded) == "85.0 (base 90.0)"
    assert cell("facts:country_capital@kept ↑", wrecked) == "-"
    assert cell("recovery share, 8 steps", seeded) == "0.30 ± 0.02"
    assert cell("recovery share, 64 steps", seeded) == "0.50"
    assert cell("unseen, attack chosen on the other fold, 64 steps", seeded) == "48.0 (bias 7.0)"
    assert cell("unseen under the cir paper's attack, 8 steps", seeded) == "21.0"
    assert cell("unseen under the cir paper's attack, 64 steps", seeded) == "26.0"
    assert cell("recovery share under the cir paper's attack, 64 steps", seeded) == "0.09"
    assert cell("unseen after the fictional attack, 64 steps", seeded) == "61.0"
    assert cell("guessable facts after the best attack, 64 steps", seeded) == "90.0 (base 100.0)"
    for name in ("unseen, attack chosen on the other fold, 64 steps", "unseen under the cir paper's attack, 64 steps",
                 "unseen after the fictional attack, 64 steps", "guessable facts after the best attack, 64 steps"):
        assert cell(name, wrecked) == "-", name
    # (0.15 - 0.05) / (0.85 - 0.05): computed from an older output's means
    assert cell("recovery share, 64 steps", wrecked) == "0.12"
    main(["--robustness", str(outputs["seeded"]), "--out", str(tmp_path / "csv"), "--table_format", "csv"])
    row = next(csv.DictReader((tmp_path / "csv" / "report_robustness.csv").open()))
    assert float(row["paper_cir_unseen_64"]) == 0.26 and float(row["selection_bias"]) == 0.07
    assert row["paper_cir_setting"] == "mlp_sgd lr 1e-05 constant" and row["guessable_facts"] == "2"


def test_the_worst_case_gets_a_column_per_step_count_naming_the_fictional_attack(outputs, tmp_path):
    """The worst case at each step count, marked where the fictional attack gave it (on some seeds or all);
    an output written before it was recorded shows dashes, and a table of such outputs only has no column."""
    result = json.loads((outputs["seeded"] / "robustness.json").read_text())
    result["worst_case"] = {
        "8": {"unseen": 0.4, "unseen_sd": 0.05, "source": "envelope", "setting": FULL, "recovery_share": 0.31},
        "64": {"unseen": 0.6, "unseen_sd": 0.04, "source": "envelope", "setting": FULL, "recovery_share": 0.62,
               "sources": ["envelope", "fictional_attack", "envelope"]}}
    (outputs["seeded"] / "robustness.json").write_text(json.dumps(result))
    one = _result(unseen=(0.2, 0.4, 0.5), kept=0.95, ppl=21.0)
    one["worst_case"] = {"8": {"unseen": 0.4, "source": "envelope", "setting": FULL, "recovery_share": 0.31},
                         "64": {"unseen": 0.61, "source": "fictional_attack", "setting": LORA,
                                "recovery_share": 0.63}}
    fictional = _output(tmp_path, "fictional", one)
    runs = f"{outputs['seeded']},{fictional},{outputs['wrecked']}"
    out = main(["--robustness", runs, "--out", str(tmp_path / "rep")])
    header, rows = _header(out["markdown"]), _rows(out["markdown"])
    at = header.index("worst case, 8 steps")
    assert header[at - 1] == "recovery share, 64 steps" and header[at + 1] == "worst case, 64 steps"
    assert rows["seeded"][at:at + 2] == ["40.0 ± 5.0", "60.0 ± 4.0 (fictional attack in 1 of 3 seeds)"]
    assert rows["fictional"][at:at + 2] == ["40.0", "61.0 (fictional attack)"]
    assert rows["wrecked"][at:at + 2] == ["-", "-"]  # older output: no worst case recorded
    main(["--robustness", runs, "--out", str(tmp_path / "csv"), "--table_format", "csv"])
    by_run = {r["run"]: r for r in csv.DictReader((tmp_path / "csv" / "report_robustness.csv").open())}
    assert float(by_run["fictional"]["worst_case_64"]) == 0.61
    assert by_run["fictional"]["worst_case_source_64"] == "fictional_attack"
    assert float(by_run["fictional"]["worst_case_recovery_share_64"]) == 0.63
    assert by_run["seeded"]["worst_case_source_64"] == "envelope,fictional_attack,envelope"
    assert by_run["wrecked"]["worst_case_64"] == ""
    only_old = main(["--robustness", str(outputs["wrecked"]), "--out", str(tmp_path / "old")])
    assert not any(name.startswith("worst case") for name in _header(only_old["markdown"]))


def test_the_worst_case_column_names_the_benign_attack_and_each_attack_where_seeds_disagree(tmp_path):
    """Where the benign attack gave the worst case the cell says so in words, as for the fictional attack;
    seeds that disagree are counted per attack other than the envelope, and the csv keeps each seed's."""
    def worst(unseen: float, sources: list[str], sd: float | None = None) -> dict:
        point = {"unseen": unseen, "source": max(sources, key=sources.count), "setting": LORA,
                 "recovery_share": 0.5, **({"unseen_sd": sd} if sd is not None else {})}
        return {"8": {"unseen": 0.4, "source": "envelope", "setting": FULL, "recovery_share": 0.31},
                "64": {**point, **({"sources": sources} if len(set(sources)) > 1 else {})}}

    runs = {"benign": ({}, ["benign_attack"]), "one_benign": ({"sd": 0.05}, ["envelope", "benign_attack", "envelope"]),
            "mixed": ({"sd": 0.05}, ["benign_attack", "fictional_attack", "benign_attack"]),
            "all_benign": ({"sd": 0.05}, ["benign_attack"] * 3)}
    folders = []
    for name, (spread, sources) in runs.items():
        result = _result(unseen=(0.2, 0.4, 0.5), kept=0.95, ppl=21.0, **spread)
        result["worst_case"] = worst(0.514, sources, spread.get("sd"))
        folders.append(str(_output(tmp_path, name, result)))
    out = main(["--robustness", ",".join(folders), "--out", str(tmp_path / "rep")])
    header, rows = _header(out["markdown"]), _rows(out["markdown"])
    at = header.index("worst case, 64 steps")
    assert rows["benign"][at] == "51.4 (benign attack)"
    assert rows["one_benign"][at] == "51.4 ± 5.0 (benign attack in 1 of 3 seeds)"
    assert rows["mixed"][at] == "51.4 ± 5.0 (fictional attack in 1 of 3 seeds, benign attack in 2 of 3 seeds)"
    assert rows["all_benign"][at] == "51.4 ± 5.0 (benign attack)"
    assert [r[at - 1] for r in rows.values()] == ["40.0"] * 4  # 8 steps: the envelope's, not named
    main(["--robustness", ",".join(folders), "--out", str(tmp_path / "csv"), "--table_format", "csv"])
    by_run = {r["run"]: r for r in csv.DictReader((tmp_path / "csv" / "report_robustness.csv").open())}
    assert by_run["benign"]["worst_case_source_64"] == "benign_attack"
    assert by_run["mixed"]["worst_case_source_64"] == "benign_attack,fictional_attack,benign_attack"


def test_fmt_worst_names_only_the_attacks_other_than_the_envelope():
    row = {"worst_case_64": 0.514}
    assert fmt_worst({**row, "worst_case_source_64": "envelope"}, 64) == "51.4"
    assert fmt_worst({**row, "worst_case_source_64": "envelope,envelope"}, 64) == "51.4"
    assert fmt_worst({**row, "worst_case_source_64": "fictional_attack"}, 64) == "51.4 (fictional attack)"
    assert fmt_worst({**row, "worst_case_source_64": "benign_attack"}, 64) == "51.4 (benign attack)"
    assert fmt_worst({**row, "worst_case_source_64": "envelope,benign_attack,envelope"}, 64) == \
        "51.4 (benign attack in 1 of 3 seeds)"
    assert fmt_worst({**row, "worst_case_source_64": "benign_attack,envelope,fictional_attack"}, 64) == \
        "51.4 (fictional attack in 1 of 3 seeds, benign attack in 1 of 3 seeds)"
    assert fmt_worst({**row, "worst_case_source_64": "benign_attack"}, 8) == "-"  # no number at 8 steps
    assert fmt_worst({**row, "capability": "pending", "worst_case_source_64": "benign_attack"}, 64) == "pending"
    assert worst_case_sources([None]) == "" and worst_case_sources(["envelope"]) == ""


def test_each_runs_objective_is_named_beside_its_grid(tmp_path):
    """Outputs of runs by different objectives (`unlearn --objective`): the lines under the table and the csv
    say which objective each run used; an output that predates the field says nothing."""
    rmu = _output(tmp_path, "rmu_run", {**_result(unseen=(0.2, 0.4, 0.5), kept=0.95, ppl=21.0), "objective": "rmu"})
    old = _output(tmp_path, "older", _result(unseen=(0.2, 0.4, 0.5), kept=0.95, ppl=21.0))
    out = main(["--robustness", f"{rmu},{old}", "--out", str(tmp_path / "rep"), "--table_format", "csv"])
    assert "- `rmu_run`: objective `rmu`, grid `default`" in out["markdown"]
    assert "- `older`: grid `default`" in out["markdown"]
    rows = list(csv.DictReader((tmp_path / "rep" / "report_robustness.csv").open()))
    assert [r["objective"] for r in rows] == ["rmu", ""]
