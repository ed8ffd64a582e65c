"""The partitioned pool: what ingest writes, what every later stage reads, and how.

    data/<side>/_index.json                 the parts (name, first row, rows, content digest),
                                            the input files (path, size, mtime), the counts
    data/<side>/part-NNNNN-<digest>.parquet row (int64: dense 0..N-1 in input order, files in
                                            sorted order), id, text, the keep columns and, for
                                            bring-your-own vectors, `_vector`
    data/<side>/_ids/gen-K/bucket-HHH.parquet
                                            the ids of every row, hashed into buckets: how a later
                                            curate run finds duplicates without opening a part
    embeddings/<side>/_settings.json        the model (or `precomputed:<column>`) and settings
    embeddings/<side>/<digest>/rows-A-B.parquet
                                            id, vector (fixed_size_list<float32>) of rows [A, B)
                                            of the part with that content digest

The index is the commit point of an ingest: it is written last, and parts it does not name are
leftovers. Embeddings are keyed by the part's content digest (sha1 of its ids, texts and given
vectors), not by its name or first row, so a part re-ingested unchanged -- or a pool that grew by
new parts -- keeps every committed vector.

The driver reads only the index (O(parts)); `read_*` below run in tasks and actors, each on its
own part or row range, on whatever filesystem the run folder lives on (`jobs.storage.Store`).
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysift.jobs.core.errors import InputError
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.core.storage import Store

INDEX = "_index.json"
VECTOR = "_vector"  # a part's column of given vectors (candidates.vector_column)
LAYOUT = 2  # run-folder layout version written in every index
_CHUNK = re.compile(r"rows-(\d+)-(\d+)\.parquet$")


@dataclass(frozen=True)
class Part:
    name: str
    first: int  # global row of the part's first row
    rows: int
    digest: str  # content digest: what its embeddings are stored under

    @property
    def stop(self) -> int:
        return self.first + self.rows


@dataclass(frozen=True)
class Vectors:
    """Where a side's vectors for the selectors are: a representation's committed chunks
    `<root>/<part digest>/rows-A-B.parquet`, their `column` (a fixed-size list of floats), and
    per-block weights applied as they are read (`block_scale`: the vector cut into that many equal
    blocks, block i times block_scale[i]; LESS's sqrt(w_i) per checkpoint), or none."""

    root: str
    column: str = "vector"
    block_scale: tuple[float, ...] | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.block_scale is None:
            return x
        blocks = len(self.block_scale)
        scale = np.asarray(self.block_scale, np.float32)[None, :, None]
        return (x.reshape(len(x), blocks, -1) * scale).reshape(len(x), -1)


@dataclass(frozen=True)
class Pool:
    """One side of the ingested pool as tasks and actors see it (picklable, O(parts)). `vectors`
    says which representation the selectors read (None: the embed stage's, embeddings/<side>)."""

    store: Store  # the run folder that holds data/ and embeddings/
    side: str
    parts: tuple[Part, ...]
    columns: tuple[str, ...] = ()  # every column of a part, `row` first
    dim: int | None = None  # of the given vectors, when the input had them
    info: dict = field(default_factory=dict, compare=False, hash=False)
    vectors: Vectors | None = None

    @property
    def n(self) -> int:
        return self.parts[-1].stop if self.parts else 0

    def part_path(self, part: Part) -> str:
        return RunFolder.data(self.side, part.name)

    def chunk_dir(self, part: Part) -> str:
        if self.vectors is None:
            return RunFolder.embeddings(self.side, part.digest)
        return f"{self.vectors.root}/{part.digest}"

    def with_vectors(self, vectors: Vectors | None) -> Pool:
        """The same pool, its selectors reading `vectors`."""
        return dataclasses.replace(self, vectors=vectors)

    def only(self, parts: list[Part] | tuple[Part, ...]) -> Pool:
        """The same pool listing only these parts (what one task or shard needs)."""
        return dataclasses.replace(self, parts=tuple(parts), info={})

    def overlapping(self, a: int, b: int) -> list[Part]:
        """The parts holding any of rows [a, b)."""
        starts = [p.first for p in self.parts]
        i = max(0, bisect.bisect_right(starts, a) - 1)
        out = []
        for part in self.parts[i:]:
            if part.first >= b:
                break
            if part.stop > a:
                out.append(part)
        return out

    def restrict(self, a: int, b: int) -> Pool:
        """The same pool, listing only the parts that hold rows [a, b) (what one shard needs)."""
        return self.only(self.overlapping(a, b))

    def where(self, rows: np.ndarray) -> np.ndarray:
        """The index of the part holding each global row."""
        starts = np.array([p.first for p in self.parts], np.int64)
        return np.searchsorted(starts, np.asarray(rows, np.int64), side="right") - 1


def load_pool(store: Store, side: str) -> Pool:
    """The pool index of one side (a small file); an InputError when there is none."""
    rel = RunFolder.data(side, INDEX)
    if not store.is_file(rel):
        if store.is_file(f"data/{side}.parquet"):
            raise InputError(
                f"output_dir: {store.uri} was written by an earlier raysift (one "
                f"data/{side}.parquet, embeddings keyed by id); this release keeps partitioned "
                "data/<side>/ folders: delete data/ and embeddings/ there (curate/ history is "
                "kept) or use a new output_dir, then run again"
            )
        raise InputError(
            f"{store.uri_of(f'data/{side}')}: no ingested data; run the ingest stage first"
        )
    index = store.read_json(rel)
    parts = tuple(Part(**p) for p in index["parts"])
    return Pool(store, side, parts, tuple(index["columns"]), index.get("dim"), index)


def row_columns(pool: Pool) -> list[str]:
    """The columns that make a row what a causal LM reads (`engine.render.row_of`): its text, and
    its messages when the side was ingested as chat or prompt/response rows."""
    return ["text", "messages"] if "messages" in pool.columns else ["text"]


def rows_of(table: pa.Table) -> list:
    """A table of `row_columns` -> each row as `engine.render.render` takes it (a conversation
    or a text)."""
    from raysift.engine.render import row_of

    return [row_of(r) for r in table.to_pylist()]


def plan_chunks(pool: Pool, rows: int, **extra) -> list[dict]:
    """Every part cut into chunks of `rows` rows: {"pool", "part", "a", "b", **extra}, local rows
    [a, b) of the part (the unit of a cached feature file: DSIR's, LESS's)."""
    return [
        {"pool": pool, "part": part, "a": a, "b": min(a + rows, part.rows), **extra}
        for part in pool.parts
        for a in range(0, part.rows, rows)
    ]


def chunk_file(root: str, item: dict) -> str:
    """A chunk's feature file under `root`: <root>/<part digest>/rows-A-B.parquet."""
    return f"{root}/{item['part'].digest}/rows-{item['a']:09d}-{item['b']:09d}.parquet"


def missing_chunks(items: list[dict], roots: dict[str, str]) -> list[dict]:
    """The chunks (`plan_chunks` items, either side) whose file is not committed under their
    side's root, from one recursive listing per root (no request per chunk: at 100M rows that
    would be hundreds of thousands of object-store calls)."""
    import pyarrow.fs as pafs

    done: set[str] = set()
    for root, store in {roots[i["pool"].side]: i["pool"].store for i in items}.items():
        base = store.path(root)
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        files = [i for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        done |= {f"{root}/{i.path[len(base) + 1 :]}" for i in files}
    return [i for i in items if chunk_file(roots[i["pool"].side], i) not in done]


def drop_stale_parts(pool: Pool, root: str) -> None:
    """Delete cached per-part folders under `root` of parts no longer in the pool (a
    re-ingested, changed input)."""
    for digest in set(pool.store.folders(root)) - {str(p.digest) for p in pool.parts}:
        pool.store.delete(f"{root}/{digest}")


# -- worker-side readers ---------------------------------------------------------------------------


def read_part(pool: Pool, part: Part, columns: list[str] | None = None) -> pa.Table:
    """Columns of one part (every column when None)."""
    import pyarrow.parquet as pq

    return pq.read_table(
        pool.store.path(pool.part_path(part)), columns=columns, filesystem=pool.store.fs
    )


def read_part_rows(store: Store, path: str, a: int, b: int, columns: list[str]) -> pa.Table:
    """Columns of local rows [a, b) of one part file, reading only the row groups they are in."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(store.fs.open_input_file(store.path(path)))
    meta, groups, at, first = pf.metadata, [], 0, None
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if at < b and at + n > a:
            groups.append(g)
            first = at if first is None else first
        at += n
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(a - (first or 0), b - a)


def read_rows(pool: Pool, a: int, b: int, columns: list[str]) -> pa.Table:
    """Columns of global rows [a, b), across parts, in row order."""
    tables = []
    for part in pool.overlapping(a, b):
        lo, hi = max(a, part.first) - part.first, min(b, part.stop) - part.first
        tables.append(read_part_rows(pool.store, pool.part_path(part), lo, hi, columns))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def take_rows(pool: Pool, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Columns of the given global rows (any order; returned in that order), reading only the
    parts that hold them."""
    rows = np.asarray(rows, np.int64)
    out = []
    order = np.argsort(rows, kind="stable")
    where = pool.where(rows[order])
    for k in np.unique(where):
        part = pool.parts[k]
        local = rows[order][where == k] - part.first
        out.append(read_part(pool, part, columns).take(pa.array(local)))
    table = pa.concat_tables(out)
    return table.take(pa.array(np.argsort(order, kind="stable")))


def chunks(pool: Pool, part: Part, listing: list[str] | None = None) -> list[tuple[int, int]]:
    """The committed embedding chunks [a, b) of a part (from its folder's file names)."""
    names = pool.store.list(pool.chunk_dir(part)) if listing is None else listing
    found = [_CHUNK.match(n) for n in names]
    return sorted((int(m[1]), int(m[2])) for m in found if m)


def chunk_name(a: int, b: int) -> str:
    return f"rows-{a:09d}-{b:09d}.parquet"


def uncovered(rows: int, done: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Ranges of [0, rows) no committed chunk covers, cut into chunks of at most `size` rows."""
    todo, at = [], 0
    for a, b in sorted(done) + [(rows, rows)]:
        while at < a:
            todo.append((at, min(a, at + size)))
            at = todo[-1][1]
        at = max(at, b)
    return todo


def read_vectors(pool: Pool, part: Part, a: int = 0, b: int | None = None) -> np.ndarray:
    """The committed vectors of local rows [a, b) of a part, float32 (n, d)."""
    import pyarrow.parquet as pq

    b = part.rows if b is None else b
    out, at = [], a
    for lo, hi in chunks(pool, part):
        if hi <= at or lo >= b:
            continue
        if lo > at:
            break
        path = pool.store.path(f"{pool.chunk_dir(part)}/{chunk_name(lo, hi)}")
        column = pool.vectors.column if pool.vectors else "vector"
        col = pq.read_table(path, columns=[column], filesystem=pool.store.fs)[column]
        x = matrix(col)[at - lo : min(b, hi) - lo]
        out.append(pool.vectors.apply(x) if pool.vectors else x)
        at = min(b, hi)
    if at < b:
        raise InputError(
            f"{pool.store.uri_of(pool.chunk_dir(part))}: rows {at}..{b} of "
            f"{pool.side} part {part.name} have no committed vector; run the embed stage"
        )
    return np.concatenate(out) if len(out) > 1 else out[0]


def read_vector_range(pool: Pool, a: int, b: int) -> np.ndarray:
    """The vectors of global rows [a, b), float32 (b - a, d)."""
    parts = pool.overlapping(a, b)
    out = [
        read_vectors(pool, p, max(a, p.first) - p.first, min(b, p.stop) - p.first) for p in parts
    ]
    return np.concatenate(out) if len(out) > 1 else out[0]


def matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list<float32> column as a float32 (n, d) array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 -> a fixed-size-list<float32>[d] column, zero-copy."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def as_strings(column) -> np.ndarray:
    return np.asarray(pc.cast(column, pa.string()).to_numpy(zero_copy_only=False), dtype=str)
