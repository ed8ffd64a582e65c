"""Run folders on any filesystem pyarrow reaches: a local path, `s3://`, `gs://`, `hdfs://`, or
any fsspec protocol whose package is installed (`abfs://`, ...).

A remote run folder (`output_dir: s3://bucket/runs/x`) is worked in a local mirror on the driver
(`$RAYSIFT_CACHE/runs/<hash>`): the driver pulls what the remote folder holds before the first
stage, every committed file (`jobs.runfolder.atomic_path`: each embedding shard, the manifest,
the selection) is uploaded the moment it is renamed into place, and each stage ends with a sync
that also removes remote files the stage deleted. A driver on another machine -- a resubmitted job,
a scheduled curation -- resumes from the remote folder and loses at most the shard in flight.
The bulk of a run -- the ingested parts (`data/`), the vectors (`embeddings/`), TSDS's
`probabilities/`, the fine-tune's tokens and Ray Train's checkpoints (`finetune/tokens`,
`finetune/ray`) -- is written and read by the workers themselves, straight on the run folder's
filesystem, through a `Store`; the mirror never pulls, uploads or deletes anything below those
folders, so it holds only small files (config, manifest, selection, reports).

Credentials come from the filesystem's usual chain (for S3: AWS_ACCESS_KEY_ID/..., AWS_PROFILE,
~/.aws, an instance profile; AWS_ENDPOINT_URL for an S3-compatible endpoint).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from raysift.jobs.core.errors import InputError
from raysift.jobs.core.runfolder import RunFolder, on_commit

# Folders of a run folder (at any depth: evaluate and GradEx sub-runs have their own) whose files
# the workers write on the run folder's filesystem; the driver's mirror never holds them.
BULK_DIRS = RunFolder.BULK_DIRS
BULK_PAIRS = RunFolder.BULK_PAIRS
_MIRRORS: dict[Path, Remote] = {}


def is_bulk(rel: str) -> bool:
    """Whether a run-folder-relative path lies in a folder the workers write (never mirrored)."""
    parts = Path(rel).parts
    if any(p in BULK_DIRS for p in parts):
        return True
    return any(pair == parts[i : i + 2] for pair in BULK_PAIRS for i in range(len(parts) - 1))


def _mirrored(rel: str) -> bool:
    """Whether the mirror keeps a run-folder-relative path (every small file but the lock
    object, which only conditional writes may touch: `jobs.runlock`)."""
    return not is_bulk(rel) and rel != RunFolder.LOCK


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _aws_credentials_configured() -> bool:
    env = (
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    home = Path.home() / ".aws"
    return any(os.environ.get(k) for k in env) or any(
        (home / f).is_file() for f in ("credentials", "config")
    )


def filesystem(uri: str, field: str = "output_dir"):
    """(pyarrow FileSystem, path inside it) for `uri`; an unknown scheme names the field."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        if "Unrecognized filesystem type" not in str(exc):
            raise InputError(f"{field}: {uri}: {str(exc).splitlines()[0]}") from None
    try:  # not a pyarrow scheme: an fsspec implementation, if its package is installed
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise InputError(
            f"{field}: {uri}: no filesystem for this scheme (pyarrow has s3, gs, hdfs; others "
            f"need fsspec and its package) ({exc})"
        ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class Remote:
    """A remote run folder and its local mirror."""

    def __init__(self, uri: str, local: Path | None = None, field: str = "output_dir"):
        self.uri = uri.rstrip("/")
        self.field = field
        self.fs, self.root = filesystem(self.uri, field)
        self.root = self.root.rstrip("/")
        cache = Path(os.environ.get("RAYSIFT_CACHE", Path.home() / ".cache" / "raysift"))
        digest = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
        self.local = Path(local) if local else cache / "runs" / f"{digest}-{Path(self.root).name}"
        self._pushed: dict[str, tuple[int, int]] = {}  # relpath -> (size, mtime_ns) uploaded

    # -- checks --------------------------------------------------------------------------------
    def probe(self) -> None:
        """Reach the folder once, in seconds: no credentials or no endpoint is an InputError."""
        import pyarrow.fs as pafs

        t0 = time.monotonic()
        try:
            info = self.fs.get_file_info(self.root)
            if info.type == pafs.FileType.File:
                raise InputError(f"{self.field}: {self.uri} is a file, expected a folder")
            self.fs.create_dir(self.root)
        except OSError as exc:
            msg = str(exc).splitlines()[0]
            hint = ""
            if self.uri.startswith("s3://") and not _aws_credentials_configured():
                hint = (
                    " -- no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run on a node with an instance profile)"
                )
            raise InputError(
                f"{self.field}: cannot use {self.uri} ({msg}){hint} [{time.monotonic() - t0:.1f} s]"
            ) from None

    # -- transfers -----------------------------------------------------------------------------
    def relative(self, local_path: Path) -> str | None:
        """`local_path` relative to the mirror (posix), or None when it lies outside it."""
        try:
            return Path(local_path).resolve().relative_to(self.local.resolve()).as_posix()
        except ValueError:
            return None

    def _rel(self, local_path: Path) -> str | None:
        """The relative path of a file the mirror uploads (None: outside, or Ray Train's)."""
        rel = self.relative(local_path)
        return rel if rel is not None and _mirrored(rel) else None

    def remote_path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _remote_files(self) -> dict[str, int]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                rel = info.path[len(self.root) + 1 :]
                if _mirrored(rel):
                    out[rel] = info.size
        return out

    def _local_files(self) -> dict[str, Path]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.local):
            base = Path(dirpath)
            rel_dir = base.relative_to(self.local)
            if not _mirrored(rel_dir.as_posix()):
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]
            for name in filenames:
                p = base / name
                if not p.is_symlink() and not name.startswith(".tmp-"):
                    out[(rel_dir / name).as_posix()] = p
        return out

    def pull(self) -> int:
        """Copy remote files the mirror lacks (or holds at another size); returns how many."""
        self.local.mkdir(parents=True, exist_ok=True)
        n = 0
        for rel, size in sorted(self._remote_files().items()):
            dest = self.local / rel
            if not (dest.is_file() and dest.stat().st_size == size):
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".tmp-pull-{dest.name}")
                with self.fs.open_input_stream(self.remote_path(rel)) as src, open(tmp, "wb") as fh:
                    while chunk := src.read(8 << 20):
                        fh.write(chunk)
                os.replace(tmp, dest)
                n += 1
            st = dest.stat()
            self._pushed[rel] = (st.st_size, st.st_mtime_ns)
        return n

    def push(self, local_path: Path) -> None:
        """Upload one committed file, or every file of a committed folder."""
        p = Path(local_path)
        files = [p] if p.is_file() else [q for q in sorted(p.rglob("*")) if q.is_file()]
        for f in files:
            rel = self._rel(f)
            if rel is None:
                continue
            st = f.stat()
            dest = self.remote_path(rel)
            self.fs.create_dir(dest.rsplit("/", 1)[0])
            with open(f, "rb") as src, self.fs.open_output_stream(dest) as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            self._pushed[rel] = (st.st_size, st.st_mtime_ns)

    def sync(self) -> None:
        """Make the remote folder equal the mirror: upload changes, delete what the mirror lost."""
        local = self._local_files()
        for rel, p in sorted(local.items()):
            st = p.stat()
            if self._pushed.get(rel) != (st.st_size, st.st_mtime_ns):
                self.push(p)
        for rel in sorted(set(self._remote_files()) - set(local)):
            self.fs.delete_file(self.remote_path(rel))
            self._pushed.pop(rel, None)


