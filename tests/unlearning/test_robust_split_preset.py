"""`--preset robust` on the forget part of a split relation retains on the same split's retain part and
measures its loss budget on held-out text; on a whole relation, and for every other preset, nothing
changes; what the line or a config file sets always wins."""

from __future__ import annotations

import pytest

from lensunlearn.cli import configure
from lensunlearn.data.splits import check_retain_sources, parse_source
from lensunlearn.unlearning.options import GENERIC_HELDOUT, ROBUST, SMALL


def _unlearn(*flags: str):
    return configure(["unlearn", "--preset", "robust", *flags])[1]


def test_whole_relation_keeps_the_preset():
    cfg = _unlearn()
    assert (cfg.forget, cfg.retain, cfg.cir_budget_text, cfg.eval_tasks) == \
        (ROBUST.forget, ROBUST.retain, ROBUST.cir_budget_text, ROBUST.eval_tasks)
    assert ROBUST.cir_budget_text is None  # the whole-relation preset keeps its in-sample budget


def test_split_forget_retains_the_same_split_and_budgets_on_heldout_text():
    cfg = _unlearn("--forget", "facts:country_capital@forget")
    assert cfg.retain == "generic:retain,facts:country_capital@retain"
    assert cfg.cir_budget_text == GENERIC_HELDOUT
    tasks = cfg.eval_tasks.split(",")
    assert tasks[:2] == ["facts:country_capital@forget", "facts:country_capital@kept"]
    assert tasks[2:] == ROBUST.eval_tasks.split(",")
    # the retain part it adds never states a forget fact (the check `unlearn` runs before loading)
    check_retain_sources(cfg.forget, cfg.retain.split(","))


def test_the_split_options_carry_over_and_phrasings_do_not():
    """Another split seed and other shares must name the same split in the retain part, or the parts
    would overlap; phrasings are a corpus option of the forget text only."""
    cfg = _unlearn("--forget", "facts:us_state_capital@forget?shares=60/20/20&split_seed=3&phrasings=all")
    retain = cfg.retain.split(",")[1]
    assert parse_source(retain) == parse_source("facts:us_state_capital@retain?shares=60/20/20&split_seed=3")
    assert cfg.eval_tasks.split(",")[:2] == ["facts:us_state_capital@forget?shares=60/20/20&split_seed=3",
                                             "facts:us_state_capital@kept?shares=60/20/20&split_seed=3"]
    check_retain_sources(cfg.forget, retain.split(","))


def test_a_users_own_split_file(tmp_path):
    rows = [{"fact_id": f"f{i}", "text": f"Item {i} is filed under shelf {i % 7}."} for i in range(12)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    cfg = _unlearn("--forget", f"{path}@forget")
    assert cfg.retain == f"generic:retain,{path}@retain"
    assert cfg.cir_budget_text == GENERIC_HELDOUT
    assert cfg.eval_tasks == ROBUST.eval_tasks  # a file is not a question task unless the user names it


@pytest.mark.parametrize("flags, field, value", [
    (("--retain", "generic:retain"), "retain", "generic:retain"),
    (("--cir_budget_text", "none"), "cir_budget_text", None),
    (("--eval_tasks", "facts:element_symbol"), "eval_tasks", "facts:element_symbol"),
])
def test_what_the_line_sets_wins(flags, field, value):
    cfg = _unlearn("--forget", "facts:country_capital@forget", *flags)
    assert getattr(cfg, field) == value


def test_a_config_file_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retain: generic:retain,facts:country_capital@retain,facts:us_state_capital@retain\n")
    cfg = _unlearn("--forget", "facts:country_capital@forget", "--config", str(path))
    assert cfg.retain == "generic:retain,facts:country_capital@retain,facts:us_state_capital@retain"
    assert cfg.cir_budget_text == GENERIC_HELDOUT


def test_other_presets_and_parts_are_unchanged():
    cfg = configure(["unlearn", "--preset", "small", "--forget", "facts:country_capital@forget"])[1]
    assert (cfg.retain, cfg.eval_tasks) == (SMALL.retain, SMALL.eval_tasks)
    cfg = _unlearn("--forget", "facts:country_capital@kept")  # not a forget part: nothing to derive
    assert cfg.retain == ROBUST.retain and cfg.cir_budget_text is None


def test_search_points_get_the_same_preset(tmp_path):
    _, cfg = configure(["search", "--preset", "robust", "--unlearn", "--forget facts:country_capital@forget",
                        "--grid", "lr=1e-3,2e-3", "--out", str(tmp_path / "s")])
    configs = [point.config for point in cfg.plan.points]
    assert [c.lr for c in configs] == [1e-3, 2e-3]
    assert {c.retain for c in configs} == {"generic:retain,facts:country_capital@retain"}
    assert {c.cir_budget_text for c in configs} == {GENERIC_HELDOUT}
