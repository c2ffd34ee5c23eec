"""Scoring, metrics, task loading, bad input, the knowledge profile and the `eval` command, on tiny models."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lensunlearn.data import facts
from lensunlearn.data.tasks import GROUPS, HUB_TASKS, build_request, resolve_tasks
from lensunlearn.eval.evaluate import (
    Encoded,
    EvalConfig,
    context_limit,
    encode_request,
    evaluate,
    group_metrics,
    mean_stderr,
    pooled_stderr,
    results_table,
    score_all,
)

BPE_CORPUS = ["The capital of France is Paris.", "Question: What is the chemical symbol for gold?\nAnswer: Au",
              "A. Paris\nB. Rome\nC. Berlin\nD. Madrid\nAnswer: A B C D",
              "The following are multiple choice questions (with answers) about biology.",
              "The chemical symbol for hydrogen is H. Washington is the capital of the United States."]


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (spaces kept, like GPT-2's), trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(BPE_CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def tiny_lm(arch: str = "llama", vocab_size: int = 320, layers: int = 3, seed: int = 0):
    """A tiny random causal LM of the named architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    ids = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=layers, n_head=4, n_positions=256, **ids)
    else:
        sizes = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=256, **ids)
        extra = {"num_key_value_heads": 2} if arch == "llama" else {}
        config = AutoConfig.for_model(arch, **sizes, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


EDGE_ITEMS = [
    {"question": "  Which city is the capital of Italy?  ", "choices": ["Rome", "Milan", "New York City", "Turin"],
     "answer": 0},
    {"question": "Symbol?", "choices": ["Au", "Ag", "Fe", "Cu"], "answer": 2, "prompt": "The symbol for iron is "},
    {"question": "Unicode", "choices": ["Brasília", "Bogotá", "Asunción", "Malé"], "answer": 1,
     "prompt": "The capital of Colombia is"},
]


def local_items(n: int = 24) -> list[dict]:
    return facts.questions("element_symbol")[:n] + EDGE_ITEMS


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def llama(bpe):
    return tiny_lm("llama", len(bpe))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def naive_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
    return sum(logprobs[len(context) - 1 + k, t].item() for k, t in enumerate(continuation))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_packed_scoring_equals_one_row_per_choice(bpe, arch, fmt):
    model = tiny_lm(arch, len(bpe))
    encoded = [encode_request(bpe, *build_request(item, fmt)[:2]) for item in local_items(6)]
    packed, _ = score_all(model, encoded, bpe.pad_token_id, batch_size=4, progress=False)
    for enc, lls in zip(encoded, packed):
        expected = [naive_loglikelihood(model, enc.context, c) for c in enc.continuations]
        np.testing.assert_allclose(lls, expected, atol=1e-5)


@pytest.mark.parametrize("with_lens", [False, True])
def test_long_questions_lose_tokens_from_the_left_as_lm_eval_does(bpe, llama, with_lens):
    from lensunlearn.lens.tuned_lens import TunedLens

    limit = 12  # three of these five questions fit, two do not
    encoded = [encode_request(bpe, *build_request(item, "cloze")[:2]) for item in local_items(6)]
    fits = [all(len(e.context) + len(c) <= limit + 1 for c in e.continuations) for e in encoded]
    assert any(fits) and not all(fits)
    lens = TunedLens.from_model(llama) if with_lens else None
    finals, layers = score_all(llama, encoded, bpe.pad_token_id, batch_size=4, lens=lens, progress=False,
                               max_length=limit)
    for enc, lls in zip(encoded, finals):  # lm-eval: the last limit + 1 tokens of context + continuation
        kept = [(enc.context + cont)[-(limit + 1):] for cont in enc.continuations]
        expected = [naive_loglikelihood(llama, seq[:len(seq) - len(cont)], cont)
                    for seq, cont in zip(kept, enc.continuations)]
        np.testing.assert_allclose(lls, expected, atol=1e-5)
    if with_lens:  # each layer's scores come back in choice order, as if each choice were scored alone
        for enc, per_layer in zip(encoded, layers):
            assert per_layer.shape == (llama.config.num_hidden_layers, len(enc.continuations))
            for choice, cont in enumerate(enc.continuations):
                seq = (enc.context + cont)[-(limit + 1):]
                _, alone = score_all(llama, [Encoded(seq[:len(seq) - len(cont)], [cont])], bpe.pad_token_id,
                                     lens=lens, progress=False)
                np.testing.assert_allclose(per_layer[:, choice], alone[0][:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="does not fit the context limit"):
        score_all(llama, [Encoded([1, 2, 3], [[4, 5], [6]])], bpe.pad_token_id, progress=False, max_length=1)


def test_context_limit_is_resolved_as_lm_eval_does(bpe):
    import copy

    assert context_limit(tiny_lm("llama", len(bpe)), bpe) == 256  # max_position_embeddings
    assert context_limit(tiny_lm("gpt2", len(bpe)), bpe) == 256  # n_positions
    tokenizer = copy.deepcopy(bpe)
    assert context_limit(object(), tokenizer) == 2048  # no config, tokenizer without a limit: lm-eval's default
    tokenizer.model_max_length = 512
    assert context_limit(object(), tokenizer) == 512


def test_encoding_moves_trailing_space_to_the_continuation(bpe):
    enc = encode_request(bpe, "The symbol for iron is ", [" Fe", " Au"])
    assert enc.context == bpe.encode("The symbol for iron is")
    assert enc.continuations[0] == bpe.encode("The symbol for iron is  Fe")[len(enc.context):]


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_batch_sizes_1_and_16_agree(tmp_path, bpe, llama, fmt):
    task = write_jsonl(tmp_path / "local.jsonl", local_items())
    runs = []
    for batch_size in (1, 16):
        preds = tmp_path / f"p{batch_size}.jsonl"
        out = evaluate(llama, bpe, [str(task)], fmt, batch_size=batch_size, predictions_path=preds, progress=False)
        runs.append((out, [json.loads(line) for line in preds.read_text().splitlines()]))
    (a, pa), (b, pb) = runs
    assert a["results"] == b["results"]
    assert [r["pred"] for r in pa] == [r["pred"] for r in pb]
    np.testing.assert_allclose([r["loglikelihoods"] for r in pa], [r["loglikelihoods"] for r in pb], atol=1e-5)


def test_metrics_match_lm_eval_formulas():
    values = [1.0, 0.0, 1.0, 1.0]
    assert mean_stderr(values) == pytest.approx(np.std(values, ddof=1) / 2)
    assert mean_stderr([1.0]) is None
    results = {"a": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.5, "acc_norm_stderr": 0.1, "n": 10},
               "b": {"acc": 1.0, "acc_stderr": 0.0, "acc_norm": 0.0, "acc_norm_stderr": 0.0, "n": 30}}
    group = group_metrics(results, ["a", "b"])
    assert group["acc"] == pytest.approx((0.5 * 10 + 30) / 40) and group["n"] == 40
    assert group["acc_stderr"] == pytest.approx(math.sqrt((9 * 0.01 * 10) / 38 / 40))
    assert pooled_stderr([0.1, None], [10, 30]) is None


def test_hub_tasks_load_through_datasets_with_the_exact_names(bpe, llama):
    calls = []
    biology = facts.questions("country_capital")

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return biology[len(calls):len(calls) + 3]

    out = evaluate(llama, bpe, "wmdp_bio_robust,wmdp_bio,mmlu_stem", "letter", dataset_loader=fake_load_dataset,
                   progress=False)
    robust = [c for c in calls if c[0] == "EleutherAI/wmdp_bio_robust_mcqa"]
    assert [c[1] for c in robust] == ["bioweapons_and_bioterrorism", "dual_use_virology",
                                      "enhanced_potential_pandemic_pathogens", "expanding_access_to_threat_vectors",
                                      "reverse_genetics_and_easy_editing", "viral_vector_research"]
    assert all(c[2] == "robust" for c in robust)
    assert ("cais/wmdp", "wmdp-bio", "test") in calls
    assert ("cais/mmlu", "anatomy", "test") in calls and len([c for c in calls if c[0] == "cais/mmlu"]) == 19
    assert out["groups"]["wmdp_bio_robust"]["n"] == 18 and out["groups"]["mmlu_stem"]["n"] == 57
    assert len(GROUPS["mmlu"]) == 57 and set(GROUPS["mmlu_stem"]) <= set(GROUPS["mmlu"])


def test_prompts_are_lm_evals():
    item = {"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1}
    description = HUB_TASKS["mmlu_college_biology"].description("letter")
    assert description == "The following are multiple choice questions (with answers) about college biology.\n\n"
    context, conts, choices = build_request(item, "letter", description)
    assert context == description + "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert conts == [" A", " B", " C", " D"] and choices == ["A", "B", "C", "D"]
    context, conts, _ = build_request(item, "cloze", "")
    assert context == "Question: What is 2+2?\nAnswer:" and conts == [" 3", " 4", " 5", " 6"]
    context, conts, _ = build_request({**item, "prompt": "2+2 ="}, "cloze")
    assert context == "2+2 =" and conts[1] == " 4"
    assert HUB_TASKS["wmdp_bio"].description("letter") == (
        "The following are multiple choice questions (with answers) about biology.\n\n")


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q", "choices": ["a", "b", "c"], "answer": 0}], "3 choices"),
    ([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}], "out of range"),
    ([{"question": "q", "choices": ["a", "b", "c", "d"]}], "lacks fields"),
    ([], "is empty"),
])
def test_bad_input_gets_a_clear_error(tmp_path, bpe, llama, rows, message):
    task = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        evaluate(llama, bpe, [str(task)], "cloze", progress=False)


