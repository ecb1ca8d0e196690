"""The comparison figure, drawn from a report's :class:`~svdsweep.report.results.Results` alone.

The reporter writes ``results.json`` first and then draws the figure from that
file with :func:`redraw`, so the figure is proven to be reproducible without
retraining. Three panels, epochs on the x-axis:

1. validation loss (cross-entropy, nats) of both optimizers;
2. validation accuracy (%);
3. the fraction of gradient energy the top-k approximation keeps,
   ‖G_k‖²/‖G‖², for SVD(Adam) (plain Adam keeps all of it: 1).

Each curve is the mean over the final-run seeds with a band of ±1 standard
deviation across seeds (sample std, ddof=1; no band with one seed). The
legend gives each optimizer's best parameters and its test accuracy.

Matplotlib's object API on the Agg canvas: no pyplot, no global state, no display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from svdsweep.report.results import FigureInfo, FinalRun, Results

__all__ = [
    "BAND",
    "PANELS",
    "draw_comparison",
    "figure_info",
    "redraw",
    "save_comparison",
]

#: (curve of each :class:`FinalRun`, y-axis label, scale applied to the values), one per panel.
PANELS: tuple[tuple[str, str, float], ...] = (
    ("val_loss", "validation loss (cross-entropy, nats)", 1.0),
    ("val_acc", "validation accuracy (%)", 100.0),
    ("energy", "gradient energy kept by top-k, ‖G_k‖²/‖G‖²", 1.0),
)
PANEL_TITLES = ("Validation loss", "Validation accuracy", "Energy kept by the rank-k gradient")
#: What the shaded band around each mean line shows.
BAND = "±1 std across seeds"
LABELS = {"adam": "Adam", "svd-adam": "SVD(Adam)"}
DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}
COLORS = {"adam": "#1f77b4", "svd-adam": "#d62728"}
FIGSIZE = (16.0, 5.0)  # inches
DPI = 110


def draw_comparison(results: Results) -> Figure:
    """The three-panel figure of ``results``."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    optimizers = [o for o in ("adam", "svd-adam") if results.runs_of(o)]
    for ax, (key, ylabel, scale), title in zip(axes, PANELS, PANEL_TITLES, strict=True):
        for optimizer in optimizers:
            curves = [_curve(run, key) for run in results.runs_of(optimizer) if _curve(run, key)]
            if not curves:
                continue
            _mean_and_band(ax, curves, scale, COLORS[optimizer], _legend(results, optimizer))
        if key == "energy":
            ax.axhline(
                1.0, color=COLORS["adam"], linestyle="--", linewidth=1.2, label="Adam (keeps all)"
            )
        ax.yaxis.get_major_formatter().set_useOffset(False)  # 0.99999, not "1e-5 + 1"
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small", loc="best")
    figure.suptitle(_title(results), fontsize="large")
    return figure


def figure_info(file: str = "comparison.png") -> FigureInfo:
    """What :func:`save_comparison` draws: recorded in results.json before drawing."""
    from svdsweep.report.results import FigureInfo

    return FigureInfo(
        file=file,
        panels=[key for key, _, _ in PANELS],
        band=BAND,
        dpi=DPI,
        size_px=[round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI)],
    )


def save_comparison(results: Results, path: str | Path) -> FigureInfo:
    """Draws and saves the figure as PNG; returns what was drawn (panels, pixel size)."""
    from svdsweep.report.results import FigureInfo

    figure = draw_comparison(results)
    figure.savefig(path, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in figure.get_size_inches())
    return FigureInfo(
        file=Path(path).name,
        panels=[key for (key, _, _), _ in zip(PANELS, figure.axes, strict=False)],
        band=BAND,
        dpi=DPI,
        size_px=[width, height],
    )


def redraw(results_json: str | Path, png: str | Path) -> FigureInfo:
    """The figure again, from results.json alone: no storage, no retraining."""
    from svdsweep.report.results import Results

    return save_comparison(Results.read(results_json), png)


def _curve(run: FinalRun, key: str) -> list[float | None]:
    curve: list[float | None] = getattr(run, key)
    return curve


def _mean_and_band(
    ax: Any, curves: list[list[float | None]], scale: float, color: str, label: str
) -> None:
    # Diverged runs stop early: average each epoch over the runs that reached it.
    length = max(len(c) for c in curves)
    values = np.full((len(curves), length), np.nan)
    for row, curve in enumerate(curves):
        # results.json writes a non-finite value (a diverging run) as null.
        values[row, : len(curve)] = [math.nan if v is None else v * scale for v in curve]
    values[~np.isfinite(values)] = np.nan
    epochs = np.arange(1, length + 1)
    counts = np.sum(~np.isnan(values), axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(values, axis=0) if values.size else values
        std = np.nanstd(values, axis=0, ddof=1) if len(curves) > 1 else np.zeros(length)
    std = np.where(counts > 1, std, 0.0)
    ax.plot(epochs, mean, color=color, linewidth=2, marker="o", markersize=3, label=label)
    if len(curves) > 1:
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _legend(results: Results, optimizer: str) -> str:
    from svdsweep.report.stats import format_params

    label = f"{LABELS[optimizer]} ({format_params(results.studies[optimizer].best.params)})"
    summary = results.summary[optimizer].test_acc if optimizer in results.summary else None
    if summary and summary.n:
        label += f"\ntest acc {_pct(summary.mean)}"
        if summary.std is not None:
            label += f" ± {_pct(summary.std)}"
    return label


def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}%"


def _title(results: Results) -> str:
    protocol = results.protocol
    data = DATASET_NAMES.get(protocol.dataset, protocol.dataset)
    if protocol.train_subset:
        data += f" ({protocol.train_subset} training images)"
    return (
        f"Tuned Adam vs SVD(Adam) on {data}, {protocol.model.upper()}: "
        f"{len(protocol.seeds)} seeds × {protocol.epochs} epochs; "
        f"lines: mean, bands: {BAND}"
    )
