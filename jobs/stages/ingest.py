"""Ingest: read candidates or targets into the run folder's partitioned pool (`jobs.pool`).

The driver plans from metadata only -- the input files (listed on whatever filesystem holds them:
a local path, `s3://`, `gs://`), their parquet footers, their sizes -- and never reads a row:

    plan      each input file is cut into pieces: parquet row groups, JSON-lines byte ranges (a
              line belongs to the piece its first byte is in), one piece per CSV or `datasets`
              arrow file; pieces are in input order (files sorted by name)
    read      a task per piece reads and normalises its rows (id, text, keep columns, given
              vectors) and stages them in the run folder (`data/<side>/.staging/`); bad rows fail
              there, naming the file and line or row
    dedup     its ids go, hashed into buckets, through the object store to one task per bucket,
              which keeps the first occurrence of every id -- the lowest (piece, position), i.e.
              the first in input order -- and reports the rest back per piece (a shuffle by id;
              with `id_column`, a repeat is an error instead)
    write     a task per piece reads its staged rows, drops its duplicates, numbers its rows
              (`row`, dense from the offset the driver computed from the pieces' counts) and
              writes its part; the staging folder is removed
    commit    the driver writes `data/<side>/_index.json` (the parts, the files, the counts)

Policy for bad rows (README, "Input policy"):

* null or blank text: dropped and counted (`on_empty: error` fails instead);
* ids derived from text: identical texts share an id; the first is kept, the rest counted as
  `duplicates_dropped`;
* ids from `id_column`: a null/blank or repeated id is an error naming the column and an example;
* a missing column, an unknown format, an unreadable or empty file: an error before any work.

Appending (`append=True`, what `raysift curate` does): when every file of the last ingest is
still there unchanged, only the new files are read; their rows are numbered after the existing
ones (whatever their names sort as), and an id already in the pool is a duplicate of that row.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysift.engine.ids import content_ids
from raysift.engine.render import RenderError, check_messages, pair, plain
from raysift.jobs.config import Config, IngestConfig, InputSpec
from raysift.jobs.core import storage
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import INDEX, LAYOUT, VECTOR, Part, Pool, load_pool
from raysift.jobs.core.runfolder import Manifest, RunFolder
from raysift.jobs.core.storage import Store
from raysift.jobs.stages.base import Reuse, Stage, StageRun
from raysift.jobs.vectors import SIDES

SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
BATCH_ROWS = 65_536
LINE = "_line"  # a JSON-lines row's line number (for messages)


@dataclass(frozen=True)
class InputFile:
    path: str  # inside the filesystem
    uri: str  # as messages and fingerprints name it
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Source:
    """An input, resolved: its format, filesystem and files (sorted)."""

    fmt: str
    fs: pafs.FileSystem
    files: tuple[InputFile, ...]


@dataclass(frozen=True)
class Piece:
    file: int  # index into Source.files
    start: int  # parquet: first row group; jsonl: first byte; else 0
    stop: int  # parquet: row group after the last; jsonl: byte after the range; else 0
    rows: int | None = None  # known for parquet
    first_row: int = 0  # parquet: the file's row number of the piece's first row


# -- listing and checks (driver, metadata only) ----------------------------------------------------


def _info(fs: pafs.FileSystem, path: str, uri: str) -> InputFile:
    info = fs.get_file_info(path)
    return InputFile(path, uri, int(info.size or 0), int(info.mtime_ns or 0))


def resolve(spec: InputSpec, field: str) -> Source:
    """The input's format and files, or an InputError naming `field`."""
    uri = spec.path
    if storage.is_remote(uri):
        fs, root = storage.filesystem(uri, f"{field}.path")
    else:
        fs, root = pafs.LocalFileSystem(), uri.removeprefix("file://")
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise InputError(f"{field}.path: cannot read {uri} ({str(exc).splitlines()[0]})") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{field}.path: {uri} does not exist")
    fmt: str | None = spec.format
    join = (lambda name: f"{uri.rstrip('/')}/{name}") if storage.is_remote(uri) else None
    if info.type == pafs.FileType.Directory:
        listing = fs.get_file_info(pafs.FileSelector(root))
        names = {i.base_name: i for i in listing if i.type == pafs.FileType.File}
        if fmt in ("auto", "hf") and "dataset_info.json" in names:
            return Source("hf", fs, tuple(_hf_files(fs, root, uri, names, join)))
        if fmt == "hf":
            raise InputError(f"{field}.path: {uri} is not a datasets save_to_disk folder")
        files = sorted(
            (i for n, i in names.items() if not n.startswith((".", "_"))),
            key=lambda i: i.base_name,
        )
        files = [
            i
            for i in files
            if _suffix(i.base_name) in SUFFIXES
            and (fmt == "auto" or SUFFIXES[_suffix(i.base_name)] == fmt)
        ]
        if not files:
            raise InputError(f"{field}.path: folder {uri} holds no .parquet/.jsonl/.csv files")
        kinds = {SUFFIXES[_suffix(i.base_name)] for i in files}
        if len(kinds) > 1:
            raise InputError(
                f"{field}.path: folder {uri} mixes formats {sorted(kinds)}; set {field}.format"
            )
        out = tuple(
            InputFile(
                i.path,
                join(i.base_name) if join else i.path,
                int(i.size or 0),
                int(i.mtime_ns or 0),
            )
            for i in files
        )
        return Source(kinds.pop(), fs, out)
    if fmt == "auto":
        fmt = SUFFIXES.get(_suffix(root))
        if fmt is None:
            raise InputError(
                f"{field}.path: cannot tell the format of {root.rsplit('/', 1)[-1]}; expected "
                f".parquet, .jsonl, .json or .csv, or set {field}.format"
            )
    if fmt == "hf":
        raise InputError(f"{field}.path: {uri} is a file; format hf expects a save_to_disk folder")
    assert fmt is not None
    return Source(fmt, fs, (_info(fs, root, uri),))


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot >= 0 else ""