class Store:
    """A run folder's files as workers reach them: a pyarrow filesystem and the folder's path in
    it. Picklable, so tasks and actors get one and read and write their own partitions on the
    run folder's filesystem (a local path, `s3://`, `gs://`, ...), never through the driver.

    Writes are atomic: a local or HDFS file is written under a `.tmp-*` name and renamed; an
    object store shows an object only once its upload completed, so it is written in place.
    """

    def __init__(self, fs, root: str, uri: str | None = None) -> None:
        self.fs, self.root = fs, str(root).rstrip("/")
        self.uri = uri or self.root

    @classmethod
    def local(cls, folder: Path) -> Store:
        import pyarrow.fs as pafs

        folder = Path(folder).resolve()
        return cls(pafs.LocalFileSystem(), folder.as_posix(), str(folder))

    @classmethod
    def for_run(cls, run_dir: Path) -> Store:
        """The store of a run folder: the remote one when `run_dir` is a mirror, else local."""
        remote = mirror_of(run_dir)
        if remote is None:
            return cls.local(run_dir)
        rel = remote.relative(run_dir)
        sub = remote.remote_path(rel if rel not in (None, ".") else "")
        return cls(remote.fs, sub, f"{remote.uri}/{rel}" if rel not in (None, ".") else remote.uri)

    def __reduce__(self):
        return (Store, (self.fs, self.root, self.uri))

    def __repr__(self) -> str:
        return f"Store({self.uri})"

    def child(self, rel: str) -> Store:
        return Store(self.fs, self.path(rel), f"{self.uri}/{rel}")

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        """How a message names a file: the URI (or local path) the user knows."""
        return f"{self.uri}/{rel}"

    @property
    def atomic_rename(self) -> bool:
        return self.fs.type_name in ("local", "hdfs")

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list(self, rel: str) -> builtins.list[str]:
        """Names of the files directly in folder `rel` (sorted; none when it does not exist)."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(
            i.base_name
            for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File and not i.base_name.startswith(".tmp-")
        )

    def folders(self, rel: str) -> builtins.list[str]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(
            i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory
        )

    def delete(self, rel: str) -> None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def _write(self, rel: str, write) -> None:
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if not self.atomic_rename:
            write(final)
            return
        head, name = final.rsplit("/", 1)
        tmp = f"{head}/.tmp-{uuid.uuid4().hex[:8]}-{name}"
        try:
            write(tmp)
            self.fs.move(tmp, final)
        finally:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)

    def write_parquet(self, rel: str, table, **options) -> None:
        import pyarrow.parquet as pq

        self._write(rel, lambda p: pq.write_table(table, p, filesystem=self.fs, **options))

    def write_bytes(self, rel: str, data: bytes) -> None:
        def write(p: str) -> None:
            with self.fs.open_output_stream(p) as out:
                out.write(data)

        self._write(rel, write)

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1) + "\n").encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as src:
            return src.read()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def parquet(self, rel: str):
        """A `pq.ParquetFile` of one file (metadata without reading the data)."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.fs.open_input_file(self.path(rel)))


