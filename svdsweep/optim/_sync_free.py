"""The accelerator path: a subspace iteration that never waits on the host.

**Without host synchronisation.** ``subspace_low_rank(..., sync_free=True)``
is the variant for accelerators: orthonormalisation by shifted Cholesky QR
(Fukaya et al., 2020) with ``cholesky_ex`` and a triangular solve, the small
eigenproblem replaced by a few steps of subspace iteration on the ``w x w``
Gram matrix, fresh Gaussian columns mixed into the warm basis on every call
(branch-free, so a moved support is found without a data-dependent decision),
and the certificate returned as a device tensor for the caller to read when it
chooses. It calls no LAPACK/cuSOLVER routine that checks its status on the
host.

The certificate is computed as in :mod:`svdsweep.optim._certified`, but left
on the device; :class:`~svdsweep.optim.svd_gradient.SVDGradient` reads it every
``sync_every`` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdsweep.optim._numerics import Extracted, certificate_bound, energy_fraction, gaussian

#: Steps of subspace iteration on the small Gram matrix in the sync-free
#: variant: its top-k energy converges like (λ_{k+1}/λ_k)^(2·steps), below 1e-4 of
#: the energy on every case of the spectra suite.
SMALL_EIGEN_ITERS = 16


def cholesky_orthonormal(columns: Tensor) -> Tensor:
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


def mix_fresh_columns(basis: Tensor, oversample: int, generator: torch.Generator | None) -> Tensor:
    """The warm basis with its last ``max(1, p // 2)`` columns replaced by Gaussian ones.

    The columns are sorted by Ritz value, so the replaced ones are the
    oversampling directions that mattered least; the fresh ones let the next
    power iteration find directions the warm basis has never seen.
    """
    fresh = min(max(1, oversample // 2), basis.shape[1])
    noise = gaussian((basis.shape[0], fresh), basis, generator) / basis.shape[0] ** 0.5
    return torch.cat([basis[:, : basis.shape[1] - fresh], noise], dim=1)


def sync_free_iterate_and_extract(
    work: Tensor, scale: Tensor, total: Tensor, right_basis: Tensor, rank: int, power_iters: int
) -> Extracted:
    """:func:`iterate_and_extract` with matmuls, ``cholesky_ex`` and triangular solves only.

    The small eigenproblem is solved approximately: simultaneous iteration on
    the w x w Gram matrix, re-orthonormalised by Cholesky QR, then
    sorted by the energy each column captures (``argsort`` runs on the device), so that the
    next basis has the column order (largest first) that the warm start and
    :func:`mix_fresh_columns` rely on. The captured energy reported is that of
    the returned projection exactly (``trace(Zᵀ BBᵀ Z)``), and the certificate
    is the bound of the module docstring with that energy; it equals the
    exact-eigensolver bound once the small iteration has converged.
    """
    for _ in range(power_iters):
        right_basis = cholesky_orthonormal(work.T @ (cholesky_orthonormal(work @ right_basis)))
    left = cholesky_orthonormal(work @ right_basis)
    projected = (left.T @ work) * scale
    gram = projected @ projected.T
    eigvecs = sorted_eigenvectors_sync_free(gram)
    top = eigvecs[:, :rank]
    ritz = (top.T @ gram @ top).diagonal().clamp_min(0)
    captured = ritz.sum()
    certificate = certificate_bound(captured, gram.diagonal().sum(), total)
    next_basis = cholesky_orthonormal(projected.T @ eigvecs)
    return Extracted(
        (left @ top, top.T @ projected),
        ritz,
        next_basis,
        scale=scale,
        energy=energy_fraction(captured, total),
        certificate=certificate,
    )


def sorted_eigenvectors_sync_free(gram: Tensor) -> Tensor:
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
        eigvecs = cholesky_orthonormal(power @ eigvecs)
    eigvecs = eigvecs.to(gram.dtype)
    energies = (eigvecs * (gram @ eigvecs)).sum(0)
    sorted_vectors: Tensor = eigvecs[:, torch.argsort(energies, descending=True)]
    return sorted_vectors
