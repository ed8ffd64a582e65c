"""`raysift` command line. Exit codes: 0 success, 2 bad input or config (one line on stderr),
1 internal failure (one line on stderr; the traceback with RAYSIFT_DEBUG=1), 130 / 143
interrupted by SIGINT / SIGTERM (one line; what was committed is kept and a rerun resumes)."""

from __future__ import annotations

import enum
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer

from raysift.jobs.config import METHOD_NAMES
from raysift.jobs.core import console
from raysift.jobs.core.errors import Interrupted, describe, input_error
from raysift.jobs.core.runfolder import RunFolder

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Select the candidate rows that will most help a target task, on Ray.",
)

class Job(str, enum.Enum):
    """What `raysift submit` runs on the cluster."""

    run = "run"
    curate = "curate"
    evaluate = "evaluate"
    estimate = "estimate"


ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see configs/ and the README)")]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait", min=0, metavar="SECONDS",
        help="when another run holds the run folder: wait up to SECONDS for it (default: refuse "
        "at once, exit 2)",
    ),
]  # fmt: skip
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config field, e.g. --set embed.batch_size=128"),
]


def demo_config() -> Path:
    """The shipped demo config: package data (`raysift.configs`), beside the demo's pool, targets
    and held-out texts (`raysift.demo`); in a checkout, configs/demo.yaml."""
    from importlib.resources import files

    return Path(str(files("raysift.configs").joinpath("demo.yaml")))


def demo_output_default(config: Path) -> Path | None:
    """Where the demo writes when --output-dir is not given: the config's own runs/demo in a
    checkout; ./runs/demo for an installed raysift (never into site-packages)."""
    from raysift.jobs.cluster import CHECKOUT

    return None if CHECKOUT else Path.cwd() / "runs" / "demo"


def _load(config: Path, overrides: list[str] | None):
    from raysift.jobs.config import load_config

    return load_config(config, overrides or [])


def _wait(seconds: float) -> None:
    """How long this command waits for a run folder another run holds (jobs.runlock)."""
    from raysift.jobs.core.runlock import WAITING

    WAITING["seconds"] = seconds


_log = console.say


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            envvar="RAYSIFT_VERBOSE",
            help="also show Ray's own INFO lines, Ray Data's progress and library warnings",
        ),
    ] = False,
) -> None:
    """Select the candidate rows that will most help a target task, on Ray."""
    console.configure(verbose)


def _run(config: Path, overrides: list[str] | None, stages: list[str] | None,
         wait: float = 0) -> Path:  # fmt: skip
    from raysift.jobs.pipeline import run

    _wait(wait)
    cfg = _load(config, overrides)
    run_dir = run(cfg, stages, log=_log)
    typer.echo(f"run folder: {cfg.output_dir}")
    if cfg.output_dir != str(run_dir):
        typer.echo(f"local mirror: {run_dir}")
    return run_dir


@app.command("run")
def run_cmd(config: ConfigArg, set_: SetOpt = None, wait_: WaitOpt = 0) -> None:
    """Run every stage the config lists (ingest -> embed -> select)."""
    _run(config, set_, None, wait_)


@app.command()
def ingest(config: ConfigArg, set_: SetOpt = None, wait_: WaitOpt = 0) -> None:
    """Read and clean candidates and targets into the run folder (data/)."""
    _run(config, set_, ["ingest"], wait_)


@app.command()
def embed(config: ConfigArg, set_: SetOpt = None, wait_: WaitOpt = 0) -> None:
    """Embed the ingested rows on a Ray actor pool (resumes committed shards)."""
    _run(config, set_, ["embed"], wait_)


@app.command(
    help="Select candidates with the configured method (select.method: "
    f"{', '.join(METHOD_NAMES)})."
)
def select(config: ConfigArg, set_: SetOpt = None, wait_: WaitOpt = 0) -> None:
    _run(config, set_, ["select"], wait_)


@app.command()
def finetune(config: ConfigArg, set_: SetOpt = None, wait_: WaitOpt = 0) -> None:
    """Fine-tune the configured causal LM on selected.jsonl with Ray Train (resumes)."""
    _run(config, set_, ["finetune"], wait_)


