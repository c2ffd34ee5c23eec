"""What the command line and `--config` files accept, and how they refuse the rest: an empty value means
what the help says, a key a config file cannot set is named, two config files merge, and every argument
error is one line naming the flag and what it accepts (exit status 2), with no usage block."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lensunlearn.cli import configure

from .test_errors import one_line


def _robustness_run(tmp_path: Path, tasks: str = "facts:country_capital,facts:element_symbol") -> Path:
    """A folder that `robustness` takes for a finished unlearning run (its model is never loaded here)."""
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "config.json").write_text("{}")
    (run / "run_config.json").write_text(json.dumps({"model": "base", "forget": "facts:country_capital",
                                                     "eval_tasks": tasks}))
    return run


# --- '' means what the help says --------------------------------------------------------------------------


def test_empty_kept_tasks_means_no_kept_tasks(tmp_path):
    """The help says '' means no kept tasks; it used to become None, which means "the run's other eval
    tasks" (and those may hold the forget domain itself)."""
    from lensunlearn.attack.protocol import resolve

    run = _robustness_run(tmp_path)
    for empty in ("", "none"):
        _, cfg = configure(["robustness", str(run), "--kept_tasks", empty])
        assert cfg.kept_tasks == "" and resolve(cfg).kept_tasks == ""
    _, cfg = configure(["robustness", str(run)])
    assert resolve(cfg).kept_tasks == "facts:element_symbol"  # left out: the run's other tasks
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {run}\nkept_tasks: ''\n")
    assert resolve(configure(["robustness", "--config", str(path)])[1]).kept_tasks == ""


def test_none_eval_tasks_skips_evaluation_as_the_empty_list_does(tmp_path):
    """unlearn's and distill's help say '' or none skips evaluation; none used to be read as a task name."""
    for command in (["unlearn"], ["distill", "--run", str(tmp_path)]):
        for empty in ("", "none", "None"):
            assert configure([*command, "--eval_tasks", empty])[1].eval_tasks == "", (command, empty)
    assert configure(["unlearn", "--eval_tasks", "facts:country_capital"])[1].eval_tasks == "facts:country_capital"


def test_empty_lm_eval_include_of_distill_means_no_folder(tmp_path):
    """distill's --lm_eval_include left out is the source run's; '' is no folder, not the run's."""
    from lensunlearn.unlearning.distill import resolve

    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "config.json").write_text("{}")
    (run / "summary.json").write_text("{}")
    (run / "run_config.json").write_text(json.dumps({"model": "m", "forget": "f", "eval_tasks": "facts:x",
                                                     "lm_eval_include": str(tmp_path)}))
    assert resolve(configure(["distill", "--run", str(run)])[1])[0].lm_eval_include == str(tmp_path)
    assert resolve(configure(["distill", "--run", str(run), "--lm_eval_include", ""])[1])[0].lm_eval_include is None


def test_every_optional_string_says_what_empty_means():
    """Every `str | None` option either keeps '' as none (its help says so) or treats '' as left out (its
    default is said in words), so the help never hides what '' does."""
    import dataclasses
    import typing

    from lensunlearn.cli import all_commands
    from lensunlearn.core.config import _base_type

    for command in all_commands():
        hints = typing.get_type_hints(command.config)
        for field in dataclasses.fields(command.config):
            base, optional = _base_type(hints[field.name])
            if not optional or base is not str:
                continue
            if field.metadata.get("empty"):
                assert "'' or none" in field.metadata["help"], (command.words, field.name)
            elif field.default is None:
                assert field.metadata.get("default_text"), (command.words, field.name)


# --- config files ---------------------------------------------------------------------------------------


