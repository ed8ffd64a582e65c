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
