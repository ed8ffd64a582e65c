"""What a run prints, and where the rest goes.

Every line for the person watching goes to stderr as `raysift: ...` (`say`), and to the run
folder's `logs/raysift.log` once a run folder is known (`attach`). Long steps show progress
(`progress`): a rich bar when stderr is a terminal, otherwise plain lines -- what CI logs and
`ray job logs` keep -- after RAYSIFT_PROGRESS_SECONDS (default 10; 0: every update), then 2x, 3x
and every 6x that (10 s, 30 s, 60 s, then once a minute). `configure(verbose)` keeps Ray's own
INFO chatter, Ray Data's progress lines and known harmless warnings off the console unless
`--verbose`; the log file gets them at INFO either way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from raysift.engine.loading import VERBOSE
from raysift.jobs.core.runfolder import RunFolder

LOG = logging.getLogger("raysift")
LOG.propagate = False
LOG.setLevel(logging.INFO)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
_state: dict = {"verbose": False, "file": None, "cli": False}
# Libraries whose deprecation notes are not the user's to act on (we pin their versions).
LIBRARIES = r"(transformers|torch|peft|ray)\."

# Lines Ray prints on every healthy run that say nothing the user can act on. Filtered knowingly:
# token auth is on by design (specs: keep it on); the rest are Ray's notes on its own defaults.
EXPECTED = (
    "Token authentication is enabled",
    "Progress bar disabled because stdout is a non-interactive terminal",
    "Started a local Ray instance",
    "Connecting to existing Ray cluster",
)


class _Expected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(e in message for e in EXPECTED)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("RAYSIFT_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def _tty() -> bool:
    return sys.stderr.isatty()


def say(message: str) -> None:
    """One line for the person watching, and the run's log."""
    if _tty():
        sys.stderr.write(f"\x1b[36mraysift: {message}\x1b[0m\n")
    else:
        sys.stderr.write(f"raysift: {message}\n")
    sys.stderr.flush()
    LOG.info(message)


def configure(verbose: bool = False) -> None:
    """Quiet by default: Ray's loggers at WARNING on the console, expected lines filtered,
    Python warnings from libraries we pin (deprecations, not ours to fix) off."""
    _state["verbose"] = verbose
    _state["cli"] = True  # the CLI's own process: Ray Data's global settings are ours to set
    if verbose:
        os.environ[VERBOSE] = "1"  # the model loads (engine.loading), here and on the workers
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Expected())
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")


def quiet_ray() -> None:
    """Ray's console handlers (installed when ray is imported) at WARNING with the filters; the
    loggers themselves stay at INFO for the run's log file."""
    if _state["verbose"]:
        return
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                continue
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _Expected) for f in handler.filters):
                handler.addFilter(_Expected())
    if not _state["cli"]:  # a library caller's Ray Data context is theirs (raysift uses none)
        return
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
    except (ImportError, AttributeError):  # older Ray Data: its defaults
        pass


class _RunLog(logging.FileHandler):
    """The run's log file. Ray's ray.init re-formats every handler on its logger; this one keeps
    the format it was made with."""

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        if self.formatter is None:
            super().setFormatter(fmt)


def attach(run_dir: Path) -> Path | None:
    """Write this process's raysift lines (and Ray's, at INFO) to <run_dir>/logs/raysift.log.
    A sub-run inside a folder already attached (evaluate's runs) keeps the parent's file."""
    current = _state["file"]
    if current is not None and Path(run_dir).resolve().is_relative_to(current.parent.parent):
        return current
    path = Path(run_dir).resolve() / RunFolder.LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _RunLog(path, encoding="utf-8")
    except OSError:  # a read-only place: the console still has every line
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("raysift-run")
    for name in ("raysift", *RAY_LOGGERS[:3]):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "raysift-run"]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
    _state["file"] = path
    return path


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Progress of one long step: `update(done, **fields)` from the thread that runs it.

    `fields` are shown as `name value` after the counts (a loss, an error vs a threshold).
    The rate and ETA count only the work done by this process (a resumed run's earlier work is
    in `done` from the start)."""

    def __init__(
        self, label: str, total: int, unit: str = "rows", start: int = 0, eta: bool = True
    ) -> None:
        self.label, self.total, self.unit, self.eta = label, max(int(total), 0), unit, eta
        self.done = self.first = int(start)
        self.fields: dict = {}
        self.lines = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if _tty() and self.total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self.bar = Bar(
                TextColumn("raysift: {task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
                console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(label, total=self.total, completed=self.done, extra="")

    def text(self) -> str:
        elapsed = time.perf_counter() - self.t0
        parts = [f"{self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        worked = self.done - self.first
        if worked > 0 and elapsed > 0:
            rate = worked / elapsed
            one = self.unit[:-1] if self.unit.endswith("s") else self.unit
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{one}")
            if self.eta and self.done < self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.fields:
            parts.append(self.shown_fields())
        return ", ".join(parts)

    def update(self, done: int | None = None, **fields) -> None:
        if done is not None:
            self.done = int(done)
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, extra=self.shown_fields())
            return
        now = time.perf_counter()
        if now - self.last >= self.gap() and self.done < self.total:
            self.last = now
            self.lines += 1
            say(f"{self.label}: {self.text()}")

    def shown_fields(self) -> str:
        """The step's own fields, as `name value, ...` (a loss, an error vs a threshold)."""
        return ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in self.fields.items())

    def gap(self) -> float:
        """Seconds between plain lines: the interval, then 2x, 3x, then 6x (default 10 s, 30 s,
        60 s, then a line a minute): quick to show a step has started, short in a long log."""
        return _interval() * (1, 2, 3, 6)[min(self.lines, 3)]

    def advance(self, n: int = 1, **fields) -> None:
        self.update(self.done + n, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        LOG.info(f"{self.label}: {self.text()}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def progress(
    label: str, total: int, unit: str = "rows", start: int = 0, eta: bool = True
) -> Progress:
    """`eta=False` where `total` is a cap, not the work (Sinkhorn's max_iterations)."""
    return Progress(label, total, unit, start, eta)
