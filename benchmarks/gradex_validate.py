"""GradEx against real fine-tunes: `raysift estimate --validate N` on the real pool.

The pool and targets are finetune_eval.py's (run it once, or this script builds them): 14 sources
of ../shared/data/pool.parquet, ~1000 rows each; the target's 200 query texts come from target
groups removed from the pool (a held-out split of the development target). GradEx samples
`rows_per_source` rows per source, fine-tunes SmolLM2-135M (LoRA) on all of them (theta*), takes
per-sample and per-token projected gradients there, estimates the target loss of subsets of half
the sources, then fine-tunes N other subsets for real from theta* and compares.

    python benchmarks/gradex_validate.py --target debian_science --validate 36
    python benchmarks/gradex_validate.py --table        # the table of finished runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from finetune_eval import OUT as FT_OUT
from finetune_eval import TARGETS, build
from harness import ROOT

sys.path.insert(0, str(ROOT))
OUT = ROOT / "runs" / "bench" / "gradex"


def config(target: str, rows_per_source: int, extra: dict, name: str = "config") -> Path:
    folder = OUT / target
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "output_dir": "run",
        "candidates": {"path": str(FT_OUT / "pool.parquet"), "id_column": "id",
                       "keep_columns": ["source", "label"]},
        "targets": {"path": str(FT_OUT / target / "queries.parquet")},
        "select": {"method": "gradex", "gradex": {
            "rows_per_source": rows_per_source, "target_texts": 32, "max_length": 64,
            "meta_learning_rate": 5e-4, "validate_learning_rate": 2e-4, **extra}},
        "finetune": {"max_length": 64, "batch_size": 8, "checkpoint_every": 1000},
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def finetune_on_sources(
    target: str, rows_per_source: int, strategies: list[str], seeds: list[int]
) -> None:
    """The evaluation rows: fine-tune the base model on `--budget` rows of the sources each
    strategy chooses (gradex = the ensemble choice; random / all sources), with the evaluation
    benchmark's fine-tune settings (finetune_eval.py: lr 5e-4, 64 tokens, batch 8, one epoch),
    and score the same held-out texts, so the rows sit beside that table's. The runs share the
    validation run's ingest, theta* and gradients (same rows, seed and settings)."""
    from raysift.jobs.config import load_config
    from raysift.jobs.pipeline import run
    from raysift.jobs.workflows.evaluate import Heldout, heldout_scores

    heldout = pq.read_table(FT_OUT / target / "heldout.parquet").column("text").to_pylist()
    base = OUT / target / "run"
    for strategy in strategies:
        for seed in seeds:
            folder = OUT / target / f"sources-{strategy}-seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("data", "gradex") if seed == 0 else ("data",):
                if not (folder / name).exists():
                    (folder / name).symlink_to(base / name)
            chosen_by = "ensemble" if strategy == "gradex" else strategy
            path = config(target, rows_per_source, {"strategy": chosen_by}, f"sources-{strategy}")
            # the evaluation benchmark's settings: lr 5e-4, perplexity on 64-token texts
            cfg = load_config(path, [f"output_dir={folder}", f"seed={seed}", "select.budget=500",
                                     "finetune.learning_rate=5e-4", "evaluate.max_length=64",
                                     "stages=[select, finetune]"])  # fmt: skip
            run(cfg)
            scored = Heldout(heldout, None, [])
            ppl = heldout_scores(cfg, folder / "finetune" / "model", scored, folder)
            sel = pq.read_table(folder / "selection.parquet")
            source, labels = TARGETS[target]
            pairs = zip(sel.column("source").to_pylist(), sel.column("label").to_pylist(),
                        strict=True)  # fmt: skip
            share = sum(s == source and (labels is None or lab in labels) for s, lab in pairs)
            out = {"strategy": strategy, "seed": seed, "perplexity": ppl["perplexity"],
                   "sources": sorted(set(sel.column("source").to_pylist())),
                   "share_from_target": share / sel.num_rows}  # fmt: skip
            (folder / "result.json").write_text(json.dumps(out, indent=1))
            print(out, flush=True)


