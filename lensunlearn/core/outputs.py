"""Output folders: which ones are ours, and replacing one without ever losing the old version.

Every command marks the folder it creates with a small JSON file (`MARKER_FILE`, saying which
kind of output it is). `--overwrite` only ever replaces a folder recognised as an output of the
same kind: by its marker, or, for folders written before markers existed, by the files that kind
always writes. Anything else (a parent folder, the run being attacked, unrelated notes) is
refused with one line that names the folder.

Replacing is a transaction. The new result is written into a hidden sibling, the staging folder
`.<name>.incoming`, and swapped in only when the command has succeeded:

    rename <name> -> .<name>.old;  rename .<name>.incoming -> <name>;  delete .<name>.old

A crash between the renames leaves the old version or the complete new one under a name that
`recover` (called before every use of the folder) puts back in place. A replacement killed before
it finished leaves the old output untouched; its checkpoint lives in the staging folder, where
`--resume` finds it and `--overwrite` discards it.

The staging and `.old` folders are recognised by their marker, like every output: a folder of the
user's that happens to be named `.<name>.old` or `.<name>.incoming` is never deleted, renamed or
written into (a command that would need the name refuses, naming it). And an output never replaces
what its command reads: a folder that is, or holds, one of the command's inputs (the model it
starts from, the run it distils) is refused as its output, whatever the flags.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import paths as layout
from .config import ConfigError
from .paths import MARKER_FILE, read_marker, write_marker

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGING_SUFFIX, TRASH_SUFFIX = ".incoming", ".old"
_TAMPER_EXTRAS = {layout.SPLIT_FILE, layout.SPLIT_TASKS_DIR, layout.ORIGINAL_EVAL_FILE, layout.SWEEP_PLOT_FILE,
                  layout.TAMPER_PLOT_FILE, layout.METRICS_FILE}


def _legacy_tamper(p: Path) -> bool:
    """One attack's or a sweep's files at the top, or only attack folders (`lr*/results.json`) and their
    shared files: a sweep killed before its summary. A folder that merely contains tamper outputs
    further down (`runs/`) is not one."""
    if (p / layout.RESULTS_FILE).is_file() or (p / layout.SWEEP_FILE).is_file():
        return True
    children = [c for c in p.iterdir() if not c.name.startswith(".")]
    attacks = [c for c in children if c.is_dir() and c.name.startswith("lr") and (c / layout.RESULTS_FILE).is_file()]
    return bool(attacks) and all(c in attacks or c.name in _TAMPER_EXTRAS for c in children)


def has_lens_files(p: Path) -> bool:
    """Whether a folder holds a finished tuned lens: its parameters and its config."""
    return (p / layout.LENS_PARAMS_FILE).is_file() and (p / layout.LENS_CONFIG_FILE).is_file()


# How folders written before markers existed are recognised: the files each kind always wrote.
LEGACY_LAYOUTS: dict[str, Callable[[Path], bool]] = {
    "unlearn": lambda p: (p / layout.RUN_CONFIG_FILE).is_file() and any(
        (p / n).exists() for n in (layout.SUMMARY_FILE, layout.MERGED_DIR, layout.CHECKPOINT_FILE,
                                   layout.METRICS_FILE)),
    "lens": lambda p: has_lens_files(p) or (p / layout.LENS_TRAIN_CONFIG_FILE).is_file(),
    "tamper": _legacy_tamper,
    "demo": lambda p: (p / layout.DEMO_FACTS_DIR).is_dir() and ((p / layout.DEMO_LENS_DIR).is_dir()
                                                                or (p / layout.REPORT_FILE).is_file()),
}
NOUNS = {"unlearn": "unlearning run", "lens": "tuned lens", "tamper": "tamper output", "demo": "demo folder",
         "search": "grid search", "distill": "distillation run",
         "locate": "locate result"}


def _a(kind: str) -> str:
    noun = NOUNS.get(kind, kind)
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def output_kind(folder: str | Path) -> str | None:
    """Which kind of output `folder` is: its marker's kind, else the legacy layout it has, else None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marker = read_marker(folder)
    if marker is not None:
        return marker
    return next((kind for kind, looks in LEGACY_LAYOUTS.items() if looks(folder)), None)


def is_empty(folder: Path) -> bool:
    """No entries but (perhaps) a marker."""
    return folder.is_dir() and all(p.name == MARKER_FILE for p in folder.iterdir())


def staging_path(final: Path) -> Path:
    return final.parent / f".{final.name}{STAGING_SUFFIX}"


def trash_path(final: Path) -> Path:
    return final.parent / f".{final.name}{TRASH_SUFFIX}"


