"""`lm_eval:<task>`: tasks of lm-evaluation-harness run by lm-eval itself on the loaded model.

A local YAML task over a jsonl file (so nothing is downloaded) is run through `evaluate` and through
lm-eval's `simple_evaluate` directly on the same tiny random model: the numbers must agree.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from lensunlearn.core.errors import UserError
from lensunlearn.data.lm_eval_tasks import INSTALL_HINT, check_names, split_names, strip_filters
from lensunlearn.eval.evaluate import EvalConfig, evaluate, results_table, run_eval
from tests.conftest import make_tiny_model

lm_eval = pytest.importorskip("lm_eval")

COUNTRIES = (("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"))
CAPITALS = [capital for _, capital in COUNTRIES]


@pytest.fixture(scope="module")
def include_dir(tmp_path_factory):
    """A folder with one lm-eval task, `ll_capitals`, over a local jsonl of 12 questions."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [{"question": f"the capital of {country} is", "choices": CAPITALS, "answer": (i + k) % 4}
            for k in range(3) for i, (country, _) in enumerate(COUNTRIES)]
    data = folder / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "ll_capitals.yaml").write_text(
        f"task: ll_capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def test_results_equal_lm_eval_run_directly(include_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = make_tiny_model("llama", seed=3)
    native = tmp_path / "native.jsonl"
    native.write_text((include_dir / "capitals.jsonl").read_text())
    ours = evaluate(model, tokenizer, ["lm_eval:ll_capitals", str(native)], "cloze", batch_size=4, progress=False,
                    lm_eval_include=include_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=["ll_capitals"], log_samples=False,
                                     task_manager=TaskManager(include_path=str(include_dir), include_defaults=False))
    got, want = ours["results"]["lm_eval:ll_capitals"], theirs["results"]["ll_capitals"]
    assert got["n"] == 12
    for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        assert got[metric] == pytest.approx(want[f"{metric},none"], abs=1e-6), metric
    assert not any("," in key for key in got)  # the filter suffix is stripped
    assert set(ours["results"]) == {"lm_eval:ll_capitals", "native"}  # native tasks still run beside them
    # the same questions with the same cloze prompt: lensunlearn's own scoring gives lm-eval's accuracy
    assert ours["results"]["native"]["acc"] == pytest.approx(got["acc"], abs=1e-6)
    table = results_table(ours)
    assert "| lm_eval:ll_capitals | 12 |" in table


def test_unknown_task_names_close_matches(include_dir):
    with pytest.raises(ValueError, match=r"unknown task lm_eval:ll_capitols.*did you mean lm_eval:ll_capitals"):
        check_names(["ll_capitols"], str(include_dir))


def test_eval_command_refuses_unknown_task_before_loading_the_model(include_dir, tmp_path):
    cfg = EvalConfig(model=str(tmp_path / "no-such-model"), eval_tasks="lm_eval:ll_capitols",
                     lm_eval_include=str(include_dir))
    with pytest.raises(ValueError, match="did you mean lm_eval:ll_capitals"):
        run_eval(cfg)  # a model load would fail with another error: the check ran first
    missing = EvalConfig(model="x", eval_tasks="lm_eval:ll_capitals", lm_eval_include=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="--lm_eval_include"):
        run_eval(missing)


def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'lensunlearn\[lm_eval\]'") as err:
        check_names(["anything"], str(tmp_path))  # a folder not yet indexed: the import is attempted
    assert INSTALL_HINT in str(err.value) and "\n" not in str(err.value)


def test_names_and_metric_keys():
    assert split_names("facts:country_capital, lm_eval:arc_easy,x.jsonl") == (
        ["facts:country_capital", "x.jsonl"], ["arc_easy"])
    with pytest.raises(ValueError, match="names no lm-eval task"):
        split_names(["lm_eval:"])
    assert strip_filters({"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                          "exact_match,strict-match": 1.0, "exact_match,flexible-extract": 0.0}) == {
        "acc": 0.5, "acc_stderr": None, "exact_match,strict-match": 1.0, "exact_match,flexible-extract": 0.0}


def test_preflight_checks_lm_eval_names_beside_native_ones(include_dir):
    from lensunlearn.data.tasks import check_tasks

    specs = check_tasks("facts:country_capital,lm_eval:ll_capitals", lm_eval_include=str(include_dir))
    assert [s.name for s in specs] == ["facts:country_capital"]  # lm-eval loads its own data later
    with pytest.raises(ValueError, match=r"^--eval_tasks: unknown task lm_eval:ll_capitols"):
        check_tasks("facts:country_capital,lm_eval:ll_capitols", lm_eval_include=str(include_dir))


def test_unlearn_evaluates_an_included_lm_eval_task(include_dir, tmp_path):
    """`unlearn --lm_eval_include DIR` finds the user's own lm-eval task, in the check before training
    and in the evaluation after it."""
    from tests.conftest import run_command, unlearn_argv, write_unlearn_inputs

    tmp = write_unlearn_inputs(tmp_path)
    argv = [a for a in unlearn_argv(tmp, "--run_name", "r", "--eval_format", "cloze") if a]
    tasks = argv.index("--eval_tasks")
    argv[tasks + 1:tasks + 1] = ["lm_eval:ll_capitals"]
    with pytest.raises(ValueError, match="unknown task lm_eval:ll_capitals"):  # not in lm-eval's own registry
        run_command(argv)
    run_dir = run_command([*argv, "--lm_eval_include", str(include_dir)])
    result = json.loads((run_dir / "eval.json").read_text())["results"]["lm_eval:ll_capitals"]
    assert result["n"] == 12 and 0 <= result["acc"] <= 1


def test_a_malformed_include_yaml_is_named_not_reported_as_an_unknown_task(include_dir, tmp_path):
    """Before: lm-eval skipped the file it could not parse, and the task was reported as "no such task"."""
    from lensunlearn.data.tasks import check_tasks

    broken = tmp_path / "broken"
    broken.mkdir()
    text = (include_dir / "ll_capitals.yaml").read_text().replace("task: ll_capitals", "task: ll_broken")
    (broken / "ll_broken.yaml").write_text(text.replace("doc_to_target: answer", "doc_to_target: [answer"))
    (broken / "uses_a_function.yaml").write_text("task: ll_other\nprocess_docs: !function utils.process\n")
    with pytest.raises(ValueError, match=r"^--eval_tasks: unknown task lm_eval:ll_broken: .*ll_broken.yaml in "
                                         r"--lm_eval_include .* is not valid YAML \(line \d+: .*\), so lm-eval skipped "
                                         r"it .*: fix the file$"):
        check_tasks("lm_eval:ll_broken", lm_eval_include=str(broken))


def test_an_lm_eval_task_whose_data_cannot_load_is_refused_by_the_check(include_dir, tmp_path):
    """The check before compute loads an lm-eval task's data, as it does a native task's: offline, a hub
    dataset that is not cached fails there, naming the task."""
    from lensunlearn.data.tasks import check_tasks

    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "ll_hub.yaml").write_text((include_dir / "ll_capitals.yaml").read_text().replace(
        "task: ll_capitals", "task: ll_hub").replace("dataset_path: json", "dataset_path: lensunlearn-tests/absent"))
    with pytest.raises(FileNotFoundError, match=r"^--kept_tasks: task lm_eval:ll_hub cannot load its data "
                                                r"\(.*absent.*\): go online once"):
        check_tasks(["lm_eval:ll_hub"], "--kept_tasks", lm_eval_include=str(folder))
    check_tasks(["lm_eval:ll_capitals"], lm_eval_include=str(include_dir))  # local data loads: no error