def table() -> None:
    """One row per estimator on the same real fine-tunes, then the trivial predictors, the l2
    sweep of the offset estimator, and the fine-tunes on the chosen sources."""
    for path in sorted(OUT.glob("*/run*/gradex/validation.json")):
        v = json.loads(path.read_text())
        base = json.loads((path.parent / "result.json").read_text())["loss_at_theta_star"]
        print(f"\n{path.parts[-4]} ({path.parts[-3]}): {v['subsets']} real fine-tunes, k = "
              f"{v['projection_dim']}, subsets of {v['subset_size']} / {len(v['sources'])} "
              f"sources, target loss at theta* {base:.4f}\n")  # fmt: skip
        print("| predictor | Spearman | Pearson | mean rel. error | CPU s per estimate |")
        print("|---|---|---|---|---|")

        def row(name, m, cpu=None):
            sp = "n/a" if m["spearman"] is None else f"{m['spearman']:.3f}"
            pe = "n/a" if m["pearson"] is None else f"{m['pearson']:.3f}"
            c = "" if cpu is None else f"{cpu:.4f}"
            print(f"| {name} | {sp} | {pe} | {m['mean_relative_error']:.4f} | {c} |")

        row(f"{v['estimator_name']} (l2 {v['l2']:g})", v["estimator"],
            v["cpu_seconds_per_estimate"])  # fmt: skip
        others = v["other_estimators"]
        for name in ("reference", "reference_fast", "functional"):
            if name in others:
                row(name, others[name], others[name]["cpu_seconds_per_estimate"])
        if "offset_calibrated" in others:
            c = others["offset_calibrated"]
            row(f"offset, l2 {c['l2']:g} calibrated on the first {c['calibration_runs']} "
                f"(scored on the other {c['scored_runs']})", c)  # fmt: skip
        row("constant (the best, in hindsight)", v["constant"])
        row("loss at theta*", v["loss_at_theta_star"])
        for lam, m in others.get("offset_l2_scan", {}).items():
            row(f"offset, l2 {lam}", m)
        ft, est = v["cpu_seconds_per_finetune"], v["cpu_seconds_per_estimate"]
        print(f"\nCPU s per real fine-tune (rank-0 worker process): {ft:.1f}; per estimate: "
              f"{est:.5f} ({v['speedup_per_estimate']:.0f}x less)")  # fmt: skip
    rows = sorted(OUT.glob("*/sources-*-seed*/result.json"))
    if rows:
        print("\n| target | sources by | seed | perplexity | sources | share from target |")
        print("|---|---|---|---|---|---|")
        for path in rows:
            r = json.loads(path.read_text())
            print(f"| {path.parts[-3]} | {r['strategy']} | {r['seed']} | {r['perplexity']:.2f} | "
                  f"{', '.join(r['sources'])} | {r['share_from_target']:.3f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="debian_science", choices=list(TARGETS))
    ap.add_argument("--validate", type=int, default=36)
    ap.add_argument("--rows-per-source", type=int, default=24)
    ap.add_argument("--set", nargs="*", default=[], help="gradex key=value overrides")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--finetune", nargs="*", choices=["gradex", "random", "all"],
                    help="fine-tune on the sources these strategies choose")  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    if args.finetune:
        finetune_on_sources(args.target, args.rows_per_source, args.finetune, args.seeds)
    elif not args.table:
        from raysift.jobs.config import load_config
        from raysift.jobs.workflows.gradex_estimate import run_estimate

        build(1000)
        extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
        t0 = time.time()
        run_dir = run_estimate(load_config(config(args.target, args.rows_per_source, extra)),
                               args.validate)  # fmt: skip
        print(f"{args.target}: {time.time() - t0:.0f} s -> {run_dir}", flush=True)
    table()


if __name__ == "__main__":
    main()
