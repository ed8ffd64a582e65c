"""The Python API: `select`, `run`, `evaluate`, `open_run`, `methods`.

`select` takes the pool and the targets as what a notebook holds -- a pandas DataFrame, a pyarrow
Table, a list of texts -- or as what a cluster holds: a path (file, folder, glob, s3://, gs://) or
a Ray Dataset. A pool held in memory, below `LOCAL_ROWS` rows, is selected in this process with
the engine's code (no Ray is started); paths, Ray Datasets, larger pools and the methods with no
in-process form (DSIR, GradEx) run the pipeline on Ray (`ray.address` in `config`, else a local
cluster), in a run folder (`output_dir`, else a temporary folder). Either way the result has
`selection.parquet`'s columns. Nothing here changes the caller's global Ray Data context.

```python
import raysift
from raysift.demo import load

demo = load(rows=1000)
result = raysift.select(demo.pool, demo.targets, method="tsds", budget=100, seed=0, alpha=0.5)
result.table              # id, row, rank, score, probability, count, + keep_columns
result.p                  # TSDS: (row, id, probability) on its support
```
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raysift.jobs.config import Config, load_config, validate
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.runfolder import RunFolder

LOCAL_ROWS = 100_000  # in-process below this many in-memory candidate rows (unless `ray=` says)
IN_MEMORY = "<in memory>"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    needs: tuple[str, ...]  # "vectors" (a representation), "texts", "sources" (a source column)
    in_process: bool  # whether `select` can run it without Ray (on an in-process representation)


def methods() -> dict[str, MethodInfo]:
    """The selection methods, from the method table (`raysift.jobs.methods.METHODS`)."""
    from raysift.jobs.methods import METHODS

    return {name: MethodInfo(name, m.summary, tuple(sorted(m.needs)), m.in_process)
            for name, m in METHODS.items()}  # fmt: skip


def representations() -> dict[str, str]:
    """What a row can be to knn, tsds and gotd: name -> summary (`jobs.methods.REPRESENTATIONS`;
    `select(..., representation=name)`)."""
    from raysift.jobs.methods import REPRESENTATIONS

    return {name: r.summary for name, r in REPRESENTATIONS.items()}


@dataclass
class Result:
    """A selection: `table` has `selection.parquet`'s columns (id, row, rank, score, probability,
    count, then the candidates' keep columns), best first. `extras` holds what the method adds
    (read from the run folder on first use):
    TSDS's `p` (a Table of row, id, probability on the support), GOT-D's `potentials` (a Table
    of target id, f). `run_dir` is the run folder when the selection ran on Ray."""

    method: str
    table: pa.Table
    info: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    run_dir: Path | None = None

    def to_pandas(self):
        return self.table.to_pandas()

    def to_ray_dataset(self):
        """The selection as a Ray Dataset (`ray.data.from_arrow`): what a Ray Data pipeline
        reads next (joins on `id` with the pool, a `map_batches`, a `write_parquet`)."""
        import ray.data

        return ray.data.from_arrow(self.table)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def _extra(self, name: str) -> pa.Table | None:
        value = self.extras.get(name)
        if callable(value):  # read from the run folder on first use (TSDS's support can be big)
            value = self.extras[name] = value()
        return value

    @property
    def p(self) -> pa.Table | None:
        return self._extra("p")

    @property
    def potentials(self) -> pa.Table | None:
        return self._extra("potentials")


@dataclass
class Run:
    """A run folder, local or remote (`open_run`): its selection, manifest and evaluation."""

    path: str
    selection: pa.Table | None
    manifest: dict
    evaluation: dict | None
    _store: Any = None

    def selected(self) -> list[dict]:
        """selected.jsonl: the chosen rows with their text, in rank order."""
        text = self._store.read_bytes(RunFolder.SELECTED).decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def result(self) -> Result:
        method = self.manifest.get("config", {}).get("select", {}).get("method", "")
        return Result(method, self.selection, self.manifest.get("stages", {}).get("select", {}),
                      _extras(self._store, method), Path(self.path))  # fmt: skip


def open_run(path: str | Path) -> Run:
    """Read a run folder (a path or an s3:// / gs:// URI) without touching its bulk folders."""
    from raysift.jobs.core.storage import Store, filesystem, is_remote

    uri = str(path)
    if is_remote(uri):
        fs, root = filesystem(uri)
        store = Store(fs, root, uri)
    else:
        store = Store.local(Path(uri))
    if not store.is_file(RunFolder.MANIFEST):
        raise InputError(f"{uri}: not a raysift run folder (no manifest.json)")
    selection = None
    if store.is_file(RunFolder.SELECTION):
        selection = store.parquet(RunFolder.SELECTION).read()
    evaluation = None
    if store.is_file(RunFolder.EVALUATION):
        evaluation = store.read_json(RunFolder.EVALUATION)
    return Run(uri, selection, store.read_json(RunFolder.MANIFEST), evaluation, store)


def _extras(store, method: str) -> dict:
    """What the method adds to its result (`Method.outputs`), each read on first use."""
    from raysift.jobs.methods import METHODS

    outputs = METHODS[method].outputs if method in METHODS else {}
    return {name: functools.partial(read, store) for name, read in outputs.items()}


def run(config: str | Path | Config, stages: Sequence[str] | None = None,
        overrides: Sequence[str] = ()) -> Path:  # fmt: skip
    """Run a config's pipeline (its `stages`, or the ones given); returns the run folder."""
    from raysift.jobs.pipeline import run as run_pipeline

    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    return run_pipeline(cfg, list(stages) if stages else None)


def evaluate(config: str | Path | Config, overrides: Sequence[str] = ()) -> dict:
    """Fine-tune on each of `evaluate.methods`' selections and score the held-out texts;
    returns evaluation.json's content (report.html lands in the run folder)."""
    from raysift.jobs.workflows.evaluate import run_evaluate

    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    run_dir = run_evaluate(cfg)
    return json.loads((Path(run_dir) / RunFolder.EVALUATION).read_text())


# -- select ----------------------------------------------------------------------------------------


def _is_path(x) -> bool:
    return isinstance(x, str | Path)


def _is_dataset(x) -> bool:
    return type(x).__name__ in ("Dataset", "MaterializedDataset") and hasattr(x, "write_parquet")


def _as_table(x, field_name: str, text_column: str) -> pa.Table:
    if isinstance(x, pa.Table):
        table = x
    elif hasattr(x, "to_numpy") and hasattr(x, "columns"):  # a pandas DataFrame
        table = pa.Table.from_pandas(x, preserve_index=False)
    elif isinstance(x, Sequence) and all(isinstance(t, str) for t in x):
        table = pa.table({text_column: pa.array(list(x), pa.string())})
    else:
        raise InputError(
            f"{field_name}: expected a DataFrame, a pyarrow Table, a list of texts, a path or a "
            f"Ray Dataset, got {type(x).__name__}"
        )
    if text_column not in table.column_names:
        raise InputError(
            f"{field_name}: no text column {text_column!r} (columns: {table.column_names}); "
            "pass text_column="
        )
    return table


def _clean(table: pa.Table, field_name: str, text_column: str, id_column: str | None):
    """What the ingest stage does to rows: blank texts dropped, ids from the id column or derived
    from the text, duplicates of an id dropped (the first kept)."""
    from raysift.engine.ids import content_ids

    texts = table.column(text_column).to_pylist()
    keep = [i for i, t in enumerate(texts) if t is not None and str(t).strip()]
    if not keep:
        raise InputError(f"{field_name}.text_column: every row has an empty text")
    table = table.take(pa.array(keep, pa.int64()))
    if id_column is None:
        ids = content_ids(table.column(text_column).to_pylist())
    else:
        if id_column not in table.column_names:
            raise InputError(f"{field_name}.id_column: no column {id_column!r}")
        ids = [str(v) for v in table.column(id_column).to_pylist()]
    first: dict[str, int] = {}
    for i, v in enumerate(ids):
        first.setdefault(v, i)
    rows = sorted(first.values())
    table = table.take(pa.array(rows, pa.int64()))
    return table, np.asarray([ids[i] for i in rows], dtype=str)


def select(
    candidates,
    targets=None,
    *,
    method: str = "knn",
    representation: str | None = None,
    budget: int = 100,
    seed: int = 0,
    ray: bool | None = None,
    text_column: str = "text",
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
    output_dir: str | Path | None = None,
    config: dict | None = None,
    **options,
) -> Result:
    """Select `budget` candidate rows for the targets with `method` (`methods()` lists them),
    for knn, tsds and gotd on `representation` (`representations()`; None: embedding, or your
    vectors when `config` names a vector_column).

    `options` are the method's own settings (its config section, e.g. `aggregation="round_robin"`
    for knn (`select.knn.*`), `alpha=0.5` for tsds, `model=` for rds (`select.lm_hidden.*`));
    `config` adds any other config sections (e.g.
    `{"embed": {"batch_size": 32}, "ray": {"address": "auto"}}`). `ray`: None = in-process when
    the pool is in memory and small enough, else on Ray; True / False force one. Same seed and
    settings = the same selection, in-process or on Ray (ids, ranks; scores to float tolerance).

    A list of texts, in-process (every example here runs in the test suite, as written):

    ```python
    import raysift

    pool = ["a cat sat on the mat", "dogs bark loudly", "def add(a, b): return a + b"]
    raysift.select(pool, ["a kitten"], method="knn", budget=1).ids
    ```

    A DataFrame, carrying a column into the result:

    ```python
    import pandas as pd
    import raysift

    pool = pd.read_parquet("demo/pool.parquet").head(1000)
    result = raysift.select(pool, ["a target text", "another"], method="tsds",
                            budget=50, keep_columns=["source"], alpha=0.5)
    result.to_pandas().head()      # id, row, rank, score, probability, count, source
    ```

    On Ray, from files, into a run folder:

    ```python
    import raysift

    result = raysift.select("demo/pool.parquet", "demo/targets.jsonl", method="gotd",
                            budget=100, output_dir="runs/gotd",
                            config={"candidates": {"limit": 500}})  # any config section
    raysift.open_run("runs/gotd").manifest["stages"]["select"]
    ```

    The same on a cluster, with the run folder on S3:

    <!-- example: skip needs a running cluster and an S3 bucket -->
    ```python
    result = raysift.select("s3://bucket/pool/", "s3://bucket/targets.jsonl", method="gotd",
                            budget=10_000, output_dir="s3://bucket/runs/gotd",
                            config={"ray": {"address": "auto"}})
    ```
    """
    from raysift.jobs.methods import METHODS, REPRESENTATIONS

    if method not in METHODS:
        raise InputError(f"method: {method!r} is not one of {sorted(METHODS)}")
    if representation is not None and representation not in REPRESENTATIONS:
        raise InputError(
            f"representation: {representation!r} is not one of {sorted(REPRESENTATIONS)}"
        )
    tree = _tree(method, representation, budget, seed, text_column, id_column, keep_columns,
                 config, options)  # fmt: skip
    plan = validate(tree, "raysift.select").plan()  # a bad combination fails here, before work
    rep = REPRESENTATIONS[plan.representation] if plan.representation else None
    local = METHODS[method].local if rep is None or rep.local is not None else None
    needs = METHODS[method].needs
    if targets is None and needs & {"vectors", "texts"}:
        raise InputError(f"targets: method {method!r} selects for targets; pass them")
    in_memory = not (_is_path(candidates) or _is_dataset(candidates)) and not (
        targets is not None and (_is_path(targets) or _is_dataset(targets)))
    if in_memory:  # checked here: a bad type or column fails before any work
        candidates = _as_table(candidates, "candidates", text_column)
        if targets is not None:
            targets = _as_table(targets, "targets", text_column)
    if ray is False and not (in_memory and local):
        why = "it has no in-process form" if not local else "the inputs are not in memory"
        raise InputError(f"ray=False: method {method!r} needs Ray here ({why})")
    if ray is None:
        ray = not (in_memory and local and candidates.num_rows <= LOCAL_ROWS)
    if not ray:
        return _select_local(candidates, targets, tree)
    return _select_on_ray(candidates, targets, tree, output_dir)


def _tree(method, representation, budget, seed, text_column, id_column, keep_columns, config,
          options) -> dict:  # fmt: skip
    from raysift.jobs.methods import METHODS

    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in (config or {}).items()}
    side = {"path": IN_MEMORY, "text_column": text_column, "id_column": id_column}
    tree.setdefault("output_dir", IN_MEMORY)
    tree["seed"] = seed
    tree["candidates"] = {**side, "keep_columns": list(keep_columns), **tree.get("candidates", {})}
    tree["targets"] = {**side, "id_column": None, **tree.get("targets", {})}
    sel = tree.setdefault("select", {})
    sel.update(method=method, budget=budget)
    if representation is not None:
        sel["representation"] = representation
    if options:
        section = METHODS[method].section
        if section is None:
            raise InputError(f"{sorted(options)[0]}: method {method!r} has no options")
        sel[section] = {**sel.get(section, {}), **options}
    return tree


