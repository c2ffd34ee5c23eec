"""The names of every file and folder the commands write and read, in one place.

Each command writes its outputs here and the readers (`tamper` reading an unlearning run, `report`
reading runs and attacks, `demo` skipping finished stages) find them by the same names, so a name
changes in one line. Every output folder a command creates holds a marker file naming the kind of
output (`unlearn`, `distill`, `lens`, `tamper`, `report`, `demo`, ...), so a folder can be recognised
as ours.

Folders:

    <unlearn run>/  run_config.json  metrics.jsonl  summary.json  eval.json  base_eval.json
                    adapter/ (LoRA)  merged/ (a Hugging Face model folder)  checkpoint.pt (until done)
    <distill run>/  an unlearning run's files but adapter/ (base_eval.json is the source run's)
    <lens>/         params.pt  config.json (the tuned-lens library's files)  train_config.json
                    metrics.jsonl  checkpoint.pt (until done)
    <tamper out>/   results.json  tamper.png  metrics.jsonl  split.json  tasks/  original_eval.json
                    or, for a sweep, sweep.json  sweep.png  and one such folder per setting
    <report out>/   report.md  tradeoff.png  training_curves.png  tamper_curves.png  robustness_curves.png
                    report.csv + report_robustness.csv | report.json
    <eval --out>    X.json  X.predictions.jsonl  X.profile.png (with a lens)
    <demo out>/     facts/  lens/  lens_eval.json  base_eval.json  unlearn/  unlearned_eval.json
                    tamper/  report.md  demo_time.json
    <robustness out>/  robustness.json  robustness.md  robustness.png  robustness_config.json
                    reference.json  seeds/seed<N>/{split.json, tasks/, start.json, fluency.json,
                    attacks/<role>_<setting>.json}
    <locate out>/   locate.json  locate.png
    <search out>/   search.json  search.md  runs/<point>/ (unlearn runs)  robustness/<point>/
                    points/<point>.json  base/ (the base model's evaluation and perplexity)
    with `--tracker`, a lens, unlearn run, tamper attack's or robustness output folder also holds
                    wandb/ (wandb's run folders) or tensorboard/ (event files)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from .atomic import write_json_atomic

MARKER_FILE = ".lensunlearn"
OutputKind = Literal["unlearn", "lens", "tamper", "report", "demo", "robustness", "search", "distill", "locate"]

# unlearning run
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
# evaluations during training (`unlearn --eval_every`): flat keys eval/<task>/<metric> in a step's metrics line
EVAL_KEY_PREFIX = "eval/"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
BASE_EVAL_FILE = "base_eval.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINT_FILE = "checkpoint.pt"
_CHECKPOINT_SHARD = "checkpoint.rank{rank}.pt"

# Hugging Face model folder (merged/, the embedded model's cache) and tuned lens
MODEL_CONFIG_FILE = "config.json"
LENS_PARAMS_FILE = "params.pt"
LENS_CONFIG_FILE = "config.json"
LENS_TRAIN_CONFIG_FILE = "train_config.json"

# tamper attack
RESULTS_FILE = "results.json"
SWEEP_FILE = "sweep.json"
TAMPER_PLOT_FILE = "tamper.png"
SWEEP_PLOT_FILE = "sweep.png"
ORIGINAL_EVAL_FILE = "original_eval.json"
SPLIT_FILE = "split.json"
SPLIT_TASKS_DIR = "tasks"

# report
REPORT_FILE = "report.md"
REPORT_TABLE_FILES = {"csv": "report.csv", "json": "report.json"}
TRADEOFF_PLOT_FILE = "tradeoff.png"
TAMPER_CURVES_FILE = "tamper_curves.png"
ROBUSTNESS_CURVES_FILE = "robustness_curves.png"
TRAINING_CURVES_FILE = "training_curves.png"
# the robustness table has other columns than the runs' table, so its csv is a file of its own
REPORT_ROBUSTNESS_CSV_FILE = "report_robustness.csv"

# files written beside an `eval --out` / `lens eval --out` JSON file
PREDICTIONS_SUFFIX = ".predictions.jsonl"
PROFILE_PLOT_SUFFIX = ".profile.png"
LENS_PLOT_SUFFIX = ".png"

# demo
DEMO_FACTS_DIR = "facts"
DEMO_LENS_DIR = "lens"
DEMO_LENS_EVAL_FILE = "lens_eval.json"
DEMO_UNLEARN_RUN = "unlearn"
DEMO_UNLEARNED_EVAL_FILE = "unlearned_eval.json"
DEMO_TAMPER_DIR = "tamper"
DEMO_TIME_FILE = "demo_time.json"
DEMO_STATE_FILE = "demo_state.json"

# locate: where a model stores a set of facts (causal tracing), and its heat map
LOCATE_FILE = "locate.json"
LOCATE_PLOT_FILE = "locate.png"

# distillation: the documents the teacher wrote for `distill --generate` (kept, so a resumed run reuses them)
DISTILL_GENERATED_FILE = "generated.jsonl"

# robustness protocol: the summary, its table and plot, the resolved config (compared on --resume),
# and the work in progress that a resumed run skips (each finished attack in its own file)
ROBUSTNESS_FILE = "robustness.json"
ROBUSTNESS_TABLE_FILE = "robustness.md"
ROBUSTNESS_PLOT_FILE = "robustness.png"
ROBUSTNESS_CONFIG_FILE = "robustness_config.json"
ROBUSTNESS_REFERENCE_FILE = "reference.json"
ROBUSTNESS_SEEDS_DIR = "seeds"
ROBUSTNESS_START_FILE = "start.json"
ROBUSTNESS_FLUENCY_FILE = "fluency.json"
ROBUSTNESS_ATTACKS_DIR = "attacks"

# experiment trackers (`--tracker`), inside the command's output folder; wandb names its folder itself
# (`<dir>/wandb/`) and it is written here so that every output name is in this file
WANDB_DIR = "wandb"
TENSORBOARD_DIR = "tensorboard"

# grid search over unlearn settings: the summary and its ranked table; one unlearning run, one robustness
# output and one measured record per point; the base model's numbers, measured once and shared
SEARCH_FILE = "search.json"
SEARCH_TABLE_FILE = "search.md"
SEARCH_PLOT_FILE = "search.png"
SEARCH_RUNS_DIR = "runs"
SEARCH_ROBUSTNESS_DIR = "robustness"
SEARCH_POINTS_DIR = "points"
SEARCH_BASE_DIR = "base"


def robustness_seed_dir(out: str | Path, seed: int) -> Path:
    """Where one seed's split, half-task files and finished attacks live."""
    return Path(out) / ROBUSTNESS_SEEDS_DIR / f"seed{seed}"


