"""`raysift curate CONFIG`: scheduled, incremental curation of a pool folder that grows.

Each run compares the pool's files (path, size, mtime) with the last version's; with nothing new
(same files, same targets, same config) it writes nothing and says so. Otherwise:

    ingest   the whole folder again (cheap: text only)        -> data/candidates.parquet
    embed    only rows without a committed vector (by id)     -> embeddings/ (+ new shards)
    select   the configured method on the union               -> selection.parquet
             GOT-D with curate.gotd: c_transform and unchanged targets: the new rows are scored
             against the stored target potential f (the soft c-transform, no Sinkhorn), merged
             with the previous version's ranking; every other method is recomputed on the union
             (TSDS's FAISS shards are rebuilt from the stored vectors: flat shards are exact)
    version  curate/vNNNN/{selection.parquet, selected.jsonl, diff.json, info.json}, then
             curate/latest.json (the commit point: a run killed before it leaves no version)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.gotd import select as gotd_select
from engine.selection import Selection
from engine.sinkhorn import SinkhornShard, c_transform
from jobs.config import Config
from jobs.embed import SIDES
from jobs.ingest import fingerprint, input_files
from jobs.runfolder import Manifest, atomic_path, write_json
from jobs.storage import open_run

LATEST = "latest.json"


def _config_key(cfg: Config) -> str:
    """What decides the selection besides the data: every field but paths of the run itself."""
    tree = cfg.model_dump(mode="json")
    for key in ("output_dir", "stages", "ray", "evaluate", "finetune"):
        tree.pop(key, None)
    return hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _inputs(cfg: Config) -> dict:
    out = {}
    for side in SIDES:
        _, files = input_files(getattr(cfg, side), side)
        out[side] = fingerprint(files)
    return out


def _read_latest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / LATEST).read_text())
    except (OSError, ValueError):
        return None


def _ids(path: Path) -> np.ndarray:
    col = pq.read_table(path, columns=["id"]).column("id")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)


def _incremental_gotd(
    cfg: Config, run_dir: Path, ids: np.ndarray, previous: Path, prev_pool: np.ndarray
) -> Selection:
    """New rows' g by the c-transform of the stored f; old rows keep their g (shifted for the
    larger pool: g carries eps log(1/N)); the budget smallest of both, ties by row. `ids`: the
    pool now, `prev_pool`: the previous version's."""
    from jobs.select import GOTD_POTENTIAL, aligned_vectors

    eps = cfg.select.gotd.epsilon
    n, n_prev = len(ids), len(prev_pool)
    stored = pq.read_table(run_dir / GOTD_POTENTIAL)
    f = stored.column("f").to_numpy()
    target_ids = np.asarray(stored.column("id").to_numpy(zero_copy_only=False), str)
    targets = aligned_vectors(run_dir, "targets", target_ids)
    prev = pq.read_table(previous / "selection.parquet", columns=["id", "score"])
    prev_ids = np.asarray(prev.column("id").to_numpy(zero_copy_only=False), str)
    # score = -(1 + 1/N) g  (engine.gotd.select)
    g_prev = -prev.column("score").to_numpy() / (1 + 1 / n_prev) - eps * np.log(n / n_prev)
    pos = {k: i for i, k in enumerate(ids)}
    prev_rows = np.array([pos[k] for k in prev_ids], np.int64)
    new_rows = np.flatnonzero(~np.isin(ids, prev_pool))
    shard = SinkhornShard(
        aligned_vectors(run_dir, "candidates", ids[new_rows]), targets, n_total=n, epsilon=eps
    )
    g_new = c_transform(shard, f).astype(np.float64)
    g = np.concatenate([g_prev, g_new])
    rows = np.concatenate([prev_rows, new_rows])
    order = np.lexsort((rows, g))[: cfg.select.budget]
    sel = gotd_select(g[order], rows[order], cfg.select.budget, n)
    sel.potential = f
    sel.info = {"incremental": "c_transform", "new_rows_scored": int(len(new_rows))}
    return sel


