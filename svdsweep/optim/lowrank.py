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

**The certificate.** Both fast methods project ``G`` onto an orthonormal basis
``P`` of ``w = k + p`` columns and keep the top-k Ritz directions of
``B = PᵀG``. With ``R = (I − PPᵀ)G`` the part of ``G`` outside the basis,
``GᵀG = BᵀB + RᵀR`` (the cross terms vanish because ``PᵀR = 0``), so by Ky
Fan's inequality the optimal top-k energy is at most

    E* ≤ Σ_{i≤k} θ_i² + ‖R‖²_F,   ‖R‖²_F = ‖G‖²_F − ‖B‖²_F,

where ``θ_i`` are the Ritz values: a bound that costs one reduction. The
captured energy is ``Σ_{i≤k} θ_i²`` exactly, so

    certificate = Σ_{i≤k} θ_i² / (Σ_{i≤k} θ_i² + ‖R‖²_F) ≤ captured / optimal

is a guaranteed lower bound, not an estimate. When it is below the target
(:data:`CERTIFIED_FRACTION`, 0.99) the call *escalates*: first the basis is
widened with ``w`` fresh Gaussian columns and iterated once with full
re-orthonormalisation (this finds directions a stale warm start misses, e.g.
when a gradient's support moves), then, if the wider bound still falls short,
the exact top-k subspace is taken from the eigendecomposition of the smaller
Gram matrix. Every result carries its certificate and the level it needed.

**Scale.** Gradients are scaled by a power of two (exact in binary floating
point) that brings ‖G‖ into [0.5, 1) before any product is formed, so
float32 gradients of 1e20 or 1e-30 neither overflow nor underflow in the Gram
matrices; half precision is computed in float32.

**Without host synchronisation.** ``subspace_low_rank(..., sync_free=True)``
is the variant for accelerators: orthonormalisation by shifted Cholesky QR
(Fukaya et al., 2020) with ``cholesky_ex`` and a triangular solve, the small
eigenproblem replaced by a few steps of subspace iteration on the ``w x w``
Gram matrix, fresh Gaussian columns mixed into the warm basis on every call
(branch-free, so a moved support is found without a data-dependent decision),
and the certificate returned as a device tensor for the caller to read when it
chooses. It calls no LAPACK/cuSOLVER routine that checks its status on the
host.

Accuracy knobs, for both fast methods: ``oversample`` (p) extra basis vectors
(larger p captures more when σ_k ≈ σ_{k+1}, and tightens the certificate,
whose slack is the energy outside the basis), and ``power_iters`` (q) extra
multiplications by ``GᵀG`` per call.

When ``k >= min(m, n)`` every method returns the matrix unchanged. When
``k + p >= min(m, n)`` a sketch would span the whole space, so the fast
methods take the top-k eigenvectors of the small Gram matrix instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: Power iterations of a subspace iteration that starts from a random basis.
COLD_START_POWER_ITERS = 2

#: Power iterations of the widened basis at escalation level 1.
WIDEN_POWER_ITERS = 1

#: The fraction of the optimal top-k energy every certified step keeps.
CERTIFIED_FRACTION = 0.99

#: The fast methods' basis holds at least this many columns by default.
MIN_BASIS_WIDTH = 32

#: Escalation levels, as recorded in :attr:`LowRankResult.escalation`.
ESCALATION_LEVELS = ("none", "widened", "exact")

#: Steps of subspace iteration on the small Gram matrix in the sync-free
#: variant: its top-k energy converges like (λ_{k+1}/λ_k)^(2·steps), below 1e-4 of
#: the energy on every case of the spectra suite.
SMALL_EIGEN_ITERS = 16

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


class LowRankResult:
    """A rank-k approximation with what the caller may want to keep.

    ``approx`` is the rank-k matrix (in the input's dtype); ``singular_values``
    the top-k (approximate) singular values in float64; ``basis`` the ``n x
    (k+p)`` right basis to warm start the next call from (``None`` for
    stateless methods); ``energy`` the captured fraction ‖Ĝ_k‖²/‖G‖²;
    ``certificate`` a lower bound on captured / optimal top-k energy (1 where
    the result is exact); ``escalation`` the index into
    :data:`ESCALATION_LEVELS` of the work it took. ``energy`` and
    ``certificate`` are Python floats where the method read them on the host
    anyway (the certified path) and 0-d tensors on the sync-free path.
    """

    __slots__ = ("_scale", "_squared", "approx", "basis", "certificate", "energy", "escalation")

    def __init__(
        self,
        approx: Tensor,
        squared_values: Tensor,
        basis: Tensor | None,
        *,
        scale: Tensor | float = 1.0,
        energy: Tensor | float = 1.0,
        certificate: Tensor | float = 1.0,
        escalation: int = 0,
    ) -> None:
        self.approx = approx
        self._squared, self._scale = squared_values, scale
        self.basis = basis
        self.energy = energy
        self.certificate = certificate
        self.escalation = escalation

    @property
    def singular_values(self) -> Tensor:
        """Computed on demand: the optimizer's hot path needs only ``energy``."""
        scale = self._scale.double() if isinstance(self._scale, Tensor) else self._scale
        values: Tensor = self._squared.double().clamp_min(0).sqrt() / scale
        return values


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
    work, scale, total = _scaled(matrix, None, on_host=False)
    u, s, vh = torch.linalg.svd(work * scale, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank] / scale
    squared = s[:rank].square()
    energy = _energy(squared.sum(), total)
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
) -> LowRankResult:
    """Randomized SVD (Halko et al. 2011, Alg. 4.4) with Rayleigh–Ritz, certified.

    ``frobenius_norm`` is ‖G‖ if the caller has it (computed otherwise);
    ``certify`` the fraction below which the call escalates (``None``: never).
    """
    oversample = default_oversample(rank) if oversample is None else oversample
    _check_matrix(matrix, rank, oversample, power_iters)
    width = rank + oversample
    shortcut = _without_sketch(matrix, rank, width)
    if shortcut is not None:
        return shortcut
    work, scale, total = _scaled(matrix, frobenius_norm, on_host=True)
    basis = _orthonormal(_gaussian((work.shape[1], width), work, generator))
    extracted = _iterate_and_extract(work, scale, total, basis, rank, power_iters)
    extracted = _escalate(work, scale, total, extracted, rank, width, generator, certify)
    return extracted.result(matrix.dtype, with_basis=False)


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
) -> LowRankResult:
    """Warm-started subspace iteration with Rayleigh–Ritz extraction, certified.

    ``basis`` is the ``n x (k+p)`` right basis returned by the previous call on
    the same layer, or ``None`` to start from a Gaussian sketch with at least
    :data:`COLD_START_POWER_ITERS` power iterations. A basis of the wrong shape
    (e.g. after the rank changed) counts as none. ``certify`` is the fraction
    below which the call escalates (``None``: never). With ``sync_free`` the
    call never escalates (that would need a host read); it mixes fresh columns
    in instead and leaves the certificate for the caller to read.
    """
    oversample = default_oversample(rank) if oversample is None else oversample
    _check_matrix(matrix, rank, oversample, power_iters)
    width = rank + oversample
    shortcut = _without_sketch(matrix, rank, width, sync_free=sync_free)
    if shortcut is not None:
        return shortcut
    work, scale, total = _scaled(matrix, frobenius_norm, on_host=not sync_free)
    expected = (work.shape[1], width)
    cold = basis is None or tuple(basis.shape) != expected
    if sync_free:
        if cold:
            start = _gaussian(expected, work, generator)
        else:
            assert basis is not None
            start = _mix_fresh_columns(basis.to(work.device, work.dtype), oversample, generator)
        iters = max(power_iters, COLD_START_POWER_ITERS) if cold else max(power_iters, 1)
        assert isinstance(scale, Tensor) and isinstance(total, Tensor)
        return _sync_free_iterate_and_extract(work, scale, total, start, rank, iters).result(
            matrix.dtype, with_basis=True
        )
    if cold:
        # A cold start is a randomized SVD: it needs the iterations a warm basis saves.
        cold_iters = max(power_iters, COLD_START_POWER_ITERS)
        start = _orthonormal(_gaussian(expected, work, generator))
        extracted = _iterate_and_extract(work, scale, total, start, rank, cold_iters)
    else:
        assert basis is not None
        start = basis.to(device=work.device, dtype=work.dtype)
        extracted = _iterate_and_extract(work, scale, total, start, rank, power_iters, warm=True)
    extracted = _escalate(work, scale, total, extracted, rank, width, generator, certify)
    return extracted.result(matrix.dtype, with_basis=True)


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


