"""Best rank-k approximations of a matrix: the pure math behind :class:`SVDGradient`.

Every function here takes tensors and returns tensors. None of them knows about
parameters, optimizer state or param groups; that bookkeeping lives in
:mod:`svdsweep.optim.svd_gradient`. Keeping the math apart lets the tests hold
each method against ``torch.linalg.svd`` (and a float64 NumPy reference) on its
own.

Three methods compute (an approximation of) the Eckart–Young optimum
``G_k = U[:, :k] diag(S[:k]) Vh[:k]``:

``exact``
    ``torch.linalg.svd`` of the whole matrix. The reference: it *is* ``G_k``.
``randomized``
    Halko, Martinsson & Tropp (2011), Algorithm 4.4: a Gaussian sketch with
    ``oversample`` extra columns, ``power_iters`` re-orthonormalised power
    iterations, then Rayleigh–Ritz (an exact SVD of the small projected matrix).
    Stateless: a fresh sketch every call.
``subspace``
    Subspace iteration warm-started from the previous call's right singular
    vectors, in the manner of PowerSGD (Vogels et al., 2019). Consecutive
    gradients of one layer share most of their dominant subspace, so a single
    iteration from last step's basis captures almost all the energy that a cold
    randomized SVD needs several iterations for. Plain warm-started iteration
    has bad worst steps when the spectrum shifts; this version guards against
    that with ``oversample`` extra basis vectors, Rayleigh–Ritz extraction, and
    ``power_iters`` extra iterations per call.

Accuracy knobs, for both fast methods:

``oversample`` (p)
    The basis has ``k + p`` columns and only the top ``k`` Ritz vectors are
    kept. Larger p captures more energy when singular values ``k`` and
    ``k + 1`` are close. Cost grows linearly in ``k + p``.
``power_iters`` (q)
    Each iteration multiplies the basis by ``G Gᵀ`` once more, sharpening the
    separation between kept and dropped singular directions by a factor of
    ``(σ_{k+p+1}/σ_k)²``. Cost: two matmuls and two QRs per iteration. With
    ``q = 0`` the basis is used once: ``P = orth(G Q)``, then Rayleigh–Ritz on
    ``Pᵀ G``.

When ``k >= min(m, n)`` every method returns the matrix unchanged. When
``k + p >= min(m, n)`` the sketch would span the whole space, so both fast
methods project onto the top-k eigenvectors of the small Gram matrix instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Power iterations of a subspace iteration that starts from a random basis.
COLD_START_POWER_ITERS = 2

__all__ = [
    "LowRankResult",
    "captured_energy",
    "exact_low_rank",
    "randomized_low_rank",
    "subspace_low_rank",
]


class LowRankResult:
    """A rank-k approximation with what the caller may want to keep.

    ``approx`` is the rank-k matrix, ``singular_values`` the top-k (approximate)
    singular values, ``basis`` the orthonormal ``n x (k+p)`` right basis to warm
    start the next call from (``None`` for stateless methods).
    """

    __slots__ = ("approx", "basis", "singular_values")

    def __init__(self, approx: Tensor, singular_values: Tensor, basis: Tensor | None) -> None:
        self.approx = approx
        self.singular_values = singular_values
        self.basis = basis


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
    :func:`captured_energy`).
    """
    _check_matrix(matrix, rank)
    if rank >= min(matrix.shape):
        return LowRankResult(matrix, _all_singular_values(matrix), None)
    work = _as_float(matrix)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return LowRankResult(approx.to(matrix.dtype), s[:rank], None)


