"""Localised updates: which blocks train (`--blocks`), resolved without loading any weights.

`--blocks a-b` names a band of blocks by hand, `--blocks auto` takes the band that `lensunlearn
locate` found (`--locate DIR`). Within the band, `--block_weights mlp` trains the MLPs only, where
a model looks up a subject's attributes ("Locating and Editing Factual Associations in GPT", Meng
et al. 2022; "Mechanistic Unlearning", Guo et al. 2025, found that updating only those MLPs left
the least for relearning to bring back), and `all` trains every weight of those blocks. Every other
weight stays bitwise as it was. Torch-free: the options module and the checks before any model
loads use it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..core.config import ConfigError
from ..core.errors import InputError
from ..core.paths import LOCATE_FILE, RUN_CONFIG_FILE
from ..eval.options import weak_band_message

log = logging.getLogger(__name__)

AUTO, RUN = "auto", "run"
BLOCK_WEIGHTS = ("mlp", "all")
TRAINED_BLOCKS_KEY = "trained_blocks"  # run_config.json: the blocks a run trained (absent: the method's default)


def parse_blocks(text: str, keywords: tuple[str, ...] = (AUTO,)) -> str | tuple[int, int]:
    """'auto' (or another keyword) as it is, 'a-b' or 'a' as (first, last); anything else is a ConfigError."""
    text = text.strip()
    if text in keywords:
        return text
    first, dash, last = text.partition("-")
    try:
        band = (int(first), int(last) if dash else int(first))
    except ValueError:
        band = None
    if band is None or band[0] < 0 or band[1] < band[0]:
        words = " or ".join(keywords)
        raise ConfigError(f"--blocks {text}: name a band of blocks a-b (first-last, 0-based, e.g. 3-8), one block, or "
                          f"{words}")
    return band


def check_block_options(cfg: Any, keywords: tuple[str, ...] = (AUTO,)) -> None:
    """The --blocks, --locate and --block_weights of a config, checked without reading any file."""
    if cfg.block_weights not in BLOCK_WEIGHTS:
        raise ConfigError(f"--block_weights {cfg.block_weights}: use one of {', '.join(BLOCK_WEIGHTS)}")
    if cfg.blocks is None:
        if cfg.locate is not None:
            raise ConfigError("--locate is read by --blocks auto: add --blocks auto, or drop --locate")
        return
    blocks = parse_blocks(cfg.blocks, keywords)
    if blocks == AUTO and cfg.locate is None:
        raise ConfigError("--blocks auto takes the band of a `lensunlearn locate` result: pass --locate DIR (run "
                          "`lensunlearn locate --model M --eval_tasks FILE --out DIR` first), or set the band by hand "
                          "with --blocks a-b")
    if blocks != AUTO and cfg.locate is not None:
        raise ConfigError(f"--locate is read by --blocks auto, but --blocks is {cfg.blocks}: pick one")


def read_locate_band(folder: str | Path) -> tuple[int, int, int]:
    """(first, last, blocks of the model it was found on) of a `locate` output; a weak band (see
    `eval.options.WEAK_SHARE`) is taken with a warning."""
    path = Path(folder).expanduser() / LOCATE_FILE
    if not path.is_file():
        raise InputError(f"--locate {folder} holds no {LOCATE_FILE}: run `lensunlearn locate --model M --eval_tasks "
                         f"FILE --out {folder}` first, or set the band by hand with --blocks a-b")
    try:
        saved = json.loads(path.read_text())
        first, last = (int(b) for b in saved["band"])
        found = first, last, int(saved["num_blocks"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path} holds no band (a damaged or foreign file): run locate again") from err
    if saved.get("weak"):
        log.warning("--blocks auto: " + weak_band_message(folder, float(saved.get("peak_share", 0.0))))
    return found


def read_run_blocks(run: str | Path) -> tuple[int, ...] | None:
    """The blocks an unlearning run trained (None: its method's default, the whole network)."""
    path = Path(run).expanduser() / RUN_CONFIG_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    blocks = saved.get(TRAINED_BLOCKS_KEY)
    return tuple(int(b) for b in blocks) if blocks else None


def resolve_blocks(cfg: Any, num_blocks: int, run: str | Path | None = None) -> tuple[int, ...] | None:
    """The blocks that train (None: every block the method trains by default), refusing a band outside the
    model: `num_blocks` comes from its config.json, before any weights load."""
    if cfg.blocks is None:
        return None
    blocks = parse_blocks(cfg.blocks, (AUTO, RUN))
    where = f"--blocks {cfg.blocks}"
    if blocks == AUTO:
        first, last, found_on = read_locate_band(cfg.locate)
        where = f"--blocks auto (band {first}-{last} of --locate {cfg.locate})"
        if found_on != num_blocks:
            raise InputError(f"{where} was found on a model of {found_on} blocks, but this one has {num_blocks}: run "
                             f"locate on this model")
    elif blocks == RUN:
        chosen = read_run_blocks(run) if run is not None else None
        if chosen is None:
            raise InputError(f"--blocks run: the run {run} trained no band of blocks (no --blocks): pass --blocks a-b "
                             f"or auto, or drop --blocks to distil the whole network")
        first, last = min(chosen), max(chosen)
    else:
        first, last = blocks
    if last >= num_blocks:
        raise InputError(f"{where} is outside the model: it has {num_blocks} blocks, 0-{num_blocks - 1}; choose a band "
                         f"within them")
    return tuple(range(first, last + 1))
