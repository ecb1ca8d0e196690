"""The numerics every low-rank method shares: scaling, sketches, energy and its bound.

Pure functions of tensors (and Python floats, on the certified path, where the
norm is read on the host anyway), plus the two records a method returns:
:class:`LowRankResult` (public, re-exported by :mod:`svdsweep.optim.lowrank`)
and :class:`Extracted`, one extraction before it is unscaled. They live apart
from :mod:`svdsweep.optim.lowrank` so that the certified host path
(:mod:`svdsweep.optim._certified`) and the accelerator path
(:mod:`svdsweep.optim._sync_free`) can share them without importing each other.

The scale is :func:`scaled`'s power of two (see :mod:`svdsweep.optim.lowrank`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class LowRankResult:
    """A rank-k approximation with what the caller may want to keep.

    ``approx`` is the rank-k matrix (in the input's dtype); ``singular_values``
    the top-k (approximate) singular values in float64; ``basis`` the ``n x
    (k+p)`` right basis to warm start the next call from (``None`` for
    stateless methods); ``energy`` the captured fraction ‖Ĝ_k‖²/‖G‖²;
    ``certificate`` a lower bound on captured / optimal top-k energy (1 where
    the result is exact); ``escalation`` the index into
    :data:`~svdsweep.optim.lowrank.ESCALATION_LEVELS` of the work it took. ``energy`` and
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


class Extracted:
    """One Rayleigh–Ritz extraction in scaled coordinates, before unscaling.

    The approximation is kept as its two thin factors (``m x k`` and ``k x n``),
    so that :meth:`result` can form the product where the caller wants it.
    """

    __slots__ = (
        "basis",
        "certificate",
        "energy",
        "escalation",
        "factors",
        "scale",
        "squared",
        "unscale_by",
    )

    def __init__(
        self,
        factors: tuple[Tensor, Tensor],
        squared: Tensor,
        basis: Tensor,
        *,
        scale: Tensor | float,
        energy: Tensor | float,
        certificate: Tensor | float,
        escalation: int = 0,
        unscale_by: Tensor | float | None = None,
    ) -> None:
        self.factors, self.squared, self.basis = factors, squared, basis
        self.scale, self.energy, self.certificate = scale, energy, certificate
        self.escalation = escalation
        # What the product of the factors is still to be divided by: ``scale``,
        # unless the extraction folded it into a thin factor already (then 1).
        self.unscale_by = scale if unscale_by is None else unscale_by

    def result(
        self, dtype: torch.dtype, *, with_basis: bool, out: Tensor | None = None
    ) -> LowRankResult:
        """Unscaled, in ``dtype``; written into ``out`` when it can hold the product as is.

        ``out`` (contiguous, of the product's shape and dtype, e.g. the
        gradient itself) saves the ``m x n`` temporary, and the copy into the
        gradient, of every step: 2–3 % of the step's math (BENCHMARKS.md). The
        product and the division are the same operations either way, so the
        result is bit-identical.
        """
        left, right = self.factors
        if (
            out is not None
            and out.dtype == left.dtype == dtype
            and out.is_contiguous()
            and out.shape == (left.shape[0], right.shape[1])
        ):
            approx = torch.mm(left, right, out=out)
        else:
            approx = left @ right
        if isinstance(self.unscale_by, Tensor) or self.unscale_by != 1.0:
            approx.div_(self.unscale_by)
        return LowRankResult(
            approx.to(dtype),
            self.squared,
            self.basis if with_basis else None,
            scale=self.scale,
            energy=self.energy,
            certificate=self.certificate,
            escalation=self.escalation,
        )


def energy_fraction(captured: Tensor | float, total: Tensor | float) -> Tensor | float:
    """captured / total (both scaled), 1 for a zero matrix, at most 1 (rounding)."""
    if isinstance(captured, Tensor) or isinstance(total, Tensor):
        total_t = torch.as_tensor(total, dtype=torch.float64)
        fraction = (torch.as_tensor(captured).double() / total_t.clamp_min(1e-300)).clamp_max(1.0)
        return torch.where(total_t > 0, fraction, 1.0)
    return min(captured / total, 1.0) if total > 0 else 1.0


def certificate_bound(
    captured: Tensor | float, inside: Tensor | float, total: Tensor | float
) -> Any:
    """Lower bound on captured / optimal top-k energy (see :mod:`svdsweep.optim._certified`).

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


def scaled(
    matrix: Tensor, frobenius_norm: Tensor | float | None, *, on_host: bool
) -> tuple[Tensor, Tensor | float, Tensor | float]:
    """The working matrix, a power of two ``scale`` with ‖G‖·scale in [0.5, 1), and ‖G·scale‖².

    (Below [0.5, 1) only for norms so small, ~1e-38 in float32, that the scale
    would leave the working dtype's range.)

    Multiplying by a power of two is exact. The scale is applied to the thin
    products, never to ``G`` itself: that saves a pass over the matrix, and
    every product that could overflow or underflow (``GᵀGV``, ``BBᵀ``) is
    formed from an already scaled factor. ``on_host``: as Python floats (the
    certified path reads the norm anyway; float arithmetic costs no kernel
    launches), otherwise as device tensors, without a host read.
    """
    work = as_float(matrix)
    if frobenius_norm is None:
        # The squares of float64 entries of 1e-200 (or 1e200) leave float64's range.
        frobenius_norm = peak_scaled_norm(work)
    # The scale stays within the working dtype's range (2^125 for float32), so a
    # norm below ~1e-38 (subnormal entries) is brought up as far as it can be.
    largest = math.frexp(torch.finfo(work.dtype).max)[1] - 3
    if on_host:
        norm = float(frobenius_norm)
        exponent = math.frexp(norm)[1] if math.isfinite(norm) else 0
        scale = math.ldexp(1.0, min(-exponent, largest))
        return work, scale, (norm * scale) ** 2
    norm_t = torch.as_tensor(frobenius_norm, dtype=torch.float64, device=work.device)
    _, exponents = torch.frexp(norm_t)
    scale_t = torch.ldexp(torch.ones_like(norm_t), (-exponents).clamp_max(largest))
    return work, scale_t.to(work.dtype), (norm_t * scale_t).square().to(work.dtype)


def gaussian(shape: tuple[int, int], like: Tensor, generator: torch.Generator | None) -> Tensor:
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


def as_float(matrix: Tensor) -> Tensor:
    """float32 for half-precision inputs, so LAPACK/cuSOLVER see a supported dtype."""
    if matrix.dtype in (torch.float32, torch.float64):
        return matrix
    return matrix.float()


def symmetric_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a symmetric positive semi-definite Gram matrix, that always returns.

    LAPACK's divide-and-conquer ``syevd`` can fail to converge ("ill-conditioned
    or too many repeated eigenvalues") on the Gram matrix of a nearly
    rank-deficient gradient: a sweep hit it at k=106 with lr 9e-3, and three such
    steps in a row stopped the worker. The step then retries in float64 and, if
    that fails too, takes the SVD, which for a PSD matrix is the same
    decomposition (``U S Uᵀ``) from another LAPACK routine. Eigenvalues are
    ascending, as ``eigh``'s. Nothing changes on the common path.
    """
    try:
        return torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:
        pass
    wide = gram.double()
    try:
        values, vectors = torch.linalg.eigh(wide)
    except torch.linalg.LinAlgError:
        vectors, values, _ = torch.linalg.svd(wide)
        values, vectors = values.flip(0), vectors.flip(1)
    return values.to(gram.dtype), vectors.to(gram.dtype)


def peak_scaled_norm(values: Tensor) -> Tensor:
    """‖x‖ in float64 for finite x of any magnitude, empty x included: max|x| · ‖x / max|x|‖.

    Dividing by the largest magnitude keeps every square in range, where a
    plain reduction reads 0 for entries of 1e-200 and inf for 1e200. No host read.
    """
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=values.device)
    peak = values.abs().amax().double()
    safe_peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    norm: Tensor = peak * torch.linalg.vector_norm(values.double() / safe_peak)
    return norm
