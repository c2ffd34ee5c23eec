"""The options of `search` and its plan: the grid read and every point's config built (and refused,
with one line) when the config is made, before anything trains; torch-free so that `--help` never
imports torch."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import re
import shlex
import sys
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..attack.options import RobustnessConfig
from ..core.checks import require_nonnegative, require_positive
from ..core.config import CONFIG_FILE_DEST, Command, ConfigError, Options, add_config_args, config_from_args, option
from ..core.paths import SEARCH_RUNS_DIR
from ..report.tamper_results import task_display
from ..unlearning.options import (
    OLD_PRESET_NAMES,
    PRESETS,
    SAVED_OPTIONAL_KEYS,
    SAVED_PLAN_KEYS,
    DistillConfig,
    UnlearnConfig,
    adjust_unlearn_preset,
)
from ..unlearning.options import SAVED_KEYS as DISTILL_SAVED_KEYS

# What the search sets for every point itself: where its run goes and what becomes of an earlier one.
SET_BY_SEARCH = ("out", "run_name", "resume", "overwrite")
ROBUSTNESS_SET_BY_SEARCH = ("out", "resume", "overwrite")  # and the run directory, its positional argument
ROBUSTNESS_RUN_PLACEHOLDER = "RUN_DIR"
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass
class SearchConfig(Options):
    grid: tuple[str, ...] = option((), "an option of the --stage command and the values to try; repeat the flag "
                                       "for each option searched (the grid is the cross product); separate values "
                                       "by ';' when they hold commas, e.g. 'layers=20,25;25,29' (required)",
                                   metavar="KEY=V1,V2", append=True, group="grid")
    stage: Literal["unlearn", "distill"] = option("unlearn", "the command each point runs: unlearn (one unlearning "
                                                             "run per point, fixed settings in --unlearn) or distill "
                                                             "(one distillation of a finished unlearning run per "
                                                             "point, fixed settings in --distill)", group="grid")
    preset: str = option("reference", "the unlearn preset the fixed settings start from (lensunlearn unlearn "
                                      "--preset; --stage unlearn)", group="grid", old_values=OLD_PRESET_NAMES,
                         metavar="{" + ",".join(PRESETS) + "}")
    unlearn: str = option("", "the fixed unlearn settings, as unlearn's flags in one quoted string, e.g. \"--forget "
                              "facts:country_capital --retain generic:retain\" (a --config FILE among them); the "
                              "search sets --out, --run_name, --resume and --overwrite of each point", metavar="FLAGS",
                          group="grid", default_text="the preset's settings")
    distill: str = option("", "--stage distill: the fixed distill settings, as distill's flags in one quoted "
                              "string, the unlearning run to distil among them, e.g. \"--run runs/R --steps 80\"; "
                              "the search sets --out, --run_name, --resume and --overwrite of each point",
                          metavar="FLAGS", group="grid", default_text="none")
    measure: Literal["eval", "robustness"] = option("eval", "eval: accuracies from each run's eval.json and the "
                                                            "perplexity of --generic; robustness: the accuracies "
                                                            "and the robustness protocol on each run",
                                                    group="measure")
    forget_task: str | None = option(None, "the eval task that measures forgetting (the other eval tasks are the "
                                           "kept domains)", group="measure",
                                     default_text="the first of the points' --eval_tasks")
    generic: str = option("generic:heldout", "held-out text for perplexity (in no corpus): generic:heldout, a .txt "
                                             "or .jsonl file; '' skips the perplexity of --measure eval",
                          metavar="TEXT", group="measure")
    robustness: str = option("", "for --measure robustness: robustness's flags in one quoted string, e.g. "
                                 "\"--seeds 0 --grid default\"; the search sets the run folder, --out, --resume and "
                                 "--overwrite, and passes its --forget_task and --generic unless given here",
                             metavar="FLAGS", group="measure", default_text="the protocol's defaults",
                             old_names=("robustness_args",))
    target_forget: float = option(0.35, "target: forget-domain accuracy at most this", group="targets")
    target_kept: float = option(0.95, "target: every kept domain's accuracy at least this share of the base model's",
                                group="targets")
    target_perplexity: float = option(1.10, "target: perplexity at most this multiple of the base model's",
                                      group="targets")
    target_envelope: float = option(0.10, "target (robustness): the unseen-half envelope after the largest attack "
                                          "at most this above the unlearned model's unseen-half accuracy",
                                    group="targets")
    target_floor: float = option(0.10, "target (robustness): the same envelope at most this above the "
                                       "fictional-facts floor", group="targets")
    out: str = option("runs/search", "the search's folder: runs/<point>/, search.json, search.md, search.png",
                      metavar="DIR")
    overwrite: bool = option(False, "start over: replace --out once every point is done (without it, rerunning "
                                    "the same command continues the search)")

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset {self.preset} is not an unlearn preset: use one of {', '.join(PRESETS)}")
        require_positive(target_kept=self.target_kept, target_perplexity=self.target_perplexity)
        require_nonnegative(target_forget=self.target_forget, target_envelope=self.target_envelope,
                            target_floor=self.target_floor)
        super().__post_init__()
        self.plan = make_plan(self)


# --- reading the grid and the fixed settings -----------------------------------------------------------


class _OptionParser(argparse.ArgumentParser):
    """A command's options read from a string on the search's line: an error is a ConfigError that
    names the search flag which held it, never an exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def options_parser(cls: type, flag: str) -> argparse.ArgumentParser:
    """The parser of a command's config, as `lensunlearn <command>` builds it (with `--config FILE`)."""
    parser = _OptionParser(prog=flag, add_help=False)
    add_config_args(parser, cls)
    return parser


