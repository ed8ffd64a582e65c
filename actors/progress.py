"""Progress from inside Ray workers to the driver's console.

`Sink` is a tiny actor (no CPU) that keeps the latest update a worker `put` (a step, a loss); the
driver's `watch` polls it from a thread and shows it with `jobs.console.Progress`. Fire-and-forget
on the worker side: a put costs one small message, never a wait.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class Sink:
    def __init__(self) -> None:
        self.latest: dict | None = None

    def put(self, update: dict) -> None:
        self.latest = update

    def get(self) -> dict | None:
        return self.latest


@contextlib.contextmanager
def watch(label: str, total: int, unit: str, every: float = 0.5) -> Iterator:
    """A Sink for the workers, shown as `label` progress while the block runs: an update's
    `done` is the count, its other keys are shown."""
    import ray

    from raysift.jobs.core.console import progress

    sink = ray.remote(num_cpus=0)(Sink).remote()
    stop = threading.Event()
    shown: list = []  # the Progress, made at the first update: its clock (lines, rate, ETA)
    # starts with the work, not with the workers' start-up or what a resumed run had done

    def poll() -> None:
        last = None
        while not stop.wait(every):
            try:
                update = ray.get(sink.get.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress is best-effort, never the run's failure
                continue
            if not update or update == last:
                continue
            if not shown:
                shown.append(progress(label, total, unit, start=update["done"]))
            last = update
            fields = {k: v for k, v in update.items() if k != "done"}
            shown[0].update(update["done"], **fields)

    thread = threading.Thread(target=poll, name=f"raysift-progress-{label}", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(timeout=5)
        if shown:
            shown[0].close()
        ray.kill(sink)