def _select_local(candidates, targets, tree: dict) -> Result:
    from raysift.jobs.methods import METHODS, REPRESENTATIONS, InMemory
    from raysift.jobs.stages.select import checks, selection_table

    cfg = validate(tree, "raysift.select")
    checks(cfg)
    plan = cfg.plan()
    method = METHODS[plan.method]
    c, t = cfg.candidates, cfg.targets
    pool, ids = _clean(_as_table(candidates, "candidates", c.text_column), "candidates",
                       c.text_column, c.id_column)  # fmt: skip
    missing = [k for k in c.keep_columns if k not in pool.column_names]
    if missing:
        raise InputError(f"candidates.keep_columns: no column {missing[0]!r}")
    if cfg.select.budget > len(ids):
        raise InputError(
            f"select.budget: {cfg.select.budget} is larger than the pool ({len(ids)} candidates)"
        )
    data = InMemory(cfg, ids)
    target_ids, tgt = None, None
    if targets is not None:
        tgt, target_ids = _clean(_as_table(targets, "targets", t.text_column), "targets",
                                 t.text_column, t.id_column)  # fmt: skip
        data.target_table = tgt
    if plan.representation is not None:
        represent = REPRESENTATIONS[plan.representation].local
        assert represent is not None and tgt is not None  # checks(cfg): in-process, with targets
        data.vectors, data.target_vectors = represent(cfg, pool, tgt)
    assert method.local is not None  # checks(cfg): the method runs in-process
    sel = method.local(data)
    chosen = pa.array(sel.indices, pa.int64())
    rows = pa.table({"id": pa.array(ids[sel.indices], pa.string()),
                     **{k: pool.column(k).take(chosen) for k in c.keep_columns}})  # fmt: skip
    extras = {}
    if sel.potential is not None:
        extras["potentials"] = pa.table({"id": pa.array(target_ids, pa.string()),
                                         "f": pa.array(sel.potential, pa.float32())})  # fmt: skip
    if "p" in method.outputs and sel.p is not None:
        support, p = sel.p
        extras["p"] = pa.table({"row": pa.array(support, pa.int64()),
                                "id": pa.array(ids[support], pa.string()),
                                "probability": pa.array(p, pa.float64())})  # fmt: skip
    table = selection_table(sel, rows, list(c.keep_columns))
    info = {**sel.info, "in_process": True, "selector": plan.selector,
            "representation": plan.representation, "aggregation": plan.aggregation}  # fmt: skip
    return Result(cfg.select.method, table, info, extras)


