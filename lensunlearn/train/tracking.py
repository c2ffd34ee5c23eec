"""Experiment tracking: `--tracker wandb|tensorboard` mirrors a command's run to a tracker.

A tracked run holds the command's config, every line of its metrics.jsonl (the keys as written
there, the line's `step` as the step: `loop.MetricsLog` forwards each line as it writes it, so
the tracker holds what the file holds), the final evaluation and summary, and the command's plots
as images, under the name of its output folder. The files stay inside that folder:

    <out>/wandb/offline-run-<time>-<id>/   wandb's own run folder (upload it with `wandb sync`)
    <out>/tensorboard/                     TensorBoard's event files (`tensorboard --logdir <out>`)

wandb runs offline unless WANDB_MODE says otherwise (`WANDB_MODE=online` streams to the server),
so a run never reaches the network or stops at a login prompt unless asked to; the project is
$WANDB_PROJECT, else `lensunlearn`. `check_tracker` refuses an unknown WANDB_MODE, and an online
mode without a wandb login, before the command loads a model or makes its output folder. An offline
run's folder is named once the run is closed, where it will be once the output is in place (not in
the staging folder of a replacement), with the `wandb sync` line that uploads it. Both packages are
optional extras, imported only when a tracker is asked for. Only rank 0 tracks under torchrun; the
other ranks get the no-op tracker.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.paths import TENSORBOARD_DIR
from .distributed import is_main_process
from .options import TRACKERS, TRACKING_FIELDS, TrackingOptions, install_hint  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "lensunlearn"
IMAGE_PREFIX = "plots/"
# the modes wandb accepts in WANDB_MODE, and those that stream the run to the server (which needs a login)
WANDB_MODES = ("offline", "online", "disabled", "dryrun", "run", "shared")
WANDB_ONLINE_MODES = ("online", "run", "shared")


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or "offline"


def check_tracker(cfg: Any) -> None:
    """Refuse, before any model loads or output folder is made, a tracker that cannot start: an unknown
    WANDB_MODE, or an online one without a wandb login (at a terminal, wandb asks for the key now, not
    after the model has loaded). Only rank 0 tracks, so only rank 0 checks."""
    if getattr(cfg, "tracker", None) != "wandb" or not is_main_process():
        return
    mode = wandb_mode()
    if mode not in WANDB_MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not a wandb mode: set it to one of {', '.join(WANDB_MODES)}, or "
                        f"unset it to log offline")
    if mode not in WANDB_ONLINE_MODES:
        return
    wandb = _import("wandb")
    try:
        logged_in = wandb.login(verify=False, prompt=sys.stdin.isatty())
    except wandb.errors.Error as err:
        raise UserError(f"WANDB_MODE={mode} needs a wandb login ({' '.join(str(err).split())}): run `wandb login` "
                        f"or set WANDB_API_KEY, or unset WANDB_MODE to log offline") from err
    if not logged_in:
        raise UserError(f"WANDB_MODE={mode} streams the run to the wandb server, and wandb has no login (no API "
                        f"key): run `wandb login` or set WANDB_API_KEY, or unset WANDB_MODE to log offline")


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics line, without its step (the step is the tracker's x axis)."""
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as `a/b/c` keys (a results file as summary numbers)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class Tracker:
    """No tracker: every call does nothing. The trackers below keep this interface; the last step
    logged is where images and summary numbers go."""

    step = 0

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_images(self, paths: Iterable[str | Path]) -> None:
        pass

    def log_summary(self, values: Mapping[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(failed=kind is not None)


class _Opened(Tracker):
    """A tracker with a backend: closed once, by its owner or, after a crash, at exit."""

    def __init__(self) -> None:
        self.closed = False
        atexit.register(self.close, True)

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        self._close(failed)

    def _close(self, failed: bool) -> None:
        raise NotImplementedError


class WandbTracker(_Opened):
    def __init__(self, wandb: Any, run_dir: Path, name: str, kind: str, group: str | None,
                 final: Path | None = None) -> None:
        mode = wandb_mode()
        # wandb completes its files in a background service; with no run of the caller's own in this
        # process, `close` waits for it, so that the files are whole when the command returns
        self.owns_session = wandb.run is None
        # offline, wandb would name its run folder inside the folder being written, which for a replacement
        # is the staging folder that is renamed once the command succeeds: `close` names the final one instead
        self.offline = mode == "offline"
        settings = wandb.Settings(silent=True) if self.offline else None
        try:
            # create_new: a run of the caller's own (or the previous attack of a sweep) is left alone
            self.run = wandb.init(dir=str(run_dir), name=name, group=group, job_type=kind, mode=mode,
                                  project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, reinit="create_new",
                                  settings=settings)
        except wandb.errors.Error as err:
            raise UserError(f"wandb could not start a run in {mode} mode ({' '.join(str(err).split())}): run "
                            f"`wandb login`, or unset WANDB_MODE to log offline") from err
        self.wandb = wandb
        self.folder = _moved(Path(self.run.settings.sync_dir), Path(run_dir), final)
        super().__init__()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log(numbers(metrics), step=step)
        self.step = max(self.step, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_images(self, paths: Iterable[str | Path]) -> None:
        images = {f"{IMAGE_PREFIX}{Path(p).stem}": self.wandb.Image(str(p)) for p in paths if Path(p).is_file()}
        if images:
            self.run.log(images, step=self.step)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def _close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        if self.owns_session:
            self.wandb.teardown()
        if self.offline:
            log.info("wandb: the run is saved in %s; upload it with `wandb sync %s`", self.folder, self.folder)


def _moved(path: Path, work: Path, final: Path | None) -> Path:
    """Where `path`, inside the folder being written (`work`), will be once that folder is `final`."""
    if final is None:
        return path
    try:
        return Path(final) / path.resolve().relative_to(Path(work).resolve())
    except ValueError:
        return path


class TensorBoardTracker(_Opened):
    def __init__(self, writer_class: Any, folder: Path, resume_step: int) -> None:
        # A resumed run rewrites the steps after its checkpoint, as metrics.jsonl does: TensorBoard
        # drops the earlier attempt's events from `purge_step` on.
        self.writer = writer_class(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None,
                                   flush_secs=30)
        super().__init__()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in numbers(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.step = max(self.step, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), self.step)  # a markdown code block

    def log_images(self, paths: Iterable[str | Path]) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            if Path(path).is_file():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"{IMAGE_PREFIX}{Path(path).stem}", pixels, self.step, dataformats="HWC")

    def log_summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"summary/{key}", float(value), self.step)
            elif isinstance(value, str):
                self.writer.add_text(f"summary/{key}", value, self.step)

    def _close(self, failed: bool) -> None:
        self.writer.close()


def _import(tracker: str) -> Any:
    try:
        return importlib.import_module(TRACKERS[tracker][0])
    except ImportError as err:
        raise UserError(install_hint(tracker)) from err


def open_tracker(cfg: Any, run_dir: str | Path, run_name: str, kind: str, *, resume_step: int = 0,
                 group: str | None = None, final: str | Path | None = None) -> Tracker:
    """The tracker `cfg.tracker` names, writing inside `run_dir` under `run_name`; the no-op tracker when
    none is asked for or on a rank other than 0. `resume_step`: the step a resumed run continues after.
    `group`: wandb's group of runs that belong together (the attacks of a sweep). `final`: where `run_dir`
    will be once the command succeeds (it differs for a replacement, written in a staging folder)."""
    name = getattr(cfg, "tracker", None)
    if name is None or not is_main_process():
        return Tracker()
    module = _import(name)
    run_dir = Path(run_dir)
    log.info("tracking the run with %s in %s", name, run_dir)
    if name == "wandb":
        return WandbTracker(module, run_dir, run_name, kind, group, Path(final) if final is not None else None)
    return TensorBoardTracker(module.SummaryWriter, run_dir / TENSORBOARD_DIR, resume_step)
