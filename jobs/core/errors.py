"""Errors the user can fix, and the one line a failure is reported with.

The CLI turns `InputError` into one line on stderr and exit code 2; anything else is an internal
failure (exit 1). `describe` is that line, for the console and for manifest.json alike.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class InputError(Exception):
    """Bad input or config: the message names the file, column or field and what was expected."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: the stage in flight stops, what was committed stays, and the
    CLI exits 128 + the signal's number (130, 143) with one line. A BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, stage: str | None = None) -> None:
        import signal

        self.signum = signum
        self.stage = stage
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def code(self) -> int:
        return 128 + self.signum


def root_cause(exc: BaseException) -> BaseException:
    """The error a Ray task raised, out of the RayTaskError(s) that carried it to the driver (a
    RayTaskError's own text is the task's name, pid and traceback, in terminal colours)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # RayTaskError keeps the task's exception here
        if not isinstance(cause, BaseException):
            return exc
        exc = cause
    return exc


def input_error(exc: BaseException) -> InputError | None:
    """The InputError behind `exc` (also when Ray wrapped it in a task error), or None."""
    seen = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        found = root_cause(at)
        if isinstance(found, InputError):
            return found
        at = found.__cause__
    return None


def describe(exc: BaseException) -> str:
    """The one line a failure is shown with: an InputError's message; else the name and first
    line of the error the code raised (Ray's wrappers removed, no colour codes)."""
    bad = input_error(exc)
    if bad is not None:
        return _first_line(str(bad), None)
    inner = root_cause(exc)
    message = _first_line(str(inner), 500)
    return f"{type(inner).__name__}: {message}" if message else type(inner).__name__


def _first_line(text: str, limit: int | None) -> str:
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""