class _Extracted:
    """One Rayleigh–Ritz extraction in scaled coordinates, before unscaling."""

    __slots__ = ("approx", "basis", "certificate", "energy", "escalation", "scale", "squared")

    def __init__(
        self,
        approx: Tensor,
        squared: Tensor,
        basis: Tensor,
        *,
        scale: Tensor | float,
        energy: Tensor | float,
        certificate: Tensor | float,
        escalation: int = 0,
    ) -> None:
        self.approx, self.squared, self.basis = approx, squared, basis
        self.scale, self.energy, self.certificate = scale, energy, certificate
        self.escalation = escalation

    def result(self, dtype: torch.dtype, *, with_basis: bool) -> LowRankResult:
        return LowRankResult(
            (self.approx / self.scale).to(dtype),
            self.squared,
            self.basis if with_basis else None,
            scale=self.scale,
            energy=self.energy,
            certificate=self.certificate,
            escalation=self.escalation,
        )


def _unchanged(matrix: Tensor) -> LowRankResult:
    """The answer when nothing is truncated (``rank >= min(m, n)``): all the energy.

    ``singular_values`` then hold just the Frobenius norm: only the sum of
    squares matters to :func:`captured_energy`, and the norm gives it without
    an SVD (in float64, so that it does not overflow).
    """
    norm = torch.linalg.matrix_norm(matrix.double()).reshape(1)
    return LowRankResult(matrix, norm.square(), None)


