"""Evaluation: what each selection method buys on the target, at one budget, over seeds.

    <output_dir>/data, embeddings/          ingest + embed once, shared by every method
    <output_dir>/evaluate/<method>-seed<s>/ select + finetune for one method and seed (from the
                                            shared data/ and embeddings/, by store: no copies)
    <output_dir>/evaluate/oracle-seed<s>/   fine-tuned on the target's own texts
    <output_dir>/evaluation.json            every number below
    <output_dir>/report.html                the same, as plots

Measured per run: perplexity of the fine-tuned model on the target's held-out texts (exp of the
mean token NLL, `engine.lm.perplexity`), next to the base model's (no fine-tune); the share of the
selection that comes from the target (`evaluate.target_rows`); the total-variation distance between
the selection's and the targets' label histograms (`evaluate.label_column`). The oracle trains on
the target texts, cycled or sampled (seeded) to the budget, so it takes as many steps as the others.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysift.engine import task_metric
from raysift.engine.compare import paired_bootstrap, paired_mean_bootstrap, winner
from raysift.engine.embed import pick_device
from raysift.engine.lm import load_finetuned, load_lm, perplexity
from raysift.engine.render import render as render_row
from raysift.jobs.config import PRESETS, VECTOR_SELECTORS, Config, MethodEntry, validate
from raysift.jobs.core.console import progress, say
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import load_pool, read_rows, row_columns, rows_of
from raysift.jobs.core.runfolder import RunFolder, write_json, write_jsonl, write_text
from raysift.jobs.core.runlock import writes_run_folder
from raysift.jobs.core.storage import Store
from raysift.jobs.finetune import check_model
from raysift.jobs.methods import METHODS
from raysift.jobs.stages.ingest import check_input, file_columns, ingest_side
from raysift.jobs.workflows.evaluation_report import render, run_folder


def check_evaluate(cfg: Config) -> None:
    """Every evaluation input check that needs no cluster, before anything is written."""
    e = cfg.evaluate
    if e.heldout is None:
        raise InputError(
            "evaluate.heldout: required: the target's held-out texts (a file like targets.path, "
            "never used for selection) to measure perplexity on"
        )
    check_input(e.heldout, "evaluate.heldout")
    check_input(cfg.candidates, "candidates")
    check_input(cfg.targets, "targets")
    check_model(cfg.finetune.model)
    for column in e.target_rows:
        if column not in cfg.candidates.keep_columns:
            raise InputError(
                f"evaluate.target_rows: column {column!r} is not in candidates.keep_columns "
                f"({cfg.candidates.keep_columns})"
            )


def _prefixed(log: Callable[[str], None], prefix: str, message: str) -> None:
    log(prefix + message)


@writes_run_folder
def run_evaluate(cfg: Config, log: Callable[[str], None] = say) -> Path:
    from raysift.jobs.pipeline import run
    from raysift.jobs.runtime import start_ray
    from raysift.jobs.stages.select import check_budget, needs_embed_stage

    e = cfg.evaluate
    default_seeds = e.seeds or [cfg.seed]
    seeds = sorted({s for m in e.methods for s in (m.seeds or default_seeds)} | set(default_seeds))
    check_evaluate(cfg)
    run_dir = run(cfg, ["ingest"], log)
    check_budget(cfg, load_pool(Store.for_run(run_dir), "candidates"))  # before the embedding
    if any(needs_embed_stage(sub_config(cfg, m, run_dir, cfg.seed)) for m in e.methods):
        run(cfg, ["embed"], log)
    start_ray(cfg.ray)
    heldout = Heldout.load(cfg, run_dir, log)
    what = f"perplexity{f' and {heldout.kind}' if heldout.kind else ''}"
    log(f"evaluate: base model: running ({what} of {len(heldout.rows)} held-out texts)")
    base = heldout_scores(cfg, None, heldout, run_dir / RunFolder.EVALUATE / "base")
    log(f"evaluate: base model: done, {_scores_line(base)}")
    runs = []
    methods = [*e.methods, *([None] if e.oracle else [])]  # None: the oracle
    todo = [(seed, method) for seed in seeds for method in methods
            if seed in ((method.seeds if method else None) or default_seeds)]  # fmt: skip
    for k, (seed, method) in enumerate(todo, 1):
        label = method.name if method else "oracle"
        name = f"run {k}/{len(todo)}: {label}, seed {seed}"
        log(f"evaluate: {name}: running")
        t0 = time.perf_counter()
        sub_log = functools.partial(_prefixed, log, f"{label}, seed {seed}: ")
        runs.append(_one(cfg, run_dir, method, seed, heldout, sub_log))
        log(f"evaluate: {name}: done in {time.perf_counter() - t0:.1f} s, "
            f"{_scores_line(runs[-1])}")  # fmt: skip
    per_text = {(r["method"], r["seed"]): np.asarray(r.pop("per_text")) for r in runs}
    per_item = {(r["method"], r["seed"]): np.asarray(r["task_metric"].pop("per_item"))
                for r in runs if r.get("task_metric")}  # fmt: skip
    if base.get("task_metric"):
        base["task_metric"].pop("per_item", None)
    base.pop("per_text", None)
    shared = json.loads((run_dir / RunFolder.MANIFEST).read_text())["stages"].get("embed", {})
    result = {
        "budget": cfg.select.budget,
        "model": cfg.finetune.model,
        "finetune": cfg.finetune.method,
        "seeds": seeds,
        "heldout": {"texts": len(heldout.rows), "tokens": base["tokens"],
                    "task_metric": heldout.kind},
        "base": base,
        "runs": runs,
        "summary": summarise(runs, base),
        "paired": paired(runs, per_text),
        "paired_task_metric": paired_task(runs, per_item) if per_item else None,
        "embed_seconds": shared.get("seconds"),  # the embed stage, shared by embedding methods
    }
    result["verdict"] = verdict(result)
    write_json(run_dir / RunFolder.EVALUATION, result)
    write_text(run_dir / RunFolder.REPORT, render(result, run_dir))
    return run_dir


def _scores_line(scores: dict) -> str:
    line = f"perplexity {scores['perplexity']:.3f}"
    task = scores.get("task_metric")
    return line + (f", {task['metric']} {task['value']:.3f}" if task else "")


@dataclass
class Heldout:
    """The held-out target rows (target-sized: the driver scores them), ingested as
    `data/heldout/`: each as `engine.render` takes it, and the task metric they allow."""

    rows: list  # texts or conversations
    kind: str | None  # the task metric: multiple_choice, exact_match, or none
    items: list[dict]  # the task's rows: messages (+ choices, answer)

    @classmethod
    def load(cls, cfg: Config, run_dir: Path, log=print) -> Heldout:
        e = cfg.evaluate
        spec = e.heldout
        assert spec is not None  # the config's checks: evaluation needs held-out texts
        source = check_input(spec, "evaluate.heldout")
        names = file_columns(source)
        extra = [c for c in (e.choices_column, e.answer_column)
                 if c in names and c not in spec.keep_columns and e.task_metric in (
                     "auto", "multiple_choice")]  # fmt: skip
        if extra:  # the choices travel with the rows
            spec = spec.model_copy(update={"keep_columns": [*spec.keep_columns, *extra]})
        store = Store.for_run(run_dir)
        ingest_side(spec, "evaluate.heldout", store, "heldout", cfg.ingest)
        pool = load_pool(store, "heldout")
        n = min(pool.n, e.max_texts or pool.n)
        kind = task_kind(cfg, pool, log)
        columns = row_columns(pool) + ([e.choices_column, e.answer_column]
                                       if kind == "multiple_choice" else [])  # fmt: skip
        table = read_rows(pool, 0, n, columns)
        items = [{"messages": r["messages"],
                  **({"choices": r[e.choices_column], "answer": r[e.answer_column]}
                     if kind == "multiple_choice" else {})}
                 for r in table.to_pylist()] if kind else []  # fmt: skip
        return cls(rows_of(table.select(row_columns(pool))), kind, items)


def task_kind(cfg: Config, pool, log=print) -> str | None:
    """The task metric the held-out rows allow and the config asks for (None: none)."""
    e = cfg.evaluate
    if e.task_metric == "none":
        return None
    chat = "messages" in pool.columns
    choices = e.choices_column in pool.columns and e.answer_column in pool.columns
    if e.task_metric == "auto":
        kind = ("multiple_choice" if choices else "exact_match") if chat else None
    else:
        kind = e.task_metric
        if not chat:
            raise InputError(
                f"evaluate.task_metric: {kind} needs conversations: give the held-out rows as "
                "chats (evaluate.heldout.messages_column) or pairs (prompt_columns + "
                "response_column)"
            )
        if kind == "multiple_choice" and not choices:
            raise InputError(
                f"evaluate.task_metric: multiple_choice needs the held-out columns "
                f"{e.choices_column!r} (evaluate.choices_column) and {e.answer_column!r} "
                "(evaluate.answer_column)"
            )
    if kind and not task_metric.available():
        if e.task_metric == "auto":
            log("evaluate: no task metric: lm-evaluation-harness is not installed "
                "(pip install 'raysift[eval]')")  # fmt: skip
            return None
        raise InputError(
            f"evaluate.task_metric: {kind} runs through lm-evaluation-harness: "
            "pip install 'raysift[eval]' (or lm-eval), or set evaluate.task_metric: none"
        )
    return kind


def sub_config(cfg: Config, entry: MethodEntry | None, folder: Path, seed: int) -> Config:
    """The config of one evaluated run: the parent's, in its own folder and seed, selecting with
    the entry's method and options (None: the oracle, which selects nothing)."""
    tree = cfg.model_dump(mode="json")
    tree.update(output_dir=str(folder), seed=seed)
    if entry is None:
        return Config.model_validate(tree)
    tree["select"]["method"] = entry.method
    if entry.representation is not None:
        tree["select"]["representation"] = entry.representation
    elif entry.method in PRESETS or entry.method not in VECTOR_SELECTORS:
        tree["select"]["representation"] = "auto"  # the parent's applies to its own method
    if entry.options:  # random has no section of its own: only entries with options touch one
        section = METHODS[entry.method].section
        if section is None:
            raise InputError(f"evaluate.methods: {entry.name}: {entry.method} has no options")
        tree["select"][section] = {**tree["select"].get(section, {}), **entry.options}
    return validate(tree, f"evaluate.methods: {entry.name}")


