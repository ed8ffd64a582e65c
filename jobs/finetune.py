"""Fine-tune stage: `selected.jsonl` -> a causal LM trained on it with Ray Train (`TorchTrainer`).

    finetune/ray/train/checkpoint_*   Ray Train checkpoints (trainable weights, optimiser, step)
    finetune/model/                   the result: a LoRA adapter (default) or a full model folder
    finetune/fingerprint              what the checkpoints belong to (rows, settings, seed)
    finetune/result.json              steps, losses, resume point; a rerun with the same
                                      fingerprint reuses the model instead of training again

Rows train as plain text (continued pre-training), or as prompt/response pairs when they have both
`prompt_column` and `response_column`. Each epoch visits the rows in a seeded permutation; step s
always sees the same global batch (worker r takes every world-th row of it), so a run killed and
restarted resumes from its last checkpoint (Ray Train V2 restores the run of the same name and
storage path) and trains exactly what an uninterrupted run would have. Checkpoints whose
fingerprint differs from the current rows and settings are removed before training: a rerun on a
new selection starts from step 0, not from a stale checkpoint.
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

from engine.lm import resolve_lm_path
from jobs.config import Config, FinetuneConfig
from jobs.errors import InputError
from jobs.runfolder import atomic_path, write_json, write_text
from jobs.storage import shared_path

STATE = "state.pt"


def selected_rows(path: Path, f: FinetuneConfig) -> list[dict]:
    """The rows to train on, each checked to carry text or a prompt/response pair."""
    if not path.is_file():
        raise InputError(f"{path}: no selected rows; run the select stage first")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InputError(f"{path}: line {n} is not JSON") from None
            if not isinstance(row.get(f.text_column), str) and not _is_pair(row, f):
                raise InputError(
                    f"{path}: line {n} has no string '{f.text_column}' (finetune.text_column) "
                    f"nor '{f.prompt_column}' + '{f.response_column}'"
                )
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no selected rows to fine-tune on (the file is empty)")
    return rows


def _is_pair(row: dict, f: FinetuneConfig) -> bool:
    return isinstance(row.get(f.prompt_column), str) and isinstance(row.get(f.response_column), str)


def check_finetune(cfg: Config, rows_path: Path) -> list[dict]:
    """Every fine-tune input check that needs no cluster: rows and model (converting the
    packaged one once, here rather than in every worker), before any output. Returns the rows."""
    rows = selected_rows(rows_path, cfg.finetune)
    try:
        resolve_lm_path(cfg.finetune.model)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    adapter = cfg.finetune.init_adapter
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(f"finetune.init_adapter: {adapter} is not a LoRA adapter folder")
    return rows


def fingerprint(rows_path: Path, f: FinetuneConfig, seed: int) -> str:
    h = hashlib.sha256(rows_path.read_bytes())
    h.update(json.dumps({"finetune": f.model_dump(mode="json"), "seed": seed}).encode())
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

    from engine import lm

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

        model = PeftModel.from_pretrained(model, f.init_adapter, is_trainable=True).to(device)
    elif f.method == "lora":
        model = lm.with_lora(
            model, r=f.lora_r, alpha=f.lora_alpha, dropout=f.lora_dropout,
            target_modules=f.lora_target_modules,
        )  # fmt: skip
    rows = ray.get(c["rows"])  # put by the driver: a worker on another node has no run folder
    examples = [
        lm.encode_pair(tokenizer, r[f.prompt_column], r[f.response_column], f.max_length)
        if _is_pair(r, f)
        else lm.encode_text(tokenizer, r[f.text_column], f.max_length)
        for r in rows
    ]
    per_epoch, total = plan(len(examples), f, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=f.learning_rate, weight_decay=f.weight_decay)
    warm = max(1, f.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - f.warmup_steps)))
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
    resumed_from = step
    cpu0 = time.process_time() - (state.get("cpu_seconds", 0.0) if checkpoint else 0.0)
    net = prepare_model(model)  # DDP across workers; the device move
    net.train()
    since = []
    while step < total:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([c["seed"], epoch]).permutation(len(examples))
        batch_rows = order[i * f.batch_size * world : (i + 1) * f.batch_size * world][rank::world]
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
        if step % f.checkpoint_every and step < total:
            continue
        losses.append([step, float(np.mean(since))])
        metrics = {"step": step, "total_steps": total, "loss": losses[-1][1],
                   "losses": losses, "resumed_from": resumed_from, "epoch": epoch,
                   "cpu_seconds": time.process_time() - cpu0}  # fmt: skip
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
                    model.save_pretrained(Path(d) / "model")
                    if f.method == "full":
                        tokenizer.save_pretrained(Path(d) / "model")
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None
            )


def run_finetune(cfg: Config, run_dir: Path, rows_path: Path | None = None) -> dict:
    """Fine-tune on `rows_path` (default: the run's selected.jsonl) into run_dir/finetune/."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.pipeline import start_ray

    f = cfg.finetune
    rows_path = rows_path or run_dir / "selected.jsonl"
    rows = check_finetune(cfg, rows_path)
    out = run_dir / "finetune"
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
    if not same:
        shutil.rmtree(out / "ray", ignore_errors=True)  # checkpoints of other rows or settings
        if ckpt_fs is not None:
            ckpt_fs.delete_dir_contents(ckpt_path, missing_dir_ok=True)
        shutil.rmtree(out / "model", ignore_errors=True)
        done.unlink(missing_ok=True)
        write_text(marker, stamp)
    start_ray(cfg)
    use_gpu = f.gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "finetune": f.model_dump(mode="json"), "seed": cfg.seed,
            "rows": ray.put(rows),  # read once here; a worker on another node has no run folder
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
    result = trainer.fit()
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
        "rows": len(rows),
        "workers": f.num_workers,
        "gpu": use_gpu,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(m["cpu_seconds"], 1),  # rank 0's process: every thread, this run
        "model": str(out / "model"),
    }
    write_json(done, info)
    return info
