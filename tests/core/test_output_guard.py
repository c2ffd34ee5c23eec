"""One output guard for every command: nothing of the user's is deleted, renamed or replaced.

The old version and the staging folder of a replacement (`.<name>.old`, `.<name>.incoming`) are
recognised by their marker like any output, so a user's folder of that name is left alone; `report
--out` refuses a folder it did not make; no command's output replaces what the command reads (the
model it starts from, the run it distils).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from lensunlearn.cli import console, main
from lensunlearn.core.config import ConfigError
from lensunlearn.core.outputs import prepare_output, recover, staging_path, trash_path
from lensunlearn.core.paths import MARKER_FILE, read_marker, write_marker

from ..conftest import unlearn_argv, write_unlearn_inputs


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _users_folder(path: Path) -> Path:
    """A folder of the user's own (no marker) holding one file."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def _no_model(monkeypatch, *modules: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    for module in modules:
        monkeypatch.setattr(f"{module}.load_model", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The tiny unlearning inputs and a finished run of them, runs/X."""
    tmp = write_unlearn_inputs(tmp_path_factory.mktemp("guard"))
    main(unlearn_argv(tmp, "--run_name", "X"))
    return tmp


@pytest.fixture
def setup(finished, tmp_path) -> Path:
    """A private copy of `finished`, so that each test may change it."""
    copy = tmp_path / "in"
    shutil.copytree(finished, copy)
    for path in (copy / "runs" / "X" / "run_config.json",):  # the run names its own folder
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({**saved, "run_dir": str(copy / "runs" / "X")}))
    return copy


# ------------------------------------------------------------------ .<name>.old and .<name>.incoming


def test_a_users_folder_named_like_the_old_version_is_never_deleted(setup, monkeypatch):
    """Before: any command writing runs/X deleted runs/.X.old, even one that then refused to run."""
    run, users = setup / "runs" / "X", _users_folder(setup / "runs" / ".X.old")
    run_before = _snapshot(run)
    with pytest.raises(FileExistsError, match="finished unlearning run"):  # refused, as before
        main(unlearn_argv(setup, "--run_name", "X"))
    _no_model(monkeypatch, "lensunlearn.unlearning.run")
    with pytest.raises(FileExistsError, match=r"\.X\.old is in the way of replacing .* not lensunlearn's"):
        main(unlearn_argv(setup, "--run_name", "X", "--overwrite"))  # refused before any model loads
    assert _snapshot(users) == {"notes.txt": b"mine"} and _snapshot(run) == run_before
    assert not staging_path(run).exists()


def test_a_users_folder_named_like_the_old_version_is_never_restored_in_place_of_a_missing_run(setup, caplog):
    """Before: with runs/Y absent, runs/.Y.old was renamed to runs/Y with a false 'restored' warning."""
    users = _users_folder(setup / "runs" / ".Y.old")
    with caplog.at_level(logging.WARNING):
        run = main(unlearn_argv(setup, "--run_name", "Y"))
    assert "restored" not in caplog.text
    assert _snapshot(users) == {"notes.txt": b"mine"} and (run / "summary.json").is_file()
    assert read_marker(run) == "unlearn" and not (run / "notes.txt").exists()


def test_recover_touches_only_marked_folders_of_its_kind(tmp_path):
    final = tmp_path / "out"
    users = _users_folder(trash_path(final))
    recover(final, "unlearn")
    assert not final.exists() and _snapshot(users) == {"notes.txt": b"mine"}
    write_marker(users, "lens")  # ours, but of another kind: not this output's old version
    recover(final, "unlearn")
    assert not final.exists() and users.is_dir()
    _users_folder(final)
    recover(final, "unlearn")
    assert users.is_dir() and final.is_dir()


def test_a_users_folder_named_like_the_staging_folder_is_left_alone(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    write_marker(final, "unlearn")
    (final / "summary.json").write_text("{}")
    users = _users_folder(staging_path(final))
    with pytest.raises(FileExistsError, match=r"\.run\.incoming is in the way of replacing .* not a staging folder"):
        prepare_output(final, "unlearn", overwrite=True, finished=lambda p: True)
    resumed = prepare_output(final, "unlearn", overwrite=False, resume=True, finished=lambda p: False)
    assert resumed.work == final  # not taken for an interrupted replacement to continue either
    assert _snapshot(users) == {"notes.txt": b"mine"}
    empty = tmp_path / "fresh"
    _users_folder(staging_path(empty))
    output = prepare_output(empty, "unlearn", overwrite=True, finished=lambda p: True)  # not needed: written in place
    assert output.work == empty and (staging_path(empty) / "notes.txt").read_text() == "mine"


def test_a_replaced_output_from_before_markers_keeps_a_recognisable_old_version(tmp_path):
    """The old version is moved to `.<name>.old` with a marker, so a crash there is still recovered."""
    final = tmp_path / "run"
    final.mkdir()
    (final / "run_config.json").write_text("{}")
    (final / "summary.json").write_text("{}")  # an unlearning run's files, no marker
    output = prepare_output(final, "unlearn", overwrite=True, finished=lambda p: True)
    (output.work / "summary.json").write_text('{"new": 1}')
    real_rename, calls = Path.rename, []

    def rename_then_crash(self, target):
        result = real_rename(self, target)
        calls.append(target)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed between moving the old version aside and moving the new one in
        return result

    Path.rename = rename_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            output.commit()
    finally:
        Path.rename = real_rename
    assert read_marker(trash_path(final)) == "unlearn"
    recover(final, "unlearn")
    assert json.loads((final / "summary.json").read_text()) == {"new": 1} and not trash_path(final).exists()


# ------------------------------------------------------------------------------------- report --out


def test_report_refuses_a_folder_it_did_not_make(setup, capsys):
    """Before: `report --out DIR` replaced the user's own report.md and report.csv and dropped a marker."""
    users = setup / "mine"
    users.mkdir()
    (users / "report.md").write_text("my notes")
    (users / "report.csv").write_text("a,b\n")
    run = str(setup / "runs" / "X")
    tasks = ["--forget_task", "capitals", "--retain_task", "symbols"]  # the run was evaluated on none
    assert console(["report", run, *tasks, "--out", str(users), "--table_format", "csv"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was not made by `lensunlearn report`" in err and "--out" in err
    assert _snapshot(users) == {"report.md": b"my notes", "report.csv": b"a,b\n"} and MARKER_FILE not in _snapshot(
        users)
    ours = setup / "report"
    assert console(["report", run, *tasks, "--out", str(ours)]) == 0
    assert console(["report", run, *tasks, "--out", str(ours), "--table_format", "csv"]) == 0  # its own: rewritten
    assert read_marker(ours) == "report" and (ours / "report.csv").is_file()
    demo = setup / "demo"
    demo.mkdir()
    write_marker(demo, "demo")
    (demo / "demo_state.json").write_text("{}")
    assert console(["report", run, *tasks, "--out", str(demo)]) == 0  # a demo's folder holds its report
    assert (demo / "report.md").is_file() and read_marker(demo) == "demo"


# ----------------------------------------------------------------------- a command's own input


def test_unlearn_never_replaces_the_model_it_starts_from(setup, monkeypatch, capsys):
    """Before: `unlearn --model runs/X/merged --run_name X --overwrite` deleted the model it started from."""
    run = setup / "runs" / "X"
    before = _snapshot(run)
    _no_model(monkeypatch, "lensunlearn.unlearning.run")
    argv = unlearn_argv(setup, "--run_name", "X")
    argv[argv.index("--model") + 1] = str(run / "merged")
    for flags in (["--overwrite"], [], ["--resume"]):
        with pytest.raises(ConfigError, match=r"--run_name: .*runs/X holds --model .*merged, which this command "
                                              r"reads: .* choose another --run_name"):
            main([*argv, *flags])
    assert console([*argv, "--overwrite"]) == 2
    assert "pass --overwrite" not in capsys.readouterr().err
    assert _snapshot(run) == before and not staging_path(run).exists()


def test_distill_never_replaces_its_own_teacher(setup, monkeypatch, capsys):
    """Before: `distill --run runs/D --run_name D --overwrite` deleted its own teacher, and without
    --overwrite the refusal said 'pass --overwrite'."""
    from lensunlearn.unlearning import distill as distill_module

    teacher = setup / "runs" / "D"
    shutil.copytree(setup / "runs" / "X", teacher)
    (teacher / MARKER_FILE).write_text(json.dumps({"kind": "distill"}))  # a finished distillation, distilled again
    before = _snapshot(teacher)
    _no_model(monkeypatch, "lensunlearn.unlearning.distill")
    monkeypatch.setattr(distill_module, "load_tokenizer", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the refusal comes before the teacher is read")))
    argv = ["distill", "--run", str(teacher), "--run_name", "D", "--eval_tasks", "", "--device", "cpu",
            "--corpus", str(setup / "retain.jsonl"), "--generic", str(setup / "forget.jsonl")]
    for flags in (["--overwrite"], []):
        assert console([*argv, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is --run" in err and "which this command reads" in err, err
        assert "pass --overwrite" not in err
    assert _snapshot(teacher) == before and not staging_path(teacher).exists()


def test_the_guard_covers_inputs_inside_the_output_folder(tmp_path):
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    write_marker(out, "unlearn")
    (out / "summary.json").write_text("{}")
    for reads in ({"--model": out / "merged"}, [("--lens", out)], [("--forget", f"{out}/../out/merged")]):
        with pytest.raises(ConfigError, match="which this command reads"):
            prepare_output(out, "unlearn", overwrite=True, finished=lambda p: True, reads=reads)
    # hub ids, other folders and names that are not paths pass
    other = tmp_path / "model"
    other.mkdir()
    output = prepare_output(out, "unlearn", overwrite=True, finished=lambda p: True,
                            reads={"--model": "owner/name", "--lens": other, "--forget": "facts:country_capital",
                                   "--cir_corpus": None})
    assert output.staged
