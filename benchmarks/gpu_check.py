"""The GPU paths measured in one command, the day a GPU is lent: one JSON and one Markdown table.

    python benchmarks/gpu_check.py [--out DIR] [--parts embed faiss ...] [--dry-run]

Parts (each in its own process with its own time cap, all within --budget (450 s: with the
installs and Ray's start-ups, 8 minutes): a part that hangs or runs long loses only itself, a part
the budget no longer covers is skipped, and the results so far are rewritten after every part):

    embed     embedding throughput (texts/s) on real pool texts: the Ray embed stage vs a plain
              loop (`engine.embed.encode`), fp16 and bf16 (fp32 too on a CPU)
    faiss     FAISS at N x 384: index build and kNN search, flat and IVF, GPU vs CPU in the same
              run (torch's exact matmul + top-k on the GPU when FAISS has no GPU build), recall of
              IVF against flat
    tsds      TSDS exact mode on N x 384 with the index shards on the GPU (Ray actors reading the
              run folder, as the select stage runs them)
    gotd      GOT-D's sharded Sinkhorn on the GPU at N x 1000 targets (iterations, s/iteration),
              and the potentials of a GPU solve against a CPU solve on a 100k slice
    lm        SmolLM2-135M: LESS features (s per row-checkpoint) and RDS+ hidden states (rows/s)
    finetune  a Ray Train LoRA fine-tune of SmolLM2-135M: steps/s of its loop, and its wall time
              with Ray Train's start-up

Models: the packaged MiniLM and SmolLM2 when they are installed; else (on a GPU machine that
cannot install them) the same architectures with random weights, built from their configs and
tokenizers in `--assets` (`benchmarks/gpu_bundle.py` packs them): throughput depends on the
architecture, not on the weights, and every such row says `random weights`. `--dry-run` runs every
part at tiny sizes on the CPU (a tiny random Llama for SmolLM2): the test suite runs it, so the
script cannot rot. BENCHMARKS.md ("GPU check") says how to run it on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `raysift` from this checkout, installed or not

# what gpu_bundle.py packs (configs and tokenizers, pool texts, wheels), unpacked
ASSETS = Path(os.environ.get("RAYSIFT_GPU_ASSETS") or ROOT / ".gpu" / "gpu")
SHARED_POOL = ROOT.parent / "shared" / "data" / "pool.parquet"
DEMO_POOL = ROOT / "demo" / "pool.parquet"

# name: (cap in seconds, sizes on a GPU, sizes on --dry-run)
PARTS = {
    "embed": (90, {"texts": 20000, "batch": 256}, {"texts": 64, "batch": 16}),
    "faiss": (70, {"n": 1_000_000, "d": 384, "queries": 1000, "k": 100, "nlist": 1024,
                   "nprobe": 32}, {"n": 4000, "d": 32, "queries": 20, "k": 10, "nlist": 16,
                                   "nprobe": 4}),  # fmt: skip
    "tsds": (90, {"n": 1_000_000, "d": 384, "queries": 1000, "shards": 1},
             {"n": 3000, "d": 16, "queries": 10, "shards": 2}),  # fmt: skip
    "gotd": (80, {"n": 1_000_000, "d": 384, "targets": 1000, "slice": 100_000, "shards": 1},
             {"n": 3000, "d": 16, "targets": 20, "slice": 1000, "shards": 2}),  # fmt: skip
    "lm": (60, {"rows": 256, "max_length": 128, "proj_dim": 8192, "chunk": 32, "batch": 64},
           {"rows": 8, "max_length": 32, "proj_dim": 64, "chunk": 4, "batch": 4}),  # fmt: skip
    "finetune": (70, {"steps": 200, "batch": 8, "max_length": 128},
                 {"steps": 3, "batch": 4, "max_length": 32}),
}


def emit(**values) -> None:
    """One line of results (the parent collects them; what a killed part printed is kept)."""
    print("RESULT " + json.dumps(values), flush=True)


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- data and models -------------------------------------------------------------------------------


def pool_texts(n: int) -> list[str]:
    """n real texts: the bundle's sample of the shared pool, else the shared pool, else the demo
    pool (repeated when it has fewer)."""
    import pyarrow.parquet as pq

    for source in (ASSETS / "texts.parquet", SHARED_POOL, DEMO_POOL):
        if source.is_file():
            texts = pq.read_table(source, columns=["text"]).column("text").to_pylist()
            break
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), n, replace=n > len(texts))]


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors in 64 clusters (pool-like neighbourhoods), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_weights(kind: str, folder: Path) -> Path:
    """`kind`'s architecture with random weights, from the config and tokenizer in --assets."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    src = ASSETS / kind
    out = folder / f"{kind}-random"
    if not (out / "config.json").is_file():
        from raysift.engine.loading import quiet

        auto = AutoModelForCausalLM if kind == "smollm2" else AutoModel
        with quiet():
            auto.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
            AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def tiny_llama(folder: Path) -> Path:
    """--dry-run's stand-in for SmolLM2: a 2-layer random Llama with MiniLM's tokenizer."""
    from tests.conftest import build_tiny_lm

    out = folder / "tiny-llama"
    return out if (out / "config.json").is_file() else build_tiny_lm(out)