def _hf_files(fs, root: str, uri: str, names: dict, join) -> list[InputFile]:
    """The arrow files of a `datasets` save_to_disk folder, in its own order (state.json)."""
    try:
        with fs.open_input_stream(f"{root}/state.json") as fh:
            state = json.loads(fh.read())
        data = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError):
        data = sorted(n for n in names if n.endswith(".arrow"))
    if not data:
        raise InputError(f"{uri}: a datasets folder without arrow files")
    return [
        InputFile(
            f"{root}/{n}",
            join(n) if join else f"{root}/{n}",
            int(names[n].size or 0) if n in names else 0,
            int(names[n].mtime_ns or 0) if n in names else 0,
        )
        for n in data
    ]


def _schema(source: Source, file: InputFile) -> pa.Schema | list[str]:
    """Column names (and types where the format has them) of one input file, read cheaply."""
    fs, fmt = source.fs, source.fmt
    try:
        if fmt == "parquet":
            return pq.read_schema(fs.open_input_file(file.path))
        if fmt == "hf":
            with fs.open_input_stream(file.path) as fh:
                return pa.ipc.open_stream(fh).schema
        if fmt == "csv":
            with fs.open_input_stream(file.path) as raw:
                first = raw.read(1 << 16).decode("utf-8", errors="ignore").splitlines()[:1]
            return next(csv.reader(first), []) if first else []
        return list(_first_record(source, file))
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"{file.uri}: not a readable {fmt} file ({reason})") from None


def _first_record(source: Source, file: InputFile) -> dict:
    """The first JSON object of a JSON-lines file ({} when it has none), read line by line."""
    with source.fs.open_input_stream(file.path) as raw:
        buffered = io.BufferedReader(raw, 1 << 16)
        for line in buffered:
            if line.strip():
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("first record is not a JSON object")
                return record
    return {}


def check_input(spec: InputSpec, field: str) -> Source:
    """Validate an input before any cluster work: format, readability, required columns."""
    source = resolve(spec, field)
    if spec.messages_column:
        wanted = [(f"{field}.messages_column", spec.messages_column)]
    elif spec.response_column:
        wanted = [(f"{field}.prompt_columns", c) for c in spec.prompt_columns]
        wanted.append((f"{field}.response_column", spec.response_column))
    else:
        wanted = [(f"{field}.text_column", spec.text_column)]
    if spec.id_column:
        wanted.append((f"{field}.id_column", spec.id_column))
    if spec.vector_column:
        wanted.append((f"{field}.vector_column", spec.vector_column))
    for col in spec.keep_columns:
        wanted.append((f"{field}.keep_columns", col))
    for file in source.files:
        schema = _schema(source, file)
        names = schema.names if isinstance(schema, pa.Schema) else schema
        if not names:
            raise InputError(f"{file.uri}: no rows or header found")
        for key, col in wanted:
            if col not in names:
                raise InputError(
                    f"{file.uri}: column {col!r} ({key}) not found; columns are {names[:20]}"
                )
        if spec.vector_column and isinstance(schema, pa.Schema):
            _check_vector_type(schema.field(spec.vector_column).type, file, spec, field)
    return source


def text_field(spec: InputSpec) -> tuple[str, str]:
    """(the config key, the column) a side's row texts come from."""
    if spec.messages_column:
        return "messages_column", spec.messages_column
    if spec.response_column:
        return "response_column", spec.response_column
    return "text_column", spec.text_column


def file_columns(source: Source) -> list[str]:
    """The first input file's column names (its schema or header)."""
    schema = _schema(source, source.files[0])
    return list(schema.names if isinstance(schema, pa.Schema) else schema)


def fingerprint(source: Source) -> list[list]:
    """What a rerun compares to decide whether the input changed: path, size, mtime of each file."""
    return [[f.uri, f.size, f.mtime_ns] for f in source.files]


def _is_vector_type(kind: pa.DataType) -> bool:
    listy = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (listy or pa.types.is_fixed_size_list(kind)):
        return False
    return pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)


def _check_vector_type(kind: pa.DataType, file: InputFile, spec: InputSpec, field: str) -> None:
    if not _is_vector_type(kind):
        raise InputError(
            f"{file.uri}: column {spec.vector_column!r} ({field}.vector_column): expected a list "
            f"of floats, got {kind}"
        )


