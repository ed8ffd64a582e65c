"""Reaching a running cluster: address checks that fail in seconds, and job submission.

`raysift submit CONFIG --address http://HEAD:8265` is `ray job submit --working-dir . -- python -m
raysift run CONFIG` with raysift's runtime_env. From a checkout, the checkout (raysift/, engine/,
actors/, jobs/, configs/) is uploaded and every worker starts in its copy of it, first on its
sys.path: `import raysift` there is the uploaded raysift/, whose subpackages are the uploaded
folders -- driver and workers run the code you submitted, not the cluster's own install. From an
installed raysift, the current folder is uploaded (configs, data) and the installed package travels
as a `py_modules` entry, ahead of the cluster's copy on every worker's path. The manifest records
which code ran (`code`). The third-party packages come from the cluster's image (cluster.yaml's
setup_commands).
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from raysift.jobs.core.errors import InputError

PACKAGE = Path(__file__).resolve().parent.parent  # raysift/ in a wheel, the checkout's root else
CHECKOUT = (PACKAGE / "raysift" / "__init__.py").is_file()
# What the upload leaves out besides .gitignore's entries (Ray honours .gitignore).
# raysift/engine, raysift/jobs, ...: the checkout's links to its top-level folders (for type
# checkers); Ray follows links, so they would travel twice. raysift/__init__ finds the folders.
EXCLUDES = [".git", ".venv", "runs", "benchmarks", "tests", "*.egg-info", "__pycache__",
            *(f"/raysift/{name}" for name in ("engine", "actors", "jobs", "configs", "demo"))]
TOKEN_HELP = (
    "set RAY_AUTH_TOKEN, or put the cluster's token in ~/.ray/auth_token (`ray get-auth-token` "
    "on the head prints it), with RAY_AUTH_MODE=token"
)


def host_port(address: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise InputError(f"{address!r}: expected host:port or scheme://host:port")
    return parsed.hostname, parsed.port or default_port


def check_reachable(address: str, field: str, default_port: int, timeout_s: float = 3.0) -> None:
    """A TCP connection to the address within `timeout_s`, else an InputError naming `field`
    (ray.init and the Jobs client would otherwise retry for a minute or more)."""
    host, port = host_port(address, default_port)
    t0 = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError | socket.timeout):
            why = f"no answer in {timeout_s:.0f} s"
        raise InputError(
            f"{field}: nothing answers at {host}:{port} ({why}, {time.monotonic() - t0:.1f} s); "
            "is the cluster up (`ray status` on the head) and the address right?"
        ) from None


def check_ray_address(address: str | None) -> None:
    """`ray.address` values that name a host are checked before ray.init (auto/local are not)."""
    if address and address not in ("auto", "local"):
        check_reachable(address, "ray.address", 10001 if address.startswith("ray://") else 6379)


def upload_root() -> Path:
    """What `raysift submit` uploads: the checkout, or the current folder (an installed raysift)."""
    return PACKAGE if CHECKOUT else Path.cwd()


def runtime_env(working_dir: Path | None = None) -> dict:
    working_dir = working_dir or upload_root()
    env = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {"HF_HUB_OFFLINE": "1"},
    }
    if not CHECKOUT:  # an installed raysift: send this package (the code that submits)
        env["py_modules"] = [str(PACKAGE)]
    return env


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    check_reachable(address, "--address", 8265)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - the SDK raises bare exceptions for auth failures
        raise _explain(exc, address) from None


def _explain(exc: Exception, address: str) -> InputError:
    text = str(exc)
    if any(s in text for s in ("401", "403", "Unauthorized", "uthentication", "token")):
        return InputError(f"--address {address}: the cluster refused the auth token; {TOKEN_HELP}")
    first = text.splitlines()[0] if text else type(exc).__name__
    return InputError(f"--address {address}: {first}")


def submit(
    config: Path,
    address: str,
    overrides: list[str],
    *,
    working_dir: Path | None = None,
    submission_id: str | None = None,
    command: str = "run",
    folder_wait: float = 0,
) -> str:
    """Submit `raysift COMMAND CONFIG --set ...` as a Ray job (`run`, `curate`, `evaluate`,
    `estimate`); returns the job's submission id. `folder_wait`: the job's `--wait` for a run
    folder another run holds.

    The config path must lie inside `working_dir` (it travels with the upload)."""
    working_dir = working_dir or upload_root()
    config = Path(config).resolve()
    try:
        rel = config.relative_to(Path(working_dir).resolve())
    except ValueError:
        raise InputError(
            f"{config}: the config must be inside the uploaded folder {working_dir}"
        ) from None
    args = ["python", "-m", "raysift", command, rel.as_posix()]
    for item in overrides:
        args += ["--set", item]
    if folder_wait:
        args += ["--wait", f"{folder_wait:g}"]
    client = _client(address)
    try:
        return client.submit_job(
            entrypoint=shlex.join(args),
            runtime_env=runtime_env(working_dir),
            submission_id=submission_id,
        )
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, address) from None


def wait(address: str, job_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the job ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    from ray.job_submission import JobStatus

    client = _client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if time.monotonic() > deadline:
            return str(status.value)
        time.sleep(poll_s)


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def token_present() -> bool:
    """Whether this process has a Ray auth token to present (env, token file, default file)."""
    return (
        bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
        or (Path.home() / ".ray" / "auth_token").is_file()
    )
