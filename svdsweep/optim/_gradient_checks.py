"""What is checked on the gradients before any of them is modified: norms, finiteness, layout.

``SVDGradient`` projects gradients in place, so every refusal has to come
first: a step that fails half way would leave some gradients projected and
others not. These functions read the gradients and change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or infinity, so no low-rank approximation exists.

    Raised before any gradient is modified and before the base optimizer
    steps, so parameters and optimizer state are exactly as they were.
    """


def norms(grads: list[Tensor]) -> list[Tensor]:
    """Frobenius norms in float64, dense gradients in one fused kernel."""
    dense = [grad for grad in grads if not grad.is_sparse]
    fused = iter(torch._foreach_norm(dense, 2, torch.float64) if dense else [])
    return [
        torch.linalg.vector_norm(grad.coalesce().values(), dtype=torch.float64)
        if grad.is_sparse
        else next(fused)
        for grad in grads
    ]


def host_norms(grads: list[Tensor]) -> tuple[list[float], list[int]]:
    """‖G‖ of every gradient as a Python float, and the positions of the non-finite ones.

    One fused float64 norm kernel and one host read; float64, so that large
    finite gradients (fp16 entries of 1000, float32 of 1e20) are not mistaken
    for infinite ones. A norm that overflows even float64 is recomputed from
    the scaled entries when they are all finite.
    """
    if not grads:
        return [], []
    values = torch.stack(norms(grads)).tolist()
    bad = []
    for position, (grad, norm) in enumerate(zip(grads, values, strict=True)):
        if math.isfinite(norm):
            continue
        entries = grad.coalesce().values() if grad.is_sparse else grad
        if bool(torch.isfinite(entries).all()):
            values[position] = float(_overflow_safe_norm(entries))  # finite, beyond float64
        else:
            bad.append(position)
    return values, bad


def checked_norms(
    grads: list[Tensor], name_of: Callable[[int], str], skip: bool
) -> list[float] | None:
    """:func:`host_norms`, refusing a non-finite gradient: ``None`` to skip the step, or raises.

    ``name_of(position)`` names a gradient's parameter in the error; ``skip``
    is the ``nonfinite="skip"`` policy.
    """
    values, positions = host_norms(grads)
    if not positions:
        return values
    if skip:
        return None
    bad = [name_of(position) for position in positions]
    raise NonFiniteGradientError(
        f"non-finite gradient (NaN or inf) in {', '.join(bad)}; "
        "lower the learning rate, or pass nonfinite='skip' to skip such steps"
    )


def _overflow_safe_norm(values: Tensor) -> Tensor:
    """‖x‖ for finite x whose squares overflow even float64: max|x| · ‖x / max|x|‖."""
    peak = values.abs().amax().double()
    norm: Tensor = peak * torch.linalg.vector_norm(values.double() / peak.clamp_min(1e-300))
    return norm
