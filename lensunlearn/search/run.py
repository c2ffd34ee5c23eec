"""`search`: run, measure and rank the points of a grid search (its options and plan: `search.options`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import types
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..attack.protocol import RobustnessConfig, run_robustness
from ..core.atomic import write_json_atomic, write_text_atomic
from ..core.config import ConfigError, to_jsonable
from ..core.errors import InputError, Interrupted, read_json
from ..core.outputs import Output, check_not_input, is_empty, is_ours, prepare_output, recover, staging_path
from ..core.paths import (
    BASE_EVAL_FILE,
    EVAL_FILE,
    MERGED_DIR,
    ROBUSTNESS_CONFIG_FILE,
    ROBUSTNESS_FILE,
    RUN_CONFIG_FILE,
    SEARCH_BASE_DIR,
    SEARCH_FILE,
    SEARCH_PLOT_FILE,
    SEARCH_POINTS_DIR,
    SEARCH_ROBUSTNESS_DIR,
    SEARCH_RUNS_DIR,
    SEARCH_TABLE_FILE,
    SUMMARY_FILE,
)
from ..data.tasks import check_tasks
from ..report.plots import plot_search
from ..report.robustness_results import worst_case_sources
from ..report.tables import markdown_table as table
from ..report.tables import number, percent
from ..report.tamper_results import task_display
from ..train.loop import NonFiniteLossError
from ..unlearning.distill import RESUME_MAY_CHANGE as DISTILL_MAY_CHANGE
from ..unlearning.distill import DistillConfig, distill
from ..unlearning.distill import resolve as resolve_distill
from ..unlearning.run import (
    RESUME_MAY_CHANGE,
    UnlearnConfig,
    check_model_fit,
    eval_request,
    reusable_eval,
    unlearn,
)
from ..unlearning.run import read_paths as unlearn_read_paths
from .options import (
    Point,
    SearchConfig,
    check_measurable,
    eval_tasks,
    forget_task,
    show_value,
)

log = logging.getLogger(__name__)

# Protocol seeds (splits of the forget facts) an order of methods needs before it means more than the split:
# the unseen half's envelope moves by several points from one split to the next.
RANKING_SEEDS = 3
TOLERANCE = 1e-9  # a number at a target's threshold meets it, whatever the float sums round to
ABILITY_ORDER = {"kept": 0, "unmeasured": 1, "lost": 2}
RANKING = ("points that keep general ability (every kept domain and the perplexity measured and within "
           "their targets) first; then points with a capability target left unmeasured and none missed; then "
           "points that miss a capability target, however well they forget (breaking a model makes it forget "
           "everything); then points that did not finish. Within each group: lowest unseen-half envelope "
           "after the attack first (robustness), then lowest forget-domain accuracy; ties keep grid order")


# --- what measuring a point reads ------------------------------------------------------------------------


def measured(point: Point) -> Any:
    """What measuring reads of a point's config: the model it started from (`model`), its forget corpus
    (`forget`), its evaluation settings and its run folder (`out`, `name`). An unlearn config holds all of
    them; a distill config's model and forget corpus are its source run's."""
    if isinstance(point.config, UnlearnConfig):
        return point.config
    return types.SimpleNamespace(**vars(point.config), name=point.config.name, model=point.source["model"],
                                 forget=point.source["forget"])


def with_source(cfg: SearchConfig, point: Point) -> Point:
    """A distillation point with its source run read (refused unless a finished unlearning run that names
    its base model and forget corpus) and its evaluation settings filled in from it, as `distill` does;
    the search does this once it runs, before anything trains, since the run is a file to read."""
    config, source = resolve_distill(point.config)
    missing = [key for key in ("model", "forget") if not source.get(key)]
    if missing:
        raise InputError(f"--run {config.run}: its {RUN_CONFIG_FILE} names no {missing[0]}, which measuring the "
                         f"distilled model needs: pass a run written by `lensunlearn unlearn`")
    check_measurable(cfg, config, f"grid point {point.label}")
    return replace(point, config=config, source=source)


# --- before anything trains ---------------------------------------------------------------------------


def search_reads(cfg: SearchConfig) -> list[tuple[str, Any]]:
    """What the points read from disk (models, lenses, corpora, the runs a distillation distils), which the
    search's folder may never hold."""
    flag = f"--{cfg.stage}"
    reads: list[tuple[str, Any]] = []
    for point in cfg.plan.points:
        config = point.config
        if isinstance(config, UnlearnConfig):
            reads += [(f"{flag} {what}", value) for what, value in unlearn_read_paths(config)]
        else:
            reads += [(f"{flag} --run", config.run)]
    return reads


