"""GOT-D (Kang et al., ICLR 2024): select the candidates whose extra mass would lower the entropic
OT distance to the targets the most.

With uniform candidate weights b_j = 1/N the gradient dOT/db_j is the candidate potential g_j up
to a constant (`engine.sinkhorn`). The reference calibrates it as cal_j = (1 + 1/N) g_j - mean(g)
(LAVA's form differs by the same kind of increasing affine map), so the ranking is the ranking of
g: ascending, most negative first. Budgets are nested prefixes of that one ranking; exact
duplicates get identical scores and are chosen together (GOT-D has no diversity term).
"""

from __future__ import annotations

import numpy as np

from raysift.engine.selection import Selection, check_budget


def calibrated(g: np.ndarray) -> np.ndarray:
    """The reference notebook's calibrated gradient (1 + 1/N) g - mean(g), float32 like g."""
    g = np.asarray(g, dtype=np.float32)
    return ((1 + 1 / len(g)) * g - g.mean()).astype(np.float32)


def merge_smallest(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact global k smallest g from every shard's local k smallest (value, global row) lists;
    ties by row, so the ranking does not depend on the shard layout."""
    g = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    order = np.lexsort((rows, g))[:k]
    return g[order], rows[order]


def select(g: np.ndarray, rows: np.ndarray, budget: int, n_candidates: int) -> Selection:
    """The first `budget` rows of the ascending-g ranking (g and rows already merged in order).
    score = -(1 + 1/N) g_j: the decrease of the OT distance per unit of extra mass, up to a
    constant shared by all candidates (higher = chosen earlier)."""
    check_budget(budget, n_candidates)
    g, rows = np.asarray(g)[:budget], np.asarray(rows)[:budget]
    return Selection(rows, -(1 + 1 / n_candidates) * g.astype(np.float64))
