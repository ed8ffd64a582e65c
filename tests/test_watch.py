"""What a person watching a run sees: progress lines, a quiet console, clean interrupts, reuse
keys that ignore execution-only settings, and a report whose colours can be told apart.

The run tests start `raysift` as a subprocess (its own local Ray cluster, its stdout/stderr not a
terminal, as in CI logs and `ray job logs`) and send it real signals."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

SLICE = ["candidates.limit=200", "targets.limit=20", "select.budget=20"]
NOISE = re.compile(r"\b(WARNING|ERROR|Warning|Traceback)\b|core_worker|FutureWarning")


# -- no Ray -----------------------------------------------------------------------------------


def _lab(colour: str) -> np.ndarray:
    """sRGB hex -> CIELAB (D65)."""
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    rgb = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ rgb / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_source_colours_are_distinguishable_for_twenty_sources():
    from raysift.jobs.workflows.evaluation_report import COLOURS, _ink, luminance

    assert len(COLOURS) >= 20 and len(set(COLOURS[:20])) == 20
    distance = min(
        float(np.linalg.norm(_lab(a) - _lab(b))) for a, b in itertools.combinations(COLOURS[:20], 2)
    )
    assert distance >= 30  # CIE76; the old palette's closest pair was 4.0 apart
    # the pairs users could not tell apart are gone; a bar's percentage stays readable on it
    for colour in COLOURS[:20]:
        full = {"#fff": "#ffffff", "#222": "#222222"}[_ink(colour)]
        lum, ink = luminance(colour), luminance(full)
        assert (max(lum, ink) + 0.05) / (min(lum, ink) + 0.05) >= 3.0, colour  # WCAG large text
    assert not {"#76b7b2", "#86bcb6", "#edc948", "#f1ce63"} & set(COLOURS)


def test_execution_only_settings_keep_the_reuse_keys(tmp_path):
    from raysift.jobs.config import Config, FinetuneConfig
    from raysift.jobs.finetune import fingerprint
    from raysift.jobs.workflows.curate import _config_key

    rows = tmp_path / "selected.jsonl"
    rows.write_text('{"id": "a", "text": "x"}\n')
    base = fingerprint(rows, FinetuneConfig(), 0)
    for change in ({"torch_threads": 1}, {"cpus_per_worker": 0.5}, {"checkpoint_every": 7},
                   {"num_to_keep": 5}):  # fmt: skip
        assert fingerprint(rows, FinetuneConfig(**change), 0) == base, change
    for change in ({"learning_rate": 1e-3}, {"num_workers": 2}, {"max_steps": 3}):
        assert fingerprint(rows, FinetuneConfig(**change), 0) != base, change
    assert fingerprint(rows, FinetuneConfig(), 1) != base

    cfg = {"candidates": {"path": "c.parquet"}, "targets": {"path": "t.jsonl"}, "output_dir": "r"}
    key = _config_key(Config.model_validate(cfg))
    faster = {**cfg, "embed": {"num_actors": 2, "cpus_per_actor": 0.5},
              "select": {"tsds": {"shards": 2}}, "ray": {"num_cpus": 2}}  # fmt: skip
    assert _config_key(Config.model_validate(faster)) == key
    other = {**cfg, "select": {"budget": 7}}
    assert _config_key(Config.model_validate(other)) != key


def test_summary_over_seeds():
    """evaluate's per-method summary: mean, sample std over seeds, against random and the base."""
    from raysift.jobs.workflows.evaluate import summarise

    def run(method, seed, ppl, share):
        return {"method": method, "seed": seed, "perplexity": ppl, "share_from_target": share,
                "label_tv": 0.5, "train_seconds": 2.0}  # fmt: skip

    runs = [run("random", 0, 10.0, 0.0), run("random", 1, 12.0, 0.1),
            run("knn", 0, 8.0, 0.5), run("knn", 1, 9.0, 0.7)]  # fmt: skip
    s = summarise(runs, {"perplexity": 20.0})
    assert s["random"]["seeds"] == 2 and s["random"]["perplexity_mean"] == 11.0
    assert s["random"]["perplexity_std"] == pytest.approx(2**0.5)  # ddof=1
    assert s["knn"]["vs_random"] == -2.5 and s["knn"]["vs_base"] == -11.5
    assert s["knn"]["share_from_target"] == pytest.approx(0.6)
    assert (s["knn"]["perplexity_min"], s["knn"]["perplexity_max"]) == (8.0, 9.0)
    one = summarise([run("knn", 0, 8.0, None)], {"perplexity": 20.0})["knn"]
    assert one["perplexity_std"] is None and one["vs_random"] is None  # no spread from one seed
    assert one["share_from_target"] is None