def claim_out(cfg: SearchConfig) -> Output:
    """The search's folder: new, or (rerun without --overwrite) the earlier search to continue, which
    must be a search's; `--overwrite` writes beside it and swaps the new search in at the end. An
    interrupted `--overwrite` is continued by the same command (--overwrite again) and by nothing else,
    so that rerunning an older command without the flag never finishes a replacement it did not ask for;
    one started with other settings is discarded and started over."""
    final = Path(cfg.out)
    recover(final, "search")
    staging = staging_path(final)
    replacing = is_ours(staging, "search") and not is_empty(staging)
    reads = search_reads(cfg)
    if replacing and not cfg.overwrite:
        check_not_input(final, reads, "--out")
        raise FileExistsError(f"{staging} holds an interrupted replacement of {final}, started with --overwrite: "
                              f"rerun with --overwrite to continue it, or move {staging} away to keep {final} as it "
                              f"is")
    if replacing and _started_otherwise(cfg, staging):
        log.warning("%s holds a replacement of %s started with other settings: starting it over", staging, final)
        return prepare_output(final, "search", overwrite=True, finished=lambda _: False, reads=reads)
    continuing = replacing or (not cfg.overwrite and final.is_dir() and not is_empty(final))
    return prepare_output(final, "search", overwrite=cfg.overwrite and not replacing, resume=continuing,
                          finished=lambda _: False, reads=reads)


def _started_otherwise(cfg: SearchConfig, work: Path) -> bool:
    """Whether the search in `work` was started with settings other than `cfg`'s (or wrote none yet)."""
    path = work / SEARCH_FILE
    summary = read_json(path) if path.is_file() else None
    saved = summary.get("config") if isinstance(summary, dict) else None
    return saved != json.loads(json.dumps(to_jsonable(cfg)))


def differences(saved: dict, config: Any, may_change: typing.Iterable[str]) -> str:
    """'--lr 0.001 -> 0.01, ...': the settings of `config` that a saved config of it holds otherwise."""
    now, skip = to_jsonable(config), set(may_change)
    normal = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return ", ".join(f"--{key} {show_value(saved[key])} -> {show_value(value)}" for key, value in now.items()
                     if key not in skip and key in saved and normal(saved[key]) != normal(value))


def check_points(cfg: SearchConfig, points: list[Point], work: Path) -> None:
    """What can be refused before the first run trains: every point's tasks and lens, a run (finished or
    not) or a finished robustness output of other settings, and (robustness) forget corpora and tasks
    without fact ids."""
    from ..lens.tuned_lens import find_lens
    from ..modeling.loading import load_model_config
    from ..train.tracking import check_tracker

    for tasks, include in {(p.config.eval_tasks, p.config.lm_eval_include) for p in points}:
        check_tasks(tasks, lm_eval_include=include)
    for tracked in {p.config.tracker for p in points} - {None}:
        check_tracker(types.SimpleNamespace(tracker=tracked))
    if cfg.stage == "unlearn":
        for lens, model in {(p.config.lens, p.config.model) for p in points if p.config.objective == "lens"}:
            find_lens(lens, model)
        # every point's layers and CIR options against its model's config.json (no weights loaded), so that a
        # value the model cannot take is refused before the first point trains, not when its turn comes
        model_configs: dict[tuple[str, bool], Any] = {}
        for point in points:
            key = (point.config.model, point.config.trust_remote_code)
            if key not in model_configs:
                model_configs[key] = load_model_config(*key)
            try:
                check_model_fit(point.config, model_configs[key])
            except ValueError as err:  # a ConfigError stays one (exit 2), as on the point's own command line
                raise type(err)(f"grid point {point.label}: {err}") from None
    for point in points:
        run = run_dir_of(point.config)
        if (run / RUN_CONFIG_FILE).is_file():
            changed = differences(read_json(run / RUN_CONFIG_FILE), point.config, may_change(cfg))
            if changed:
                raise ConfigError(f"{run} was trained with other settings ({changed}): {cfg.out} holds another "
                                  f"search; choose another --out, or pass --overwrite to start over")
    if cfg.plan.robustness is None:
        return
    from ..attack.protocol import RESUME_MAY_CHANGE as ROBUSTNESS_MAY_CHANGE
    from ..attack.protocol import corpus_rows, forget_items, resolve

    for forget, task in {(measured(p).forget, robustness_task(cfg, p)) for p in points}:
        corpus_rows(forget)
        forget_items(task)
    for point in points:
        out = robustness_dir(work, point)
        if (out / ROBUSTNESS_FILE).is_file():  # read back later, so it must be of these settings, seeds included
            changed = differences(read_json(out / ROBUSTNESS_CONFIG_FILE), resolve(robustness_config(cfg, point, out)),
                                  set(ROBUSTNESS_MAY_CHANGE) - {"seeds"})
            if changed:
                raise ConfigError(f"{out} was measured with other robustness settings ({changed}): choose another "
                                  f"--out, or pass --overwrite to start the search over")


