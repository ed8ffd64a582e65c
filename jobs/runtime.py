"""Ray start-up: the one place a raysift driver starts or joins a cluster."""

from __future__ import annotations

import os
import signal
import threading

from raysift.jobs.cluster import TOKEN_HELP, check_ray_address, token_present
from raysift.jobs.config import RayConfig
from raysift.jobs.core.errors import InputError, Interrupted

# Ray Train's controller polls its workers every 2 s by default: it notices the end of a fit and
# registers reported checkpoints that late (a Ctrl-C then resumes from an older one); 0.5 s costs
# a few small RPCs a second.
RAY_ENV = {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def start_ray(settings: RayConfig) -> None:
    """Join `ray.address`, or the cluster this process was submitted to (`ray job submit` sets
    RAY_ADDRESS for the driver), or start a local cluster; reuse the one this process has."""
    import ray

    os.environ.update(RAY_ENV)
    # A failed task's other return values (ingest's tables, a shard's partials) hold copies of the
    # error raysift has already raised (exit 2, one line): Ray would print each again at exit.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    from raysift.jobs.core import console

    if not ray.is_initialized():
        console.quiet_ray()  # before ray.init: its own lines at start-up go through the filters
        kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        if not in_job:  # a submitted job has its runtime env already; adding one conflicts
            kwargs["runtime_env"] = {"env_vars": RAY_ENV}
        address = settings.address or (os.environ.get("RAY_ADDRESS") if in_job else None)
        if address:
            check_ray_address(address)  # a dead address fails in seconds, not minutes
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                hint = "" if token_present() else f"; no Ray auth token found: {TOKEN_HELP}"
                raise InputError(f"ray.address: {address}: {exc}{hint}") from None
        else:
            ray.init(address="local", num_cpus=settings.num_cpus, **kwargs)
        handle_signals()  # ray.init installs its own SIGTERM handler (sys.exit)
    console.quiet_ray()


_received: list[int] = []


def _raise(signum, frame) -> None:
    # KeyboardInterrupt, not Interrupted: Ray's blocking calls (ray.get, ray.wait) check signals
    # in C and pass a KeyboardInterrupt through cleanly; any other exception comes out as a
    # SystemError. `interruption` turns it into Interrupted with the signal that arrived.
    _received.append(signum)
    raise KeyboardInterrupt


def received() -> list[int]:
    """The signals our handlers have turned into KeyboardInterrupt in this process."""
    return list(_received)


def interruption(exc: BaseException | None) -> Interrupted | None:
    """The Interrupted that `exc` is or stems from (a KeyboardInterrupt raised by our handlers,
    also when a library wrapped it), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Interrupted):
            return exc
        if isinstance(exc, KeyboardInterrupt):
            return Interrupted(_received[-1] if _received else signal.SIGINT)
        exc = exc.__cause__ or exc.__context__
    return None


def handle_signals() -> dict:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread: the pipeline records the stage
    as interrupted and the CLI exits 130 / 143 with one line. Returns the handlers replaced."""
    before = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            before[signum] = signal.signal(signum, _raise)
    return before


def configure_data() -> None:
    """Ray Data settings for scripts that run Ray Data pipelines beside raysift (benchmarks,
    golden files). raysift's stages use none, and never change the caller's Ray Data context."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # outputs in plan order
    # Raise the UDF's own exception (an InputError stays an InputError -> exit 2), not a wrapper.
    ctx.raise_original_map_exception = True