@app.command()
def evaluate(config: ConfigArg, set_: SetOpt = None, wait_: WaitOpt = 0) -> None:
    """Select with each method at one budget, fine-tune on each, score the target's held-out
    perplexity; writes evaluation.json and report.html."""
    from raysift.jobs.workflows.evaluate import run_evaluate

    _wait(wait_)
    cfg = _load(config, set_)
    run_dir = run_evaluate(cfg, log=_log)
    typer.echo(f"report: {run_dir / 'report.html'}")


@app.command()
def estimate(
    config: ConfigArg,
    set_: SetOpt = None,
    validate_: Annotated[
        int,
        typer.Option(
            "--validate",
            min=0,
            help="also fine-tune N sampled subsets for real and write gradex/validation.json",
        ),
    ] = 0,
    wait_: WaitOpt = 0,
) -> None:
    """GradEx: estimate fine-tuning on subsets of the pool's data sources from gradients at a
    meta-initialisation, score the sources and choose them (gradex/ in the run folder)."""
    from raysift.jobs.workflows.gradex_estimate import run_estimate

    _wait(wait_)
    cfg = _load(config, set_)
    run_dir = run_estimate(cfg, validate_, log=_log)
    result = json.loads((run_dir / RunFolder.GRADEX / "result.json").read_text())
    typer.echo(f"chosen sources: {', '.join(result['chosen'])}")
    if validate_:
        v = json.loads((run_dir / RunFolder.GRADEX / "validation.json").read_text())
        e = v["estimator"]
        typer.echo(
            f"validation over {v['subsets']} fine-tunes: Spearman {e['spearman']:.3f}, "
            f"Pearson {e['pearson']:.3f}, mean relative error {e['mean_relative_error']:.4f}"
        )
    typer.echo(f"run folder: {run_dir}")


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config and its inputs, and print the resolved config."""
    from raysift.jobs.config import to_yaml
    from raysift.jobs.stages.ingest import check_input

    cfg = _load(config, set_)
    check_input(cfg.candidates, "candidates")
    check_input(cfg.targets, "targets")
    typer.echo(to_yaml(cfg), nl=False)


@app.command()
def curate(config: ConfigArg, set_: SetOpt = None, wait_: WaitOpt = 0) -> None:
    """Incremental curation of a growing pool folder: embed only new rows, re-select, write a
    new version under curate/ with a diff against the previous one (nothing new: no-op)."""
    from raysift.jobs.workflows.curate import run_curate

    _wait(wait_)
    summary = run_curate(_load(config, set_), log=_log)
    typer.echo(json.dumps(summary))


@app.command()
def submit(
    config: ConfigArg,
    address: Annotated[
        str,
        typer.Option(
            envvar="RAY_API_SERVER_ADDRESS",
            help="the cluster's dashboard (`ray dashboard cluster.yaml` tunnels it here)",
        ),
    ] = "http://127.0.0.1:8265",
    set_: SetOpt = None,
    wait_: Annotated[
        bool, typer.Option("--wait/--no-wait", help="wait for the job and exit with its result")
    ] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 24 * 3600,
    command: Annotated[Job, typer.Option(help="what the job runs on the config")] = Job.run,
    folder_wait: Annotated[
        float,
        typer.Option(min=0, metavar="SECONDS",
                     help="the job's --wait: how long it waits for a run folder another run "
                     "holds (default: it refuses at once)"),
    ] = 0,
) -> None:
    """Submit `raysift COMMAND CONFIG` (run by default) to a running cluster as a Ray job (this
    checkout uploaded as the working_dir); with --wait, follow it to the end."""
    from raysift.jobs import cluster

    job_id = cluster.submit(config, address, list(set_ or []), command=command.value,
                            folder_wait=folder_wait)  # fmt: skip
    typer.echo(f"submitted: {job_id}")
    typer.echo(f"follow it: ray job logs -f {job_id} --address {address}")
    if not wait_:
        return
    status = cluster.wait(address, job_id, timeout)
    typer.echo(f"{job_id}: {status}")
    if status != "SUCCEEDED":
        tail = cluster.logs(address, job_id).strip().splitlines()[-15:]
        typer.echo("\n".join(tail), err=True)
        raise typer.Exit(1)


@app.command()
def demo(
    output_dir: Annotated[
        Path | None,
        typer.Option(help="run folder (default: runs/demo in the checkout, else ./runs/demo)"),
    ] = None,
    set_: SetOpt = None,
    evaluate_: Annotated[
        bool,
        typer.Option(
            "--evaluate/--no-evaluate",
            help="also fine-tune SmolLM2 on each selection and write report.html",
        ),
    ] = True,
    wait_: WaitOpt = 0,
) -> None:
    """The whole path on the shipped demo: embed, select (knn), then fine-tune SmolLM2 on knn's,
    random's and the target's own rows and compare target perplexity in report.html."""
    from raysift.jobs.stages.report import evaluation_table, source_table

    config = demo_config()
    overrides = list(set_ or [])
    output_dir = output_dir or demo_output_default(config)
    if output_dir is not None:
        overrides.insert(0, f"output_dir={output_dir.resolve()}")
    run_dir = _run(config, overrides, None, wait_)
    source_table(run_dir)
    if evaluate_:
        from raysift.jobs.workflows.evaluate import run_evaluate

        run_evaluate(_load(config, overrides), log=_log)
        evaluation_table(run_dir)
        report = run_dir / RunFolder.REPORT
        typer.echo(f"report: {report}")
        typer.echo(f"open it: python -m webbrowser file://{report}")


# Typer >= 0.25 ships its own copy of click; older ones raise click's classes.
_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (click.exceptions.Abort, typer.Abort)
_USAGE_ERRORS = (click.ClickException, getattr(typer, "TyperException", click.ClickException))


def _interrupted(exc: Interrupted | None) -> int:
    exc = exc or Interrupted(signal.SIGINT)
    where = f" during {exc.stage}" if exc.stage else ""
    print(
        f"raysift: interrupted by {exc.name}{where}; what was committed is kept: run the same "
        "command again to resume",
        file=sys.stderr,
    )
    import threading

    def shutdown() -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # the local cluster's processes go with it
        except BaseException:  # noqa: BLE001, S110 - exiting anyway
            pass

    # In a thread with a deadline, then a hard exit. Measured: after a Ctrl-C inside a blocking
    # Ray call the process sometimes never ended -- in ray.shutdown() or at interpreter exit
    # (Ray's own atexit shutdown). The local cluster's processes share the driver's fate (Ray
    # starts them so): exiting takes them down (the tests check none is left).
    worker = threading.Thread(target=shutdown, daemon=True)
    worker.start()
    try:
        worker.join(timeout=20)
    except BaseException:  # noqa: BLE001 - a second signal: exit now
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exc.code)


def main(argv: list[str] | None = None) -> int:
    import signal

    from raysift.jobs.runtime import handle_signals

    before = handle_signals()
    try:
        return _main(argv)
    finally:  # a caller in the same process (the tests) gets its own handlers back
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _main(argv: list[str] | None) -> int:
    from raysift.jobs.runtime import interruption, received

    try:
        try:
            # standalone_mode=False: a command's `typer.Exit(n)` comes back as n, not raised
            code = app(args=argv, standalone_mode=False, prog_name="raysift")
        finally:  # a remote run folder gets what the command wrote, also when it failed
            from raysift.jobs.core.storage import sync_all

            sync_all()
        if code == 130 and received():  # Typer turned our KeyboardInterrupt into Exit(130)
            return _interrupted(Interrupted(received()[-1]))
        return code if isinstance(code, int) else 0
    except (Interrupted, KeyboardInterrupt) as exc:
        return _interrupted(interruption(exc))
    except (*_EXITS, *_ABORTS) as exc:
        if (stop := interruption(exc)) is not None:  # Typer turns ^C into Exit(130)
            return _interrupted(stop)
        if isinstance(exc, _ABORTS):
            print("raysift: aborted", file=sys.stderr)
            return 130
        return exc.exit_code
    except _USAGE_ERRORS as exc:  # unknown command or option, missing argument
        print(f"raysift: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if (stop := interruption(exc)) is not None:  # a library wrapped our KeyboardInterrupt
            return _interrupted(stop)
        if input_error(exc) is not None:
            print(f"raysift: error: {describe(exc)}", file=sys.stderr)
            return 2
        if os.environ.get("RAYSIFT_DEBUG"):
            traceback.print_exc()
        print(
            f"raysift: internal error: {describe(exc)} (set RAYSIFT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
