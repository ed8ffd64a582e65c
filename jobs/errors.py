"""Errors the user can fix. The CLI turns `InputError` into one line on stderr and exit code 2;
anything else is an internal failure (exit 1)."""


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
