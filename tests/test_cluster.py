"""cluster.yaml and its fake_multinode variant against the schema Ray ships, plus what the README
promises about them (GPU workers from zero, spot CPU workers, dashboard on loopback, token auth)."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as fh:
        return json.load(fh)


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.fake.yaml"])
def test_cluster_configs_validate_against_rays_schema(name, schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    jsonschema.validate(config, schema)
    # Ray's own check (the one `ray up` runs), after its provider defaults where it has them.
    validate_config(prepare_config(config) if config["provider"]["type"] == "aws" else config)


def test_schema_rejects_what_ray_would_reject(schema):
    """The validation is not vacuous: a fractional GPU count or a missing node_config fails."""
    config = load("cluster.yaml")
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
    config = load("cluster.yaml")
    del config["available_node_types"]["cpu_spot_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_cluster_yaml_has_the_promised_shape():
    config = load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1
    spot = types["cpu_spot_worker"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "GPU" not in spot["resources"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert all(
        "RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "start" in c
    )
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("raysift" in c and "pip install" in c for c in config["setup_commands"])


def test_fake_variant_matches_the_real_worker_type():
    real, fake = load("cluster.yaml"), load("cluster.fake.yaml")
    assert fake["provider"]["type"] == "fake_multinode"
    assert set(fake["available_node_types"]) - {"ray.head.default"} <= set(
        real["available_node_types"]
    )
    assert fake["available_node_types"]["cpu_spot_worker"]["min_workers"] == 0
