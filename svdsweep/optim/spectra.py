"""A fixed, seeded corpus of gradient sequences that a low-rank method must survive.

Each case is a short sequence of matrices, fed in order to a method (warm
starts depend on history), with the spectrum shapes, dtypes and layouts that a
researcher's gradients have and the default MLP's do not: slowly decaying and
flat spectra, singular values tied at the cut, rank-deficient matrices, a
support that moves between steps, a slowly rotating subspace, extreme
magnitudes, half precisions and non-contiguous views.

:func:`run_suite` measures, for one method, the captured / optimal top-k
energy of every step against a float64 SVD, how often the certificate had to
escalate, and whether the certificate ever claimed more than was captured.
``tests/test_spectra.py`` asserts on it; ``svdsweep bench optimizer`` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from svdsweep.optim import lowrank

__all__ = ["RANK", "SpectrumCase", "SuiteResult", "cases", "run_suite"]

#: The rank kept throughout the suite; the matrices are 48 x 96 (and transposes).
RANK = 4
_M, _N = 48, 96
_STEPS = 5


@dataclass(frozen=True)
class SpectrumCase:
    """A named sequence of matrices (in the dtype and layout the method receives)."""

    name: str
    matrices: tuple[Tensor, ...]


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    q: Tensor = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q
    return q


def _with_spectrum(
    spectrum: Tensor, generator: torch.Generator, m: int = _M, n: int = _N
) -> Tensor:
    u = _orthonormal(m, len(spectrum), generator)
    v = _orthonormal(n, len(spectrum), generator)
    matrix: Tensor = (u * spectrum) @ v.T
    return matrix


def _drifting(base: Tensor, generator: torch.Generator, drift: float = 0.05) -> tuple[Tensor, ...]:
    """``base`` plus a little fresh noise each step, as consecutive gradients are."""
    scale = drift * float(base.norm()) / math.sqrt(base.numel())
    steps = []
    for _ in range(_STEPS):
        steps.append(base + scale * torch.randn(base.shape, generator=generator, dtype=base.dtype))
    return tuple(steps)


def cases(seed: int = 0) -> Iterator[SpectrumCase]:
    """The corpus, deterministic for a seed (float64 unless a case says otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    r = min(_M, _N)
    i = torch.arange(1, r + 1, dtype=torch.float64)

    def spectrum(values: Tensor) -> Tensor:
        return _with_spectrum(values, generator)

    yield SpectrumCase("decaying 1/i", _drifting(spectrum(1 / i), generator))
    yield SpectrumCase("slowly decaying 1/sqrt(i)", _drifting(spectrum(i**-0.5), generator))
    yield SpectrumCase("exponential", _drifting(spectrum(torch.exp(-i / 4)), generator))
    yield SpectrumCase(
        "flat (Gaussian)",
        tuple(torch.randn(_M, _N, generator=generator, dtype=torch.float64) for _ in range(_STEPS)),
    )
    tied = torch.cat([torch.ones(RANK + 3, dtype=torch.float64), 0.5 / i[: r - RANK - 3]])
    yield SpectrumCase("tied across the cut", _drifting(spectrum(tied), generator, drift=0.0))
    gap_small = 1 / i
    gap_small[RANK] = gap_small[RANK - 1] * 0.999
    yield SpectrumCase("small gap at k", _drifting(spectrum(gap_small), generator))
    yield SpectrumCase(
        "rank-deficient (rank 2)", _drifting(spectrum(torch.tensor([3.0, 1.0])), generator, 0.0)
    )
    yield SpectrumCase(
        "rank k+2",
        _drifting(spectrum(torch.linspace(2, 1, RANK + 2, dtype=torch.float64)), generator, 0.0),
    )
    left = torch.zeros(_M, _N, dtype=torch.float64)
    right = torch.zeros(_M, _N, dtype=torch.float64)
    left[:, : _N // 2] = torch.randn(_M, _N // 2, generator=generator, dtype=torch.float64)
    right[:, _N // 2 :] = torch.randn(_M, _N // 2, generator=generator, dtype=torch.float64)
    yield SpectrumCase("moving support", (left, right, left, right, left, right))
    decaying = spectrum(1 / i)
    left_support = decaying.clone()
    left_support[:, _N // 2 :] = 0
    right_support = decaying.clone()
    right_support[:, : _N // 2] = 0
    yield SpectrumCase(
        "moving support, decaying", (left_support, right_support, left_support, right_support)
    )
    yield SpectrumCase("rotating subspace", _rotating(1 / i, generator))
    yield SpectrumCase("zero matrix", (torch.zeros(_M, _N, dtype=torch.float64),) * 2)
    base = spectrum(1 / i)
    for dtype, magnitude in (
        (torch.float32, 1e20),
        (torch.float32, 1e-30),
        (torch.float64, 1e150),
        (torch.float64, 1e-150),
        (torch.float16, 1e3),
    ):
        # Entries of `magnitude`: the norm alone overflows fp16 (> 65504) at 1e3.
        scaled = base / base.abs().amax() * magnitude
        yield SpectrumCase(
            f"{dtype} entries ~{magnitude:g}", _cast(_drifting(scaled, generator), dtype)
        )
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        yield SpectrumCase(f"{dtype}", _cast(_drifting(base, generator), dtype))
    tall = _drifting(_with_spectrum(1 / i, generator, _N, _M), generator)
    yield SpectrumCase("tall", tall)
    yield SpectrumCase(
        "non-contiguous (transposed view)",
        tuple(matrix.T.contiguous().T for matrix in _drifting(base, generator)),
    )
    wide = _drifting(_with_spectrum(1 / i, generator, _M, 2 * _N), generator)
    yield SpectrumCase("non-contiguous (strided columns)", tuple(matrix[:, ::2] for matrix in wide))


def _rotating(
    values: Tensor, generator: torch.Generator, angle: float = 0.15
) -> tuple[Tensor, ...]:
    """A fixed spectrum whose singular subspaces rotate by ``angle`` radians per step."""
    u = _orthonormal(_M, _M, generator)
    v = _orthonormal(_N, _N, generator)
    skew_u = torch.randn(_M, _M, generator=generator, dtype=torch.float64)
    skew_v = torch.randn(_N, _N, generator=generator, dtype=torch.float64)
    rotate_u = torch.linalg.matrix_exp(angle * (skew_u - skew_u.T) / math.sqrt(_M))
    rotate_v = torch.linalg.matrix_exp(angle * (skew_v - skew_v.T) / math.sqrt(_N))
    steps = []
    for _ in range(_STEPS + 1):
        steps.append((u[:, : len(values)] * values) @ v[:, : len(values)].T)
        u, v = rotate_u @ u, rotate_v @ v
    return tuple(steps)


def _cast(matrices: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    return tuple(matrix.to(dtype) for matrix in matrices)


@dataclass
class SuiteResult:
    """One method over the whole corpus."""

    method: str
    worst_ratio: float = 1.0
    worst_case: str = ""
    steps: int = 0
    escalations: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(lowrank.ESCALATION_LEVELS, 0)
    )
    #: Steps whose certificate exceeded the captured/optimal ratio it bounds (must be 0).
    unsound_certificates: int = 0
    #: Steps whose final certificate is below the floor (the sync-free variant's are read
    #: later and restart the basis; the certified methods escalate instead).
    flagged: int = 0
    ratios: dict[str, list[float]] = field(default_factory=dict)

    @property
    def escalation_rate(self) -> float:
        return 1 - self.escalations["none"] / max(self.steps, 1)


Method = Callable[[Tensor, Tensor | None, torch.Generator], lowrank.LowRankResult]


def methods() -> dict[str, Method]:
    """The methods the suite runs, by name, each as ``(matrix, basis, generator) -> result``."""
    return {
        "exact": lambda matrix, basis, generator: lowrank.exact_low_rank(matrix, RANK),
        "randomized": lambda matrix, basis, generator: lowrank.randomized_low_rank(
            matrix, RANK, generator=generator
        ),
        "subspace": lambda matrix, basis, generator: lowrank.subspace_low_rank(
            matrix, RANK, basis, generator=generator
        ),
        "subspace sync-free": lambda matrix, basis, generator: lowrank.subspace_low_rank(
            matrix, RANK, basis, generator=generator, sync_free=True
        ),
    }


def run_suite(method: str, seed: int = 0) -> SuiteResult:
    """Runs ``method`` over every case; ratios are against a float64 SVD of each input."""
    run = methods()[method]
    result = SuiteResult(method)
    generator = torch.Generator().manual_seed(seed)
    for case in cases(seed):
        basis: Tensor | None = None
        ratios = result.ratios.setdefault(case.name, [])
        for matrix in case.matrices:
            outcome = run(matrix, basis, generator)
            basis = outcome.basis
            ratio = energy_ratio(matrix, outcome.approx)
            ratios.append(ratio)
            result.steps += 1
            result.escalations[lowrank.ESCALATION_LEVELS[outcome.escalation]] += 1
            certificate = float(outcome.certificate)
            if certificate > ratio + _rounding_allowance(matrix.dtype):
                result.unsound_certificates += 1
            if certificate < lowrank.CERTIFIED_FRACTION:
                result.flagged += 1
            if ratio < result.worst_ratio:
                result.worst_ratio, result.worst_case = ratio, case.name
    return result


def energy_ratio(matrix: Tensor, approx: Tensor) -> float:
    """‖Ĝ_k‖² / ‖G_k‖² in float64 (1 when the optimum is 0), scale-free."""
    reference = matrix.double()
    peak = reference.abs().amax()
    if float(peak) == 0:
        return 1.0
    values = torch.linalg.svdvals(reference / peak)
    optimal = float(values[:RANK].square().sum())
    return float((approx.double() / peak).square().sum()) / optimal


def _rounding_allowance(dtype: torch.dtype) -> float:
    """Output rounding: the approximation is returned in the input's dtype."""
    return {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-5)
