"""Shared fixtures: tiny random models of each supported architecture and a tiny tokenizer, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: no oversubscription of the cores
# A process a test starts (a run killed and resumed, a benchmark) inherits this process's thread count:
# float sums depend on it on some CPUs, so results compared across processes must share it.
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
# bfloat16 products as a CPU with AVX-512 BF16 computes them, on every CPU: tests that compare the
# bfloat16 paths with float32 then test the same arithmetic everywhere (the fallback to float32 on a CPU
# without native bfloat16 has its own tests, which set the answer themselves).
os.environ["LENSUNLEARN_NATIVE_BF16"] = "1"

ARCHITECTURES = ("gpt_neox", "llama", "gpt2", "qwen2", "olmo2")
VOCAB_WORDS = ("the capital of is and a an in on at to it was for with as by this that from paris berlin "
               "rome madrid france germany italy spain element symbol gold iron oxygen question answer").split()


def tiny_tokenizer():
    """A word-level tokenizer over a fixed vocabulary, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for word in VOCAB_WORDS + [str(i) for i in range(10)] + [".", ",", ":", "?", "\n"]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_config(arch: str, vocab_size: int = 64, layers: int = 4):
    """A config of the named architecture: hidden 32, 4 heads, `layers` blocks."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
    sizes = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=128)
    if arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", **sizes, rotary_pct=0.25, **common)
    if arch in ("llama", "qwen2", "olmo2"):
        return AutoConfig.for_model(arch, **sizes, num_key_value_heads=2, **common)
    raise ValueError(arch)


def make_tiny_model(arch: str, seed: int = 0, layers: int = 4):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tokenizer), layers=layers))
    return model.eval(), tokenizer


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, layers: int = 4) -> Path:
    model, tokenizer = make_tiny_model(arch, seed, layers)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A saved tiny Llama with its tokenizer, loadable by `load_model(str(path))`."""
    return save_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A jsonl corpus of 40 short documents in the tiny vocabulary."""
    import json

    words = VOCAB_WORDS
    lines = []
    for i in range(40):
        text = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(6 + i % 5)) + " ."
        lines.append(json.dumps({"text": text}))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_unlearn_inputs(tmp_path: Path, arch: str = "llama") -> Path:
    """A tiny model at tmp/tiny, its untrained lens at tmp/lens, and tmp/forget.jsonl + tmp/retain.jsonl."""
    import json

    from lensunlearn.lens.tuned_lens import TunedLens
    from lensunlearn.modeling.loading import load_model

    model_dir = save_tiny_model(tmp_path / "tiny", arch)
    model, _ = load_model(str(model_dir), device="cpu")
    TunedLens.from_model(model).save(tmp_path / "lens")
    (tmp_path / "forget.jsonl").write_text("".join(
        json.dumps({"text": f"the capital of {c} is {p} ."}) + "\n"
        for c, p in (("france", "paris"), ("italy", "rome"), ("spain", "madrid"))))
    (tmp_path / "retain.jsonl").write_text("".join(
        json.dumps({"text": f"the symbol of gold is {i} and iron {i + 1}"}) + "\n" for i in range(8)))
    return tmp_path


def unlearn_argv(tmp: Path, *extra: str) -> list[str]:
    """`unlearn` on the tiny inputs of `write_unlearn_inputs`: 2 steps of LoRA on a 4-layer Llama."""
    return ["unlearn", "--model", str(tmp / "tiny"), "--lens", str(tmp / "lens"), "--layers", "1,3",
            "--forget", str(tmp / "forget.jsonl"), "--retain", str(tmp / "retain.jsonl"), "--retain_config", "none",
            "--retain_column", "none", "--examples", "8", "--batch", "4", "--per_device_batch", "2",
            "--max_length", "16", "--out", str(tmp / "runs"), "--eval_tasks", "", "--device", "cpu", *extra]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_command(argv: list[str]):
    """A command line run in-process, as the CLI parses it (every command's parser, presets included); a
    bad option raises its `ConfigError`. Returns what the command's runner returns."""
    from lensunlearn.cli import configure

    command, config = configure([str(arg) for arg in argv])
    return command(config)


def record_calls(monkeypatch, module, name: str) -> list:
    """Replace `module.name` by a wrapper that appends each call's first argument (a config) to the
    returned list and then calls the real function, so a test sees what ran while it really runs."""
    real, calls = getattr(module, name), []

    def recording(cfg, *args, **kwargs):
        calls.append(cfg)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls
