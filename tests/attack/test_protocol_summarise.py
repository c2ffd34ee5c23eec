"""`robustness --summarise_only`: a finished output's summary rebuilt from its stored records, without a
model or an attack, with the settings the output was run with."""

from __future__ import annotations

import json

import pytest

from lensunlearn.attack import protocol as robustness
from lensunlearn.attack.grid import Setting
from lensunlearn.core.config import ConfigError

from .test_protocol import _argv, main, run_files  # noqa: F401  (run_files is a fixture)


@pytest.fixture
def finished(run_files):  # noqa: F811
    out = run_files["tmp"] / "robust"
    main(_argv(run_files, out))
    return run_files, out


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--summarise_only loaded a model or ran an attack")

    monkeypatch.setattr(robustness, "Protocol", refuse)
    monkeypatch.setattr(robustness, "train", refuse)
    monkeypatch.setattr("lensunlearn.modeling.loading.load_model", refuse)


def _summarise(files, out, *extra: str) -> dict:
    return main(["robustness", str(files["run"]), "--out", str(out), "--summarise_only", *extra])


def test_an_unchanged_output_is_summarised_to_the_same_numbers(finished, no_model):
    files, out = finished
    before = json.loads((out / "robustness.json").read_text())
    (out / "robustness.md").unlink()
    # flags on the line other than the run and --out do not change what is summarised
    result = _summarise(files, out, "--seeds", "5")
    after = json.loads((out / "robustness.json").read_text())
    assert after == json.loads(json.dumps(result)) and after.pop("summarised_by").endswith("--summarise_only")
    assert after == before
    assert "Headline" in (out / "robustness.md").read_text()


def test_an_edited_record_reaches_the_summary(finished, no_model):
    """What the summary says comes from the stored attack records: the strongest attack's unseen-half
    accuracy raised by hand is the new headline and envelope, and a loss that climbs marks it diverged."""
    files, out = finished
    before = json.loads((out / "robustness.json").read_text())
    best = Setting(**before["headline"]["setting"])
    path = out / "seeds" / "seed0" / "attacks" / f"grid_{best.label}.json"
    record = json.loads(path.read_text())
    record["steps"]["3"]["unseen"] = 1.0
    path.write_text(json.dumps(record))
    other = next(p for p in (out / "seeds" / "seed0" / "attacks").glob("grid_*.json") if p != path)
    record = json.loads(other.read_text())
    assert not before["diverged"] and record["steps"]["2"]["train_loss"] > 0
    record["steps"]["3"]["train_loss"] = 2 * record["steps"]["2"]["train_loss"]
    other.write_text(json.dumps(record))
    result = _summarise(files, out)
    assert [(d["role"], Setting(**d["setting"]).label, d["at"]) for d in result["diverged"]] == \
        [("grid", other.stem.removeprefix("grid_"), 3)]
    assert result["headline"]["unseen"] == 1.0 != before["headline"]["unseen"]
    assert result["envelope"]["3"]["unseen"] == 1.0
    assert result["wall_seconds"] == before["wall_seconds"] and result["threads"] == before["threads"]
    assert json.loads((out / "robustness.json").read_text())["headline"]["unseen"] == 1.0


def test_summarise_only_refuses_what_it_cannot_do(finished, no_model):
    files, out = finished
    with pytest.raises(ConfigError, match="neither --resume nor --overwrite"):
        _summarise(files, out, "--resume")
    with pytest.raises(ConfigError, match="holds no finished robustness output"):
        _summarise(files, files["tmp"] / "nothing_here")
    fictional = next((out / "seeds" / "seed0" / "attacks").glob("fictional_*.json"))
    fictional.unlink()
    with pytest.raises(ConfigError, match=f"{fictional.name} is missing"):
        _summarise(files, out)


def test_a_killed_resume_that_added_seeds_is_summarised_with_the_finished_ones(finished, no_model):
    """`--resume --seeds 0,1` saves the new seeds in the config before any attack; killed then, the output's
    finished summary still holds seed 0 alone, and that is what is summarised."""
    files, out = finished
    saved = json.loads((out / "robustness_config.json").read_text())
    (out / "robustness_config.json").write_text(json.dumps({**saved, "seeds": [0, 1]}))
    assert _summarise(files, out)["seeds"] == [0]


def test_the_controls_run_with_the_strongest_attack_that_did_not_diverge():
    """An attack that tops the grid only after its loss climbed is not the headline's, so neither the
    controls nor the fluency check take its setting; its end-of-attack numbers leave the summary."""
    from lensunlearn.attack.grid import cut_at_divergence
    from lensunlearn.attack.options import RobustnessConfig

    full, lora = Setting("full", 1e-2, "constant"), Setting("lora", 1e-2, "constant")

    def record(setting, unseen, losses):
        return {"setting": setting.as_dict(), "kept": {"symbols": 0.5}, "perplexity": 9.0, "phrasings": {},
                "steps": {str(n): {"attacked": 0.5, "unseen": u, "train_loss": loss}
                          for n, u, loss in zip((2, 3), unseen, losses)}}

    grid = [record(full, (0.4, 0.5), (2.0, 1.5)), record(lora, (0.4, 0.9), (2.0, 3.0))]
    cfg = RobustnessConfig(run="r", kinds=("full", "lora"), lrs=(1e-2,), steps=(2, 3))
    assert robustness.best_grid_attack(grid, cfg.step_counts)["setting"] == full.as_dict()
    assert robustness.control_settings(cfg, grid) == [full]
    cut = cut_at_divergence(grid[1], cfg.step_counts)
    assert set(cut["steps"]) == {"2"} and cut["kept"] is cut["perplexity"] is cut["phrasings"] is None
    # before either diverged, the stronger one is chosen as before
    grid[1]["steps"]["3"]["train_loss"] = 1.9
    assert robustness.control_settings(cfg, grid) == [lora]


def test_controls_run_with_an_attack_no_longer_strongest_are_kept_and_named(finished, no_model, caplog):
    """Under rules that find another grid attack strongest, the stored controls (run with the old one) are
    what the summary uses, and a warning names both settings."""
    files, out = finished
    before = json.loads((out / "robustness.json").read_text())
    best = Setting(**before["headline"]["setting"])
    attacks = out / "seeds" / "seed0" / "attacks"
    other = next(p for p in attacks.glob("grid_*.json") if p.name != f"grid_{best.label}.json")
    record = json.loads(other.read_text())
    record["steps"]["3"]["unseen"] = 1.0
    other.write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="lensunlearn.attack.protocol"):
        result = _summarise(files, out)
    assert Setting(**result["headline"]["setting"]) != best
    assert result["floor"] == before["floor"] and result["benign"] == before["benign"]
    assert f"the fictional control ran with {best.label}" in caplog.text and other.stem[5:] in caplog.text
