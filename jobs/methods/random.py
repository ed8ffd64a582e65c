"""random: the baseline every method is compared against (`engine.baselines.random_keys`).

Each row's key u = H(seed, id) is uniform in [0, 1); the B rows of smallest u are chosen, found by
one task per part (its B smallest) merged in a tree of tasks: the same rows for any split of the
pool, and a grown pool keeps every row that still ranks in the first B."""

from __future__ import annotations

import numpy as np

from raysift.actors.partitions import map_parts, merge_ranked
from raysift.engine.baselines import random_keys
from raysift.engine.selection import Ranked, Selection
from raysift.jobs.core.pool import Part, Pool, as_strings, read_part
from raysift.jobs.methods.base import Context, InMemory, Method


def part_ids(pool: Pool, part: Part) -> np.ndarray:
    return as_strings(read_part(pool, part, ["id"]).column("id"))


def random_part(pool: Pool, part: Part, seed: int, k: int) -> Ranked:
    """A part's k rows of smallest u = H(seed, id) (score 1 - u)."""
    ids = part_ids(pool, part)
    u = random_keys(ids, seed)
    return Ranked(-u, ids, part.first + np.arange(len(ids)), 1.0 - u).top(k)


def select(ctx: Context) -> Selection:
    best = merge_ranked(map_parts(random_part, ctx.pool, ctx.seed, ctx.budget), ctx.budget)
    return Selection(best.row, best.score, probability=np.full(ctx.budget, ctx.budget / ctx.pool.n))


def local(a: InMemory) -> Selection:
    u = random_keys(a.ids, a.seed)
    best = Ranked(-u, a.ids, np.arange(len(a.ids)), 1.0 - u).top(a.budget)
    return Selection(best.row, best.score, probability=np.full(a.budget, a.budget / len(a.ids)))


METHOD = Method(
    name="random",
    summary="seeded hash rank, uniform over the pool",
    select=select,
    local=local,
    score="1 - u, u = H(seed, id) uniform (a seeded random rank)",
)
