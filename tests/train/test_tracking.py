"""Experiment tracking (`--tracker wandb|tensorboard`), offline: what each tracker wrote, read back with its
own reader, equals the command's metrics.jsonl line by line; the final evaluation, config and plots are
there too; an unknown tracker or a missing package is one line; without --tracker nothing is imported."""

from __future__ import annotations

import ast
import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

import lensunlearn
from lensunlearn.attack import protocol as robustness
from lensunlearn.core.config import ConfigError
from lensunlearn.core.errors import UserError
from lensunlearn.core.paths import TENSORBOARD_DIR, WANDB_DIR
from lensunlearn.train.loop import MetricsLog
from lensunlearn.train.tracking import Tracker, TrackingOptions, numbers, open_tracker

from ..attack.test_protocol import run_files  # noqa: F401  (a fixture: pytest finds it by name)
from ..cli.test_errors import one_line
from ..conftest import run_command, save_tiny_model, unlearn_argv, write_jsonl, write_unlearn_inputs


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """wandb offline and quiet, its settings and caches inside the test's folder."""
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("HF_HUB_OFFLINE", "1"),
                        ("WANDB_CONFIG_DIR", tmp_path / "wandb_config"), ("WANDB_CACHE_DIR", tmp_path / "wandb_cache"),
                        ("WANDB_DATA_DIR", tmp_path / "wandb_data")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def metrics_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- reading back what the trackers wrote ---------------------------------------------------------------


def tensorboard_scalars(folder: Path) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} of the event files in `folder`, read by TensorBoard's own loader (which also
    applies a resumed writer's purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert tag not in rows.get(event.step, {}), f"{tag} twice at step {event.step}"
            rows.setdefault(event.step, {})[tag] = event.value
    return rows