# --- running and measuring one point --------------------------------------------------------------------


def may_change(cfg: SearchConfig) -> tuple[str, ...]:
    """The settings a run of the searched command may hold otherwise and still be the point's run."""
    return RESUME_MAY_CHANGE if cfg.stage == "unlearn" else DISTILL_MAY_CHANGE


def train(cfg: SearchConfig, config: UnlearnConfig | DistillConfig) -> None:
    (unlearn if cfg.stage == "unlearn" else distill)(config)


def run_point(cfg: SearchConfig, point: Point, work: Path) -> dict:
    """Train the point's run unless it is finished (continuing an interrupted one), then measure it; a
    measured point whose run and measuring settings are unchanged is read back."""
    run, record_path = run_dir_of(point.config), work / SEARCH_POINTS_DIR / f"{point.name}.json"
    saved = read_json(record_path) if record_path.is_file() else {}
    summary = read_json(run / SUMMARY_FILE) if (run / SUMMARY_FILE).is_file() else None
    if saved.get("status") == "finished" and summary is not None and saved.get("run_summary") == summary \
            and saved.get("measured_with") == measured_with(cfg):
        log.info("%s: finished and measured earlier", point.label)
        return saved
    config_key = f"{cfg.stage}_config"
    if saved.get("status") == "diverged" and summary is None and config_key in saved and \
            not differences(saved[config_key], point.config, may_change(cfg)):
        log.info("%s: diverged earlier (%s)", point.label, saved["error"])
        return saved
    record: dict[str, Any] = {"name": point.name, "settings": point.settings,
                              "run_dir": str(Path(cfg.out) / SEARCH_RUNS_DIR / point.name),
                              config_key: to_jsonable(point.config)}
    began = time.perf_counter()
    if summary is None:
        resume = run.is_dir() and not is_empty(run)
        log.info("%s: %s", point.label, "continuing its interrupted run" if resume else "training")
        try:
            train(cfg, replace(point.config, resume=resume))
        except NonFiniteLossError as err:
            log.warning("%s diverged: %s", point.label, err)
            record.update(status="diverged", error=str(err), seconds={"this_search": time.perf_counter() - began})
            write_json_atomic(record_path, record)
            return record
        summary = read_json(run / SUMMARY_FILE)
    metrics = measure(cfg, point, work)
    record.update(status="finished", metrics=metrics, measured_with=measured_with(cfg), run_summary=summary,
                  seconds={cfg.stage: summary.get("wall_seconds"),
                           "robustness": metrics.get("robustness", {}).get("wall_seconds"),
                           "this_search": round(time.perf_counter() - began, 1)})
    write_json_atomic(record_path, record)
    return record


def measured_with(cfg: SearchConfig) -> dict:
    """The settings a point's metrics depend on besides its run (the targets only judge them)."""
    return {"measure": cfg.measure, "forget_task": cfg.forget_task, "generic": cfg.generic,
            # the record's key keeps the flag's former name, so that a search measured before it was renamed
            # is recognised as measured with the same settings
            "robustness_args": cfg.robustness if cfg.measure == "robustness" else None}


