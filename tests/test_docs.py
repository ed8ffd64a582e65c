"""The references generated from the code: README's and docs/config.md's config and methods tables
match the schema and the method table (and a drifted copy is caught), and the docs build with
warnings as errors (mkdocs --strict: a broken reference or a missing page fails)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raysift import reference
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def test_generated_tables_match_the_code(tmp_path, capsys):
    assert reference.main(["--check", "--root", str(REPO)]) == 0
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    config = (REPO / "docs" / "config.md").read_text()
    row = next(line for line in config.splitlines() if line.startswith("| `select.budget` |"))
    (tmp_path / "docs" / "config.md").write_text(config.replace(row, row.replace("500", "600")))
    readme = (REPO / "README.md").read_text()
    summary = next(line for line in readme.splitlines() if line.startswith("| `rds` |"))
    (tmp_path / "README.md").write_text(readme.replace(summary, summary.replace("RDS+", "RDS")))
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "README.md" in err and "config.md" in err
    assert reference.main(["--root", str(tmp_path)]) == 0  # rewritten: back in step
    assert (tmp_path / "docs" / "config.md").read_text() == config
    assert (tmp_path / "README.md").read_text() == readme


def test_every_config_field_is_described():
    rows = reference.config_rows()
    assert len(rows) > 100 and all(meaning for _, _, meaning in rows)


@pytest.mark.timeout(240)
def test_docs_build_with_warnings_as_errors(tmp_path):
    out = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "raysift.api.select" in api and "open_run" in api
    assert "select.tsds.index.nprobe" in (tmp_path / "site" / "config" / "index.html").read_text()


def test_the_docs_describe_every_run_folder_path():
    """`RunFolder` names every path of a run folder; the run-folder page's table describes each."""
    from raysift.jobs.core.runfolder import RunFolder

    page = (REPO / "docs" / "run-folder.md").read_text()
    section = page.split("\n## The run folder (`output_dir`)")[1].split("\n## ")[0]
    paths = {v for k, v in vars(RunFolder).items() if k.isupper() and isinstance(v, str)}
    assert len(paths) >= 18
    assert sorted(p for p in paths if f"`{p}" not in section) == []
