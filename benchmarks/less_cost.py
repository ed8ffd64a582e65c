"""What LESS costs: the warm-up, the features and the scoring per 1,000 pool rows, on this machine,
with SmolLM2-135M at the CPU settings (select.less defaults: LoRA r 16 on q/k/v/o, 64 tokens,
projection 2048, 4 warm-up epochs on 5% of the pool), through `raysift run` as a user runs it.

1. A pool of `--rows` rows sampled (seed 0) from ../shared/data/pool.parquet and `--targets`
   python_code texts kept out of it; `raysift run` (ingest, select) in a child process: the
   warm-up (Ray Train), the feature actors (one per CPU), the scoring tasks.
2. The same select again: the warm-up and features are reused, what is left is the scoring.
3. In this process, the reference's way vs raysift's on `--loop-rows` rows and one checkpoint:
   one example at a time through HF's `.loss` and autograd (batch size 1, the reference), then the
   Adam transform and the same projection, vs the vmapped batch of the feature actor.

    python benchmarks/less_cost.py [--rows 1000] [--targets 32] [--loop-rows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from harness import ROOT, SHARED, timed

OUT = ROOT / "runs" / "bench" / "less_cost"


def build(rows: int, targets: int) -> None:
    df = pq.read_table(SHARED / "data" / "pool.parquet").to_pandas()
    code = df[df["source"] == "python_code"].sample(n=targets, random_state=0)
    rest = df.drop(code.index).sample(n=rows, random_state=0)
    OUT.mkdir(parents=True, exist_ok=True)
    rest[["id", "source", "label", "text"]].to_parquet(OUT / "pool.parquet")
    code[["text", "source"]].to_parquet(OUT / "targets.parquet")


def config(rows: int) -> dict:
    return {
        "output_dir": str(OUT / "run"),
        "seed": 0,
        "stages": ["ingest", "select"],
        "candidates": {"path": str(OUT / "pool.parquet"), "id_column": "id",
                       "keep_columns": ["source"]},
        "targets": {"path": str(OUT / "targets.parquet")},
        "select": {"method": "less", "budget": min(100, rows)},
        "finetune": {"model": "smollm2-135m", "batch_size": 8, "learning_rate": 5e-4},
    }  # fmt: skip


def loop_vs_batched(n: int) -> dict:
    """Seconds per row per checkpoint: the reference's batch-1 autograd loop vs the actor's."""
    import torch

    from raysift.actors.gradients import LessFeatures
    from raysift.engine import less, lm
    from raysift.jobs.config import LessConfig
    from raysift.jobs.core.storage import Store
    from raysift.jobs.methods.less import WARMUP, load_state

    torch.set_num_threads(os.cpu_count() or 1)
    store = Store.local(OUT / "run" / WARMUP)
    rel = "finetune/epochs/epoch-001.pt"
    o = LessConfig()  # the defaults the run used
    actor = LessFeatures("smollm2-135m", o.lora.model_dump(), [rel], store, {}, o.proj_dim,
                         o.warmup_seed, o.max_length, o.chunk)  # fmt: skip
    texts = pd.read_parquet(OUT / "pool.parquet")["text"].tolist()[:n]
    actor.features(texts[:2], "candidates")  # warm the kernels
    t0 = time.perf_counter()
    batched = actor.features(texts, "candidates")[:, 0]
    t_batched = time.perf_counter() - t0

    state = load_state(store, rel)
    model = actor.model.model
    names = list(actor.model.projector.shapes)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    t0 = time.perf_counter()
    gammas = []
    for text in texts:  # the reference: one example, HF's .loss, autograd, the Adam transform
        ids = torch.tensor([lm.encode_text(actor.tokenizer, text, o.max_length).input_ids])
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, [params[x] for x in names])
        g = {x: v[None] for x, v in zip(names, grads, strict=True)}
        gammas.append(less.adam_transform(g, state["moments"]))
    # ... and the projection of the collected rows at once (the reference: every 16 examples)
    stacked = {x: torch.cat([gm[x] for gm in gammas]) for x in names}
    loop = less.normalise(actor.model.projector.project(stacked))
    t_loop = time.perf_counter() - t0
    err = float(np.max(np.linalg.norm(batched - loop, axis=1)))
    return {"rows": n, "loop_s_per_row": t_loop / n, "batched_s_per_row": t_batched / n,
            "speedup": t_loop / t_batched, "max_feature_diff": err}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--loop-rows", type=int, default=16)
    ap.add_argument("--loop-only", action="store_true", help="reuse the run; redo step 3")
    args = ap.parse_args()
    if args.loop_only:
        result = json.loads((OUT / "result.json").read_text())
        result["loop_vs_batched"] = loop_vs_batched(args.loop_rows)
        (OUT / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    build(args.rows, args.targets)
    path = OUT / "config.yaml"
    path.write_text(yaml.safe_dump(config(args.rows), sort_keys=False))
    cmd = [sys.executable, "-m", "raysift", "run", str(path)]
    first = timed(cmd)
    man = json.loads((OUT / "run" / "manifest.json").read_text())["stages"]["select"]
    warm = json.loads((OUT / "run" / "less" / "warmup" / "finetune" / "result.json").read_text())
    timed([sys.executable, "-m", "raysift", "select", str(path)])
    rescore = json.loads((OUT / "run" / "manifest.json").read_text())["stages"]["select"]
    C, rows = man["checkpoints"], args.rows
    per_1k = 1000 / rows
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "pool_rows": rows,
        "targets": args.targets,
        "checkpoints": C,
        "warmup_rows": man["warmup_rows"],
        "warmup_steps": man["warmup_steps"],
        "warmup_wall_s": warm["train_seconds"],
        "warmup_cpu_s": warm["cpu_seconds"],
        "feature_wall_s": man["feature_seconds"],
        "feature_rows": man["rows_computed"],
        "select_wall_s": man["seconds"],
        "rescore_wall_s": rescore["seconds"],
        "run_user_cpu_s": first[0],
        "run_wall_s": first[1],
        "per_1k_rows": {
            "warmup_wall_s": warm["train_seconds"] * per_1k,
            "features_wall_s": man["feature_seconds"] * 1000 / man["rows_computed"],
            "scoring_wall_s": rescore["seconds"] * per_1k,
        },
        "loop_vs_batched": None,
    }
    per_row_ckpt = man["feature_seconds"] * (os.cpu_count() or 1) / (man["rows_computed"] * C)
    result["cpu_core_s_per_row_per_checkpoint"] = per_row_ckpt
    result["projected_1M_rows_cpu_core_hours"] = per_row_ckpt * 1e6 * C / 3600
    (OUT / "result.json").write_text(json.dumps(result, indent=1))
    result["loop_vs_batched"] = loop_vs_batched(args.loop_rows)
    (OUT / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
