"""What every selection method returns, whatever its math."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Selection:
    """Chosen candidate rows in rank order (0 = best).

    indices: candidate row numbers, int64, best first, no repeats.
    score: the method's score for each chosen row (higher = chosen earlier).
    probability: selection probability of each chosen row where the method defines one.
    count: times each chosen row was drawn, for methods that sample with replacement.
    """

    indices: np.ndarray
    score: np.ndarray
    probability: np.ndarray | None = None
    count: np.ndarray | None = None
    # the distribution over the pool for methods that have one: (rows, p) on its support
    p: tuple[np.ndarray, np.ndarray] | None = None
    info: dict = field(default_factory=dict)  # what the method wants in the manifest
    potential: np.ndarray | None = None  # GOT-D: the converged target potential f

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.score = np.asarray(self.score, dtype=np.float64)
        n = len(self.indices)
        for name in ("score", "probability", "count"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Selection.{name} has {len(value)} rows, indices has {n}")
        if len(np.unique(self.indices)) != n:
            raise ValueError("Selection.indices has repeated rows")


def check_budget(budget: int, n_candidates: int) -> None:
    if budget < 1:
        raise ValueError(f"select.budget must be >= 1, got {budget}")
    if budget > n_candidates:
        raise ValueError(
            f"select.budget={budget} is larger than the pool ({n_candidates} candidates)"
        )


def top_k(score: np.ndarray, k: int, tiebreak: np.ndarray) -> np.ndarray:
    """Indices of the k highest scores, best first; ties broken by ascending `tiebreak` (the id),
    so the order never depends on the order rows arrived in."""
    order = np.lexsort((tiebreak, -score))
    return order[:k]


@dataclass
class Ranked:
    """A best-first list of candidate rows: by `key` descending, ties by `tie` ascending (the id,
    so the order never depends on how the pool was split). Per-partition lists of the best k merge
    exactly into the global best k (`merge`): the union of every part's top k holds the top k.

    key: what orders the rows (float64); tie: the tie-break (ids, or rows); row: global rows
    (int64); score: what selection.parquet reports for each row (float64).
    """

    key: np.ndarray
    tie: np.ndarray
    row: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def top(self, k: int) -> Ranked:
        order = np.lexsort((self.tie, -self.key))[:k]
        return Ranked(self.key[order], self.tie[order], self.row[order], self.score[order])

    @staticmethod
    def merge(parts: list[Ranked], k: int) -> Ranked:
        parts = [p for p in parts if len(p)] or parts[:1]
        joined = Ranked(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("key", "tie", "row", "score")))  # fmt: skip
        return joined.top(k)
