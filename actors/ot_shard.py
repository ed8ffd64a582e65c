"""Sinkhorn candidate shards as Ray actors, and a fan-out that survives a shard dying.

`start_ot_shards` starts one `engine.sinkhorn.SinkhornShard` actor per row range of the pool
(`b = 1/N_total` on every shard), restartable once each. `ResilientFanout` is the coordinator's
`fanout(method, f, ...)`: when a call finds its actor dead, it waits for Ray to restart the actor
(which re-runs the constructor from the rows kept in the object store), warm-starts it from the
coordinator's current f (`SinkhornShard.warm_start`: g = the soft c-transform of f), repeats the
call, and records the recovery. Nothing else is lost: f lives in the coordinator.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from engine.knn import shard_bounds
from engine.sinkhorn import SinkhornShard


def start_ot_shards(
    candidates: np.ndarray,
    targets: np.ndarray,
    shards: int,
    *,
    epsilon: float,
    cpus_per_shard: float,
    use_gpu: bool = False,
    cache_bytes: int = 1 << 30,
    block: int = 65536,
) -> tuple[list, list]:
    """Start the shard actors; returns (actors, their rows' object refs). Keep the refs alive
    while the actors run: a restart re-reads its rows from them."""
    remote = ray.remote(SinkhornShard).options(
        num_cpus=0 if use_gpu else cpus_per_shard,
        num_gpus=1 if use_gpu else 0,
        max_restarts=1,
    )
    targets_ref = ray.put(np.ascontiguousarray(targets, np.float32))
    bounds = shard_bounds(len(candidates), shards)
    refs = [ray.put(np.ascontiguousarray(candidates[a:b], np.float32)) for a, b in bounds]
    actors = [
        remote.remote(
            ref,
            targets_ref,
            n_total=len(candidates),
            epsilon=epsilon,
            offset=a,
            cache_bytes=cache_bytes,
            block=block,
            device="cuda" if use_gpu else "cpu",
        )
        for ref, (a, _) in zip(refs, bounds, strict=True)
    ]
    ray.get([actor.__len__.remote() for actor in actors])
    return actors, [targets_ref, *refs]


class ResilientFanout:
    """`fanout(method, *args)` over shard actors; a dead shard is restarted and warm-started from
    the last f the coordinator sent (the first argument of its `rows` and `columns` passes)."""

    def __init__(self, actors: list, timeout_s: float = 120.0) -> None:
        self.actors = actors
        self.timeout_s = timeout_s
        self.recoveries: list[dict] = []
        self.f: np.ndarray | None = None

    def __call__(self, method: str, *args):
        if method in ("rows", "columns"):
            self.f = args[0]
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        out = []
        for k, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except (RayActorError, ActorUnavailableError) as exc:
                self._recover(k, self.f, exc)
                out.append(ray.get(getattr(self.actors[k], method).remote(*args)))
        return out

    def _recover(self, k: int, f, exc: Exception) -> None:
        t0 = time.time()
        while True:  # the restarted actor answers once its constructor has run again
            try:
                if f is not None:
                    ray.get(self.actors[k].warm_start.remote(f))
                else:
                    ray.get(self.actors[k].__len__.remote())
                break
            except (RayActorError, ActorUnavailableError):
                if time.time() - t0 > self.timeout_s:
                    raise
                time.sleep(0.5)
        self.recoveries.append(
            {"shard": k, "error": type(exc).__name__, "seconds": round(time.time() - t0, 2)}
        )


def stop_ot_shards(actors: list) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