def test_plan_keys_in_a_hand_written_config_are_named(tmp_path, caplog):
    """`steps: 7` in an unlearn config sets nothing (the steps follow from examples, epochs and batch): a
    warning names it. A run's own run_config.json, which holds the whole plan, reads back silently."""
    path = tmp_path / "c.yaml"
    path.write_text("examples: 10\nsteps: 7\n")
    with caplog.at_level(logging.WARNING):
        _, cfg = configure(["unlearn", "--config", str(path)])
    assert cfg.examples == 10
    assert [r.getMessage() for r in caplog.records] == [
        f"--config {path}: steps is not an option but what a run computed from its options (its plan): ignored"]
    caplog.clear()
    saved = {"examples": 10, "steps": 7, "steps_per_epoch": 7, "world_size": 1, "grad_accum": 1,
             "unique_forget_examples": 3, "unique_retain_examples": 8, "effective_epochs": 1.0, "run_dir": "runs/x"}
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        configure(["unlearn", "--config", str(tmp_path / "run_config.json")])
    assert caplog.records == []


def test_a_localised_runs_saved_config_reads_back_silently(tmp_path, caplog):
    """The blocks a localised run trained and the mix of its retain sources are saved by some runs only:
    read back with the run's plan they are skipped without a warning; alone, in a hand-written file, they
    are named."""
    saved = {"examples": 10, "steps": 7, "steps_per_epoch": 7, "world_size": 1, "grad_accum": 1,
             "unique_forget_examples": 3, "unique_retain_examples": 8, "effective_epochs": 1.0, "run_dir": "runs/x",
             "blocks": "2-3", "trained_blocks": [2, 3], "retain_mix": [{"source": "generic:retain", "weight": 1.0}]}
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        _, cfg = configure(["unlearn", "--config", str(tmp_path / "run_config.json")])
    assert caplog.records == [] and cfg.blocks == "2-3"
    path = tmp_path / "c.yaml"
    path.write_text("trained_blocks: [2, 3]\n")
    with caplog.at_level(logging.WARNING):
        configure(["unlearn", "--config", str(path)])
    assert [r.getMessage() for r in caplog.records] == [
        f"--config {path}: trained_blocks is not an option but what a run computed from its options (its plan): "
        f"ignored"]


def test_old_key_names_in_a_config_file_are_read_with_a_warning(tmp_path, caplog, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"remove_coef": 12.0}))
    with caplog.at_level(logging.WARNING):
        assert configure(["unlearn", "--config", str(path)])[1].forget_coef == 12.0
    assert "remove_coef is now forget_coef" in caplog.text
    path.write_text(json.dumps({"remove_coef": 12.0, "forget_coef": 3.0}))
    assert one_line(["unlearn", "--config", path], capsys, status=2) == (
        f"lensunlearn unlearn: error: --config {path}: remove_coef is the old name of forget_coef, and the file sets "
        f"both: keep forget_coef")


