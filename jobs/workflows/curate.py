"""`raysift curate CONFIG`: scheduled, incremental curation of a pool folder that grows.

Each run compares the pool's files (path, size, mtime) with the last version's; with nothing new
(same files, same targets, same config) it writes nothing and says so. Otherwise:

    ingest   only the new files, appended after the pool's rows (old rows keep their numbers;
             a changed or removed file means the whole folder is ingested again)
    embed    only the new parts (the others keep their committed chunks)
    select   the configured method on the union, from per-part tasks and shard actors;
             GOT-D with curate.gotd: c_transform and unchanged targets: only the new rows are
             scored, by tasks on the new parts, against the stored target potential f (the soft
             c-transform, no Sinkhorn), and merged with the previous version's ranking
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
import pyarrow.parquet as pq

from raysift.actors.partitions import map_parts, merge_ranked
from raysift.engine.gotd import select as gotd_select
from raysift.engine.selection import Ranked, Selection
from raysift.engine.sinkhorn import SinkhornShard, c_transform
from raysift.jobs.config import Config, result_settings
from raysift.jobs.core.pool import Part, Pool, load_pool, read_vector_range, read_vectors
from raysift.jobs.core.runfolder import Manifest, RunFolder, atomic_path, write_json
from raysift.jobs.core.runlock import writes_run_folder
from raysift.jobs.core.storage import Store, open_run
from raysift.jobs.stages.ingest import check_input, fingerprint
from raysift.jobs.vectors import SIDES

LATEST = "latest.json"


def _config_key(cfg: Config) -> str:
    """What decides the selection besides the data: every field but paths of the run itself
    and the execution-only settings (fields marked `execution_only` in `jobs.config`)."""
    tree = result_settings(cfg.model_dump(mode="json"))
    for key in ("output_dir", "stages", "evaluate", "finetune"):
        tree.pop(key, None)
    return hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _inputs(cfg: Config) -> dict:
    return {side: fingerprint(check_input(getattr(cfg, side), side)) for side in SIDES}


def _read_latest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / LATEST).read_text())
    except (OSError, ValueError):
        return None


def _ids(path: Path) -> np.ndarray:
    col = pq.read_table(path, columns=["id"]).column("id")
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)


def ctransform_part(
    pool: Pool, part: Part, targets: np.ndarray, f: np.ndarray, eps: float, since: int, k: int
) -> Ranked:
    """A task: the g of the part's rows from `since` on, by the soft c-transform of f; its k
    smallest, ties by row."""
    a = max(0, since - part.first)
    shard = SinkhornShard(read_vectors(pool, part, a), targets, n_total=pool.n, epsilon=eps)
    g = c_transform(shard, f).astype(np.float64)
    rows = part.first + a + np.arange(len(g))
    return Ranked(-g, rows, rows, g).top(k)


def _incremental_gotd(cfg: Config, run_dir: Path, pool: Pool, targets: Pool, previous: Path,
                      n_prev: int) -> Selection:  # fmt: skip
    """New rows' g by the c-transform of the stored f (tasks on the new parts only); old rows
    keep their g (shifted for the larger pool: g carries eps log(1/N)); the budget smallest of
    both, ties by row."""
    from raysift.jobs.stages.select import GOTD_POTENTIAL

    eps, n, budget = cfg.select.gotd.epsilon, pool.n, cfg.select.budget
    f = pq.read_table(run_dir / GOTD_POTENTIAL).column("f").to_numpy()
    prev = pq.read_table(previous / RunFolder.SELECTION, columns=["row", "score"])
    # score = -(1 + 1/N) g  (engine.gotd.select)
    g_prev = -prev.column("score").to_numpy() / (1 + 1 / n_prev) - eps * np.log(n / n_prev)
    old_rows = prev.column("row").to_numpy()
    old = Ranked(-g_prev, old_rows, old_rows, g_prev)
    new = pool.only(pool.overlapping(n_prev, n))
    refs = map_parts(ctransform_part, new, read_vector_range(targets, 0, targets.n), f, eps,
                     n_prev, budget)  # fmt: skip
    best = Ranked.merge([old, merge_ranked(refs, budget)], budget)
    sel = gotd_select(best.score, best.row, budget, n)
    sel.potential = f
    sel.info = {"incremental": "c_transform", "new_rows_scored": int(n - n_prev),
                "parts_read": len(new.parts)}  # fmt: skip
    return sel


@writes_run_folder
def run_curate(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """One scheduled curation run; returns what it did (also in curate/vNNNN/info.json)."""
    from raysift.jobs.methods import Context
    from raysift.jobs.pipeline import run
    from raysift.jobs.stages.select import (
        GOTD_POTENTIAL,
        needs_embed_stage,
        run_select,
        write_selection,
    )

    inputs = _inputs(cfg)  # the input checks come first: a bad path writes nothing
    key = _config_key(cfg)
    run_dir, _ = open_run(cfg.output_dir)  # the remote mirror, when output_dir is a URI
    folder = run_dir / RunFolder.CURATE
    latest = _read_latest(folder)
    if latest and latest["inputs"] == inputs and latest["config"] == key:
        log(f"curate: nothing new since v{latest['version']:04d}")
        return {"version": latest["version"], "new_version": False}
    run(cfg, ["ingest", "embed"] if needs_embed_stage(cfg) else ["ingest"], log,
        append=True)  # fmt: skip
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"), cfg.seed)
    ingested = manifest.stage("ingest").get("candidates", {})
    embedded = {side: manifest.stage("embed").get(side, {}) for side in SIDES}
    store = Store.for_run(run_dir)
    pool, targets = load_pool(store, "candidates"), load_pool(store, "targets")
    version = (latest["version"] + 1) if latest else 1
    previous = folder / f"v{latest['version']:04d}" if latest else None
    n_prev = pool.n - ingested.get("rows_added", pool.n) if ingested.get("appended") else None
    incremental = (
        cfg.select.method == "gotd"
        and cfg.curate.gotd == "c_transform"
        and needs_embed_stage(cfg)  # f was solved against the embed stage's vectors
        and latest is not None
        and latest["config"] == key
        and latest["inputs"]["targets"] == inputs["targets"]
        and latest.get("pool") == n_prev
        and (run_dir / GOTD_POTENTIAL).is_file()
        and previous is not None
        and "row" in pq.read_schema(previous / RunFolder.SELECTION).names
    )
    t0 = manifest.start("select")
    if incremental:
        assert previous is not None and n_prev is not None  # `incremental` checked both
        log(f"select: gotd, new rows by the c-transform of the stored f (v{version:04d})")
        sel = _incremental_gotd(cfg, run_dir, pool, targets, previous, n_prev)
        info = write_selection(Context(cfg, pool, targets, run_dir, store, log), sel)
    else:
        log(f"select: {cfg.select.method} on the whole pool (v{version:04d})")
        info = run_select(cfg, run_dir, log=log)
    manifest.finish("select", t0, **info)

    chosen = _ids(run_dir / RunFolder.SELECTION)
    before = _ids(previous / RunFolder.SELECTION) if previous else np.array([], str)
    old_entries = latest["inputs"]["candidates"] if latest else []
    old_files = {f[0] for f in old_entries}
    summary = {
        "version": version,
        "new_version": True,
        "new_files": sorted(f[0] for f in inputs["candidates"] if f[0] not in old_files),
        "changed_files": sorted(
            f[0] for f in inputs["candidates"] if f[0] in old_files and f not in old_entries
        ),
        "pool": pool.n,
        "rows_added": int(ingested.get("rows_added", pool.n)),
        "appended": bool(ingested.get("appended")),
        "files_read": ingested.get("files_read"),
        "parts_written": ingested.get("parts_written"),
        "rows_embedded": {side: e.get("rows_embedded", 0) for side, e in embedded.items()},
        "chunks_embedded": {side: e.get("chunks_embedded", 0) for side, e in embedded.items()},
        "select": {
            "method": cfg.select.method,
            "incremental": bool(incremental),
            **({"parts_read": info["parts_read"]} if incremental else {}),
        },  # fmt: skip
    }
    diff: dict = {
        "previous": latest["version"] if latest else None,
        "added": sorted(set(chosen) - set(before)),
        "removed": sorted(set(before) - set(chosen)),
        "kept": int(len(set(chosen) & set(before))),
    }
    with atomic_path(folder / f"v{version:04d}") as tmp:
        tmp.mkdir(parents=True)
        for name in (RunFolder.SELECTION, RunFolder.SELECTED):
            shutil.copy2(run_dir / name, tmp / name)
        (tmp / "diff.json").write_text(json.dumps(diff, indent=2) + "\n")
        (tmp / "info.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_json(folder / LATEST, {"version": version, "inputs": inputs, "config": key,
                                 "pool": pool.n})  # fmt: skip
    log(
        f"curate: v{version:04d}: {summary['rows_added']} new rows "
        f"({summary['rows_embedded']['candidates']} embedded), {len(diff['added'])} selected "
        f"rows in, {len(diff['removed'])} out"
    )
    return summary