def tensorboard_tags(folder: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events.Tags()


# wandb writes its run as a LevelDB-style log of protobuf records: a 7-byte file header (":W&B", magic,
# version), then 32 KiB blocks of records, each with a 7-byte header (CRC-32 of type byte + payload,
# length, type: 1 whole, 2 first, 3 middle, 4 last piece). The records are wandb's own `Record` messages.
_BLOCK, _HEADER, _FULL, _FIRST, _LAST = 32768, 7, 1, 2, 4


def wandb_records(run_dir: Path) -> list:
    from wandb.proto.wandb_internal_pb2 import Record

    files = list((run_dir / WANDB_DIR).glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if (checksum, length, kind) == (0, 0, 0):
            break
        payload = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"bad checksum at byte {pos}"
        pos += _HEADER + length
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    assert pos == len(data), "the .wandb file ends inside a record"
    return records


def _item(item) -> tuple[str, object]:
    return "/".join(item.nested_key) or item.key, json.loads(item.value_json)


def wandb_history(records: list) -> dict[int, dict]:
    """{step: {key: value}} of the logged rows, without wandb's own `_step`, `_runtime`, ... keys."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = dict(_item(item) for item in record.history.item)
            rows[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def wandb_summary(records: list) -> dict:
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update(_item(item) for item in record.summary.update)
    return summary


def wandb_config(records: list) -> dict:
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update(_item(item) for item in updates)
    return config


def wandb_run(records: list):
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def assert_rows_equal(tracked: dict[int, dict], lines: list[dict], rel: float) -> None:
    """The tracker's rows are the metrics lines: the same steps, and at each the same keys and values (the
    lines of one step together: distill writes its final evaluation on a line of its own)."""
    expected: dict[int, dict] = {}
    for line in lines:
        expected.setdefault(line["step"], {}).update(numbers(line))
    assert_same_rows(tracked, expected, rel)


def assert_same_rows(tracked: dict[int, dict], expected: dict[int, dict], rel: float) -> None:
    assert sorted(tracked) == sorted(expected)
    for step, values in expected.items():
        assert tracked[step] == pytest.approx(values, rel=rel), step


# --- unlearn, with each tracker ---------------------------------------------------------------------------


@pytest.fixture
def unlearn_inputs(tmp_path) -> Path:
    inputs = write_unlearn_inputs(tmp_path)
    write_jsonl(inputs / "task.jsonl", [{"question": f"the capital of {c} is", "answer": a,
                                         "choices": ["paris", "rome", "madrid", "berlin"]}
                                        for c, a in (("france", 0), ("italy", 1))])
    return inputs


def _unlearn(inputs: Path, tracker: str) -> Path:
    """Three steps with an evaluation at step 0 and every step, a base and a final evaluation."""
    return run_command(unlearn_argv(
        inputs, "--examples", "12", "--tracker", tracker, "--run_name", f"tracked_{tracker}", "--eval_every", "1",
        "--eval_tasks", str(inputs / "task.jsonl"), "--eval_format", "cloze", "--eval_base"))


def _final_evals(run_dir: Path) -> dict[str, float]:
    out = {}
    for when, name in (("final", "eval.json"), ("base", "base_eval.json")):
        for task, values in json.loads((run_dir / name).read_text())["results"].items():
            out.update({f"{when}/eval/{task}/{m}": values[m] for m in ("acc", "acc_norm")})
    return out


def test_unlearn_tensorboard_holds_metrics_jsonl(unlearn_inputs):
    run_dir = _unlearn(unlearn_inputs, "tensorboard")
    lines = metrics_lines(run_dir)
    assert [line["step"] for line in lines] == [0, 1, 2, 3] and "eval/task/acc" in lines[2]
    rows = tensorboard_scalars(run_dir / TENSORBOARD_DIR)
    summary = {k.removeprefix("summary/"): v for row in rows.values() for k, v in row.items()
               if k.startswith("summary/")}
    curves = {step: {k: v for k, v in row.items() if not k.startswith("summary/")} for step, row in rows.items()}
    assert_rows_equal(curves, lines, rel=1e-6)  # TensorBoard keeps scalars as float32
    saved = json.loads((run_dir / "summary.json").read_text())
    assert summary == pytest.approx({**numbers(saved), **_final_evals(run_dir)}, rel=1e-6)
    assert "config/text_summary" in tensorboard_tags(run_dir / TENSORBOARD_DIR)["tensors"]


def test_unlearn_wandb_holds_metrics_jsonl(unlearn_inputs, offline_wandb):
    run_dir = _unlearn(unlearn_inputs, "wandb")
    records = wandb_records(run_dir)
    assert_rows_equal(wandb_history(records), metrics_lines(run_dir), rel=1e-12)
    summary = wandb_summary(records)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert {k: summary[k] for k in saved} == saved
    assert {k: summary[k] for k in _final_evals(run_dir)} == _final_evals(run_dir)
    config = wandb_config(records)
    run_config = json.loads((run_dir / "run_config.json").read_text())
    assert {k: config[k] for k in run_config} == run_config and config["tracker"] == "wandb"
    run = wandb_run(records)
    assert run.display_name == run_dir.name == "tracked_wandb" and run.project == "lensunlearn"
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


class Killed(Exception):
    """Stands for a kill after a metrics line: the tracker has the line, the checkpoint is older."""


def test_a_resumed_run_drops_the_tracked_steps_after_its_checkpoint(tmp_path, monkeypatch):
    """As metrics.jsonl drops the lines after the checkpoint, TensorBoard drops the killed attempt's events
    from the resumed step on: every step once, with the resumed run's values."""
    inputs = write_unlearn_inputs(tmp_path)
    argv = unlearn_argv(inputs, "--examples", "16", "--checkpoint_every", "2", "--tracker", "tensorboard")
    write = MetricsLog.write

    def write_then_die(self, metrics):
        write(self, metrics)
        if metrics["step"] == 3:
            raise Killed

    monkeypatch.setattr(MetricsLog, "write", write_then_die)
    with pytest.raises(Killed):
        run_command(argv)
    monkeypatch.setattr(MetricsLog, "write", write)
    run_dir = run_command([*argv, "--resume"])
    lines = metrics_lines(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    rows = tensorboard_scalars(run_dir / TENSORBOARD_DIR)
    assert_rows_equal({step: {k: v for k, v in row.items() if not k.startswith("summary/")}
                       for step, row in rows.items()}, lines, rel=1e-6)


# --- lens train and tamper --------------------------------------------------------------------------------


def test_lens_train_tracked_with_wandb(tmp_path, text_corpus, offline_wandb):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "lens"
    run_command(["lens", "train", "--model", str(model), "--corpus", str(text_corpus),
                                      "--steps", "3", "--batch", "4", "--per_device_batch", "4",
                                      "--max_length", "16", "--out", str(out), "--tracker", "wandb"])
    records = wandb_records(out)
    assert_rows_equal(wandb_history(records), metrics_lines(out), rel=1e-12)
    assert wandb_run(records).display_name == "lens" and wandb_config(records)["steps"] == 3
    assert wandb_summary(records)["final_loss"] == metrics_lines(out)[-1]["loss"]


def test_distill_tracked_with_tensorboard(tmp_path):
    inputs = write_unlearn_inputs(tmp_path)
    run_command(unlearn_argv(inputs, "--run_name", "src"))
    out = run_command([
        "distill", "--run", str(inputs / "runs" / "src"), "--corpus", str(inputs / "retain.jsonl"), "--generic",
        str(inputs / "forget.jsonl"), "--max_length", "16", "--batch", "4", "--per_device_batch", "4", "--steps", "4",
        "--eval_every", "2", "--device", "cpu", "--out", str(tmp_path / "distilled"), "--tracker", "tensorboard"])
    rows = tensorboard_scalars(out / TENSORBOARD_DIR)
    curves = {step: {k: v for k, v in row.items() if not k.startswith("summary/")} for step, row in rows.items()}
    assert_rows_equal(curves, metrics_lines(out), rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert rows[4]["summary/recovered"] == pytest.approx(summary["recovered"], rel=1e-6)


CAPITALS = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))


@pytest.fixture
def tamper_argv(tmp_path) -> list[str]:
    """`tamper` of a tiny model on four capital sentences (2 steps of 2), evaluated at every step."""
    model = save_tiny_model(tmp_path / "tiny")
    answers = [a for _, a in CAPITALS]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"the capital of {s} is {a} ."} for s, a in CAPITALS])
    task = write_jsonl(tmp_path / "capitals.jsonl", [{"prompt": f"the capital of {s} is", "question": s,
                                                      "choices": answers, "answer": answers.index(a)}
                                                     for s, a in CAPITALS])
    return ["tamper", "--model", str(model), "--forget", str(corpus), "--eval_tasks", str(task), "--eval_format",
            "cloze", "--max_length", "16", "--batch", "2", "--per_device_batch", "2", "--eval_every", "1"]


