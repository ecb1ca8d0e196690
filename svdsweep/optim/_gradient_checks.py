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

from svdsweep.optim._numerics import peak_scaled_norm

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

    One fused float64 norm kernel and one host read; float64, so that large
    finite gradients (fp16 entries of 1000, float32 of 1e20) are not mistaken
    for infinite ones, and so that the norm is accurate to a few float64
    roundoffs, which the certificate's slack relies on (a float32 reduction
    was measured 1e4 float32 roundoffs low on a 4096 x 4096 gradient). A norm
    outside :data:`SAFE_NORMS`, where the squares may have left float64's
    range (entries of 1e200, or of 1e-200, whose squares are 0), is recomputed
    from the entries scaled by their largest magnitude when they are all finite.
    """
    if not grads:
        return [], []
    values = torch.stack(norms(grads)).tolist()
    bad = []
    for position, (grad, norm) in enumerate(zip(grads, values, strict=True)):
        if SAFE_NORMS[0] <= norm < SAFE_NORMS[1]:
            continue
        entries = grad.coalesce().values() if grad.is_sparse else grad
        if bool(torch.isfinite(entries).all()):
            values[position] = float(peak_scaled_norm(entries))
        else:
            bad.append(position)
    return values, bad


#: Norms that a float64 reduction gets right to float64 precision: beyond the upper
#: end the sum of squares nears float64's range (1.8e308); below the lower end the
#: squares of single entries may underflow (2.2e-308), and 0 may be an underflow.
SAFE_NORMS = (1e-150, 1e150)


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