def encoder_model(work: Path) -> tuple[str, str]:
    """(embed.model, what it is)."""
    try:
        from raysift.engine.embed import DEFAULT_MODEL, resolve_model_path

        resolve_model_path(DEFAULT_MODEL)
        return DEFAULT_MODEL, "packaged all-MiniLM-L6-v2"
    except (ImportError, FileNotFoundError):
        return str(random_weights("minilm", work)), "all-MiniLM-L6-v2 architecture, random weights"


def causal_model(work: Path, dry: bool) -> tuple[str, str]:
    """(finetune.model, what it is)."""
    if dry:
        return str(tiny_llama(work)), "tiny random Llama (dry run)"
    try:
        from raysift.engine.lm import PACKAGED_LM, resolve_lm_path

        resolve_lm_path(PACKAGED_LM)
        return PACKAGED_LM, "packaged SmolLM2-135M-Instruct"
    except (ImportError, FileNotFoundError):
        return str(random_weights("smollm2", work)), "SmolLM2-135M architecture, random weights"


def start_ray() -> None:
    import ray

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})  # fmt: skip


# -- the parts -------------------------------------------------------------------------------------


def part_embed(s: dict, work: Path, dry: bool) -> None:
    from raysift.engine.embed import encode, load_encoder
    from raysift.jobs.config import validate
    from raysift.jobs.pipeline import run

    model, what = encoder_model(work)
    texts = pool_texts(s["texts"])
    emit(model=what, texts=len(texts), batch=s["batch"])
    precisions = ["fp32", "bf16"] if not gpu() else ["fp16", "bf16"]
    for precision in precisions:
        enc = load_encoder(model, batch_size=s["batch"], precision=precision)
        encode(enc, texts[: s["batch"]])  # warm-up: kernels, allocator
        sync()
        t0 = time.perf_counter()
        encode(enc, texts)
        sync()
        emit(**{f"loop_{precision}_texts_per_s": round(len(texts) / (time.perf_counter() - t0))})
        del enc
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), work / "texts.parquet")
    (work / "targets.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    start_ray()
    for precision in precisions:
        cfg = validate({
            "output_dir": str(work / f"embed-{precision}"),
            "candidates": {"path": str(work / "texts.parquet")},
            "targets": {"path": str(work / "targets.jsonl")},
            "embed": {"model": model, "batch_size": s["batch"], "precision": precision,
                      "shard_rows": max(64, len(texts) // 4)},
        })  # fmt: skip
        run(cfg, ["ingest", "embed"], log=lambda _: None)
        stage = json.loads((work / f"embed-{precision}" / "manifest.json").read_text())
        info = stage["stages"]["embed"]["candidates"]
        rate = info["rows_embedded"] / max(info["seconds_embedding"], 1e-9)
        emit(**{f"ray_{precision}_texts_per_s": round(rate),
                f"ray_{precision}_gpus_per_actor": info.get("gpus_per_actor")})  # fmt: skip


def _timed(fn, *args):
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, round(time.perf_counter() - t0, 3)


def part_faiss(s: dict, work: Path, dry: bool) -> None:
    import faiss
    import torch

    from raysift.engine.knn import IndexParams, build_index, gpu_available

    X = clustered(s["n"], s["d"], 0)
    Q = clustered(s["queries"], s["d"], 1)
    k = s["k"]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    emit(n=s["n"], d=s["d"], queries=s["queries"], k=k, faiss_gpu=gpu_available())
    flat_params = IndexParams(kind="flat")
    ivf_params = IndexParams(kind="ivf", nlist=s["nlist"], nprobe=s["nprobe"])
    flat, t = _timed(build_index, X, flat_params)
    emit(cpu_flat_build_s=t)
    (_, truth), t = _timed(flat.search, Q, k)
    emit(cpu_flat_search_s=t)
    ivf, t = _timed(build_index, X, ivf_params)
    emit(cpu_ivf_build_s=t)
    (_, got), t = _timed(ivf.search, Q, k)
    emit(cpu_ivf_search_s=t, ivf_recall=recall(got, truth))
    if gpu_available():
        res = faiss.StandardGpuResources()
        for name, index in (("flat", flat), ("ivf", ivf)):
            moved, t = _timed(faiss.index_cpu_to_gpu, res, 0, index)
            emit(**{f"gpu_{name}_to_device_s": t})
            (_, found), t = _timed(moved.search, Q, min(k, 2048))
            emit(**{f"gpu_{name}_search_s": t, f"gpu_{name}_recall": recall(found, truth)})
    if torch.cuda.is_available():  # the exact scan on the GPU, whatever FAISS was built with
        xs, qs = torch.as_tensor(X, device="cuda"), torch.as_tensor(Q, device="cuda")

        def torch_knn():
            return (qs @ xs.T).topk(k, dim=1).indices.cpu().numpy()

        torch_knn()
        found, t = _timed(torch_knn)
        emit(torch_gpu_exact_search_s=t, torch_gpu_recall=recall(found, truth))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(a, b)) for a, b in zip(found, truth, strict=True)]
    return round(float(np.mean(hits)) / truth.shape[1], 4)


def part_tsds(s: dict, work: Path, dry: bool) -> None:
    import ray
    from harness import stored_pool

    from raysift.actors.fanout import ResilientFanout, stop
    from raysift.actors.index_shard import start_shards
    from raysift.engine.knn import IndexParams, gpu_available
    from raysift.engine.tsds_search import TSDSParams, select_exact

    X, Q = clustered(s["n"], s["d"], 0), clustered(s["queries"], s["d"], 1)
    start_ray()
    t0 = time.perf_counter()
    pool, _ = stored_pool(work / "tsds", X, Q)
    ingest = round(time.perf_counter() - t0, 1)
    emit(n=s["n"], queries=s["queries"], shards=s["shards"], ingest_s=ingest)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and gpu_available()
    params = TSDSParams(max_K=min(5000, s["n"] // 4))
    actors, t = _timed(lambda: start_shards(pool, s["shards"], IndexParams(kind="flat"),
                                            use_gpu=use_gpu, cpus_per_shard=0.5))  # fmt: skip
    emit(shards_on_gpu=use_gpu, build_s=t)
    try:
        (sol, info), t = _timed(select_exact, ResilientFanout(actors), Q, pool.n, params)
    finally:
        stop(actors)
    emit(select_s=t, support=len(sol.rows), fetches=info.get("fetches"))


def part_gotd(s: dict, work: Path, dry: bool) -> None:
    import ray
    from harness import stored_pool

    from raysift.actors.fanout import stop
    from raysift.actors.ot_shard import ot_fanout, start_ot_shards
    from raysift.engine.sinkhorn import coordinate, solve

    X, Q = clustered(s["n"], s["d"], 0), clustered(s["targets"], s["d"], 1)
    cuda = "cuda" if gpu() else "cpu"
    # the same solve on a slice, on the GPU and on the CPU: equal potentials
    cut = X[: s["slice"]]
    on_gpu, t_gpu = _timed(lambda: solve(cut, Q, threshold=1e-3, device=cuda))
    on_cpu, t_cpu = _timed(lambda: solve(cut, Q, threshold=1e-3, device="cpu"))
    gap = float(np.max(np.abs(on_gpu.g - on_cpu.g)) / (np.max(np.abs(on_cpu.g)) + 1e-30))
    emit(slice=len(cut), slice_device=cuda, slice_gpu_s=t_gpu, slice_cpu_s=t_cpu,
         slice_iterations=[on_gpu.n_iter, on_cpu.n_iter], slice_g_max_rel_diff=gap)  # fmt: skip
    start_ray()
    pool, targets = stored_pool(work / "gotd", X, Q)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    actors, t = _timed(lambda: start_ot_shards(pool, targets, s["shards"], epsilon=0.1,
                                               cpus_per_shard=0.5, use_gpu=use_gpu))  # fmt: skip
    emit(n=s["n"], targets=s["targets"], shards=s["shards"], shards_on_gpu=use_gpu, start_s=t)
    try:
        (f, n_iter, errors, converged), t = _timed(
            lambda: coordinate(ot_fanout(actors), len(Q), epsilon=0.1, threshold=1e-4,
                               max_iterations=200))  # fmt: skip
    finally:
        stop(actors)
    emit(iterations=n_iter, solve_s=t, s_per_iteration=round(t / max(n_iter, 1), 4),
         converged=bool(converged), final_error=float(errors[-1]))  # fmt: skip


def part_lm(s: dict, work: Path, dry: bool) -> None:
    import torch

    from raysift.engine import gradex, less, lm
    from raysift.engine.embed import pick_device

    model_name, what = causal_model(work, dry)
    device = pick_device(None)
    texts = pool_texts(s["rows"])
    emit(model=what, rows=len(texts), max_length=s["max_length"], device=str(device))
    model, tok = lm.load_lm(model_name, device, attention="eager")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = lm.with_lora(model, r=16, alpha=32, dropout=0.0, target_modules=modules).to(device)
    shapes = gradex.GradientModel.adapter_shapes(model)
    gm = gradex.GradientModel(model, gradex.Projector(shapes, s["proj_dim"], 0), chunk=s["chunk"],
                              loss="ce")  # fmt: skip
    moments = {n: (torch.zeros(shape), torch.full(shape, 1e-6)) for n, shape in shapes.items()}
    examples = [lm.encode_text(tok, t, s["max_length"]) for t in texts]

    def features():
        for a in range(0, len(examples), s["batch"]):
            batch = lm.collate(examples[a : a + s["batch"]], tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            _, grads = gm.sample_grads(batch, on_device=True)
            less.normalise(gm.projector.project(less.adam_transform(grads, moments)))

    _timed(lambda: None)
    _, t = _timed(features)
    emit(less_s_per_row_checkpoint=round(t / len(texts), 5), less_proj_dim=s["proj_dim"])
    from raysift.engine import hidden

    base, tok = lm.load_lm(model_name, device)
    precision = "bf16" if gpu() else "fp32"
    hidden.represent(base, examples[: s["batch"]], tok.pad_token_id, precision=precision)  # warm
    _, t = _timed(lambda: hidden.represent(base, examples, tok.pad_token_id,
                                           batch_size=s["batch"], precision=precision))  # fmt: skip
    emit(lm_hidden_rows_per_s=round(len(texts) / t, 1), lm_hidden_precision=precision)


def part_finetune(s: dict, work: Path, dry: bool) -> None:
    from raysift.jobs.config import validate
    from raysift.jobs.finetune import run_finetune

    model, what = causal_model(work, dry)
    folder = work / "finetune"
    folder.mkdir(parents=True, exist_ok=True)
    rows = folder / "rows.jsonl"  # the fine-tune reads its rows from its run folder
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in pool_texts(2048)))
    start_ray()
    cfg = validate({
        "output_dir": str(folder),
        "candidates": {"path": str(rows)}, "targets": {"path": str(rows)},
        "finetune": {"model": model, "max_steps": s["steps"], "batch_size": s["batch"],
                     "max_length": s["max_length"], "checkpoint_every": 1000},
    })  # fmt: skip
    info = run_finetune(cfg, folder, rows)
    emit(model=what, steps=info["steps"], batch=s["batch"], max_length=s["max_length"],
         gpu=info["gpu"], steps_per_s=info["steps_per_s"], train_seconds=info["train_seconds"])


# -- the driver ------------------------------------------------------------------------------------


def run_part(name: str, args, left: float) -> dict:
    """One part in a child process under its cap (and what is left of the budget); what it
    printed before a timeout is kept."""
    cap = round(min(PARTS[name][0] * (3 if args.dry_run else 1), left))
    cmd = [sys.executable, __file__, "--part", name, "--work", str(args.work)]
    if args.dry_run:
        cmd.append("--dry-run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # tiny sizes, on the CPU
    t0 = time.perf_counter()
    result: dict = {"status": "done"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    tail: list[str] = []
    try:
        out, _ = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        result["status"] = f"capped at {cap} s"
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[7:]))
            print(f"  {name}: {line[7:]}", flush=True)
        else:
            tail.append(line)
    if proc.returncode not in (0, -9) and result["status"] == "done":
        result["status"] = "failed: " + (tail[-1] if tail else f"exit {proc.returncode}")
        result["log_tail"] = tail[-15:]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"GPU check, {results['date']}, {results['device']} ({results['mode']})", "",
             "| part | status | s | measurements |", "|---|---|---|---|"]  # fmt: skip
    for name, r in results["parts"].items():
        values = ", ".join(f"{k} {v}" for k, v in r.items()
                           if k not in ("status", "seconds", "log_tail"))  # fmt: skip
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {values} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")  # $OUT: the device tool's
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU")
    ap.add_argument("--budget", type=float, default=450, help="seconds for all the parts")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # a child: one part
        sizes = PARTS[args.part][2 if args.dry_run else 1]
        globals()[f"part_{args.part}"](sizes, args.work, args.dry_run)
        return 0
    args.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_name(),
               "mode": "dry run, tiny sizes" if args.dry_run else "full sizes",
               "python": platform.python_version(), "parts": {}}  # fmt: skip
    end = time.monotonic() + args.budget * (3 if args.dry_run else 1)
    for name in args.parts:
        left = end - time.monotonic()
        if left < 20:  # what is left is skipped, what is done is kept
            results["parts"][name] = {"status": "skipped: the budget is spent", "seconds": 0}
            write(results, args.out)
            continue
        print(f"{name}: running (cap {min(PARTS[name][0], left):.0f} s)", flush=True)
        results["parts"][name] = run_part(name, args, left)
        done = results["parts"][name]
        print(f"{name}: {done['status']} in {done['seconds']} s", flush=True)
        write(results, args.out)  # partial results survive a later part's crash
    print(f"results: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
