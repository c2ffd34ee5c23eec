"""The options of `eval`, torch-free so that `--help` never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.checks import require_positive
from ..core.config import Command, ConfigError, option
from ..data.tasks import FORMATS
from ..modeling.options import ModelOptions


@dataclass
class EvalConfig(ModelOptions):
    """Options of `lensunlearn eval`."""

    help_group = "evaluation"

    eval_tasks: tuple[str, ...] = option(("wmdp_bio_robust", "mmlu"),
                                         "comma-separated tasks: wmdp_bio_robust, wmdp_bio, mmlu, mmlu_stem, "
                                         "mmlu_<subject>, facts:<domain>, a .jsonl of {question, choices, "
                                         "answer[, prompt]}, or lm_eval:<task> (run by lm-eval itself)",
                                         old_names=("tasks",))
    eval_format: Literal["letter", "cloze"] = option("letter", "letter: A/B/C/D after the question; cloze: the "
                                                               "answer text as continuation", old_names=("format",))
    eval_batch: int = option(16, "questions per evaluation forward pass", old_names=("batch_size",))
    eval_limit: int | None = option(None, "evaluate only the first N questions of each task", default_text="all",
                                    old_names=("limit",))
    max_length: int | None = option(None, "context limit in tokens; longer questions lose tokens from the left, as "
                                          "in lm-eval", default_text="the model's (config n_positions / "
                                          "max_position_embeddings / n_ctx, else the tokenizer's, else 2048)")
    out: str | None = option(None, "JSON file for the results", metavar="FILE", group="run",
                             default_text="print the table only")
    predictions: str | None = option(None, "per-question predictions jsonl", metavar="FILE", group="run",
                                     default_text="beside --out; none without --out")
    lens: str | None = option(None, "tuned lens folder or hub id: adds the per-layer knowledge profile",
                              group="model", default_text="none")
    plot: str | None = option(None, "knowledge-profile PNG", metavar="FILE", group="run",
                              default_text="beside --out when --lens is given")
    overwrite: bool = option(False, "replace existing output files (--out, the predictions and the plot)",
                             group="run")
    lm_eval_include: str | None = option(None, "folder of your own lm-eval task YAML files, for lm_eval:<task> "
                                               "in --eval_tasks (passed to lm-eval's TaskManager as include_path)",
                                         metavar="DIR", default_text="none")

    def __post_init__(self) -> None:
        if isinstance(self.eval_tasks, str):
            self.eval_tasks = tuple(t.strip() for t in self.eval_tasks.split(",") if t.strip())
        if self.eval_format not in FORMATS:
            raise ConfigError(f"--eval_format {self.eval_format!r} is unknown: use one of {', '.join(FORMATS)}")
        if self.eval_batch < 1:
            raise ConfigError(f"--eval_batch must be at least 1, got {self.eval_batch}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"--eval_limit must be at least 1, got {self.eval_limit}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max_length must be at least 2 (context and answer), got {self.max_length}")
        if not self.eval_tasks:
            raise ConfigError("--eval_tasks is empty: name at least one task, e.g. --eval_tasks facts:country_capital")
        super().__post_init__()


COMMANDS = [Command(words=("eval",), help="Evaluate a model on WMDP-Bio, MMLU, fact sets or local jsonl tasks "
                    "(lm-eval's numbers, in-process), optionally layer by layer through a tuned lens.",
                    config=EvalConfig, run="lensunlearn.eval.evaluate:run_eval")]


LOCATE_COMPONENTS = ("mlp", "attn")  # the rows of locate's heat map (`causal_trace.COMPONENTS`)

# A band whose best single MLP brings back less than this share of what the noise destroyed cannot be
# told apart from the scatter of the estimate (the paper's MLP rows reach tenths; restorations that do
# nothing scatter around 0 by thousandths): `locate.json` marks it weak, and `--blocks auto` warns when
# it takes one.
WEAK_SHARE = 0.05


def weak_band_message(folder: object, peak: float) -> str:
    """The warning of a weak band, the same from `locate` and from `--blocks auto`."""
    return (f"the locate result in {folder} is weak: its best single MLP restores {peak:.4f} of what the noise "
            f"destroyed (below {WEAK_SHARE}), so its band is not told apart from noise; try --window 5 or "
            f"--corrupt_stream 0, or set --blocks a-b by hand")


@dataclass
class LocateConfig(ModelOptions):
    """Options of `lensunlearn locate` (see `eval.locate`)."""

    help_group = "measure"

    eval_tasks: str = option("", "question files whose rows name their subject (comma-separated): facts:<domain>, "
                                 "a part such as facts:<domain>@forget, or a .jsonl of {prompt or question, choices, "
                                 "answer, subject} (required)", group="data")
    out: str = option("", "output folder: locate.json and locate.png (required)", metavar="DIR", group="run")
    sample: int = option(40, "trace a seeded sample of this many facts the model knows (0: all of them); about "
                             "4 s per fact for SmolLM2-135M on 2 CPU cores")
    noise: float = option(3.0, "noise added to the subject's token embeddings, in units of their standard "
                               "deviation (the paper's 3)")
    noise_samples: int = option(3, "noise draws per fact (each a row of every restored run)")
    corrupt_stream: int = option(1, "the stream noised at the subject's tokens: 0 the token embeddings (the "
                                    "paper's), 1 the stream after block 0, whose MLP acts as an extended "
                                    "embedding in many models (restoring it alone undoes noise on the "
                                    "embeddings); blocks below it are not traced")
    window: int = option(1, "restore a component at this many consecutive blocks around each block (the paper "
                            "plots 10 of 48; 1: each block alone, the sharpest band)")
    band_threshold: float = option(0.5, "the band: the block of the largest MLP recovered share and its "
                                        "neighbours keeping at least this fraction of it")
    known_only: bool = option(True, "trace only facts whose correct choice the model ranks first (cloze "
                                    "log-likelihood): a fact the model does not know is stored nowhere")
    seed: int = option(0, "seed of the sample and of the noise")
    batch: int = option(256, "rows per forward pass (each fact is (1 + 2 x blocks) x noise_samples rows)")
    overwrite: bool = option(False, "replace an earlier locate output in --out", group="run")

    def __post_init__(self) -> None:
        if not self.eval_tasks.strip():
            raise ConfigError("--eval_tasks is required: the questions to locate, e.g. --eval_tasks "
                              "facts:country_capital")
        if not self.out:
            raise ConfigError("--out is required: the folder for locate.json and the heat map")
        require_positive(noise=self.noise, noise_samples=self.noise_samples, window=self.window, batch=self.batch)
        if self.corrupt_stream < 0:
            raise ConfigError(f"--corrupt_stream must be >= 0 (0: the token embeddings), got {self.corrupt_stream}")
        if self.sample < 0:
            raise ConfigError(f"--sample must be >= 0 (0: every known fact), got {self.sample}")
        if not 0 < self.band_threshold <= 1:
            raise ConfigError(f"--band_threshold must be in (0, 1], got {self.band_threshold}")
        super().__post_init__()


COMMANDS.append(Command(("locate",), "find where a model stores a set of facts (causal tracing of each block's "
                                    "MLP and attention at the subject's tokens) and the band of blocks to unlearn "
                                    "them in", LocateConfig, "lensunlearn.eval.locate:locate"))
