"""Shared fixtures. Ray tests share one real local cluster per test run (2 CPUs, like CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEMO_POOL = REPO / "demo" / "pool.parquet"
DEMO_TARGETS = REPO / "demo" / "targets.jsonl"
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from jobs.pipeline import RAY_ENV, configure_data

    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": RAY_ENV}
    )
    configure_data()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_rows():
    """The first 300 rows of the shipped demo pool (real texts from six sources)."""
    return pq.read_table(DEMO_POOL).slice(0, 300)


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path
