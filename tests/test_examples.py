"""Every example a user would paste runs, as written: the fenced code blocks of README.md and
docs/, the fenced examples in the package's docstrings, and the scripts in examples/.

A block's language says what it is:

* `python` -- run in a fresh namespace (a block marked `<!-- example: continues -->` shares the
  namespace of the block before it, as a page read top to bottom does);
* `bash` -- run with `bash -euo pipefail`, the venv's `raysift` first on the PATH;
* `yaml` -- a config, or a fragment of one: merged over the smallest valid config and validated
  by the config schema (unknown keys, bad values fail);
* `text` -- what a command prints, not something to paste: not run.

Every block runs in a scratch folder holding copies of the checkout's configs/ and demo/ (so
`configs/demo.yaml` and `demo/pool.parquet` resolve and outputs land there). A block that cannot
run here says so in the source, on the line before its fence: `<!-- example: skip REASON -->`
(a cluster address, an 8-minute demo); pytest's skip report (-rs, on in `make test`) lists each
with its reason, and `test_every_block_is_accounted_for` prints the counts. A fence without a
language fails: every block must say what it is.
"""

from __future__ import annotations

import ast
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PACKAGES = ["raysift", "engine", "actors", "jobs", "demo"]
RUN = {"python", "bash", "yaml"}
KINDS = RUN | {"text"}
MARK = re.compile(r"<!--\s*example:\s*(skip|continues)\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


@dataclass
class Block:
    where: str  # file:line of the opening fence
    lang: str
    code: str
    skip: str | None = None  # the reason, when marked
    continues: bool = False  # shares the previous python block's namespace

    @property
    def id(self) -> str:
        return self.where


def _fenced(text: str, where: str, first_line: int = 1) -> list[Block]:
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1 : end]]  # fmt: skip
        mark = MARK.search(lines[i - 1]) if i else None
        block = Block(f"{where}:{first_line + i}", lang, "\n".join(body) + "\n")
        if mark and mark.group(1) == "skip":
            block.skip = mark.group(2) or "(no reason given)"
        block.continues = bool(mark and mark.group(1) == "continues")
        out.append(block)
        i = end + 1
    return out


def _docstring_blocks(path: Path) -> list[Block]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc and "```" in doc:
            line = node.body[0].lineno if node.body else 1
            out += _fenced(doc, str(path.relative_to(REPO)), line)
    return out


def collect() -> list[Block]:
    blocks = []
    for doc in DOCS:
        blocks += _fenced(doc.read_text(), str(doc.relative_to(REPO)))
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            blocks += _docstring_blocks(path)
    return blocks


BLOCKS = collect()
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def test_every_block_is_accounted_for(capsys):
    """Every fence names its kind (another language, e.g. a crontab line, only with a skip mark:
    nothing here can run it); the counts (run, skipped and why) go to the test log."""
    unnamed = [b.where for b in BLOCKS if b.lang not in KINDS and not (b.lang and b.skip)]
    assert unnamed == [], f"fences without a kind ({sorted(KINDS)}) or a skip mark: {unnamed}"
    run = [b for b in BLOCKS if b.lang in RUN and not b.skip]
    skipped = [b for b in BLOCKS if b.lang != "text" and b.skip]
    with capsys.disabled():
        print(f"\ndoc examples: {len(run)} blocks run, {len(skipped)} skipped, "
              f"{len(BLOCKS) - len(run) - len(skipped)} output blocks (text); "
              f"{len(EXAMPLES)} example scripts")  # fmt: skip
        for b in skipped:
            print(f"  skipped {b.where}: {b.skip}")
    assert len(run) >= 10  # the collector finds the docs' blocks (a broken parser finds none)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder as a checkout's root looks to a user: configs/ and demo/ (copies: the
    demo config's run folder lands here, not in the checkout)."""
    work = tmp_path_factory.mktemp("examples")
    for folder in ("configs", "demo"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return work


_namespaces: dict[str, dict] = {}


def _run_python(block: Block, workdir: Path) -> None:
    source = block.where.rsplit(":", 1)[0]
    namespace = _namespaces.get(source) if block.continues else None
    if namespace is None:
        namespace = {"__name__": "__example__"}
    _namespaces[source] = namespace
    path, line = block.where.rsplit(":", 1)
    code = compile("\n" * int(line) + block.code, path, "exec")  # tracebacks name the doc's line
    exec(code, namespace)  # noqa: S102 - the docs' own examples


def _run_bash(block: Block, workdir: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    shown = f"{block.where}\n{block.code}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    assert out.returncode == 0, shown


def _check_yaml(block: Block, workdir: Path) -> None:
    from raysift.jobs.config import _merge, validate

    tree = yaml.safe_load(block.code)
    assert isinstance(tree, dict), f"{block.where}: not a mapping of config keys"
    base = {"output_dir": "runs/x", "candidates": {"path": "demo/pool.parquet"},
            "targets": {"path": "demo/targets.jsonl"}}  # fmt: skip
    validate(_merge(base, tree), block.where)


def _marked(block: Block) -> None:
    if block.skip:
        pytest.skip(f"{block.where}: marked in the source: {block.skip}")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("python", "bash")],
                         ids=lambda b: b.id)  # fmt: skip
def test_doc_example_runs(block, workdir, monkeypatch, ray_cluster):
    _marked(block)
    monkeypatch.chdir(workdir)
    (_run_python if block.lang == "python" else _run_bash)(block, workdir)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "yaml"], ids=lambda b: b.id)
def test_doc_config_is_valid(block, workdir, monkeypatch):
    _marked(block)
    monkeypatch.chdir(workdir)
    _check_yaml(block, workdir)


# What each example script must print (beyond running to the end).
PRINTS = {
    "quickstart.py": ["knn and tsds share", "same rows, in the same order, as in-process: True"],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_script_runs(script, tmp_path, monkeypatch, capsys, ray_cluster):
    """examples/*.py as a user runs them (here in this process, on the tests' cluster: a script's
    Ray part joins the running cluster as a script in a notebook would)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script.name, str(tmp_path / "work")])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    for line in PRINTS.get(script.name, []):
        assert line in out, out[-2000:]


def test_the_collector_reads_marks_and_kinds():
    text = textwrap.dedent("""\
        ```python
        x = 1
        ```
        <!-- example: skip needs a cluster address -->
        ```bash
        ray up cluster.yaml
        ```
        <!-- example: continues -->
          ```python
          y = x + 1
          ```
        ```
        plain
        ```
        """)
    blocks = _fenced(text, "t.md")
    assert [(b.lang, b.skip, b.continues) for b in blocks] == [
        ("python", None, False), ("bash", "needs a cluster address", False),
        ("python", None, True), ("", None, False)]  # fmt: skip
    assert blocks[2].code == "y = x + 1\n" and blocks[2].where == "t.md:9"
