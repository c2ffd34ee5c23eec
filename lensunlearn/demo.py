"""`lensunlearn demo`: the whole loop on the embedded model, with nothing to download.

Stages: fact benchmark -> lens -> base evaluation (with knowledge profile) -> unlearning
(`--preset small`) -> evaluation after unlearning -> held-out tamper attack -> report. Each stage
writes its output atomically and is skipped when a rerun finds that output.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch

from .cli import Command
from .config import ConfigError, option, write_json_atomic
from .models import EMBEDDED_MODEL

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = option("demo_out", "folder for every stage's output and report.md")
    model: str = option(EMBEDDED_MODEL, "model to run the story on (the embedded SmolLM2-135M by default)")
    forget_domain: str = option("country_capital", "fact domain to unlearn and attack")
    retain_domains: tuple[str, ...] = option(("element_symbol", "us_state_capital"), "fact domains that must survive")
    lens_steps: int = option(60, "lens training steps (8 documents each)")
    unlearn_examples: int | None = option(800, "forget/retain pairs: 800 (one pass over the country sentences) "
                                               "keeps the demo within 8 minutes on 2 CPU cores; None takes the "
                                               "small preset's 1600, which forgets more in twice the time")
    unlearn_layers: tuple[int, ...] | None = option(None, "target layers; None keeps the small preset's")
    optimizer: Literal["adamw", "muon"] = option("adamw", "unlearning optimiser")
    tamper_lr: float = option(1e-4, "learning rate of the held-out tamper attack")
    tamper_examples: int = option(64, "attack chunks (fact sentences of the attacked half)")
    holdout: float = option(0.5, "fraction of the forget domain's facts the attack never sees")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "weights dtype")
    device: str | None = option(None, "cpu or cuda; None picks cuda when available")
    eval_batch: int = option(32, "questions per evaluation forward pass")
    overwrite: bool = option(False, "delete --out first and run every stage again")

    def __post_init__(self) -> None:
        from .facts import DOMAINS

        unknown = [d for d in (self.forget_domain, *self.retain_domains) if d not in DOMAINS]
        if unknown:
            raise ConfigError(f"unknown fact domain(s) {unknown}: choose from {', '.join(DOMAINS)}")
        if self.forget_domain in self.retain_domains:
            raise ConfigError("--forget_domain must not also be a retain domain")

    @property
    def tasks(self) -> list[str]:
        return [f"facts:{d}" for d in (self.forget_domain, *self.retain_domains)]


# Rough seconds per stage on a 2-core CPU, for the ETA before any stage has been timed.
EXPECTED_SECONDS = {"facts": 1, "lens": 180, "base eval": 60, "unlearn": 150, "unlearned eval": 60,
                    "tamper": 120, "report": 5}


class Stages:
    """Runs named stages in order, skipping finished ones, with headers and a running ETA."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.began, self.spent, self.expected_done = names, time.perf_counter(), 0.0, 0.0

    def run(self, name: str, done: Path, fn: Callable[[], None]) -> None:
        index = self.names.index(name) + 1
        remaining = sum(EXPECTED_SECONDS[n] for n in self.names[index - 1:])
        # scale the table by how fast this machine has been, once enough has run to tell
        pace = self.spent / self.expected_done if self.expected_done >= 60 else 1.0
        header = f"[{index}/{len(self.names)}] {name}"
        if done.exists():
            log.info("%s: already done (%s), skipping", header, done)
            return
        log.info("=" * 8 + " %s (ETA for the rest: ~%.0f min) " + "=" * 8, header, remaining * pace / 60)
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        self.spent += elapsed
        self.expected_done += EXPECTED_SECONDS[name]
        log.info("%s finished in %.0f s (%.1f min since start)", header, elapsed,
                 (time.perf_counter() - self.began) / 60)