def check_name(name: str, flag: str = "--run_name") -> str:
    """A folder name, not a path: no separators, no '..', not absolute, not hidden."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") \
            or Path(name).is_absolute():
        raise ConfigError(f"{flag} {name!r} must be a plain folder name (no '/', '..' or leading '.'): "
                          f"use --out to choose where runs go")
    return name


def is_ours(folder: Path, kind: str | None = None) -> bool:
    """Whether `folder` is a real folder (not a link) that carries this package's marker (of `kind`, when given)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    marker = read_marker(folder)
    return marker is not None and (kind is None or marker == kind)


def recover(final: Path, kind: str | None = None) -> None:
    """Finish or roll back a swap that a crash interrupted (see the module docstring). Only folders that
    carry the marker (of `kind`, when given) are touched: a user's folder that merely has the name of
    the old version or of the staging folder is left alone."""
    staging, trash = staging_path(final), trash_path(final)
    if not is_ours(trash, kind):
        return
    if final.exists():
        if staging.exists():  # not a state a swap leaves: touch nothing
            log.warning("%s, %s and %s all exist: leaving them as they are", final, staging, trash)
            return
        shutil.rmtree(trash)  # the new version is in place: only the old one was left to delete
    elif is_ours(staging, kind):  # the old version was moved aside and the new one is complete: finish the swap
        staging.rename(final)
        shutil.rmtree(trash)
        log.warning("finished replacing %s, which an earlier run was interrupted swapping in", final)
    else:
        trash.rename(final)
        log.warning("restored %s, which an earlier run was interrupted replacing", final)


Reads = Mapping[str, "str | Path | None"] | Iterable[tuple[str, "str | Path | None"]]


def check_not_input(final: Path, reads: Reads, flag: str) -> None:
    """Refuse an output folder that is, or holds, a path the command reads (`reads`: pairs of the flag or
    argument that names it and the path; values that are not existing paths, such as hub ids, are skipped):
    writing the output there would replace the command's own input."""
    target = Path(final).expanduser().resolve()
    for what, value in (reads.items() if isinstance(reads, Mapping) else reads):
        if value is None or not str(value).strip():
            continue
        path = Path(str(value)).expanduser()
        if not path.exists():
            continue
        source = path.resolve()
        if source == target or target in source.parents:
            raise ConfigError(f"{flag}: {final} {'is' if source == target else 'holds'} {what} {value}, which this "
                              f"command reads: its output there would replace its own input; choose another {flag}")


def check_writable(folder: Path) -> None:
    """Create `folder` (and its parents) and write a probe file into it, before any compute."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise NotADirectoryError(f"cannot write to {folder}: {blocking} is a file, not a folder; choose another "
                                 f"output location")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write to {folder} ({err.strerror or err}): choose another output "
                              f"location") from err


def check_folder(folder: str | Path, kind: str, flag: str = "--out", also: tuple[str, ...] = ()) -> Path:
    """A folder a command writes its files into and rewrites on every run (`report`) must be new, empty, or
    marked as this `kind` (or one of `also`) by an earlier run: a folder of anyone else's is refused, so that
    no file of the user's is replaced."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{flag} {folder} is a file, not a folder: choose another {flag}")
    if folder.is_dir() and not is_empty(folder) and read_marker(folder) not in (kind, *also):
        raise FileExistsError(f"{flag} {folder} exists and was not made by `lensunlearn {kind}` (no {MARKER_FILE} "
                              f"of that kind): refusing to write into it, which would replace files of the same "
                              f"names; choose another {flag}")
    return folder


def claim_folder(folder: str | Path, kind: str, flag: str = "--out", also: tuple[str, ...] = ()) -> Path:
    """`check_folder`, then create and mark the folder."""
    folder = check_folder(folder, kind, flag, also)
    check_writable(folder)
    write_marker(folder, kind)
    return folder


