"""Engine parameters are declared once, here in `engine/`, as dataclasses whose fields carry their
description and bounds (`param`). The config (`raysift.jobs.config`) wraps them into its schema:
the bounds are what a config is validated against, the descriptions what the config reference
prints. No pydantic here: the engine stays plain Python."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

BOUNDS = ("ge", "gt", "le", "lt")


def param(default: Any = dataclasses.MISSING, doc: str = "", *, factory=None, config: bool = True,
          **bounds: float) -> Any:  # fmt: skip
    """A dataclass field with its description (`doc`), bounds (ge/gt/le/lt) and whether a config
    exposes it (`config=False`: an internal knob with a fixed default)."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"param: unknown bounds {sorted(unknown)}")
    meta = {"doc": doc, "bounds": bounds, "config": config}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def config_fields(cls) -> list[dataclasses.Field]:
    """The fields of an engine parameter dataclass that a config exposes."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]


INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexParams:
    """How a shard indexes its rows. `flat` is exact; `ivf` and `hnsw` trade recall for speed.

    ivf: `nlist` inverted lists (None: int(sqrt(n)) // 2, the TSDS reference's choice), `nprobe`
    lists scanned per query (`density_nprobe` for the range search: points within sigma sit in the
    nearest lists, so density needs far fewer than a deep kNN list), k-means on at most
    `train_points_per_list * nlist` rows for `niter` iterations.
    hnsw: `hnsw_m` links per node, `ef_construction`, `ef_search`.
    brute_force_knn: answer kNN by an exact scan of the rows and use the index only for density.
    Query sets are small (M <= 1e4) while density points are many, and deep lists (L = 5000) are
    where IVF recall is worst, so this is often the better split (BENCHMARKS.md, 1M rows).
    """

    kind: Literal["flat", "ivf", "hnsw"] = param(
        "flat", "flat = exact search; ivf / hnsw = approximate, faster on big pools"
    )
    nlist: int | None = param(
        None, "ivf lists per shard; null = int(sqrt(rows)) // 2 (the reference)", ge=1
    )
    nprobe: int = param(10, "IVF lists searched per query", ge=1, le=65536)
    density_nprobe: int | None = param(
        None, "ivf lists scanned by the density range search; null = nprobe", ge=1, le=65536
    )
    brute_force_knn: bool = param(
        False, "kNN by exact scan of each shard; the index serves only the density"
    )
    train_points_per_list: int = param(256, "IVF k-means training sample per list", ge=1)
    niter: int = param(10, "IVF k-means iterations", ge=1, le=1000)
    hnsw_m: int = param(32, "HNSW graph degree", ge=4, le=256)
    ef_construction: int = param(128, "HNSW construction beam", ge=8)
    ef_search: int = param(256, "HNSW search beam", ge=8)

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class TSDSParams:
    """The paper's knobs (reference defaults). kde_K None: every neighbour within sigma counts
    (exact mode) / the reference's 1000 (compat mode)."""

    alpha: float = param(
        0.5, "weight of alignment vs diversity, in (0, 1); larger = fewer neighbours", gt=0, lt=1
    )
    C: float = param(5.0, "distance scale, > 0", gt=0)
    sigma: float = param(0.75, "KDE kernel radius; 0 = no density term (KNN-Uniform)", ge=0)
    max_K: int = param(5000, "neighbours fetched per target", ge=2)
    kde_K: int | None = param(
        None, "cap on neighbours in the density; null = all within sigma (exact), 1000 (compat)",
        ge=1,
    )  # fmt: skip
    mode: Literal["exact", "compat"] = param(
        "exact", "exact = corrected optimum; compat = the reference's output"
    )
    # internal knobs (not in the config)
    first: int = param(64, "neighbours per query whose density is computed up front", config=False)
    density_batch: int = param(
        4096, "candidates per density fan-out (bounds the pairs within sigma)", config=False
    )


@dataclass(frozen=True)
class SinkhornParams:
    """GOT-D's solve: the entropic OT problem and the coordinator's loop."""

    epsilon: float = param(0.1, "entropic regularisation, absolute (not scaled by the cost)", gt=0)
    threshold: float = param(
        0.1,
        "stop when the L1 candidate-marginal error is below this; 0.1 = the reference (4-9 "
        "iterations), 1e-4 = converged",
        gt=0,
    )  # fmt: skip
    momentum: float = param(
        1.3, "over-relaxation from the first iteration (as ott-jax 0.4.4)", gt=0, lt=2
    )
    max_iterations: int = param(2000, "Sinkhorn iteration cap", ge=1)
    cache_mb: int = param(
        1024,
        "per shard: keep the targets x shard cost block if it fits, else recompute it in blocks "
        "each pass",
        ge=0,
    )  # fmt: skip
    block: int = param(65536, "candidates per cost block", ge=1)
