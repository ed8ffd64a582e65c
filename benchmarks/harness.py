"""What the benchmark scripts share: paths, the synthetic data, child-process and actor timing."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def ensure_synth(data: Path, n: int, m: int, d: int = 384) -> None:
    """candidates.npy / query_examples.npy in `data`, from ../shared/tools/tsds_synth.py (seeded)
    unless already there."""
    if not (data / "candidates.npy").is_file():
        tool = SHARED / "tools" / "tsds_synth.py"
        subprocess.run([sys.executable, tool, str(n), str(m), str(d), data], check=True)


def timed(cmd: list[str], cwd: Path = ROOT) -> tuple[float, float, float]:
    """(user CPU s, wall s, max RSS GB) of a child process, under /usr/bin/time."""
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%U %e %M", *map(str, cmd)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    user, wall, rss_kb = out.stderr.strip().splitlines()[-1].split()
    return float(user), float(wall), int(rss_kb) / 1e6


class Poller:
    """A daemon thread that calls `sample()` every `interval` seconds while the block runs, and
    once more at its end."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def payload_bytes(value) -> int:
    """What a value weighs on the wire: its pickle-5 frame plus its out-of-band buffers (numpy
    and arrow buffers are counted without being copied)."""
    from ray import cloudpickle  # what Ray itself serialises with (closures included)

    buffers: list = []
    frame = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return len(frame) + sum(b.raw().nbytes for b in buffers)


class DriverBytes:
    """Counts the bytes of every value `ray.get` returns (and `ray.put` sends) in this process:
    what the driver received from (sent to) the cluster."""

    def __enter__(self):
        import ray

        self.bytes, self.sent, self.gets, self.puts = 0, 0, 0, 0
        self._get, self._put = ray.get, ray.put

        def get(refs, *args, **kwargs):
            out = self._get(refs, *args, **kwargs)
            self.bytes += payload_bytes(out)
            self.gets += 1
            return out

        def put(value, *args, **kwargs):
            self.sent += payload_bytes(value)
            self.puts += 1
            return self._put(value, *args, **kwargs)

        ray.get, ray.put = get, put
        return self

    def __exit__(self, *exc):
        import ray

        ray.get, ray.put = self._get, self._put


def peak_rss_gb() -> float:
    """This process's peak RSS."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def actor_peak_rss_gb(actor) -> float:
    """A Ray actor process's peak RSS."""
    import ray

    # the lambda runs in the actor, where this module is not importable: stdlib only
    usage = resource.getrusage
    return ray.get(
        actor.__ray_call__.remote(lambda self: usage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    )


def stored_pool(folder: Path, candidates, targets, address: str | None = None):
    """(candidates Pool, targets Pool): the arrays ingested into a run folder in `folder`, vectors
    given as they are (the real ingest and embed stages), so shard actors load their own rows."""
    from raysift.jobs.config import validate
    from raysift.jobs.core.pool import load_pool
    from raysift.jobs.core.storage import Store
    from raysift.jobs.pipeline import run
    from raysift.jobs.stages.ingest import write_vector_inputs

    pool, targets_path = write_vector_inputs(folder, candidates, targets)
    cfg = validate({
        "output_dir": str(folder / "run"),
        "candidates": {"path": str(pool), "vector_column": "vector"},
        "targets": {"path": str(targets_path), "vector_column": "vector"},
        "embed": {"normalize": False},
        "ray": {"address": address},
    })  # fmt: skip
    run(cfg, ["ingest", "embed"], log=lambda _: None)
    store = Store.local(folder / "run")
    return load_pool(store, "candidates"), load_pool(store, "targets")


def share_pool_features(here: Path, others: list[Path]) -> None:
    """LESS's warm-up and pool features and the pool's lm_hidden vectors depend on the pool, not
    the target: copy them into run folder `here` from another target's run folder on the same
    pool that has them (its select then computes only the target's own)."""
    import shutil

    for there in others:
        if there == here or not there.is_dir():
            continue
        if (there / "less" / "warmup" / "finetune" / "result.json").is_file() and not (
                here / "less").exists():  # fmt: skip
            shutil.copytree(there / "less", here / "less")
        for feats in [*(there / "features" / "candidates").glob("less-*"),
                      *(there / "features" / "candidates").glob("hidden-*")]:  # fmt: skip
            if not (here / "features" / "candidates" / feats.name).exists():
                shutil.copytree(feats, here / "features" / "candidates" / feats.name)
