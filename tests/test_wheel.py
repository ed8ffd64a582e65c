"""The wheel as a user gets it: `raysift` is its only import name, and in a fresh environment
outside the checkout `raysift.select` runs in-process on real texts and `raysift demo` runs from
the packaged demo in an empty folder, writing there (never into site-packages).

The fresh environment reuses this one's installed dependencies through a .pth line (a plain path:
the editable install's finder in this environment is not processed there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", ".ruff_cache", "site")  # fmt: skip

SELECT = """
import json, sys
from importlib.resources import files
import pyarrow.parquet as pq
import raysift
pool = pq.read_table(str(files("raysift.demo").joinpath("pool.parquet"))).slice(0, 400)
targets = [json.loads(line)["text"] for line in
           files("raysift.demo").joinpath("targets.jsonl").read_text().splitlines()[:40]]
result = raysift.select(pool.to_pandas(), targets, method="knn", budget=25, keep_columns=["source"])
import ray
try:
    import jobs
    bare = True
except ImportError:
    bare = False
print(json.dumps({"file": raysift.__file__, "rows": len(result),
                  "columns": result.table.column_names, "in_process": result.info["in_process"],
                  "ray": ray.is_initialized(),
                  "bare_jobs_importable": bare, "methods": sorted(raysift.methods())}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "raysift"
    shutil.copytree(REPO, src, ignore=SKIP)
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (found,) = out.glob("raysift-*.whl")
    return found


def test_the_wheel_has_one_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"raysift"}
    for data in ("raysift/configs/demo.yaml", "raysift/demo/pool.parquet",
                 "raysift/demo/targets.jsonl", "raysift/demo/heldout.jsonl", "raysift/py.typed",
                 "raysift/engine/knn.py", "raysift/jobs/cli.py", "raysift/actors/pool.py"):
        assert data in names
    (entry,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "raysift = raysift.jobs.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_installed_wheel_selects_and_runs_the_demo_in_an_empty_folder(wheel, tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=120)  # fmt: skip
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    empty = tmp_path / "work"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{env_dir / 'bin'}:{env['PATH']}")

    out = subprocess.run([str(python), "-c", SELECT], cwd=empty, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(site)  # the installed copy, not the checkout
    assert got["rows"] == 25 and got["in_process"] and not got["ray"]
    assert got["columns"] == ["id", "row", "rank", "score", "probability", "count", "source"]
    assert not got["bare_jobs_importable"]
    assert got["methods"] == ["dsir", "gotd", "gradex", "knn", "less", "random", "rds", "tsds"]

    demo = subprocess.run(
        [str(env_dir / "bin" / "raysift"), "demo", "--no-evaluate",
         "--set", "candidates.limit=300", "--set", "select.budget=50"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    run = empty / "runs" / "demo"
    manifest = json.loads((run / "manifest.json").read_text())
    assert Path(manifest["code"]).is_relative_to(site)
    assert manifest["stages"]["select"]["rows"] == 50
    assert len((run / "selected.jsonl").read_text().splitlines()) == 50
    assert not (site / "raysift" / "runs").exists()  # nothing written into the install
