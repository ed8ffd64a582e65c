"""Turning a selection distribution p into a selection of `budget` rows, seeded.

* `multinomial` — `budget` draws with replacement (the TSDS reference's `np.random.multinomial`,
  but seeded); rows drawn at least once, ranked by count, then p, then id; `count` kept.
* `without_replacement` — successive weighted sampling without replacement (Efraimidis-Spirakis:
  key_i = log(u_i) / p_i, the `budget` largest keys), with u_i = H(seed, id_i): the same ids are
  chosen whatever the row order, shard count or worker count.
* `top` — the `budget` rows of highest p, deterministic.

`p` may be the distribution on its support only (TSDS's p is zero off the neighbour lists): the
draws are the same as over the whole pool -- rows of p = 0 are never drawn, and numpy's
multinomial skips a zero category without drawing -- so the driver never needs an array of N.
Sampling without replacement, and `top`, need budget <= the support.

The multinomial draw runs over the rows sorted by id, so it too does not depend on row order.
"""

from __future__ import annotations

import numpy as np

from raysift.engine.ids import hash_uniform
from raysift.engine.selection import Selection, check_budget, top_k

SAMPLERS = ("multinomial", "without_replacement", "top")


def sample(
    p: np.ndarray,
    ids: np.ndarray,
    budget: int,
    how: str,
    seed: int,
    n_candidates: int | None = None,
) -> Selection:
    """`budget` rows from p over `ids` (p may be given on its support only: then
    `n_candidates` is the pool's size, which the budget must not exceed)."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) != len(ids):
        raise ValueError(f"p has {len(p)} rows, ids has {len(ids)}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("p must be finite, >= 0, and not all zero")
    check_budget(budget, n_candidates or len(p))
    p = p / p.sum()
    support = int(np.count_nonzero(p))
    if how in ("top", "without_replacement") and budget > support:
        raise ValueError(
            f"select.budget={budget} is larger than the {support} candidates with p > 0 "
            f"(sampling {how})"
        )
    if how == "top":
        chosen = top_k(p, budget, ids)
        return Selection(chosen, p[chosen], probability=p[chosen])
    if how == "without_replacement":
        u = np.asarray(hash_uniform(ids, seed), dtype=np.float64)
        with np.errstate(divide="ignore"):
            key = np.where(p > 0, np.log(np.maximum(u, 1e-300)) / p, -np.inf)
        chosen = top_k(key, budget, ids)
        return Selection(chosen, p[chosen], probability=p[chosen])
    if how == "multinomial":
        by_id = np.argsort(ids, kind="stable")
        counts = np.zeros(len(p), dtype=np.int64)
        counts[by_id] = np.random.default_rng(seed).multinomial(budget, p[by_id])
        drawn = np.flatnonzero(counts)
        order = np.lexsort((ids[drawn], -p[drawn], -counts[drawn]))
        chosen = drawn[order]
        return Selection(chosen, p[chosen], probability=p[chosen], count=counts[chosen])
    raise ValueError(f"sampling must be one of {SAMPLERS}, got {how!r}")
