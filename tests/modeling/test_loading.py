"""Where models and lenses come from: hub ids through the local hub cache, local folders, and the one
clear error for each way that fails (offline cache misses, missing folders, damaged files, no CUDA)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lensunlearn.core.errors import UserError
from lensunlearn.lens.tuned_lens import TunedLens, find_lens
from lensunlearn.modeling.loading import load_model

from ..conftest import save_tiny_model

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # any commit hash names a snapshot


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder` out as huggingface_hub caches a downloaded repo: models--owner--name/snapshots/<sha>/
    with refs/main naming the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under tmp_path, offline, with the working directory elsewhere in tmp_path.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into `constants` at import, so the test sets
    the constants as well as the environment."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def test_hub_id_loads_from_the_local_hub_cache_offline(tmp_path, offline_hub):
    add_to_hub_cache(offline_hub, "tiny-org/tiny-llama", save_tiny_model(tmp_path / "built"))
    model, tokenizer = load_model("tiny-org/tiny-llama", device="cpu")
    assert model.config.name_or_path == "tiny-org/tiny-llama"
    assert model.config.num_hidden_layers == 4 and tokenizer.pad_token_id is not None


def test_hub_id_missing_offline_is_one_message_with_the_fix(offline_hub):
    with pytest.raises(FileNotFoundError) as info:
        load_model("tiny-org/absent", device="cpu")
    text = str(info.value)
    assert "tiny-org/absent is neither a local folder nor in the local hub cache" in text
    assert str(offline_hub) in text and "HF_HUB_OFFLINE=1" in text
    assert "hf download tiny-org/absent" in text and "HF_HOME" in text and "\n" not in text


def test_local_looking_model_paths_are_missing_folders(tmp_path, offline_hub):
    (Path.cwd() / "runs").mkdir()
    for name in ("./nope", "a/b/c", "runs/typo", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError, match=f"model folder {name} does not exist"):
            load_model(name, device="cpu")
    (Path.cwd() / "runs" / "lens_only").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_model("runs/lens_only", device="cpu")


def test_hub_lens_from_the_cache_offline_and_a_missing_one(tmp_path, offline_hub):
    model_dir = save_tiny_model(tmp_path / "built")
    model, _ = load_model(str(model_dir), device="cpu")
    TunedLens.from_model(model).save(tmp_path / "lens")
    add_to_hub_cache(offline_hub, "tiny-org/tiny-lens", tmp_path / "lens")
    assert TunedLens.load("tiny-org/tiny-lens", model).num_layers == 4
    with pytest.raises(FileNotFoundError) as info:
        TunedLens.load("tiny-org/absent-lens", model)
    assert "lens tiny-org/absent-lens is neither a local folder nor in the local hub cache" in str(info.value)
    assert "hf download tiny-org/absent-lens" in str(info.value)


def test_local_looking_lens_paths_are_missing_folders_not_hub_ids(offline_hub):
    (Path.cwd() / "runs").mkdir()  # `runs/lens_x` names a folder under runs/, not the hub repo runs/lens_x
    for name in ("runs/lens_smollm2", "./lens", "lens", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"lens folder {name} does not exist"):
            find_lens(name, "tiny")


def test_no_lens_and_no_default_lens_says_train_one_first(offline_hub):
    with pytest.raises(FileNotFoundError) as info:
        find_lens(None, "EleutherAI/pythia-70m")
    assert str(info.value) == ("no --lens given and runs/lens_pythia-70m does not exist: train a lens first: "
                               "lensunlearn lens train --model EleutherAI/pythia-70m (writes runs/lens_pythia-70m), "
                               "or pass --lens")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_damaged_lens_files_name_the_file_and_the_fix(tmp_path):
    model, _ = load_model(str(save_tiny_model(tmp_path / "m")), device="cpu")
    TunedLens.from_model(model).save(tmp_path / "lens")
    _truncate(tmp_path / "lens" / "params.pt")
    with pytest.raises(UserError, match=r"params.pt is truncated or not a torch file: train the lens again with "
                                        r"`lensunlearn lens train --out .* --overwrite`"):
        TunedLens.load(tmp_path / "lens", model)
    TunedLens.from_model(model).save(tmp_path / "lens")
    (tmp_path / "lens" / "config.json").write_text('{"d_model": 32,\n "num_hidden_layers": }\n')
    with pytest.raises(UserError, match=r"config.json line 2: invalid JSON"):
        TunedLens.load(tmp_path / "lens", model)


def test_truncated_checkpoint_names_the_file_and_the_fix(tmp_path):
    from lensunlearn.train.checkpoint import load_checkpoint, save_checkpoint
    from lensunlearn.train.optim import build_optimizer

    weight = torch.nn.Parameter(torch.zeros(4, 4))
    save_checkpoint(tmp_path, 3, {"w": weight}, build_optimizer([("w", weight)], "adamw", 1e-3, 0.0))
    _truncate(tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=r"checkpoint.pt is truncated or not a torch file: start the run over with "
                                        r"--overwrite"):
        load_checkpoint(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_loading(tmp_path):
    with pytest.raises(UserError, match=r"^CUDA is not available on this machine: use --device cpu$"):
        load_model(str(tmp_path / "not-even-a-model"), device="cuda")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        load_model(str(tmp_path / "not-even-a-model"), device="gpu")
