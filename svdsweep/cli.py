"""The ``svdsweep`` command line. Thin: every command parses flags and calls the library.

Errors a user can fix (bad flags, missing data, unreachable storage, a
diverged run) print one line on stderr and exit with status 1 (2 for usage
errors, as click does); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

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


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, exit 1."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from svdsweep.data import DataNotFoundError
    from svdsweep.train import TrainingDiverged

    return (UserError, ValueError, DataNotFoundError, TrainingDiverged, PermissionError)


def friendly_errors(command: F) -> F:
    """Turns the errors a user can act on into ``error: <message>`` and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _user_errors() as error:
            message = " ".join(str(error).split()) or type(error).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Directory with the idx files (else $SVDSWEEP_DATA_DIR, Debian's package, download).",
    ),
]


@app.command()
@friendly_errors
def train(
    optimizer: Annotated[str, typer.Option(help="adam or svd-adam")] = "adam",
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    k: Annotated[int | None, typer.Option(help="rank kept by svd-adam")] = None,
    method: Annotated[str, typer.Option(help="default, exact, randomized or subspace")] = "default",
    epochs: Annotated[int, typer.Option(help="passes over the training split")] = 5,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 128,
    seed: Annotated[int, typer.Option(help="model init and batch order")] = 0,
    dataset: Annotated[str, typer.Option(help="fashion-mnist or mnist")] = "fashion-mnist",
    model: Annotated[str, typer.Option(help="mlp or cnn")] = "mlp",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    train_subset: Annotated[
        int | None, typer.Option(help="train on the first N training images only")
    ] = None,
    test: Annotated[
        bool, typer.Option("--test/--no-test", help="also evaluate the test set")
    ] = False,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Train one model and print per-epoch metrics."""
    from svdsweep.progress import epoch_progress
    from svdsweep.train import TrainConfig
    from svdsweep.train import train as run_training

    config = TrainConfig(
        optimizer=optimizer,
        lr=lr,
        k=k,
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        dataset=dataset,
        model=model,
        device=device,
        train_subset=train_subset,
        evaluate_test=test,
        data_dir=str(data_dir) if data_dir else None,
    )
    label = optimizer if optimizer == "adam" else f"{optimizer} k={k}"
    with epoch_progress(f"{label} lr={lr:g}", epochs, quiet=as_json) as report:
        result = run_training(config, report=report)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif result.test_acc is not None:
        typer.echo(f"test loss {result.test_loss:.4f}  test acc {result.test_acc:.2%}")


@bench_app.command("optimizer")
@friendly_errors
def bench_optimizer(
    epochs: Annotated[int, typer.Option(help="timed epochs per configuration")] = 2,
    k: Annotated[int, typer.Option(help="rank kept")] = 9,
    model: Annotated[str, typer.Option(help="mlp or cnn")] = "mlp",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    quality_steps: Annotated[
        int, typer.Option(help="training steps over which approximation quality is sampled")
    ] = 400,
    train_subset: Annotated[int | None, typer.Option(help="first N training images only")] = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Epoch time of every method as a ratio to Adam, and its quality against exact SVD."""
    from svdsweep.bench import print_report, run_optimizer_benchmark

    figures = run_optimizer_benchmark(
        epochs=epochs,
        k=k,
        model=model,
        device=device,
        quality_steps=quality_steps,
        train_subset=train_subset,
        data_dir=str(data_dir) if data_dir else None,
        progress=not as_json,
    )
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
    else:
        print_report(figures)


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
