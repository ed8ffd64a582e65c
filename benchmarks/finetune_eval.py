"""Target perplexity after fine-tuning SmolLM2-135M (LoRA) on each method's selection, on the real
pool (../shared/data/pool.parquet), for the pool README's development targets.

For each target, 200 query texts and 100 held-out test texts come from target groups removed from
the pool (no leak between pool, queries and test texts); the pool is a stratified sample of every
source (`--per-source` rows each) from what remains, the same for every target. Each target is one
`raysift evaluate` run (methods random, knn, tsds, gotd at their defaults, plus the oracle =
fine-tuning on the 200 query texts cycled to the budget), then a markdown table of every
evaluation.json is printed.

    python benchmarks/finetune_eval.py --budget 500 --seeds 0 [--targets healthtweets ...]
    python benchmarks/finetune_eval.py --table          # only print the table of finished runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from harness import ROOT, SHARED, share_pool_features

POOL = SHARED / "data" / "pool.parquet"
OUT = ROOT / "runs" / "bench" / "finetune"
TARGETS = {  # name -> (source, labels or None)
    "healthtweets": ("healthtweets", None),
    "python_code": ("python_code", None),
    "debian_science": ("debian_pkg", {"science"}),
}


def build(per_source: int) -> None:
    """pool.parquet (shared) and <target>/{queries,heldout}.parquet, seeded."""
    if (OUT / "pool.parquet").is_file():
        return
    df = pq.read_table(POOL).to_pandas()
    rng = np.random.default_rng(0)
    removed = np.zeros(len(df), bool)
    for name, (source, labels) in TARGETS.items():
        mask = df["source"] == source
        if labels:
            mask &= df["label"].isin(labels)
        rows = df[mask]
        groups = rng.permutation(np.asarray(rows["group"].unique(), dtype=object))
        sizes = rows.groupby("group").size()
        # whole groups, in a seeded order: the first ones until 200 query texts, the next ones
        # until 100 test texts (a group never straddles queries and test texts)
        reach = np.cumsum(sizes[groups].to_numpy())
        q_end = int(np.searchsorted(reach, 200)) + 1
        h_end = int(np.searchsorted(reach, reach[q_end - 1] + 100)) + 1
        in_q = rows["group"].isin(groups[:q_end])
        in_h = rows["group"].isin(groups[q_end:h_end])
        queries = rows[in_q].sample(n=200, random_state=0)
        heldout = rows[in_h].sample(n=100, random_state=0)
        held = rows[in_q | in_h]
        (OUT / name).mkdir(parents=True, exist_ok=True)
        queries[["text", "source", "label"]].to_parquet(OUT / name / "queries.parquet")
        heldout[["text", "source", "label"]].to_parquet(OUT / name / "heldout.parquet")
        removed |= df["group"].isin(held["group"]) & (df["source"] == source)
    rest = df[~removed]
    parts = [g.sample(n=min(per_source, len(g)), random_state=0) for _, g in rest.groupby("source")]
    pool = pd.concat(parts).sample(frac=1.0, random_state=0).reset_index(drop=True)
    pool[["id", "source", "label", "text"]].to_parquet(OUT / "pool.parquet")


def entries(methods: list[str], seeds: list[int], more: list[int], contenders: dict) -> list:
    """`method` or `method:representation` -> evaluate.methods entries; the contenders of this
    target get the extra seeds too."""
    out = []
    for item in methods:
        method, _, rep = item.partition(":")
        entry = {"method": method, **({"representation": rep} if rep else {})}
        name = "-".join([method, *([rep] if rep else [])])
        if more and name in contenders:
            entry["seeds"] = sorted(set(seeds) | set(more))
        out.append(entry)
    return out


def config(
    name: str,
    budget: int,
    seeds: list[int],
    methods: list,
    oracle: bool,
    tag: str = "",
    select: dict | None = None,
) -> Path:
    source, labels = TARGETS[name]
    target_rows = {"source": [source], **({"label": sorted(labels)} if labels else {})}
    cfg = {
        "output_dir": f"b{budget}{tag}",
        "candidates": {"path": "../pool.parquet", "id_column": "id",
                       "keep_columns": ["source", "label"]},
        "targets": {"path": "queries.parquet", "keep_columns": ["label"]},
        "embed": {"max_length": 128, "batch_size": 64},
        "select": {"budget": budget, **(select or {})},
        "finetune": {"max_length": 64, "batch_size": 8, "learning_rate": 5e-4},
        "evaluate": {"heldout": {"path": "heldout.parquet"}, "seeds": seeds,
                     "methods": methods, "oracle": oracle,
                     "target_rows": target_rows, "max_length": 64},
    }  # fmt: skip
    path = OUT / name / f"b{budget}{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def table() -> None:
    """One markdown table of every finished evaluation.json: per target and method, perplexity
    (mean ± sd over seeds), the paired difference to random and to the target's best method with
    its 95% bootstrap interval over the held-out texts, the share from the target, and what the
    selection cost (the select stage, its representation included; the embed stage is shared by
    the embedding methods and listed once per target)."""
    print("| target | method | on | perplexity (mean ± sd) | seeds | vs random [95% paired] | "
          "vs best [95% paired] | share from target | selection (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in TARGETS:
        for path in sorted((OUT / name).glob("b*/evaluation.json")):
            r = json.loads(path.read_text())
            s, paired = r["summary"], r.get("paired", {})
            ranked = sorted(s, key=lambda k: s[k]["perplexity_mean"])
            best = next((m for m in ranked if m != "oracle"), ranked[0])
            embed = r.get("embed_seconds")
            shared = f"embed stage {embed:.0f}" if embed else ""
            print(f"| {name} | no fine-tune | | {r['base']['perplexity']:.2f} | | | | | "
                  f"{shared} |")  # fmt: skip
            for m in ranked:
                x = s[m]
                sd = f" ± {x['perplexity_std']:.2f}" if x["seeds"] > 1 else ""
                share = "" if x["share_from_target"] is None else f"{x['share_from_target']:.3f}"
                cost = x.get("selection_seconds_mean")
                print(f"| {name} | {m} | {x.get('representation') or ''} | "
                      f"{x['perplexity_mean']:.2f}{sd} | {x['seeds']} | "
                      f"{_paired(paired, m, 'random')} | {_paired(paired, m, best)} | {share} | "
                      f"{'' if cost is None else f'{cost:.1f}'} |")  # fmt: skip
            if "verdict" in r:
                print(f"| {name} | **{r['verdict']}** | | | | | | | |")


def _paired(paired: dict, a: str, b: str) -> str:
    v = paired.get(a, {}).get(b)
    if v is None:
        return ""
    text = f"{v['diff']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]"
    return f"**{text}**" if v["high"] < 0 or v["low"] > 0 else text


def length_filter_table(thresholds: tuple[int, ...] = (100, 5)) -> None:
    """Per target: the share of the pool's rows of the target's source (and section) that DSIR's
    length filter removes, at each threshold (words as DSIR counts them)."""
    from raysift.engine.dsir import Featurizer

    pool = pq.read_table(OUT / "pool.parquet").to_pandas()
    words = Featurizer(1, 2)(pool["text"].tolist()).lengths()
    print("| target | pool rows of its source | " + " | ".join(
        f"removed at {t} words" for t in thresholds) + " |")  # fmt: skip
    print("|---|---|" + "---|" * len(thresholds))
    for name, (source, labels) in TARGETS.items():
        mask = np.array(pool["source"] == source)
        if labels:
            mask &= np.array(pool["label"].isin(labels))
        cells = " | ".join(f"{(words[mask] < t).mean():.3f}" for t in thresholds)
        print(f"| {name} | {int(mask.sum())} | {cells} |")
    print(f"| whole pool | {len(pool)} | " + " | ".join(
        f"{(words < t).mean():.3f}" for t in thresholds) + " |")  # fmt: skip


def share_features(name: str, folder: str) -> None:
    """The pool's LESS features and lm_hidden vectors, from another target's run folder."""
    share_pool_features(OUT / name / folder, [OUT / other / folder for other in TARGETS])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, nargs="+", default=[500])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--per-source", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=["random", "knn", "tsds", "gotd"],
                    help="method or method:representation, e.g. tsds:lm_hidden")
    ap.add_argument("--more-seeds", type=int, nargs="*", default=[],
                    help="extra seeds for each target's contenders (--contenders)")
    ap.add_argument("--contenders", nargs="*", default=[], metavar="TARGET=NAME,NAME",
                    help="per target, the entries that get --more-seeds")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--tag", default="", help="run folder suffix, e.g. -dsir")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="select.FIELD=VALUE",
        help="select-section overrides, e.g. dsir.min_example_length=5",
    )
    ap.add_argument("--table", action="store_true")
    ap.add_argument(
        "--out", default="finetune", help="folder under runs/bench/ (a pool of its own size)"
    )
    args = ap.parse_args()
    global OUT
    OUT = ROOT / "runs" / "bench" / args.out
    if not args.table:
        from raysift.jobs.config import load_config
        from raysift.jobs.workflows.evaluate import run_evaluate

        build(args.per_source)
        for budget in args.budget:
            for name in args.targets:
                t0 = time.time()
                select: dict = {}
                for item in args.set:
                    key, _, value = item.partition("=")
                    section, _, field = key.partition(".")
                    select.setdefault(section, {})[field] = yaml.safe_load(value)
                chosen = dict(c.split("=", 1) for c in args.contenders).get(name, "")
                methods = entries(args.methods, args.seeds, args.more_seeds, chosen.split(","))
                path = config(name, budget, args.seeds, methods, not args.no_oracle,
                              args.tag, select)  # fmt: skip
                share_features(name, path.stem)
                run_dir = run_evaluate(load_config(path))
                print(f"{name} b{budget}: {time.time() - t0:.0f} s -> {run_dir}", flush=True)
    table()
    if (OUT / "pool.parquet").is_file():
        length_filter_table()


if __name__ == "__main__":
    main()
