"""`lensunlearn demo`: the whole loop on the embedded model, with nothing to download.

Stages: fact benchmark -> lens -> base evaluation (with knowledge profile) -> unlearning
(`--preset robust` on the forget part of the domain, retaining on everyday text and the retain parts;
with --no-selective on the whole domain, stopping at its general-text loss budget) -> evaluation after
unlearning ->
held-out relearning attack with the strongest setting the robustness protocol found -> report. Each stage
writes its output atomically. The folder keeps the demo's flags and the stages finished with them
(`core.paths.DEMO_STATE_FILE`): a rerun with the same flags skips those stages and continues an interrupted
one from its checkpoint; a rerun with other flags is refused (they would mix results of two
settings) unless `--overwrite` asks to run every stage again, each stage's old output being
replaced only once its new one is complete.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..core.atomic import write_json_atomic
from ..core.config import ConfigError
from ..core.paths import (
    BASE_EVAL_FILE,
    CHECKPOINT_FILE,
    DEMO_FACTS_DIR,
    DEMO_LENS_DIR,
    DEMO_LENS_EVAL_FILE,
    DEMO_STATE_FILE,
    DEMO_TAMPER_DIR,
    DEMO_TIME_FILE,
    DEMO_UNLEARN_RUN,
    DEMO_UNLEARNED_EVAL_FILE,
    EVAL_FILE,
    LENS_PLOT_SUFFIX,
    MERGED_DIR,
    PREDICTIONS_SUFFIX,
    PROFILE_PLOT_SUFFIX,
    REPORT_FILE,
    RESULTS_FILE,
    TAMPER_PLOT_FILE,
    beside,
)
from .options import DemoConfig

log = logging.getLogger(__name__)


# The lens table is a report, not an input of any later stage: 128 of the 283 held-out documents give
# every layer's KL within 6 % of what all of them give, in 24 s instead of 61 s on 2 cores.
LENS_EVAL_DOCS = 128

# Rough seconds per stage on 2 cores of a CPU with native bfloat16, for the ETA before any stage has
# been timed; the lens and unlearning stages add their seconds per step. Measured on the default story
# (2026-12-08: lens 287 s for 120 steps, unlearning 680 s for 50, 18 min in all); the whole-relation
# story's run stops at its budget after about 20 steps (262 s), so its estimate stops there too.
STAGE_SECONDS = {"facts": 1, "lens": 30, "base eval": 15, "unlearn": 10, "unlearned eval": 15, "tamper": 90,
                 "report": 5}
LENS_SECONDS_PER_STEP = 2.2
UNLEARN_SECONDS_PER_STEP = 13.6
BUDGET_STOP_STEPS = 20


def expected_seconds(cfg: DemoConfig) -> dict[str, float]:
    """Each stage's rough seconds for these flags: the lens scored or trained for --lens_steps, and the
    unlearning run's planned steps (at most BUDGET_STOP_STEPS when it stops at its budget)."""
    from ..unlearning.options import ROBUST

    table: dict[str, float] = dict(STAGE_SECONDS)
    if not cfg.lens:
        table["lens"] += LENS_SECONDS_PER_STEP * cfg.lens_steps
    settings = cfg.unlearn_settings()
    steps = math.ceil(settings.get("examples", ROBUST.examples) * ROBUST.epochs / ROBUST.batch)
    if settings.get("cir_on_loss_rise") == "stop":
        steps = min(steps, BUDGET_STOP_STEPS)
    table["unlearn"] += UNLEARN_SECONDS_PER_STEP * steps
    return table


# Flags that do not change any stage's result: a rerun may change them freely.
RERUN_MAY_CHANGE = ("overwrite", "device", "eval_batch")


