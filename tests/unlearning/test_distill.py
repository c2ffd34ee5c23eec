"""`lensunlearn distill` on tiny models: the perturbation, the KL, stopping, resume, bad input, and the
grid search over distillation settings (`search --stage distill`)."""

from __future__ import annotations

import copy
import itertools
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lensunlearn.cli import console
from lensunlearn.core.config import ConfigError, read_config_file
from lensunlearn.core.paths import read_marker
from lensunlearn.data.corpora import collate, tokenize
from lensunlearn.modeling.layers import model_parts
from lensunlearn.modeling.loading import load_tokenizer
from lensunlearn.search import run as search
from lensunlearn.unlearning import distill as distill_module
from lensunlearn.unlearning.distill import (
    SAVED_KEYS,
    DistillConfig,
    HeldoutScorer,
    distill_kl,
    generate_documents,
    heldout_scores,
    padded_groups,
    perturbation_noise,
    predicting_positions,
    shrink_perturb,
)

from ..conftest import make_tiny_model, record_calls, run_command, unlearn_argv, write_jsonl, write_unlearn_inputs

# Documents in the tiny vocabulary with a pattern a small model learns in a few dozen steps
# (each word is followed by the word three places on), so that the teacher is better than chance
# and a perturbed copy of it has something to recover.
WORDS = ("the capital of is and a an in on at to it was for with as by this that from paris berlin rome madrid "
         "france germany italy spain element symbol gold iron oxygen question answer").split()
TEXTS = [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 5)) for i in range(40)]


def _pretrain(model_dir: Path) -> None:
    """Train the saved tiny model on TEXTS for a few dozen steps, in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    batch = collate(tokenize(TEXTS, tokenizer, 32), tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished unlearning run (2 LoRA steps) of a tiny Llama that knows the pattern of TEXTS, evaluated
    on a two-question local task; its folder also holds the corpus and the held-out text."""
    tmp = write_unlearn_inputs(tmp_path_factory.mktemp("distill"))
    _pretrain(tmp / "tiny")
    write_jsonl(tmp / "text.jsonl", [{"text": t} for t in TEXTS[:32]])
    write_jsonl(tmp / "heldout.jsonl", [{"text": t} for t in TEXTS[32:]])
    write_jsonl(tmp / "task.jsonl", [{"question": f"the capital of {c} is", "answer": a,
                                      "choices": ["paris", "rome", "madrid", "berlin"]}
                                     for c, a in (("france", 0), ("italy", 1))])
    argv = unlearn_argv(tmp, "--run_name", "src", "--eval_base")
    argv[argv.index("--eval_tasks") + 1] = str(tmp / "task.jsonl")
    run_command([*argv, "--eval_format", "cloze"])
    return tmp


def _argv(tmp: Path, *extra: str) -> list[str]:
    return ["distill", "--run", str(tmp / "runs" / "src"), "--corpus", str(tmp / "text.jsonl"), "--generic",
            str(tmp / "heldout.jsonl"), "--max_length", "16", "--batch", "8", "--per_device_batch", "4", "--lr",
            "1e-2", "--warmup", "0", "--alpha", "0.3", "--device", "cpu", "--out", str(tmp / "distilled"), *extra]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- shrink and perturb -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2 ties its unembedding to the embedding
def test_shrink_perturb_is_the_formula_with_seeded_xavier_noise(arch):
    teacher, _ = make_tiny_model(arch)
    alpha, beta = 0.3, 0.5
    student = shrink_perturb(copy.deepcopy(teacher), alpha, beta, seed=7)
    noise = perturbation_noise(teacher, seed=7)
    originals = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        torch.testing.assert_close(param, (1 - alpha) * originals[name] + alpha * beta * noise[name])
        if param.ndim == 1:  # norm gains and biases are only shrunk
            assert not noise[name].any(), name
        else:  # a fresh Xavier-uniform initialisation: inside its bound, and not nothing
            bound = (6 / (param.shape[0] + param.shape[1])) ** 0.5
            assert noise[name].abs().max() <= bound and noise[name].std() > bound / 4, name
            assert not torch.allclose(param, (1 - alpha) * originals[name]), name
    if arch == "gpt2":
        assert student.lm_head.weight is student.transformer.wte.weight  # still tied, perturbed once
    other = shrink_perturb(copy.deepcopy(teacher), alpha, beta, seed=8)
    assert not torch.equal(other.model.embed_tokens.weight if arch == "llama" else other.transformer.wte.weight,
                           student.model.embed_tokens.weight if arch == "llama" else student.transformer.wte.weight)


