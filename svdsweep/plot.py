"""The report's figures, drawn from a report's :class:`~svdsweep.report.results.Results` alone.

The reporter writes ``results.json`` first and then draws the figures from that
file with :func:`redraw`, so they are proven to be reproducible without
retraining.

``comparison.png``, four panels:

1. validation loss (cross-entropy, nats) per epoch of both optimizers;
2. validation accuracy (%) per epoch;
3. the fraction of gradient energy the top-k approximation keeps,
   ‖G_k‖²/‖G‖², for SVD(Adam) (plain Adam keeps all of it: 1);
4. the verdict's metric: each final run's early-stopped test loss, as a
   point, per tuning replicate and optimizer, with the replicate's p-value.

In 1-3 each line is one replicate's winner, the mean over the final-run
seeds with a band of ±1 standard deviation across seeds (sample std, ddof=1;
no band with one seed); colour is the optimizer, line style the replicate.

``rank_profile.png``: the best early-stopped validation loss reachable at
each rank k (lr tuned per rank) with tuned Adam's as the full-rank reference
line, and on a second axis the energy fraction each k keeps in the least-kept
layer.

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
    "PROFILE_FIGURE",
    "draw_comparison",
    "draw_profile",
    "figure_info",
    "profile_figure_info",
    "redraw",
    "save_comparison",
]

PROFILE_FIGURE = "rank_profile.png"
PROFILE_FIGSIZE = (8.0, 5.0)  # inches

#: (curve of each :class:`FinalRun`, y-axis label, scale applied to the values), one per panel.
PANELS: tuple[tuple[str, str, float], ...] = (
    ("val_loss", "validation loss (cross-entropy, nats)", 1.0),
    ("val_acc", "validation accuracy (%)", 100.0),
    ("energy", "gradient energy kept by top-k, ‖G_k‖²/‖G‖²", 1.0),
    ("test_loss", "early-stopped test loss (nats)", 1.0),
)
PANEL_TITLES = (
    "Validation loss",
    "Validation accuracy",
    "Energy kept by the rank-k gradient",
    "Verdict metric, per final run",
)
LINESTYLES = ("-", "--", ":", "-.")
#: What the shaded band around each mean line shows.
BAND = "±1 std across seeds"
LABELS = {"adam": "Adam", "svd-adam": "SVD(Adam)"}
DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}
COLORS = {"adam": "#1f77b4", "svd-adam": "#d62728"}
FIGSIZE = (20.0, 5.5)  # inches
DPI = 110


def draw_comparison(results: Results) -> Figure:
    """The four-panel figure of ``results``."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(PANELS))
    optimizers = [o for o in ("adam", "svd-adam") if results.runs_of(o)]
    replicates = [r.replicate for r in results.replicates]
    for ax, (key, ylabel, scale), title in zip(axes, PANELS, PANEL_TITLES, strict=True):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if key == "test_loss":
            _verdict_points(ax, results)
            continue
        for optimizer in optimizers:
            for index, replicate in enumerate(replicates):
                runs = results.runs_of(optimizer, replicate)
                curves = [_curve(run, key) for run in runs if _curve(run, key)]
                if curves:
                    _mean_and_band(
                        ax,
                        curves,
                        scale,
                        COLORS[optimizer],
                        _legend(results, optimizer, replicate),
                        LINESTYLES[index % len(LINESTYLES)],
                    )
        if key == "energy":
            ax.axhline(
                1.0, color=COLORS["adam"], linestyle="--", linewidth=1.2, label="Adam (keeps all)"
            )
        ax.yaxis.get_major_formatter().set_useOffset(False)  # 0.99999, not "1e-5 + 1"
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="x-small", loc="best")
    figure.suptitle(_title(results), fontsize="large")
    return figure