def claim_out(cfg: DemoConfig) -> dict:
    """The demo's state in --out ({"config", "started", "done"}), after refusing a folder that is not a
    demo's, or one made with other flags (unless --overwrite). Nothing is deleted here."""
    from ..core.config import current_names, to_jsonable
    from ..core.outputs import is_empty, output_kind
    from ..core.paths import write_marker

    out = Path(cfg.out)
    config = to_jsonable(cfg)
    fresh = {"config": config, "started": [], "done": []}
    if out.exists() and not (out.is_dir() and is_empty(out)):
        if not out.is_dir() or output_kind(out) != "demo":
            raise FileExistsError(f"--out {out} exists and is not a demo folder: refusing to write into it; choose "
                                  f"another --out")
        path = out / DEMO_STATE_FILE
        state = json.loads(path.read_text()) if path.is_file() else None
        if cfg.overwrite:
            state = fresh
        elif state is None:
            raise FileExistsError(f"--out {out} holds a demo made by an older version, without its flags: pass "
                                  f"--overwrite to run every stage again, or choose another --out")
        else:
            state["config"] = current_names(DemoConfig, state["config"])
            differ = [k for k in config if k not in RERUN_MAY_CHANGE and state["config"].get(k) != config[k]]
            if differ:
                changes = ", ".join(f"--{k} {state['config'].get(k)} -> {config[k]}" for k in differ)
                raise ConfigError(f"--out {out} holds a demo made with other flags ({changes}): pass --overwrite to "
                                  f"rerun every stage with the new flags, or choose another --out")
            state["config"] = config
    else:
        state = fresh
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")
    write_json_atomic(out / DEMO_STATE_FILE, state)
    return state


class Stages:
    """Runs named stages in order, skipping those finished with these flags, with headers and a running ETA."""

    def __init__(self, expected: dict[str, float], out: Path | None = None, state: dict | None = None) -> None:
        self.expected, self.names = expected, list(expected)
        self.began, self.spent, self.expected_done = time.perf_counter(), 0.0, 0.0
        self.out, self.state = out, state if state is not None else {"started": [], "done": []}
        self.resuming = False

    def started(self, name: str) -> bool:
        """Whether an earlier invocation with these flags began this stage (its checkpoint may be resumed)."""
        return name in self.state["started"]

    def _mark(self, key: str, name: str) -> None:
        if name not in self.state[key]:
            self.state[key].append(name)
        if self.out is not None:
            write_json_atomic(self.out / DEMO_STATE_FILE, self.state)

    def run(self, name: str, done: Path, fn: Callable[[], None]) -> None:
        index = self.names.index(name) + 1
        remaining = sum(self.expected[n] for n in self.names[index - 1:])
        # scale the table by how fast this machine has been, once enough has run to tell
        pace = self.spent / self.expected_done if self.expected_done >= 60 else 1.0
        header = f"[{index}/{len(self.names)}] {name}"
        if name in self.state["done"] and done.exists():
            log.info("%s: already done (%s), skipping", header, done)
            return
        log.info("=" * 8 + " %s (ETA for the rest: ~%.0f min) " + "=" * 8, header, remaining * pace / 60)
        started = time.perf_counter()
        self.resuming = self.started(name)  # begun earlier with these flags: its checkpoint may be continued
        self._mark("started", name)
        fn()
        self._mark("done", name)
        elapsed = time.perf_counter() - started
        self.spent += elapsed
        self.expected_done += self.expected[name]
        log.info("%s finished in %.0f s (%.1f min since start)", header, elapsed,
                 (time.perf_counter() - self.began) / 60)


def _evaluate_with_profile(cfg: DemoConfig, model_name: str, lens_dir: Path, out: Path, title: str) -> None:
    from ..eval.evaluate import evaluate, results_table
    from ..eval.knowledge_profile import profile_table
    from ..lens.tuned_lens import TunedLens
    from ..modeling.loading import load_model
    from ..report.plots import plot_profile

    model, tokenizer = load_model(model_name, cfg.dtype, cfg.device, cfg.trust_remote_code)
    # The profile's lens product in bfloat16 (3x faster here); the model's own answers stay float32.
    lens = TunedLens.load(lens_dir, model).set_matmul_dtype(torch.bfloat16)
    result = evaluate(model, tokenizer, cfg.tasks, format="cloze", batch_size=cfg.eval_batch, lens=lens,
                      predictions_path=beside(out, PREDICTIONS_SUFFIX), model_name=model_name)
    print(results_table(result))
    if "profile" in result:
        print(profile_table(result["profile"]))
        plot_profile(result["profile"], beside(out, PROFILE_PLOT_SUFFIX), title)
    write_json_atomic(out, result)


def _domain(task: str) -> str:
    """A task's name in the demo's tables: "country capital", or "country capital, kept part"."""
    domain, _, part = task.removeprefix("facts:").partition("@")
    return domain.replace("_", " ") + (f", {part} part" if part else "")