def run_curate(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """One scheduled curation run; returns what it did (also in curate/vNNNN/info.json)."""
    from jobs.pipeline import run
    from jobs.select import GOTD_POTENTIAL, run_select, write_selection

    inputs = _inputs(cfg)  # the input checks come first: a bad path writes nothing
    key = _config_key(cfg)
    run_dir, _ = open_run(cfg.output_dir)  # the remote mirror, when output_dir is a URI
    folder = run_dir / "curate"
    latest = _read_latest(folder)
    if latest and latest["inputs"] == inputs and latest["config"] == key:
        log(f"curate: nothing new since v{latest['version']:04d}")
        return {"version": latest["version"], "new_version": False}
    run(cfg, ["ingest", "embed"], log)
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"), cfg.seed)
    embedded = {
        side: manifest.stage("embed").get(side, {}).get("rows_embedded", 0) for side in SIDES
    }
    version = (latest["version"] + 1) if latest else 1
    previous = folder / f"v{latest['version']:04d}" if latest else None
    pool_ids = _ids(run_dir / "data" / "candidates.parquet")
    prev_pool = _ids(previous / "pool_ids.parquet") if previous else np.array([], str)
    incremental = (
        cfg.select.method == "gotd"
        and cfg.curate.gotd == "c_transform"
        and latest is not None
        and latest["config"] == key
        and latest["inputs"]["targets"] == inputs["targets"]
        and (run_dir / GOTD_POTENTIAL).is_file()
    )
    t0 = manifest.start("select")
    if incremental:
        log(f"select: gotd, new rows by the c-transform of the stored f (v{version:04d})")
        data = pq.read_table(run_dir / "data" / "candidates.parquet")
        sel = _incremental_gotd(cfg, run_dir, pool_ids, previous, prev_pool)
        info = write_selection(cfg, run_dir, sel, data)
    else:
        log(f"select: {cfg.select.method} on the whole pool (v{version:04d})")
        info = run_select(cfg, run_dir)
    manifest.finish("select", t0, **info)

    chosen = _ids(run_dir / "selection.parquet")
    before = _ids(previous / "selection.parquet") if previous else np.array([], str)
    old_entries = latest["inputs"]["candidates"] if latest else []
    old_files = {f[0] for f in old_entries}
    summary = {
        "version": version,
        "new_version": True,
        "new_files": sorted(f[0] for f in inputs["candidates"] if f[0] not in old_files),
        "changed_files": sorted(
            f[0] for f in inputs["candidates"] if f[0] in old_files and f not in old_entries
        ),
        "pool": int(len(pool_ids)),
        "rows_added": int(np.count_nonzero(~np.isin(pool_ids, prev_pool))),
        "rows_embedded": embedded,
        "select": {"method": cfg.select.method, "incremental": bool(incremental)},
    }
    diff = {
        "previous": latest["version"] if latest else None,
        "added": sorted(set(chosen) - set(before)),
        "removed": sorted(set(before) - set(chosen)),
        "kept": int(len(set(chosen) & set(before))),
    }
    with atomic_path(folder / f"v{version:04d}") as tmp:
        tmp.mkdir(parents=True)
        for name in ("selection.parquet", "selected.jsonl"):
            shutil.copy2(run_dir / name, tmp / name)
        pq.write_table(pa.table({"id": pa.array(pool_ids)}), tmp / "pool_ids.parquet")
        (tmp / "diff.json").write_text(json.dumps(diff, indent=2) + "\n")
        (tmp / "info.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_json(
        folder / LATEST,
        {"version": version, "inputs": inputs, "config": key, "pool": int(len(pool_ids))},
    )
    log(
        f"curate: v{version:04d}: {summary['rows_added']} new rows ({embedded['candidates']} "
        f"embedded), {len(diff['added'])} selected rows in, {len(diff['removed'])} out"
    )
    return summary