def _tamper_rows(out: Path) -> dict[int, dict[str, float]]:
    """What the attack in `out` should have logged: its metrics lines, and every evaluation (step 0, then
    each step) as eval/<task>/<metric> at its step."""
    results = json.loads((out / "results.json").read_text())
    rows = {r["step"]: {f"eval/capitals/{m}": r["tasks"]["capitals"][m] for m in ("acc", "acc_norm")}
            for r in results["records"]}
    assert sorted(rows) == [0, 1, 2]
    for line in metrics_lines(out):
        rows[line["step"]].update(numbers(line))
    return rows


def test_tamper_tracked_with_tensorboard(tmp_path, tamper_argv):
    out = tmp_path / "attack"
    run_command([*tamper_argv, "--out", str(out), "--tracker", "tensorboard"])
    expected = _tamper_rows(out)
    expected[2]["summary/recovery/capitals"] = json.loads((out / "results.json").read_text())["recovery"]["capitals"]
    assert_same_rows(tensorboard_scalars(out / TENSORBOARD_DIR), expected, rel=1e-6)
    assert tensorboard_tags(out / TENSORBOARD_DIR)["images"] == ["plots/tamper"]


def test_tamper_sweep_tracks_each_attack_in_its_folder(tmp_path, tamper_argv, offline_wandb):
    out = tmp_path / "sweep"
    run_command([*tamper_argv, "--lrs", "1e-3,1e-2", "--out", str(out), "--tracker", "wandb"])
    assert not (out / WANDB_DIR).exists()
    for label in ("lr0.001", "lr0.01"):
        records = wandb_records(out / label)
        history = wandb_history(records)
        assert_same_rows({step: {k: v for k, v in row.items() if not k.startswith("plots/")}
                          for step, row in history.items()}, _tamper_rows(out / label), rel=1e-12)
        assert history[2]["plots/tamper/_type"] == "image-file"
        run = wandb_run(records)
        assert (run.display_name, run.run_group) == (f"sweep/{label}", "sweep")