def demo_summary(cfg: DemoConfig, out: Path) -> list[str]:
    """The demo's own section of report.md: each domain before unlearning, after it and after the
    held-out attack, the attack's two halves step by step, and the figures of the earlier stages."""
    from ..core.errors import read_json
    from ..report.run_results import load_run, steps_planned, steps_taken
    from ..report.tables import learning_rate, markdown_table, percent
    from ..report.tamper_results import ATTACKED, HELDOUT

    def acc(result: dict, task: str) -> float | None:
        return (result.get("results", {}).get(task) or {}).get("acc")

    before, after = read_json(out / BASE_EVAL_FILE), read_json(out / DEMO_UNLEARNED_EVAL_FILE)
    attack = read_json(out / DEMO_TAMPER_DIR / RESULTS_FILE)
    records = attack["records"]
    run = load_run(out / DEMO_UNLEARN_RUN)
    taken, planned = steps_taken(run), steps_planned(run)
    stop = f"stopped at step {taken} of {planned}" if taken != planned else f"{taken} steps"
    forget, kept = cfg.tasks[0], cfg.tasks[1:]
    last = records[-1]["tasks"]
    header = ["", f"{_domain(forget)} (forgotten)", *(f"{_domain(t)} (kept)" for t in kept)]
    rows = [["before", *(percent(acc(before, t), 2, unit="%") for t in cfg.tasks)],
            [f"after `--preset robust` ({stop})", *(percent(acc(after, t), 2, unit="%") for t in cfg.tasks)],
            [f"after the held-out attack ({records[-1]['step']} steps): unseen half",
             percent(last[f"{forget}:{HELDOUT}"]["acc"], 2, unit="%"),
             *(percent(last[t]["acc"], 2, unit="%") if t in last else "-" for t in kept)]]
    halves = [["before the attack" if r["step"] == 0 else f"after {r['step']} steps",
               *(percent(r["tasks"][f"{forget}:{half}"]["acc"], 2, unit="%") for half in (ATTACKED, HELDOUT))]
              for r in records]
    profiles = [beside(name, PROFILE_PLOT_SUFFIX).name for name in (BASE_EVAL_FILE, DEMO_UNLEARNED_EVAL_FILE)]
    lens_plot = beside(DEMO_LENS_EVAL_FILE, LENS_PLOT_SUFFIX).name
    if cfg.selective:
        neighbours = "".join(f" and {_domain(d)}" for d in cfg.neighbour_domains)
        what = (f"The forget part of {_domain(cfg.forget_domain)} (half its facts) unlearned with `unlearn --preset "
                f"robust` through a tuned lens, retaining on everyday text and the retain parts of "
                f"{_domain(cfg.forget_domain)}{neighbours}; the kept parts and the other kept domains evaluated but "
                f"never trained on; then a held-out relearning attack within the forget part: ")
    else:
        what = (f"{_domain(forget).capitalize()} unlearned with `unlearn --preset robust` through a tuned lens, the "
                f"kept domains evaluated but never trained on; then a held-out relearning attack: ")
    return ["## The demo", "",
            what +
            f"{'full-parameter' if attack['config'].get('full', True) else 'LoRA'} fine-tuning at lr "
            f"{learning_rate(attack['config']['lr'])} on {attack['config']['chunks']} sentences about "
            f"{attack['config']['num_attacked_facts']} of the facts (the attacked half), measured as well on the "
            f"facts it never trained on (the unseen half).", "",
            markdown_table(header, rows), "",
            markdown_table(["held-out attack", "attacked half", "unseen half"], halves), "",
            f"![held-out attack]({DEMO_TAMPER_DIR}/{TAMPER_PLOT_FILE})", "",
            "Knowledge profile (accuracy through the tuned lens at every layer) before and after unlearning, and "
            "the lens's KL to the model's output by layer:", "",
            f"![profile before]({profiles[0]}) ![profile after]({profiles[1]}) ![lens KL]({lens_plot})", ""]


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage that has no output yet; return the path of report.md."""
    from ..core.errors import Interrupted

    try:
        return _run_demo(cfg)
    except Interrupted:
        raise
    except KeyboardInterrupt as err:
        raise Interrupted("rerun the same command to continue; finished stages are skipped") from err


def _run_demo(cfg: DemoConfig) -> Path:
    from ..attack.tamper import TamperConfig, run_tamper
    from ..data.facts import write_questions
    from ..lens.evaluate import LensEvalConfig, eval_lens
    from ..lens.train import LensTrainConfig, train_lens
    from ..report.command import ReportConfig, run_report
    from ..unlearning.options import robust_on_split
    from ..unlearning.run import ROBUST, unlearn

    out = Path(cfg.out)
    state = claim_out(cfg)
    lens_dir, run_dir = Path(cfg.lens) if cfg.lens else out / DEMO_LENS_DIR, out / DEMO_UNLEARN_RUN
    base_eval, tamper_dir = out / BASE_EVAL_FILE, out / DEMO_TAMPER_DIR
    stages = Stages(expected_seconds(cfg), out, state)

    def continue_or_replace(folder: Path) -> dict:
        """resume= / overwrite= for a stage's command: continue its checkpoint if this stage was begun
        with these flags, else replace whatever an earlier demo left there."""
        from ..core.outputs import staging_path

        resume = stages.resuming and any((f / CHECKPOINT_FILE).exists() for f in (folder, staging_path(folder)))
        return {"resume": resume, "overwrite": not resume}
    began = time.perf_counter()

    def facts() -> None:
        for domain in (cfg.forget_domain, *cfg.kept_domains):
            write_questions(domain, out / DEMO_FACTS_DIR / f"{domain}.jsonl")
    stages.run("facts", out / DEMO_FACTS_DIR / f"{cfg.kept_domains[-1]}.jsonl", facts)

    def lens() -> None:
        common = dict(cfg.model_options(), corpus="facts:all")
        if cfg.lens:
            log.info("using the tuned lens in %s (--lens); not training one", lens_dir)
        else:
            train_lens(LensTrainConfig(**common, out=str(lens_dir), steps=cfg.lens_steps,
                                       **continue_or_replace(lens_dir)))
        eval_lens(LensEvalConfig(**common, lens=str(lens_dir), out=str(out / DEMO_LENS_EVAL_FILE), overwrite=True,
                                 lens_matmul="bfloat16", eval_limit=LENS_EVAL_DOCS))
    stages.run("lens", out / DEMO_LENS_EVAL_FILE, lens)

    stages.run("base eval", base_eval,
               lambda: _evaluate_with_profile(cfg, cfg.model, lens_dir, base_eval, "before unlearning"))

    def run_unlearn() -> None:
        # The preset as a user runs it on the same data (on a split relation: its budget on held-out
        # text), so that the kept domains and parts measure collateral damage on facts no loss saw.
        changes = cfg.unlearn_settings()
        preset = robust_on_split(ROBUST, {"forget": cfg.forget_source, "retain": cfg.retain})
        robust = replace(preset, **cfg.model_options(), lens=str(lens_dir), out=str(out), run_name=DEMO_UNLEARN_RUN,
                         eval_tasks=",".join(cfg.tasks), eval_base=False, forget=cfg.forget_source,
                         retain=cfg.retain, **continue_or_replace(run_dir), **changes)
        unlearn(robust)
    stages.run("unlearn", run_dir / EVAL_FILE, run_unlearn)

    stages.run("unlearned eval", out / DEMO_UNLEARNED_EVAL_FILE,
               lambda: _evaluate_with_profile(cfg, str(run_dir / MERGED_DIR), lens_dir, out / DEMO_UNLEARNED_EVAL_FILE,
                                              "after unlearning"))

    def tamper() -> None:
        run_tamper(TamperConfig(**cfg.model_options() | {"model": None}, run=str(run_dir),
                                forget=cfg.forget_source,
                                holdout=cfg.holdout, eval_tasks=",".join(cfg.tasks), eval_format="cloze",
                                lr=cfg.tamper_lr, full=cfg.tamper_full, forget_limit=cfg.tamper_limit,
                                steps=cfg.tamper_steps, schedule="constant", max_length=64, batch=8,
                                per_device_batch=8, eval_every=32, baseline=str(base_eval), out=str(tamper_dir),
                                overwrite=True))
    stages.run("tamper", tamper_dir / TAMPER_PLOT_FILE, tamper)

    report = out / REPORT_FILE
    stages.run("report", report, lambda: run_report(ReportConfig(
        runs=(str(run_dir),), tamper=(str(tamper_dir),), baseline=str(base_eval), out=str(out)),
        preface=demo_summary(cfg, out)))
    write_json_atomic(out / DEMO_TIME_FILE, {"seconds_this_invocation": time.perf_counter() - began})
    log.info("demo finished: %s", report)
    print(report.read_text())
    return report

