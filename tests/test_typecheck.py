"""`make typecheck` (mypy on the package, in `make test`) reads the whole package in a checkout --
raysift/engine, raysift/actors, raysift/jobs, ... link to the top-level folders -- and fails on a
type error, in the package or in a user's code calling its API."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

MYPY = Path(sys.executable).parent / "mypy"


def _mypy(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MYPY), "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(REPO / ".mypy_cache"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _modules() -> int:
    return sum(len(list((REPO / d).rglob("*.py"))) for d in ("engine", "actors", "jobs"))


@pytest.mark.timeout(900)
def test_the_package_is_checked_whole_and_a_type_error_fails_it(tmp_path):
    clean = _mypy(["-p", "raysift"], REPO)
    assert clean.returncode == 0, clean.stdout[-3000:]
    checked = int(re.search(r"in (\d+) source files", clean.stdout).group(1))
    assert checked > _modules()  # every engine/actors/jobs module, not raysift/'s few files

    # the same package with one deliberate mistake deep in engine/: mypy finds it
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "raysift", copy / "raysift",
                    ignore=shutil.ignore_patterns("__pycache__", "*.parquet"))  # fmt: skip
    knn = copy / "raysift" / "engine" / "knn.py"
    assert not knn.is_symlink() and not knn.parent.is_symlink()  # a real copy, links followed
    knn.write_text(knn.read_text() + '\n\ndef _rows() -> int:\n    return "12"\n')
    broken = _mypy(["-p", "raysift"], copy)
    assert broken.returncode == 1
    wanted = r'raysift/engine/knn\.py:\d+: error: Incompatible return value type \(got "str"'
    assert re.search(wanted, broken.stdout), broken.stdout[-2000:]


@pytest.mark.timeout(900)
def test_a_users_wrong_call_fails_the_check(tmp_path):
    user = tmp_path / "pick.py"
    user.write_text(
        "import raysift\n\n"
        'result = raysift.select(["a cat", "a dog"], ["a kitten"], method="knn", budget="one")\n'
        "rows: int = raysift.open_run('runs/demo').path\n"
    )
    out = _mypy([str(user)], REPO)
    assert out.returncode == 1
    assert 'Argument "budget" to "select" has incompatible type "str"; expected "int"' in out.stdout
    assert re.search(r"pick\.py:4: error: Incompatible types in assignment", out.stdout), out.stdout