def _keep_types(source: Source, spec: InputSpec) -> dict[str, pa.DataType]:
    """The type of every keep column, from the first file (later pieces are cast to it)."""
    if not spec.keep_columns:
        return {}
    if source.fmt == "csv":
        return {c: pa.string() for c in spec.keep_columns}
    first = source.files[0]
    if source.fmt in ("parquet", "hf"):
        schema = _schema(source, first)
        assert isinstance(schema, pa.Schema)  # parquet and hf files have typed schemas
        kinds = {c: schema.field(c).type for c in spec.keep_columns}
    else:  # JSON lines: the first record's values (no rows are read on the driver)
        record = _first_record(source, first)
        kinds = {c: pa.array([record.get(c)]).type for c in spec.keep_columns}
    return {c: pa.string() if pa.types.is_null(t) else t for c, t in kinds.items()}


# -- planning --------------------------------------------------------------------------------------


def plan(source: Source, cfg: IngestConfig, limit: int | None) -> list[Piece]:
    """Pieces in input order, from metadata: parquet footers, file sizes."""
    target = int(cfg.part_mb * (1 << 20))
    pieces: list[Piece] = []
    budget = limit
    for k, file in enumerate(source.files):
        if budget is not None and budget <= 0:
            break
        if source.fmt == "parquet":
            meta = pq.ParquetFile(source.fs.open_input_file(file.path)).metadata
            start, size, rows, at = 0, 0, 0, 0
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                size += group.total_byte_size
                rows += group.num_rows
                full = budget is not None and rows >= budget
                if size >= target or g == meta.num_row_groups - 1 or full:
                    pieces.append(Piece(k, start, g + 1, rows, at))
                    at += rows
                    if budget is not None:
                        budget -= rows
                    start, size, rows = g + 1, 0, 0
                    if full:
                        break
        elif source.fmt == "jsonl":
            for a in range(0, max(file.size, 1), target):
                pieces.append(Piece(k, a, min(file.size, a + target)))
        else:
            pieces.append(Piece(k, 0, 0))
    return pieces


# -- reading a piece (worker) ----------------------------------------------------------------------


def _read_json_bytes(data: bytes, file: InputFile, line0: int) -> pa.Table:
    import pyarrow.json as pj

    if not data.strip():
        return pa.table({})
    try:
        return pj.read_json(
            io.BytesIO(data), read_options=pj.ReadOptions(block_size=max(1 << 20, len(data) + 1))
        )
    except pa.ArrowInvalid as exc:
        raise InputError(_json_error(data, file, line0, str(exc))) from None


def _json_error(data: bytes, file: InputFile, line0: int, message: str) -> str:
    """Where a JSON-lines piece went wrong: the first line that is not a JSON object, else
    pyarrow's message (a type that changes between rows) with its row made a line number."""
    rows = 0
    for n, line in enumerate(data.split(b"\n"), line0 + 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            return f"{file.uri}: line {n} is not valid JSON ({getattr(exc, 'msg', exc)})"
        if not isinstance(record, dict):
            return f"{file.uri}: line {n} is not a JSON object"
        if f"in row {rows}" in message:
            message = message.replace(f"in row {rows}", f"at line {n}")
        rows += 1
    return f"{file.uri}: {message.splitlines()[0]}"


def _line_range(fh, file: InputFile, piece: Piece) -> tuple[int, int]:
    """The bytes of the lines whose first byte lies in [piece.start, piece.stop)."""

    def next_line_start(at: int) -> int:
        if at <= 0:
            return 0
        if at >= file.size:
            return file.size
        fh.seek(at - 1)
        pos = at - 1
        while True:
            block = fh.read(1 << 16)
            if not block:
                return file.size
            nl = block.find(b"\n")
            if nl >= 0:
                return pos + nl + 1
            pos += len(block)

    return next_line_start(piece.start), next_line_start(piece.stop)


def _lines_before(fs, file: InputFile, offset: int) -> int:
    """Newlines before byte `offset` (only for messages: the line number of a bad row)."""
    count = 0
    with fs.open_input_stream(file.path) as fh:
        left = offset
        while left > 0:
            block = fh.read(min(left, 1 << 22))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def raw_batches(source: Source, piece: Piece, needed: list[str]) -> Iterator[pa.Table]:
    """The piece's rows, in order, as tables of the needed columns."""
    file = source.files[piece.file]
    fs = source.fs
    try:
        if source.fmt == "parquet":
            pf = pq.ParquetFile(fs.open_input_file(file.path))
            groups = list(range(piece.start, piece.stop))
            for batch in pf.iter_batches(BATCH_ROWS, row_groups=groups, columns=needed):
                yield pa.Table.from_batches([batch])
        elif source.fmt == "jsonl":
            with fs.open_input_file(file.path) as fh:
                a, b = _line_range(fh, file, piece)
                fh.seek(a)
                data = fh.read(b - a)
            try:
                table = _read_json_bytes(data, file, 0) if b > a else pa.table({})
            except InputError as exc:  # name the line in the file, not in the piece
                raise InputError(_shift_line(str(exc), _lines_before(fs, file, a))) from None
            if table.num_columns == 0:
                return
            if needed[0] not in table.column_names:  # the text column; others may be absent
                raise InputError(f"{file.uri}: column {needed[0]!r} not found in bytes {a}..{b}")
            cols = {c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows)
                    for c in needed}  # fmt: skip
            lines = [n for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
            yield pa.table({**cols, LINE: pa.array(lines, pa.int64())})
        elif source.fmt == "csv":
            import pyarrow.csv as pacsv

            convert = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in needed}, include_columns=needed
            )
            with fs.open_input_stream(file.path) as fh:
                for batch in pacsv.open_csv(fh, convert_options=convert):
                    yield pa.Table.from_batches([batch])
        else:
            with fs.open_input_stream(file.path) as fh:
                for batch in pa.ipc.open_stream(fh):
                    yield pa.Table.from_batches([batch]).select(needed)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"{file.uri}: not a readable {source.fmt} file ({reason})") from None


