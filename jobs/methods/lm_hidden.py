"""The `lm_hidden` representation (RDS+, Ivison et al. 2025): a causal LM's own position-weighted
final hidden states (`engine.hidden`), by default the model the fine-tune stage trains.

    features/<side>/hidden-<key>/<part digest>/rows-A-B.parquet
                            `vector` (hidden size, float32, unit norm) of rows [A, B) of the part,
                            committed chunk by chunk by an actor pool (one GPU per actor where the
                            cluster has GPUs): a killed pass recomputes only the chunks in flight

`<key>` digests what the vectors depend on: the model (its folder and the size and modification
time of its files), the token length, the precision and the rendering; never the run's seed, the
targets, the selector or the budget, so every selector, seed, budget and target set reuses the
pool's vectors. The driver holds one small row per chunk; at 100M rows the run folder holds
100M x hidden size x 4 bytes (SmolLM2-135M: 576 -> 230 GB), read back by the selectors' tasks and
shards part by part.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysift.actors.features import HiddenStates
from raysift.actors.pool import map_actors
from raysift.engine.render import render
from raysift.jobs.config import Config, InputSpec, LmHiddenConfig
from raysift.jobs.core.console import progress
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import Pool, Vectors, drop_stale_parts, missing_chunks, plan_chunks
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.finetune import check_model
from raysift.jobs.methods.base import Context, Representation, cluster_cpus, cluster_gpus
from raysift.jobs.runtime import start_ray
from raysift.jobs.vectors import resolve_threads

RENDERING = "render/1"  # how a row becomes tokens (engine.render: template, end token); in the key


def settings(cfg: Config) -> dict:
    o = cfg.select.lm_hidden
    return {"model": o.model or cfg.finetune.model,
            "max_length": o.max_length or cfg.finetune.max_length,
            "precision": o.precision, "rendering": RENDERING}  # fmt: skip


def field_of(cfg: Config) -> str:
    return "select.lm_hidden.model" if cfg.select.lm_hidden.model else "finetune.model"


def model_folder(cfg: Config) -> Path:
    """The model's local folder, which must hold a causal LM (one line naming the field else)."""
    name, field = settings(cfg)["model"], field_of(cfg)
    path = check_model(name, field)
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise InputError(
            f"{field}: {name!r} is not a causal language model (its config.json names "
            f"{architectures or 'no architecture'}); lm_hidden needs one, e.g. the model the "
            "fine-tune trains"
        )
    return path


def checks(cfg: Config) -> None:
    model_folder(cfg)


def key(cfg: Config) -> str:
    """What the vectors depend on, digested: the model's files, the token length, the
    precision, the rendering."""
    folder = model_folder(cfg)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.iterdir() if p.is_file())  # fmt: skip
    wanted = {**settings(cfg), "folder": str(folder.resolve()), "files": files}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]


def prepare(ctx: Context) -> tuple[Pool, Pool, dict]:
    """Every row of both sides with its hidden-state vector (the missing chunks computed on an
    actor pool); the pools reading them."""
    cfg, o = ctx.cfg, ctx.cfg.select.lm_hidden
    start_ray(cfg.ray)
    digest = key(cfg)
    sides = (ctx.pool, ctx.targets)
    roots = {p.side: RunFolder.features(p.side, f"hidden-{digest}") for p in sides}
    for p in sides:
        drop_stale_parts(p, roots[p.side])
    items = [i for p in sides for i in plan_chunks(p, o.chunk_rows)]
    todo = missing_chunks(items, roots)
    info = {"key": digest, "chunks": len(items), "chunks_computed": 0,
            "chunks_reused": len(items) - len(todo), "rows_computed": 0,
            "model": settings(cfg)["model"]}  # fmt: skip
    if todo:
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
        actors = o.num_actors or max(1, int(cluster_cpus() // o.cpus_per_actor))
        threads = resolve_threads(
            cfg.embed.model_copy(update={"num_actors": actors, "torch_threads": None}), gpus
        )
        s = settings(cfg)
        args = {"roots": roots, "model": str(model_folder(cfg)), "max_length": s["max_length"],
                "batch_size": o.batch_size, "precision": o.precision,
                "torch_threads": threads}  # fmt: skip
        rows = sum(i["b"] - i["a"] for i in todo)
        t0 = time.perf_counter()
        with progress("lm_hidden", rows, "rows") as shown:
            # where the actors ran, and when each node's first and last chunk landed (s into
            # the pass): an autoscaled cluster grows during it
            nodes: dict[str, dict] = {}
            for r in map_actors(HiddenStates, args, todo, min(actors, len(todo)),
                                num_cpus=o.cpus_per_actor, num_gpus=gpus):  # fmt: skip
                info["chunks_computed"] += 1
                at = round(time.perf_counter() - t0, 1)
                node = nodes.setdefault(r["node"][-12:], {"chunks": 0, "first_s": at})
                node.update(chunks=node["chunks"] + 1, last_s=at)
                shown.advance(r["rows"])
            info["chunks_per_node"] = nodes
        info.update(rows_computed=rows, seconds_computing=round(time.perf_counter() - t0, 1),
                    actors=min(actors, len(todo)), gpus_per_actor=gpus)  # fmt: skip
    return (ctx.pool.with_vectors(Vectors(roots["candidates"])),
            ctx.targets.with_vectors(Vectors(roots["targets"])), info)  # fmt: skip


def local_rows(table: pa.Table, spec: InputSpec) -> list:
    """An in-memory side's rows as `engine.render` takes them: its text column (raysift.select
    takes plain texts in process; chats go through ingest, on Ray)."""
    return table.column(spec.text_column).to_pylist()


_LOADED: dict = {}  # the last model loaded in this process, for raysift.select


def local(cfg: Config, candidates: pa.Table, targets: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' hidden-state vectors in this process (raysift.select on a pool in memory)."""
    from raysift.engine import hidden, lm
    from raysift.engine.embed import pick_device

    s, o = settings(cfg), cfg.select.lm_hidden
    folder = str(model_folder(cfg))
    if _LOADED.get("folder") != folder:
        _LOADED.update(folder=folder, model=lm.load_lm(folder, pick_device(None)))
    model, tok = _LOADED["model"]
    out = []
    for table, spec in ((candidates, cfg.candidates), (targets, cfg.targets)):
        examples = [render(tok, r, s["max_length"]) for r in local_rows(table, spec)]
        out.append(hidden.represent(model, examples, tok.pad_token_id, batch_size=o.batch_size,
                                    precision=o.precision))  # fmt: skip
    return out[0], out[1]


REPRESENTATION = Representation(
    name="lm_hidden",
    summary="the causal LM's position-weighted final hidden states (RDS+; finetune.model)",
    prepare=prepare,
    similarity="cosine of the causal LM's pooled hidden states (RDS+)",
    options=LmHiddenConfig,
    local=local,
    checks=checks,
)
