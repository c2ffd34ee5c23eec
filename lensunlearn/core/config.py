"""Typed configs whose field help strings become the command line.

Every command's options are one dataclass, often made of shared mixins
(`modeling.options.ModelOptions`, `train.options.TrainingOptions`), declared in a torch-free options
module beside the command's code. `option(default, help)` declares a field; the CLI turns each field into
`--field_name` with its help and default, and presets are plain instances that explicit flags
override. `--config FILE` (a run's saved config or a hand-written YAML/JSON file) sits between the
two: defaults < preset < file < explicit flags. A field keeps one name in every command; a flag
that was renamed keeps its old spelling as a hidden alias (`option(..., old_names=...)`) for one
release.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError, UserError, read_text

log = logging.getLogger(__name__)
T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A bad option value, reported before any compute is spent (the command exits 2, as for a usage error)."""


# The groups `--help` shows the options in, in this order (a command shows those it has). Each option
# mixin names its group (`help_group`); a command's own fields name theirs (`option(..., group=...)`).
GROUPS = ("model", "data", "lens", "objective", "optimisation", "LoRA", "robust update", "unlearning", "attack",
          "grid", "measure", "targets", "evaluation", "tracking", "run")


class Options:
    """Base of every config and option mixin. Each class checks its own fields in `__post_init__`
    and then calls `super().__post_init__()`, so a config made of several mixins runs every check,
    and every check raises `ConfigError` before anything is loaded.

    A mixin sets `help_group` (one of `GROUPS`): its fields show under that heading in `--help`
    unless a field names another group itself."""

    help_group: typing.ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        group = cls.__dict__.get("help_group")
        if group is None:
            return
        for value in list(cls.__dict__.values()):
            if isinstance(value, dataclasses.Field) and "group" not in value.metadata:
                value.metadata = types.MappingProxyType({**value.metadata, "group": group})

    def __post_init__(self) -> None:
        pass


def option(default: Any, help: str, **kw: Any) -> Any:
    """Declare a config field with its help text (shown by `--help`).

    Keywords go to the field's metadata: `group` (the `--help` heading, one of `GROUPS`; a mixin's
    `help_group` otherwise), `default_text` (the default in plain words, e.g. "from the run", which
    `--help` shows for a default of None, '' or an empty list), `metavar` (what `--help` shows for the
    value, e.g. FILE or DIR), `positional`/`nargs` (a positional argument, also accepted as
    `--name`), `append` (a tuple of strings whose flag is repeated, one item each), `empty` (for a
    string whose '' means none, such as a task list that may be empty, where None, if the field
    allows it, means "from the run" or another default: '' and `none` on the command line become
    ''), `old_values` (former spellings of a value, e.g. a preset's old name, mapped to the new
    one), and `old_names`: former flag names still accepted,
    hidden from `--help`. For a bool field `old_names` may map a name to the value it sets
    (`{"lora": False}`: `--lora` sets the field to False, `--no-lora` to True).
    """
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def redefault(cls: type, name: str, default: Any, **changes: Any) -> Any:
    """The field `name` of the mixin `cls` with another default, for a config that inherits it
    (help text, group and old names stay those of `cls` unless `changes` replaces them)."""
    inherited = next(f for f in dataclasses.fields(cls) if f.name == name)
    return option(default, **{**inherited.metadata, **changes})


