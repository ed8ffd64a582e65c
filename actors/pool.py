"""A pool of stateful actors over a list of work items, without Ray Data.

`map_actors(cls, kwargs, items, ...)` starts up to `size` actors, each building `cls(**kwargs)`
once (a model load), and gives every item to one of them as soon as that actor is free; results
come back as they finish, in any order (callers merge them order-free). Why not Ray Data's
`ActorPoolStrategy`: it puts the actor's constructor in the object store and restarts actors, a
pairing Ray logs at error level on every healthy run; here the constructor arguments (a store
handle, a model name, settings) travel inline, and a restarted actor is built from them again.

An actor is given work only once it is up: on a cluster that cannot place all `size` actors (or
is still scaling up), the ones that never start hold no item, so the pool cannot deadlock on them.
A call that dies with its actor (the actor crashed, its node died) goes back in the queue and a
new actor takes the dead one's place; an item that has failed `retries` times fails the map.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class _Host:
    """The actor: one `cls(**kwargs)`, called once per item."""

    def __init__(self, cls: type, kwargs: dict) -> None:
        self.fn = cls(**kwargs)

    def ready(self) -> bool:
        return True

    def call(self, item: Any) -> Any:
        return self.fn(item)


def map_actors(
    cls: type,
    kwargs: dict,
    items: Iterable[Any],
    size: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    retries: int = 3,
) -> Iterator[Any]:
    """Yield `cls(**kwargs)(item)` for every item, computed on up to `size` actors."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    dead = (RayActorError, ActorUnavailableError)
    queue = list(enumerate(items))[::-1]  # pop() from the end: items start in the given order
    if not queue:
        return
    host = ray.remote(_Host).options(num_cpus=num_cpus, num_gpus=num_gpus)
    actors: list = []
    starting: dict = {}
    working: dict = {}  # call -> (actor, (index, item))
    failed: dict[int, int] = {}

    def start() -> None:
        actor = host.remote(cls, kwargs)
        actors.append(actor)
        starting[actor.ready.remote()] = actor

    for _ in range(max(1, min(size, len(queue)))):
        start()
    try:
        while working or (queue and starting):
            done, _ = ray.wait([*working, *starting], num_returns=1)
            ref = done[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)  # a constructor that raised (bad settings) raises here
                except dead:  # the node went away before the actor was up: another one
                    start()
                    continue
            else:
                actor, (index, item) = working.pop(ref)
                try:
                    result = ray.get(ref)
                except dead:
                    failed[index] = failed.get(index, 0) + 1
                    if failed[index] > retries:
                        raise
                    queue.append((index, item))  # next in line, on another actor
                    ray.kill(actor)
                    start()
                    continue
                yield result
            if queue:
                entry = queue.pop()
                working[actor.call.remote(entry[1])] = (actor, entry)
    finally:
        for actor in actors:
            ray.kill(actor)
