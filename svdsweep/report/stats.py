"""The statistics behind the verdict: pure functions of numbers, no storage, no Ray.

* :func:`spread`: mean, sample standard deviation and count of the finite values;
* :func:`welch_test`: Welch's t-test of SVD(Adam) against Adam, and Cohen's d;
* :func:`conclude`: one replicate's outcome and sentence, read off its test;
* :func:`conclude_across`: the verdict across tuning replicates, which says
  "supported" or "not supported" only when every replicate agrees, and says
  the comparison does not test denoising when the tuned k truncates nothing;
* :func:`profile_sentence`: what the rank profile shows, in one sentence;
* :func:`mean_curve` and :func:`max_overlap`: what the caveats and the
  provenance say about curves and parallelism;
* :func:`number`, :func:`p_value`, :func:`format_params`: how the report, the
  figure and the verdict write them.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALPHA",
    "Spread",
    "WelchTest",
    "conclude",
    "conclude_across",
    "format_params",
    "max_overlap",
    "mean_curve",
    "profile_sentence",
    "spread",
    "welch_test",
]

#: Significance level of the verdict: the usual 5 %, fixed before any result is seen.
ALPHA = 0.05


@dataclass
class Spread:
    """Mean ± sample standard deviation (ddof = 1) of the finite values; None where undefined."""

    mean: float | None
    std: float | None
    n: int
    values: list[float] = field(default_factory=list)


@dataclass
class WelchTest:
    """Welch's t-test of SVD(Adam) against Adam; None where undefined (too few or equal values)."""

    n_adam: int
    n_svd_adam: int
    mean_adam: float | None = None
    mean_svd_adam: float | None = None
    statistic: float | None = None
    df: float | None = None
    p_value: float | None = None
    cohens_d: float | None = None