def measure(cfg: SearchConfig, point: Point, work: Path) -> dict:
    metrics = accuracies(cfg, measured(point), work)
    if cfg.measure == "robustness":
        metrics.update(robustness_metrics(cfg, point, work))
    elif cfg.generic:
        metrics["perplexity"] = perplexity_ratio(cfg, measured(point), work)
    return metrics


def _digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def accuracy(result: dict, task: str, path: Path) -> float:
    key = task_display(task)
    found = result.get("results", {}).get(key) or result.get("groups", {}).get(key)
    if found is None or found.get("acc") is None:
        raise InputError(f"{path} has no accuracy for task {key}: the run was evaluated on other tasks")
    return float(found["acc"])


def base_evaluation(config: Any, work: Path) -> tuple[dict, Path]:
    """The base model's accuracies on the run's eval tasks (`config` as `measured` gives it): the run's
    base_eval.json, else the search's own evaluation of the same request, made once and shared by every
    point."""
    own = run_dir_of(config) / BASE_EVAL_FILE
    if own.is_file() and reusable_eval(own, config):
        return read_json(own), own
    path = work / SEARCH_BASE_DIR / f"eval_{_digest(eval_request(config))}.json"
    if path.is_file() and reusable_eval(path, config):
        return read_json(path), path
    from ..eval.evaluate import evaluate
    from ..modeling.loading import load_model

    log.info("evaluating the base model %s once for every point without a %s", config.model, BASE_EVAL_FILE)
    model, tokenizer = load_model(config.model, config.dtype, config.device, config.trust_remote_code)
    result = evaluate(model, tokenizer, config.eval_tasks, format=config.eval_format, batch_size=config.eval_batch,
                      limit=config.eval_limit, model_name=config.model)
    result["request"] = eval_request(config)
    write_json_atomic(path, result)
    return result, path


def run_dir_of(config: Any) -> Path:
    return Path(config.out) / config.name


def accuracies(cfg: SearchConfig, config: Any, work: Path) -> dict:
    """Forget-domain and kept-domain accuracies of the run, each beside the base model's and as a ratio."""
    path = run_dir_of(config) / EVAL_FILE
    result = read_json(path)
    base, base_path = base_evaluation(config, work)
    forget = forget_task(cfg, config)

    def row(task: str) -> dict:
        acc, ref = accuracy(result, task, path), accuracy(base, task, base_path)
        return {"acc": acc, "base": ref, "ratio": acc / ref if ref > 0 else None}

    kept = [t for t in eval_tasks(config) if task_display(t) != task_display(forget)]
    return {"forget": {"task": task_display(forget), **row(forget)},
            "kept": {task_display(t): row(t) for t in kept}}


def perplexity_ratio(cfg: SearchConfig, config: Any, work: Path) -> dict:
    """Perplexity of held-out generic text, unlearned over base (the base model's measured once)."""
    from ..data.corpora import load_texts
    from ..eval.fluency import text_perplexity
    from ..modeling.loading import load_model

    texts = load_texts(cfg.generic, what="--generic text")

    def perplexity(model_name: str) -> float:
        model, tokenizer = load_model(model_name, config.dtype, config.device, config.trust_remote_code)
        return text_perplexity(model, tokenizer, texts)

    key = {"model": config.model, "dtype": config.dtype, "generic": cfg.generic}
    path = work / SEARCH_BASE_DIR / f"perplexity_{_digest(key)}.json"
    if path.is_file():
        base = read_json(path)["perplexity"]
    else:
        base = perplexity(config.model)
        write_json_atomic(path, {**key, "perplexity": base})
    unlearned = perplexity(str(run_dir_of(config) / MERGED_DIR))
    return {"text": cfg.generic, "base": base, "unlearned": unlearned, "ratio": unlearned / base}


def robustness_task(cfg: SearchConfig, point: Point) -> str:
    given = cfg.plan.robustness_given
    return cfg.plan.robustness.forget_task if "forget_task" in given else forget_task(cfg, point.config)


def robustness_config(cfg: SearchConfig, point: Point, out: Path) -> RobustnessConfig:
    """The protocol's options for one run: --robustness, with the search's forget task and generic text
    unless those set their own."""
    extra: dict[str, Any] = {"forget_task": robustness_task(cfg, point)}
    if "generic" not in cfg.plan.robustness_given and cfg.generic:
        extra["generic"] = cfg.generic
    return replace(cfg.plan.robustness, run=str(run_dir_of(point.config)), out=str(out), **extra)