def test_two_config_files_merge_in_order(tmp_path):
    """A second --config used to replace the first; now both are read, the later one winning."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("examples: 10\nlr: 1e-2\n")
    second.write_text("lr: 5e-3\nepochs: 2\n")
    _, cfg = configure(["unlearn", "--config", str(first), "--config", str(second)])
    assert (cfg.examples, cfg.lr, cfg.epochs) == (10, 5e-3, 2.0)
    _, cfg = configure(["unlearn", "--config", str(second), "--config", str(first), "--lr", "1e-4"])
    assert (cfg.examples, cfg.lr, cfg.epochs) == (10, 1e-4, 2.0)  # the line wins over both


def test_robustness_takes_the_run_from_its_config_file(tmp_path):
    """`robustness --config FILE` used to demand RUN_DIR on the line even when FILE names the run; the
    saved robustness config of an earlier version names it `run_dir`."""
    run = _robustness_run(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(f"run: {run}\nseeds: [0, 1]\n")
    _, cfg = configure(["robustness", "--config", str(path)])
    assert cfg.run == str(run) and cfg.seeds == (0, 1)
    path.write_text(json.dumps({"run_dir": str(run)}))
    assert configure(["robustness", "--config", str(path)])[1].run == str(run)
    assert configure(["robustness", str(tmp_path / "other"), "--config", str(path)])[1].run == str(tmp_path / "other")


def test_a_grid_string_in_a_search_config_is_one_grid_entry(tmp_path, capsys):
    """`grid: "lr=1e-3,1e-2"` in a config file is one --grid entry; it used to be split at its commas, and
    the error then blamed "1e-2" as a grid entry without a key."""
    path = tmp_path / "s.yaml"
    path.write_text("grid: lr=1e-3,1e-2\nunlearn: --eval_tasks a.jsonl\n")
    _, cfg = configure(["search", "--config", str(path)])
    assert [p.name for p in cfg.plan.points] == ["lr1e-3", "lr1e-2"]
    path.write_text("grid: lr=abc\nunlearn: --eval_tasks a.jsonl\n")
    line = one_line(["search", "--config", path], capsys, status=2)
    assert line == "lensunlearn search: error: --grid lr=abc: lr takes a number, got 'abc'"


def test_a_grid_value_written_twice_is_refused(capsys):
    line = one_line(["search", "--unlearn", "--eval_tasks a.jsonl", "--grid", "lr=1e-3,0.001"], capsys, status=2)
    assert line == ("lensunlearn search: error: --grid lr=1e-3,0.001: 1e-3 and 0.001 are the same value (0.001), one "
                    "grid point: list each value once")


# --- one line per argument error ------------------------------------------------------------------------


@pytest.mark.parametrize("argv,line", [
    (["tamper", "--lrs", "abc"],
     "lensunlearn tamper: error: --lrs: expected comma-separated numbers like '1e-5,2e-5', got 'abc'"),
    (["unlearn", "--adversary_steps", "1.5"], "lensunlearn unlearn: error: --adversary_steps: expected an integer, "
                                              "got '1.5'"),
    (["robustness", "r", "--seeds", "0,x"],
     "lensunlearn robustness: error: --seeds: expected comma-separated integers like '5,10,15', got '0,x'"),
    (["unlearn", "--lrr", "1"], "lensunlearn unlearn: error: --lrr is not an option of lensunlearn unlearn (did you "
                                "mean --lr?): see lensunlearn unlearn --help"),
    (["unlearn", "--lr"], "lensunlearn unlearn: error: --lr needs a value: see lensunlearn unlearn --help"),
    (["unlearn", "--eval_format", "clozed"], "lensunlearn unlearn: error: --eval_format: choose from letter, cloze, "
                                             "got 'clozed' (did you mean cloze?)"),
    (["unlearn", "--preset", "smal"], "lensunlearn unlearn: error: --preset: choose from reference, small, robust, "
                                      "cir, cir_mlp, mudman, got 'smal' (did you mean small?)"),
    (["unlern"], "lensunlearn: error: unlern is not a command of lensunlearn (did you mean unlearn?): choose from "
                 "lens, eval, locate, unlearn, distill, tamper, robustness, search, report, demo"),
    (["lens"], "lensunlearn lens: error: lensunlearn lens needs a command: train, eval"),
    (["report", "r", "extra", "--tamper"], "lensunlearn report: error: --tamper needs a value: see lensunlearn "
                                           "report --help"),
    (["eval", "stray"], "lensunlearn eval: error: stray is not an argument of lensunlearn eval: see lensunlearn "
                        "eval --help"),
    # compared without dashes, --full is not close to --lr, so no suggestion misleads
    (["distill", "--full", "--run", "x"], "lensunlearn distill: error: --full is not an option of lensunlearn distill: "
                                          "see lensunlearn distill --help"),
    (["distill", "--alpah", "0.1"], "lensunlearn distill: error: --alpah is not an option of lensunlearn distill "
                                    "(did you mean --alpha?): see lensunlearn distill --help"),
])
def test_argument_errors_are_one_line(argv, line, capsys):
    assert one_line(argv, capsys, status=2) == line


def test_resume_with_overwrite_says_what_each_does(capsys):
    """It used to say "pass --overwrite", which was already given."""
    line = one_line(["robustness", "r", "--resume", "--overwrite"], capsys, status=2)
    assert line == ("lensunlearn robustness: error: --resume and --overwrite cannot be combined: --resume continues "
                    "the killed run in --out, --overwrite starts over and replaces it once the new one is complete; "
                    "pass one")


def test_library_main_also_prints_one_line(capsys):
    from lensunlearn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tamper", "--lrs", "abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "lensunlearn tamper: error: --lrs: expected comma-separated numbers like '1e-5,2e-5', got 'abc'"]
