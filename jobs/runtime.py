"""Ray start-up: the one place a raysift driver starts or joins a cluster."""

from __future__ import annotations

import os

from jobs.cluster import TOKEN_HELP, check_ray_address, token_present
from jobs.config import Config
from jobs.errors import InputError

RAY_ENV = {"HF_HUB_OFFLINE": "1"}


def start_ray(cfg: Config) -> None:
    """Join `ray.address`, or the cluster this process was submitted to (`ray job submit` sets
    RAY_ADDRESS for the driver), or start a local cluster; reuse the one this process has."""
    import ray

    os.environ.update(RAY_ENV)
    # A failed task's other return values (ingest's tables, a shard's partials) hold copies of the
    # error raysift has already raised (exit 2, one line): Ray would print each again at exit.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if not ray.is_initialized():
        kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        if not in_job:  # a submitted job has its runtime env already; adding one conflicts
            kwargs["runtime_env"] = {"env_vars": RAY_ENV}
        address = cfg.ray.address or (os.environ.get("RAY_ADDRESS") if in_job else None)
        if address:
            check_ray_address(address)  # a dead address fails in seconds, not minutes
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                hint = "" if token_present() else f"; no Ray auth token found: {TOKEN_HELP}"
                raise InputError(f"ray.address: {address}: {exc}{hint}") from None
        else:
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, **kwargs)
    configure_data()


def configure_data() -> None:
    """Ray Data settings every raysift driver uses."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # outputs in plan order
    # Raise the UDF's own exception (an InputError stays an InputError -> exit 2), not a wrapper.
    ctx.raise_original_map_exception = True
