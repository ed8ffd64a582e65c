"""Golden selections of the code before the scale-out work, on the seeded synthetic pool.

Run once, at commit e4a3832 (the last commit before the scale-out issue), with
`python tests/golden/make_golden.py`: it writes the pool the way that code stored it
(data/<side>.parquet + embeddings/<side>/part-*.parquet, vectors as given), runs its select stage
for every method and keeps what each wrote in tests/fixtures/golden/. tests/test_golden.py
compares today's code with these files; this script only runs against that old layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from synthpool import synth_pool  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "golden"
BUDGET = 500
# name -> select section overrides; every case uses budget 500 and seed 0 (gradex: 7)
CASES = {
    "random": {"method": "random"},
    "random_seed7": {"method": "random"},
    "knn_max": {"method": "knn", "knn": {"mode": "max"}},
    "knn_centroid": {"method": "knn", "knn": {"mode": "centroid"}},
    "tsds_exact": {"method": "tsds", "tsds": {"mode": "exact"}},
    "tsds_exact_multinomial": {"method": "tsds", "tsds": {"sampling": "multinomial"}},
    "tsds_exact_top": {"method": "tsds", "tsds": {"sampling": "top"}},
    "tsds_exact_alpha9": {"method": "tsds", "tsds": {"alpha": 0.9, "C": 1.0}},
    "tsds_uniform": {"method": "tsds", "tsds": {"sigma": 0.0}},
    "tsds_compat": {
        "method": "tsds",
        "tsds": {"mode": "compat", "sampling": "multinomial", "max_K": 500},
    },
    "gotd": {"method": "gotd"},
    "gotd_converged": {"method": "gotd", "gotd": {"threshold": 1e-4}},
    "gradex_random": {"method": "gradex", "gradex": {"strategy": "random", "keep": 0.5}},
    "gradex_all": {"method": "gradex", "gradex": {"strategy": "all"}},
}
SEEDS = {"random_seed7": 7, "gradex_random": 7}
# the distribution p of each distinct TSDS solve (the samplers of tsds_exact share its p)
P_CASES = {"tsds_exact", "tsds_exact_alpha9", "tsds_uniform", "tsds_compat"}


def write_old_layout(run_dir: Path) -> None:
    from raysift.engine.ids import content_ids

    for side, table in zip(("candidates", "targets"), synth_pool(), strict=True):
        ids = pa.array(content_ids(table["text"].to_pylist()))
        data = pa.table({"id": ids, "text": table["text"], "source": table["source"],
                         "label": table["label"]})  # fmt: skip
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(data, run_dir / "data" / f"{side}.parquet")
        folder = run_dir / "embeddings" / side
        folder.mkdir(parents=True)
        # two shards in a different order than the rows: the old reader aligned them by id
        half = table.num_rows // 2
        vec = table["vector"].combine_chunks()
        for k, (a, b) in enumerate(((half, table.num_rows), (0, half))):
            pq.write_table(pa.table({"id": ids[a:b], "vector": vec[a:b]}),
                           folder / f"part-{k}.parquet")  # fmt: skip


def main() -> None:
    import ray

    from raysift.jobs.config import validate
    from raysift.jobs.runtime import RAY_ENV, configure_data
    from raysift.jobs.stages.select import run_select

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": RAY_ENV})  # fmt: skip
    configure_data()
    OUT.mkdir(parents=True, exist_ok=True)
    infos = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        write_old_layout(run_dir)
        for name, select in CASES.items():
            cfg = validate({
                "output_dir": str(run_dir), "seed": SEEDS.get(name, 0),
                "candidates": {"path": str(run_dir), "keep_columns": ["source", "label"]},
                "targets": {"path": str(run_dir)},
                "select": {"budget": BUDGET, **select},
            })  # fmt: skip
            for f in ("selection.parquet", "probabilities.parquet"):
                (run_dir / f).unlink(missing_ok=True)
            info = run_select(cfg, run_dir)
            shutil.copy(run_dir / "selection.parquet", OUT / f"{name}.parquet")
            if name in P_CASES:
                p = pq.read_table(run_dir / "probabilities.parquet")
                keep = np.flatnonzero(p["probability"].to_numpy() > 0)
                ids = pq.read_table(run_dir / "data" / "candidates.parquet", columns=["id"])
                assert ids["id"].equals(p["id"])
                support = p.take(pa.array(keep)).append_column("row", pa.array(keep))
                pq.write_table(support, OUT / f"{name}.p.parquet")
            infos[name] = {"seed": SEEDS.get(name, 0), "select": select, "info": info}
            print(name, {k: info[k] for k in info if k not in ("recoveries",)})
    meta = {"commit": commit, "budget": BUDGET, "generator": "tests/synthpool.py",
            "cases": infos}  # fmt: skip
    (OUT / "golden.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
