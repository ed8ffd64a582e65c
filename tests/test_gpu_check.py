"""benchmarks/gpu_check.py cannot rot: its --dry-run runs every part at tiny sizes on the CPU (the
code paths the GPU run takes, with the CPU fallbacks) and writes both result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# what each part must have measured (a part that ran but lost a number fails here)
MEASURED = {
    "embed": ["loop_fp32_texts_per_s", "loop_bf16_texts_per_s", "ray_fp32_texts_per_s"],
    "faiss": ["cpu_flat_search_s", "cpu_ivf_build_s", "ivf_recall"],
    "tsds": ["build_s", "select_s", "support"],
    "gotd": ["slice_g_max_rel_diff", "iterations", "s_per_iteration"],
    "lm": ["less_s_per_row_checkpoint", "lm_hidden_rows_per_s"],
    "finetune": ["steps_per_s", "train_seconds"],
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_measures_every_part(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=840, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["mode"] == "dry run, tiny sizes" and list(results["parts"]) == list(MEASURED)
    for name, keys in MEASURED.items():
        part = results["parts"][name]
        assert part["status"] == "done", (name, part)
        assert [k for k in keys if part.get(k) is None] == [], (name, part)
    gotd = results["parts"]["gotd"]
    assert gotd["slice_g_max_rel_diff"] < 1e-4  # the device's solve equals the CPU's
    assert 0 < results["parts"]["faiss"]["ivf_recall"] <= 1
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | done |" in table for name in MEASURED)