def robustness_dir(work: Path, point: Point) -> Path:
    return work / SEARCH_ROBUSTNESS_DIR / point.name


def robustness_metrics(cfg: SearchConfig, point: Point, work: Path) -> dict:
    """Run the protocol on the point's run (continuing an interrupted output; a finished one, checked by
    `check_points`, is read back), and read its headline."""
    out = robustness_dir(work, point)
    if not (out / ROBUSTNESS_FILE).is_file():
        run_robustness(replace(robustness_config(cfg, point, out), resume=out.is_dir() and not is_empty(out)))
    result = read_json(out / ROBUSTNESS_FILE)
    steps = str(result["headline"]["steps"])
    ppl = result["perplexity"]
    selected = (result.get("selected") or {}).get(steps) or {}
    worst = (result.get("worst_case") or {}).get(steps) or {}  # shown beside the envelope, never a target
    papers = {name: {"unseen": ((paper.get("steps") or {}).get(steps) or {}).get("unseen"),
                     "recovery_share": (paper.get("recovery_share") or {}).get(steps)}
              for name, paper in (result.get("paper_attacks") or {}).items()}
    return {"robustness": {"dir": str(Path(cfg.out) / SEARCH_ROBUSTNESS_DIR / point.name), "steps": int(steps),
                           "envelope": result["headline"]["unseen"], "setting": result["headline"].get("setting"),
                           "unlearned_unseen": result["unlearned"]["unseen"], "base_unseen": result["base"]["unseen"],
                           "recovery_share": (result.get("recovery_share") or {}).get(steps),
                           "worst_case": worst.get("unseen"), "worst_case_source": worst.get("source"),
                           "worst_case_sources": worst.get("sources") or [worst.get("source")],
                           "selected": selected.get("unseen"), "paper_attacks": papers,
                           "floor": result["floor"].get(steps), "seeds": result["seeds"],
                           "wall_seconds": result.get("wall_seconds")},
            "perplexity": {"text": result["generic"], "base": ppl["base"], "unlearned": ppl["unlearned"],
                           "ratio": ppl["unlearned"] / ppl["base"]}}


# --- judging and ranking --------------------------------------------------------------------------------


def targets_met(cfg: SearchConfig, metrics: dict) -> dict[str, bool | None]:
    """Each target: met, missed, or None when this search did not measure it."""
    kept = list(metrics["kept"].values())
    met: dict[str, bool | None] = {
        "forget": metrics["forget"]["acc"] <= cfg.target_forget + TOLERANCE,
        "kept": all(r["acc"] >= cfg.target_kept * r["base"] - TOLERANCE for r in kept) if kept else None,
        "perplexity": None, "envelope": None, "floor": None}
    if metrics.get("perplexity"):
        met["perplexity"] = metrics["perplexity"]["ratio"] <= cfg.target_perplexity + TOLERANCE
    robust = metrics.get("robustness")
    if robust:
        met["envelope"] = robust["envelope"] <= robust["unlearned_unseen"] + cfg.target_envelope + TOLERANCE
        if robust["floor"] is not None:
            met["floor"] = robust["envelope"] <= robust["floor"] + cfg.target_floor + TOLERANCE
    return met


def general_ability(met: dict[str, bool | None]) -> str:
    """kept (kept domains and perplexity measured and within target), lost (either missed) or unmeasured."""
    capability = [met["kept"], met["perplexity"]]
    if False in capability:
        return "lost"
    return "kept" if None not in capability else "unmeasured"


def rank_points(records: list[dict]) -> list[dict]:
    """The records in the order of RANKING (finished records carry `ability`); stable, so ties keep grid order."""
    def key(record: dict) -> tuple:
        if record.get("status") != "finished":
            return (len(ABILITY_ORDER), math.inf, math.inf)
        metrics = record["metrics"]
        envelope = metrics.get("robustness", {}).get("envelope")
        return (ABILITY_ORDER[record["ability"]], math.inf if envelope is None else envelope,
                metrics["forget"]["acc"])

    return sorted(records, key=key)


