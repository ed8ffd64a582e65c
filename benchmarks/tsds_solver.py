"""TSDS solver alone: the vectorised `engine.tsds.solve` against a heap loop over events.

The heap loop follows the event procedure that ../shared/specs/tsds.md describes for the reference
(pop the smallest (c_j(k), k, j), update the query's cost and the running total, stop at the first
event meeting the condition), with numpy scalars as the reference uses them. Both run in this
process on the same inputs, and p is compared.

Inputs: the synth100k fixture's kNN lists (500 queries x 5000, when ../shared is present) and a
synthetic 2000 x 5000 instance (sorted random distances, densities >= 1, N = 100k) at alpha 0.5
(the stop comes after 7% of the events, like the fixture's 6%) and at alpha 0.02 (49%).

    python benchmarks/tsds_solver.py
"""

from __future__ import annotations

import heapq
import os
import time
from pathlib import Path

import numpy as np

from raysift.engine.tsds import solve

SYNTH = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "tsds" / "synth100k.npz"
)


def heap_loop(d, idx, rho, alpha, C, n):
    """The event loop with numpy 1's scalar rules made explicit (numpy 2 would keep float32 where
    numpy 1 promoted to float64): counts, costs and p in float64, the d/rho sum in float32."""
    M, L = d.shape
    last = [0] * M
    heap = [(1.0 / float(rho[j][0]), 0, j) for j in range(M)]
    heapq.heapify(heap)
    wsum = [d[j][0] / rho[j][0] for j in range(M)]  # float32 / float32 -> float32
    cost = [0.0] * M
    total, s = 0.0, 0.0
    while heap:
        count, k, j = heapq.heappop(heap)
        s = count
        total -= cost[j]
        cost[j] = float(d[j][k + 1]) * count - float(wsum[j])
        total += cost[j]
        if alpha / C * total >= (1 - alpha) * M:
            break
        last[j] = k
        if k < L - 2:
            heapq.heappush(heap, (count + 1.0 / float(rho[j][k + 1]), k + 1, j))
            wsum[j] += d[j][k + 1] / rho[j][k + 1]
    p = np.zeros(n)
    for j in range(M):
        total_j = 0.0
        for k in range(last[j] + 1):
            share = 1 / M / s / float(rho[j][k])
            p[idx[j][k]] += share
            total_j += share
        p[idx[j][last[j] + 1]] += max(1.0 / M - total_j, 0)
    return p


def synthetic(M=2000, L=5000, N=100_000, seed=0):
    rng = np.random.default_rng(seed)
    d = np.sort(rng.uniform(0.3, 1.2, (M, L)).astype(np.float32), axis=1)
    idx = np.stack([rng.choice(N, L, replace=False) for _ in range(M)])
    rho = (1 + rng.exponential(2.0, (M, L))).astype(np.float32)
    return d, idx, rho, 0.5, 5.0, N


def main() -> None:
    cases = []
    if SYNTH.is_file():
        z = np.load(SYNTH, allow_pickle=False)
        cases.append(
            (
                "synth100k fixture, 500 x 5000",
                z["knn_dist"],
                z["knn_idx"],
                z["rho"],
                float(z["alpha"]),
                float(z["C"]),
                int(z["n_candidates"]),
            )
        )
    d, idx, rho, alpha, C, n = synthetic()
    cases.append(("synthetic 2000 x 5000, alpha 0.5 (7% of events)", d, idx, rho, alpha, C, n))
    cases.append(("synthetic 2000 x 5000, alpha 0.02 (49% of events)", d, idx, rho, 0.02, C, n))
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores\n")
    print("| input | heap loop s | compat s | exact s | heap / compat | max abs dp compat, exact |")
    print("|---|---|---|---|---|---|")
    for name, d, idx, rho, alpha, C, n in cases:
        t0 = time.process_time()
        p_heap = heap_loop(d, idx, rho, alpha, C, n)
        t_heap = time.process_time() - t0
        times, dps = [], []
        for mode in ("compat", "exact"):
            t0 = time.process_time()
            sol = solve(d, idx, rho, alpha=alpha, C=C, n_candidates=n, mode=mode)
            times.append(time.process_time() - t0)
            dps.append(np.abs(sol.dense() - p_heap).max())
        print(
            f"| {name} | {t_heap:.1f} | {times[0]:.2f} | {times[1]:.2f} | "
            f"{t_heap / times[0]:.1f}x | {dps[0]:.1e}, {dps[1]:.1e} |"
        )


if __name__ == "__main__":
    main()