@dataclass(frozen=True)
class Reader:
    """What a piece task needs to read and normalise (the driver builds it once per side)."""

    source: Source
    spec: InputSpec
    field: str
    keep_types: dict[str, pa.DataType]
    buckets: int

    @property
    def needed(self) -> list[str]:
        s = self.spec
        if s.messages_column:
            text = [s.messages_column]
        elif s.response_column:
            text = [*s.prompt_columns, s.response_column]
        else:
            text = [s.text_column]
        cols = [*text, *([s.id_column] if s.id_column else []), *s.keep_columns]
        cols += [s.vector_column] if s.vector_column else []
        return list(dict.fromkeys(cols))


def _where(reader: Reader, piece: Piece, batch: pa.Table, raw0: int, i: int) -> str:
    """Row i of a batch, as a message names it: its file and line (JSON lines) or row."""
    file = reader.source.files[piece.file]
    if LINE in batch.column_names:  # lines counted from the piece's first: add the lines before
        with reader.source.fs.open_input_file(file.path) as fh:
            a, _ = _line_range(fh, file, piece)
        before = _lines_before(reader.source.fs, file, a)
        return f"{file.uri}: line {before + batch.column(LINE)[i].as_py()}"
    return f"{file.uri}: row {piece.first_row + raw0 + i}"


def _shift_line(message: str, before: int) -> str:
    """A message about `line N` of a piece, about line N + before of its file."""
    import re

    return re.sub(r"line (\d+)", lambda m: f"line {int(m[1]) + before}", message, count=1)


def _conversations(batch: pa.Table, reader: Reader, piece: Piece, raw0: int):
    """Chat rows (messages, or prompt/response pairs) -> (their text: the conversation as text,
    "" for a row without one; their messages, checked), naming file, row and column of a bad
    one (`engine.render.check_messages`)."""
    spec = reader.spec
    if spec.messages_column:
        column, values = spec.messages_column, batch.column(spec.messages_column).to_pylist()
        name = f"column {column!r} ({reader.field}.messages_column)"
    else:
        prompts = [batch.column(c).to_pylist() for c in spec.prompt_columns]
        answers = batch.column(spec.response_column).to_pylist()
        name = f"column {spec.response_column!r} ({reader.field}.response_column)"
        values = []
        for i, answer in enumerate(answers):
            parts = [str(p[i]) for p in prompts if p[i] is not None and str(p[i]).strip()]
            if not parts and answer is None:
                values.append(None)
            elif not parts:
                raise InputError(f"{_where(reader, piece, batch, raw0, i)}: the prompt columns "
                                 f"{spec.prompt_columns} are empty")  # fmt: skip
            else:
                values.append(pair("\n\n".join(parts), answer))
    texts: list[str] = []
    messages: list[list[dict]] = []
    for i, value in enumerate(values):
        if value is None:  # an empty row: dropped and counted like a blank text
            texts.append("")
            messages.append([])
            continue
        try:
            checked = check_messages(value)
        except RenderError as exc:
            raise InputError(f"{_where(reader, piece, batch, raw0, i)}: {name}: {exc}") from None
        texts.append(plain(checked))
        messages.append(checked)
    return pa.array(texts, pa.string()), messages


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def normalise(batch: pa.Table, reader: Reader, piece: Piece, raw0: int) -> tuple[pa.Table, dict]:
    """One raw batch -> (id, text, keep..., messages, _vector) of its non-empty rows, plus
    counts."""
    spec, field = reader.spec, reader.field
    file = reader.source.files[piece.file]
    messages = None
    if spec.chat:
        text, messages = _conversations(batch, reader, piece, raw0)
    else:
        column = batch.column(spec.text_column)
        try:
            text = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(
                f"{file.uri}: column {spec.text_column!r}: expected text, got {column.type}"
            ) from None
    text = pc.fill_null(text, "")
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0).to_numpy(
        zero_copy_only=False
    )
    counts: dict[str, int | str | None] = {"empty": int(empty.sum()), "first_empty": None}
    if counts["empty"] and spec.on_empty == "error":
        counts["first_empty"] = _where(reader, piece, batch, raw0, int(np.flatnonzero(empty)[0]))
    keep = pa.array(~empty)
    if spec.id_column:
        ids = pc.cast(batch.column(spec.id_column), pa.string()).filter(keep)
        blank = pc.or_(pc.is_null(ids), pc.equal(pc.utf8_length(pc.fill_null(ids, "")), 0))
        if pc.any(blank).as_py():
            n = int(pc.sum(blank).as_py())
            raise InputError(
                f"{field}.id_column: {n} rows have a null or blank {spec.id_column!r} ({file.uri})"
            )
        text = text.filter(keep)
    else:
        text = text.filter(keep)
        ids = pa.array(content_ids(text.to_pylist()), pa.string())
    cols: dict[str, pa.Array] = {"id": ids, "text": text}
    for c in spec.keep_columns:
        values = batch.column(c).filter(keep)
        try:
            cols[c] = pc.cast(values, reader.keep_types[c])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            raise InputError(
                f"{file.uri}: column {c!r} ({field}.keep_columns): expected "
                f"{reader.keep_types[c]} like the first file, got {values.type}"
            ) from None
    rows = np.flatnonzero(~empty)
    if messages is not None:
        cols["messages"] = pa.array([messages[i] for i in rows], MESSAGES_TYPE)
    if spec.vector_column:
        column = batch.column(spec.vector_column).filter(keep)
        cols[VECTOR] = _vectors(
            column, reader, lambda i: _where(reader, piece, batch, raw0, int(rows[i]))
        )
    return pa.table(cols), counts