def summarise(cfg: SearchConfig, records: list[dict], seconds: float) -> dict:
    """search.json: the grid, the targets, every point judged and ranked, and the best point (the first in
    rank order that misses no capability target; None when every point broke the model)."""
    import torch

    judged = []
    for record in records:
        record = dict(record)
        if record.get("status") == "finished":
            record["targets"] = targets_met(cfg, record["metrics"])
            record["ability"] = general_ability(record["targets"])
            measured = [met for met in record["targets"].values() if met is not None]
            record["measured_targets_met"] = all(measured)  # forget accuracy is always measured
        judged.append(record)
    ranked = rank_points(judged)
    for rank, record in enumerate(ranked, 1):
        record["rank"] = rank
    best = next((r["name"] for r in ranked if r.get("status") == "finished" and r["ability"] != "lost"), None)
    targets = {"forget": cfg.target_forget, "kept": cfg.target_kept, "perplexity": cfg.target_perplexity,
               "envelope": cfg.target_envelope, "floor": cfg.target_floor}
    return {"config": to_jsonable(cfg), "measure": cfg.measure,
            "grid": {axis.key: [_jsonable(v) for v in axis.values] for axis in cfg.plan.axes},
            "targets": targets, "ranking": RANKING, "best": best, "points": ranked,
            "wall_seconds": round(seconds, 1), "threads": torch.get_num_threads()}


# --- the table ------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _mark(met: bool | None) -> str:
    return {True: " ✓", False: " ✗", None: ""}[met]


def _pct(value: float | None) -> str:
    return percent(value)


def _row(summary: dict, record: dict) -> list[str]:
    settings = [show_value(record["settings"][key]) for key in summary["grid"]]
    robust = summary["measure"] == "robustness"
    if record.get("status") != "finished":
        status = record.get("status", "pending")
        # a dash in every column after the status, so the row is as wide as the header
        return [str(record["rank"]), *settings, status, *["-"] * (10 if robust else 5)]
    metrics, met = record["metrics"], record["targets"]
    forget = metrics["forget"]
    kept = metrics["kept"]
    worst = min(kept, key=lambda t: kept[t]["acc"] / kept[t]["base"] if kept[t]["base"] else math.inf) if kept else None
    kept_cell = "-" if worst is None else (
        f"{_pct(kept[worst]['ratio'])} ({worst}){_mark(met['kept'])}" if kept[worst]["ratio"] is not None else
        f"base 0 ({worst}){_mark(met['kept'])}")
    ppl = metrics.get("perplexity")
    cells = [f"{_pct(forget['acc'])} ({_pct(forget['base'])}){_mark(met['forget'])}", kept_cell,
             "-" if not ppl else f"{number(ppl['ratio'], 3)}{_mark(met['perplexity'])}"]
    if robust:
        r = metrics["robustness"]
        # the attack that gave the worst case, named where it is not the envelope (a record written before
        # each seed's was kept has the one most seeds agree on)
        source = worst_case_sources(r.get("worst_case_sources") or [r.get("worst_case_source")])
        cells += [f"{_pct(r['envelope'])}{_mark(met['envelope'])}",
                  _pct(r.get("worst_case")) + (f" ({source})" if source else ""),
                  _pct(r["unlearned_unseen"]),
                  number(r.get("recovery_share")), f"{_pct(r['floor'])}{_mark(met['floor'])}"]
    all_met = "yes" if record["measured_targets_met"] else "no"
    ability = {"kept": "kept", "lost": "**LOST**", "unmeasured": "unmeasured"}[record["ability"]]
    seconds = record.get("seconds", {}).get(summary["config"]["stage"])
    return [str(record["rank"]), *settings, *cells, ability, all_met, number(seconds, 0)]


