"""What is checked on the gradients before any of them is modified: norms, finiteness, layout.

``SVDGradient`` projects gradients in place, so every refusal has to come
first: a step that fails half way would leave some gradients projected and
others not. These functions read the gradients and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

#: The torch optimizers that step on sparse gradients (SGD, Adagrad and
#: SparseAdam by their documentation; LBFGS densifies them). Every other torch
#: optimizer raises on one, and only after it has created state for the
#: parameters that come before it.
SPARSE_CAPABLE: tuple[type[Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adagrad,
    torch.optim.SparseAdam,
    torch.optim.LBFGS,
)


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

    One fused norm kernel and one host read. Dense float32 and half-precision
    gradients are reduced in float32, which costs a third of a float64
    reduction (27 against 86 µs for a 256x784 gradient) and is exact enough for
    the scaling and the certificate, whose slack is 64 float32 roundoffs. Where
    a reduction could mislead, a norm outside :data:`SAFE_NORMS` (infinite for
    large finite gradients such as float32 entries of 1e20; too small, or 0,
    where squares underflow, as for float32 entries of 1e-30 or float64 ones
    of 1e-200), the norm is recomputed from the entries scaled by their
    largest magnitude, when they are all finite.
    """
    if not grads:
        return [], []
    single = [
        not grad.is_sparse and grad.dtype in (torch.float32, torch.float16, torch.bfloat16)
        for grad in grads
    ]
    values = [0.0] * len(grads)
    for positions, dtype in (
        ([p for p, s in enumerate(single) if s], torch.float32),
        ([p for p, s in enumerate(single) if not s], torch.float64),
    ):
        if positions:
            reduced = _reduced_norms([grads[p] for p in positions], dtype)
            for position, norm in zip(positions, reduced, strict=True):
                values[position] = norm
    bad = []
    for position, (grad, norm) in enumerate(zip(grads, values, strict=True)):
        low, high = SAFE_NORMS[torch.float32 if single[position] else torch.float64]
        if low <= norm < high:
            continue
        entries = grad.coalesce().values() if grad.is_sparse else grad
        if bool(torch.isfinite(entries).all()):
            values[position] = float(_overflow_safe_norm(entries))  # right at any magnitude
        else:
            bad.append(position)
    return values, bad


#: Norms that a reduction in each dtype gets right to that dtype's precision. Beyond
#: the upper end the sum of squares nears the dtype's range (3.4e38, 1.8e308); below
#: the lower end the squares of single entries may underflow (1.2e-38, 2.2e-308),
#: and 0 may be an underflow. Other norms are recomputed from the entries scaled by
#: their largest magnitude, which neither overflows nor underflows.
SAFE_NORMS = {torch.float32: (1e-15, 1e15), torch.float64: (1e-150, 1e150)}


def _reduced_norms(grads: list[Tensor], dtype: torch.dtype) -> list[float]:
    """Frobenius norms reduced in ``dtype``, dense ones in one fused kernel, as floats."""
    if dtype == torch.float64:
        return torch.stack(norms(grads)).tolist()  # type: ignore[no-any-return]
    return torch.stack(torch._foreach_norm(grads, 2, dtype)).tolist()  # type: ignore[no-any-return]


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


def refuse_layouts(base: Optimizer, grads: list[Tensor], name_of: Callable[[int], str]) -> None:
    """Raises, naming the parameters, if ``base`` would refuse a gradient for its layout.

    ``base`` would raise only once its step runs, after the other gradients
    were projected in place and, for Adam, after it created state for the
    parameters before the refused one. Raising here leaves everything as it was.
    """
    positions = refused_layouts(base, grads)
    if not positions:
        return
    names = ", ".join(name_of(position) for position in positions)
    kind = "dense" if isinstance(base, torch.optim.SparseAdam) else "sparse"
    raise RuntimeError(
        f"{type(base).__name__} does not support {kind} gradients ({names}); the step "
        "was refused before any gradient, parameter or optimizer state changed. Give "
        "sparse parameters (e.g. an Embedding(sparse=True)) their own optimizer: SGD, "
        "Adagrad or SparseAdam, wrapped or not"
    )


def refused_layouts(base: Optimizer, grads: list[Tensor]) -> list[int]:
    """Positions of the gradients ``base`` would refuse for their layout.

    A torch optimizer outside :data:`SPARSE_CAPABLE` refuses sparse gradients;
    ``SparseAdam`` refuses dense ones. An optimizer from elsewhere decides for
    itself (its own class is not torch's): nothing is refused here.
    """
    torch_class = _torch_class(base)
    if torch_class is None:
        return []
    if issubclass(torch_class, torch.optim.SparseAdam):
        return [position for position, grad in enumerate(grads) if not grad.is_sparse]
    if issubclass(torch_class, SPARSE_CAPABLE):
        return []
    return [position for position, grad in enumerate(grads) if grad.is_sparse]


def _torch_class(base: Optimizer) -> type | None:
    """The first torch optimizer class ``base`` is an instance of, ``None`` for other ones."""
    for cls in type(base).__mro__:
        if cls is Optimizer:
            return None
        if cls.__module__.startswith("torch.optim"):
            return cls
    return None


def _overflow_safe_norm(values: Tensor) -> Tensor:
    """‖x‖ for finite x at any magnitude: max|x| · ‖x / max|x|‖, whose squares stay in range."""
    peak = values.abs().amax().double()
    norm: Tensor = peak * torch.linalg.vector_norm(values.double() / peak.clamp_min(1e-300))
    return norm