def parse_int_list(text: str | typing.Sequence[int]) -> tuple[int, ...]:
    """Parse '5,10,15' (or an iterable of ints) into a tuple of ints."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError as err:
            raise ConfigError(f"expected comma-separated integers like '5,10,15', got {text!r}") from err
    return tuple(int(x) for x in text)


def parse_float_list(text: str | typing.Sequence[float]) -> tuple[float, ...]:
    """Parse '1e-5,2e-5' (or an iterable of floats) into a tuple of floats."""
    if isinstance(text, str):
        try:
            return tuple(float(p) for p in text.replace(" ", "").split(",") if p)
        except ValueError as err:
            raise ConfigError(f"expected comma-separated numbers like '1e-5,2e-5', got {text!r}") from err
    return tuple(float(x) for x in text)


def parse_str_list(text: str | typing.Sequence[str]) -> tuple[str, ...]:
    """Parse 'a, b,c' (or an iterable of strings) into ('a', 'b', 'c'): items stripped, empty ones dropped."""
    items = text.split(",") if isinstance(text, str) else text
    return tuple(x.strip() for x in items if x.strip())


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Return (inner type, optional?) for an annotation such as `int | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


NONE_WORDS = ("", "none", "null")  # what an optional value accepts for "not given" (or, with `empty`, for none)
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}


def _choices(values: Sequence[str], text: str) -> str:
    close = difflib.get_close_matches(text, [str(v) for v in values], 1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"choose from {', '.join(map(str, values))}, got {text!r}{hint}"


def _converter(annotation: Any, metadata: Any = types.MappingProxyType({})) -> Callable[[str], Any]:
    """The function that turns a flag's text into the field's value; a bad value raises
    `argparse.ArgumentTypeError` whose message says what the flag accepts (argparse adds the flag)."""
    base, optional = _base_type(annotation)
    old_values = metadata.get("old_values", {})

    def convert(text: str) -> Any:
        if (optional or metadata.get("empty")) and text.strip().lower() in NONE_WORDS:
            return "" if metadata.get("empty") else None
        if text in old_values:
            sys.stderr.write(f"lensunlearn: the value {text} is now {old_values[text]}; the old name goes in the "
                             f"next release\n")
            text = old_values[text]
        if typing.get_origin(base) is tuple:
            inner = typing.get_args(base)[0]
            parse = parse_int_list if inner is int else parse_float_list if inner is float else parse_str_list
            try:
                return parse(text)
            except ConfigError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        if typing.get_origin(base) is typing.Literal:
            if text not in typing.get_args(base):
                raise argparse.ArgumentTypeError(_choices(typing.get_args(base), text))
            return text
        try:
            return base(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {_TYPE_WORDS.get(base, base.__name__)}"
                                             f"{' (or none)' if optional else ''}, got {text!r}") from None

    convert.__name__ = getattr(base, "__name__", "value")
    return convert


class _OldName(argparse.Action):
    """A flag's former spelling: accepted for one release, hidden from `--help`, and named on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stderr.write(f"lensunlearn: {option_string} is now {self.new}; the old name goes in the next release\n")
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _add_old_names(parser: argparse.ArgumentParser, name: str, is_bool: bool, kwargs: dict[str, Any],
                   old_names: Any) -> None:
    values = old_names if isinstance(old_names, dict) else {old: True for old in old_names}
    for old, value in values.items():
        if not is_bool:
            parser.add_argument(f"--{old}", action=_OldName, new=f"--{name}", dest=name, default=argparse.SUPPRESS,
                                type=kwargs["type"], metavar=kwargs.get("metavar"), help=argparse.SUPPRESS)
            continue
        for flag, const in ((f"--{old}", value), (f"--no-{old}", not value)):
            new = f"--{name}" if const else f"--no-{name}"
            parser.add_argument(flag, action=_OldName, new=new, dest=name, nargs=0, const=const,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# Metavars by the last word of a string option's name, where the name alone says little.
_STR_METAVARS = {"model": "MODEL", "lens": "DIR", "out": "DIR", "run": "DIR", "device": "DEVICE", "tasks": "TASKS",
                 "task": "TASK", "forget": "CORPUS", "retain": "CORPUS", "corpus": "CORPUS", "config": "NAME",
                 "split": "SPLIT", "column": "COLUMN", "name": "NAME", "include": "DIR", "baseline": "FILE",
                 "predictions": "FILE", "plot": "FILE", "generic": "TEXT", "benign": "TEXT", "targets": "LIST"}


def _metavar(name: str, base: Any, metadata: Any) -> str:
    """What `--help` shows for the value: short words (N, LR, LIST, DIR, ...) unless the field names its own."""
    if "metavar" in metadata:
        return metadata["metavar"]
    if typing.get_origin(base) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(base))) + "}"
    if typing.get_origin(base) is tuple:
        return "LIST"
    if base is int:
        return "N"
    if base is float:
        return "LR" if name == "lr" or name.endswith("_lr") else "X"
    return _STR_METAVARS.get(name.rsplit("_", 1)[-1], name.rsplit("_", 1)[-1].upper())


def _shown_default(field: dataclasses.Field, default: Any, is_bool: bool) -> str | None:
    """The default as `--help` shows it, in plain words; None where there is nothing to show."""
    if is_bool:
        return "on" if default else "off"
    if default is None or default == "" or default == ():
        return field.metadata.get("default_text")
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _groups(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field]) -> dict[str, Any]:
    """One argument group per heading the fields use, in the order of `GROUPS`."""
    used = {f.metadata.get("group", "run") for f in fields}
    unknown = used - set(GROUPS)
    if unknown:
        raise ValueError(f"option group(s) {sorted(unknown)} are not in config.GROUPS")
    return {name: parser.add_argument_group(name) for name in GROUPS if name in used}


