"""The options of `tamper` and `robustness`, torch-free so that `--help` never imports torch."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.checks import require_nonnegative, require_positive
from ..core.config import Command, ConfigError, option, parse_float_list, parse_int_list, parse_str_list, redefault
from ..core.paths import BASE_EVAL_FILE, is_unlearn_run
from ..data.corpora import WMDP_BIO_FORGET_CORPUS
from ..data.tasks import REFERENCE_EVAL_TASKS
from ..modeling.options import EMBEDDED_MODEL, ModelOptions, model_short_name
from ..train.options import SCHEDULES, TrackingOptions, TrainingOptions
from .grid import GRID_AXES, PaperAttack, Setting, grid_settings, paper_settings

AUTO_PHRASING, QA_PHRASING = "auto", "qa"


@dataclass
class TamperConfig(TrackingOptions, TrainingOptions, ModelOptions):
    run: str | None = option(None, "an unlearning run folder: its merged/ model is attacked, and its forget corpus, "
                                   f"eval tasks, format and {BASE_EVAL_FILE} fill the options left out", group="model",
                             default_text="none: attack --model")
    model: str | None = redefault(ModelOptions, "model", None, default_text=f"{EMBEDDED_MODEL} unless --run is given")
    lr: float = redefault(TrainingOptions, "lr", 2e-5)
    # no weight decay: the attack of the robustness protocol (`finetune`), which tamper shares
    weight_decay: float = redefault(TrainingOptions, "weight_decay", 0.0)
    batch: int = redefault(TrainingOptions, "batch", 16)
    per_device_batch: int = redefault(TrainingOptions, "per_device_batch", 4)
    forget: str | None = option(None, "attack corpus: hub id, local file/folder or facts:<domain>", group="data",
                                default_text=f"the --run's forget corpus, else {WMDP_BIO_FORGET_CORPUS}")
    forget_config: str | None = option(None, "hub dataset config of the attack corpus", group="data",
                                       default_text="none")
    forget_column: str | None = option(None, "text column of the attack corpus", group="data",
                                       default_text="text, or title/abstract/text joined")
    forget_limit: int = option(512, "keep the first N chunks of the attack corpus", group="data",
                               old_names=("examples",))
    max_length: int = option(2048, "chunk documents into pieces of at most this many tokens", group="data")
    epochs: float = option(1.0, "passes over the kept chunks", group="attack")
    steps: int | None = option(None, "attack for exactly this many optimiser steps, cycling the chunks (as the "
                                     "robustness grid does)", group="attack", default_text="--epochs decides")
    lrs: tuple[float, ...] = option((), "sweep: comma-separated learning rates, one attack each (replacing --lr)",
                                    group="attack", default_text="none: one attack at --lr")
    schedules: tuple[str, ...] = option((), "sweep: comma-separated schedules (crossed with --lrs)", group="attack",
                                        default_text="none: --schedule")
    full: bool = option(True, "attack all parameters; --no-full attacks with a LoRA adapter on every linear layer "
                              "of the blocks (no dropout), the robustness protocol's LoRA attack", group="LoRA",
                        old_names={"lora": False})
    lora_rank: int = option(16, "LoRA rank of a --no-full attack (alpha = rank)", old_names=("rank",), group="LoRA")
    holdout: float = option(0.0, "fraction of facts the attack never trains on (0 = off); needs a facts:<domain> "
                                 "corpus or a jsonl corpus with a fact_id column, and tasks whose rows carry fact_id",
                            group="attack")
    eval_tasks: str | None = option(None, "comma-separated tasks (forget and retain)", group="evaluation",
                                    metavar="TASKS", default_text="the --run's tasks, else facts:<domain> for a "
                                                                  "facts corpus, else " + REFERENCE_EVAL_TASKS)
    forget_task: str | None = option(None, "which eval task measures forgetting", group="evaluation",
                                     default_text="the first of --eval_tasks")
    eval_format: Literal["letter", "cloze"] | None = option(None, "letter: A/B/C/D after the question; cloze: the "
                                                                  "answer text as continuation", group="evaluation",
                                                            default_text="the --run's, else letter")
    eval_every: int = option(10, "evaluate every N optimiser steps (and at step 0 and the end)", group="evaluation")
    eval_limit: int | None = option(None, "evaluate only the first N questions of each task", group="evaluation",
                                    default_text="all")
    eval_batch: int = option(32, "questions per evaluation forward pass", group="evaluation")
    metric: Literal["acc", "acc_norm"] = option("acc", "accuracy shown on the plots and used for recovery",
                                                group="evaluation")
    baseline: str | None = option(None, "the original model's accuracy line: an eval JSON, or a model to evaluate",
                                  old_names=("original",), group="evaluation", metavar="FILE",
                                  default_text=f"the --run's {BASE_EVAL_FILE} when present, else none")
    out: str | None = option(None, "the output folder", metavar="DIR",
                             default_text="runs/tamper_<run or model name>")
    overwrite: bool = option(False, "replace earlier results in --out")
    seed: int = option(0, "seed for data order and the held-out split")

    def __post_init__(self) -> None:
        self.lrs = parse_float_list(self.lrs)
        self.schedules = tuple(self.schedules)
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad:
            raise ConfigError(f"--schedules has {bad}: use {', '.join(SCHEDULES)}")
        self._resolve_run()
        super().__post_init__()
        for lr in self.lrs:
            require_positive(lrs=lr)
        require_positive(eval_batch=self.eval_batch, eval_limit=self.eval_limit, lora_rank=self.lora_rank)
        if self.forget_limit < 1 or self.max_length < 2 or self.epochs <= 0:
            raise ConfigError("--forget_limit must be >= 1, --max_length >= 2 and --epochs > 0")
        require_positive(steps=self.steps)
        if self.eval_every < 1:
            raise ConfigError(f"--eval_every must be >= 1, got {self.eval_every}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in [0, 1), got {self.holdout}: it is the fraction of facts held out")
        if self.out is None:
            self.out = str(Path("runs") / f"tamper_{model_short_name(self.attacked)}")

    def _resolve_run(self) -> None:
        """--run names an unlearning run and --model a model; a run folder given as --model (the former
        spelling) is taken as --run, with a line saying so."""
        if self.run is not None and self.model is not None:
            raise ConfigError(f"--run {self.run} and --model {self.model} both name what to attack: pass --run for "
                              f"an unlearning run folder, or --model for a model")
        if self.model is not None and is_unlearn_run(self.model):
            sys.stderr.write(f"lensunlearn: tamper --model {self.model} names an unlearning run: that is now --run "
                             f"{self.model}; the old spelling goes in the next release\n")
            self.run, self.model = self.model, None
        if self.run is None and self.model is None:
            self.model = EMBEDDED_MODEL

    @property
    def attacked(self) -> str:
        """What the attack starts from: the run folder (its merged/ model) or the model."""
        return self.run if self.run is not None else self.model

    @property
    def sweep(self) -> list[tuple[float, str]]:
        """(lr, schedule) of every attack this config asks for."""
        lrs = self.lrs or (self.lr,)
        schedules = self.schedules or (self.schedule,)
        return [(lr, schedule) for schedule in schedules for lr in lrs]


@dataclass
class RobustnessConfig(TrackingOptions, ModelOptions):
    run: str = option("", "the unlearning run folder; its merged/ model is attacked (required)", positional=True,
                      positional_metavar="RUN_DIR", metavar="DIR", group="model", old_names=("run_dir",))
    model: str | None = option(None, "the base model (before unlearning)", group="model",
                               default_text="the run's, from its run_config.json")
    forget: str | None = option(None, "forget corpus with fact_id per row: facts:<domain> or a .jsonl of {text, "
                                      "fact_id}", group="data", default_text="the run's forget corpus")
    forget_task: str | None = option(None, "the task that measures forgetting, its rows carrying fact_id: "
                                           "facts:<domain> or a .jsonl", group="evaluation",
                                     default_text="the forget corpus's facts:<domain>, else the run's first eval task")
    kept_tasks: str | None = option(None, "comma-separated tasks that should stay known ('' or none: no kept tasks)",
                                    group="evaluation", metavar="TASKS", empty=True,
                                    default_text="the run's other eval tasks")
    generic: str = option("generic:heldout", "held-out text for perplexity (in no corpus): generic:heldout, a "
                                              ".txt or .jsonl file", metavar="TEXT", group="evaluation")
    benign: str = option("generic:benign", "text of the benign attack, unrelated to the forget domain; the default "
                                           "is generic text no unlearning or distillation stage trains on and "
                                           "not the --generic text", group="data", metavar="TEXT")
    eval_format: Literal["letter", "cloze"] | None = option(None, "letter or cloze", group="evaluation",
                                                            default_text="the run's, else cloze")
    grid: Literal["default", "full"] = option("default", "default: full-parameter attacks at lr 1e-5, 1e-4, 1e-3 "
                                                         "and LoRA at 1e-3, constant, 8/32/64 steps; full: {full, "
                                                         "lora} x lr 1e-6..1e-3 (4) x {constant, cosine}, "
                                                         "8/32/128/512 steps", group="attack")
    kinds: tuple[str, ...] = option((), "replace the grid's attack kinds: full, lora (AdamW, clipped at 1), "
                                        "mlp_sgd (plain SGD on the blocks' MLP weights), full_sgd (plain SGD on "
                                        "every weight); any axis given makes the grid the cross product of the "
                                        "axes", group="attack", default_text="the grid's")
    lrs: tuple[float, ...] = option((), "replace the grid's learning rates", group="attack",
                                    default_text="the grid's")
    schedules: tuple[str, ...] = option((), "replace the grid's schedules (constant, linear, cosine)", group="attack",
                                        default_text="the grid's")
    steps: tuple[int, ...] = option((), "replace the grid's step counts at which attacks are evaluated",
                                    group="attack", default_text="the grid's")
    paper_attacks: tuple[str, ...] = option((), "also run each named paper's own relearning attack, reported "
                                                "apart from the grid's envelope: cir (plain SGD lr 1e-5 on the MLP "
                                                "weights), mudman (plain SGD lr 3e-3 on every weight), all; '' "
                                                "none", group="attack", default_text="none")
    guessable: Literal["apart", "keep"] = option("apart", "facts whose subject gives the answer away (Mexico City "
                                                          "for Mexico, Tunis for Tunisia: one contains the other, "
                                                          "they share a word, or two of their words begin with the "
                                                          "same 5 letters): apart leaves them out of both halves "
                                                          "and reports them on their own; keep splits them like any "
                                                          "other fact", group="attack")
    batch: int = option(8, "sentences per attack step (the attacked half's text is cycled)", group="attack")
    warmup: int = option(0, "linear warmup steps of every attack", group="attack")
    lora_rank: int = option(16, "rank of a LoRA attack (alpha = rank; every linear layer of the blocks, no dropout)",
                            group="LoRA")
    max_length: int = option(64, "cut attack documents into pieces of at most this many tokens", group="data")
    holdout: float = option(0.5, "fraction of the forget task's facts in the unseen half", group="attack")
    seeds: tuple[int, ...] = option((0,), "comma-separated seeds; each repeats the split and the attacks",
                                    group="attack")
    eval_batch: int = option(32, "questions per evaluation forward pass", group="evaluation")
    phrasings: tuple[str, ...] = option(("auto",), "other phrasings of the forget task's facts, measured on "
                                                   "both halves before and after every grid attack: qa (each "
                                                   "question's `question` field as 'Q: <question>\\nA:', cloze "
                                                   "only) or .jsonl question files whose rows carry the forget "
                                                   "task's fact_id; auto: qa in cloze format, none in letter; "
                                                   "'' none", group="evaluation")
    fluency_prompts: int = option(3, "prompts per group whose greedy continuations are recorded (0: none)",
                                  group="evaluation")
    max_new_tokens: int = option(12, "tokens of each greedy continuation", group="evaluation")
    out: str | None = option(None, "the output folder", metavar="DIR", default_text="runs/robustness_<run name>")
    overwrite: bool = option(False, "start over: replace an earlier robustness output in --out once the new one is "
                                    "complete")
    resume: bool = option(False, "continue a killed run in --out, skipping its finished attacks")
    summarise_only: bool = option(False, "rewrite the finished output in --out (robustness.json, .md, .png) from "
                                         "its stored attacks under this version's summarising rules, with the "
                                         "settings it was run with; no model is loaded and no attack runs")

    def __post_init__(self) -> None:
        self.kinds, self.schedules = parse_str_list(self.kinds), parse_str_list(self.schedules)
        self.paper_attacks = parse_str_list(self.paper_attacks)
        self.phrasings = parse_str_list(self.phrasings)
        self.lrs, self.steps, self.seeds = parse_float_list(self.lrs), parse_int_list(self.steps), \
            parse_int_list(self.seeds)
        if not self.run:
            raise ConfigError("name the unlearning run folder: lensunlearn robustness RUN_DIR (or --run RUN_DIR, or "
                              "run: in a --config file)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite cannot be combined: --resume continues the killed run in "
                              "--out, --overwrite starts over and replaces it once the new one is complete; pass one")
        if self.summarise_only and (self.resume or self.overwrite):
            raise ConfigError("--summarise_only rewrites a finished output's summary and runs nothing, so it takes "
                              "neither --resume nor --overwrite: drop one of them")
        try:
            grid_settings(self.grid, self.kinds, self.lrs, self.schedules)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        try:
            paper_settings(self.paper_attacks)
        except ValueError as err:
            raise ConfigError(f"--paper_attacks: {err}") from err
        for lr in self.lrs:
            require_positive(lrs=lr)
        for n in self.steps:
            require_positive(steps=n)
        require_positive(batch=self.batch, lora_rank=self.lora_rank, eval_batch=self.eval_batch,
                         max_new_tokens=self.max_new_tokens)
        require_nonnegative(warmup=self.warmup, fluency_prompts=self.fluency_prompts)
        if self.max_length < 2:
            raise ConfigError(f"--max_length must be at least 2, got {self.max_length}")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in (0, 1), got {self.holdout}: it is the unseen half's share")
        for name in self.phrasings:
            if name not in (AUTO_PHRASING, QA_PHRASING) and not name.endswith(".jsonl"):
                raise ConfigError(f"--phrasings {name}: name qa, auto or a .jsonl question file")
        if AUTO_PHRASING in self.phrasings and len(self.phrasings) > 1:
            raise ConfigError("--phrasings auto stands alone: list qa and the files instead")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must name distinct seeds, got {','.join(map(str, self.seeds))}")
        super().__post_init__()

    @property
    def settings(self) -> list[Setting]:
        return grid_settings(self.grid, self.kinds, self.lrs, self.schedules)

    @property
    def papers(self) -> dict[str, PaperAttack]:
        """The paper attacks asked for, by name."""
        return paper_settings(self.paper_attacks)

    @property
    def step_counts(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.steps or GRID_AXES[self.grid]["steps"])))

    @property
    def grid_name(self) -> str:
        return "custom" if self.kinds or self.lrs or self.schedules or self.steps else self.grid


COMMANDS = [
    Command(("tamper",), "fine-tune a model on forget-domain text and measure how much knowledge returns: one "
                         "attack curve (or a sweep of learning rates) on any corpus you choose, optionally with "
                         "held-out facts (--holdout). For the verdict on an unlearned run (held-out facts, an attack "
                         "grid and its envelope, controls) use `robustness`; both run the same fine-tuning attack",
            TamperConfig, "lensunlearn.attack.tamper:run_tamper"),
    Command(("robustness",), "the relearning protocol on one unlearned model: held-out split, attack grid with "
                             "its envelope, base-model, benign and fictional-fact controls, capability and fluency. "
                             "The verdict on a run; for one attack curve on a corpus you choose use `tamper`, which "
                             "runs the same fine-tuning attack",
            RobustnessConfig, "lensunlearn.attack.protocol:run_robustness"),
]
