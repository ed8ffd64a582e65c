"""One writer per run folder: a command that writes a run folder holds its lock for as long as it
runs; a second writer refuses at once with one line naming the holder, or waits (`--wait`).

    local folder        `<folder>/.raysift.lock`, held with an OS lock (flock) on the open file:
                        the lock dies with the process, so a SIGKILLed run leaves nothing stale;
                        the file's content names the holder for the message
    s3:// and gs://     the object `<folder>/.raysift.lock`, created with a conditional write
                        (S3: If-None-Match: *; GCS: if_generation_match=0), holding host, pid,
                        command, start time; renewed every `expiry / 4` by a thread (a write
                        conditional on the object's ETag / generation), deleted at the end. A lock
                        object not renewed for `expiry` seconds (RAYSIFT_LOCK_EXPIRY, 600 by
                        default) belongs to a dead run: the next writer takes it over with a
                        write conditional on the stale version, so two takers cannot both win.
                        A holder whose renewal finds the object changed has lost it: the run
                        stops at its next stage with one line.

The lock is re-entrant within a process and covers what lies below the folder (evaluate's and
LESS's sub-runs): a command that holds `runs/demo` runs the pipeline on `runs/demo` and on
`runs/demo/evaluate/knn-seed0` without taking another lock. Read-only commands (`open_run`,
`validate`, the report) take none. Other remote filesystems (hdfs://, fsspec) have no conditional
create: their runs are not locked, and the first line of the run says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from raysift.jobs.core.errors import InputError
from raysift.jobs.core.runfolder import RunFolder

EXPIRY = "RAYSIFT_LOCK_EXPIRY"  # seconds an object-store lock lives without renewal
# How a command waits for a folder another run holds: 0 = refuse at once (the CLI's --wait sets
# it for the command it runs).
WAITING = {"seconds": 0.0}


class FolderBusy(InputError):
    """Another run holds the folder (exit 2: the user can wait for it or stop it)."""


def expiry() -> float:
    try:
        return max(1.0, float(os.environ.get(EXPIRY, "600")))
    except ValueError:
        return 600.0


def holder(command: str | None = None) -> dict:
    """Who this process is, as a lock's content."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "command": command or _command(), "started": now, "renewed": now}  # fmt: skip


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    if argv[0] in ("__main__.py", "-m"):
        argv[0] = "raysift"
    words = [a for a in argv if not a.startswith("-")][:2]  # raysift curate: not every path
    return " ".join(words) or "python"


def describe_holder(where: str, info: dict | None) -> str:
    if not info:
        return f"{where} is in use by another run; wait for it or stop it"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    return (f"{where} is in use by {info.get('command', 'another run')} ({info.get('host', '?')}, "
            f"pid {info.get('pid', '?')}, since {since}); wait for it or stop it")  # fmt: skip


# -- backends --------------------------------------------------------------------------------------


class LocalLock:
    """flock on <folder>/.raysift.lock (the lock belongs to the open file: it dies with us)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / RunFolder.LOCK
        self.fd: int | None = None

    def try_acquire(self, info: dict) -> dict | None:
        """None when taken, else the holder's content."""
        import fcntl

        make_folder(self.folder)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_fd(fd)
            os.close(fd)
            return other or {}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return None

    def renew(self, info: dict) -> bool:
        return True  # the OS holds it for us

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking would race)
            self.fd = None