def _one(cfg: Config, run_dir: Path, entry: MethodEntry | None, seed: int, heldout, log) -> dict:
    from raysift.jobs.finetune import run_finetune
    from raysift.jobs.pipeline import run

    method = entry.name if entry else "oracle"
    sub = run_folder(run_dir, method, seed)
    sub.mkdir(parents=True, exist_ok=True)
    data = Store.for_run(run_dir)  # the shared pool and embeddings
    sub_cfg = sub_config(cfg, entry, sub, seed)
    if entry is None:
        _oracle_rows(run_dir, sub / RunFolder.SELECTED, cfg.select.budget, seed)
        log("finetune: running (on the target's own rows)")
        t0 = time.perf_counter()
        info = run_finetune(sub_cfg, sub)
        log(f"finetune: done in {time.perf_counter() - t0:.1f} s")
        shares = {"share_from_target": 1.0, "label_tv": _label_tv(cfg, run_dir, None)}
        cost = None
    else:
        run(sub_cfg, ["select", "finetune"], log, data=data)
        stages = json.loads((sub / RunFolder.MANIFEST).read_text())["stages"]
        info = stages["finetune"]
        cost = selection_cost(stages["select"])
        selection = pq.read_table(sub / RunFolder.SELECTION)
        shares = {
            "share_from_target": _share(cfg, selection),
            "label_tv": _label_tv(cfg, run_dir, selection),
        }
    ppl = heldout_scores(sub_cfg, sub / RunFolder.MODEL, heldout, sub)
    plan = sub_cfg.plan() if entry is not None else None
    return {
        "method": method,
        "seed": seed,
        "selector": plan.selector if plan else None,
        "representation": plan.representation if plan else None,
        "aggregation": plan.aggregation if plan else None,
        "score": METHODS[plan.method].score if plan else None,
        **{k: ppl[k] for k in ("perplexity", "loss")},
        "task_metric": ppl.get("task_metric"),
        **shares,
        "steps": info["steps"],
        "final_train_loss": info["final_loss"],
        "train_seconds": info["train_seconds"],
        "selection_cost": cost,
        "folder": str(sub.relative_to(run_dir)),
        "per_text": ppl["per_text"],  # summed NLL and tokens per held-out text (popped later)
    }


