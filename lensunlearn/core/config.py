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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError, UserError, read_text

log = logging.getLogger(__name__)
T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A bad option value, reported before any compute is spent (the command exits 2, as for a usage error)."""


class Options:
    """Base of every config and option mixin. Each class checks its own fields in `__post_init__`
    and then calls `super().__post_init__()`, so a config made of several mixins runs every check,
    and every check raises `ConfigError` before anything is loaded."""

    def __post_init__(self) -> None:
        pass


def option(default: Any, help: str, **kw: Any) -> Any:
    """Declare a config field with its help text (shown by `--help`).

    Keywords go to the field's metadata: `metavar` (what `--help` shows for the value, e.g. FILE or
    DIR), `positional`/`nargs`, `append` (a tuple of strings whose flag is repeated, one item each), and
    `old_names`: former flag names still accepted, hidden from `--help`. For a bool field `old_names`
    may map a name to the value it sets (`{"lora": False}`: `--lora` sets the field to False,
    `--no-lora` to True).
    """
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def redefault(cls: type, name: str, default: Any) -> Any:
    """The field `name` of the mixin `cls` with another default, for a config that inherits it
    (help text and old names stay those of `cls`)."""
    inherited = next(f for f in dataclasses.fields(cls) if f.name == name)
    return option(default, **inherited.metadata)


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


def _converter(annotation: Any) -> Any:
    base, optional = _base_type(annotation)
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        conv = parse_int_list if inner is int else parse_float_list if inner is float else parse_str_list
    elif typing.get_origin(base) is typing.Literal:
        conv = str
    else:
        conv = base
    if not optional:
        return conv
    return lambda s: None if s.lower() in ("none", "null", "") else conv(s)


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
                                type=kwargs["type"], choices=kwargs.get("choices"), help=argparse.SUPPRESS)
            continue
        for flag, const in ((f"--{old}", value), (f"--no-{old}", not value)):
            new = f"--{name}" if const else f"--no-{name}"
            parser.add_argument(flag, action=_OldName, new=new, dest=name, nargs=0, const=const,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_config_args(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """Add `--config FILE` and one `--name` flag per dataclass field (and its hidden old names); help shows
    the (preset) default."""
    parser.add_argument("--config", dest=CONFIG_FILE_DEST, metavar="FILE", default=None, help=CONFIG_FILE_HELP)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        annotation = hints[f.name]
        base, _ = _base_type(annotation)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _converter(annotation)
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
            if typing.get_origin(base) is typing.Literal:
                kwargs["choices"] = typing.get_args(base)
                kwargs["metavar"] = "{" + ",".join(map(str, kwargs["choices"])) + "}"
            if f.metadata.get("append"):  # a repeatable flag: each occurrence is one item, commas included
                kwargs.update(action="append", type=str)
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            kwargs["nargs"] = f.metadata.get("nargs", None)
            kwargs["metavar"] = f.name.upper()
            parser.add_argument(f.name, **{k: v for k, v in kwargs.items() if k != "default"},
                                default=argparse.SUPPRESS)
            continue
        parser.add_argument(f"--{f.name}", **kwargs)
        _add_old_names(parser, f.name, base is bool, kwargs, f.metadata.get("old_names", ()))


def config_from_args(cls: type[T], namespace: argparse.Namespace, base: T | None = None,
                     derived: Iterable[str] = ()) -> T:
    """Build `cls` from parsed flags over the values of `--config FILE` (when given) over `base` (a preset)
    over the field defaults. `derived`: keys the command's own saved config holds beside its fields (a
    run's plan), skipped when such a file is read back."""
    fields = {f.name for f in dataclasses.fields(cls)}
    path = getattr(namespace, CONFIG_FILE_DEST, None)
    from_file = read_config_file(cls, path, derived) if path else {}
    given = {name: getattr(namespace, name) for name in fields if hasattr(namespace, name)}
    values = {**from_file, **given}
    if base is None:
        return cls(**values)
    return dataclasses.replace(base, **values)


# --- config files -----------------------------------------------------------------------------------

CONFIG_FILE_DEST = "config_file"  # not "config": a command may one day have a field of that name
# Flags that say what to do with an existing run rather than what the run is: a rerun from a finished
# run's saved config must neither replace nor continue anything unless the command line says so.
FLAG_ONLY = ("resume", "overwrite")
CONFIG_FILE_HELP = ("read options from FILE: the run_config.json a run wrote, or a YAML or JSON mapping of "
                    "option names to values. Precedence: built-in defaults < --preset (where the command has "
                    "one) < FILE < flags given on the line. Unknown keys and wrong types are errors; resume "
                    "and overwrite are read only from the line, never from FILE")


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


def read_config_file(cls: type, path: str | Path, derived: Iterable[str] = ()) -> dict[str, Any]:
    """The field values of `cls` that the config file `path` sets, checked and converted to the field
    types (lists become tuples); keys in `derived` are skipped, `FLAG_ONLY` keys dropped."""
    path = Path(path)
    data = _load_mapping(path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    skipped = set(derived)
    unknown = [str(key) for key in data if key not in fields and key not in skipped]
    if unknown:
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, fields, 1)) else key
                 for key in unknown]
        raise ConfigError(f"--config {path}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: "
                          f"see --help for the options of this command")
    types_ = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key in skipped:
            continue
        if key in FLAG_ONLY:
            if value:
                log.warning("--config %s sets %s: ignored, pass --%s on the command line to %s", path, key, key, key)
            continue
        values[key] = _file_value(value, types_[key], f"--config {path}: {key}")
    return values


def _file_value(value: Any, annotation: Any, what: str) -> Any:
    """`value` as read from a config file, checked against the field's type."""
    base, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{what} must be {_type_name(base)}, got null")
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        if isinstance(value, str):  # the flag's spelling, "5,10,15"
            return _converter(base)(value)
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

    def runner(self) -> Callable[[Any], Any]:
        """The function that runs the command, imported now."""
        if callable(self.run):
            return self.run
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, config: Any) -> Any:
        return self.runner()(config)