def test_robustness_tracked_with_wandb(tmp_path, offline_wandb, run_files):  # noqa: F811 (the fixture)
    """Every attack's steps in one run (the tracker's step counts all attacks' steps), the summary numbers of
    robustness.json, and its plot."""
    run, generic = run_files["run"], run_files["generic"]
    out = tmp_path / "robust"
    result = run_command([
        "robustness", str(run), "--generic", str(generic), "--benign", str(run_files["benign"]),
        "--kinds", "lora", "--lrs", "1e-2", "--steps", "2", "--batch", "2", "--lora_rank", "2",
        "--fluency_prompts", "0", "--out", str(out), "--tracker", "wandb"])
    records = wandb_records(out)
    history = wandb_history(records)
    attacks = ("grid", "base", "benign", "fictional")  # the grid's one setting, then the three controls
    assert sorted(history) == list(range(1, 2 * len(attacks) + 1))
    for number, role in enumerate(attacks):
        saved = json.loads((out / "seeds" / "seed0" / "attacks" / f"{role}_lora_lr0.01_constant.json").read_text())
        name = f"seed0/{role}_lora_lr0.01_constant"
        first, second = history[2 * number + 1], history[2 * number + 2]
        assert first[f"{name}/step"] == 1 and second[f"{name}/step"] == 2
        assert {k: second[f"{name}/{k}"] for k in ("attacked", "unseen")} == \
            {k: saved["steps"]["2"][k] for k in ("attacked", "unseen")}
    image = {k.removeprefix("plots/robustness/"): v for k, v in history[max(history)].items()
             if k.startswith("plots/robustness/")}  # the plot, at the last step
    assert image["_type"] == "image-file"
    assert image["sha256"] == hashlib.sha256((out / "robustness.png").read_bytes()).hexdigest()
    summary = wandb_summary(records)
    assert summary["headline/unseen"] == result["headline"]["unseen"]
    assert summary["worst_case/2/unseen"] == result["worst_case"]["2"]["unseen"]
    assert summary["perplexity/base"] == result["perplexity"]["base"]


def test_a_resumed_robustness_protocol_continues_its_tracked_steps(tmp_path, monkeypatch,
                                                                  run_files):  # noqa: F811 (the fixture)
    """Killed during its third attack and resumed, the protocol's TensorBoard run holds every step of every
    attack once: the finished attacks' steps are counted, the killed attack's events are dropped."""
    out = tmp_path / "robust"
    argv = ["robustness", str(run_files["run"]), "--generic", str(run_files["generic"]), "--benign",
            str(run_files["benign"]), "--kinds", "lora", "--lrs", "1e-2", "--steps", "2,3", "--batch", "2",
            "--lora_rank", "2", "--fluency_prompts", "0", "--phrasings", "", "--out", str(out),
            "--tracker", "tensorboard"]
    real, started = robustness.Protocol.track, []

    def track_then_die(self, values):
        real(self, values)
        names = {k.rsplit("/", 1)[0] for k in values}
        started.extend(n for n in names if n not in started)
        if len(started) == 3 and values[f"{started[-1]}/step"] == 2:
            raise Killed  # two steps into the third attack (the benign control)

    monkeypatch.setattr(robustness.Protocol, "track", track_then_die)
    with pytest.raises(Killed):
        run_command(argv)
    monkeypatch.setattr(robustness.Protocol, "track", real)
    run_command([*argv, "--resume"])
    rows = tensorboard_scalars(out / TENSORBOARD_DIR)
    attacks = ("grid", "base", "benign", "fictional")
    assert sorted(rows) == list(range(1, 3 * len(attacks) + 1))
    for number, role in enumerate(attacks):
        name = f"seed0/{role}_lora_lr0.01_constant"
        assert [rows[3 * number + k][f"{name}/step"] for k in (1, 2, 3)] == [1, 2, 3]
        saved = json.loads((out / "seeds" / "seed0" / "attacks" / f"{role}_lora_lr0.01_constant.json").read_text())
        assert saved["steps_run"] == 3
        assert rows[3 * number + 3][f"{name}/unseen"] == pytest.approx(saved["steps"]["3"]["unseen"])


# --- bad input, and nothing imported unasked ---------------------------------------------------------------