def add_config_args(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """Add `--config FILE` and one `--name` flag per dataclass field (and its hidden old names), under
    their groups; help shows the (preset) default in plain words."""
    parser.add_argument("--config", dest=CONFIG_FILE_DEST, metavar="FILE", action="append", default=None,
                        help=CONFIG_FILE_HELP)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli") is not False]
    groups = _groups(parser, fields)
    for f in fields:
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        base, _ = _base_type(hints[f.name])
        shown = _shown_default(f, default, base is bool)
        help_text = f.metadata.get("help", "") + (f" (default: {shown})" if shown is not None else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _converter(hints[f.name], f.metadata)
            kwargs["metavar"] = _metavar(f.name, base, f.metadata)
            if f.metadata.get("append"):  # a repeatable flag: each occurrence is one item, commas included
                kwargs.update(action="append", type=str)
        group = groups[f.metadata.get("group", "run")]
        if f.metadata.get("positional"):  # RUN_DIR, or --run RUN_DIR
            nargs = f.metadata.get("nargs", "?")
            group.add_argument(f"{f.name}{POSITIONAL_SUFFIX}", nargs=nargs, type=kwargs.get("type"),
                               metavar=f.metadata.get("positional_metavar", f.name.upper()), default=argparse.SUPPRESS,
                               help=f"{help_text}; or --{f.name}" if nargs == "?" else help_text)
            if nargs != "?":
                continue
            kwargs["help"] = f"the same as the positional {f.name.upper()}"
        group.add_argument(f"--{f.name}", **kwargs)
        _add_old_names(parser, f.name, base is bool, kwargs, f.metadata.get("old_names", ()))


POSITIONAL_SUFFIX = "_positional"  # the namespace key of a field's positional form, beside its --flag


def given_values(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The fields the command line set, a positional argument merged with its `--flag` form."""
    values = {}
    for f in dataclasses.fields(cls):
        flag, positional = getattr(namespace, f.name, None), getattr(namespace, f.name + POSITIONAL_SUFFIX, None)
        if hasattr(namespace, f.name + POSITIONAL_SUFFIX) and positional not in (None, []):
            if hasattr(namespace, f.name) and flag != positional:
                raise ConfigError(f"{f.name.upper()} {positional} and --{f.name} {flag} name two different "
                                  f"{f.name}s: give one")
            values[f.name] = positional
        elif hasattr(namespace, f.name):
            values[f.name] = flag
    return values


def config_from_args(cls: type[T], namespace: argparse.Namespace, base: T | None = None,
                     derived: Iterable[str] = (),
                     adjust: Callable[[T, dict[str, Any]], T] | None = None,
                     derived_optional: Iterable[str] = ()) -> T:
    """Build `cls` from parsed flags over the values of each `--config FILE` (when given; a later file
    overrides an earlier one) over `base` (a preset) over the field defaults. `derived`: keys the
    command's own saved config holds beside its fields (a run's plan), skipped when such a file is read
    back; `derived_optional`: plan keys it holds only for some runs, skipped likewise. `adjust(base,
    values)`: the preset as the given values make it (unlearn's objectives bring their own settings over
    the preset's)."""
    paths = getattr(namespace, CONFIG_FILE_DEST, None) or []
    from_file: dict[str, Any] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        from_file.update(read_config_file(cls, path, derived, derived_optional))
    values = {**from_file, **given_values(cls, namespace)}
    if base is None:
        return cls(**values)
    if adjust is not None:
        base = adjust(base, values)
    return dataclasses.replace(base, **values)


# --- config files -----------------------------------------------------------------------------------

CONFIG_FILE_DEST = "config_file"  # not "config": a command may one day have a field of that name
# Flags that say what to do with an existing run rather than what the run is: a rerun from a finished
# run's saved config must neither replace nor continue anything unless the command line says so.
FLAG_ONLY = ("resume", "overwrite", "summarise_only")
CONFIG_FILE_HELP = ("read options from FILE: the run_config.json a run wrote, or a YAML or JSON mapping of "
                    "option names to values; repeat --config to merge several files, a later one winning. "
                    "Precedence: built-in defaults < --preset (where the command has one) < FILE < flags given "
                    "on the line. Unknown keys and wrong types are errors, keys a run computed (its plan) are "
                    "ignored with a warning; resume, overwrite and summarise_only are read only from the line, never "
                    "from FILE")


def _load_mapping(path: Path) -> dict[str, Any]:
    """The mapping a JSON (.json) or YAML (anything else; YAML reads JSON too) file holds."""
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = read_text(path)
    except InputError as err:
        raise ConfigError(f"--config {err}") from err
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {path} line {err.lineno}: invalid JSON ({err.msg}, column {err.colno})") \
                from err
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"--config {path}{where}: invalid YAML ({problem})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got a "
                          f"{type(data).__name__}")
    return data


def read_config_file(cls: type, path: str | Path, derived: Iterable[str] = (),
                     derived_optional: Iterable[str] = (), saved: bool = False) -> dict[str, Any]:
    """The field values of `cls` that the config file `path` sets, checked and converted to the field
    types (lists become tuples). A field's former name is read as the field, with a warning; keys in
    `derived` (a run's plan, which follows from the options) are skipped, with a warning unless the
    file is the command's own saved config (it holds them all; `derived_optional` keys, which some runs
    save, are skipped alike but not required); `FLAG_ONLY` keys are dropped, without a warning when the
    file is an output's own saved config read back (`saved`)."""
    path = Path(path)
    data = _load_mapping(path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed = {old: f.name for f in fields.values() for old in f.metadata.get("old_names", ())}
    required = set(derived)
    skipped = required | set(derived_optional)
    unknown = [str(key) for key in data if key not in fields and key not in skipped and key not in renamed]
    if unknown:
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, fields, 1)) else key
                 for key in unknown]
        raise ConfigError(f"--config {path}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: "
                          f"see --help for the options of this command")
    ignored = [key for key in data if key in skipped]
    if ignored and not required <= set(data):
        log.warning("--config %s: %s %s not an option but what a run computed from its options (its plan): ignored",
                    path, ", ".join(ignored), "is" if len(ignored) == 1 else "are")
    types_ = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key in skipped:
            continue
        if key in renamed:
            if renamed[key] in data:
                raise ConfigError(f"--config {path}: {key} is the old name of {renamed[key]}, and the file sets both: "
                                  f"keep {renamed[key]}")
            log.warning("--config %s: %s is now %s; the old name goes in the next release", path, key, renamed[key])
            key = renamed[key]
        if key in FLAG_ONLY:
            if value and not saved:
                log.warning("--config %s sets %s: ignored, pass --%s on the command line to %s", path, key, key, key)
            continue
        values[key] = _file_value(value, types_[key], f"--config {path}: {key}", fields[key].metadata)
    return values