def _vectors(column, reader: Reader, where) -> pa.Array:
    """A given vector column as fixed_size_list<float32>[d], checked row by row; `where(i)`
    names row i in a message."""
    spec, field = reader.spec, reader.field
    name = f"column {spec.vector_column!r} ({field}.vector_column)"
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not _is_vector_type(arr.type):
        raise InputError(f"{where(0)}: {name}: expected a list of floats, got {arr.type}")
    if arr.null_count:
        raise InputError(f"{where(int(np.flatnonzero(arr.is_null())[0]))}: {name} is null")
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else 0
        ragged = np.flatnonzero(lengths != dim)
        if len(ragged):
            raise InputError(
                f"{where(ragged[0])}: {name} has {int(lengths[ragged[0]])} values where the "
                f"first row has {dim} (ragged lists)"
            )
    if dim == 0 and len(arr):
        raise InputError(f"{where(0)}: {name} is an empty list")
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), dim)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise InputError(f"{where(int(np.flatnonzero(~finite)[0]))}: {name} has NaN or inf")
    zero = ~values.any(axis=1)
    if zero.any():
        raise InputError(
            f"{where(int(np.flatnonzero(zero)[0]))}: {name} is a zero vector (no direction to "
            "compare)"
        )
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)


def bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """A stable bucket per id (crc32: the same on every machine and process)."""
    return np.fromiter(
        (zlib.crc32(i.encode()) % buckets for i in ids.to_pylist()), np.int64, len(ids)
    )


def read_piece(reader: Reader, piece: Piece, cap: int | None, store: Store, staged: str) -> tuple:
    """A piece task: normalise its rows, stage them at `staged` in the run folder, and return
    (counts, then per bucket the (id, pos) of its rows). Reads at most `cap` rows (the limit's
    share of this piece). The rows wait for the dedup in the run folder, not in the object store:
    a worker holds one piece at a time, whatever the pool's size."""
    tables, raw, empty, first_empty, dim = [], 0, 0, None, None
    for batch in raw_batches(reader.source, piece, reader.needed):
        if cap is not None and raw + batch.num_rows > cap:
            batch = batch.slice(0, max(0, cap - raw))
        if batch.num_rows == 0:
            break
        table, counts = normalise(batch, reader, piece, raw)
        raw += batch.num_rows
        empty += counts["empty"]
        first_empty = first_empty or counts["first_empty"]
        if table.num_rows:
            tables.append(table)
    table = pa.concat_tables(tables) if tables else None
    if table is not None and VECTOR in table.column_names:
        dim = table.schema.field(VECTOR).type.list_size
    ids = table.column("id").combine_chunks() if table is not None else pa.array([], pa.string())
    bucket = bucket_of(ids, reader.buckets)
    pos = np.arange(len(ids), dtype=np.int64)
    splits = [
        pa.table({"id": ids.filter(pa.array(bucket == h)), "pos": pos[bucket == h]})
        for h in range(reader.buckets)
    ]
    if table is not None:
        store.write_parquet(staged, table)
    counts = {"raw": raw, "empty": empty, "first_empty": first_empty, "rows": len(ids),
              "dim": dim, "staged": staged if table is not None else None}  # fmt: skip
    return (counts, *splits)


# -- dedup by bucket, then write (workers) ---------------------------------------------------------


