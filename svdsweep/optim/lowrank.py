"""Best rank-k approximations of a matrix: the pure math behind :class:`SVDGradient`.

Every function here takes tensors and returns tensors. None of them knows about
parameters, optimizer state or param groups; that bookkeeping lives in
:mod:`svdsweep.optim.svd_gradient`. Keeping the math apart lets the tests hold
each method against a float64 reference on its own.

Three methods compute (an approximation of) the Eckart–Young optimum
``G_k = U[:, :k] diag(S[:k]) Vh[:k]``:

``exact``
    ``torch.linalg.svd`` of the whole matrix. The reference: it *is* ``G_k``.
``randomized``
    Halko, Martinsson & Tropp (2011), Algorithm 4.4: a Gaussian sketch with
    ``oversample`` extra columns, ``power_iters`` re-orthonormalised power
    iterations, then Rayleigh–Ritz (an eigendecomposition of the small
    projected Gram matrix). Stateless: a fresh sketch every call.
``subspace``
    Subspace iteration warm-started from the previous call's right Ritz
    vectors, in the manner of PowerSGD (Vogels et al., 2019). Consecutive
    gradients of one layer share most of their dominant subspace, so one
    iteration from last step's basis captures almost all the energy that a
    cold randomized SVD needs several iterations for.

**The certificate.** Both fast methods certify every result: a lower bound on
captured / optimal top-k energy from the Ritz values and the energy outside
the basis. Below :data:`CERTIFIED_FRACTION` the call escalates to a wider
basis, then to the exact top-k subspace (:mod:`svdsweep.optim._certified`).

**Scale.** Gradients are scaled by a power of two (exact in binary floating
point) that brings ‖G‖ into [0.5, 1) before any product is formed, so
float32 gradients of 1e20 or 1e-30 neither overflow nor underflow in the Gram
matrices; half precision is computed in float32.

**Without host synchronisation.** ``subspace_low_rank(..., sync_free=True)``
is the variant for accelerators (:mod:`svdsweep.optim._sync_free`): matmuls,
``cholesky_ex`` and triangular solves only, and the certificate left on the
device for the caller to read when it chooses.

Accuracy knobs, for both fast methods: ``oversample`` (p) extra basis vectors
(larger p captures more when σ_k ≈ σ_{k+1}, and tightens the certificate,
whose slack is the energy outside the basis), and ``power_iters`` (q) extra
multiplications by ``GᵀG`` per call.

When ``k >= min(m, n)`` every method returns the matrix unchanged. When
``k + p >= min(m, n)`` a sketch would span the whole space, so the fast
methods take the top-k eigenvectors of the small Gram matrix instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdsweep.optim._certified import (
    escalate,
    gram_low_rank,
    householder_orthonormal,
    iterate_and_extract,
)
from svdsweep.optim._numerics import LowRankResult, energy_fraction, gaussian, scaled
from svdsweep.optim._sync_free import (
    mix_fresh_columns,
    sorted_eigenvectors_sync_free,
    sync_free_iterate_and_extract,
)

#: Power iterations of a subspace iteration that starts from a random basis.
COLD_START_POWER_ITERS = 2

#: The fraction of the optimal top-k energy every certified step keeps.
CERTIFIED_FRACTION = 0.99

#: The fast methods' basis holds at least this many columns by default.
MIN_BASIS_WIDTH = 32

#: Escalation levels, as recorded in :attr:`LowRankResult.escalation`.
ESCALATION_LEVELS = ("none", "widened", "exact")

__all__ = [
    "CERTIFIED_FRACTION",
    "ESCALATION_LEVELS",
    "LowRankResult",
    "captured_energy",
    "default_oversample",
    "exact_low_rank",
    "randomized_low_rank",
    "subspace_low_rank",
]


def default_oversample(rank: int) -> int:
    """p = max(8, 32 − k): a basis of at least :data:`MIN_BASIS_WIDTH` columns.

    The certificate's slack is the energy outside the basis. On the default
    MLP's 256x784 gradients a 17-column basis (k=9, p=8) leaves more than 1 %
    of the top-9 energy outside on about a quarter of the steps, which then
    escalate; a 32-column basis on about 2 % (BENCHMARKS.md). Warm-started,
    the wider basis needs no power iteration (q=0), so it costs less than the
    narrow one with q=1.
    """
    return max(8, MIN_BASIS_WIDTH - rank)


def _check_matrix(matrix: Tensor, rank: int, oversample: int = 0, power_iters: int = 0) -> None:
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2D matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(
            f"oversample and power_iters must be >= 0, got {oversample} and {power_iters}"
        )


def exact_low_rank(matrix: Tensor, rank: int) -> LowRankResult:
    """Eckart–Young optimum via a full (thin) SVD, in float32 or wider.

    Returns the matrix itself, unchanged, when ``rank >= min(m, n)``; its
    ``singular_values`` then hold just the Frobenius norm (see
    :func:`captured_energy`). The matrix is scaled by a power of two first, so
    that extreme magnitudes neither overflow nor underflow.
    """
    _check_matrix(matrix, rank)
    if rank >= min(matrix.shape):
        return _unchanged(matrix)
    work, scale, total = scaled(matrix, None, on_host=False)
    u, s, vh = torch.linalg.svd(work * scale, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank] / scale
    squared = s[:rank].square()
    energy = energy_fraction(squared.sum(), total)
    return LowRankResult(approx.to(matrix.dtype), squared, None, scale=scale, energy=energy)


def randomized_low_rank(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    frobenius_norm: Tensor | float | None = None,
    certify: float | None = CERTIFIED_FRACTION,
    out: Tensor | None = None,
) -> LowRankResult:
    """Randomized SVD (Halko et al. 2011, Alg. 4.4) with Rayleigh–Ritz, certified.

    ``frobenius_norm`` is ‖G‖ if the caller has it (computed otherwise);
    ``certify`` the fraction below which the call escalates (``None``: never);
    ``out`` a tensor to write the approximation into when its shape, dtype
    and layout allow (it may be ``matrix`` itself, which is read no more by then).
    """
    oversample = default_oversample(rank) if oversample is None else oversample
    _check_matrix(matrix, rank, oversample, power_iters)
    width = rank + oversample
    shortcut = _without_sketch(matrix, rank, width, frobenius_norm=frobenius_norm)
    if shortcut is not None:
        return shortcut
    work, scale, total = scaled(matrix, frobenius_norm, on_host=True)
    basis = householder_orthonormal(gaussian((work.shape[1], width), work, generator))
    extracted = iterate_and_extract(work, scale, total, basis, rank, power_iters)
    extracted = escalate(work, scale, total, extracted, rank, width, generator, certify)
    return extracted.result(matrix.dtype, with_basis=False, out=out)


def subspace_low_rank(
    matrix: Tensor,
    rank: int,
    basis: Tensor | None,
    *,
    oversample: int | None = None,
    power_iters: int = 0,
    generator: torch.Generator | None = None,
    frobenius_norm: Tensor | float | None = None,
    certify: float | None = CERTIFIED_FRACTION,
    sync_free: bool = False,
    out: Tensor | None = None,
) -> LowRankResult:
    """Warm-started subspace iteration with Rayleigh–Ritz extraction, certified.

    ``basis`` is the ``n x (k+p)`` right basis returned by the previous call on
    the same layer, or ``None`` to start from a Gaussian sketch with at least
    :data:`COLD_START_POWER_ITERS` power iterations. A basis of the wrong shape
    (e.g. after the rank changed) counts as none. ``certify`` is the fraction
    below which the call escalates (``None``: never). With ``sync_free`` the
    call never escalates (that would need a host read); it mixes fresh columns
    in instead and leaves the certificate for the caller to read. ``out``: as
    for :func:`randomized_low_rank`.
    """
    oversample = default_oversample(rank) if oversample is None else oversample
    _check_matrix(matrix, rank, oversample, power_iters)
    width = rank + oversample
    shortcut = _without_sketch(
        matrix, rank, width, sync_free=sync_free, frobenius_norm=frobenius_norm
    )
    if shortcut is not None:
        return shortcut
    work, scale, total = scaled(matrix, frobenius_norm, on_host=not sync_free)
    expected = (work.shape[1], width)
    cold = basis is None or tuple(basis.shape) != expected
    if sync_free:
        if cold:
            start = gaussian(expected, work, generator)
        else:
            assert basis is not None
            start = mix_fresh_columns(basis.to(work.device, work.dtype), oversample, generator)
        iters = max(power_iters, COLD_START_POWER_ITERS) if cold else max(power_iters, 1)
        assert isinstance(scale, Tensor) and isinstance(total, Tensor)
        return sync_free_iterate_and_extract(work, scale, total, start, rank, iters).result(
            matrix.dtype, with_basis=True
        )
    if cold:
        # A cold start is a randomized SVD: it needs the iterations a warm basis saves.
        cold_iters = max(power_iters, COLD_START_POWER_ITERS)
        start = householder_orthonormal(gaussian(expected, work, generator))
        extracted = iterate_and_extract(work, scale, total, start, rank, cold_iters)
    else:
        assert basis is not None
        start = basis.to(device=work.device, dtype=work.dtype)
        extracted = iterate_and_extract(work, scale, total, start, rank, power_iters, warm=True)
    extracted = escalate(work, scale, total, extracted, rank, width, generator, certify)
    return extracted.result(matrix.dtype, with_basis=True, out=out)


def captured_energy(singular_values: Tensor, frobenius_norm: Tensor) -> Tensor:
    """Fraction of a matrix's energy kept by a rank-k approximation, ‖G_k‖²/‖G‖².

    ``singular_values`` are those of the approximation (exact or Ritz values),
    so for orthogonal-projection methods this is exactly ‖Ĝ_k‖²/‖G‖².
    ``frobenius_norm`` is ‖G‖, passed in because the caller usually has it
    already. Computed as Σ(σ_i/‖G‖)² in float64, so that neither 1e-30 nor
    1e30 squares out of range. A zero matrix keeps all of its (zero) energy, so
    the fraction is 1. The fraction is clamped to 1: when G has rank <= k,
    rounding would otherwise give slightly more than all.
    """
    norm = frobenius_norm.double()
    values = singular_values.double().to(norm.device)
    fraction = (values / norm.clamp_min(torch.finfo(torch.float64).tiny)).square().sum()
    return torch.where(norm > 0, fraction.clamp_max(1.0), 1.0)


# -- internals ---------------------------------------------------------------------


def _unchanged(matrix: Tensor) -> LowRankResult:
    """The answer when nothing is truncated (``rank >= min(m, n)``): all the energy.

    ``singular_values`` then hold just the Frobenius norm: only the sum of
    squares matters to :func:`captured_energy`, and the norm gives it without
    an SVD (in float64, so that it does not overflow).
    """
    norm = torch.linalg.matrix_norm(matrix.double()).reshape(1)
    return LowRankResult(matrix, norm.square(), None)


def _without_sketch(
    matrix: Tensor,
    rank: int,
    width: int,
    *,
    sync_free: bool = False,
    frobenius_norm: Tensor | float | None = None,
) -> LowRankResult | None:
    """The fast methods' answer when a sketch of ``width`` columns would be pointless.

    Nothing to drop when ``rank >= min(m, n)``; the small Gram matrix when the
    sketch would span the whole space (eigendecomposed by ``eigh``, or by
    :func:`sorted_eigenvectors_sync_free` on the sync-free path). ``None``
    when a sketch is worth it. Off the sync-free path the scale and the energy
    are host floats, as on the certified path: a 10 x 128 classifier head is
    a dozen tiny kernels, whose launches, not their arithmetic, are its cost.
    """
    if rank >= min(matrix.shape):
        return _unchanged(matrix)
    if width < min(matrix.shape):
        return None
    if not sync_free:
        work, scale, total = scaled(matrix, frobenius_norm, on_host=True)
        (left, right), squared, _ = gram_low_rank(work * scale, rank, None)
        assert not isinstance(scale, Tensor)
        energy = energy_fraction(float(squared.sum()), total)
        return LowRankResult(
            ((left @ right) / scale).to(matrix.dtype), squared, None, scale=scale, energy=energy
        )
    work, scale, total = scaled(matrix, frobenius_norm, on_host=False)
    work = work * scale
    wide = work.shape[0] > work.shape[1]
    gram = work.T @ work if wide else work @ work.T
    top = sorted_eigenvectors_sync_free(gram)[:, :rank]
    approx = (work @ top) @ top.T if wide else top @ (top.T @ work)
    squared = (top * (gram @ top)).sum(0).clamp_min(0)
    return LowRankResult(
        (approx / scale).to(matrix.dtype),
        squared,
        None,
        scale=scale,
        energy=energy_fraction(squared.sum(), total),
    )
