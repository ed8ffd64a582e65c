"""Human-readable summaries of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich import box
from rich.console import Console
from rich.table import Table

from raysift.actors.partitions import column_counts
from raysift.jobs.core.pool import load_pool
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.core.storage import Store


def pool_counts(run_dir: Path, column: str) -> dict[str, int] | None:
    """{value: rows in the pool} of a candidate column (per-part tasks; None when the pool has no
    such column). Needs Ray up."""
    pool = load_pool(Store.for_run(run_dir), "candidates")
    if column not in pool.columns:
        return None
    return column_counts(pool, column)


def selection_counts(selection: Path, column: str) -> dict[str, int]:
    chosen = pq.read_table(selection, columns=[column]).column(column).combine_chunks()
    return {str(v["values"]): v["counts"] for v in pc.value_counts(chosen).to_pylist()}


def composition(in_pool: dict, in_sel: dict) -> list[tuple[str, int, int]]:
    """(value, rows in the pool, rows selected) for each value, most selected first."""
    rows = [(str(k), n, in_sel.get(str(k), 0)) for k, n in in_pool.items()]
    return sorted(rows, key=lambda r: (-r[2], -r[1], r[0]))


def _table(rows: list[tuple[str, int, int]], column: str, title: str, top: int | None = None):
    n_pool = sum(r[1] for r in rows)
    n_sel = sum(r[2] for r in rows)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
    for name in (column, "pool rows", "pool %", "selected", "selected %"):
        table.add_column(name, justify="left" if name == column else "right")
    for value, in_pool, in_sel in rows[:top]:
        table.add_row(
            value,
            f"{in_pool:,}",
            f"{100 * in_pool / n_pool:.1f}",
            f"{in_sel:,}",
            f"{100 * in_sel / max(n_sel, 1):.1f}",
        )
    return table


def source_table(run_dir: Path, console: Console | None = None) -> None:
    """Where the selection came from, by `source` (all) and `label` (top 5), next to the pool."""
    console = console or Console()
    selection = run_dir / RunFolder.SELECTION
    schema = pq.read_schema(selection)
    method = json.loads((run_dir / RunFolder.MANIFEST).read_text())["config"]["select"]["method"]
    n_sel = pq.ParquetFile(selection).metadata.num_rows
    if "source" in schema.names:
        in_pool = pool_counts(run_dir, "source") or {}
        rows = composition(in_pool, selection_counts(selection, "source"))
        title = f"Where the {n_sel} selected rows came from ({method}), next to the pool"
        console.print(_table(rows, "source", title))
    else:
        console.print(
            "(no 'source' column carried into the selection: add it to "
            "candidates.keep_columns for a breakdown)"
        )
    if "label" in schema.names:
        in_pool = pool_counts(run_dir, "label") or {}
        rows = composition(in_pool, selection_counts(selection, "label"))
        console.print(_table(rows, "label", "Most selected labels", top=5))
    console.print(f"selection: {selection} (rows for training: selected.jsonl)", soft_wrap=True)


def evaluation_table(run_dir: Path, console: Console | None = None) -> None:
    """Target perplexity per method from evaluation.json, best first, with the base model."""
    console = console or Console()
    result = json.loads((run_dir / RunFolder.EVALUATION).read_text())
    summary = result["summary"]
    table = Table(
        title=f"Target perplexity after fine-tuning on {result['budget']} rows "
        f"({result['heldout']['texts']} held-out texts; no fine-tune: "
        f"{result['base']['perplexity']:.2f})",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    for name in ("method", "perplexity", "vs random", "share from target", "seeds"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method in sorted(summary, key=lambda m: summary[m]["perplexity_mean"]):
        s = summary[method]
        spread = f" ± {s['perplexity_std']:.2f}" if s["seeds"] > 1 else ""
        table.add_row(
            method,
            f"{s['perplexity_mean']:.2f}{spread}",
            "" if s["vs_random"] is None else f"{s['vs_random']:+.2f}",
            "" if s["share_from_target"] is None else f"{s['share_from_target']:.3f}",
            str(s["seeds"]),
        )
    console.print(table)
