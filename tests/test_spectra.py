"""The spectra suite: every method on every spectrum shape, dtype and layout, against float64.

The corpus is :mod:`svdsweep.optim.spectra` (fixed seeds). Methods that claim
the floor (exact, and the certified fast methods) must keep >= 0.99 of the
optimal top-k energy at every step; every method's certificate must be a true
lower bound, so that a step that falls short can never pass as certified.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from svdsweep.optim import SVDGradient, lowrank, spectra

FLOOR = lowrank.CERTIFIED_FRACTION


@functools.cache
def suite(method: str) -> spectra.SuiteResult:
    return spectra.run_suite(method)


def short_steps(result: spectra.SuiteResult) -> dict[str, list[float]]:
    return {
        name: [round(ratio, 4) for ratio in ratios]
        for name, ratios in result.ratios.items()
        if min(ratios) < FLOOR
    }


def test_the_corpus_covers_what_the_issue_lists() -> None:
    names = " | ".join(case.name for case in spectra.cases())
    for shape in ("decaying", "flat", "tied", "rank-deficient", "moving support", "rotating"):
        assert shape in names
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        assert dtype in names
    assert "1e+20" in names and "1e-30" in names and "non-contiguous" in names
    strided = next(case for case in spectra.cases() if "strided" in case.name)
    assert not strided.matrices[0].is_contiguous()


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_certified_methods_keep_the_floor_on_every_step(method: str) -> None:
    result = suite(method)
    assert result.steps > 100
    assert short_steps(result) == {}
    assert result.worst_ratio >= FLOOR
    # No projection onto k directions beats the optimum (beyond output rounding to bf16).
    assert max(max(ratios) for ratios in result.ratios.values()) <= 1 + 3e-2


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace", "subspace sync-free"])
def test_certificates_never_claim_more_than_was_captured(method: str) -> None:
    assert suite(method).unsound_certificates == 0


def test_fast_methods_escalate_only_where_the_spectrum_needs_it() -> None:
    """Cases whose tail beyond the basis is small certify without escalating."""
    generator = torch.Generator().manual_seed(0)
    cheap = {"exponential", "rank-deficient (rank 2)", "rank k+2", "zero matrix"}
    for case in spectra.cases():
        if case.name not in cheap:
            continue
        basis = None
        for matrix in case.matrices:
            result = lowrank.subspace_low_rank(matrix, spectra.RANK, basis, generator=generator)
            basis = result.basis
            assert result.escalation == 0, case.name
            assert float(result.certificate) >= FLOOR
    flat = suite("subspace").ratios["flat (Gaussian)"]
    assert min(flat) >= FLOOR  # met by escalating, which the counts show
    assert suite("subspace").escalations["exact"] > 0


def test_sync_free_variant_keeps_the_floor_where_the_basis_can_follow() -> None:
    """It cannot escalate mid-step; where it falls short its certificate says so (above)."""
    result = suite("subspace sync-free")
    short = short_steps(result)
    assert set(short) <= {"flat (Gaussian)", "moving support", "moving support, decaying"}, short
    for name in ("decaying 1/i", "exponential", "rotating subspace", "torch.float16"):
        assert min(result.ratios[name]) >= FLOOR, name
    short_count = sum(ratio < FLOOR for ratios in result.ratios.values() for ratio in ratios)
    assert result.flagged >= short_count > 0  # every short step is flagged for a restart


def test_moving_support_is_found_at_every_step_through_the_wrapper() -> None:
    """The issue's reproduction: a warm basis that never sees the new support kept 0.35."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.zeros(64, 64))
    optimizer = SVDGradient(torch.optim.SGD([param], lr=0.0), rank=4)
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :32] = torch.randn(64, 32)
    right[:, 32:] = torch.randn(64, 32)
    for gradient in (left, right, left, right, left):
        param.grad = gradient.clone()
        optimizer.step()
        optimal = torch.linalg.svdvals(gradient.double())[:4].square().sum()
        assert float(param.grad.double().square().sum() / optimal) >= FLOOR
    counts = optimizer.diagnostics()["escalations"]
    assert counts["widened"] + counts["exact"] >= 4  # every step after the first escalated
    assert sum(counts.values()) == 5


@pytest.mark.parametrize(
    ("dtype", "magnitude"),
    [(torch.float16, 1e3), (torch.float32, 1e20), (torch.float32, 1e-30), (torch.float64, 1e30)],
)
@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_extreme_but_finite_gradients_are_projected_and_reported_right(
    dtype: torch.dtype, magnitude: float, method: str
) -> None:
    generator = torch.Generator().manual_seed(1)
    gradient = (torch.randn(40, 30, generator=generator, dtype=torch.float64) * magnitude).to(dtype)
    param = nn.Parameter(torch.zeros(40, 30, dtype=dtype))
    optimizer = SVDGradient(
        torch.optim.SGD([param], lr=0.0), rank=3, method=method, nonfinite="skip"
    )
    param.grad = gradient.clone()
    optimizer.step()  # raised NonFiniteGradientError (or skipped) before: the norm overflowed

    assert optimizer.skipped_steps == 0
    values = torch.linalg.svdvals(gradient.double() / magnitude)
    expected = float(values[:3].square().sum() / values.square().sum())
    (reported,) = optimizer.energy_fractions().values()
    assert reported == pytest.approx(expected, rel=1e-2 if dtype == torch.float16 else 1e-4)
    kept = float((param.grad.double() / magnitude).square().sum() / values[:3].square().sum())
    assert kept == pytest.approx(1.0, abs=1e-2 if dtype == torch.float16 else 1e-4)