def _select_on_ray(candidates, targets, tree: dict, output_dir) -> Result:
    from raysift.jobs.core.runlock import hold

    run_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="raysift-"))
    if tree["output_dir"] == IN_MEMORY:
        tree["output_dir"] = str(run_dir)
    with hold(tree["output_dir"]):  # the inputs are written into the run folder too
        return _inputs_and_run(candidates, targets, tree)


def _inputs_and_run(candidates, targets, tree: dict) -> Result:
    from raysift.jobs.core.storage import is_remote
    from raysift.jobs.pipeline import run as run_pipeline

    # In-memory inputs are written once, by this process, to a file the ingest reads: into the
    # run folder when it is local, else beside it in a temporary folder.
    local = Path(tempfile.mkdtemp(prefix="raysift-inputs-")) if is_remote(tree["output_dir"]) else (
        Path(tree["output_dir"]) / "inputs")
    for name, x in (("candidates", candidates), ("targets", targets)):
        if x is None:
            x = ["(no targets)"]  # random and GradEx: the stages still want a target side
        if _is_path(x):
            tree[name]["path"] = str(x)
        elif _is_dataset(x):
            where = f"{tree['output_dir'].rstrip('/')}/inputs/{name}"
            x.write_parquet(where)  # Ray's workers write it; the driver holds none of it
            tree[name]["path"] = where
        else:
            import pyarrow.parquet as pq

            local.mkdir(parents=True, exist_ok=True)
            table = _as_table(x, name, tree[name]["text_column"])
            path = local / f"{name}.parquet"
            staged = local / f".{name}.parquet.new"
            pq.write_table(table, staged)
            # the same rows again (another method, seed, budget): the file and its fingerprint
            # stay, and the run reuses what it ingested and embedded
            if path.is_file() and path.read_bytes() == staged.read_bytes():
                staged.unlink()
            else:
                staged.replace(path)
            tree[name]["path"] = str(path)
    cfg = validate(tree, "raysift.select")
    run_pipeline(cfg, ["ingest", "embed", "select"])
    return open_run(cfg.output_dir).result()
