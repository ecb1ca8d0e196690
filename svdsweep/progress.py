"""Progress display for long work, on stderr so that stdout stays parseable."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from svdsweep.train import ReportCallback

__all__ = ["epoch_progress", "stderr_console"]

stderr_console = Console(stderr=True)


def format_metrics(metrics: dict[str, float]) -> str:
    parts = [
        f"train loss {metrics['train_loss']:.4f}",
        f"val loss {metrics['val_loss']:.4f}",
        f"val acc {metrics['val_acc']:.2%}",
    ]
    if "energy" in metrics:
        parts.append(f"top-k energy {metrics['energy']:.3f}")
    return "  ".join(parts)


def print_line(progress: Progress, line: str) -> None:
    """A result line on stdout; through the bar's console when both share a terminal."""
    if sys.stdout.isatty() and stderr_console.is_terminal:
        progress.console.print(line, highlight=False)
    else:
        print(line, flush=True)


@contextmanager
def epoch_progress(label: str, epochs: int, *, quiet: bool = False) -> Iterator[ReportCallback]:
    """A progress bar over epochs; yields the ``report`` callback for :func:`svdsweep.train`.

    Each finished epoch's metrics are printed as a line on stdout (unless
    ``quiet``), so a log keeps them after the bar is gone.
    """
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
        disable=quiet or not stderr_console.is_terminal,  # no bar in logs; lines still print
        redirect_stdout=False,
    ) as progress:
        task = progress.add_task(label, total=epochs)

        def report(epoch: int, metrics: dict[str, float]) -> None:
            progress.advance(task)
            if not quiet:
                print_line(progress, f"epoch {epoch:>3}/{epochs}  {format_metrics(metrics)}")

        yield report
