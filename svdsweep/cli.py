"""The ``svdsweep`` command line. Thin: every command parses flags and calls the library.

Settings flow one way: a command's flags are given, by name, to one spec
object (``TrainConfig``, ``SweepSpec``, ``ReportSpec``), whose defaults are the
flags' defaults, so that each is written once, next to its reason.

One error policy (:func:`friendly_errors`): an error the user can fix (a
:class:`~svdsweep.errors.UserError`: bad flags, missing data, unreachable
storage, a diverged run) prints one line on stderr and exits with status 1;
anything else is a bug and keeps its traceback, with exit status 2 (as click
uses for usage errors).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from typer.exceptions import TyperException

from svdsweep.errors import UserError
from svdsweep.report import ReportSpec
from svdsweep.space import SearchSpace
from svdsweep.studies import DEFAULT_EXPERIMENT
from svdsweep.sweep import SweepSpec
from svdsweep.train import TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Does replacing each weight gradient by its top-k SVD train better than Adam?",
)
bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks that print ratios measured in one run."
)
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Exit status of an error the user can fix; of a bug (the traceback is printed).
USER_ERROR, INTERNAL_ERROR = 1, 2


def friendly_errors(command: F) -> F:
    """The error policy: a :class:`UserError` is one line and exit 1; a bug, its traceback, exit 2.

    ``PermissionError`` counts as the user's too: a directory they named
    cannot be written.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException, click.ClickException):
            raise
        except (UserError, PermissionError) as error:
            message = " ".join(str(error).split()) or type(error).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(USER_ERROR) from None
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (svdsweep.cluster)
            typer.echo(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception:  # noqa: BLE001 - anything else is a bug: its traceback, exit 2
            traceback.print_exc()
            typer.echo("svdsweep failed on an internal error (a bug): see above", err=True)
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper  # type: ignore[return-value]


def command(group: typer.Typer | None = None, name: str | None = None) -> Callable[[F], F]:
    """Registers a function as a command of ``group`` (the top level), under the error policy."""

    def register(function: F) -> F:
        (group or app).command(name)(friendly_errors(function))
        return function

    return register


def given(target: Callable[..., T], flags: dict[str, Any], **converted: Any) -> T:
    """``target`` called with the flags it takes, by name, and ``converted`` ones.

    Keeps the CLI from repeating every flag as ``name=name``: a flag reaches
    the spec under its own name, or is converted explicitly here.
    """
    accepted = inspect.signature(target).parameters
    picked = {name: value for name, value in flags.items() if name in accepted}
    return target(**{**picked, **converted})


#: The flags several commands share, with their help (what the default is, in order).
HELP = {
    "data-dir": "Directory with the idx files "
    "(else $SVDSWEEP_DATA_DIR, Debian's package, download).",
    "storage": "Optuna storage URL (else $SVDSWEEP_STORAGE, else sqlite:///svdsweep.db)",
    "experiment": "names its studies: <NAME>-adam, <NAME>-svd-adam (replicate 1), "
    "<NAME>-adam-r2, ..., <NAME>-profile-k8, ...",
    "ray-address": "auto, HOST:PORT of a Ray cluster, or local (else $RAY_ADDRESS)",
    "ray-node-ip": "node address of this process's Ray (else $SVDSWEEP_RAY_NODE_IP; else "
    "127.0.0.1, all on loopback, for a Ray started here, and 127.0.0.2 to join a cluster)",
    "artifact-dir": "Optuna artifact store for the figure and report "
    "(else $SVDSWEEP_ARTIFACT_DIR, else ./svdsweep-artifacts)",
    "out": "results directory: comparison.png, report.md, results.json (replaced)",
}
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help=HELP["data-dir"])]
StorageOption = Annotated[str | None, typer.Option("--storage", help=HELP["storage"])]
ExperimentOption = Annotated[str, typer.Option("--experiment", help=HELP["experiment"])]
RayAddressOption = Annotated[str | None, typer.Option("--ray-address", help=HELP["ray-address"])]
RayNodeIpOption = Annotated[str | None, typer.Option("--ray-node-ip", help=HELP["ray-node-ip"])]
ArtifactDirOption = Annotated[
    Path | None, typer.Option("--artifact-dir", help=HELP["artifact-dir"])
]
OutOption = Annotated[Path, typer.Option("--out", help=HELP["out"])]
DatasetOption = Annotated[str, typer.Option(help="fashion-mnist or mnist")]
ModelOption = Annotated[str, typer.Option(help="mlp or cnn")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda")]
SubsetOption = Annotated[int | None, typer.Option(help="train on the first N training images only")]
JsonOption = Annotated[bool, typer.Option("--json", help="print as JSON instead of a table")]


@command()
def train(
    optimizer: Annotated[str, typer.Option(help="adam or svd-adam")] = TrainConfig.optimizer,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = TrainConfig.lr,
    k: Annotated[int | None, typer.Option(help="rank kept by svd-adam")] = TrainConfig.k,
    method: Annotated[
        str, typer.Option(help="default, exact, randomized or subspace")
    ] = TrainConfig.method,
    epochs: Annotated[int, typer.Option(help="passes over the training split")] = (
        TrainConfig.epochs
    ),
    batch_size: Annotated[int, typer.Option(help="images per step")] = TrainConfig.batch_size,
    seed: Annotated[int, typer.Option(help="model init and batch order")] = TrainConfig.seed,
    dataset: DatasetOption = TrainConfig.dataset,
    model: ModelOption = TrainConfig.model,
    device: DeviceOption = TrainConfig.device,
    train_subset: SubsetOption = TrainConfig.train_subset,
    test: Annotated[
        bool, typer.Option("--test/--no-test", help="also evaluate the test set")
    ] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train one model and print per-epoch metrics."""
    from svdsweep.data import load_splits
    from svdsweep.progress import epoch_progress, say
    from svdsweep.train import resolve_device
    from svdsweep.train import train as run_training

    config = given(
        TrainConfig, locals(), evaluate_test=test, data_dir=str(data_dir) if data_dir else None
    )
    label = optimizer if optimizer == "adam" else f"{optimizer} k={k}"
    resolved = resolve_device(config.device)
    splits = load_splits(
        config.dataset, data_dir=config.data_dir, device=resolved, train_subset=train_subset
    )
    say(
        f"{label} lr={lr:g}: {epochs} epochs on {len(splits.train_y):,} training images "
        f"(validation {len(splits.val_y):,}), {config.model}, device {resolved}",
        not as_json,
    )
    with epoch_progress(f"{label} lr={lr:g}", epochs, quiet=as_json) as report:
        result = run_training(config, report=report, splits=splits)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif result.test_acc is not None:
        typer.echo(f"test loss {result.test_loss:.4f}  test acc {result.test_acc:.2%}")


@command(bench_app, "optimizer")
def bench_optimizer(
    epochs: Annotated[int, typer.Option(help="timed epochs per configuration")] = 2,
    k: Annotated[int, typer.Option(help="rank kept")] = 9,
    model: ModelOption = "mlp",
    device: DeviceOption = "auto",
    quality_steps: Annotated[
        int, typer.Option(help="training steps over which approximation quality is sampled")
    ] = 400,
    train_subset: SubsetOption = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Epoch time of every method as a ratio to Adam, and its quality against exact SVD."""
    from svdsweep.bench import print_report, run_optimizer_benchmark

    figures = given(
        run_optimizer_benchmark,
        locals(),
        data_dir=str(data_dir) if data_dir else None,
        progress=not as_json,
    )
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
    else:
        print_report(figures)


@command(bench_app, "sweep")
def bench_sweep(
    storage: Annotated[
        str | None, typer.Option(help="storage URL; PostgreSQL is the deployment path")
    ] = None,
    workers: Annotated[int, typer.Option(help="concurrent workers")] = 8,
    trials: Annotated[int, typer.Option(help="no-op trials per study")] = 100,
    real_trials: Annotated[int, typer.Option(help="real trials per study")] = 2,
    real_epochs: Annotated[int, typer.Option(help="epochs of each real trial")] = 5,
    repeats: Annotated[int, typer.Option(help="alternating no-op runs of each; medians")] = 3,
    train_subset: SubsetOption = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster (else local)")] = None,
    as_json: JsonOption = False,
) -> None:
    """No-op trials/s against stock Optuna, and a real trial's time outside training."""
    from svdsweep.sweep_bench import print_sweep_report, run_sweep_benchmark

    figures = given(run_sweep_benchmark, locals(), progress=not as_json)
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
    else:
        print_sweep_report(figures)


@command()
def sweep(
    storage: StorageOption = None,
    experiment: ExperimentOption = DEFAULT_EXPERIMENT,
    trials: Annotated[int, typer.Option(help="finished trials per study")] = SweepSpec.trials,
    workers: Annotated[
        int | None, typer.Option(help="Ray workers (default: one per GPU, else per CPU)")
    ] = SweepSpec.workers,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="GPUs each worker reserves: 1, 0 or a fraction")
    ] = SweepSpec.gpus_per_worker,
    cpus_per_worker: Annotated[
        float, typer.Option(help="CPUs each worker reserves")
    ] = SweepSpec.cpus_per_worker,
    ray_address: RayAddressOption = None,
    ray_node_ip: RayNodeIpOption = None,
    trial_epochs: Annotated[int, typer.Option(help="epochs per trial")] = SweepSpec.trial_epochs,
    dataset: DatasetOption = SweepSpec.dataset,
    model: ModelOption = SweepSpec.model,
    method: Annotated[str, typer.Option(help="low-rank method of svd-adam")] = SweepSpec.method,
    train_subset: SubsetOption = SweepSpec.train_subset,
    seed: Annotated[
        int, typer.Option(help="training seed of every trial; seeds samplers")
    ] = SweepSpec.seed,
    pruner: Annotated[
        str, typer.Option(help="successive-halving, median or none")
    ] = SweepSpec.pruner,
    lr_range: Annotated[tuple[float, float], typer.Option(help="log-uniform lr range searched")] = (
        SearchSpace.lr_low,
        SearchSpace.lr_high,
    ),
    k_range: Annotated[
        tuple[int, int] | None,
        typer.Option(help="log-uniform k range searched (default: 1 to the model's full rank)"),
    ] = None,
    replicates: Annotated[
        int, typer.Option(help="independent tuning replicates per optimizer")
    ] = SweepSpec.replicates,
    profile_trials: Annotated[
        int,
        typer.Option(help="trials per rank-profile study (k fixed, lr tuned); 0: no profile"),
    ] = SweepSpec.profile_trials,
) -> None:
    """Create or resume the studies and run trials on Ray workers until every budget is met."""
    from svdsweep.sweep import run_sweep

    low, high = k_range if k_range else (SearchSpace.k_low, None)
    space = SearchSpace(lr_range[0], lr_range[1], low, high)
    final = run_sweep(given(SweepSpec, locals(), space=space))
    _print_status(final)


