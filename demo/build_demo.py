"""How demo/ was made (provenance; not needed at run time).

From ../shared/data/pool.parquet (see its README), permissive sources only: 1,000 rows from each of
debian_pkg, wordnet, fortunes, healthtweets and python_code, and all 897 chatterbot rows, as
demo/pool.parquet. The target, demo/targets.jsonl, is 200 Debian package descriptions from the
`science` section, drawn from packages (groups) that are kept out of the demo pool, so no target
text or near-copy of one is a candidate. demo/heldout.jsonl, the evaluation's held-out texts, is
100 more `science` descriptions from packages in neither the pool nor the target groups.

    python demo/build_demo.py ../shared/data/pool.parquet
"""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SOURCES = ["debian_pkg", "wordnet", "fortunes", "healthtweets", "chatterbot", "python_code"]
PER_SOURCE = 1000
N_TARGETS = 200
N_HELDOUT = 100
SEED = 20261121


def main(pool_path: str) -> None:
    out = Path(__file__).resolve().parent
    rng = np.random.default_rng(SEED)
    pool = pq.read_table(pool_path)
    debian = pool.filter(pc.equal(pool["source"], "debian_pkg"))
    science = debian.filter(pc.equal(debian["label"], "science"))
    groups = np.unique(science["group"].to_numpy(zero_copy_only=False))
    target_groups = set(rng.permutation(groups)[: N_TARGETS * 2].tolist())
    in_target = pc.is_in(science["group"], value_set=pa.array(sorted(target_groups)))
    targets = science.filter(in_target)
    targets = targets.take(np.sort(rng.choice(targets.num_rows, N_TARGETS, replace=False)))
    parts = []
    for source in SOURCES:
        rows = pool.filter(pc.equal(pool["source"], source))
        rows = rows.filter(
            pc.invert(pc.is_in(rows["group"], value_set=pa.array(sorted(target_groups))))
        )
        take = min(PER_SOURCE, rows.num_rows)
        parts.append(rows.take(np.sort(rng.choice(rows.num_rows, take, replace=False))))
    demo = pa.concat_tables(parts)
    demo = demo.take(rng.permutation(demo.num_rows))
    pq.write_table(
        demo.select(["id", "source", "label", "text"]), out / "pool.parquet", compression="zstd"
    )
    with open(out / "targets.jsonl", "w", encoding="utf-8") as fh:
        for row in targets.select(["text", "label"]).to_pylist():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    # Held-out target texts for the evaluation: science packages from groups that are neither
    # target groups nor in the pool (a second generator, so the files above are unchanged).
    used = target_groups | set(pc.unique(pa.concat_tables(parts)["group"]).to_pylist())
    rest = science.filter(pc.invert(pc.is_in(science["group"], value_set=pa.array(sorted(used)))))
    held_rng = np.random.default_rng(SEED + 1)
    heldout = rest.take(np.sort(held_rng.choice(rest.num_rows, N_HELDOUT, replace=False)))
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as fh:
        for row in heldout.select(["text", "label"]).to_pylist():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"pool {demo.num_rows} rows, targets {targets.num_rows} rows, heldout {N_HELDOUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/pool.parquet")