def make_folder(folder: Path) -> None:
    """The run folder exists or is made: else one line naming output_dir (before any work)."""
    import errno

    if folder.exists() and not folder.is_dir():
        raise InputError(f"output_dir: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        raise InputError(f"output_dir: cannot create {folder} ({why})") from None


def _read_fd(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None


class ObjectLock:
    """A lock object with conditional writes; `store` does the four conditional calls."""

    def __init__(self, store) -> None:
        self.store = store
        self.tag: str | None = None

    def try_acquire(self, info: dict) -> dict | None:
        while True:
            tag = self.store.create(info)
            if tag is not None:
                self.tag = tag
                return None
            found = self.store.read()
            if found is None:  # released between our two calls: try again
                continue
            other, tag, age = found
            if age < expiry():
                return other
            taken = self.store.replace(info, tag)  # a dead run's: take it over, or lose the race
            if taken is not None:
                self.tag = taken
                return None

    def renew(self, info: dict) -> bool:
        tag = self.store.replace(info, self.tag)
        if tag is None:
            return False
        self.tag = tag
        return True

    def release(self) -> None:
        if self.tag is not None:
            self.store.delete(self.tag)
            self.tag = None


def _bucket_and_key(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` or `gs://bucket/a/b` -> ("bucket", "a/b/.raysift.lock")."""
    bucket, _, prefix = uri.split("://", 1)[1].partition("/")
    return bucket, f"{prefix.rstrip('/')}/{RunFolder.LOCK}".lstrip("/")


class S3Object:
    """The lock object on S3 (boto3: pyarrow's S3 client has no conditional writes)."""

    def __init__(self, uri: str) -> None:
        try:
            import boto3
            from botocore.exceptions import ClientError
        except ImportError:
            raise InputError(
                f"output_dir: {uri}: an s3:// run folder is locked with boto3 "
                "(pip install 'raysift[s3]')"
            ) from None
        self.bucket, self.key = _bucket_and_key(uri)
        self.client, self.error = boto3.client("s3"), ClientError

    def _conditional(self, call, **kwargs) -> str | None:
        try:
            return call(Bucket=self.bucket, Key=self.key, **kwargs)["ETag"]
        except self.error as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return None
            raise

    def create(self, info: dict) -> str | None:
        return self._conditional(self.client.put_object, Body=json.dumps(info), IfNoneMatch="*")

    def replace(self, info: dict, tag: str) -> str | None:
        return self._conditional(self.client.put_object, Body=json.dumps(info), IfMatch=tag)

    def read(self) -> tuple[dict, str, float] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.error as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        age = time.time() - got["LastModified"].timestamp()
        return json.loads(got["Body"].read() or b"{}"), got["ETag"], age

    def delete(self, tag: str) -> None:
        found = self.read()
        if found is not None and found[1] == tag:  # still ours
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class GCSObject:
    """The lock object on GCS (google-cloud-storage: generation preconditions)."""

    def __init__(self, uri: str) -> None:
        try:
            from google.api_core.exceptions import NotFound, PreconditionFailed
            from google.cloud import storage
        except ImportError:
            raise InputError(
                f"output_dir: {uri}: a gs:// run folder is locked with google-cloud-storage "
                "(pip install 'raysift[gcs]')"
            ) from None
        bucket, key = _bucket_and_key(uri)
        self.blob = storage.Client().bucket(bucket).blob(key)
        self.lost = (PreconditionFailed, NotFound)

    def _write(self, info: dict, generation: int) -> str | None:
        try:
            self.blob.upload_from_string(json.dumps(info), if_generation_match=generation)
        except self.lost:
            return None
        return str(self.blob.generation)

    def create(self, info: dict) -> str | None:
        return self._write(info, 0)

    def replace(self, info: dict, tag: str) -> str | None:
        return self._write(info, int(tag))

    def read(self) -> tuple[dict, str, float] | None:
        try:
            self.blob.reload()
            body = self.blob.download_as_bytes(if_generation_match=self.blob.generation)
        except self.lost:
            return None
        return json.loads(body or b"{}"), str(self.blob.generation), (
            time.time() - self.blob.updated.timestamp())  # fmt: skip

    def delete(self, tag: str) -> None:
        with contextlib.suppress(*self.lost):
            self.blob.delete(if_generation_match=int(tag))


# -- the lock --------------------------------------------------------------------------------------


@dataclass
class RunLock:
    """The lock of one run folder, held by this process."""

    where: str  # the folder as the user named it (a path or a URI)
    backend: LocalLock | ObjectLock
    info: dict
    created: bool = False  # the folder did not exist: removed again if nothing else is left in it
    depth: int = 1
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise when a renewal found the lock taken over (a run presumed dead was not)."""
        if self.lost:
            raise FolderBusy(
                f"{self.where}: the run lock was taken over by another run (this run was not "
                f"renewing it for {expiry():.0f} s); stopped: run the command again"
            )

    def _renew(self) -> None:
        every = expiry() / 4
        while not self._stop.wait(every):
            self.info["renewed"] = time.time()
            try:
                if not self.backend.renew(self.info):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a network hiccup: try again at the next beat
                continue

    def release(self) -> None:
        self._stop.set()
        self.backend.release()
        if self.created and isinstance(self.backend, LocalLock):
            left = [p for p in self.backend.folder.iterdir() if p.name != RunFolder.LOCK]
            if not left:  # a run that failed its checks leaves no folder behind
                self.backend.path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.backend.folder.rmdir()


_HELD: dict[str, RunLock] = {}  # key (resolved path or URI) -> the lock this process holds
_GUARD = threading.Lock()


def _key(where: str) -> str:
    from raysift.jobs.core.storage import is_remote

    if is_remote(where):
        return where.rstrip("/")
    return str(Path(where.removeprefix("file://")).resolve())


def _covering(key: str) -> RunLock | None:
    for held, lock in _HELD.items():
        if key == held or key.startswith(held.rstrip("/") + "/"):
            return lock
    return None


def _backend(where: str):
    from raysift.jobs.core.storage import is_remote

    if not is_remote(where):
        return LocalLock(Path(where.removeprefix("file://")))
    from raysift.jobs.core.storage import Remote

    Remote(where).probe()  # no credentials or no endpoint: one line, before the lock's calls
    if where.startswith("s3://"):
        return ObjectLock(S3Object(where))
    if where.startswith("gs://"):
        return ObjectLock(GCSObject(where))
    return None


@contextlib.contextmanager
def hold(where: str, command: str | None = None, wait: float | None = None,
         say=None) -> Iterator[RunLock | None]:  # fmt: skip
    """Hold the run folder `where` for the block: at once, or after waiting up to `wait` seconds
    (default: WAITING["seconds"]) for its holder; else FolderBusy naming the holder."""
    from raysift.jobs.core.console import say as default_say

    say = say or default_say
    key = _key(where)
    with _GUARD:
        lock = _covering(key)
        if lock is not None:
            lock.depth += 1
    if lock is not None:  # this process holds it (or a folder above it) already
        try:
            lock.check()
            yield lock
        finally:
            lock.depth -= 1
        return
    backend = _backend(where)
    if backend is None:
        say(f"{where}: this filesystem has no conditional create: the run folder is not locked")
        yield None
        return
    created = isinstance(backend, LocalLock) and not backend.folder.exists()
    info = holder(command)
    wait = WAITING["seconds"] if wait is None else wait
    t0, shown = time.monotonic(), 0.0
    while True:
        other = backend.try_acquire(info)
        if other is None:
            break
        waited = time.monotonic() - t0
        if waited >= wait:
            if created and isinstance(backend, LocalLock):
                created = False  # another run made it; it is theirs
            more = f" (waited {waited:.0f} s)" if wait else ""
            raise FolderBusy(describe_holder(where, other) + more)
        if waited >= shown:
            say(describe_holder(where, other).replace("; wait for it or stop it", "") +
                f"; waiting (up to {wait:.0f} s, {waited:.0f} s so far)")  # fmt: skip
            shown = waited + 60
        time.sleep(min(1.0, wait - waited))
    lock = RunLock(where, backend, info, created)
    if isinstance(backend, ObjectLock):
        threading.Thread(target=lock._renew, daemon=True, name="raysift-lock").start()
    _HELD[key] = lock
    try:
        yield lock
    finally:
        _HELD.pop(key, None)
        lock.release()


def writes_run_folder(fn):
    """Decorate a command `fn(cfg, ...)` that writes `cfg.output_dir`: it runs holding the lock."""
    import functools

    @functools.wraps(fn)
    def holding(cfg, *args, **kwargs):
        with hold(cfg.output_dir):
            return fn(cfg, *args, **kwargs)

    return holding