def beside(path: str | Path, suffix: str) -> Path:
    """`runs/x.json` with `.profile.png` -> `runs/x.profile.png`."""
    path = Path(path)
    return path.with_name(path.stem + suffix)


def checkpoint_shard(folder: Path, rank: int) -> Path:
    """The file one rank writes its shards of a sharded (FSDP2) checkpoint to."""
    return Path(folder) / _CHECKPOINT_SHARD.format(rank=rank)


def checkpoint_shards(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(_CHECKPOINT_SHARD.format(rank="*")))


def is_unlearn_run(path: str | Path) -> bool:
    """Whether `path` is an unlearning run directory (it holds merged/ or run_config.json)."""
    path = Path(path).expanduser()
    return path.is_dir() and ((path / MERGED_DIR).is_dir() or (path / RUN_CONFIG_FILE).is_file())


def is_tamper_output(path: str | Path) -> bool:
    """Whether `path` holds tamper results: one attack, a sweep, or a sweep killed before its summary."""
    path = Path(path)
    return (path / RESULTS_FILE).is_file() or (path / SWEEP_FILE).is_file() or any(path.glob(f"*/{RESULTS_FILE}"))


def is_robustness_output(path: str | Path) -> bool:
    """Whether `path` is a robustness output: finished (it holds robustness.json) or still running (its marker)."""
    path = Path(path)
    return (path / ROBUSTNESS_FILE).is_file() or read_marker(path) == "robustness"


def sweep_results(path: Path) -> list[Path]:
    """The results files of a sweep's attacks (also of a sweep killed before it wrote its summary)."""
    return sorted(Path(path).glob(f"*/{RESULTS_FILE}"))



def write_marker(folder: str | Path, kind: OutputKind) -> None:
    """Mark `folder` as an output of kind `kind`; a folder already marked keeps its first marker
    (the demo's folder, for one, also receives the report)."""
    folder = Path(folder)
    if read_marker(folder) is None:
        write_json_atomic(folder / MARKER_FILE, {"kind": kind})


def read_marker(folder: str | Path) -> str | None:
    """The kind of output `folder` was made as, or None for a folder this package did not make."""
    path = Path(folder) / MARKER_FILE
    try:
        return json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
