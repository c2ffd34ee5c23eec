"""Tuned lens: save/load round trip, tuned-lens library interop, fit checks, training and resume."""

from __future__ import annotations

import json

import pytest
import torch

from lensunlearn.cli import main
from lensunlearn.core.config import ConfigError
from lensunlearn.lens.evaluate import LensEvalConfig
from lensunlearn.lens.tuned_lens import TunedLens
from lensunlearn.modeling.loading import load_model

from ..conftest import make_tiny_model, save_tiny_model


def _randomise(lens: TunedLens, seed: int = 1) -> TunedLens:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lens.translators.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return lens


def test_untrained_lens_is_logit_lens(arch):
    model, _ = make_tiny_model(arch)
    lens = TunedLens.from_model(model)
    h = torch.randn(3, 5, 32)
    torch.testing.assert_close(lens(h, 2), lens.decode(h))


def test_save_load_round_trip(tmp_path):
    model, _ = make_tiny_model("llama")
    lens = _randomise(TunedLens.from_model(model))
    lens.save(tmp_path / "lens")
    state = torch.load(tmp_path / "lens" / "params.pt", weights_only=True)
    assert sorted(state)[:2] == ["0.bias", "0.weight"] and len(state) == 8
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["d_model"] == 32 and config["lens_type"] == "linear_tuned_lens"
    loaded = TunedLens.load(tmp_path / "lens", model)
    h = torch.randn(2, 3, 32)
    for layer in range(4):
        torch.testing.assert_close(loaded(h, layer), lens(h, layer), rtol=0, atol=0)


