"""The one-way import order (pyproject's import-linter layers contract) and the ban on bare
imports (ruff TID251): both fail on the mistakes they exist for.

import-linter's graph walks the package's folder on disk: in a checkout raysift/engine etc. link to
the top-level folders, so it reads the checkout as the wheel lays it out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO

BIN = Path(sys.executable).parent
PACKAGES = ("engine", "actors", "jobs")


def _copy(root: Path) -> Path:
    """The package with its links followed: files a test may change."""
    shutil.copytree(REPO / "raysift", root / "raysift",
                    ignore=shutil.ignore_patterns("__pycache__", "*.parquet"))  # fmt: skip
    return root


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(BIN / "lint-imports"), str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.timeout(240)
def test_import_order_is_kept_and_a_cycle_breaks_it(tmp_path):
    kept = _lint_imports(REPO)
    assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-2000:]
    assert "1 kept, 0 broken" in kept.stdout

    # an engine module reaching up into a stage (what a cycle starts with): the contract breaks
    broken = _copy(tmp_path / "broken")
    knn = broken / "raysift" / "engine" / "knn.py"
    knn.write_text(knn.read_text() + "\n\ndef _up():\n    from raysift.jobs.stages import select\n")
    out = _lint_imports(broken)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout
    assert "raysift.engine.knn -> raysift.jobs.stages.select" in out.stdout


def test_every_module_has_a_layer():
    """import-linter checks the modules a layer names; a new module outside every layer would go
    unchecked, so each must be named (or sit in a named package)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {m.strip() for layer in config["contracts"][0]["layers"] for m in layer.split(":")}
    modules = {f"raysift.jobs.{p.stem}" for p in (REPO / "jobs").glob("*.py")} - {
        "raysift.jobs.__init__"
    }
    packages = {f"raysift.jobs.{p.parent.name}" for p in (REPO / "jobs").glob("*/__init__.py")}
    assert modules - named == set() and packages - named == set()
    assert packages == {f"raysift.jobs.{p}" for p in ("core", "stages", "methods", "workflows")}
    assert len(named) <= 15  # packages and a few modules, not one entry per module (was 27)
    assert {"raysift.engine", "raysift.actors", "raysift.api"} <= named


def test_bare_imports_are_banned(tmp_path):
    """`import jobs` would load a second copy of every module (two InputError classes: bad input
    exits 1) and fails from an installed wheel; ruff's TID251 rule stops it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import jobs\nfrom engine.knn import IndexShard\nimport raysift.jobs\n")
    out = subprocess.run(
        [str(BIN / "ruff"), "check", "--config", str(REPO / "pyproject.toml"),
         "--select", "TID251", "--no-cache", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stdout.count("TID251") == 2, out.stdout
    clean = subprocess.run(
        [str(BIN / "ruff"), "check", "--config", str(REPO / "pyproject.toml"), "--no-cache",
         *(str(REPO / d) for d in (*PACKAGES, "raysift", "demo", "tests", "benchmarks",
                                          "examples"))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stdout[-3000:]