def parse_options(cls: type, flag: str, command: str, text: str, set_by_search: tuple[str, ...],
                  head: tuple[str, ...] = ()) -> argparse.Namespace:
    """`text`, flags of `command`, parsed by that command's own parser; flags the search sets and unknown
    ones are refused (naming close matches)."""
    try:
        tokens = shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"{flag} {text!r}: {err}") from None
    namespace, unknown = options_parser(cls, flag).parse_known_args([*head, *tokens])
    if unknown:
        word = unknown[0]
        if word.split("=")[0] == "--preset":
            raise ConfigError(f"{flag}: give the preset as the search's own --preset")
        close = difflib.get_close_matches(word.lstrip("-").split("=")[0], [f.name for f in dataclasses.fields(cls)],
                                          1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise ConfigError(f"{flag}: {word} is not an option of lensunlearn {command}{hint}")
    given = [name for name in set_by_search if hasattr(namespace, name)]
    if given:
        raise ConfigError(f"{flag}: the search sets --{given[0]} of every point itself: drop it")
    return namespace


@dataclass(frozen=True)
class Axis:
    """One `--grid` option and its values, as typed (for run names) and as read (for the configs)."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


def type_name(annotation: Any) -> str:
    """What a value of a config field's type looks like, for an error message."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    if typing.get_origin(base) is Literal:
        name = "one of " + ", ".join(map(str, typing.get_args(base)))
    elif typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        name = f"comma-separated {'integers' if inner is int else 'numbers' if inner is float else 'names'}"
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            base, getattr(base, "__name__", str(base)))
    return name + (" or none" if optional else "")


def grid_value(parser: argparse.ArgumentParser, key: str, annotation: Any, text: str) -> Any:
    """`text` read as `--key text` on an unlearn line; a bool (a flag without a value there) takes true/false."""
    if annotation is bool:
        if text.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ConfigError(f"--grid {key}={text}: {key} takes true or false, got {text!r}")
        return text.lower() in TRUE_WORDS
    try:
        namespace, _ = parser.parse_known_args([f"--{key}={text}"])
    except ConfigError:
        raise ConfigError(f"--grid {key}={text}: {key} takes {type_name(annotation)}, got {text!r}") from None
    return getattr(namespace, key)