def selection_cost(stage: dict) -> dict:
    """What a selection cost: the select stage's wall (the representation it computed included),
    and that wall times the cluster's CPUs / GPUs (what the cluster gave it, an upper bound on
    what it used)."""
    import ray

    seconds = float(stage.get("seconds", 0.0))
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return {"seconds": round(seconds, 2),
            "representation_seconds": stage.get("representation_seconds"),
            "cluster_core_seconds": round(seconds * cpus, 1),
            "cluster_gpu_seconds": round(seconds * gpus, 1)}  # fmt: skip


def _task_summary(runs: list[dict]) -> dict:
    values = [r["task_metric"]["value"] for r in runs if r.get("task_metric")]
    if not values:
        return {}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"task_metric": runs[0]["task_metric"]["metric"],
            "task_metric_mean": float(np.mean(values)), "task_metric_std": std}  # fmt: skip


def _mean_cost(runs: list[dict], key: str) -> float | None:
    values = [r["selection_cost"][key] for r in runs if r.get("selection_cost")]
    return float(np.mean(values)) if values else None


def _oracle_rows(run_dir: Path, out: Path, budget: int, seed: int) -> None:
    """The target texts as a selection of `budget` rows: all of them, cycled in a seeded order
    when there are fewer, a seeded sample when there are more."""
    pool = load_pool(Store.for_run(run_dir), "targets")
    targets = read_rows(pool, 0, pool.n, ["id", "text"])  # target-sized
    order = np.random.default_rng(seed).permutation(targets.num_rows)
    take = np.resize(order, budget)
    rows = targets.take(pa.array(take))
    write_jsonl(out, rows.append_column("rank", pa.array(np.arange(budget))))