def open_run(output_dir: str) -> tuple[Path, Remote | None]:
    """The local folder a run works in, and its Remote when `output_dir` is a URI (probed,
    pulled and registered, so every committed file is uploaded as it lands)."""
    if not is_remote(output_dir):
        return Path(output_dir.removeprefix("file://")), None
    remote = Remote(output_dir)
    remote.probe()
    remote.pull()
    _MIRRORS[remote.local.resolve()] = remote
    return remote.local, remote


def mirror_of(local_path: Path) -> Remote | None:
    """The Remote whose mirror holds `local_path`, if any."""
    p = Path(local_path).resolve()
    for root, remote in _MIRRORS.items():
        if p == root or root in p.parents:
            return remote
    return None


def shared_path(local_path: Path):
    """(path, filesystem) a Ray task on any node can read `local_path` at: the remote copy when
    the run folder is mirrored (the file was uploaded when it was committed), else the path."""
    remote = mirror_of(local_path)
    if remote is None:
        return str(local_path), None
    rel = remote.relative(local_path)
    assert rel is not None  # mirror_of found the mirror that holds it
    return remote.remote_path(rel), remote.fs


def committed(local_path: Path) -> None:
    """Called by the run folder's atomic writers after each rename: upload if mirrored."""
    if _MIRRORS:
        remote = mirror_of(local_path)
        if remote is not None:
            remote.push(local_path)


on_commit(committed)


def sync_all() -> None:
    """Sync every registered remote run folder (the CLI calls this when a command ends)."""
    for remote in list(_MIRRORS.values()):
        remote.sync()