@command()
def worker(
    storage: StorageOption = None,
    experiment: ExperimentOption = DEFAULT_EXPERIMENT,
    worker_id: Annotated[int, typer.Option(help="distinguishes this worker's sampler seed")] = 0,
    seed: Annotated[int, typer.Option(help="base sampler seed")] = 0,
    max_trials: Annotated[int | None, typer.Option(help="stop after this many trials")] = None,
) -> None:
    """Run the worker loop here, against an experiment that `svdsweep sweep` created."""
    from svdsweep.worker import run_worker

    summary = run_worker(storage, experiment, worker_id=worker_id, seed=seed, max_trials=max_trials)
    for study, number, state in summary.trials:
        typer.echo(f"{study} trial {number}: {state}")


@command()
def status(
    storage: StorageOption = None,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", help="one experiment (default: every one in the storage)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Trials per state, best value and best parameters of every study."""
    from svdsweep.storage import open_storage
    from svdsweep.studies import experiment_status, list_experiments

    if experiment:
        experiments, results = [experiment], [experiment_status(storage, experiment)]
    else:
        opened = open_storage(storage, heartbeat=False, create=False)
        experiments = list_experiments(opened)
        results = [experiment_status(storage, name, storage=opened) for name in experiments]
    if as_json:
        typer.echo(
            json.dumps([study.to_dict() for result in results for study in result], indent=2)
        )
        return
    for name, result in zip(experiments, results, strict=True):
        if len(experiments) > 1:
            typer.echo(f"experiment {name}")
        _print_status(result)


def _print_status(result: list[Any]) -> None:
    from rich.console import Console

    from svdsweep.sweep import status_table

    # Piped or logged, rich would assume 80 columns and cut the table.
    Console(width=None if sys.stdout.isatty() else 240).print(status_table(result))


@command()
def dashboard(
    storage: StorageOption = None,
    artifact_dir: Annotated[
        Path | None,
        typer.Option(help="artifact store shared with the reporter (else $SVDSWEEP_ARTIFACT_DIR)"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
) -> None:
    """Serve optuna-dashboard on the project's storage and artifact store."""
    from svdsweep.dashboard import serve_dashboard

    serve_dashboard(storage, artifact_dir, host, port)


@command()
def report(
    storage: StorageOption = None,
    experiment: ExperimentOption = DEFAULT_EXPERIMENT,
    out: OutOption = ReportSpec.out,
    epochs: Annotated[
        int | None, typer.Option(help="epochs of each final training (default: the trials')")
    ] = ReportSpec.epochs,
    seeds: Annotated[
        int, typer.Option(help="final trainings per optimizer, with seeds 1000, 1001, ...")
    ] = ReportSpec.seeds,
    ray_address: RayAddressOption = None,
    ray_node_ip: RayNodeIpOption = None,
    gpus_per_run: Annotated[
        float | None,
        typer.Option(help="GPUs each final training reserves (default: 1 if the cluster has any)"),
    ] = None,
    artifact_dir: ArtifactDirOption = None,
) -> None:
    """Retrain each replicate's best trials over several seeds; write figures and the report."""
    from svdsweep.report import build_report

    outcome = build_report(given(ReportSpec, locals()))
    _print_outcome(outcome, storage_given=storage is not None)


@command()
def run(
    preset: Annotated[
        str, typer.Option(help="quick (~5 min on 2 CPU cores, 10k images) or paper (full)")
    ] = "quick",
    trials: Annotated[int | None, typer.Option(help="trials per study")] = None,
    trial_epochs: Annotated[int | None, typer.Option(help="epochs per trial")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="epochs of each final training (default: trial epochs)")
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="final trainings per winner")] = None,
    replicates: Annotated[int | None, typer.Option(help="tuning replicates")] = None,
    profile_trials: Annotated[int | None, typer.Option(help="trials per profile study")] = None,
    profile: Annotated[
        bool, typer.Option(help="run the rank profile (--no-profile: skip it)")
    ] = True,
    train_subset: SubsetOption = None,
    experiment: Annotated[
        str | None, typer.Option(help="default: the preset's name (quick, paper)")
    ] = None,
    out: OutOption = ReportSpec.out,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default: sqlite:///svdsweep.db)")
    ] = None,
    artifact_dir: ArtifactDirOption = None,
    ray_node_ip: RayNodeIpOption = None,
) -> None:
    """The whole job: sweep every study, then report, on a local Ray and SQLite."""
    from svdsweep.job import run_job

    _print_outcome(given(run_job, locals()), storage_given=True)


def _print_outcome(outcome: Any, *, storage_given: bool) -> None:
    from svdsweep.report import dashboard_command

    typer.echo(outcome.verdict)
    typer.echo(f"figure:  {outcome.figure}")
    typer.echo(f"report:  {outcome.report}")
    typer.echo(f"results: {outcome.results_json}")
    typer.echo("dashboard (figures and report attached to every tuning study):")
    command = dashboard_command(
        outcome.storage_url, outcome.artifact_dir, storage_given=storage_given
    )
    typer.echo(f"  {command}")


def main() -> None:
    """Console-script entry point."""
    import logging

    import optuna

    # Optuna logs every study creation at INFO; the CLI prints what matters itself.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(standalone_mode=False)
    except TyperException as error:  # typer's own click: bad flags, or none at all
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError":
            code = 0  # typer has printed the help
        else:
            # A flag typed wrong: one line, like every other user error, not a boxed usage text.
            path = context.command_path if context is not None else "svdsweep"
            message = " ".join(error.format_message().split())
            typer.echo(f"error: {path}: {message} (see {path} --help)", err=True)
            code = USER_ERROR
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