def dedup_bucket(
    store: Store, side: str, h: int, pieces: int, previous: str | None, generation: str, *splits
) -> tuple:
    """One bucket's ids from every piece: keep the first occurrence (lowest piece, position) and
    any id the pool already has (`previous` id generation) -- report the others per piece.
    Writes the bucket of the new id generation. Returns (counts, drops of piece 0, 1, ...)."""
    tables = [s.append_column("piece", pa.array(np.full(s.num_rows, k, np.int64)))
              for k, s in enumerate(splits)]  # fmt: skip
    table = pa.concat_tables(tables)
    old = None
    if previous is not None:
        old = pq.read_table(store.path(f"{previous}/bucket-{h:03d}.parquet"), filesystem=store.fs)
        old = old.column("id").combine_chunks()
    order = pc.sort_indices(table, [("id", "ascending"), ("piece", "ascending"),
                                    ("pos", "ascending")])  # fmt: skip
    table = table.take(order)
    ids = table.column("id").combine_chunks()
    repeat = np.zeros(len(ids), bool)
    if len(ids) > 1:
        repeat[1:] = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(
            zero_copy_only=False
        )
    if old is not None and len(old):
        repeat |= pc.is_in(ids, value_set=old).to_numpy(zero_copy_only=False)
    example = None
    if repeat.any():
        first = ids[int(np.flatnonzero(repeat)[0])].as_py()
        in_old = int(old is not None and pc.is_in(pa.array([first]), value_set=old)[0].as_py())
        example = (first, int(pc.sum(pc.equal(ids, first)).as_py()) + in_old)
    kept = ids.filter(pa.array(~repeat))
    merged = kept if old is None else pa.concat_arrays([old, kept])
    merged = merged.take(pc.sort_indices(merged))
    store.write_parquet(f"{generation}/bucket-{h:03d}.parquet", pa.table({"id": merged}))
    piece = table.column("piece").to_numpy()
    pos = table.column("pos").to_numpy()
    drops = [np.sort(pos[repeat & (piece == k)]) for k in range(pieces)]
    counts = {"duplicates": int(repeat.sum()), "example": example,
              "per_piece": [len(d) for d in drops]}  # fmt: skip
    return (counts, *drops)


def write_part(store: Store, side: str, index: int, first: int, staged, *drops) -> dict:
    """A piece's staged rows without its duplicates, numbered from `first`, as part `index`."""
    if staged is None:
        return {"rows": 0}
    table = pq.read_table(store.path(staged), filesystem=store.fs)
    dropped = np.unique(np.concatenate(drops)) if drops else np.array([], np.int64)
    if len(dropped):
        mask = np.ones(table.num_rows, bool)
        mask[dropped] = False
        table = table.filter(pa.array(mask))
    if table.num_rows == 0:
        return {"rows": 0}
    table = table.combine_chunks()
    sha = hashlib.sha1()
    sha.update("\n".join(table.column("id").to_pylist()).encode())
    sha.update(b"\x00" + "\x00".join(table.column("text").to_pylist()).encode())
    if VECTOR in table.column_names:
        sha.update(table.column(VECTOR).combine_chunks().flatten().to_numpy().tobytes())
    digest = sha.hexdigest()[:20]
    rows = pa.array(np.arange(first, first + table.num_rows, dtype=np.int64))
    table = pa.table({"row": rows, **{c: table.column(c) for c in table.column_names}})
    name = f"part-{index:05d}-{digest[:12]}.parquet"
    store.write_parquet(RunFolder.data(side, name), table, row_group_size=4096)
    return {"name": name, "first": first, "rows": table.num_rows, "digest": digest}


# -- the side, end to end (driver: plans, schedules, merges counts) --------------------------------


def _previous(store: Store, side: str, spec: InputSpec, source: Source) -> Pool | None:
    """The pool this ingest can append to: same spec, every earlier file unchanged."""
    try:
        pool = load_pool(store, side)
    except InputError:
        return None
    if pool.info.get("spec") != spec.model_dump(mode="json"):
        return None
    now = {f[0]: f for f in fingerprint(source)}
    if any(now.get(f[0]) != f for f in pool.info["files"]):
        return None
    return pool


def ingest_side(
    spec: InputSpec, field: str, store: Store, side: str, cfg: IngestConfig, append: bool = False
) -> dict:
    """Read and clean one side into `data/<side>/`; returns the counts for the manifest. A
    failed or interrupted ingest leaves no staged rows behind."""
    try:
        return _ingest_side(spec, field, store, side, cfg, append)
    except BaseException:
        with contextlib.suppress(Exception):
            store.delete(RunFolder.data(side, ".staging"))
        raise


