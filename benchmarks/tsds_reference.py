"""TSDS compat mode end to end against the unmodified reference, on synth100k.

Both run as child processes, one after the other, on the same files, under `/usr/bin/time` (user
CPU seconds, max RSS):

* ours: `engine.tsds_search.select_compat` in one process (IVF index with the reference's
  parameters, kNN, lazy density over U, vectorised solver), p saved;
* the reference: `python tsds.py` in a checkout of ZifanL/TSDS (it needs numpy 1 and an old
  faiss: pass a Python that has them), given the same candidates and queries.

p is compared with the fixture's p_official (the reference's own p, captured with numpy 1.26 and
faiss 1.7.4); the reference saves only its multinomial draw, not p.

    python benchmarks/tsds_reference.py --data DIR --reference CHECKOUT --reference-python PY
    (DIR gets candidates.npy / query_examples.npy from ../shared/tools/tsds_synth.py if absent)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import SHARED, ensure_synth, timed


def ours(data: Path, out: Path) -> None:
    from raysift.engine.fanout import local_fanout
    from raysift.engine.knn import IndexShard
    from raysift.engine.tsds_search import TSDSParams, reference_index_params, select_compat

    X = np.load(data / "candidates.npy")
    Q = np.load(data / "query_examples.npy")
    shard = IndexShard(X, 0, reference_index_params())
    sol, info = select_compat(local_fanout([shard]), Q, len(X), TSDSParams(mode="compat"))
    np.save(out, sol.dense())
    print(info)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--reference", type=Path, help="checkout of ZifanL/TSDS")
    ap.add_argument("--reference-python", default=sys.executable)
    ap.add_argument("--run-ours", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_ours:
        return ours(args.data, args.run_ours)
    data = args.data.resolve()
    ensure_synth(data, 100_000, 500)
    with tempfile.TemporaryDirectory() as tmp:
        p_file = Path(tmp) / "p.npy"
        me = [sys.executable, __file__, "--data", str(data), "--run-ours", str(p_file)]
        user, wall, rss = timed(me)
        p = np.load(p_file)
        official = np.load(SHARED / "fixtures" / "tsds" / "synth100k.npz")["p_official"]
        print(f"ours (compat): user {user:.1f} s, max RSS {rss:.2f} GB, wall {wall:.1f} s")
        print(
            f"  vs p_official: max |dp| {np.abs(p - official).max():.2e}, "
            f"total variation {0.5 * np.abs(p - official).sum():.2e}"
        )
        if args.reference:
            cfg = Path(tmp) / "config.yaml"
            cfg.write_text(
                f"query_embedding_path: {data}/query_examples.npy\n"
                f"candidate_embedding_path: {data}/candidates.npy\n"
                f"output_folder: {tmp}/ref\nsample_size: 1000\nmax_K: 5000\nkde_K: 1000\n"
                "sigma: 0.75\nalpha: 0.5\nC: 5.0\n"
            )
            # tsds.py reads config.yaml from its working directory
            work = Path(tmp) / "refwork"
            work.mkdir()
            for name in ("tsds.py", "faiss_helper.py"):
                (work / name).write_text((args.reference / name).read_text())
            (work / "config.yaml").write_text(cfg.read_text())
            r_user, r_wall, r_rss = timed([args.reference_python, "tsds.py"], work)
            print(f"reference: user {r_user:.1f} s, max RSS {r_rss:.2f} GB, wall {r_wall:.1f} s")
            print(f"ratios: CPU {r_user / user:.2f}x less, memory {rss / r_rss:.2f}x")


if __name__ == "__main__":
    main()