def _share(cfg: Config, selection: pa.Table) -> float | None:
    rules = cfg.evaluate.target_rows
    if not rules:
        return None
    mask = np.ones(selection.num_rows, bool)
    for column, values in rules.items():
        mask &= pc.is_in(pc.cast(selection[column], pa.string()), pa.array(values)).to_numpy(
            zero_copy_only=False
        )
    return float(mask.mean())


def _label_tv(cfg: Config, run_dir: Path, selection: pa.Table | None) -> float | None:
    """TV distance between the label histograms of the selection (None: the targets' own
    oracle rows, 0) and of the targets; None where either side has no label column."""
    column = cfg.evaluate.label_column
    pool = load_pool(Store.for_run(run_dir), "targets")
    if column is None or column not in pool.columns:
        return None
    targets = read_rows(pool, 0, pool.n, [column])  # target-sized
    if selection is None:
        return 0.0
    if column not in selection.column_names:
        return None
    a = Counter(map(str, selection[column].to_pylist()))
    b = Counter(map(str, targets[column].to_pylist()))
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def heldout_scores(cfg: Config, trained: Path | None, heldout: Heldout, folder: Path) -> dict:
    """Held-out perplexity (on the scored tokens: a conversation's assistant turns) and the task
    metric of the base model (trained None) or a fine-tune's output, each cached in `folder`
    under the model's and rows' fingerprint (perplexity.json, task_metric.json)."""
    import torch

    e = cfg.evaluate
    key = hashlib.sha256(json.dumps([e.max_length, heldout.rows, RENDERING]).encode())
    if trained is not None:  # the fine-tune's own fingerprint: its rows, settings and seed
        key.update((folder / RunFolder.FINGERPRINT).read_text().encode())
    else:
        key.update(cfg.finetune.model.encode())
    ppl_key = key.hexdigest()
    key.update(json.dumps([heldout.kind, heldout.items, e.max_new_tokens]).encode())
    task_key = key.hexdigest()
    result = _cached(folder / "perplexity.json", ppl_key, "per_text")
    task = _cached(folder / "task_metric.json", task_key, "per_item") if heldout.kind else None
    if result is not None and (task is not None or not heldout.kind):
        return {**result, "task_metric": task}
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(None if cfg.finetune.gpu == "auto" else False)
    if trained is None:
        model, tokenizer = load_lm(cfg.finetune.model, device)
    else:
        model, tokenizer = load_finetuned(cfg.finetune.model, trained, device)
    if result is None:
        examples = [render_row(tokenizer, r, e.max_length) for r in heldout.rows]
        with progress("perplexity", len(examples), "texts") as shown:
            result = perplexity(
                model, examples, tokenizer.pad_token_id, batch_size=e.batch_size,
                precision="fp32", on_batch=shown.update,
            )  # fmt: skip
        write_json(folder / "perplexity.json", {"key": ppl_key, "result": result})
    if heldout.kind and task is None:
        task = task_metric.measure(model, tokenizer, heldout.items, heldout.kind,
                                   folder / "task", batch_size=e.batch_size,
                                   max_new_tokens=e.max_new_tokens)  # fmt: skip
        write_json(folder / "task_metric.json", {"key": task_key, "result": task})
    return {**result, "task_metric": task}


