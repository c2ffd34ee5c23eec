"""`robustness` checks before it loads a model what it can: its kept tasks' data (lm-eval tasks included)
and a forget task whose answers can make the fictional-facts control."""

from __future__ import annotations

import pytest

from lensunlearn.attack import protocol as robustness
from lensunlearn.cli import console

from ..conftest import write_jsonl
from .test_protocol import _argv, main, run_files  # noqa: F401  (run_files: a fixture, found by name)


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the protocol loaded its models although the input is bad")

    monkeypatch.setattr(robustness, "Protocol", refuse)


def test_kept_lm_eval_tasks_whose_data_cannot_load_fail_before_the_models_load(run_files, no_model, monkeypatch,  # noqa: F811
                                                                               tmp_path):
    """Before: only the names of --kept_tasks were checked; the protocol failed after loading both models."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lensunlearn.data import lm_eval_tasks

    folder = tmp_path / "registry"
    folder.mkdir()
    (folder / "ll_offline.yaml").write_text(
        "task: ll_offline\ndataset_path: lensunlearn-tests/not-cached\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    # lm-eval's registry, holding this one task (its data a hub dataset that is not cached; tests run offline)
    registry = TaskManager(include_path=str(folder), include_defaults=False)
    monkeypatch.setattr(lm_eval_tasks, "task_manager", lambda include_path=None: registry)
    out = run_files["tmp"] / "robust"
    with pytest.raises(FileNotFoundError, match=r"^--kept_tasks: task lm_eval:ll_offline cannot load its data"):
        main(_argv(run_files, out, "--kept_tasks", "lm_eval:ll_offline"))
    assert not out.exists()


def test_a_forget_task_with_too_few_distinct_choices_fails_before_the_models_load(run_files, no_model,  # noqa: F811
                                                                                  capsys):
    """Before: the fictional-facts control failed after both models had loaded and been evaluated."""
    rows = [{"fact_id": f"cap:{s}", "question": f"what is the capital of {s} ?", "prompt": f"the capital of {s} is",
             "choices": ["paris", "rome", "madrid", "paris"], "answer": a}
            for s, a in (("france", 0), ("italy", 1), ("spain", 2), ("germany", 0))]
    task = write_jsonl(run_files["tmp"] / "three_cities.jsonl", rows)
    out = run_files["tmp"] / "robust"
    argv = _argv(run_files, out, "--forget_task", str(task))
    with pytest.raises(ValueError, match=r"--forget_task .*three_cities.jsonl has 3 distinct choices: the "
                                         r"fictional-facts control needs at least 4"):
        main(argv)
    assert console(argv) == 1 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()
