"""One gradient replaced in place by its low-rank approximation, with its per-parameter state.

The step of :class:`~svdsweep.optim.svd_gradient.SVDGradient` for a single
parameter: which gradients are matrices to project, which method of
:mod:`svdsweep.optim.lowrank` a group asks for, and what the parameter's state
keeps (``basis`` for the warm start, ``energy`` and ``certificate`` for the
diagnostics). The wrapper decides which parameters, when, and what to count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from svdsweep.optim import lowrank
from svdsweep.optim._gradient_checks import norms


def matrix_of(grad: Tensor, rank: int, reshape_conv: bool) -> Tensor | None:
    """The matrix to project, or ``None`` for gradients left alone."""
    if grad.is_sparse:
        return None  # passed through untouched: its rows are a lookup, not a spectrum
    if grad.ndim == 4 and reshape_conv:
        matrix = grad.reshape(grad.shape[0], -1)
    elif grad.ndim == 2:
        matrix = grad
    else:
        return None
    if rank >= min(matrix.shape):
        return None  # already of rank <= k: nothing to drop, no SVD
    return matrix


def low_rank(
    group: dict[str, Any],
    state: dict[str, Any],
    matrix: Tensor,
    norm: Tensor | float,
    generator: torch.Generator,
    sync_free: bool,
    out: Tensor | None = None,
) -> lowrank.LowRankResult:
    """The group's method on ``matrix``, warm-started from ``state`` where it keeps a basis.

    ``out``: where the fast methods may write the approximation (see
    :func:`~svdsweep.optim.lowrank.randomized_low_rank`).
    """
    method = group["method"]
    if method == "exact":
        return lowrank.exact_low_rank(matrix, group["rank"])
    if method == "randomized":
        return lowrank.randomized_low_rank(
            matrix,
            group["rank"],
            oversample=group["oversample"],
            power_iters=group["power_iters"],
            generator=generator,
            frobenius_norm=norm,
            certify=None if sync_free else lowrank.CERTIFIED_FRACTION,
            out=out,
        )
    return lowrank.subspace_low_rank(
        matrix,
        group["rank"],
        state.get("basis"),
        oversample=group["oversample"],
        power_iters=group["power_iters"],
        generator=generator,
        frobenius_norm=norm,
        sync_free=sync_free,
        out=out,
    )


def project(
    grad: Tensor,
    group: dict[str, Any],
    state: dict[str, Any],
    norm: float,
    generator: torch.Generator,
    reshape_conv: bool,
) -> int | None:
    """Projects ``grad`` in place (certified); the escalation level, ``None`` if left alone."""
    matrix = matrix_of(grad, group["rank"], reshape_conv)
    if matrix is None:
        state.pop("energy", None)
        return None
    # The gradient itself receives the product: no m x n temporary, no copy.
    result = low_rank(group, state, matrix, norm, generator, sync_free=False, out=matrix)
    if result.basis is not None:
        state["basis"] = result.basis
    state["energy"] = as_tensor(result.energy, grad.device)
    state["certificate"] = float(result.certificate)
    if result.approx is not matrix:
        grad.copy_(result.approx.reshape(grad.shape))
    return result.escalation


def project_sync_free(
    grad: Tensor,
    group: dict[str, Any],
    state: dict[str, Any],
    norm: Tensor,
    finite: Tensor,
    generator: torch.Generator,
    reshape_conv: bool,
) -> Tensor | None:
    """Projects ``grad`` in place without a host read; its certificate, ``None`` if left alone.

    Unless ``finite`` holds, the gradient is zeroed instead (the step will be
    undone) and the stored basis kept as it was.
    """
    device = grad.device
    safe_grad = torch.where(finite, grad, torch.zeros((), dtype=grad.dtype, device=device))
    safe_norm = torch.where(finite, norm, torch.zeros_like(norm))
    matrix = matrix_of(safe_grad, group["rank"], reshape_conv)
    if matrix is None:
        grad.copy_(safe_grad)
        state.pop("energy", None)
        return None
    result = low_rank(group, state, matrix, safe_norm, generator, sync_free=True)
    if result.basis is not None:
        old = state.get("basis")
        state["basis"] = result.basis if old is None else torch.where(finite, result.basis, old)
    state["energy"] = as_tensor(result.energy, device)
    state["certificate"] = result.certificate
    grad.copy_(result.approx.reshape(grad.shape))
    return torch.as_tensor(result.certificate, device=device)


def project_all_sync_free(
    entries: list[tuple[dict[str, Any], Tensor]],
    states: dict[Tensor, dict[str, Any]],
    generator: torch.Generator,
    reshape_conv: bool,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Projects every (group, parameter)'s gradient without a host read.

    Returns the device flag "every gradient is finite" and each projected
    parameter's certificate by ``id``. Sparse gradients pass through untouched.
    """
    grad_norms = norms([param.grad for _, param in entries])  # type: ignore[misc]
    device = entries[0][1].device
    finite = torch.isfinite(torch.stack([norm.to(device) for norm in grad_norms])).all()
    certificates: dict[int, Tensor] = {}
    for (group, param), norm in zip(entries, grad_norms, strict=True):
        grad = param.grad
        assert grad is not None
        if grad.is_sparse:
            continue
        state = states[param]
        certificate = project_sync_free(grad, group, state, norm, finite, generator, reshape_conv)
        if certificate is not None:
            certificates[id(param)] = certificate
    return finite, certificates


def save_projection_state(
    states: dict[Tensor, dict[str, Any]], params: Iterable[tuple[Any, int, Tensor]]
) -> dict[int, dict[str, Any]]:
    """Each parameter's non-empty state, keyed by its position across all groups (as torch)."""
    return {index: dict(states[param].items()) for _, index, param in params if states.get(param)}


def load_projection_state(
    saved: dict[int, dict[str, Any]], params: Iterable[tuple[Any, int, Tensor]]
) -> defaultdict[Tensor, dict[str, Any]]:
    """:func:`save_projection_state` undone, each tensor moved to its parameter's device."""
    states: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
    for _, index, param in params:
        if index in saved:
            states[param] = {
                key: value.to(param.device) if isinstance(value, Tensor) else value
                for key, value in saved[index].items()
            }
    return states


def as_tensor(value: Tensor | float, device: torch.device) -> Tensor:
    """A 0-d float64 tensor on ``device`` (energies are summed on the device by the trainer)."""
    if isinstance(value, Tensor):
        return value.double()
    return torch.tensor(value, dtype=torch.float64, device=device)
