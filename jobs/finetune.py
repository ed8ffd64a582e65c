"""Fine-tune stage: `selected.jsonl` -> a causal LM trained on it with Ray Train (`TorchTrainer`).

    finetune/ray/train/checkpoint_*   Ray Train checkpoints (trainable weights, optimiser, step)
    finetune/model/                   the result: a LoRA adapter (default) or a full model folder
    finetune/fingerprint              what the checkpoints belong to (rows, settings, seed)
    finetune/result.json              steps, losses, resume point; a rerun with the same
                                      fingerprint reuses the model instead of training again

    finetune/tokens/part-*.parquet    the rows tokenised once (index, input_ids, labels)

Rows train as conversations when they carry messages (`messages_column`), as a user and an
assistant turn when they have both `prompt_column` and `response_column`, else as plain text
(continued pre-training); one rendering for all (`engine.render`: the tokenizer's chat template,
only the assistant turns scored, the end token placed before truncation). The driver streams the
rows file once to check every line (it keeps only the byte offset of every TOKEN_ROWS-th line);
tasks tokenise those ranges into `finetune/tokens/`, and each Ray Train worker reads the tokens of
its own batches only.
Each epoch visits the rows in a seeded permutation; step s always sees the same global batch
(worker r takes every world-th row of it), so a run killed and restarted resumes from its last
checkpoint (Ray Train V2 restores the run of the same name and storage path) and trains exactly
what an uninterrupted run would have. Checkpoints whose fingerprint differs from the current rows
and settings are removed before training: a rerun on a new selection starts from step 0, not from
a stale checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysift.engine.lm import resolve_lm_path
from raysift.engine.loading import quiet
from raysift.engine.render import RenderError, render, row_of
from raysift.jobs.config import Config, FinetuneConfig, result_settings
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.runfolder import RunFolder, atomic_path, write_json, write_text
from raysift.jobs.core.storage import Store, shared_path

STATE = "state.pt"
TOKENS = RunFolder.TOKENS
EPOCHS = RunFolder.EPOCHS


TOKEN_ROWS = 4096  # rows per tokens part


def scan_rows(path: Path, f: FinetuneConfig) -> list[int]:
    """Check every line of the rows file (streamed: nothing kept but offsets); returns the byte
    offset of every TOKEN_ROWS-th row (the tokenising plan) followed by the file's size. Blank
    lines are skipped."""
    if not path.is_file():
        raise InputError(f"{path}: no selected rows; run the select stage first")
    offsets, rows, at = [], 0, 0
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            start, at = at, at + len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InputError(f"{path}: line {n} is not JSON") from None
            try:
                training_row(row if isinstance(row, dict) else {}, f)
            except RenderError as exc:
                raise InputError(
                    f"{path}: line {n}: {exc} (finetune.text_column '{f.text_column}', "
                    f"messages_column '{f.messages_column}', prompt_column + response_column "
                    f"'{f.prompt_column}' + '{f.response_column}')"
                ) from None
            if rows % TOKEN_ROWS == 0:
                offsets.append(start)
            rows += 1
    if not rows:
        raise InputError(f"{path}: no selected rows to fine-tune on (the file is empty)")
    return [*offsets, at]


def training_row(row: dict, f: FinetuneConfig):
    """A rows-file line as `engine.render.render` takes it: a conversation, a pair, or text."""
    return row_of(row, f.text_column, f.messages_column, f.prompt_column, f.response_column)


def check_model(name: str, field: str = "finetune.model") -> Path:
    """The local folder of causal LM `name` (the packaged one converted here, once, rather than in
    every worker); a missing one is bad input naming `field`."""
    try:
        return resolve_lm_path(name, field)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None


def check_finetune(cfg: Config, rows_path: Path) -> list[int]:
    """Every fine-tune input check that needs no cluster: rows and model (converting the
    packaged one once, here rather than in every worker), before any output. Returns the rows
    file's tokenising plan (`scan_rows`)."""
    plan_ = scan_rows(rows_path, cfg.finetune)
    check_model(cfg.finetune.model)
    adapter = cfg.finetune.init_adapter
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(f"finetune.init_adapter: {adapter} is not a LoRA adapter folder")
    return plan_