def _evaluate_with_profile(cfg: DemoConfig, model_name: str, lens_dir: Path, out: Path, title: str) -> None:
    from .evaluate import evaluate, results_table
    from .lens import TunedLens
    from .models import load_model
    from .profile import plot_profile, profile_table

    model, tokenizer = load_model(model_name, cfg.dtype, cfg.device)
    # The profile's lens product in bfloat16 (3x faster here); the model's own answers stay float32.
    lens = TunedLens.load(lens_dir, model).set_matmul_dtype(torch.bfloat16)
    result = evaluate(model, tokenizer, cfg.tasks, format="cloze", batch_size=cfg.eval_batch, lens=lens,
                      predictions_path=out.with_suffix(".predictions.jsonl"), model_name=model_name)
    print(results_table(result))
    if "profile" in result:
        print(profile_table(result["profile"]))
        plot_profile(result["profile"], out.with_suffix(".profile.png"), title)
    write_json_atomic(out, result)


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage that has no output yet; return the path of report.md."""
    from .facts import write_questions
    from .lens_train import LensEvalConfig, LensTrainConfig, eval_lens, train_lens
    from .report import ReportConfig, run_report
    from .tamper import TamperConfig, run_tamper
    from .unlearn import SMALL, unlearn

    out = Path(cfg.out)
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    lens_dir, run_name = out / "lens", "unlearn"
    run_dir = out / run_name
    stages = Stages(list(EXPECTED_SECONDS))
    began = time.perf_counter()

    def facts() -> None:
        for domain in (cfg.forget_domain, *cfg.retain_domains):
            write_questions(domain, out / "facts" / f"{domain}.jsonl")
    stages.run("facts", out / "facts" / f"{cfg.retain_domains[-1]}.jsonl", facts)

    def lens() -> None:
        common = dict(model=cfg.model, dtype=cfg.dtype, device=cfg.device, data="facts:all")
        train_lens(LensTrainConfig(**common, out=str(lens_dir), steps=cfg.lens_steps, resume=(lens_dir /
                                   "checkpoint.pt").exists()))
        eval_lens(LensEvalConfig(**common, lens=str(lens_dir), out=str(out / "lens_eval.json"), lens_matmul="bfloat16"))
    stages.run("lens", out / "lens_eval.json", lens)

    stages.run("base eval", out / "base_eval.json",
               lambda: _evaluate_with_profile(cfg, cfg.model, lens_dir, out / "base_eval.json", "before unlearning"))

    def run_unlearn() -> None:
        small = replace(SMALL, model=cfg.model, lens=str(lens_dir), out=str(out), run_name=run_name,
                        optimizer=cfg.optimizer, eval_tasks=",".join(cfg.tasks), eval_base=False,
                        dtype=cfg.dtype, device=cfg.device, resume=(run_dir / "checkpoint.pt").exists(),
                        forget=f"facts:{cfg.forget_domain}",
                        retain="+".join(f"facts:{d}" for d in cfg.retain_domains))
        if cfg.unlearn_examples:
            small = replace(small, examples=cfg.unlearn_examples)
        if cfg.unlearn_layers:
            small = replace(small, layers=cfg.unlearn_layers)
        unlearn(small)
    stages.run("unlearn", run_dir / "eval.json", run_unlearn)

    stages.run("unlearned eval", out / "unlearned_eval.json",
               lambda: _evaluate_with_profile(cfg, str(run_dir / "merged"), lens_dir, out / "unlearned_eval.json",
                                              "after unlearning"))

    def tamper() -> None:
        run_tamper(TamperConfig(model=str(run_dir), forget=f"facts:{cfg.forget_domain}", holdout=cfg.holdout,
                                eval_tasks=",".join(cfg.tasks[:2]), eval_format="cloze", lr=cfg.tamper_lr,
                                examples=cfg.tamper_examples, max_length=64, batch=8, per_device_batch=8,
                                eval_every=2, original=str(out / "base_eval.json"), out=str(out / "tamper"),
                                overwrite=True, dtype=cfg.dtype, device=cfg.device))
    stages.run("tamper", out / "tamper" / "tamper.png", tamper)

    stages.run("report", out / "report.md", lambda: run_report(ReportConfig(
        runs=(str(run_dir),), tamper=(str(out / "tamper"),), baseline=str(out / "base_eval.json"), out=str(out))))
    write_json_atomic(out / "demo_time.json", {"seconds_this_invocation": time.perf_counter() - began})
    log.info("demo finished: %s", out / "report.md")
    print((out / "report.md").read_text())
    return out / "report.md"


COMMANDS = [Command(("demo",), "the whole story on the embedded model: lens, evaluation, unlearning, tamper attack, "
                               "report", DemoConfig, run_demo)]
