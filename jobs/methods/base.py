"""What a method is: the records of the method and representation tables, and what a method's
`select` gets.

A *selector* chooses rows (top-k with an aggregation, TSDS, GOT-D, random, DSIR, GradEx); a
*representation* says what a row is to the selectors that work on vectors (knn, tsds, gotd): the
sentence encoder's embedding, the user's own vectors, the causal LM's hidden states, LESS's gradient
features. The two vary separately: every vector selector runs on every representation. A *preset*
is a method name for one selector on one representation with one aggregation (rds, less).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysift.engine.selection import Selection
from raysift.jobs.config import Config, Plan, RayConfig, SelectConfig
from raysift.jobs.core.pool import Pool, read_vector_range
from raysift.jobs.core.storage import Store
from raysift.jobs.runtime import start_ray


@dataclass
class MethodInput:
    """What every method's input has: the config and its plan (selector, representation,
    aggregation), and from them the budget, the seed and the selector's own section."""

    cfg: Config

    @property
    def plan(self) -> Plan:
        return self.cfg.plan()

    @property
    def budget(self) -> int:
        return self.cfg.select.budget

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def options(self):
        """The selector's own section of the config (`select.<selector>`)."""
        return getattr(self.cfg.select, self.plan.selector, None)


@dataclass
class Context(MethodInput):
    """What a method's `select` gets: the partitioned pool (its parts read by tasks and actors,
    never by the driver) with the representation's vectors, the targets, where outputs go."""

    pool: Pool
    targets: Pool
    run_dir: Path  # the driver's run folder (small files)
    out: Store  # the run folder as workers reach it (bulk outputs)
    log: Callable[[str], None] = print
    info: dict = field(default_factory=dict)  # what preparing the representation recorded

    def target_vectors(self) -> np.ndarray:
        """The M target vectors (the driver may hold what grows with the targets)."""
        return read_vector_range(self.targets, 0, self.targets.n)


@dataclass
class InMemory(MethodInput):
    """What a method's in-process `local` gets (`raysift.select` on a pool that fits in memory,
    no Ray): the pool's ids in row order, its vectors and the target vectors (None for a method
    that needs none), the targets' carried columns. It returns what `select` returns on Ray."""

    ids: np.ndarray  # str, the pool's row order
    vectors: np.ndarray | None = None  # (N, d) float32
    target_vectors: np.ndarray | None = None  # (M, d) float32
    target_table: pa.Table | None = None

    def both_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(pool vectors, target vectors) of a method that needs a representation (the caller
        represented both sides before calling it)."""
        assert self.vectors is not None and self.target_vectors is not None
        return self.vectors, self.target_vectors


def no_checks(cfg: Config) -> None:
    """A method or representation with no static checks."""


def all_checks(cfg: Config, *checks: Callable[[Config], None]) -> None:
    """Run several static checks in order (a preset: its representation's, then its selector's)."""
    for check in checks:
        check(cfg)


@dataclass(frozen=True)
class Method:
    """One entry of the method table: everything that differs per method."""

    name: str
    summary: str
    select: Callable[[Context], Selection]
    score: str  # what selection.parquet's `score` means (the report shows it)
    needs: frozenset[str] = frozenset()  # "vectors" (a representation), "texts", "sources"
    options: type | None = None  # its config section's model, if it has one
    local: Callable[[InMemory], Selection] | None = None  # in-process, for pools held in memory
    checks: Callable[[Config], None] = no_checks  # static: before Ray starts, before any write
    # what `raysift.Result` adds, read from the run folder on first use: name -> reader(store)
    outputs: dict[str, Callable[[Store], pa.Table]] = field(default_factory=dict)

    @property
    def in_process(self) -> bool:
        return self.local is not None

    @property
    def section(self) -> str | None:
        """The select section its options go in (`select.<section>`), from its options model."""
        return section_of(self.options)


def section_of(options: type | None) -> str | None:
    for name, field_ in SelectConfig.model_fields.items():
        if options is not None and field_.annotation is options:
            return name
    return None


@dataclass(frozen=True)
class Representation:
    """One entry of the representation table: what a row is to the vector selectors."""

    name: str
    summary: str
    # both sides as the selectors read them, computing what is missing; returns the pools (with
    # their `vectors`) and what to record in the manifest
    prepare: Callable[[Context], tuple[Pool, Pool, dict]]
    similarity: str  # what a vector selector's similarity is on it
    options: type | None = None  # its config section's model
    embed_stage: bool = False  # its vectors are the embed stage's (else the select stage's)
    # in-process vectors of both sides for `raysift.select`: (cfg, candidates, targets) -> (X, Q)
    local: Callable[[Config, pa.Table, pa.Table], tuple[np.ndarray, np.ndarray]] | None = None
    checks: Callable[[Config], None] = no_checks


def start_cluster(settings: RayConfig, gpu: str) -> bool:
    """Start or join Ray for shard actors; True when each shard should take a GPU (`gpu: auto`
    and the cluster has GPUs)."""
    import ray

    start_ray(settings)
    return gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)