def test_tuned_lens_library_loads_ours_and_we_load_theirs(tmp_path):
    tuned_lens = pytest.importorskip("tuned_lens")
    model, _ = make_tiny_model("gpt_neox")
    ours = _randomise(TunedLens.from_model(model))
    ours.save(tmp_path / "ours")
    theirs = tuned_lens.TunedLens.from_model_and_pretrained(model, str(tmp_path / "ours"))
    h = torch.randn(2, 3, 32)
    for layer in range(4):
        torch.testing.assert_close(theirs(h, layer), ours(h, layer), rtol=1e-5, atol=1e-5)
    # ...and the other direction: a lens the library wrote.
    other = tuned_lens.TunedLens.from_model(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in other.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    other.save(tmp_path / "theirs")
    loaded = TunedLens.load(tmp_path / "theirs", model)
    for layer in range(4):
        torch.testing.assert_close(loaded(h, layer), other(h, layer), rtol=1e-5, atol=1e-5)


def test_misfit_lens_and_missing_files_are_refused(tmp_path):
    model, _ = make_tiny_model("llama", layers=4)
    TunedLens.from_model(make_tiny_model("llama", layers=3)[0]).save(tmp_path / "shallow")
    with pytest.raises(ValueError, match="3 layers of width 32.*4 layers"):
        TunedLens.load(tmp_path / "shallow", model)
    wide = TunedLens.from_model(model)
    wide.save(tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    config["d_model"] = 64
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="width 64"):
        TunedLens.load(tmp_path / "wide", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks params.pt"):
        TunedLens.load(tmp_path / "empty", model)
    with pytest.raises(FileNotFoundError, match="lens folder .* does not exist"):
        TunedLens.load(tmp_path / "nowhere" / "lens", model)


def _train_args(model_dir, corpus, out, *extra):
    return ["lens", "train", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out), "--batch", "4",
            "--per_device_batch", "2", "--max_length", "16", "--steps", "6", "--lr", "3e-3", *extra]


def test_lens_train_then_eval_beats_logit_lens(tmp_path, text_corpus, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "lens"
    main(_train_args(model_dir, text_corpus, out, "--steps", "30", "--optimizer", "adamw", "--lr", "1e-2"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert not (out / "checkpoint.pt").exists()
    result = main(["lens", "eval", "--model", str(model_dir), "--corpus", str(text_corpus), "--lens", str(out),
                   "--max_length", "16", "--out", str(tmp_path / "eval.json")])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["layers"] == result["layers"] and len(saved["layers"]) == 4
    for row in saved["layers"]:
        assert row["tuned_lens_kl"] < row["logit_lens_kl"]
        assert set(row) == {"layer", "logit_lens_kl", "tuned_lens_kl", "logit_lens_top1", "tuned_lens_top1"}
    assert (tmp_path / "eval.png").stat().st_size > 1000
    # the bfloat16 product as a CPU with native bfloat16 runs it (one without keeps float32: test_muon_precision)
    monkeypatch.setattr("lensunlearn.modeling.loading.native_bfloat16", lambda device: True)
    fast = main(["lens", "eval", "--model", str(model_dir), "--corpus", str(text_corpus), "--lens", str(out),
                 "--max_length", "16", "--lens_matmul", "bfloat16"])
    for exact, approx in zip(result["layers"], fast["layers"]):
        for key in ("logit_lens_kl", "tuned_lens_kl"):
            assert approx[key] == pytest.approx(exact[key], rel=2e-2, abs=1e-3) and approx[key] != exact[key]
    few = main(["lens", "eval", "--model", str(model_dir), "--corpus", str(text_corpus), "--lens", str(out),
                "--max_length", "16", "--eval_limit", "2"])
    assert few["documents"] == 2 < result["documents"]
    assert few["layers"] != result["layers"]
    with pytest.raises(ConfigError, match="--eval_limit must be"):
        LensEvalConfig(model=str(model_dir), lens=str(out), eval_limit=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(_train_args(model_dir, text_corpus, out))


@pytest.mark.parametrize("optimizer", ["muon", "sgd"])
def test_resume_gives_same_lens(tmp_path, text_corpus, monkeypatch, optimizer):
    model_dir = save_tiny_model(tmp_path / "m", "gpt2")
    full = tmp_path / "full"
    main(_train_args(model_dir, text_corpus, full, "--optimizer", optimizer))

    import lensunlearn.train.loop as loop

    original_step = loop._step

    def dying_step(spec, step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return original_step(spec, step)

    part = tmp_path / "part"
    monkeypatch.setattr(loop, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        main(_train_args(model_dir, text_corpus, part, "--optimizer", optimizer, "--checkpoint_every", "3"))
    monkeypatch.setattr(loop, "_step", original_step)
    assert (part / "checkpoint.pt").exists() and not (part / "params.pt").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        main(_train_args(model_dir, text_corpus, part, "--optimizer", optimizer))
    main(_train_args(model_dir, text_corpus, part, "--optimizer", optimizer, "--resume"))
    a = torch.load(full / "params.pt", weights_only=True)
    b = torch.load(part / "params.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_lens_train_bad_inputs(tmp_path, text_corpus):
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        main(_train_args(model_dir, empty, tmp_path / "a"))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"body": "the capital"}\n')
    with pytest.raises(ValueError, match=r"no 'text' column.*--corpus_column"):
        main(_train_args(model_dir, wrong, tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(_train_args(model_dir, tmp_path / "missing.jsonl", tmp_path / "c"))
    with pytest.raises(SystemExit):
        main(_train_args(model_dir, text_corpus, tmp_path / "d", "--batch", "5"))


def test_load_model_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "no" / "model"))


def test_bfloat16_matmul_is_close_and_reversible(arch):
    model, _ = make_tiny_model(arch)
    lens = _randomise(TunedLens.from_model(model))
    h = torch.randn(4, 32)
    exact = lens(h, 1)
    fast = lens.set_matmul_dtype(torch.bfloat16)(h, 1)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)
    torch.testing.assert_close(fast, exact, rtol=0.02, atol=0.02)
    torch.testing.assert_close(lens.set_matmul_dtype(None)(h, 1), exact, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["no_grad", "checkpointed", "backward_scale"])
def test_chunked_lens_kl_equals_naive_kl_and_its_gradients(arch, mode):
    from lensunlearn.modeling.losses import kl_from_logits, lens_kl

    model, _ = make_tiny_model(arch)
    lens = _randomise(TunedLens.from_model(model))
    generator = torch.Generator().manual_seed(3)
    layers = [0, 2, lens.num_layers - 1]
    streams, final = torch.randn(7, len(layers), 32, generator=generator), torch.randn(7, 32, generator=generator)
    naive = torch.stack([kl_from_logits(lens.decode(final), lens(streams[:, i], l)).sum()
                         for i, l in enumerate(layers)])
    naive_grads = torch.autograd.grad(naive.sum() * 0.5, lens.translator_parameters(), allow_unused=True)
    if mode == "no_grad":
        with torch.no_grad():
            torch.testing.assert_close(lens_kl(lens, layers, streams, final, chunk=3), naive.detach(), rtol=1e-5,
                                       atol=1e-5)
        return
    if mode == "checkpointed":
        sums = lens_kl(lens, layers, streams, final, chunk=3)
        (sums.sum() * 0.5).backward()
    else:
        sums = lens_kl(lens, layers, streams, final, chunk=3, backward_scale=0.5)
    torch.testing.assert_close(sums.detach(), naive.detach(), rtol=1e-5, atol=1e-5)
    for param, expected in zip(lens.translator_parameters(), naive_grads):
        if expected is None:  # a layer outside `layers`
            assert param.grad is None or not param.grad.any()
        else:
            torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)


def test_lens_table_equals_kl_and_top1_from_whole_distributions(arch):
    # lens_table reads each layer's logits only for logsumexp and argmax; the reference builds both
    # distributions and takes KL(p || q) and top-1 agreement directly
    import torch.nn.functional as F

    from lensunlearn.data.corpora import collate
    from lensunlearn.lens.evaluate import lens_table
    from lensunlearn.lens.train import lens_streams

    model, tokenizer = make_tiny_model(arch)
    model.requires_grad_(False)
    lens = _randomise(TunedLens.from_model(model))
    generator = torch.Generator().manual_seed(5)
    docs = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in (5, 9, 3, 7, 6)]
    rows = lens_table(model, lens, docs, tokenizer.pad_token_id, batch=2, chunk=4)
    sums, tokens = torch.zeros(lens.num_layers, 4, dtype=torch.float64), 0
    for start in range(0, len(docs), 2):
        streams, final = lens_streams(model, collate(docs[start:start + 2], tokenizer.pad_token_id), lens.num_layers)
        tokens += streams.shape[0]
        with torch.no_grad():
            target = F.log_softmax(lens.decode(final), dim=-1)
            for layer in range(lens.num_layers):
                for column, logits in ((0, lens.decode(streams[:, layer])), (1, lens(streams[:, layer], layer))):
                    pred = F.log_softmax(logits, dim=-1)
                    sums[layer, column] += (target.exp() * (target - pred)).sum().double()
                    sums[layer, column + 2] += (pred.argmax(-1) == target.argmax(-1)).sum().double()
    expected = (sums / tokens).tolist()
    assert tokens == sum(len(d) for d in docs)
    for row, ref in zip(rows, expected, strict=True):
        got = [row["logit_lens_kl"], row["tuned_lens_kl"], row["logit_lens_top1"], row["tuned_lens_top1"]]
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert row["tuned_lens_kl"] != row["logit_lens_kl"]  # the randomised lens is not the logit lens
