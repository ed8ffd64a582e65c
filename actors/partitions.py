"""Per-part work as Ray tasks, and the merges that keep the driver small.

`map_parts(fn, pool, *args)` runs `fn(pool, part, *args)` as one task per part of the pool and
returns the tasks' refs; `merge_ranked` merges their best-first lists (`engine.selection.Ranked`)
in a tree of tasks, so the driver receives the final k rows only -- never parts x k. `fetch_rows`
reads given rows' columns in tasks on the parts that hold them. `gather` sums small per-part
results (counts) as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raysift.engine.selection import Ranked
from raysift.jobs.core.pool import Pool, read_part

FANIN = 16  # lists per merge task


def map_parts(fn: Callable, pool: Pool, *args, **options) -> list:
    """One task per part: `fn(pool, part, *args)`; returns the refs (the values stay on the
    workers until a merge or the driver asks for them)."""
    task = ray.remote(fn).options(**options) if options else ray.remote(fn)
    shared = [ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 1 << 16 else a for a in args]
    return [task.remote(pool, part, *shared) for part in pool.parts]


def _merge(k: int, *parts: Ranked) -> Ranked:
    return Ranked.merge(list(parts), k)


def merge_ranked(refs: list, k: int) -> Ranked:
    """The best k of every list, merged in a tree of tasks (FANIN lists per task)."""
    merge = ray.remote(_merge)
    while len(refs) > 1:
        refs = [merge.remote(k, *refs[i : i + FANIN]) for i in range(0, len(refs), FANIN)]
    return ray.get(refs[0])


def _take(pool: Pool, part, local: np.ndarray, columns: list[str]) -> pa.Table:
    return read_part(pool, part, columns).take(pa.array(local))


def _fold(fn: Callable, args: tuple, *parts):
    return fn(list(parts), *args)


def merge_tree(refs: list, fn: Callable, *args):
    """`fn(values, *args)` folded over the refs' values in a tree of tasks (FANIN per task): the
    driver receives the final value only. `fn` must merge its own outputs too (associative)."""
    task = ray.remote(_fold)
    while len(refs) > 1:
        refs = [task.remote(fn, args, *refs[i : i + FANIN]) for i in range(0, len(refs), FANIN)]
    return ray.get(refs[0])


def fetch_rows(pool: Pool, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """`columns` of the given global rows, in the given order, read by one task per part that
    holds any of them (the driver receives these rows only)."""
    rows = np.asarray(rows, np.int64)
    where = pool.where(rows)
    take = ray.remote(_take)
    refs, positions = [], []
    for k in np.unique(where):
        part = pool.parts[k]
        mine = np.flatnonzero(where == k)
        refs.append(take.remote(pool, part, rows[mine] - part.first, columns))
        positions.append(mine)
    if not refs:
        return pa.table({c: pa.array([]) for c in columns})
    table = pa.concat_tables(ray.get(refs), promote_options="permissive")
    order = np.argsort(np.concatenate(positions), kind="stable")
    return table.take(pa.array(order))


def gather(refs: list, add: Callable, start):
    """Fold small per-part results into one as they finish (`add(total, result)`)."""
    total = start
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=min(len(pending), 64))
        for value in ray.get(done):
            total = add(total, value)
    return total


def _value_counts(pool: Pool, part, column: str) -> dict:
    values = read_part(pool, part, [column]).column(column)
    counts = pc.value_counts(pc.cast(values, pa.string()).combine_chunks()).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def column_counts(pool: Pool, column: str) -> dict:
    """{value (as text): rows} of one column over the pool (None: rows without a value), summed
    from per-part tasks: the driver holds one count per distinct value."""

    def add(total: dict, counts: dict) -> dict:
        for k, n in counts.items():
            total[k] = total.get(k, 0) + n
        return total

    return gather(map_parts(_value_counts, pool, column), add, {})