RENDERING = "render/1"  # engine.render's rows: in the scores' key (the end token, the template)


def _cached(path: Path, key: str, needs: str) -> dict | None:
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key and needs in saved["result"]:
            return saved["result"]
    return None


def _seed_mean(runs: list[dict], per_text: dict, method: str) -> tuple[np.ndarray, np.ndarray]:
    """A method's per-text NLL averaged over its seeds, and the texts' tokens."""
    mine = [per_text[(r["method"], r["seed"])] for r in runs if r["method"] == method]
    return np.mean([m[:, 0] for m in mine], axis=0), mine[0][:, 1]


def paired(runs: list[dict], per_text: dict, resamples: int = 2000) -> dict:
    """For every ordered pair of methods: the perplexity difference on the same held-out texts
    (NLL averaged over seeds) and its 95% paired-bootstrap interval over texts
    (`engine.compare`)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    nll = {m: _seed_mean(runs, per_text, m) for m in methods}
    out: dict = {}
    for a in methods:
        for b in methods:
            if a != b:
                d, low, high = paired_bootstrap(nll[a][0], nll[b][0], nll[a][1],
                                                resamples=resamples)  # fmt: skip
                out.setdefault(a, {})[b] = {"diff": d, "low": low, "high": high}
    return out


def paired_task(runs: list[dict], per_item: dict, resamples: int = 2000) -> dict:
    """For every ordered pair of methods: the task metric's difference on the same held-out
    items (seed-averaged) and its 95% paired-bootstrap interval over items."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    mean = {m: np.mean([per_item[(r["method"], r["seed"])] for r in runs if r["method"] == m],
                       axis=0) for m in methods}  # fmt: skip
    out: dict = {}
    for a in methods:
        for b in methods:
            if a != b:
                d, low, high = paired_mean_bootstrap(mean[a], mean[b], resamples=resamples)
                out.setdefault(a, {})[b] = {"diff": d, "low": low, "high": high}
    return out


def verdict(result: dict) -> str:
    """The one line naming the selection method to trust for this target (the oracle, which
    trains on the targets themselves, is not a candidate)."""
    means = {m: s["perplexity_mean"] for m, s in result["summary"].items() if m != "oracle"}
    intervals = {(a, b): (v["low"], v["high"]) for a, row in result["paired"].items()
                 for b, v in row.items()}  # fmt: skip
    return winner(means, intervals)


def summarise(runs: list[dict], base: dict) -> dict:
    """Per method: mean and spread (sample std) of perplexity over seeds, shares, and the mean
    change against random and against the base model."""
    out = {}
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    random_mean = (
        float(np.mean([r["perplexity"] for r in by_method["random"]]))
        if "random" in by_method
        else None
    )
    for method, rs in by_method.items():
        ppl = np.array([r["perplexity"] for r in rs])
        shares = [r["share_from_target"] for r in rs if r["share_from_target"] is not None]
        tvs = [r["label_tv"] for r in rs if r["label_tv"] is not None]
        out[method] = {
            **{k: rs[0].get(k) for k in ("selector", "representation", "aggregation", "score")},
            "seeds": len(rs),
            "perplexity_mean": float(ppl.mean()),
            "perplexity_std": float(ppl.std(ddof=1)) if len(ppl) > 1 else None,  # one seed
            "perplexity_min": float(ppl.min()),
            "perplexity_max": float(ppl.max()),
            "vs_base": float(ppl.mean() - base["perplexity"]),
            "vs_random": None if random_mean is None else float(ppl.mean() - random_mean),
            "share_from_target": float(np.mean(shares)) if shares else None,
            "label_tv": float(np.mean(tvs)) if tvs else None,
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "selection_seconds_mean": _mean_cost(rs, "seconds"),
            **_task_summary(rs),
            "selection_core_seconds_mean": _mean_cost(rs, "cluster_core_seconds"),
        }
    return out