def _file_value(value: Any, annotation: Any, what: str, metadata: Any = types.MappingProxyType({})) -> Any:
    """`value` as read from a config file, checked against the field's type."""
    base, optional = _base_type(annotation)
    if isinstance(value, str) and value in metadata.get("old_values", {}):
        log.warning("%s: %s is now %s; the old name goes in the next release", what, value,
                    metadata["old_values"][value])
        value = metadata["old_values"][value]
    if optional and value == "" and not metadata.get("empty"):
        value = None  # as on the command line: '' is "not given" unless the field keeps it as none
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{what} must be {_type_name(base)}, got null")
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        if isinstance(value, str) and metadata.get("append"):  # one item of a repeated flag: its commas are its own
            return (value,)
        if isinstance(value, str):  # the flag's spelling, "5,10,15"
            try:
                return _converter(base)(value)
            except argparse.ArgumentTypeError as err:
                raise ConfigError(f"{what}: {err}") from None
        if not isinstance(value, list):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        return tuple(_file_value(item, inner, what) for item in value)
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{what} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} must be an integer, got {value!r}")
        return value
    if base is float:
        # YAML reads 1e-5 (no dot) as a string, so a number written as text is accepted
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be a string, got {value!r}")
        return value
    return base(value)


def _type_name(annotation: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return "a list" if typing.get_origin(annotation) is tuple else getattr(annotation, "__name__", str(annotation))


def current_names(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with each renamed field under its current name (a run written before the rename)."""
    renamed = {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("old_names", ())}
    return {renamed.get(key, key) if renamed.get(key, key) not in saved else key: value
            for key, value in saved.items()}


def to_jsonable(cfg: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict (tuples become lists, paths strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Path):
            v = str(v)
        out[f.name] = v
    return out


@dataclasses.dataclass
class Command:
    """A subcommand: its words (`("lens", "train")`), config class, runner and named presets. It lives
    beside the configs, in a torch-free options module, so that building the parser (and `--help`)
    imports no model code: the runner is named as "module:function" and imported only when the
    command runs."""

    words: tuple[str, ...]
    help: str
    config: type
    run: str | Callable[[Any], Any]  # "lensunlearn.unlearning.run:unlearn", or the function itself
    presets: dict[str, Any] = dataclasses.field(default_factory=dict)
    default_preset: str | None = None
    # keys the command's saved config holds beside its fields (a run's plan): `--config` skips them
    derived: tuple[str, ...] = ()
    derived_optional: tuple[str, ...] = ()  # plan keys saved by some runs only (e.g. the blocks a run trained)
    old_presets: dict[str, str] = dataclasses.field(default_factory=dict)  # a preset's former name -> its name
    preset_help: str = "named defaults that explicit flags override"
    # the preset as the given values make it (see `config_from_args`)
    adjust_preset: Callable[[Any, dict[str, Any]], Any] | None = None

    def runner(self) -> Callable[[Any], Any]:
        """The function that runs the command, imported now."""
        if callable(self.run):
            return self.run
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, config: Any) -> Any:
        return self.runner()(config)
