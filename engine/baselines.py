"""Baselines every method is compared against: seeded random, and nearest neighbours.

random: each candidate gets u_i = H(seed, id_i) uniform in [0, 1); the budget B rows with the
    smallest u are chosen. Because u depends only on (seed, id), the selection is the same whatever
    the row order, shard count or worker count, and a grown pool keeps every row that still ranks in
    the first B. Inclusion probability B / N.
knn, `max`: score_i = max_j <x_i, q_j>, the cosine similarity of candidate i to its nearest target
    (embeddings are unit-norm); top B.
knn, `centroid`: score_i = <x_i, c / |c|> with c the mean target embedding; top B.
knn, `subtask_mean_max` (LESS's aggregation): score_i = max over subtasks s of the mean over the
    targets j of s of <x_i, q_j>; with one subtask, the mean similarity to the targets; top B.
knn, `round_robin` (RDS+'s): each target in turn takes its most similar candidate not taken yet
    (`engine.round_robin`).
"""

from __future__ import annotations

import faiss
import numpy as np

from raysift.engine.ids import hash_uniform
from raysift.engine.selection import Selection, check_budget, top_k

KNN_MODES = ("max", "centroid", "subtask_mean_max", "round_robin")


def random_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """u_i = H(seed, id_i) in [0, 1), float64: the smallest are chosen."""
    return np.asarray(hash_uniform(ids, seed), dtype=np.float64)


def random_select(ids: np.ndarray, budget: int, seed: int) -> Selection:
    check_budget(budget, len(ids))
    u = random_keys(ids, seed)
    chosen = top_k(-u, budget, ids)
    return Selection(chosen, 1.0 - u[chosen], probability=np.full(budget, budget / len(ids)))


def max_similarity(candidates: np.ndarray, targets: np.ndarray, block: int = 65536) -> np.ndarray:
    """max_j <x_i, q_j> for every candidate, exact (FAISS flat inner-product index over targets)."""
    index = faiss.IndexFlatIP(targets.shape[1])
    index.add(np.ascontiguousarray(targets, dtype=np.float32))
    out = np.empty(len(candidates), dtype=np.float32)
    for start in range(0, len(candidates), block):
        chunk = np.ascontiguousarray(candidates[start : start + block], dtype=np.float32)
        sims, _ = index.search(chunk, 1)
        out[start : start + block] = sims[:, 0]
    return out


def knn_select(
    candidates: np.ndarray, targets: np.ndarray, ids: np.ndarray, budget: int, mode: str = "max"
) -> Selection:
    check_budget(budget, len(candidates))
    if len(targets) == 0:
        raise ValueError("knn needs at least one target embedding")
    if candidates.shape[1] != targets.shape[1]:
        raise ValueError(
            f"candidate dimension {candidates.shape[1]} != target dimension {targets.shape[1]}"
        )
    score = knn_scores(candidates, targets, mode)
    chosen = top_k(score.astype(np.float64), budget, ids)
    return Selection(chosen, score[chosen])


def knn_scores(
    candidates: np.ndarray, targets: np.ndarray, mode: str = "max", groups: np.ndarray | None = None
) -> np.ndarray:
    """Each candidate's knn score, float32: its cosine to the nearest target (`max`), to the
    targets' mean direction (`centroid`), or the best subtask's mean cosine (`subtask_mean_max`,
    `groups`: each target's subtask code; None: one subtask). Row by row: any split of the pool
    gives the same. (`round_robin` has no per-row score: `engine.round_robin`.)"""
    if mode == "max":
        return max_similarity(candidates, targets)
    if mode == "centroid":
        c = targets.astype(np.float64).mean(axis=0)
        return (candidates @ (c / np.linalg.norm(c)).astype(np.float32)).astype(np.float32)
    if mode == "subtask_mean_max":
        sims = np.ascontiguousarray(candidates, np.float32) @ np.ascontiguousarray(
            targets, np.float32).T  # fmt: skip
        codes = np.zeros(len(targets), np.int64) if groups is None else np.asarray(groups)
        per = [sims[:, codes == g].astype(np.float64).mean(axis=1) for g in np.unique(codes)]
        return np.max(per, axis=0).astype(np.float32)
    raise ValueError(f"knn mode must be one of {KNN_MODES[:3]}, got {mode!r}")