def test_unknown_task_and_missing_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'wmdp_chemistry'"):
        resolve_tasks("wmdp_chemistry")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_tasks(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown fact domain"):
        resolve_tasks("facts:rivers")
    with pytest.raises(ValueError, match=r"^'none' is not a task: write an empty list \(''\) where a command may "):
        resolve_tasks("none")
    with pytest.raises(ValueError, match="given twice"):
        resolve_tasks("mmlu,mmlu_anatomy")


def test_knowledge_profile_with_a_lens(tmp_path, bpe, llama):
    from lensunlearn.lens.tuned_lens import TunedLens
    from lensunlearn.report.plots import plot_profile

    lens = TunedLens.from_model(llama)
    out = evaluate(llama, bpe, "facts:element_symbol", "cloze", limit=10, lens=lens, progress=False)
    profile = out["profile"]
    assert profile["layers"] == [0, 1, 2]
    accs = profile["tasks"]["facts:element_symbol"]["acc"]
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    png = plot_profile(profile, tmp_path / "profile.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "knowledge profile" in results_table(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lens_scores_read_stream_l_at_the_answer_positions(bpe, arch):
    """Layer l's answer log-likelihood is lens(hidden_states[l], l) at the positions that predict the answer."""
    from lensunlearn.lens.tuned_lens import TunedLens

    model = tiny_lm(arch, len(bpe))
    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for translator in lens.translators:  # a non-trivial lens, so each layer differs
            translator.weight.normal_(0, 0.05)
    encoded = [encode_request(bpe, *build_request(item, "cloze")[:2]) for item in local_items(3)]
    _, per_layer = score_all(model, encoded, bpe.pad_token_id, batch_size=2, lens=lens, progress=False)
    for enc, got in zip(encoded, per_layer):
        assert got.shape == (3, 4)
        for choice, cont in enumerate(enc.continuations):
            ids = torch.tensor([enc.context + cont])[:, :-1]
            with torch.no_grad():
                hidden = model(ids, output_hidden_states=True).hidden_states
                for layer in range(3):
                    logprobs = torch.log_softmax(lens(hidden[layer][0], layer), -1)
                    want = sum(logprobs[len(enc.context) - 1 + k, t].item() for k, t in enumerate(cont))
                    assert got[layer, choice] == pytest.approx(want, abs=1e-4)


def test_eval_command_writes_json_and_predictions(tmp_path, bpe, llama, monkeypatch):
    import importlib.metadata
    import sys

    model_dir = tmp_path / "tiny"
    llama.save_pretrained(model_dir)
    bpe.save_pretrained(model_dir)
    task = write_jsonl(tmp_path / "mytask.jsonl", local_items(8))
    out = tmp_path / "res" / "eval.json"
    from lensunlearn.lens.tuned_lens import TunedLens

    TunedLens.from_model(llama).save(tmp_path / "lens")
    # Through the installed `lensunlearn` command, whose return value becomes the exit status.
    monkeypatch.setattr(sys, "argv", [
        "lensunlearn", "eval", "--model", str(model_dir), "--eval_tasks", f"{task},facts:us_state_capital",
        "--eval_format", "cloze", "--eval_limit", "5", "--eval_batch", "3", "--out", str(out),
        "--lens", str(tmp_path / "lens")])
    (command,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "lensunlearn"]
    assert command.load()() == 0
    data = json.loads(out.read_text())
    assert len(data["profile"]["tasks"]["mytask"]["acc"]) == 3
    assert (tmp_path / "res" / "eval.profile.png").read_bytes()[:4] == b"\x89PNG"
    assert data["format"] == "cloze" and data["model"] == str(model_dir)
    assert set(data["results"]) == {"mytask", "facts:us_state_capital"}
    for entry in data["results"].values():
        assert set(entry) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"} and entry["n"] == 5
    rows = [json.loads(line) for line in (tmp_path / "res" / "eval.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {"task", "gold", "pred", "loglikelihoods"} <= set(rows[0])


def test_config_is_validated():
    from lensunlearn.core.config import ConfigError

    with pytest.raises(ConfigError, match="--eval_format"):
        EvalConfig(eval_format="essay")
    with pytest.raises(ConfigError, match="--eval_batch"):
        EvalConfig(eval_batch=0)
    assert EvalConfig(eval_tasks="a.jsonl,mmlu").eval_tasks == ("a.jsonl", "mmlu")


@pytest.mark.slow
def test_embedded_model_knows_country_capitals():
    from lensunlearn.modeling.loading import load_model

    model, tokenizer = load_model("smollm2-135m", "float32", "cpu")
    out = evaluate(model, tokenizer, "facts:country_capital", "cloze", batch_size=16, limit=40, progress=False)
    assert out["results"]["facts:country_capital"]["acc"] >= 0.75
