"""Instruction data end to end: what each method's selection buys when SmolLM2-135M-Instruct is
fine-tuned on chat rows, measured by the task metric (lm-evaluation-harness: multiple-choice
accuracy or exact match) and by the assistant tokens' perplexity, both with paired intervals.

The pool is `demo/build_instruct.py --scale S` (the packaged slice's rows x S: define / describe /
section / complete / chat conversations from the shared pool's structured sources); its three
targets each hold out whole groups (no leak between pool, targets and held-out rows):
define_animals (multiple choice), debian_sections (exact match), python_torch (multiple choice).
Each target is one `raysift evaluate` run on configs/instruct.yaml's settings; LESS's warm-up and
pool features and the pool's lm_hidden vectors are computed once and copied to the other targets.

    python benchmarks/instruct_eval.py --scale 2 --budget 500 --seeds 0 [--targets ...]
    python benchmarks/instruct_eval.py --more-seeds 1 --contenders 2   # + seeds for random, best 2
    python benchmarks/instruct_eval.py --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness import ROOT, share_pool_features

OUT = ROOT / "runs" / "bench" / "instruct"
TARGETS = {  # name -> the pool rows that are the target's kind (evaluate.target_rows)
    "define_animals": {"task": ["define"], "label": ["noun.animal"]},
    "debian_sections": {"task": ["section"],
                        "label": ["electronics", "hamradio", "math", "science"]},
    "python_torch": {"task": ["complete"], "label": ["torch"]},
}


def build(scale: int) -> None:
    if not (OUT / "data" / "pool.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "demo" / "build_instruct.py"),
                        "--out", str(OUT / "data"), "--scale", str(scale)], check=True)  # fmt: skip


def entries(methods: list[str], seeds: list[int], more: list[int], contenders: list[str]) -> list:
    out = []
    for item in methods:
        method, _, rep = item.partition(":")
        entry: dict = {"method": method, **({"representation": rep} if rep else {})}
        name = "-".join([method, *([rep] if rep else [])])
        if more and name in contenders:
            entry["seeds"] = sorted(set(seeds) | set(more))
        out.append(entry)
    return out


def config(name: str, budget: int, seeds: list[int], methods: list, less: dict) -> Path:
    base = yaml.safe_load((ROOT / "configs" / "instruct.yaml").read_text())
    data = OUT / "data"
    cfg = {
        **base,
        "output_dir": str(OUT / name / f"b{budget}"),
        "candidates": {**base["candidates"], "path": str(data / "pool.jsonl")},
        "targets": {**base["targets"], "path": str(data / f"{name}.targets.jsonl")},
        "select": {**base["select"], "budget": budget, "less": less},
        "evaluate": {**base["evaluate"], "seeds": seeds, "methods": methods,
                     "heldout": {"path": str(data / f"{name}.heldout.jsonl"),
                                 "messages_column": "messages"},
                     "target_rows": TARGETS[name]},
    }  # fmt: skip
    path = OUT / name / f"b{budget}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def share_features(name: str, budget: int) -> None:
    """The pool's LESS features and lm_hidden vectors, from another target's run folder."""
    folder = f"b{budget}"
    share_pool_features(OUT / name / folder, [OUT / other / folder for other in TARGETS])


def _paired(paired: dict | None, a: str, b: str, fmt: str) -> str:
    v = (paired or {}).get(a, {}).get(b)
    if v is None:
        return ""
    text = f"{v['diff']:+{fmt}} [{v['low']:+{fmt}}, {v['high']:+{fmt}}]"
    return f"**{text}**" if v["high"] < 0 or v["low"] > 0 else text


def table() -> None:
    """Per target and method: the task metric and the assistant tokens' perplexity (mean ± sd
    over seeds), each with the paired difference to random (95% bootstrap over held-out items),
    the share of the selection that is the target's kind, and what the selection and the task
    metric cost."""
    print("| target | method | task metric (mean ± sd) | vs random [95% paired] | perplexity | "
          "vs random [95% paired] | seeds | share of target's kind | selection (s) | "
          "metric (s per model) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in TARGETS:
        for path in sorted((OUT / name).glob("b*/evaluation.json")):
            r = json.loads(path.read_text())
            s, base = r["summary"], r["base"]
            bt = base.get("task_metric") or {}
            print(f"| {name} | no fine-tune | {bt.get('value', float('nan')):.3f} "
                  f"({bt.get('metric', '')}) | | {base['perplexity']:.2f} | | | | | "
                  f"{bt.get('seconds', '')} |")  # fmt: skip
            ranked = sorted(s, key=lambda k: -(s[k].get("task_metric_mean") or 0))
            for m in ranked:
                x = s[m]
                tsd = f" ± {x['task_metric_std']:.3f}" if x.get("task_metric_std") else ""
                psd = f" ± {x['perplexity_std']:.2f}" if x["seeds"] > 1 else ""
                share = "" if x["share_from_target"] is None else f"{x['share_from_target']:.2f}"
                cost = x.get("selection_seconds_mean")
                secs = [run["task_metric"]["seconds"] for run in r["runs"]
                        if run["method"] == m and run.get("task_metric")]  # fmt: skip
                print(f"| {name} | {m} | {x.get('task_metric_mean', float('nan')):.3f}{tsd} | "
                      f"{_paired(r.get('paired_task_metric'), m, 'random', '.3f')} | "
                      f"{x['perplexity_mean']:.2f}{psd} | "
                      f"{_paired(r.get('paired'), m, 'random', '.2f')} | {x['seeds']} | {share} | "
                      f"{'' if cost is None else f'{cost:.1f}'} | "
                      f"{f'{sum(secs) / len(secs):.1f}' if secs else ''} |")  # fmt: skip
            if "verdict" in r:
                print(f"| {name} | **{r['verdict']}** | | | | | | | | |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--budget", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--methods", nargs="+", default=["random", "knn", "rds", "gotd", "less"])
    ap.add_argument("--more-seeds", type=int, nargs="*", default=[])
    ap.add_argument("--contenders", type=int, default=2,
                    help="with --more-seeds: random and the best N by the task metric get them")
    ap.add_argument("--less-warmup-epochs", type=int, default=1)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if not args.table:
        from raysift.jobs.config import load_config
        from raysift.jobs.workflows.evaluate import run_evaluate

        build(args.scale)
        for name in args.targets:
            t0 = time.time()
            chosen = ["random"]
            done = OUT / name / f"b{args.budget}" / "evaluation.json"
            if args.more_seeds and done.is_file():
                s = json.loads(done.read_text())["summary"]
                ranked = sorted((m for m in s if m not in ("oracle", "random")),
                                key=lambda m: -(s[m].get("task_metric_mean") or 0))  # fmt: skip
                chosen += ranked[: args.contenders]
            methods = entries(args.methods, args.seeds, args.more_seeds, chosen)
            path = config(name, args.budget, args.seeds, methods,
                          {"warmup_epochs": args.less_warmup_epochs})  # fmt: skip
            share_features(name, args.budget)
            run_dir = run_evaluate(load_config(path))
            print(f"{name}: {time.time() - t0:.0f} s -> {run_dir}", flush=True)
    table()


if __name__ == "__main__":
    main()