def _energy(captured: Tensor | float, total: Tensor | float) -> Tensor | float:
    """captured / total (both scaled), 1 for a zero matrix, at most 1 (rounding)."""
    if isinstance(captured, Tensor) or isinstance(total, Tensor):
        total_t = torch.as_tensor(total, dtype=torch.float64)
        fraction = (torch.as_tensor(captured).double() / total_t.clamp_min(1e-300)).clamp_max(1.0)
        return torch.where(total_t > 0, fraction, 1.0)
    return min(captured / total, 1.0) if total > 0 else 1.0


def _scaled(
    matrix: Tensor, frobenius_norm: Tensor | float | None, *, on_host: bool
) -> tuple[Tensor, Tensor | float, Tensor | float]:
    """The working matrix, a power of two ``scale`` with ‖G‖·scale in [0.5, 1), and ‖G·scale‖².

    Multiplying by a power of two is exact. The scale is applied to the thin
    products, never to ``G`` itself: that saves a pass over the matrix, and
    every product that could overflow or underflow (``GᵀGV``, ``BBᵀ``) is
    formed from an already scaled factor. ``on_host``: as Python floats (the
    certified path reads the norm anyway; float arithmetic costs no kernel
    launches), otherwise as device tensors, without a host read.
    """
    work = _as_float(matrix)
    if frobenius_norm is None:
        frobenius_norm = torch.linalg.matrix_norm(work.double())
    if on_host:
        norm = float(frobenius_norm)
        scale = math.ldexp(1.0, -math.frexp(norm)[1]) if math.isfinite(norm) else 1.0
        return work, scale, (norm * scale) ** 2
    norm_t = torch.as_tensor(frobenius_norm, dtype=torch.float64, device=work.device)
    _, exponent = torch.frexp(norm_t)
    scale_t = torch.ldexp(torch.ones_like(norm_t), -exponent)
    return work, scale_t.to(work.dtype), (norm_t * scale_t).square().to(work.dtype)


