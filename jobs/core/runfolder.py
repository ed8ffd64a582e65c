"""The run folder: its layout (`RunFolder`: every path in it), atomic writes and the manifest.

Every file a run produces is written under a temporary name in the same folder and renamed into
place (`os.replace`, atomic on POSIX), so a killed run leaves either the old file, the new one, or a
`.tmp-*` leftover that no reader looks at — never a file that looks complete and is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"
# Called with each path atomic_path commits. jobs/core/storage registers its upload to a mirrored
# run folder's remote copy when it is imported -- the only way a folder gets a mirror -- so this
# layer's bottom module imports nothing above it.
_ON_COMMIT: list[Callable[[Path], None]] = []


def on_commit(hook: Callable[[Path], None]) -> None:
    """Call `hook(path)` after every atomic commit into a run folder."""
    if hook not in _ON_COMMIT:
        _ON_COMMIT.append(hook)


class RunFolder:
    """Every path of a run folder, relative to its root: what a `Store` takes (workers reach the
    run folder through one), and what `RunFolder(run_dir).path(rel)` makes a local path of.
    evaluate's and GradEx's sub-runs are run folders of their own, inside this one."""

    MANIFEST = "manifest.json"  # resolved config, versions, code, per-stage status
    CONFIG = "config.yaml"  # the resolved config
    LOG = "logs/raysift.log"  # every raysift line of every run in this folder
    DATA = "data"  # data/<side>/part-*.parquet, _index.json (the commit point), _ids/
    EMBEDDINGS = "embeddings"  # embeddings/<side>/<part digest>/rows-A-B.parquet, _settings.json
    FEATURES = "features"  # DSIR: features/<side>/n<ngrams>-b<buckets>/<digest>/rows-A-B.parquet
    SELECTION = "selection.parquet"  # id, row, rank, score, probability, count, keep columns
    SELECTED = "selected.jsonl"  # the chosen rows with their text, in rank order
    PROBABILITIES = "probabilities"  # TSDS: p on its support, one file per shard
    GOTD_POTENTIAL = "gotd_potential.parquet"  # GOT-D: the target potential f
    FINETUNE = "finetune"  # finetune/model, fingerprint, info.json, tokens/, ray/ (checkpoints)
    MODEL = "finetune/model"
    FINGERPRINT = "finetune/fingerprint"
    TOKENS = "finetune/tokens"
    EPOCHS = "finetune/epochs"  # LESS's warm-up: each epoch's weights and Adam moments
    LESS = "less"  # less/warmup/: the warm-up rows and fine-tune (a sub-run)
    GRADEX = "gradex"  # gradex/meta, gradients/, estimates, result.json, validation.json
    EVALUATE = "evaluate"  # evaluate/base, evaluate/<method>-seed<seed>/ (sub-runs)
    EVALUATION = "evaluation.json"
    REPORT = "report.html"
    CURATE = "curate"  # curate/vNNNN/, curate/latest.json
    LOCK = ".raysift.lock"  # the run folder's one-writer lock (jobs.runlock): who holds it
    # what the workers write on the run folder's filesystem (never mirrored by the driver)
    BULK_DIRS = (DATA, EMBEDDINGS, PROBABILITIES, FEATURES)
    BULK_PAIRS = ((FINETUNE, "ray"), (FINETUNE, "tokens"), (FINETUNE, "epochs"))

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    @staticmethod
    def data(side: str, *names: str) -> str:
        return "/".join((RunFolder.DATA, side, *names))

    @staticmethod
    def embeddings(side: str, *names: str) -> str:
        return "/".join((RunFolder.EMBEDDINGS, side, *names))

    @staticmethod
    def features(side: str, *names: str) -> str:
        return "/".join((RunFolder.FEATURES, side, *names))

    @staticmethod
    def evaluate_run(name: str, seed: int | str) -> str:
        return f"{RunFolder.EVALUATE}/{name}-seed{seed}"
_VERSIONED = (
    "raysift",
    "ray",
    "torch",
    "transformers",
    "datasets",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "pot",
    "pyarrow",
    "numpy",
    "pydantic",
)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it is renamed to `final`, on error removed.

    Works for files and folders alike (a folder replaces an existing one of the same name).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield tmp
        if tmp.is_dir() and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for hook in _ON_COMMIT:  # a remote run folder gets the file now (storage.committed)
            hook(final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, table: pa.Table) -> None:
    """One JSON object per row (the rows a fine-tune reads)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in table.to_pylist():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def clean_leftovers(folder: Path) -> int:
    """Remove `.tmp-*` files and folders a killed run left behind; returns how many."""
    n = 0
    if folder.is_dir():
        for p in list(folder.rglob(f"{TMP_PREFIX}*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
            n += 1
    return n


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def code_location() -> str:
    """Where the running raysift was imported from (a checkout, a job's upload, an install)."""
    import raysift.jobs

    return str(Path(raysift.jobs.__file__).resolve().parent.parent)


class Manifest:
    """`manifest.json`: resolved config, versions, seed, and per-stage status, rows and timings.

    Rewritten atomically on every change, so it always describes the last finished step.
    """

    def __init__(self, run_dir: Path, config: dict, seed: int):
        self.path = Path(run_dir) / "manifest.json"
        previous = self._read()
        self.data: dict[str, Any] = {
            "raysift_manifest": 1,
            "config": config,
            "seed": seed,
            "versions": package_versions(),
            "code": code_location(),
            "command": sys.argv,
            # Earlier stages stay on record: each stage decides itself whether they still hold.
            "stages": previous.get("stages", {}),
        }

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def start(self, name: str) -> float:
        self.data["stages"][name] = {"status": "running", "started": time.time()}
        self.save()
        return time.perf_counter()

    def finish(self, name: str, t0: float, **info: Any) -> None:
        entry = self.data["stages"][name]
        entry.update(status="done", seconds=round(time.perf_counter() - t0, 3), **info)
        self.save()

    def fail(self, name: str, error: str) -> None:
        entry = self.data["stages"].setdefault(name, {})
        entry.update(status="failed", error=error)
        self.save()

    def interrupt(self, name: str, signal_name: str) -> None:
        """The stage stopped on a signal: what it committed stays, a rerun resumes it."""
        entry = self.data["stages"].setdefault(name, {})
        entry.update(status="interrupted", signal=signal_name)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