def parse_grid(entries: typing.Sequence[str], parser: argparse.ArgumentParser, cls: type = UnlearnConfig,
               command: str = "unlearn") -> list[Axis]:
    """The grid's options, each a field of the command's config `cls` with distinct values of its type."""
    if not entries:
        raise ConfigError(f"--grid is empty: name at least one {command} option and its values, e.g. --grid "
                          f"{'lr=1e-3,1e-2' if command == 'unlearn' else 'alpha=0.1,0.25'}")
    fields = [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli") is not False]
    renamed = {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("old_names", ())}
    hints = typing.get_type_hints(cls)
    axes: list[Axis] = []
    for entry in entries:
        key, sep, text = (part.strip() for part in entry.partition("="))
        if not sep or not key or not text:
            raise ConfigError(f"--grid {entry!r}: write KEY=V1,V2, a {command} option and the values to try")
        if key in renamed:
            sys.stderr.write(f"lensunlearn: --grid {key} is now --grid {renamed[key]}; the old name goes in the next "
                             f"release\n")
            key = renamed[key]
        if key not in fields:
            close = difflib.get_close_matches(key, fields, 3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"--grid {key}: not an option of lensunlearn {command}{hint}")
        if key in SET_BY_SEARCH:
            raise ConfigError(f"--grid {key}: the search sets --{key} of every point itself")
        if any(axis.key == key for axis in axes):
            raise ConfigError(f"--grid {key} is given twice: list all its values in one --grid {key}=V1,V2")
        texts = tuple(t.strip() for t in text.split(";" if ";" in text else ","))
        if not all(texts) or len(set(texts)) != len(texts):
            raise ConfigError(f"--grid {key}={text}: the values must be distinct and none empty")
        values = tuple(grid_value(parser, key, hints[key], t) for t in texts)
        for i, j in itertools.combinations(range(len(values)), 2):
            if values[i] == values[j]:  # 1e-3 and 0.001: one point, trained twice under two names
                raise ConfigError(f"--grid {key}={text}: {texts[i]} and {texts[j]} are the same value "
                                  f"({show_value(values[i])}), one grid point: list each value once")
        axes.append(Axis(key, texts, values))
    return axes


def show_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@dataclass
class Point:
    """One grid point: its run's name, its grid values, and the config that trains it (an unlearn or a
    distill config); a distillation also keeps its source run's base model and forget corpus, which
    measuring it needs."""

    name: str
    settings: dict[str, Any]
    config: UnlearnConfig | DistillConfig
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join(f"{key}={show_value(value)}" for key, value in self.settings.items())


def point_name(pairs: typing.Iterable[tuple[str, str]]) -> str:
    """`lr1e-3_forget_coef10`: each grid option and its value as typed, made safe as a folder name."""
    name = "_".join(key + re.sub(r"[^A-Za-z0-9.+-]+", "-", text) for key, text in pairs)
    if len(name) > 96:  # long values (paths) would make a long folder name: keep it readable and unique
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def eval_tasks(config: Any) -> list[str]:
    return [t.strip() for t in config.eval_tasks.split(",") if t.strip()]


def forget_task(cfg: SearchConfig, config: Any) -> str:
    return cfg.forget_task or eval_tasks(config)[0]


def check_measurable(cfg: SearchConfig, config: UnlearnConfig | DistillConfig, where: str) -> None:
    tasks = eval_tasks(config)
    if not tasks:
        raise ConfigError(f"{where}: the search measures each run on its eval tasks, and --eval_tasks is empty: "
                          f"pass --{cfg.stage} \"--eval_tasks FORGET_TASK,KEPT_TASK,...\"")
    if cfg.forget_task and task_display(cfg.forget_task) not in {task_display(t) for t in tasks}:
        raise ConfigError(f"{where}: --forget_task {cfg.forget_task} is not one of --eval_tasks {','.join(tasks)}")


def point_config(cfg: SearchConfig, values: argparse.Namespace) -> UnlearnConfig | DistillConfig:
    if cfg.stage == "unlearn":
        return config_from_args(UnlearnConfig, values, PRESETS[cfg.preset], SAVED_PLAN_KEYS, adjust_unlearn_preset,
                                SAVED_OPTIONAL_KEYS)
    return config_from_args(DistillConfig, values, derived=DISTILL_SAVED_KEYS)


def plan_points(cfg: SearchConfig, axes: list[Axis], fixed: argparse.Namespace) -> list[Point]:
    """Every point's config: (unlearn) preset < the fixed flags' --config FILE < the fixed flags < grid
    values; (distill) distill's defaults < the same."""
    both = [axis.key for axis in axes if hasattr(fixed, axis.key)]
    if both:
        raise ConfigError(f"--grid {both[0]} and --{cfg.stage} --{both[0]} both set {both[0]}: keep one")
    points: list[Point] = []
    for combo in itertools.product(*(range(len(axis.values)) for axis in axes)):
        settings = {axis.key: axis.values[i] for axis, i in zip(axes, combo)}
        name = point_name((axis.key, axis.texts[i]) for axis, i in zip(axes, combo))
        where = "grid point " + " ".join(f"{axis.key}={axis.texts[i]}" for axis, i in zip(axes, combo))
        clash = next((p for p in points if p.name == name), None)
        if clash is not None:
            raise ConfigError(f"{where} and {clash.label} would share the run folder {name}: write their values "
                              f"so that they differ in letters, digits or . + -")
        try:
            config = point_config(cfg, argparse.Namespace(**vars(fixed), **settings))
            config = replace(config, out=str(Path(cfg.out) / SEARCH_RUNS_DIR), run_name=name)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if cfg.stage == "unlearn":  # a distillation's tasks may be its source run's: checked once that is read
            check_measurable(cfg, config, where)
        points.append(Point(name, settings, config))
    return points


@dataclass
class Plan:
    """What a search will do, read and checked when its config is built."""

    axes: list[Axis]
    points: list[Point]
    robustness: RobustnessConfig | None  # the protocol's options; its run directory a placeholder
    robustness_given: frozenset[str]  # the options --robustness sets


def make_plan(cfg: SearchConfig) -> Plan:
    cls = UnlearnConfig if cfg.stage == "unlearn" else DistillConfig
    other = "distill" if cfg.stage == "unlearn" else "unlearn"
    if getattr(cfg, other).strip():
        raise ConfigError(f"--{other} holds the fixed settings of --stage {other}, and this search runs "
                          f"{cfg.stage}: pass --stage {other}, or give the settings as --{cfg.stage} \"...\"")
    fixed = parse_options(cls, f"--{cfg.stage}", cfg.stage, getattr(cfg, cfg.stage), SET_BY_SEARCH)
    axes = parse_grid(cfg.grid, options_parser(cls, "--grid"), cls, cfg.stage)
    if cfg.stage == "distill" and not hasattr(fixed, "run") and not getattr(fixed, CONFIG_FILE_DEST, None) \
            and all(axis.key != "run" for axis in axes):
        raise ConfigError("--stage distill distils a finished unlearning run at every point: name it in --distill "
                          "\"--run DIR ...\" (or search over several with --grid run=DIR1,DIR2)")
    points = plan_points(cfg, axes, fixed)
    if cfg.measure != "robustness":
        if cfg.robustness.strip():
            raise ConfigError("--robustness is read by --measure robustness only: add --measure robustness, or drop "
                              "--robustness")
        return Plan(axes, points, None, frozenset())
    namespace = parse_options(RobustnessConfig, "--robustness", "robustness", cfg.robustness,
                              ROBUSTNESS_SET_BY_SEARCH, head=(ROBUSTNESS_RUN_PLACEHOLDER,))
    if getattr(namespace, "summarise_only", False):
        raise ConfigError("--robustness: --summarise_only rewrites a finished output and runs no attack, and the "
                          "search runs the protocol on every point: drop it")
    try:
        robustness = config_from_args(RobustnessConfig, namespace)
    except ConfigError as err:
        raise ConfigError(f"--robustness: {err}") from None
    return Plan(axes, points, robustness, frozenset(vars(namespace)))


COMMANDS = [
    Command(("search",), "grid search over unlearn (or distill) settings: one run per point, each measured "
                         "(accuracies and perplexity, or the robustness protocol) and ranked against the targets; "
                         "rerun to continue", SearchConfig, "lensunlearn.search.run:run_search"),
]
