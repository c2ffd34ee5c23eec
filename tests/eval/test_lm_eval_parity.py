"""Parity with lm-evaluation-harness itself: same per-question log-likelihoods (1e-4) and accuracies.

lm-eval runs offline on a tiny random Llama through its HF backend, with its own task templates
(`include:` of its wmdp and mmlu-continuation yaml) pointed at local copies (`dataset_path: json`).
Ours runs the hub task names, with `datasets.load_dataset` replaced by the same local rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from lensunlearn.eval.evaluate import evaluate
from tests.eval.test_evaluate import local_items, tiny_bpe_tokenizer, tiny_lm

lm_eval = pytest.importorskip("lm_eval")

METRICS = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _task_yamls(folder: Path, data: Path, prompted: Path) -> None:
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    local = (f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files: {data}\ntest_split: train\n"
             f"fewshot_split: null\n")
    (folder / "p_wmdp_bio.yaml").write_text(
        f"include: {tasks_dir / 'wmdp' / '_default_template_yaml'}\ntask: p_wmdp_bio\n{local}"
        'description: "The following are multiple choice questions (with answers) about biology.\\n\\n"\n' + METRICS)
    (folder / "p_mmlu_anatomy_cloze.yaml").write_text(
        f"include: {tasks_dir / 'mmlu' / 'continuation' / '_continuation_template_yaml'}\n"
        f"task: p_mmlu_anatomy_cloze\n{local}"
        'description: "The following are questions (with answers) about anatomy.\\n\\n"\n' + METRICS)
    (folder / "p_prompted_cloze.yaml").write_text(
        f"task: p_prompted_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files: {prompted}\n"
        "test_split: train\noutput_type: multiple_choice\n"
        'doc_to_text: "{% if prompt %}{{prompt}}{% else %}Question: {{question.strip()}}\\nAnswer:{% endif %}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n' + METRICS)


def _lm_eval_lls(samples: list[dict]) -> list[list[float]]:
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [[r[0] for r in s["filtered_resps"]] for s in ordered]


def test_loglikelihoods_and_accuracies_match_lm_eval(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer = tiny_bpe_tokenizer()
    model = tiny_lm("llama", len(tokenizer), seed=1)
    plain = [{k: v for k, v in item.items() if k != "prompt"} for item in local_items(30)]
    prompted = local_items(30)
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in plain))
    prompted_file = tmp_path / "prompted.jsonl"
    prompted_file.write_text("".join(json.dumps(r) + "\n" for r in prompted))
    _task_yamls(tmp_path, data, prompted_file)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    theirs = lm_eval.simple_evaluate(
        model=lm, tasks=["p_wmdp_bio", "p_mmlu_anatomy_cloze", "p_prompted_cloze"], num_fewshot=0,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True)

    def local_copy(path, name=None, split=None, **kwargs):
        assert (path, name, split) in {("cais/wmdp", "wmdp-bio", "test"), ("cais/mmlu", "anatomy", "test")}
        return plain

    cases = [("p_wmdp_bio", "wmdp_bio", "letter"), ("p_mmlu_anatomy_cloze", "mmlu_anatomy", "cloze"),
             ("p_prompted_cloze", str(prompted_file), "cloze")]
    for their_name, our_task, fmt in cases:
        preds = tmp_path / f"{their_name}.jsonl"
        ours = evaluate(model, tokenizer, [our_task], fmt, batch_size=16, dataset_loader=local_copy,
                        predictions_path=preds, progress=False)
        our_lls = [json.loads(line)["loglikelihoods"] for line in preds.read_text().splitlines()]
        their_lls = _lm_eval_lls(theirs["samples"][their_name])
        np.testing.assert_allclose(our_lls, their_lls, atol=1e-4, rtol=0, err_msg=f"{their_name} ({fmt})")
        result = next(iter(ours["results"].values()))
        their_result = theirs["results"][their_name]
        assert result["n"] == len(their_lls)
        for metric in ("acc", "acc_norm"):
            assert result[metric] == their_result[f"{metric},none"], (their_name, metric)
            assert result[f"{metric}_stderr"] == pytest.approx(their_result[f"{metric}_stderr,none"], abs=1e-9)


def test_left_truncation_of_long_questions_matches_lm_eval(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer = tiny_bpe_tokenizer()
    model = tiny_lm("llama", len(tokenizer), seed=2)
    prompted = tmp_path / "prompted.jsonl"
    prompted.write_text("".join(json.dumps(r) + "\n" for r in local_items(12)))
    _task_yamls(tmp_path, prompted, prompted)
    limit = 12  # most questions here are longer; the longest answer is 12 tokens
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu", max_length=limit)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=["p_prompted_cloze"], num_fewshot=0, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    preds = tmp_path / "ours.jsonl"
    ours = evaluate(model, tokenizer, [str(prompted)], "cloze", predictions_path=preds, progress=False,
                    max_length=limit)
    our_lls = [json.loads(line)["loglikelihoods"] for line in preds.read_text().splitlines()]
    np.testing.assert_allclose(our_lls, _lm_eval_lls(theirs["samples"]["p_prompted_cloze"]), atol=1e-4, rtol=0)
    assert ours["max_length"] == limit
    full = tmp_path / "full.jsonl"  # without a limit (the model's 256 tokens) nothing is cut
    result = evaluate(model, tokenizer, [str(prompted)], "cloze", predictions_path=full, progress=False)
    assert result["max_length"] == 256
    full_lls = [json.loads(line)["loglikelihoods"] for line in full.read_text().splitlines()]
    assert not np.allclose(full_lls, our_lls, atol=1e-4)  # so the limit did cut context