def test_alpha_zero_keeps_the_weights_and_alpha_one_is_the_noise():
    teacher, _ = make_tiny_model("llama")
    kept = shrink_perturb(copy.deepcopy(teacher), 0.0, 0.5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(kept.parameters(), teacher.parameters()))
    fresh = shrink_perturb(copy.deepcopy(teacher), 1.0, 1.0, seed=1)
    noise = perturbation_noise(teacher, seed=1)
    assert all(torch.equal(p, noise[name]) for name, p in fresh.named_parameters())


# --- the KL -------------------------------------------------------------------------------------


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    return collate(tokenize(TEXTS[:6], tokenizer, 16), tokenizer.pad_token_id)


def test_kl_is_zero_for_identical_models_and_the_full_vocabulary_kl_in_chunks():
    teacher, tokenizer = make_tiny_model("llama")
    batch = _batch(tokenizer)
    total, count = distill_kl(copy.deepcopy(teacher), teacher, batch, chunk=5)
    assert total.item() == 0.0 and count == (batch["attention_mask"].sum(1) - 1).sum()

    student = shrink_perturb(copy.deepcopy(teacher), 0.5, 0.5, seed=0)
    total, count = distill_kl(student, teacher, batch, chunk=5)  # 5 tokens per chunk: many chunks
    (total / count).backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # direct: the whole [batch, length, vocabulary] logits, KL(teacher || student) at every position with a next token
    with torch.no_grad():
        target = F.log_softmax(teacher(**batch).logits, dim=-1)
    logp = F.log_softmax(student(**batch).logits, dim=-1)
    predicts = predicting_positions(batch["attention_mask"]).bool()
    direct = (target.exp() * (target - logp)).sum(-1)[predicts].mean()
    direct.backward()
    assert direct.item() > 0.01
    torch.testing.assert_close(total / count, direct)
    for name, param in student.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_length_groups_give_the_one_padded_batch_kl_and_gradients():
    """Distillation pads each micro-batch by length groups; the loss and gradients are those of one padded
    batch, whose padding is most of it when short sentences meet long prose."""
    teacher, tokenizer = make_tiny_model("llama")
    docs = tokenize(TEXTS[:6], tokenizer, 32)
    docs[2] = docs[2] * 3  # one long document among short ones
    docs[5] = docs[5][:3]
    groups = padded_groups(docs, tokenizer.pad_token_id)
    assert len(groups) > 1
    assert sum(int(g["attention_mask"].numel()) for g in groups) < collate(docs, tokenizer.pad_token_id)[
        "attention_mask"].numel()
    student = shrink_perturb(copy.deepcopy(teacher), 0.5, 0.5, seed=0)
    results = []
    for batch in (collate(docs, tokenizer.pad_token_id), groups):
        total, count = distill_kl(student, teacher, batch, chunk=5)
        (total / count).backward()
        results.append((total.detach(), int(count), {n: p.grad.clone() for n, p in student.named_parameters()}))
        student.zero_grad()
    (padded, padded_count, padded_grads), (grouped, grouped_count, grouped_grads) = results
    assert padded_count == grouped_count == sum(len(d) - 1 for d in docs)
    assert padded.item() > 0.01
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_heldout_scores_are_cross_entropy_and_kl():
    teacher, tokenizer = make_tiny_model("llama")
    student = shrink_perturb(copy.deepcopy(teacher), 0.5, 0.5, seed=0).train()
    docs = tokenize(TEXTS[:5], tokenizer, 16)
    scores = heldout_scores(student, teacher, docs, tokenizer.pad_token_id, batch_size=2, chunk=7)
    batch = collate(docs, tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ce = student(**batch, labels=labels).loss.item()  # mean over the same predicted tokens
        teacher_ce = teacher(**batch, labels=labels).loss.item()
    assert student.training  # its mode is put back
    assert scores["heldout_ce"] == pytest.approx(ce, rel=1e-5)
    assert scores["teacher_heldout_ce"] == pytest.approx(teacher_ce, rel=1e-5)
    total, count = distill_kl(student, teacher, batch)
    assert scores["heldout_kl"] == pytest.approx((total / count).item(), rel=1e-5)


def test_heldout_scorer_runs_the_teacher_once_and_scores_as_a_fresh_one():
    teacher, tokenizer = make_tiny_model("llama")
    student = shrink_perturb(copy.deepcopy(teacher), 0.5, 0.5, seed=0).train()
    docs = tokenize(TEXTS[:5], tokenizer, 16)
    calls = []
    model_parts(teacher).blocks[0].register_forward_hook(lambda *_: calls.append(1))
    scorer = HeldoutScorer(teacher, docs, tokenizer.pad_token_id, batch_size=2, chunk=7)
    assert len(calls) == 3  # one forward per batch of two documents, here and never again
    first = scorer(student)
    with torch.no_grad():  # the student moves between two scores, as in training
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    second = scorer(student)
    assert len(calls) == 3
    assert second["heldout_ce"] != pytest.approx(first["heldout_ce"], rel=1e-4)
    fresh = heldout_scores(student, teacher, docs, tokenizer.pad_token_id, batch_size=2, chunk=7)
    assert second == pytest.approx(fresh, rel=1e-6)
    assert second["teacher_heldout_ce"] == pytest.approx(first["teacher_heldout_ce"], rel=1e-6)


# --- the command --------------------------------------------------------------------------------


def test_distillation_lowers_the_kl_and_writes_a_run_the_other_commands_read(source):
    out = run_command(_argv(source, "--steps", "8", "--eval_every", "4", "--run_name", "d"))
    assert out == source / "distilled" / "d" and read_marker(out) == "distill"
    for name in ("merged/config.json", "merged/tokenizer.json", "run_config.json", "metrics.jsonl", "summary.json",
                 "eval.json", "base_eval.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint.pt").exists()
    lines = _metrics(out)
    curve = [line for line in lines if "heldout_kl" in line]
    assert [line["step"] for line in curve] == [0, 4, 8]
    assert curve[-1]["heldout_kl"] < 0.5 * curve[0]["heldout_kl"]  # the student moved towards the teacher
    assert curve[-1]["heldout_ce"] < curve[0]["heldout_ce"] and curve[-1]["recovered"] > 0.3
    assert all("eval/task/acc" in line for line in curve)  # the source run's task, evaluated along the way
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["stop_reason"] == "steps" and summary["alpha"] == 0.3
    assert summary["source_run"] == str((source / "runs" / "src").resolve())
    assert [p["step"] for p in summary["budget_curve"]] == [0, 4, 8]
    teacher = json.loads((source / "runs" / "src" / "eval.json").read_text())["results"]["task"]
    assert summary["teacher_eval"]["eval/task/acc"] == teacher["acc"]

    # the output reads as an unlearning run: tamper, robustness and report find what they need
    from lensunlearn.attack.protocol import RobustnessConfig
    from lensunlearn.attack.protocol import resolve as resolve_robustness
    from lensunlearn.attack.tamper import TamperConfig, model_path, resolve_defaults
    from lensunlearn.report.command import load_run

    config = json.loads((out / "run_config.json").read_text())
    assert config["model"] == str(source / "tiny") and config["forget"] == str(source / "forget.jsonl")
    again = read_config_file(DistillConfig, out / "run_config.json", SAVED_KEYS)  # `distill --config` reads it back
    assert again["alpha"] == 0.3 and again["eval_tasks"] == str(source / "task.jsonl")
    tamper = resolve_defaults(TamperConfig(run=str(out)))
    assert model_path(str(out)) == str(out / "merged") and tamper.forget == config["forget"]
    assert tamper.eval_tasks == str(source / "task.jsonl") and tamper.eval_format == "cloze"
    robustness = resolve_robustness(RobustnessConfig(run=str(out), forget_task=str(source / "task.jsonl")))
    assert robustness.model == str(source / "tiny") and robustness.eval_format == "cloze"
    run = load_run(out)
    assert run.eval["results"]["task"]["n"] == 2 and [e["step"] for e in run.evals] == [0, 4, 8]


def test_target_share_stops_early_and_says_why(source):
    out = run_command(_argv(source, "--steps", "40", "--eval_every", "2", "--target_share", "0.4",
                                      "--run_name", "early", "--eval_tasks", ""))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "target_share" and 0 < summary["steps"] < 40
    assert summary["recovered"] >= 0.4
    init, teacher, final = summary["heldout_ce_init"], summary["heldout_ce_teacher"], summary["heldout_ce"]
    assert summary["recovered"] == pytest.approx((init - final) / (init - teacher))
    before = [p for p in summary["budget_curve"] if 0 < p["step"] < summary["steps"]]
    assert before and all(p["recovered"] < 0.4 for p in before)  # it stopped at the first step that reached it
    assert not (out / "eval.json").exists()
    # the stop step's held-out numbers are measured and written once, on the final line
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [line for line in lines if line["step"] == summary["steps"] and "recovered" in line]
    assert len(measured) == 1 and measured[0]["recovered"] == summary["recovered"]


def test_stop_within_stops_once_the_student_is_that_close_to_the_teacher_and_counts_its_tokens(source):
    """The paper's rule: (CE_student - CE_teacher) / CE_teacher < the share, checked every --eval_every steps
    (the paper's 5 % is out of reach of this tiny teacher, which knows its text by heart: here 2, twice the
    teacher's); the summary and the budget curve give the tokens distilled on."""
    out = run_command(_argv(source, "--steps", "40", "--eval_every", "2", "--stop_within", "2",
                            "--run_name", "within", "--eval_tasks", ""))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "stop_within" and 0 < summary["steps"] < 40
    teacher = summary["heldout_ce_teacher"]
    assert (summary["heldout_ce"] - teacher) / teacher < 2
    assert summary["excess_over_teacher"] == pytest.approx(summary["heldout_ce"] / teacher - 1)
    before = [p for p in summary["budget_curve"] if 0 <= p["step"] < summary["steps"]]
    assert before and all((p["heldout_ce"] - p["teacher_heldout_ce"]) / p["teacher_heldout_ce"] >= 2
                          for p in before)  # the first measured step within the share is where it stopped
    steps = [line for line in _metrics(out) if "kl" in line]
    assert len(steps) == summary["steps"] and summary["tokens"] == sum(line["tokens"] for line in steps) > 0
    assert summary["budget_curve"][0]["tokens"] == 0 and summary["budget_curve"][-1]["tokens"] == summary["tokens"]
    assert summary["beta"] == 0.0  # the paper's WMDP setting is the default: a pure shrink


def test_generated_documents_can_continue_the_facts_cloze_prompts(source):
    """--generate_prompts facts:<domain>: the teacher writes after each fact's cloze prompt (here the embedded
    country-capital facts, in the tiny model's word vocabulary), so the student sees the teacher's own answers."""
    from lensunlearn.data.facts import questions

    out = run_command(_argv(source, "--steps", "2", "--eval_every", "0", "--generate", "8",
                            "--generate_batch", "4", "--generate_prompts", "facts:country_capital",
                            "--run_name", "prompted", "--eval_tasks", ""))
    tokenizer = load_tokenizer(str(source / "runs" / "src" / "merged"))
    rows = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    prompts = [tokenizer(q["prompt"])["input_ids"] for q in questions("country_capital")[:8]]
    assert len(rows) == 8 and all(row["ids"][:len(p)] == p for row, p in zip(rows, prompts))
    assert json.loads((out / "summary.json").read_text())["documents"]["generated"] == 8


class _Killed(Exception):
    pass


def _die_after_the_first_checkpoint(monkeypatch):
    """Stands for a kill right after the first checkpoint is written (every file is written atomically);
    returns the real `save_checkpoint`, to put back."""
    original = distill_module.save_checkpoint

    def save_then_die(run_dir, step, *args, **kwargs):
        original(run_dir, step, *args, **kwargs)
        raise _Killed(step)

    monkeypatch.setattr(distill_module, "save_checkpoint", save_then_die)
    return original


# --- documents the teacher writes ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generated_documents_continue_their_prompts_and_sample_the_model(arch):
    model, _ = make_tiny_model(arch, seed=1)
    prompts = [[5, 9, 12], [7, 7, 30], [40, 3, 11]]

    def generate(count: int, seed: int = 3, stop: set[int] = frozenset(), **kwargs) -> list[list[int]]:
        return generate_documents(model, prompts, count, 10, kwargs.pop("temperature", 1.0), seed, 2, set(stop), 0,
                                  **kwargs)

    docs = generate(5)
    assert len(docs) == 5 and all(len(d) == 10 for d in docs)
    assert [d[:3] for d in docs] == [prompts[i % 3] for i in range(5)]  # the prompts, cycled
    assert len({tuple(d[3:]) for d in docs}) == 5  # sampled, not one continuation

    # seeded by batch: the same call gives the same documents, and a run continuing from its first
    # batch (as after a kill) writes exactly the rest
    assert generate(5) == docs and generate(5, done=docs[:2]) == docs and generate(5, seed=4) != docs

    # a document ends before its first stop token: with that token the first one sampled, the first
    # document is its prompt alone, and every other is cut where that token first comes
    stop = docs[0][3]
    cut = generate(5, stop={stop})
    assert cut[0] == prompts[0]
    for whole, short in zip(docs, cut):
        new = whole[3:]
        assert short == (whole[:3 + new.index(stop)] if stop in new else whole)

    # near zero temperature it is greedy decoding, recomputed here without the key/value cache: the
    # cached continuation follows the model step by step
    greedy = []
    for prompt in prompts[:2]:
        ids = list(prompt)
        with torch.no_grad():
            while len(ids) < 10:
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        greedy.append(ids)
    assert generate(2, temperature=1e-4) == greedy


def test_distillation_on_generated_documents_resumes_after_a_kill(source, monkeypatch):
    extra = ("--steps", "4", "--eval_every", "0", "--eval_tasks", "", "--generate", "6", "--generate_batch", "4",
             "--generate_prompt", "3")
    straight = run_command(_argv(source, *extra, "--run_name", "gen_straight"))
    written = [json.loads(line) for line in (straight / "generated.jsonl").read_text().splitlines()]
    assert len(written) == 6 and all(3 < len(row["ids"]) <= 16 and row["text"] for row in written)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["documents"] == {"corpus": 32, "generated": 6} and summary["generate_seconds"] > 0
    config = json.loads((straight / "run_config.json").read_text())
    assert config["generate"] == 6 and config["generate_prompt"] == 3

    # killed after the first batch of generated documents: the resumed run keeps them, writes the
    # rest and trains to the same weights
    original, calls = distill_module.decode_batch, []

    def sample_then_die(*args, **kwargs):
        if calls:
            raise _Killed()
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(distill_module, "decode_batch", sample_then_die)
    with pytest.raises(_Killed):
        run_command(_argv(source, *extra, "--run_name", "gen_killed"))
    monkeypatch.undo()
    killed = source / "distilled" / "gen_killed"
    assert len((killed / "generated.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ConfigError, match="--generate_batch 4 -> 2"):
        run_command(_argv(source, *extra, "--run_name", "gen_killed", "--resume", "--generate_batch", "2"))
    resumed = run_command(_argv(source, *extra, "--run_name", "gen_killed", "--resume"))
    assert (resumed / "generated.jsonl").read_text() == (straight / "generated.jsonl").read_text()
    a, b = load_file(straight / "merged" / "model.safetensors"), load_file(resumed / "merged" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the generated documents were trained on: without them the same run ends elsewhere
    plain = run_command(_argv(source, *extra[:6], "--run_name", "gen_none"))
    c = load_file(plain / "merged" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_after_a_kill_ends_with_the_same_weights(source, monkeypatch):
    extra = ("--steps", "6", "--checkpoint_every", "2", "--eval_every", "3", "--eval_tasks", "")
    straight = run_command(_argv(source, *extra, "--run_name", "straight"))
    _die_after_the_first_checkpoint(monkeypatch)
    with pytest.raises(_Killed):
        run_command(_argv(source, *extra, "--run_name", "killed"))
    monkeypatch.undo()
    killed = source / "distilled" / "killed"
    assert (killed / "checkpoint.pt").exists() and not (killed / "summary.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run_command(_argv(source, *extra, "--run_name", "killed"))
    with pytest.raises(ConfigError, match="--alpha 0.3 -> 0.4"):
        run_command(_argv(source, *extra, "--run_name", "killed", "--resume", "--alpha", "0.4"))
    resumed = run_command(_argv(source, *extra, "--run_name", "killed", "--resume"))
    a, b = load_file(straight / "merged" / "model.safetensors"), load_file(resumed / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def untimed(run_dir: Path) -> list[dict]:
        timings = ("seconds", "tokens_per_s", "eval/seconds")
        return [{k: v for k, v in line.items() if k not in timings} for line in _metrics(run_dir)]

    assert untimed(resumed) == untimed(straight)  # the same losses and held-out numbers, step for step
    assert [line["step"] for line in _metrics(resumed)] == [0, 1, 2, 3, 4, 5, 6, 6]


@pytest.mark.parametrize("case", ["not_a_run", "tamper_output", "unfinished", "empty_corpus", "alpha", "no_run",
                                  "generate_prompt", "short_corpus", "stop_within_unchecked", "stop_within_zero"])
def test_bad_input_fails_before_any_model_loads(source, tmp_path, case, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(distill_module, "load_model", no_model)
    run = source / "runs" / "src"
    extra: list[str] = []
    error, match = ValueError, None
    if case == "not_a_run":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "a.txt").write_text("x")
        extra, match = ["--run", str(tmp_path / "notes")], "is not an unlearning run"
    elif case == "tamper_output":
        (tmp_path / "attack").mkdir()
        (tmp_path / "attack" / ".lensunlearn").write_text('{"kind": "tamper"}')
        (tmp_path / "attack" / "merged").mkdir()
        extra, match = ["--run", str(tmp_path / "attack")], r"is not an unlearning run \(a tamper output\)"
    elif case == "unfinished":
        copy_dir = tmp_path / "unfinished"
        shutil.copytree(run, copy_dir)
        (copy_dir / "summary.json").unlink()
        extra, match = ["--run", str(copy_dir)], "unfinished run .*--resume"
    elif case == "empty_corpus":
        write_jsonl(tmp_path / "empty.jsonl", [{"text": "  "}])
        extra, match = ["--corpus", str(tmp_path / "empty.jsonl")], "--corpus .*empty.jsonl is empty"
    elif case == "alpha":
        extra, error, match = ["--alpha", "1.5"], ConfigError, r"--alpha must be in \[0, 1\]"
    elif case == "generate_prompt":
        extra, error, match = ["--generate", "4", "--generate_prompt", "16"], ConfigError, "leaves the teacher nothing"
    elif case == "short_corpus":
        extra, match = ["--generate", "4", "--generate_prompt", "15"], "no document of --corpus .* is longer"
    elif case == "stop_within_unchecked":
        extra, error, match = ["--stop_within", "0.05", "--eval_every", "0"], ConfigError, "--stop_within is checked"
    elif case == "stop_within_zero":
        extra, error, match = ["--stop_within", "0"], ConfigError, "--stop_within must be a finite number > 0"
    else:
        error, match = ConfigError, "--run is required"
    argv = _argv(source, "--run_name", f"bad_{case}", *extra)
    if case == "no_run":
        argv = argv[:1] + argv[3:]
    with pytest.raises(error, match=match) as info:
        run_command(argv)
    assert len(str(info.value).splitlines()) == 1
    assert not (source / "distilled" / f"bad_{case}").exists()


# --- the grid search over distillation settings -----------------------------------------------------


def _search_argv(source: Path, out: Path, *grid: str) -> list[str]:
    """`search --stage distill`: the tiny distillation line above (its --out left to the search)."""
    flags = _argv(source, "--steps", "4", "--eval_every", "0")[1:]
    for flag in ("--out", "--alpha"):  # the search sets the first, the grid the second
        at = flags.index(flag)
        flags = flags[:at] + flags[at + 2:]
    argv = ["search", "--stage", "distill", "--distill", shlex.join(flags), "--out", str(out), "--generic",
            str(source / "heldout.jsonl")]
    for entry in grid:
        argv += ["--grid", entry]
    return argv


@pytest.fixture
def distilled(monkeypatch) -> list:
    """The distill configs a search ran, in order (the runs themselves really train)."""
    return record_calls(monkeypatch, search, "distill")


def test_a_search_distils_the_run_at_every_point_and_measures_each_like_an_unlearned_run(source, tmp_path,
                                                                                          distilled):
    out = tmp_path / "search"
    summary = run_command(_search_argv(source, out, "alpha=0.1,0.6"))
    runs, src = out / "runs", (source / "runs" / "src").resolve()
    assert {p.name for p in runs.iterdir()} == {"alpha0.1", "alpha0.6"} and len(distilled) == 2
    for name, alpha in (("alpha0.1", 0.1), ("alpha0.6", 0.6)):
        saved = json.loads((runs / name / "run_config.json").read_text())
        assert saved["alpha"] == alpha and saved["steps"] == 4 and saved["run"] == str(src)  # grid and fixed
        assert json.loads((runs / name / "summary.json").read_text())["alpha"] == alpha
    # the distilled runs carry their source's base evaluation, so the search evaluated no base model
    assert not list((out / "base").glob("eval_*.json"))
    base_eval = json.loads((src / "base_eval.json").read_text())["results"]["task"]["acc"]
    saved = json.loads((out / "search.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["grid"] == {"alpha": [0.1, 0.6]}
    perplexities = []
    for point in saved["points"]:
        run, metrics = Path(point["run_dir"]), point["metrics"]
        assert metrics["forget"]["task"] == "task" and metrics["kept"] == {}
        assert metrics["forget"]["acc"] == json.loads((run / "eval.json").read_text())["results"]["task"]["acc"]
        assert metrics["forget"]["base"] == base_eval
        ppl = metrics["perplexity"]
        assert ppl["ratio"] == pytest.approx(ppl["unlearned"] / ppl["base"]) and point["seconds"]["distill"] > 0
        perplexities.append(ppl["unlearned"])
    # the base perplexity is the source run's base model's, measured once
    (base_ppl,) = (json.loads(p.read_text()) for p in (out / "base").glob("perplexity_*.json"))
    assert base_ppl["model"] == str(source / "tiny") and base_ppl["perplexity"] == ppl["base"]
    assert perplexities[0] != perplexities[1]  # two students, two models
    table = (out / "search.md").read_text()
    assert "Grid search of `distill` settings (2 points)" in table and "distill s" in table
    assert "| 0.1 |" in table and "| 0.6 |" in table

    distilled.clear()  # the same command again distils nothing; a new value distils that point alone
    run_command(_search_argv(source, out, "alpha=0.1,0.6"))
    assert distilled == []
    run_command(_search_argv(source, out, "alpha=0.1,0.6,0.3"))
    assert [cfg.run_name for cfg in distilled] == ["alpha0.3"]


@pytest.mark.parametrize("case", ["no_run", "unlearn_flags", "distill_flags_without_stage", "unlearn_option",
                                  "missing_run", "alpha"])
def test_bad_distill_searches_are_one_line_errors_before_training(source, tmp_path, distilled, capsys, case):
    out = tmp_path / "search"
    argv = _search_argv(source, out, "alpha=0.1,0.6")
    if case == "no_run":
        argv[argv.index("--distill") + 1] = "--steps 4"
        match = "name it in --distill \"--run DIR ...\""
    elif case == "unlearn_flags":
        argv += ["--unlearn", "--lr 1e-3"]
        match = "--unlearn holds the fixed settings of --stage unlearn"
    elif case == "distill_flags_without_stage":
        argv[argv.index("--stage") + 1] = "unlearn"
        match = "--distill holds the fixed settings of --stage distill"
    elif case == "unlearn_option":
        argv += ["--grid", "forget_coef=1,2"]
        match = "--grid forget_coef: not an option of lensunlearn distill"
    elif case == "missing_run":
        argv[argv.index("--distill") + 1] = f"--run {tmp_path / 'nowhere'}"
        match = "nowhere does not exist"
    else:
        argv[argv.index("alpha=0.1,0.6")] = "alpha=0.1,1.5"
        match = "grid point alpha=1.5: --alpha must be in [0, 1]"
    assert console(argv) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert distilled == [] and not out.exists()


def test_a_search_continues_an_interrupted_distillation(source, tmp_path, distilled, monkeypatch):
    original = _die_after_the_first_checkpoint(monkeypatch)
    out = tmp_path / "search"
    argv = _search_argv(source, out, "alpha=0.2")
    argv[argv.index("--distill") + 1] += " --checkpoint_every 2"
    with pytest.raises(_Killed):
        run_command(argv)
    run = out / "runs" / "alpha0.2"
    assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()
    assert [p["status"] for p in json.loads((out / "search.json").read_text())["points"]] == ["pending"]
    monkeypatch.setattr(distill_module, "save_checkpoint", original)
    summary = run_command(argv)
    assert [cfg.resume for cfg in distilled] == [False, True] and summary["points"][0]["status"] == "finished"
    assert [line["step"] for line in _metrics(run) if "kl" in line] == [1, 2, 3, 4]  # steps 1-2 not taken again


def test_max_tokens_stops_at_the_first_step_that_reaches_the_budget_also_after_a_resume(source, monkeypatch):
    """The budget in tokens, as papers report it: training stops after the first step whose running total of
    predicted tokens reaches --max_tokens, and a run killed before that counts the steps it already took."""
    extra = ("--steps", "6", "--eval_every", "0", "--eval_tasks", "")
    full = run_command(_argv(source, *extra, "--run_name", "all_steps"))
    totals = list(itertools.accumulate(line["tokens"] for line in _metrics(full) if "kl" in line))
    budget = int(totals[2]) - 1  # more than two steps give, at most what three give
    assert totals[1] < budget <= totals[2]
    stopped = run_command(_argv(source, *extra, "--max_tokens", str(budget), "--run_name", "budget"))
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stop_reason"] == "max_tokens" and summary["steps"] == 3 and summary["tokens"] == totals[2]
    assert summary["budget_curve"][-1]["step"] == 3 and "heldout_ce" in summary["budget_curve"][-1]

    _die_after_the_first_checkpoint(monkeypatch)
    with pytest.raises(_Killed):
        run_command(_argv(source, *extra, "--max_tokens", str(budget), "--checkpoint_every", "2", "--run_name", "k"))
    monkeypatch.undo()
    resumed = run_command(_argv(source, *extra, "--max_tokens", str(budget), "--checkpoint_every", "2",
                                "--run_name", "k", "--resume"))
    again = json.loads((resumed / "summary.json").read_text())
    assert again["stop_reason"] == "max_tokens" and again["steps"] == 3 and again["tokens"] == totals[2]
    with pytest.raises(ConfigError, match="--max_tokens"):
        run_command(_argv(source, *extra, "--max_tokens", "0", "--run_name", "none"))
