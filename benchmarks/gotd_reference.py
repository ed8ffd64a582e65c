"""GOT-D's OT step: raysift's Sinkhorn against ott-jax 0.4.4 itself, same data, same settings.

ott-jax is never a raysift dependency: pass `--ott-python` pointing at a separate environment with
`pip install "ott-jax==0.4.4" "jax==0.4.23" "jaxlib==0.4.23" "numpy<2"`. The ott run is the
reference configuration (PointCloud with batch_size 2000, eps 0.1, Sinkhorn with momentum 1.3
from the first iteration, inner_iterations 1, threshold 0.1, float32); its settings are checked
first against the golden fixture (`ott044_official.npz`: same g to 1e-6).

Both run as child processes under `/usr/bin/time` (wall, max RSS), one after the other, on the same
candidates (`tsds_synth.py 200000 500 384`: 200k x 384 unit-norm, 500 targets). Compared: wall
time, peak memory, iterations, max |g - g_ott| and the overlap of the top 1% / 5% / 10%.

    python benchmarks/gotd_reference.py --data DIR --ott-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import SHARED, ensure_synth, timed

OTT = """
import sys, numpy as np, jax, jax.numpy as jnp
from ott.geometry import pointcloud
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn, acceleration
X, Y = np.load(sys.argv[1]), np.load(sys.argv[2])
geom = pointcloud.PointCloud(jnp.asarray(Y), jnp.asarray(X), epsilon=0.1, batch_size=2000)
m, n = len(Y), len(X)
prob = linear_problem.LinearProblem(geom, jnp.full(m, 1 / m), jnp.full(n, 1 / n))
solver = sinkhorn.Sinkhorn(threshold=float(sys.argv[4]), max_iterations=2000, inner_iterations=1,
                           momentum=acceleration.Momentum(start=0, value=1.3))
out = solver(prob)
errors = np.asarray(out.errors)
np.savez(sys.argv[3], f=np.asarray(out.f), g=np.asarray(out.g), n_iter=int((errors != -1).sum()))
"""


def ours(x_path: str, y_path: str, out: str, threshold: float) -> None:
    from raysift.engine.sinkhorn import solve

    r = solve(np.load(x_path), np.load(y_path), threshold=threshold)
    np.savez(out, f=r.f, g=r.g, n_iter=r.n_iter)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ott-python", required=True)
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--ours", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ours:
        return ours(*args.ours[:3], float(args.ours[3]))
    data = args.data.resolve()
    ensure_synth(data, 200_000, 500)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ott_run.py"
        script.write_text(OTT)
        # 1. the ott settings reproduce the golden fixture
        fx = np.load(SHARED / "fixtures" / "gotd" / "ott044_official.npz")
        np.save(Path(tmp) / "fx_X.npy", fx["X"])
        np.save(Path(tmp) / "fx_Y.npy", fx["Y"])
        fx_out = Path(tmp) / "fx.npz"
        cmd = [args.ott_python, script, Path(tmp) / "fx_X.npy", Path(tmp) / "fx_Y.npy", fx_out]
        subprocess.run([*map(str, cmd), "0.1"], check=True, capture_output=True)
        check = np.load(fx_out)
        print(
            f"ott settings vs fixture: max |g - g_fixture| {np.abs(check['g'] - fx['g']).max():.2e}"
        )
        # 2. the benchmark
        x, y = str(data / "candidates.npy"), str(data / "query_examples.npy")
        runs = {}
        for name in ("ott-jax 0.4.4", "raysift"):
            out = str(Path(tmp) / f"{name.split()[0]}.npz")
            if name == "raysift":
                cmd = [sys.executable, __file__, "--data", str(data), "--ott-python", "-"]
                cmd += ["--ours", x, y, out, str(args.threshold)]
            else:
                cmd = [args.ott_python, str(script), x, y, out, str(args.threshold)]
            _, wall, rss = timed(cmd)
            runs[name] = (wall, rss, np.load(out))
            print(f"{name}: wall {wall:.1f} s, max RSS {rss:.2f} GB, "
                  f"{int(runs[name][2]['n_iter'])} iterations", flush=True)  # fmt: skip
        (w0, r0, a), (w1, r1, b) = runs["ott-jax 0.4.4"], runs["raysift"]
        print(f"ratios: {w0 / w1:.2f}x less wall time, {r1 / r0:.2f}x the peak memory")
        print(f"max |g - g_ott| {np.abs(a['g'] - b['g']).max():.2e}")
        n = len(a["g"])
        for share in (0.01, 0.05, 0.1):
            k = int(share * n)
            top_a = np.argsort(a["g"], kind="stable")[:k]
            top_b = np.argsort(b["g"], kind="stable")[:k]
            print(f"top {share:.0%}: overlap {len(np.intersect1d(top_a, top_b)) / k:.4f}")


if __name__ == "__main__":
    main()