def markdown_table(summary: dict) -> str:
    """search.md: the targets, the ranking rule and one row per point in rank order."""
    cfg, t = summary["config"], summary["targets"]
    robust = summary["measure"] == "robustness"
    alt = "the search: forgetting against what was kept" + (", and what the attack brought back" if robust else "")
    head = [*summary["grid"], "forget acc % (base)", "worst kept domain, % of base", "perplexity / base"]
    if robust:
        head += ["unseen envelope %", "worst case unseen %", "unlearned unseen %", "recovery share", "floor %"]
    stage = cfg["stage"]
    head += ["general ability", "all measured targets met", f"{stage} s"]
    fixed = f", fixed settings `{cfg[stage]}`" if cfg[stage] else ""
    preset = f", preset `{cfg['preset']}`" if stage == "unlearn" else ""
    lines = [f"Grid search of `{stage}` settings ({len(summary['points'])} points){preset}{fixed}, "
             f"measured by `{cfg['measure']}`.",
             "",
             f"Targets: forget-domain accuracy <= {100 * t['forget']:.0f}%; every kept domain >= "
             f"{100 * t['kept']:.0f}% of the base model's; perplexity of `{cfg['generic'] or '-'}` <= "
             f"{t['perplexity']:.2f}x the base model's"
             + (f"; unseen-half envelope after the largest attack <= the unlearned model's unseen half + "
                f"{100 * t['envelope']:.0f} points and <= the fictional-facts floor + {100 * t['floor']:.0f} points"
                if robust else "") + ". ✓ met, ✗ missed; general ability is **LOST** when a kept domain or the "
             "perplexity misses its target.", "", f"Order: {summary['ranking']}.", "",
             table(["rank", *head], [_row(summary, r) for r in summary["points"]], "r" * (len(head) + 1)),
             "", f"![{alt}]({SEARCH_PLOT_FILE})"]
    seeds = [len(r["metrics"]["robustness"].get("seeds") or ()) for r in summary["points"]
             if robust and "robustness" in (r.get("metrics") or {})]
    if seeds and min(seeds) < RANKING_SEEDS:
        lines += ["", f"**Provisional order:** the envelope comes from {min(seeds)} protocol seed(s), and "
                      f"a seed moves it by several points; rank methods on {RANKING_SEEDS} or more "
                      "(`--robustness \"--seeds 0,1,2 ...\"`)."]
    best = next((r for r in summary["points"] if r["name"] == summary["best"]), None)
    if best is not None:
        lines += ["", f"**Best:** `{best['name']}` ({best['run_dir']})"
                  + ("; general ability only partly measured" if best["ability"] == "unmeasured" else "") + "."]
    elif any(r.get("status") == "finished" for r in summary["points"]):
        lines += ["", "**No point keeps general ability:** every finished point misses the kept-domain or the "
                      "perplexity target, so none is called best."]
    return "\n".join(lines)


def write_summary(cfg: SearchConfig, records: list[dict], work: Path, seconds: float) -> dict:
    summary = summarise(cfg, records, seconds)
    write_text_atomic(work / SEARCH_TABLE_FILE, markdown_table(summary))
    write_json_atomic(work / SEARCH_FILE, summary)
    plot_search(summary, work / SEARCH_PLOT_FILE)  # last: the numbers are on disk whatever the plotting does
    return summary


# --- the command ----------------------------------------------------------------------------------------


def run_search(cfg: SearchConfig) -> dict:
    """Train and measure every point not done yet, then write search.json and search.md; return the summary."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would write the search's files
        raise ConfigError("search runs its points one after another in one process: start it without torchrun")
    output = claim_out(cfg)
    try:
        summary = _search(cfg, output.work)
    except KeyboardInterrupt as err:
        output.discard_if_empty()
        raise Interrupted("rerun the same command to continue; finished points are kept") from err
    except BaseException:
        output.discard_if_empty()
        raise
    output.commit()
    print(markdown_table(summary))
    log.info("search: %d points -> %s", len(summary["points"]), output.final / SEARCH_FILE)
    return summary


def _search(cfg: SearchConfig, work: Path) -> dict:
    began = time.perf_counter()
    points = [replace(p, config=replace(p.config, out=str(work / SEARCH_RUNS_DIR))) for p in cfg.plan.points]
    if cfg.stage == "distill":
        points = [with_source(cfg, p) for p in points]
    check_points(cfg, points, work)
    records = {p.name: {"name": p.name, "settings": p.settings, "status": "pending",
                        "run_dir": str(Path(cfg.out) / SEARCH_RUNS_DIR / p.name)} for p in points}
    write_summary(cfg, list(records.values()), work, 0.0)  # a killed search still lists its points
    for k, point in enumerate(points, 1):
        log.info("search point %d of %d: %s", k, len(points), point.label)
        records[point.name] = run_point(cfg, point, work)
        write_summary(cfg, list(records.values()), work, time.perf_counter() - began)
    return write_summary(cfg, list(records.values()), work, time.perf_counter() - began)