def randomized_low_rank(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> LowRankResult:
    """Randomized SVD (Halko et al. 2011, Alg. 4.4) with Rayleigh–Ritz extraction."""
    _check_matrix(matrix, rank, oversample, power_iters)
    width = rank + oversample
    shortcut = _without_sketch(matrix, rank, width)
    if shortcut is not None:
        return shortcut
    work = _as_float(matrix)
    basis = _orthonormal(_gaussian((work.shape[1], width), work, generator))
    approx, s, _ = _iterate_and_extract(work, basis, rank, power_iters)
    return LowRankResult(approx.to(matrix.dtype), s, None)


def subspace_low_rank(
    matrix: Tensor,
    rank: int,
    basis: Tensor | None,
    *,
    oversample: int = 8,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
) -> LowRankResult:
    """Warm-started subspace iteration with Rayleigh–Ritz extraction.

    ``basis`` is the ``n x (k+p)`` right basis returned by the previous call on
    the same layer, or ``None`` to start from a Gaussian sketch with at least
    :data:`COLD_START_POWER_ITERS` power iterations. A basis of the wrong shape
    (e.g. after the rank changed) counts as none.
    """
    _check_matrix(matrix, rank, oversample, power_iters)
    width = rank + oversample
    shortcut = _without_sketch(matrix, rank, width)
    if shortcut is not None:
        return shortcut
    work = _as_float(matrix)
    expected = (work.shape[1], width)
    if basis is None or tuple(basis.shape) != expected:
        # A cold start is a randomized SVD: it needs the iterations a warm basis saves.
        cold_iters = max(power_iters, COLD_START_POWER_ITERS)
        basis = _orthonormal(_gaussian(expected, work, generator))
        approx, s, next_basis = _iterate_and_extract(work, basis, rank, cold_iters)
    else:
        basis = basis.to(device=work.device, dtype=work.dtype)
        approx, s, next_basis = _iterate_and_extract(work, basis, rank, power_iters, warm=True)
    return LowRankResult(approx.to(matrix.dtype), s, next_basis)


def captured_energy(singular_values: Tensor, frobenius_norm: Tensor) -> Tensor:
    """Fraction of a matrix's energy kept by a rank-k approximation, ‖G_k‖²/‖G‖².

    ``singular_values`` are those of the approximation (exact or Ritz values),
    so for orthogonal-projection methods this is exactly ‖Ĝ_k‖²/‖G‖².
    ``frobenius_norm`` is ‖G‖, passed in because the caller usually has it
    already. A zero matrix keeps all of its (zero) energy, so the fraction is 1.
    The fraction is clamped to 1: when G has rank <= k, the float32 singular
    values and norm would otherwise round to a kept energy slightly above all.
    """
    total = frobenius_norm.float().square()
    kept = singular_values.float().square().sum()
    fraction = (kept / total.clamp_min(torch.finfo(total.dtype).tiny)).clamp_max(1.0)
    return torch.where(total > 0, fraction, 1.0)


def _all_singular_values(matrix: Tensor) -> Tensor:
    """A stand-in for the full spectrum when nothing is truncated: its norm.

    Only the sum of squares matters to :func:`captured_energy`, and the
    Frobenius norm gives it without an SVD.
    """
    norm: Tensor = torch.linalg.matrix_norm(_as_float(matrix))
    return norm.reshape(1)


def _gaussian(shape: tuple[int, int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A Gaussian sketch on ``like``'s device, drawn on the generator's own device.

    Drawing on the generator's device lets a CPU generator (whose state is
    easy to save) seed sketches for CUDA tensors too.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(*shape, device=device, dtype=like.dtype, generator=generator).to(like.device)


def _as_float(matrix: Tensor) -> Tensor:
    """float32 for half-precision inputs, so LAPACK/cuSOLVER see a supported dtype."""
    if matrix.dtype in (torch.float32, torch.float64):
        return matrix
    return matrix.float()


def _orthonormal(columns: Tensor) -> Tensor:
    q: Tensor = torch.linalg.qr(columns).Q
    return q


def _iterate_and_extract(
    work: Tensor, right_basis: Tensor, rank: int, power_iters: int, *, warm: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Subspace iteration from ``right_basis`` (n x w), then Rayleigh–Ritz.

    Returns the rank-k approximation, its k Ritz values, and the w right Ritz
    vectors (sorted by Ritz value, unit columns) as the next warm-start basis.

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
            right_basis = torch.nn.functional.normalize(work.T @ (work @ right_basis), dim=0)
        else:
            left = _orthonormal(work @ right_basis)
            right_basis = _orthonormal(work.T @ left)
    left = _orthonormal(work @ right_basis)  # m x w, spans the dominant column space
    projected = left.T @ work  # w x n: the matrix seen through the basis
    eigvals, eigvecs = torch.linalg.eigh(projected @ projected.T)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    top = eigvecs[:, :rank]
    approx = (left @ top) @ (top.T @ projected)
    ritz_values = eigvals[:rank].clamp_min(0).sqrt()
    next_basis = torch.nn.functional.normalize(projected.T @ eigvecs, dim=0)
    return approx, ritz_values, next_basis


def _without_sketch(matrix: Tensor, rank: int, width: int) -> LowRankResult | None:
    """The fast methods' answer when a sketch of ``width`` columns would be pointless.

    Nothing to drop when ``rank >= min(m, n)``; the small Gram matrix when the
    sketch would span the whole space. ``None`` when a sketch is worth it.
    """
    if rank >= min(matrix.shape):
        return LowRankResult(matrix, _all_singular_values(matrix), None)
    if width >= min(matrix.shape):
        approx, s = _gram_low_rank(_as_float(matrix), rank)
        return LowRankResult(approx.to(matrix.dtype), s, None)
    return None


def _gram_low_rank(work: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top-k projection through the eigendecomposition of the smaller Gram matrix.

    Used by the fast methods when the sketch would span the whole space
    (``k + p >= min(m, n)``): for a thin matrix such as a 10 x 128 classifier
    head, ``eigh`` of the 10 x 10 Gram matrix is several times cheaper than
    ``torch.linalg.svd`` and gives the same top-k subspace up to float32
    rounding.
    """
    if work.shape[0] <= work.shape[1]:
        eigvals, eigvecs = torch.linalg.eigh(work @ work.T)
        top = eigvecs.flip(1)[:, :rank]
        approx = top @ (top.T @ work)
    else:
        eigvals, eigvecs = torch.linalg.eigh(work.T @ work)
        top = eigvecs.flip(1)[:, :rank]
        approx = (work @ top) @ top.T
    return approx, eigvals.flip(0)[:rank].clamp_min(0).sqrt()
