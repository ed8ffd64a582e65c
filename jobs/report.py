"""Human-readable summaries of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table


def composition(run_dir: Path, column: str = "source") -> list[tuple[str, int, int]]:
    """(value, rows in the pool, rows selected) for each value of `column`, most selected first."""
    pool = pq.read_table(run_dir / "data" / "candidates.parquet", columns=[column])
    chosen = pq.read_table(run_dir / "selection.parquet", columns=[column])

    def counts(table) -> dict[str, int]:
        vc = pc.value_counts(table.column(column).combine_chunks())
        return {str(v["values"]): v["counts"] for v in vc.to_pylist()}

    in_pool, in_sel = counts(pool), counts(chosen)
    rows = [(k, n, in_sel.get(k, 0)) for k, n in in_pool.items()]
    return sorted(rows, key=lambda r: (-r[2], -r[1], r[0]))


def source_table(run_dir: Path, column: str = "source", console: Console | None = None) -> None:
    console = console or Console()
    schema = pq.read_schema(run_dir / "selection.parquet")
    if column not in schema.names:
        console.print(
            f"(no {column!r} column carried into the selection: add it to "
            "candidates.keep_columns for a breakdown)"
        )
        return
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = composition(run_dir, column)
    n_pool = sum(r[1] for r in rows)
    n_sel = sum(r[2] for r in rows)
    method = manifest["config"]["select"]["method"]
    table = Table(title=f"Where the {n_sel} selected rows came from ({method}), next to the pool")
    for name in (column, "pool rows", "pool %", "selected", "selected %"):
        table.add_column(name, justify="left" if name == column else "right")
    for value, in_pool, in_sel in rows:
        table.add_row(
            value,
            f"{in_pool:,}",
            f"{100 * in_pool / n_pool:.1f}",
            f"{in_sel:,}",
            f"{100 * in_sel / max(n_sel, 1):.1f}",
        )
    console.print(table)
    console.print(
        f"selection: {run_dir / 'selection.parquet'}   rows for training: "
        f"{run_dir / 'selected.jsonl'}"
    )