class Tokenise:
    """One range of the rows file -> finetune/tokens/part-K.parquet (run by a task per part)."""

    def __init__(self, store: Store, rows: str, f: dict) -> None:
        from raysift.engine import lm

        self.store, self.rows = store, rows
        self.f = FinetuneConfig(**f)
        self.tokenizer = lm.load_tokenizer(self.f.model)

    def __call__(self, r: dict) -> dict:
        f = self.f
        with self.store.fs.open_input_file(self.store.path(self.rows)) as fh:
            fh.seek(r["a"])
            lines = [x for x in fh.read(r["b"] - r["a"]).split(b"\n") if x.strip()]
        examples = [render(self.tokenizer, training_row(json.loads(line), f), f.max_length)
                    for line in lines]  # fmt: skip
        index = np.arange(r["first"], r["first"] + len(examples), dtype=np.int64)
        table = pa.table({
            "index": index,
            "input_ids": pa.array([e.input_ids for e in examples], pa.list_(pa.int32())),
            "labels": pa.array([e.labels for e in examples], pa.list_(pa.int32())),
        })  # fmt: skip
        self.store.write_parquet(f"{TOKENS}/part-{r['k']:05d}.parquet", table)
        return {"k": r["k"], "rows": len(examples)}


def _tokenise(store: Store, rows: str, f: dict, r: dict) -> dict:
    return Tokenise(store, rows, f)(r)


def tokenise(store: Store, rows_rel: str, offsets: list[int], f: FinetuneConfig) -> int:
    """Tokenise the rows file once into `finetune/tokens/` (parts already there are kept: a
    killed run resumes); returns the number of rows."""
    import ray

    have = set(store.list(TOKENS))
    todo = [{"k": k, "a": a, "b": b, "first": k * TOKEN_ROWS}
            for k, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True))
            if f"part-{k:05d}.parquet" not in have]  # fmt: skip
    if todo:  # a task per part: tasks reuse Ray's warm worker processes (an actor would start
        # one, ~5 s of imports, before the fine-tune's own workers start theirs)
        task = ray.remote(num_cpus=1)(_tokenise)
        ray.get([task.remote(store, rows_rel, f.model_dump(mode="json"), r) for r in todo])
    return sum(store.parquet(f"{TOKENS}/part-{k:05d}.parquet").metadata.num_rows
               for k in range(len(offsets) - 1))  # fmt: skip