def test_progress_prints_plain_lines_off_a_terminal(capsys, monkeypatch):
    from raysift.jobs.core.console import progress

    monkeypatch.setenv("RAYSIFT_PROGRESS_SECONDS", "0")
    with progress("embed", 300, "texts") as shown:
        for _ in range(3):
            time.sleep(0.01)
            shown.advance(100, loss=2.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("raysift: embed: 100/300 texts (33%), ")
    assert "texts/s, ETA " in lines[0] and lines[0].endswith("loss 2.5")
    assert len(lines) == 2  # the last update is the stage's done line's business

    monkeypatch.delenv("RAYSIFT_PROGRESS_SECONDS")  # the default cadence: 10 s, 30 s, 60 s, ...
    shown = progress("finetune", 100, "steps")
    gaps = []
    for k in range(6):
        shown.lines = k
        gaps.append(shown.gap())
    assert gaps == [10, 20, 30, 60, 60, 60]
    shown.close()


def test_sigterm_is_an_interruption_with_exit_code_143():
    from raysift.jobs.runtime import handle_signals, interruption

    before = handle_signals()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:  # what Ray's blocking calls pass on
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        wrapped = SystemError("a library's wrapper")
        wrapped.__cause__ = caught.value
        for exc in (caught.value, wrapped):
            stopped = interruption(exc)
            assert stopped.code == 143 and stopped.name == "SIGTERM"
        assert interruption(ValueError("not a signal")) is None
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


# -- a raysift process, watched -----------------------------------------------------------------


class Watched:
    """`raysift ARGS` in a subprocess with its own Ray temp dir; output read line by line."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths
        full = {**os.environ, "RAY_TMPDIR": self.tmp, "HF_HUB_OFFLINE": "1", **(env or {})}
        full.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raysift", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=full, cwd=Path(__file__).parent.parent,
            start_new_session=True,  # its own group: a stuck run is killed with its Ray processes
        )  # fmt: skip
        self.lines: list[str] = []

    def until(self, pattern: str, timeout: float = 240) -> str:
        """Read lines until one matches `pattern`; returns it."""
        end = time.time() + timeout
        while time.time() < end:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-30:]))

    def finish(self, timeout: float = 600) -> int:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # what it printed says where it stuck
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
            raise AssertionError("\n".join([*self.lines, *out.splitlines()][-40:])) from None
        self.lines += out.splitlines()
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Processes of this run's Ray cluster still alive (after a grace period)."""
        import psutil

        for _ in range(40):
            alive = []
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if any(self.tmp in part for part in p.info["cmdline"] or []):
                        alive.append(" ".join(p.info["cmdline"])[:120])
                except psutil.Error:
                    continue
            if not alive:
                break
            time.sleep(0.5)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return alive


def _stages(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def _one_interrupt_line(lines: list[str], stage: str) -> None:
    said = [x for x in lines if "interrupted" in x]
    assert said == [
        f"raysift: interrupted by SIGINT during {stage}; what was committed is kept: run the "
        "same command again to resume"
    ], lines[-15:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_interrupted_in_embed_resumes_and_prints_little(tmp_path, tiny_lm):
    """Ctrl-C during the demo's embedding: 130, one line, manifest `interrupted`, no Ray
    processes left. The rerun resumes the embedding, runs the evaluation, and prints under 60
    lines, none at warning or error level: a running and a done line for every sub-run, the
    oracle's too."""
    out = tmp_path / "demo"
    sets = [*SLICE, f"finetune.model={tiny_lm}", "finetune.max_steps=2", "embed.precision=fp32",
            "evaluate.heldout.limit=10", "embed.shard_rows=100",
            "evaluate.methods=[knn]"]  # fmt: skip
    args = ["demo", "--output-dir", str(out), *sum((["--set", s] for s in sets), [])]

    first = Watched(args, {"RAYSIFT_PROGRESS_SECONDS": "0"})
    first.until(r"^raysift: embed: \d+/220 texts")
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(timeout=120) == 130, first.lines[-15:]
    _one_interrupt_line(first.lines, "embed")
    assert _stages(out)["embed"]["status"] == "interrupted"
    assert first.leftovers() == []

    again = Watched(args)
    assert again.finish() == 0, again.lines[-20:]
    assert again.leftovers() == []
    lines = again.lines
    assert len(lines) < 60, "\n".join(lines)
    assert [x for x in lines if NOISE.search(x)] == []
    reused = {s: _stages(out)["embed"][s]["rows_reused"] for s in ("candidates", "targets")}
    assert sum(reused.values()) >= 20, reused  # the chunks committed before the interrupt
    assert "raysift: embed: done in" in "\n".join(lines)
    for k, method in enumerate(["knn", "oracle"], 1):
        name = f"raysift: evaluate: run {k}/2: {method}, seed 0"
        assert f"{name}: running" in lines
        assert any(x.startswith(f"{name}: done in ") for x in lines), method
        assert f"raysift: {method}, seed 0: finetune: running" in " ".join(lines).replace(
            " (on the target's own rows)", ""
        )
        assert any(x.startswith(f"raysift: {method}, seed 0: finetune: done in ") for x in lines)
    assert "raysift: evaluate: base model: running (perplexity of 10 held-out texts)" in lines
    assert any(x.startswith("raysift: evaluate: base model: done") for x in lines)
    assert any("Target perplexity after fine-tuning on 20 rows" in x for x in lines)
    assert f"report: {out / 'report.html'}" in lines

    result = json.loads((out / "evaluation.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["knn", "oracle"]
    assert result["summary"]["oracle"]["share_from_target"] == 1.0
    assert all(r["steps"] == 2 for r in result["runs"])
    assert "<svg" in (out / "report.html").read_text()
    log = (out / "logs" / "raysift.log").read_text()  # the full record, sub-runs included
    assert "embed: running" in log and "knn, seed 0: finetune: done" in log
    # no loading bars (model loads, the fine-tune's save): console and log alike
    bars = re.compile(r"\d+%\||it/s\]|Loading weights|de-quantizing|Writing model shards")
    assert [x for x in [*lines, *log.splitlines()] if bars.search(x)] == []


# A fine-tune's progress lines, Ctrl-C, SIGKILL, resume and reuse under a new torch_threads:
# test_finetune.py::test_interrupted_and_killed_runs_resume_from_their_checkpoints.
