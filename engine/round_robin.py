"""Round-robin selection over the targets (RDS+'s selector, Ivison et al. 2025, Sec. 3).

Each target j ranks the candidates by similarity s_ij (best first, ties by row ascending). Then, in
turns -- target 0, 1, ..., M-1, and again -- each target takes its best candidate not taken yet,
until B rows are taken. Every target gets an equal share, so no single target's neighbourhood
fills the budget (the paper: 50.9 vs 47.9 for mean-then-top-k on its multi-task setting).

Only each target's first L candidates are needed: the lists are computed per part of the pool
(`target_lists`, any split of the rows) and merged exactly (`merge_lists`), O(M x L) however large
the pool. The round robin on truncated lists equals the one on full lists as long as no list runs
out before the budget is filled; when one does (`select` returns None), the caller fetches longer
lists (2L) and runs it again, so it never stops short of B.

What differs from the reference (`minimal_multitask/get_top_influences.py`, selection "max"): the
reference pops each target's next candidate whether or not it was taken (a turn on a duplicate adds
nothing), finishes the last round past B and truncates a set-ordered list (which rows are dropped
is arbitrary); here a turn always adds a row and the selection stops at exactly B, in turn order.

References:
    Ivison et al. Large-Scale Data Selection for Instruction Tuning. arXiv 2503.01807, 2025.
"""

from __future__ import annotations

import numpy as np

from raysift.engine.selection import Selection

NONE = -1  # a list slot with no candidate (a part with fewer than L rows)


def target_lists(
    candidates: np.ndarray, targets: np.ndarray, rows: np.ndarray, L: int, block: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Each target's best L candidates among these: (rows (M, L) int64, similarities (M, L)
    float64), best first, ties by row ascending; NONE / -inf past the candidates there are.

    candidates (n, d) and targets (M, d) float32, unit norm (similarity = inner product);
    rows (n,) their global row numbers."""
    M = len(targets)
    best_rows = np.full((M, 0), NONE, np.int64)
    best_sims = np.full((M, 0), -np.inf)
    q = np.ascontiguousarray(targets, np.float32)
    for a in range(0, len(candidates), block):
        x = np.ascontiguousarray(candidates[a : a + block], np.float32)
        sims = (q @ x.T).astype(np.float64)
        block_rows = np.broadcast_to(np.asarray(rows[a : a + block], np.int64), sims.shape)
        best_rows, best_sims = _top(np.concatenate([best_rows, block_rows], axis=1),
                                    np.concatenate([best_sims, sims], axis=1), L)  # fmt: skip
    return _pad(best_rows, best_sims, L)


def _top(rows: np.ndarray, sims: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the (M, k) arrays, the L best by (-similarity, row)."""
    if rows.shape[1] > L:  # cut to a superset of the top L first (ties at the L-th kept)
        kth = -np.partition(-sims, L - 1, axis=1)[:, L - 1 : L]
        keep = sims >= kth
        width = int(keep.sum(axis=1).max())
        order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
        rows, sims = np.take_along_axis(rows, order, 1), np.take_along_axis(sims, order, 1)
        sims = np.where(np.take_along_axis(keep, order, 1), sims, -np.inf)
        rows = np.where(np.isfinite(sims), rows, NONE)
    tie = np.where(rows == NONE, np.iinfo(np.int64).max, rows)
    order = np.lexsort((tie, -sims), axis=1)[:, :L]
    return np.take_along_axis(rows, order, 1), np.take_along_axis(sims, order, 1)


def _pad(rows: np.ndarray, sims: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    short = L - rows.shape[1]
    if short > 0:
        rows = np.pad(rows, ((0, 0), (0, short)), constant_values=NONE)
        sims = np.pad(sims, ((0, 0), (0, short)), constant_values=-np.inf)
    return rows, sims


def merge_lists(parts: list[tuple], L: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-target best L of several parts' lists (each part's best L holds them)."""
    rows = np.concatenate([p[0] for p in parts], axis=1)
    sims = np.concatenate([p[1] for p in parts], axis=1)
    return _pad(*_top(rows, sims, L), L)


def first_length(budget: int, targets: int, n: int) -> int:
    """A list length that usually suffices: twice each target's share, at least 16."""
    return int(min(n, max(16, 2 * -(-budget // targets))))


def select(rows: np.ndarray, sims: np.ndarray, budget: int, n: int) -> Selection | None:
    """Round robin over the targets' lists (M, L), best first. None when a list ran out before B
    rows were taken while it held fewer than all n candidates: fetch longer lists and call again.
    The score of a chosen row is its similarity to the target whose turn took it."""
    M, L = rows.shape
    complete = L >= n  # the lists hold every candidate: one running out means it is done
    taken: set[int] = set()
    chosen: list[int] = []
    score: list[float] = []
    at = np.zeros(M, dtype=np.int64)
    while len(chosen) < budget:
        added = False
        for j in range(M):
            while at[j] < L and rows[j, at[j]] != NONE and int(rows[j, at[j]]) in taken:
                at[j] += 1
            if at[j] == L or rows[j, at[j]] == NONE:
                if not complete and at[j] == L:
                    return None
                continue  # this target has no candidate left
            row = int(rows[j, at[j]])
            taken.add(row)
            chosen.append(row)
            score.append(float(sims[j, at[j]]))
            added = True
            if len(chosen) == budget:
                break
        if not added:
            raise ValueError(f"round robin: only {len(chosen)} candidates for a budget of {budget}")
    return Selection(np.asarray(chosen, np.int64), np.asarray(score))
