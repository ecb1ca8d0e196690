"""What long work shows while it runs, on stderr so that stdout stays parseable.

One console for every command: :func:`say` for a line, :func:`epoch_progress`
for one training, :func:`count_progress` for a set of runs. On a terminal a
bar; in a log (CI, docker) plain lines that stay after the run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from svdsweep.train import ReportCallback

__all__ = ["count_progress", "epoch_progress", "say", "stderr_console"]

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


def say(message: str, enabled: bool = True) -> None:
    """One line of progress on stderr, unless ``enabled`` is false (``progress=False``)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def count_progress(label: str, total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A bar over ``total`` finished things on a terminal, and a line for each (kept in logs).

    Yields ``advance(line)``: one more is finished, and ``line`` says how it went.
    """
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
        disable=not enabled or not stderr_console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=total)

        def advance(line: str) -> None:
            bar.advance(task)
            if enabled:
                if stderr_console.is_terminal:
                    bar.console.print(line, highlight=False)
                else:
                    say(line)

        yield advance