def _gaussian(shape: tuple[int, int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A Gaussian sketch on ``like``'s device, drawn on the generator's own device.

    Drawing on the generator's device lets a CPU generator (whose state is
    easy to save) seed sketches for CUDA tensors too. The copy goes through
    pinned memory without blocking: a plain host-to-device copy would wait
    for the stream, a host synchronisation on every step.
    """
    device = generator.device if generator is not None else like.device
    sketch = torch.randn(*shape, device=device, dtype=like.dtype, generator=generator)
    if sketch.device == like.device:
        return sketch
    if sketch.device.type == "cpu" and torch.cuda.is_available():
        sketch = sketch.pin_memory()
    return sketch.to(like.device, non_blocking=True)


def _as_float(matrix: Tensor) -> Tensor:
    """float32 for half-precision inputs, so LAPACK/cuSOLVER see a supported dtype."""
    if matrix.dtype in (torch.float32, torch.float64):
        return matrix
    return matrix.float()


def _orthonormal(columns: Tensor) -> Tensor:
    q: Tensor = torch.linalg.qr(columns).Q
    return q


def _cholesky_orthonormal(columns: Tensor) -> Tensor:
    """Orthonormal columns spanning ``columns``, by shifted Cholesky QR, without a host read.

    One pass of Cholesky QR in float64: the Gram matrix, ``cholesky_ex``
    (which, unlike ``cholesky``, does not check its status on the host) and a
    triangular solve. In float64 one pass is orthonormal to ~κ²·1e-16, so the
    second pass that float32 CholeskyQR2 needs is unnecessary. The Gram matrix
    is shifted by 11·(mn + n(n+1))·u times its trace (Fukaya, Kannan, Nakatsukasa, Yamamoto &
    Yanagisawa, "Shifted Cholesky QR for computing the QR factorization of
    ill-conditioned matrices", SIAM J. Sci. Comput. 2020), so the
    factorisation exists for rank-deficient input: directions holding less
    than about that fraction of the energy come out shrunk towards zero instead of being
    blown up into noise, and contribute nothing to a projection. Like
    Gram–Schmidt, the first j output columns span the first j input columns.
    """
    work = columns.double()
    gram = work.T @ work
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    rows, width = work.shape
    roundoff = 11 * (rows * width + width * (width + 1)) * torch.finfo(torch.float64).eps
    shift = roundoff * gram.diagonal().sum() + torch.finfo(torch.float64).tiny
    factor, _ = torch.linalg.cholesky_ex(gram + shift * eye, upper=True)
    q: Tensor = torch.linalg.solve_triangular(factor, work, upper=True, left=False)
    return q.to(columns.dtype)


def _mix_fresh_columns(basis: Tensor, oversample: int, generator: torch.Generator | None) -> Tensor:
    """The warm basis with its last ``max(1, p // 2)`` columns replaced by Gaussian ones.

    The columns are sorted by Ritz value, so the replaced ones are the
    oversampling directions that mattered least; the fresh ones let the next
    power iteration find directions the warm basis has never seen.
    """
    fresh = min(max(1, oversample // 2), basis.shape[1])
    noise = _gaussian((basis.shape[0], fresh), basis, generator) / basis.shape[0] ** 0.5
    return torch.cat([basis[:, : basis.shape[1] - fresh], noise], dim=1)


def _certificate(captured: Tensor | float, inside: Tensor | float, total: Tensor | float) -> Any:
    """Lower bound on captured / optimal top-k energy (see the module docstring).

    ``captured`` = Σ_{i≤k} θ_i², ``inside`` = ‖PᵀG‖², ``total`` = ‖G‖², all
    scaled. ``outside`` is padded by 64 float32 roundoffs of ``total``, so
    that rounding in the two sums it is the difference of can only make the
    bound smaller. Python floats in, a float out; tensors in, a tensor out.
    """
    slack = 64 * torch.finfo(torch.float32).eps
    if isinstance(captured, Tensor):
        outside_t = torch.as_tensor(total - inside).clamp_min(0) + slack * total
        bound = captured / (captured + outside_t).clamp_min(torch.finfo(captured.dtype).tiny)
        return torch.where(torch.as_tensor(total) > 0, bound, 1.0).double()
    assert not isinstance(inside, Tensor) and not isinstance(total, Tensor)
    if total <= 0:
        return 1.0
    outside = max(total - inside, 0.0) + slack * total
    return captured / (captured + outside) if captured > 0 else 0.0


def _iterate_and_extract(
    work: Tensor,
    scale: Tensor | float,
    total: Tensor | float,
    right_basis: Tensor,
    rank: int,
    power_iters: int,
    *,
    warm: bool = False,
) -> _Extracted:
    """Subspace iteration from ``right_basis`` (n x w), then Rayleigh–Ritz.

    Returns the scaled rank-k approximation, its k squared Ritz values, the w
    right Ritz vectors (sorted by Ritz value, largest first, unit columns) as
    the next warm-start basis, the captured energy and the certificate (as
    floats: ``scale`` and ``total`` are host numbers on this path).

    The Ritz pairs come from the eigendecomposition of the small w x w matrix
    ``B Bᵀ`` with ``B = Pᵀ G``, not from an SVD of the w x n matrix ``B``:
    on CPU, LAPACK's SVD of a short-wide matrix costs ~15x more than the
    eigendecomposition, and squaring only affects the accuracy of the tiny
    Ritz values that are discarded anyway.

    A cold (random) basis is re-orthonormalised after every multiplication, as
    Halko et al. require. A ``warm`` basis holds last step's right Ritz vectors,
    which are close to singular vectors, so ``GᵀG`` scales its columns without
    mixing them: normalising each column keeps it well conditioned at a
    fraction of the cost of two QR factorisations per iteration.
    """
    for _ in range(power_iters):
        if warm:
            right_basis = torch.nn.functional.normalize(
                work.T @ ((work @ right_basis) * scale), dim=0
            )
        else:
            left = _orthonormal(work @ right_basis)
            right_basis = _orthonormal(work.T @ left)
    left = _orthonormal(work @ right_basis)  # m x w, spans the dominant column space
    projected = (left.T @ work) * scale  # w x n: the (scaled) matrix seen through the basis
    eigvals, eigvecs = torch.linalg.eigh(projected @ projected.T)  # ascending
    width = eigvecs.shape[1]
    top = eigvecs[:, width - rank :]
    approx = (left @ top) @ (top.T @ projected)
    # One host read of w numbers; the certificate and the energy are then float arithmetic.
    values = [max(value, 0.0) for value in eigvals.tolist()]
    captured = sum(values[width - rank :])
    assert not isinstance(total, Tensor)
    next_basis = torch.nn.functional.normalize(projected.T @ eigvecs.flip(1), dim=0)
    return _Extracted(
        approx,
        eigvals[width - rank :],
        next_basis,
        scale=scale,
        energy=_energy(captured, total),
        certificate=_certificate(captured, sum(values), total),
    )


def _sync_free_iterate_and_extract(
    work: Tensor, scale: Tensor, total: Tensor, right_basis: Tensor, rank: int, power_iters: int
) -> _Extracted:
    """:func:`_iterate_and_extract` with matmuls, ``cholesky_ex`` and triangular solves only.

    The small eigenproblem is solved approximately: simultaneous iteration on
    the w x w Gram matrix, re-orthonormalised by Cholesky QR, then
    sorted by the energy each column captures (``argsort`` runs on the device), so that the
    next basis has the column order (largest first) that the warm start and
    :func:`_mix_fresh_columns` rely on. The captured energy reported is that of
    the returned projection exactly (``trace(Zᵀ BBᵀ Z)``), and the certificate
    is the bound of the module docstring with that energy; it equals the
    exact-eigensolver bound once the small iteration has converged.
    """
    for _ in range(power_iters):
        right_basis = _cholesky_orthonormal(work.T @ (_cholesky_orthonormal(work @ right_basis)))
    left = _cholesky_orthonormal(work @ right_basis)
    projected = (left.T @ work) * scale
    gram = projected @ projected.T
    eigvecs = _sorted_eigenvectors_sync_free(gram)
    top = eigvecs[:, :rank]
    ritz = (top.T @ gram @ top).diagonal().clamp_min(0)
    approx = (left @ top) @ (top.T @ projected)
    captured = ritz.sum()
    certificate = _certificate(captured, gram.diagonal().sum(), total)
    next_basis = _cholesky_orthonormal(projected.T @ eigvecs)
    return _Extracted(
        approx,
        ritz,
        next_basis,
        scale=scale,
        energy=_energy(captured, total),
        certificate=certificate,
    )


def _sorted_eigenvectors_sync_free(gram: Tensor) -> Tensor:
    """Approximate eigenvectors of a small PSD matrix, largest first, without a host read.

    Simultaneous iteration on the matrix itself, in float64, re-orthonormalised
    by shifted Cholesky QR (a higher power per orthonormalisation would square
    the contrast that the Cholesky shift must stay below), from the coordinate
    vectors ordered by the diagonal: Cholesky QR orthogonalises in column
    order, so directions the basis lost (zero columns) must not come first.
    The result is sorted by the energy each column captures, not by Rayleigh
    quotient: a column the shifted Cholesky QR shrank (no direction left for
    it) must sort last, whatever direction its remnant points in.
    """
    power = gram.double() / gram.diagonal().sum().double().clamp_min(1e-300)
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    eigvecs = eye[:, torch.argsort(gram.diagonal(), descending=True)]
    for _ in range(SMALL_EIGEN_ITERS):
        eigvecs = _cholesky_orthonormal(power @ eigvecs)
    eigvecs = eigvecs.to(gram.dtype)
    energies = (eigvecs * (gram @ eigvecs)).sum(0)
    sorted_vectors: Tensor = eigvecs[:, torch.argsort(energies, descending=True)]
    return sorted_vectors


def _escalate(
    work: Tensor,
    scale: Tensor | float,
    total: Tensor | float,
    extracted: _Extracted,
    rank: int,
    width: int,
    generator: torch.Generator | None,
    certify: float | None,
) -> _Extracted:
    """Widens, then solves exactly, until the certificate reaches ``certify``.

    Level 1 keeps the current basis and adds ``width`` fresh Gaussian columns,
    then iterates :data:`WIDEN_POWER_ITERS` times with QR; the next warm start is its top ``width``
    Ritz vectors, so the basis follows the new subspace. Level 2 is exact
    (certificate 1).
    """
    if certify is None or extracted.certificate >= certify:
        return extracted
    wide = 2 * width
    if wide < min(work.shape):
        fresh = _gaussian((work.shape[1], width), work, generator)
        start = _orthonormal(torch.cat([extracted.basis, fresh], dim=1))
        widened = _iterate_and_extract(work, scale, total, start, rank, WIDEN_POWER_ITERS)
        widened.basis = widened.basis[:, :width]
        widened.escalation = 1
        if widened.certificate >= certify:
            return widened
    approx, squared, right = _gram_low_rank(work * scale, rank, width)
    captured = float(squared.sum())
    assert not isinstance(total, Tensor)
    return _Extracted(
        approx,
        squared,
        right,
        scale=scale,
        energy=_energy(captured, total),
        certificate=1.0,
        escalation=2,
    )


def _without_sketch(
    matrix: Tensor, rank: int, width: int, *, sync_free: bool = False
) -> LowRankResult | None:
    """The fast methods' answer when a sketch of ``width`` columns would be pointless.

    Nothing to drop when ``rank >= min(m, n)``; the small Gram matrix when the
    sketch would span the whole space (eigendecomposed by ``eigh``, or by
    :func:`_sorted_eigenvectors_sync_free` on the sync-free path). ``None``
    when a sketch is worth it.
    """
    if rank >= min(matrix.shape):
        return _unchanged(matrix)
    if width < min(matrix.shape):
        return None
    work, scale, total = _scaled(matrix, None, on_host=False)
    work = work * scale
    if not sync_free:
        approx, squared, _ = _gram_low_rank(work, rank, None)
    else:
        wide = work.shape[0] > work.shape[1]
        gram = work.T @ work if wide else work @ work.T
        top = _sorted_eigenvectors_sync_free(gram)[:, :rank]
        approx = (work @ top) @ top.T if wide else top @ (top.T @ work)
        squared = (top * (gram @ top)).sum(0).clamp_min(0)
    return LowRankResult(
        (approx / scale).to(matrix.dtype),
        squared,
        None,
        scale=scale,
        energy=_energy(squared.sum(), total),
    )


def _gram_low_rank(work: Tensor, rank: int, width: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-k projection through the eigendecomposition of the smaller Gram matrix.

    Used by the fast methods when the sketch would span the whole space
    (``k + p >= min(m, n)``) and as their last escalation level: for a thin
    matrix such as a 10 x 128 classifier head, ``eigh`` of the 10 x 10 Gram
    matrix is several times cheaper than ``torch.linalg.svd``, and for a
    256 x 784 gradient ``eigh`` of the 256 x 256 Gram matrix takes 2.3 ms
    against 12 ms (2 CPU cores). ``work`` must be scaled (‖work‖ ≈ 1) so that
    the Gram matrix cannot overflow. Returns the approximation, the top-k
    squared singular values and the top ``width`` right singular vectors (for a warm
    start; the top ``rank`` when ``width`` is ``None``). The values are squared.
    """
    keep = rank if width is None else width
    if work.shape[0] <= work.shape[1]:
        eigvals, eigvecs = torch.linalg.eigh(work @ work.T)
        eigvecs = eigvecs.flip(1)
        top = eigvecs[:, :rank]
        approx = top @ (top.T @ work)
        right = torch.nn.functional.normalize(work.T @ eigvecs[:, :keep], dim=0)
    else:
        eigvals, eigvecs = torch.linalg.eigh(work.T @ work)
        eigvecs = eigvecs.flip(1)
        top = eigvecs[:, :rank]
        approx = (work @ top) @ top.T
        right = eigvecs[:, :keep]
    return approx, eigvals.flip(0)[:rank].clamp_min(0), right
