"""The options of `eval`, torch-free so that `--help` never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