def load_tokens(store: Store, wanted: np.ndarray) -> dict:
    """{index: Example} for the wanted row indices, reading only the parts that hold them."""
    import pyarrow.parquet as pq

    from raysift.engine import lm

    wanted = np.unique(np.asarray(wanted, np.int64))
    out = {}
    for k in np.unique(wanted // TOKEN_ROWS):
        table = pq.read_table(store.path(f"{TOKENS}/part-{k:05d}.parquet"), filesystem=store.fs)
        local = wanted[wanted // TOKEN_ROWS == k] - k * TOKEN_ROWS
        table = table.take(pa.array(local))
        for i, ids, labels in zip(table["index"].to_pylist(), table["input_ids"].to_pylist(),
                                  table["labels"].to_pylist(), strict=True):  # fmt: skip
            out[i] = lm.Example(ids, labels)
    return out


def fingerprint(rows_path: Path, f: FinetuneConfig, seed: int) -> str:
    """What the fine-tuned model depends on: the rows, the settings that change the result
    (model, hyper-parameters, workers -- the global batch --, precision, device), the seed; not
    the execution-only ones (fields marked `execution_only`: threads, CPUs, checkpoint cadence)."""
    h = hashlib.sha256()
    with rows_path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    settings = result_settings({"finetune": f.model_dump(mode="json")})["finetune"]
    h.update(json.dumps({"finetune": settings, "seed": seed}).encode())
    if f.init_adapter:  # the starting weights, not only their path
        for p in sorted(Path(f.init_adapter).glob("adapter_*")):
            h.update(p.read_bytes())
    return h.hexdigest()


def plan(n_rows: int, f: FinetuneConfig, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): global batch = batch_size x workers."""
    per_epoch = math.ceil(n_rows / (f.batch_size * world))
    return per_epoch, f.max_steps or f.epochs * per_epoch


def train_loop(c: dict) -> None:
    """One Ray Train worker: load, wrap (LoRA or full), restore, train, checkpoint."""
    import numpy as np
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from raysift.engine import lm

    f = FinetuneConfig(**c["finetune"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(
        f.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    )
    torch.manual_seed(c["seed"])
    device = get_device()
    model, tokenizer = lm.load_lm(f.model, device)
    if f.init_adapter:  # continue training an adapter (GradEx fine-tunes from theta*)
        from peft import PeftModel

        with quiet():
            model = PeftModel.from_pretrained(model, f.init_adapter, is_trainable=True)
        model = model.to(device)
    elif f.method == "lora":
        model = lm.with_lora(
            model, r=f.lora_r, alpha=f.lora_alpha, dropout=f.lora_dropout,
            target_modules=f.lora_target_modules,
        )  # fmt: skip
    n_rows, store = c["rows"], c["store"]  # the tokens are read from the run folder's store
    per_epoch, total = plan(n_rows, f, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=f.learning_rate, weight_decay=f.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lm.lr_factor(s, total, f.warmup_steps)
    )
    step, losses = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location=device, weights_only=False)
        names = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                names[name].copy_(value)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses = state["step"], state["losses"]
    resumed_from = saved = step
    cpu0 = time.process_time() - (state.get("cpu_seconds", 0.0) if checkpoint else 0.0)
    net = prepare_model(model)  # DDP across workers; the device move
    net.train()
    since, loaded, t_loop = [], None, time.perf_counter()
    while step < total:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([c["seed"], epoch]).permutation(n_rows)
        width = f.batch_size * world
        if loaded != epoch:  # this worker's rows for the rest of the epoch, and nothing else
            mine = [order[j * width : (j + 1) * width][rank::world] for j in range(i, per_epoch)]
            examples = load_tokens(store, np.concatenate([*mine, order[:1]]))
            loaded = epoch
        batch_rows = order[i * width : (i + 1) * width][rank::world]
        if len(batch_rows):
            batch = lm.collate([examples[j] for j in batch_rows], tokenizer.pad_token_id)
        else:  # the epoch's last batch has fewer rows than workers: join DDP with a zero loss
            batch = lm.collate([examples[order[0]]], tokenizer.pad_token_id)
            batch["labels"].fill_(lm.IGNORE)
        with lm.autocast(device, f.precision):
            nll, n = lm.token_nll(net, {k: v.to(device) for k, v in batch.items()})
        (nll / n.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        since.append(float(nll.detach()) / max(int(n), 1))
        if c.get("epoch_states") and rank == 0 and (step % per_epoch == 0 or step == total):
            save_epoch_state(store, c["epoch_states"], model, opt, step, per_epoch)
        if rank == 0 and c.get("progress") is not None:
            c["progress"].put.remote({"done": step, "loss": float(np.mean(since[-10:])),
                                      "last_checkpoint": saved})  # fmt: skip
        if step % f.checkpoint_every and step < total:
            continue
        saved = step
        losses.append([step, float(np.mean(since))])
        metrics = {"step": step, "total_steps": total, "loss": losses[-1][1],
                   "losses": [list(x) for x in losses], "resumed_from": resumed_from,
                   "epoch": epoch, "cpu_seconds": time.process_time() - cpu0,
                   "loop_seconds": time.perf_counter() - t_loop}  # this run's steps, no start-up
        since = []
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                weights = {
                    n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad
                }
                torch.save(
                    {"weights": weights, "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "step": step, "losses": losses,
                     "cpu_seconds": metrics["cpu_seconds"]},
                    Path(d) / STATE,
                )  # fmt: skip
                if step == total:
                    with quiet():
                        model.save_pretrained(Path(d) / "model")
                        if f.method == "full":
                            tokenizer.save_pretrained(Path(d) / "model")
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None
            )


def epoch_state_name(epoch: int) -> str:
    return f"epoch-{epoch:03d}.pt"


def save_epoch_state(store: Store, folder: str, model, opt, step: int, per_epoch: int) -> None:
    """The end of an epoch (LESS's warm-up checkpoints): the trainable weights and AdamW's
    moments by parameter name, and the step, as `<folder>/epoch-NNN.pt` (1-based epochs)."""
    import io

    import torch

    from raysift.engine.less import moments_by_name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    state = {
        "weights": {n: p.detach().cpu() for n, p in named},
        "moments": moments_by_name(named, opt),
        "step": step,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    epoch = math.ceil(step / per_epoch)
    store.write_bytes(f"{folder}/{epoch_state_name(epoch)}", buffer.getvalue())


def _trainer_class():
    """TorchTrainer whose Ctrl-C / SIGTERM aborts the run and raises `Interrupted` (Ray Train's
    own handler logs a line and exits 1, which the manifest would record as a crash). The
    checkpoints already reported stay: a rerun resumes from the last one."""
    import signal

    import ray
    from ray.train.torch import TorchTrainer

    from raysift.jobs.runtime import _raise as interrupt

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            def stop(signum, frame):
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - the controller may be gone already
                    pass
                interrupt(signum, frame)  # -> Interrupted at the pipeline

            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, stop)

    return Trainer


def run_finetune(
    cfg: Config, run_dir: Path, rows_path: Path | None = None, epoch_states: bool = False
) -> dict:
    """Fine-tune on `rows_path` (default: the run's selected.jsonl) into run_dir/finetune/;
    `epoch_states`: also keep each epoch's end (weights and optimiser moments) in
    finetune/epochs/ (LESS's warm-up)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig

    from raysift.actors.progress import watch
    from raysift.jobs.runtime import handle_signals, start_ray

    f = cfg.finetune
    rows_path = rows_path or run_dir / RunFolder.SELECTED
    offsets = check_finetune(cfg, rows_path)
    out = run_dir / RunFolder.FINETUNE
    out.mkdir(parents=True, exist_ok=True)
    stamp = fingerprint(rows_path, f, cfg.seed)
    marker = out / "fingerprint"
    done = out / "result.json"
    same = marker.is_file() and marker.read_text() == stamp
    if same and done.is_file():
        return {**json.loads(done.read_text()), "reused": True}
    # A remote run folder: Ray Train's workers write their checkpoints there, from any node.
    ckpt_path, ckpt_fs = shared_path((out / "ray").resolve())
    storage = {"storage_path": ckpt_path, "storage_filesystem": ckpt_fs}
    store = Store.for_run(run_dir)
    if not same:
        shutil.rmtree(out / "ray", ignore_errors=True)  # checkpoints of other rows or settings
        if ckpt_fs is not None:
            ckpt_fs.delete_dir_contents(ckpt_path, missing_dir_ok=True)
        shutil.rmtree(out / "model", ignore_errors=True)
        store.delete(TOKENS)
        store.delete(EPOCHS)
        done.unlink(missing_ok=True)
        write_text(marker, stamp)
    start_ray(cfg.ray)
    rel = Path(rows_path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    n_rows = tokenise(store, rel, offsets, f)
    use_gpu = f.gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0
    trainer = _trainer_class()(
        train_loop,
        train_loop_config={
            "finetune": f.model_dump(mode="json"), "seed": cfg.seed,
            "rows": n_rows, "store": store, "epoch_states": EPOCHS if epoch_states else None,
        },
        scaling_config=ScalingConfig(
            num_workers=f.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": f.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            **storage, name="train",
            checkpoint_config=CheckpointConfig(num_to_keep=f.num_to_keep),
        ),
    )  # fmt: skip
    t0 = time.perf_counter()
    steps = plan(n_rows, f, f.num_workers)[1]
    with watch("finetune", steps, "steps") as sink:
        trainer.train_loop_config["progress"] = sink
        try:
            result = trainer.fit()
        finally:
            handle_signals()  # the trainer's own handlers end with the fit
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d, atomic_path(out / "model") as tmp:
        shutil.copytree(Path(d) / "model", tmp)
    m = result.metrics
    info = {
        "steps": m["step"],
        "resumed_from_step": m["resumed_from"],
        "final_loss": m["loss"],
        "losses": m["losses"],
        "rows": n_rows,
        "workers": f.num_workers,
        "gpu": use_gpu,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "steps_per_s": round((m["step"] - m["resumed_from"]) / max(m["loop_seconds"], 1e-9), 3),
        "cpu_seconds": round(m["cpu_seconds"], 1),  # rank 0's process: every thread, this run
        "model": str(out / "model"),
    }
    write_json(done, info)
    return info
