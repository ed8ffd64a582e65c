"""A seeded synthetic pool with its vectors given: what the golden selections were computed on.

20,000 candidates and 64 targets, 32-d unit vectors in 40 clusters (10% near-duplicates, the
shape of ../shared/tools/tsds_synth.py at a size tests can afford), unique texts, a `source` (6
values) and a `label` (10 values) per row. Pure numpy: the same arrays on every machine with
numpy >= 1.26 (vectors are computed in float64 and rounded once to float32).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

N, M, D = 20_000, 64, 32


def synth_pool(n: int = N, m: int = M, d: int = D, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(candidates, targets): tables with text, source, label and a float32 `vector` column."""
    rng = np.random.default_rng(seed)
    k = 40
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.2, k)
    lab = rng.choice(k, size=n, p=rng.dirichlet(np.ones(k) * 2.0))
    x = centers[lab] + spread[lab, None] * rng.standard_normal((n, d)) / np.sqrt(d)
    dup = n // 10
    src = rng.integers(0, n - dup, dup)
    x[n - dup :] = x[src] + 0.05 * rng.standard_normal((dup, d)) / np.sqrt(d)
    lab[n - dup :] = lab[src]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    task = rng.choice(k, size=3, replace=False)
    ql = rng.choice(task, size=m)
    q = centers[ql] + spread[ql, None] * rng.standard_normal((m, d)) / np.sqrt(d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    def table(vectors: np.ndarray, clusters: np.ndarray, prefix: str) -> pa.Table:
        v = vectors.astype(np.float32)
        return pa.table(
            {
                "text": [f"{prefix} {i}: a text of cluster {c}" for i, c in enumerate(clusters)],
                "source": [f"src{c % 6}" for c in clusters],
                "label": [f"lab{c % 10}" for c in clusters],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), d),
            }
        )

    return table(x, lab, "candidate"), table(q, ql, "target")
