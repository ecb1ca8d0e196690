"""The statistics behind the verdict: Welch's test, the conclusion, spreads and curves."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from svdsweep.report.stats import (
    conclude,
    max_overlap,
    mean_curve,
    p_value,
    spread,
    welch_test,
)


@pytest.mark.parametrize(
    ("adam", "svd", "outcome", "phrase"),
    [
        ([0.40], [0.30], "inconclusive", "too few seeds for a test"),
        ([0.40, 0.41, 0.42], [0.30, 0.31, 0.30], "supported", "Supported: SVD(Adam) reaches"),
        ([0.30, 0.31, 0.30], [0.40, 0.41, 0.42], "not supported", "Not supported: tuned Adam"),
        ([0.30, 0.35, 0.40], [0.31, 0.36, 0.39], "inconclusive", "not significant at the 5%"),
        ([0.30, 0.30], [0.30, 0.30], "inconclusive", "does not vary across seeds"),
    ],
)
def test_the_verdict_rests_on_welchs_test(
    adam: list[float], svd: list[float], outcome: str, phrase: str
) -> None:
    test = welch_test(adam, svd)
    found, sentence = conclude(test, "test_loss", len(adam))
    assert found == outcome and phrase in sentence
    if min(len(adam), len(svd)) >= 2 and test.p_value is not None:
        expected = stats.ttest_ind(svd, adam, equal_var=False)
        assert test.p_value == pytest.approx(expected.pvalue)
        assert test.statistic == pytest.approx(expected.statistic)
        assert f"p = {p_value(test.p_value)}" in sentence


def test_cohens_d_is_positive_when_svd_adam_has_the_lower_loss() -> None:
    adam, svd = [0.40, 0.42, 0.44], [0.30, 0.32, 0.34]
    test = welch_test(adam, svd)
    # Both variances are 0.0004: d = (0.42 - 0.32) / 0.02 = 5.
    assert test.cohens_d == pytest.approx(5.0)
    assert test.mean_adam == pytest.approx(0.42) and test.mean_svd_adam == pytest.approx(0.32)
    assert test.n_adam == test.n_svd_adam == 3
    assert test.df is not None and 2 <= test.df <= 4


def test_a_spread_leaves_out_non_finite_and_missing_values() -> None:
    found = spread([0.5, None, math.inf, 0.7, math.nan])
    assert found.values == [0.5, 0.7] and found.n == 2
    assert found.mean == pytest.approx(0.6)
    assert found.std == pytest.approx(math.sqrt(0.02))  # sample std, ddof = 1
    one = spread([0.5])
    assert (one.mean, one.std, one.n) == (0.5, None, 1)
    assert spread([]).mean is None


def test_the_mean_curve_follows_the_runs_that_reached_each_epoch() -> None:
    # The second run diverged after its first epoch (null, then nothing).
    assert mean_curve([[1.0, 0.8, 0.6], [3.0, None]]) == pytest.approx([2.0, 0.8, 0.6])
    assert mean_curve([[None, 1.0]]) == []
    assert mean_curve([]) == []


def test_max_overlap_counts_runs_in_flight_at_once() -> None:
    assert max_overlap([(0, 2), (1, 3), (2.5, 4)]) == 2
    assert max_overlap([(0, 1), (1, 2)]) == 1  # one ends as the next starts
    assert max_overlap([]) == 0