def spread(values: Sequence[float | None]) -> Spread:
    """The finite values of ``values`` (a diverged run has none) and their spread."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return Spread(
        mean=statistics.fmean(finite) if finite else None,
        std=statistics.stdev(finite) if len(finite) > 1 else None,
        n=len(finite),
        values=finite,
    )


def welch_test(adam: list[float], svd: list[float]) -> WelchTest:
    """Welch's t-test of SVD(Adam) against Adam (two-sided), and Cohen's d.

    ``d = (mean_adam - mean_svd) / sqrt((var_adam + var_svd) / 2)``: positive
    when SVD(Adam) has the lower (better) loss.
    """
    result = WelchTest(
        n_adam=len(adam),
        n_svd_adam=len(svd),
        mean_adam=statistics.fmean(adam) if adam else None,
        mean_svd_adam=statistics.fmean(svd) if svd else None,
    )
    if min(len(adam), len(svd)) < 2:
        return result
    from scipy import stats

    with warnings.catch_warnings():  # identical values: p is nan, reported as such below
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(svd, adam, equal_var=False)
    result.statistic = _finite_or_none(float(test.statistic))
    result.p_value = _finite_or_none(float(test.pvalue))
    result.df = _finite_or_none(float(getattr(test, "df", math.nan)))
    pooled = math.sqrt((statistics.variance(adam) + statistics.variance(svd)) / 2)
    if pooled > 0:
        result.cohens_d = (statistics.fmean(adam) - statistics.fmean(svd)) / pooled
    return result


def conclude(test: WelchTest, metric: str, seeds: int) -> tuple[str, str]:
    """(outcome, one-sentence verdict) for the hypothesis "SVD(Adam) trains better".

    The outcome is "supported", "not supported" or "inconclusive".
    """
    what = "early-stopped " + metric.replace("_", " ")
    a, s = test.mean_adam, test.mean_svd_adam
    means = (
        f"mean {what}: SVD(Adam) {number(s)}, tuned Adam {number(a)} nats"
        if a is not None and s is not None
        else f"no {what} to compare"
    )
    usable = min(test.n_adam, test.n_svd_adam)
    if usable < 2:
        return "inconclusive", (
            f"Inconclusive: too few seeds for a test ({usable} "
            f"usable run(s) per optimizer of {seeds}; Welch's t-test needs at least 2); {means}."
        )
    p = test.p_value
    stats_text = (
        f"Welch's t = {number(test.statistic, 3)}, p = {p_value(p)}, "
        f"Cohen's d = {number(test.cohens_d, 2)}"
    )
    if p is None:
        return "inconclusive", (
            f"Inconclusive: the {what} does not vary across seeds, so Welch's t-test is "
            f"undefined (p = nan); {means}."
        )
    if p >= ALPHA:
        return "inconclusive", (
            f"Inconclusive: the difference in {what} between SVD(Adam) and tuned Adam is "
            f"not significant at the {ALPHA:.0%} level ({stats_text}; {means}), so the "
            "hypothesis is not supported by this evidence."
        )
    assert a is not None and s is not None  # p is defined, so both means are
    if s < a:
        return "supported", (
            f"Supported: SVD(Adam) reaches a lower {what} than tuned Adam ({stats_text}; {means})."
        )
    return "not supported", (
        f"Not supported: tuned Adam reaches a lower final {what} than SVD(Adam) "
        f"({stats_text}; {means})."
    )


def conclude_across(
    replicates: Sequence[tuple[str, bool, str | None]], profile: str | None
) -> tuple[str, str]:
    """(outcome, first line of the verdict) from each replicate's (outcome, truncates, why not).

    * Most replicates' tuned k truncates nothing: "untested". The comparison
      is then plain Adam against itself, whatever the test says, so the line
      says so, without "supported" or "not supported", then what the profile shows.
    * Every replicate significant in the same direction: "supported" (SVD(Adam)
      lower) or "not supported" (Adam lower).
    * Anything else: "inconclusive", with how many replicates point each way.
      A claim that one tuning draw makes and another does not is the draw's luck.
    """
    total = len(replicates)
    untruncated = [why for _, truncates, why in replicates if not truncates and why]
    if total == 0:
        return "inconclusive", "Inconclusive: no replicate was reported."
    tail = f" The rank profile shows: {profile}" if profile else ""
    if 2 * len(untruncated) > total:
        return "untested", (
            f"This comparison does not test denoising: in {len(untruncated)} of {total} "
            f"tuning replicates the tuned SVD(Adam) truncates nothing ({'; '.join(untruncated)}), "
            f"so it is plain Adam.{tail}"
        )
    # An untruncated replicate compares Adam with itself: it supports nothing either way.
    counts = {
        outcome: sum(1 for o, truncates, _ in replicates if o == outcome and truncates)
        for outcome in ("supported", "not supported", "inconclusive")
    }
    agreement = (
        f"{counts['supported']} of {total} replicates find SVD(Adam) significantly better, "
        f"{counts['not supported']} find tuned Adam significantly better, "
        f"{counts['inconclusive']} find no significant difference"
        + (f", {len(untruncated)} truncate nothing" if untruncated else "")
    )
    if counts["supported"] == total:
        return "supported", (
            f"Supported: in every one of {total} tuning replicates SVD(Adam) reaches a "
            f"significantly lower early-stopped test loss than tuned Adam.{tail}"
        )
    if counts["not supported"] == total:
        return "not supported", (
            f"Not supported: in every one of {total} tuning replicates tuned Adam reaches a "
            f"significantly lower early-stopped test loss than SVD(Adam).{tail}"
        )
    return "inconclusive", (
        f"Inconclusive: the replicates do not agree on the early-stopped test loss "
        f"({agreement}), so no claim holds across tuning runs.{tail}"
    )


def profile_sentence(
    adam: float | None,
    ranks: Sequence[tuple[int, float | None, float | None]],
    noise: float | None,
    no_truncation: float,
) -> str:
    """One sentence read off the rank profile: which truncating ranks beat tuned Adam, by how much.

    ``adam``: the profile's tuned-Adam score; ``ranks``: (k, best score, energy
    kept in the least-kept layer) per rank; scores are early-stopped validation
    losses (lower is better). A rank *truncates* when it keeps less than
    ``no_truncation`` of the energy in some layer; above that it is Adam by
    another name, whatever its score. ``noise``: the seed-to-seed standard
    deviation of that score (from the finals); a difference within twice it
    is called a tie, not a win, since each point is one best-of-N draw.
    """
    scored = [(k, v, e) for k, v, e in ranks if v is not None and math.isfinite(v)]
    if adam is None or not scored:
        return "no rank has a finite score to compare with tuned Adam."
    truncating = [(k, v) for k, v, e in scored if e is None or e < no_truncation]
    if not truncating:
        return (
            f"every profiled rank keeps at least {100 * no_truncation:g}% of the gradient energy, "
            "so the profile does not reach truncation."
        )
    margin = 2 * noise if noise is not None else 0.0
    margin_text = (
        f"twice the seed-to-seed noise (2σ = {number(margin)} nats)"
        if noise is not None
        else "zero (no seed-to-seed noise was measured)"
    )
    better = [(k, v) for k, v in truncating if adam - v > margin]
    tied = [(k, v) for k, v in truncating if abs(v - adam) <= margin]
    worse = [(k, v) for k, v in truncating if v - adam > margin]
    ks = ", ".join(str(k) for k, _ in truncating)
    text = (
        f"among the ranks that truncate (k = {ks}: less than {100 * no_truncation:g}% of the "
        f"energy kept in some layer), "
    )
    if better:
        k, v = min(better, key=lambda item: item[1])
        text += (
            f"{len(better)} beat{'s' if len(better) == 1 else ''} tuned Adam's validation score "
            f"({number(adam)} nats) by more than {margin_text}: "
            + ", ".join(f"k={kk}" for kk, _ in better)
            + f", the best k={k} by {number(adam - v)} nats"
        )
    else:
        text += (
            f"none beats tuned Adam's validation score ({number(adam)} nats) by more than "
            f"{margin_text}"
        )
    if tied:
        text += "; " + ", ".join(f"k={k}" for k, _ in tied) + " within it"
    if worse:
        top = max(k for k, _ in worse)
        below = [v for k, v in truncating if k <= top]
        if all(v - adam > margin for v in below):
            text += f"; every k <= {top} is worse by >= {number(min(below) - adam)} nats"
        else:
            text += "; " + ", ".join(f"k={k}" for k, _ in worse) + " worse"
    return text + "."


def mean_curve(curves: list[list[float | None]]) -> list[float]:
    """The per-epoch mean over the runs that reached that epoch with a finite value."""
    length = max((len(c) for c in curves), default=0)
    mean = []
    for epoch in range(length):
        values = [c[epoch] for c in curves if epoch < len(c)]
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not finite:
            break
        mean.append(statistics.fmean(finite))
    return mean


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at the same instant (parallelism achieved)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def number(value: float | None, digits: int = 4) -> str:
    """A figure as the report writes it; ``n/a`` where undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def p_value(value: float | None) -> str:
    """A p-value as the report writes it: 3 significant digits, scientific below 0.001."""
    if value is None:
        return "nan"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def format_params(params: dict[str, Any]) -> str:
    """``lr=0.00291, k=9``: how best parameters are written in the figure and the report."""
    return ", ".join(
        f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in sorted(params.items(), key=lambda item: item[0] != "lr")
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
