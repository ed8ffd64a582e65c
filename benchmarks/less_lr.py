"""Does LESS's selection depend on the warm-up's learning rate? The reference warms up at 2e-5 (LoRA
r 128); raysift defaults to the fine-tune's 2e-4 (r 16). This selects with both, everything else
equal, on the instruction slice (demo/instruct: chat rows, the define_animals target, assistant
turns only), and compares the two selections and their scores.

    python benchmarks/less_lr.py [--rows 300] [--budget 100]   # -> runs/bench/less_lr/result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from harness import ROOT

OUT = ROOT / "runs" / "bench" / "less_lr"
INSTRUCT = ROOT / "demo" / "instruct"


def config(lr: float, rows: int, budget: int) -> Path:
    folder = OUT / f"lr{lr:g}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "output_dir": str(folder / "run"),
        "candidates": {"path": str(INSTRUCT / "pool.jsonl"), "messages_column": "messages",
                       "keep_columns": ["task", "label"], "limit": rows},
        "targets": {"path": str(INSTRUCT / "define_animals.targets.jsonl"),
                    "messages_column": "messages", "limit": 20},
        "stages": ["ingest", "select"],
        "select": {"method": "less", "budget": budget,
                   "less": {"learning_rate": lr, "warmup_fraction": 0.2, "warmup_epochs": 2,
                            "lora": {"r": 16}}},
        "finetune": {"max_length": 64, "batch_size": 8},
    }  # fmt: skip
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    from raysift.jobs.config import load_config
    from raysift.jobs.pipeline import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--budget", type=int, default=100)
    args = ap.parse_args()
    runs = {}
    for lr in (2e-4, 2e-5):
        t0 = time.time()
        run_dir = run(load_config(config(lr, args.rows, args.budget)))
        sel = pq.read_table(run_dir / "selection.parquet")
        stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["select"]
        runs[lr] = {"ids": sel.column("id").to_pylist(), "seconds": round(time.time() - t0, 1),
                    "task": sel.column("task").to_pylist(),
                    "warmup_loss": json.loads((run_dir / "less" / "warmup" / "finetune"
                                               / "result.json").read_text())["losses"]}  # fmt: skip
        print(f"lr {lr:g}: {runs[lr]['seconds']} s, {stage.get('chunks_computed')} chunks",
              flush=True)
    a, b = (runs[lr]["ids"] for lr in (2e-4, 2e-5))
    k = len(a)
    result = {
        "rows": args.rows, "budget": k,
        "overlap": len(set(a) & set(b)) / k,
        "top_half_overlap": len(set(a[: k // 2]) & set(b[: k // 2])) / (k // 2),
        "share_define_tasks": {f"{lr:g}": float(np.mean([t == "define" for t in r["task"]]))
                               for lr, r in runs.items()},
        "seconds": {f"{lr:g}": r["seconds"] for lr, r in runs.items()},
        "warmup_loss": {f"{lr:g}": r["warmup_loss"] for lr, r in runs.items()},
    }  # fmt: skip
    (OUT / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