def check_file_output(path: Path, overwrite: bool, flag: str = "--out",
                      recognise: Callable[[Path], bool] | None = None) -> None:
    """An output file: refuse to replace it without `overwrite` (or at all if it is not ours); its
    folder must be writable. The file itself is later written atomically (temporary file, rename)."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder: give a file name such as {path / layout.EVAL_FILE}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists: pass --overwrite to replace it, or choose another "
                              f"{flag}")
    if path.exists() and recognise is not None and not recognise(path):
        raise FileExistsError(f"{flag} {path} is not a file this command wrote: refusing to replace it; choose "
                              f"another {flag}")
    check_writable(path.parent)


@dataclass
class Output:
    """Where a command writes (`work`) and where its result ends up (`final`); they differ when an
    existing output is being replaced (`work` is then the staging folder)."""

    final: Path
    work: Path
    kind: str
    created: bool = False  # this command made `work` (and may remove it again if it writes nothing)

    @property
    def staged(self) -> bool:
        return self.work != self.final

    def commit(self) -> Path:
        """Swap a staged result in place of the old one; a no-op for an output written in place."""
        if not self.staged:
            return self.final
        trash = trash_path(self.final)
        if trash.exists() or trash.is_symlink():
            raise FileExistsError(f"{trash} is in the way of replacing {self.final} and is not lensunlearn's: move it "
                                  f"elsewhere; the new result waits in {self.work}")
        if self.final.exists():
            write_marker(self.final, self.kind)  # an output from before markers: its old version stays recognisable
            self.final.rename(trash)
        self.work.rename(self.final)
        if trash.exists():
            shutil.rmtree(trash)
        log.info("replaced %s with the new result", self.final)
        self.work = self.final
        return self.final

    def run(self, write: Callable[[Path], T]) -> T:
        """`write(work folder)`, then swap the result in; a failure leaves the old output untouched."""
        try:
            result = write(self.work)
        except BaseException:
            self.discard_if_empty()
            raise
        self.commit()
        return result

    def discard_if_empty(self) -> None:
        """Remove a folder this command created but wrote nothing into (it failed before its first file)."""
        if self.created and is_empty(self.work):
            shutil.rmtree(self.work, ignore_errors=True)


def _new(work: Path, final: Path, kind: str) -> Output:
    created = not work.exists()
    check_writable(work)
    write_marker(work, kind)
    return Output(final, work, kind, created)


def prepare_output(final: str | Path, kind: str, *, overwrite: bool, resume: bool = False,
                   finished: Callable[[Path], bool], resumable: bool = True, flag: str = "--out",
                   reads: Reads = ()) -> Output:
    """Decide where a command writes, refusing what would lose or clobber anything; no compute yet.

    Fresh (absent or empty folder): write in place. `--resume`: continue an unfinished replacement
    in the staging folder, else an unfinished output in place. `--overwrite`: write a replacement
    beside an output of this `kind` (never anything else). Otherwise an existing output is refused.
    `reads`: what the command reads (see `check_not_input`), which its output may never replace.
    """
    final = Path(final)
    check_not_input(final, reads, flag)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{flag} {final} is a file, not a folder: choose another {flag}")
    recover(final, kind)
    staging, trash = staging_path(final), trash_path(final)
    pending = is_ours(staging, kind) and not is_empty(staging)
    if final.is_dir() and not is_empty(final) and output_kind(final) != kind:
        raise FileExistsError(f"{final} exists and is not {_a(kind)} written by lensunlearn (no {MARKER_FILE} "
                              f"of that kind, nor its files): refusing to write into or delete it; choose another "
                              f"{flag}")
    if resume:
        if pending:
            _check_trash(trash, final)
            log.info("resuming the unfinished replacement of %s in %s", final, staging)
            return Output(final, staging, kind)
        if final.is_dir() and finished(final):
            raise FileExistsError(f"{final} holds a finished {NOUNS.get(kind, kind)}: there is nothing "
                                  f"to resume; pass --overwrite to replace it")
        if final.is_dir() and not is_empty(final):
            return Output(final, final, kind)
        log.warning("--resume: %s holds nothing to resume; starting from the beginning", final)
        return _new(final, final, kind)
    if pending and not overwrite:
        hint = "pass --resume to continue it or --overwrite to start over" if resumable else \
            "its partial results are there; pass --overwrite to start over"
        raise FileExistsError(f"{staging} holds an interrupted replacement of {final}: {hint}")
    if overwrite and is_ours(staging, kind):
        shutil.rmtree(staging)  # an earlier replacement's partial work: --overwrite starts it over
    if not final.exists() or is_empty(final):
        return _new(final, final, kind)
    if not overwrite:
        done = finished(final) or not resumable
        state = ("a finished " + NOUNS.get(kind, kind) if finished(final) else
                 "an unfinished " + NOUNS.get(kind, kind) if resumable else _a(kind))
        hint = "pass --overwrite to replace it" if done else "pass --resume to continue it or --overwrite to start over"
        raise FileExistsError(f"{final} holds {state}: {hint}, or choose another {flag}")
    _check_trash(trash, final)
    if staging.exists() or staging.is_symlink():
        raise FileExistsError(f"{staging} is in the way of replacing {final} and is not a staging folder of "
                              f"lensunlearn: move it elsewhere, or choose another {flag}")
    log.info("%s will be replaced once the new result is complete (written to %s meanwhile)", final, staging)
    return _new(staging, final, kind)


def _check_trash(trash: Path, final: Path) -> None:
    """The name a replacement moves the old version to must be free (`recover` has removed ours)."""
    if trash.exists() or trash.is_symlink():
        raise FileExistsError(f"{trash} is in the way of replacing {final} and is not lensunlearn's: move it "
                              f"elsewhere, or choose another output folder")
