"""A pipeline stage as a record, as a method is one (jobs/methods/base.py): what it checks before
a cluster starts, when its committed result is current, and how it runs. `jobs.pipeline` runs
the records in order; it knows no stage by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raysift.jobs.config import Config
from raysift.jobs.core.runfolder import Manifest
from raysift.jobs.core.storage import Store


@dataclass
class StageRun:
    """What every stage gets: the config, the run folder, the stages this run runs, where the
    ingested pool lives and the log."""

    cfg: Config
    run_dir: Path
    stages: list[str]
    data: Store | None = None  # the pool when it is not this run folder's (`raysift evaluate`)
    log: Callable[[str], None] = print
    append: bool = False  # ingest only new input files, after the pool's rows (`raysift curate`)

    @property
    def pool_store(self) -> Store:
        """Where the ingested pool lives."""
        return self.data or Store.for_run(self.run_dir)


@dataclass(frozen=True)
class Reuse:
    """Why a stage need not run: its committed result is current, or nothing in this run needs
    it. `info`: recorded as the stage's finished manifest entry (None: the entry stays as it is)."""

    message: str
    info: dict | None = None


def always_runs(run: StageRun, manifest: Manifest) -> Reuse | None:
    """A stage that decides inside its run what it can reuse (select; finetune resumes)."""
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # what it reads -> what it writes
    checks: Callable[[StageRun], None]  # no cluster, no writes: a typo fails in a second
    current: Callable[[StageRun, Manifest], Reuse | None]  # a reason not to run, or None
    run: Callable[[StageRun], dict]  # does the work; returns the manifest entry's info
    needs_ray: bool = True  # Ray starts before `run` (finetune starts it after its own checks)