def _verdict_points(ax: Any, results: Results) -> None:
    """Each final run's early-stopped test loss, per replicate and optimizer, and the p-values."""
    offsets = {"adam": -0.15, "svd-adam": 0.15}
    for replicate in results.replicates:
        for optimizer, offset in offsets.items():
            values = [
                run.test_loss
                for run in results.runs_of(optimizer, replicate.replicate)
                if run.test_loss is not None and math.isfinite(run.test_loss)
            ]
            x = np.full(len(values), replicate.replicate + offset)
            jitter = np.linspace(-0.04, 0.04, len(values)) if len(values) > 1 else 0.0
            first = replicate is results.replicates[0]
            ax.scatter(
                x + jitter,
                values,
                color=COLORS[optimizer],
                s=18,
                alpha=0.8,
                label=LABELS[optimizer] if first else None,
            )
            if values:
                ax.hlines(
                    float(np.mean(values)),
                    replicate.replicate + offset - 0.1,
                    replicate.replicate + offset + 0.1,
                    color=COLORS[optimizer],
                    linewidth=2,
                )
        ax.annotate(
            f"p = {_p(replicate.test.p_value)}",
            (replicate.replicate, 1.0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="top",
            fontsize="small",
        )
    ax.set_xticks([r.replicate for r in results.replicates])
    ax.set_xlabel("tuning replicate (points: seeds; bars: means)")
    ax.set_xlim(0.5, len(results.replicates) + 0.5)
    ax.margins(y=0.15)
    ax.legend(fontsize="x-small", loc="lower right")


def _p(value: float | None) -> str:
    from svdsweep.report.stats import p_value

    return p_value(value)


def draw_profile(results: Results) -> Figure:
    """The rank profile: best score per rank, tuned Adam's line, energy kept on a second axis."""
    profile = results.profile
    assert profile is not None
    figure = Figure(figsize=PROFILE_FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    points = [p for p in profile.ranks if p.value is not None]
    ax.plot(
        [p.rank for p in points],
        [p.value for p in points],
        color=COLORS["svd-adam"],
        marker="o",
        linewidth=2,
        label=f"SVD(Adam), lr tuned per k ({profile.budget} trials each)",
    )
    if profile.adam.value is not None:
        ax.axhline(
            profile.adam.value,
            color=COLORS["adam"],
            linestyle="--",
            linewidth=1.5,
            label=f"tuned Adam ({profile.budget} trials): full-rank reference",
        )
    ax.set_xscale("log", base=2)
    ranks = [p.rank for p in profile.ranks if p.rank is not None]
    ax.set_xticks(ranks, [str(rank) for rank in ranks])
    ax.set_xlabel("rank k kept by SVD(Adam) (log scale)")
    ax.set_ylabel("best early-stopped validation loss (nats)")
    ax.grid(True, alpha=0.3)
    energy_axis = ax.twinx()
    kept = [p for p in profile.ranks if p.kept_energy is not None]
    energy_axis.plot(
        [p.rank for p in kept],
        [p.kept_energy for p in kept],
        color="0.45",
        marker="s",
        linestyle=":",
        label="energy kept, least-kept layer",
    )
    energy_axis.set_ylabel("fraction of gradient energy kept, ‖G_k‖²/‖G‖²")
    energy_axis.set_ylim(0, 1.05)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = energy_axis.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize="small", loc="center right")
    ax.set_title(f"Rank profile ({results.experiment}): what truncation does", fontsize="medium")
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


def profile_figure_info() -> FigureInfo:
    """What :func:`draw_profile` draws: recorded in results.json before drawing."""
    from svdsweep.report.results import FigureInfo

    return FigureInfo(
        file=PROFILE_FIGURE,
        panels=["profile_score", "kept_energy"],
        band="none",
        dpi=DPI,
        size_px=[round(PROFILE_FIGSIZE[0] * DPI), round(PROFILE_FIGSIZE[1] * DPI)],
    )


def save_comparison(results: Results, path: str | Path) -> FigureInfo:
    """Draws and saves the comparison figure as PNG; returns what was drawn."""
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


def redraw(results_json: str | Path, directory: str | Path) -> list[FigureInfo]:
    """Every figure again, from results.json alone: no storage, no retraining.

    Writes ``comparison.png`` and, when the results have a rank profile,
    ``rank_profile.png`` into ``directory``; returns what was drawn.
    """
    from svdsweep.report.results import FigureInfo, Results

    results = Results.read(results_json)
    directory = Path(directory)
    drawn = [save_comparison(results, directory / results.figure.file)]
    if results.profile is not None:
        figure = draw_profile(results)
        figure.savefig(directory / PROFILE_FIGURE, format="png", dpi=DPI)
        width, height = (round(v * DPI) for v in figure.get_size_inches())
        drawn.append(
            FigureInfo(
                file=PROFILE_FIGURE,
                panels=["profile_score", "kept_energy"],
                band="none",
                dpi=DPI,
                size_px=[width, height],
            )
        )
    return drawn


def _curve(run: FinalRun, key: str) -> list[float | None]:
    curve: list[float | None] = getattr(run, key)
    return curve


def _mean_and_band(
    ax: Any,
    curves: list[list[float | None]],
    scale: float,
    color: str,
    label: str,
    linestyle: str = "-",
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
    ax.plot(
        epochs,
        mean,
        color=color,
        linewidth=1.8,
        linestyle=linestyle,
        marker="o",
        markersize=2.5,
        label=label,
    )
    if len(curves) > 1:
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.12, linewidth=0)


def _legend(results: Results, optimizer: str, replicate: int) -> str:
    from svdsweep.report.stats import format_params

    (found,) = [r for r in results.replicates if r.replicate == replicate]
    label = (
        f"{LABELS[optimizer]} r{replicate} ({format_params(found.studies[optimizer].best.params)})"
    )
    summary = found.summary[optimizer].test_acc if optimizer in found.summary else None
    if summary and summary.n:
        label += f", test acc {_pct(summary.mean)}"
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
        f"{protocol.replicates} tuning replicates, each winner {len(protocol.seeds)} seeds × "
        f"{protocol.epochs} epochs; lines: mean, bands: {BAND}"
    )