def test_unknown_tracker_is_one_line(capsys):
    line = one_line(["unlearn", "--tracker", "mlflow"], capsys, status=2)
    assert "--tracker 'mlflow' is not a tracker: choose one of wandb, tensorboard" in line


@pytest.mark.parametrize("tracker,package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_tracker_package_is_one_line_naming_the_extra(tracker, package, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # import and find_spec now see no such package
    line = one_line(["tamper", "--tracker", tracker], capsys, status=2)
    assert line.endswith(f"--tracker {tracker} needs the {package} package: pip install 'lensunlearn[{tracker}]'")


def test_a_tracker_that_fails_to_import_names_the_extra(monkeypatch, tmp_path):
    cfg = TrackingOptions(tracker="tensorboard")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"pip install 'lensunlearn\[tensorboard\]'"):
        open_tracker(cfg, tmp_path, "run", "unlearn")
    with pytest.raises(ConfigError, match="choose one of wandb, tensorboard"):
        TrackingOptions(tracker="WandB")


def test_only_rank_0_tracks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tracker = open_tracker(TrackingOptions(tracker="tensorboard"), tmp_path, "run", "unlearn")
    tracker.log({"step": 1, "loss": 1.0}, 1)
    tracker.close()
    assert type(tracker) is Tracker and not list(tmp_path.iterdir())


def _tracker_module(name: str) -> bool:
    return name.split(".")[0] in ("wandb", "tensorboard") or name.startswith("torch.utils.tensorboard")


def test_no_tracker_module_is_imported_without_the_flag(tmp_path, monkeypatch):
    """No module of the package imports a tracker when it is imported, and a run without --tracker imports
    none on its way."""
    package = Path(lensunlearn.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(_tracker_module(n) for n in names), (path.name, names)
    for name in list(sys.modules):
        if _tracker_module(name):
            monkeypatch.delitem(sys.modules, name)
    inputs = write_unlearn_inputs(tmp_path)
    run_dir = run_command(unlearn_argv(inputs))
    assert (run_dir / "summary.json").is_file()
    assert not [name for name in sys.modules if _tracker_module(name)]
    assert not (run_dir / WANDB_DIR).exists() and not (run_dir / TENSORBOARD_DIR).exists()


# --- tracker settings checked before any model loads; the wandb folder named where it ends up ---------------


@pytest.mark.parametrize("mode, match", [
    ("bogus", r"WANDB_MODE='bogus' is not a wandb mode: set it to one of offline, online"),
    ("online", r"WANDB_MODE=online streams the run to the wandb server, and wandb has no login .*`wandb login`"),
])
def test_a_wandb_mode_that_cannot_start_fails_before_the_model_loads(unlearn_inputs, offline_wandb, monkeypatch,
                                                                     capsys, mode, match):
    """Before: both failed after the model had loaded, with wandb's raw validation message for a bad mode,
    and left a half-written run folder."""
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(unlearn_inputs / "home"))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(unlearn_inputs / "home" / ".netrc"))

    from lensunlearn.unlearning import run as unlearn_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(unlearn_module, "load_model", no_model)
    argv = unlearn_argv(unlearn_inputs, "--tracker", "wandb", "--run_name", "w")
    with pytest.raises(UserError, match=match):
        run_command(argv)
    line = one_line(argv, capsys, status=1)
    assert "WANDB_MODE" in line
    assert not (unlearn_inputs / "runs" / "w").exists()


def test_the_wandb_sync_line_names_the_final_folder_of_a_replaced_run(unlearn_inputs, offline_wandb, caplog):
    """Before: a replaced run's `wandb sync` path pointed into the staging folder, gone once the run is in place."""
    argv = unlearn_argv(unlearn_inputs, "--tracker", "wandb", "--run_name", "synced")
    run_command(argv)
    caplog.clear()
    with caplog.at_level("INFO"):
        run_dir = run_command([*argv, "--overwrite"])
    lines = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(lines) == 1 and ".incoming" not in lines[0]
    folder = Path(lines[0].rsplit("`wandb sync ", 1)[1].rstrip("`"))
    assert folder.parent == run_dir / WANDB_DIR and folder.name.startswith("offline-run-") and folder.is_dir()
    assert wandb_records(run_dir)  # the run's records are in that folder