def _ingest_side(
    spec: InputSpec, field: str, store: Store, side: str, cfg: IngestConfig, append: bool
) -> dict:
    import ray

    source = check_input(spec, field)
    previous = _previous(store, side, spec, source) if append else None
    files = fingerprint(source)
    if previous is not None:  # only the files the pool does not have yet, after its rows
        known = {f[0] for f in previous.info["files"]}
        source = Source(source.fmt, source.fs,
                        tuple(f for f in source.files if f.uri not in known))  # fmt: skip
        files = previous.info["files"] + fingerprint(source)
    if previous is not None and not source.files:  # nothing new on this side
        return {"rows_read": 0, "empty_dropped": 0, "duplicates_dropped": 0, "rows": previous.n,
                "rows_added": 0, "format": source.fmt, "parts": len(previous.parts),
                "parts_written": 0, "files_read": 0, "appended": True, "inputs": files,
                "dim": previous.dim}  # fmt: skip
    pieces = plan(source, cfg, spec.limit)
    buckets = previous.info["id_buckets"] if previous else max(1, min(len(pieces), cfg.id_buckets))
    reader = Reader(source, spec, field, _keep_types(source, spec) if pieces else {}, buckets)
    read = ray.remote(read_piece).options(num_returns=1 + buckets)
    staging = RunFolder.data(side, ".staging")
    store.delete(staging)  # a killed ingest's leftovers

    def stage(k: int) -> str:
        return f"{staging}/piece-{k:05d}.parquet"

    results = []
    if spec.limit is not None and source.fmt != "parquet":  # caps are known only piece by piece
        left = spec.limit
        for k, piece in enumerate(pieces):
            if left <= 0:
                break
            refs = read.remote(reader, piece, left, store, stage(k))
            counts = ray.get(refs[0])
            left -= counts["raw"]
            results.append((counts, counts["staged"], refs[1:]))
    else:
        caps = _caps(pieces, spec.limit)
        submitted = [read.remote(reader, p, c, store, stage(k))
                     for k, (p, c) in enumerate(zip(pieces, caps, strict=True))]  # fmt: skip
        counts = ray.get([refs[0] for refs in submitted])
        results = [(c, c["staged"], refs[1:]) for c, refs in zip(counts, submitted, strict=True)]
    rows_read = sum(c["raw"] for c, _, _ in results)
    n_empty = sum(c["empty"] for c, _, _ in results)
    if not previous and rows_read == 0:
        raise InputError(f"{field}.path: {spec.path} has no rows")
    if n_empty and spec.on_empty == "error":
        first = next(c["first_empty"] for c, _, _ in results if c["first_empty"])
        key, column = text_field(spec)
        raise InputError(
            f"{field}.{key}: {n_empty} rows have null or blank {column!r} "
            f"(first at {first}); set {field}.on_empty: drop to skip them"
        )
    staged = sum(c["rows"] for c, _, _ in results)
    if not previous and staged == 0:
        raise InputError(f"{field}.{text_field(spec)[0]}: every row of {spec.path} has an empty "
                         "text")  # fmt: skip
    found = zip(results, pieces, strict=False)  # fewer results when a limit stopped early
    dims = [(c["dim"], source.files[p.file].uri) for (c, _, _), p in found if c["dim"] is not None]
    if previous is not None and previous.dim is not None:
        dims.insert(0, (previous.dim, "the pool's earlier files"))
    for dim, where in dims[1:]:
        if dim != dims[0][0]:
            raise InputError(
                f"{where}: column {spec.vector_column!r} ({field}.vector_column) has dimension "
                f"{dim}, {dims[0][1]} has {dims[0][0]}; every row needs the same"
            )
    dim_set = {d for d, _ in dims}
    next_gen = previous.info["id_generation"] + 1 if previous else 0
    generation = RunFolder.data(side, "_ids", f"gen-{next_gen}")
    old_ids = (
        RunFolder.data(side, "_ids", f"gen-{previous.info['id_generation']}")
        if previous is not None
        else None
    )
    dedup = ray.remote(dedup_bucket).options(num_returns=1 + len(results))
    bucket_refs = [
        dedup.remote(
            store,
            side,
            h,
            len(results),
            old_ids,
            generation,
            *[splits[h] for _, _, splits in results],
        )  # fmt: skip
        for h in range(buckets)
    ]
    if len(results) == 0:  # num_returns=1: the refs are not lists
        bucket_refs = [[ref] for ref in bucket_refs]
    stats = ray.get([refs[0] for refs in bucket_refs])
    n_dup = sum(s["duplicates"] for s in stats)
    example = next((s["example"] for s in stats if s["example"]), None)
    if n_dup and spec.id_column and example is not None:
        raise InputError(
            f"{field}.id_column: {n_dup} repeated ids in {spec.id_column!r} "
            f"(e.g. {example[0]!r} x{example[1]})"
        )
    first = previous.n if previous else 0
    base = len(previous.parts) if previous else 0
    write = ray.remote(write_part)
    refs = []
    for k, (counts, staged, _) in enumerate(results):
        dropped = sum(s["per_piece"][k] for s in stats)
        refs.append(write.remote(store, side, base + k, first, staged,
                                 *[bucket_refs[h][1 + k] for h in range(buckets)]))  # fmt: skip
        first += counts["rows"] - dropped
    written = [w for w in ray.get(refs) if w["rows"]]
    parts = [*(previous.parts if previous else ()), *(Part(**w) for w in written)]
    if not parts:
        raise InputError(f"{field}.{text_field(spec)[0]}: every row of {spec.path} has an empty "
                         "text")  # fmt: skip
    dim = next(iter(dim_set), None)
    commit_index(store, side, parts, spec, files, source.fmt, dim, buckets, generation)
    store.delete(staging)
    return {
        "rows_read": rows_read,
        "empty_dropped": n_empty,
        "duplicates_dropped": n_dup,
        "rows": parts[-1].stop,
        "rows_added": parts[-1].stop - (previous.n if previous else 0),
        "format": source.fmt,
        "parts": len(parts),
        "parts_written": len(written),
        "files_read": len(source.files),
        "appended": previous is not None,
        "inputs": files,
        "dim": dim,
    }


