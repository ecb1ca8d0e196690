"""The certified host path: Rayleigh–Ritz extraction, its certificate, escalation.

Used by both fast methods of :mod:`svdsweep.optim.lowrank` when the host may
read a few numbers per call (the CPU, or ``sync_free=False``).

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
(:data:`~svdsweep.optim.lowrank.CERTIFIED_FRACTION`, 0.99) the call *escalates*: first the basis is
widened with ``w`` fresh Gaussian columns and iterated once with full
re-orthonormalisation (this finds directions a stale warm start misses, e.g.
when a gradient's support moves), then, if the wider bound still falls short,
the exact top-k subspace is taken from the eigendecomposition of the smaller
Gram matrix. Every result carries its certificate and the level it needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdsweep.optim._numerics import (
    Extracted,
    certificate_bound,
    energy_fraction,
    gaussian,
    symmetric_eigh,
)

#: Power iterations of the widened basis at escalation level 1.
WIDEN_POWER_ITERS = 1


def householder_orthonormal(columns: Tensor) -> Tensor:
    """Q of a Householder QR: orthonormal to rounding, whatever the conditioning."""
    q: Tensor = torch.linalg.qr(columns).Q
    return q


def iterate_and_extract(
    work: Tensor,
    scale: Tensor | float,
    total: Tensor | float,
    right_basis: Tensor,
    rank: int,
    power_iters: int,
    *,
    warm: bool = False,
) -> Extracted:
    """Subspace iteration from ``right_basis`` (n x w), then Rayleigh–Ritz.

    Returns the scaled rank-k approximation, its k squared Ritz values, the w
    right Ritz vectors (sorted by Ritz value, largest first; unit columns, but
    for Ritz values at rounding level) as the next warm-start basis, the
    captured energy and the certificate (as floats: ``scale`` and ``total`` are
    host numbers on this path).

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
            left = householder_orthonormal(work @ right_basis)
            right_basis = householder_orthonormal(work.T @ left)
    left = householder_orthonormal(work @ right_basis)  # m x w, spans the dominant column space
    projected = (left.T @ work) * scale  # w x n: the (scaled) matrix seen through the basis
    eigvals, eigvecs = symmetric_eigh(projected @ projected.T)  # ascending
    width = eigvecs.shape[1]
    # One host read of w numbers; the certificate and the energy are then float arithmetic.
    values = [max(value, 0.0) for value in eigvals.tolist()]
    captured = sum(values[width - rank :])
    assert not isinstance(total, Tensor)
    top = eigvecs[:, width - rank :]
    unscale = _inverse_power_of_two(scale)
    left_factor = left @ top
    if unscale is None:
        right_factor, divisor = top.T @ projected, scale
    else:  # 1/scale folded into the w x k factor: no pass over the m x n product
        right_factor, divisor = (top * unscale).T @ projected, 1.0
    return Extracted(
        (left_factor, right_factor),
        eigvals[width - rank :],
        next_right_basis(projected, values, eigvecs),
        scale=scale,
        energy=energy_fraction(captured, total),
        certificate=certificate_bound(captured, sum(values), total),
        unscale_by=divisor,
    )


def next_right_basis(projected: Tensor, values: list[float], eigvecs: Tensor) -> Tensor:
    """The right Ritz vectors ``Bᵀ zᵢ / √θᵢ`` (n x w), largest first: the next warm start.

    ``values`` are the Ritz values θᵢ (ascending, as ``eigh`` returns them, already
    read on the host). Their norms are known (``‖Bᵀ zᵢ‖² = θᵢ``), so the columns
    are scaled through the small w x w matrix instead of a normalisation pass
    over the n x w result, and the product is formed as ``(Zᵀ B)ᵀ``, a
    transposed view: on the CPU, ``Bᵀ Z`` with ``B`` transposed in memory is
    ~3x slower. Ritz values at rounding level (θᵢ < 1e-12 θ₁) are floored, so
    that their columns (rounding noise) are not divided by a near-zero root;
    they may then be shorter than one, and the next step's QR orthonormalises
    whatever they hold.
    """
    floor = max(values[-1], 0.0) * 1e-12 + torch.finfo(eigvecs.dtype).tiny
    weights = [max(value, floor) ** -0.5 for value in reversed(values)]
    scaled_vectors = eigvecs.flip(1) * torch.tensor(
        weights, dtype=eigvecs.dtype, device=eigvecs.device
    )
    return (scaled_vectors.T @ projected).T


def _inverse_power_of_two(scale: Tensor | float) -> float | None:
    """``1 / scale`` when it is a host power of two that float32 holds exactly (else ``None``)."""
    if isinstance(scale, Tensor):
        return None
    unscale = 1.0 / scale
    return unscale if 2.0**-120 <= unscale <= 2.0**120 else None


def escalate(
    work: Tensor,
    scale: Tensor | float,
    total: Tensor | float,
    extracted: Extracted,
    rank: int,
    width: int,
    generator: torch.Generator | None,
    certify: float | None,
) -> Extracted:
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
        fresh = gaussian((work.shape[1], width), work, generator)
        start = householder_orthonormal(torch.cat([extracted.basis, fresh], dim=1))
        widened = iterate_and_extract(work, scale, total, start, rank, WIDEN_POWER_ITERS)
        widened.basis = widened.basis[:, :width]
        widened.escalation = 1
        if widened.certificate >= certify:
            return widened
    factors, squared, right = gram_low_rank(work * scale, rank, width)
    assert right is not None
    captured = float(squared.sum())
    assert not isinstance(total, Tensor)
    return Extracted(
        factors,
        squared,
        right,
        scale=scale,
        energy=energy_fraction(captured, total),
        certificate=1.0,
        escalation=2,
    )


def gram_low_rank(
    work: Tensor, rank: int, width: int | None
) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor | None]:
    """Exact top-k projection through the eigendecomposition of the smaller Gram matrix.

    Used by the fast methods when the sketch would span the whole space
    (``k + p >= min(m, n)``) and as their last escalation level: for a thin
    matrix such as a 10 x 128 classifier head, ``eigh`` of the 10 x 10 Gram
    matrix is several times cheaper than ``torch.linalg.svd``, and for a
    256 x 784 gradient ``eigh`` of the 256 x 256 Gram matrix takes 2.3 ms
    against 12 ms (2 CPU cores). ``work`` must be scaled (‖work‖ ≈ 1) so that
    the Gram matrix cannot overflow. Returns the approximation's two factors, the top-k
    squared singular values and the top ``width`` right singular vectors (for a warm
    start; none when ``width`` is ``None``). The values are squared.
    """
    right: Tensor | None = None
    if work.shape[0] <= work.shape[1]:
        eigvals, eigvecs = symmetric_eigh(work @ work.T)
        eigvecs = eigvecs.flip(1)
        top = eigvecs[:, :rank]
        factors = (top, top.T @ work)
        if width is not None:
            right = torch.nn.functional.normalize(work.T @ eigvecs[:, :width], dim=0)
    else:
        eigvals, eigvecs = symmetric_eigh(work.T @ work)
        eigvecs = eigvecs.flip(1)
        top = eigvecs[:, :rank]
        factors = (work @ top, top.T)
        if width is not None:
            right = eigvecs[:, :width]
    return factors, eigvals.flip(0)[:rank].clamp_min(0), right
