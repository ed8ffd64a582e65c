"""A coordinator's `fanout(method, *args)` over shard actors that survives a shard dying.

Shard actors load their rows from the run folder in their constructor, so Ray can restart one
(`max_restarts`) on any node -- a reclaimed spot worker, an OOM kill -- and it comes back with the
same rows. When a call finds its actor dead, the fan-out waits for the restarted actor to answer,
replays on it the state-changing calls made so far (`replay`: for GOT-D's shards the column and
row passes, whose arguments are the coordinator's f -- O(iterations x M), never O(N)), so the
shard's state is rebuilt bit for bit, repeats the call and records the recovery. Large array
arguments are put in the object store once per call, not once per shard.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

DEAD = (RayActorError, ActorUnavailableError)
RESTARTS = 3  # times Ray restarts a shard actor before the selection fails


class ResilientFanout:
    def __init__(
        self, actors: list, replay: frozenset[str] = frozenset(), timeout_s: float = 300.0
    ) -> None:
        self.actors = actors
        self.replay = replay
        self.timeout_s = timeout_s
        self.recoveries: list[dict] = []
        self.history: list[tuple[str, tuple]] = []  # the state-changing calls, in order

    def __call__(self, method: str, *args) -> list:
        refs = [ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 1 << 20 else a for a in args]
        pending = [getattr(actor, method).remote(*refs) for actor in self.actors]
        out = []
        for k, ref in enumerate(pending):
            try:
                out.append(ray.get(ref))
            except DEAD as exc:
                self._recover(k, exc)
                out.append(ray.get(getattr(self.actors[k], method).remote(*refs)))
        if method in self.replay:
            self.history.append((method, tuple(refs)))
        return out

    def _recover(self, k: int, exc: Exception) -> None:
        t0 = time.time()
        actor = self.actors[k]
        while True:  # the restarted actor answers once its constructor has reloaded its rows
            try:
                ray.get(actor.__len__.remote())
                for method, args in self.history:  # rebuild its state, call by call
                    ray.get(getattr(actor, method).remote(*args))
                break
            except DEAD:
                if time.time() - t0 > self.timeout_s:
                    raise
                time.sleep(0.5)
        self.recoveries.append(
            {"shard": k, "error": type(exc).__name__, "replayed": len(self.history),
             "seconds": round(time.time() - t0, 2)}
        )  # fmt: skip


def stop(actors: list) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