def commit_index(
    store: Store,
    side: str,
    parts: list[Part],
    spec: InputSpec,
    files: list,
    fmt: str,
    dim: int | None,
    buckets: int,
    generation: str,
) -> None:
    """Write `data/<side>/_index.json` (the commit point of an ingest), then remove the parts and
    id generations it does not name."""
    columns = ["row", "id", "text", *spec.keep_columns, *(["messages"] if spec.chat else []),
               *([VECTOR] if spec.vector_column else [])]  # fmt: skip
    index = {
        "layout": LAYOUT,
        "rows": parts[-1].stop if parts else 0,
        "parts": [vars(p) for p in parts],
        "columns": columns,
        "dim": dim,
        "files": files,
        "format": fmt,
        "spec": spec.model_dump(mode="json"),
        "id_buckets": buckets,
        "id_generation": int(generation.rsplit("-", 1)[1]),
    }
    store.write_json(RunFolder.data(side, INDEX), index)
    _remove_leftovers(store, side, {p.name for p in parts}, generation)


def _caps(pieces: list[Piece], limit: int | None) -> list[int | None]:
    """Rows each piece may read under `limit` (parquet pieces know their rows)."""
    if limit is None:
        return [None] * len(pieces)
    caps: list[int | None] = []
    left = limit
    for piece in pieces:
        caps.append(max(0, min(left, piece.rows if piece.rows is not None else left)))
        left -= caps[-1] or 0
    return caps


def _remove_leftovers(store: Store, side: str, parts: set[str], generation: str) -> None:
    """Parts and id generations the new index does not name (an earlier ingest's)."""
    for name in store.list(RunFolder.data(side)):
        if name.startswith("part-") and name not in parts:
            store.delete(RunFolder.data(side, name))
    keep = generation.rsplit("/", 1)[1]
    for name in store.folders(RunFolder.data(side, "_ids")):
        if name != keep:
            store.delete(RunFolder.data(side, "_ids", name))


def write_vector_inputs(folder, candidates, targets, parts: int = 1) -> tuple:
    """Input files for given float32 arrays (text "c <i>" / "t <i>", a `vector` column):
    `folder/pool/pNNN.parquet` in `parts` files (row i = candidates[i]) and
    `folder/targets.parquet`; returns their two paths. For tests and benchmarks that start
    from arrays: ingest them with `vector_column: vector`."""
    from pathlib import Path

    from raysift.jobs.core.pool import vectors_to_arrow

    folder = Path(folder)
    (folder / "pool").mkdir(parents=True, exist_ok=True)

    def table(x, prefix, first=0):
        return pa.table({"text": [f"{prefix} {i}" for i in range(first, first + len(x))],
                         "vector": vectors_to_arrow(x)})  # fmt: skip

    edges = np.linspace(0, len(candidates), parts + 1).astype(int)
    for k in range(parts):
        rows = table(candidates[edges[k] : edges[k + 1]], "c", int(edges[k]))
        pq.write_table(rows, folder / "pool" / f"p{k:03d}.parquet")
    pq.write_table(table(targets, "t"), folder / "targets.parquet")
    return folder / "pool", folder / "targets.parquet"


def run_ingest(cfg: Config, run_dir: Path, append: bool = False) -> dict:
    """Both sides into the run folder's partitioned pool; their vector columns must agree."""
    store = Store.for_run(run_dir)
    info = {}
    for side in SIDES:
        spec = getattr(cfg, side)
        counts = ingest_side(spec, side, store, side, cfg.ingest, append)
        info[side] = {**counts, "spec": spec.model_dump(mode="json")}
    dims = {side: info[side]["dim"] for side in SIDES}
    if dims["candidates"] != dims["targets"]:
        raise InputError(
            f"candidates.vector_column: {cfg.candidates.vector_column!r} in {cfg.candidates.path} "
            f"has dimension {dims['candidates']}, targets.vector_column "
            f"{cfg.targets.vector_column!r} in {cfg.targets.path} has {dims['targets']}"
        )
    return info


def _checks(run: StageRun) -> None:
    for side in SIDES:
        check_input(getattr(run.cfg, side), side)


def _current(run: StageRun, manifest: Manifest) -> Reuse | None:
    """The last ingest finished with the same input specs and unchanged input files."""
    entry = manifest.stage("ingest")
    if entry.get("status") != "done":
        return None
    store = Store.for_run(run.run_dir)
    for side in SIDES:
        spec = getattr(run.cfg, side)
        if not store.is_file(RunFolder.data(side, INDEX)):
            return None
        previous = entry.get(side, {})
        if previous.get("spec") != spec.model_dump(mode="json"):
            return None
        if previous.get("inputs") != fingerprint(check_input(spec, side)):
            return None
    return Reuse("ingest: inputs unchanged since the last run, reusing data/")


STAGE = Stage(
    name="ingest",
    summary="candidates and targets -> data/<side>/ parts + _index.json (Ray tasks per piece)",
    checks=_checks,
    current=_current,
    run=lambda run: run_ingest(run.cfg, run.run_dir, run.append),
)
