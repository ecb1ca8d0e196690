"""`SVDGradient`: replace each weight gradient by its best rank-k approximation, then step.

The wrapper only does bookkeeping: which gradients to touch, where the warm
start bases live, how the state is saved. The math is in
:mod:`svdsweep.optim.lowrank`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from svdsweep.optim import lowrank

__all__ = ["DEFAULT_METHOD", "METHODS", "NonFiniteGradientError", "SVDGradient"]

#: Methods by name. ``default`` is resolved to :data:`DEFAULT_METHOD`.
METHODS = ("exact", "randomized", "subspace")

#: The method ``"default"`` stands for. Chosen by ``svdsweep bench optimizer``
#: (see BENCHMARKS.md): the warm-started subspace iteration captures
#: >= 0.99 of the optimal rank-k energy at every sampled step at a fraction of
#: the exact SVD's cost.
DEFAULT_METHOD = "subspace"

#: Per-method defaults of the accuracy knobs (see :mod:`svdsweep.optim.lowrank`).
_KNOB_DEFAULTS: dict[str, dict[str, int]] = {
    "exact": {"oversample": 0, "power_iters": 0},
    "randomized": {"oversample": 8, "power_iters": 2},
    "subspace": {"oversample": 8, "power_iters": 1},
}

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or infinity, so no low-rank approximation exists.

    Raised before any gradient is modified and before the base optimizer
    steps, so parameters and optimizer state are exactly as they were.
    """


class SVDGradient(Optimizer):
    r"""Wraps a torch optimizer and low-rank-projects 2D gradients before each step.

    For every parameter whose gradient ``G`` is an ``m x n`` matrix with
    ``k < min(m, n)``, the gradient is replaced in place by its best rank-k
    approximation in Frobenius norm (Eckart & Young, 1936),

    .. math:: G_k = U_{:, :k} \, \mathrm{diag}(\sigma_{1..k}) \, V_{:, :k}^\top,

    then the base optimizer steps on the modified gradients. Gradients of
    other shapes (biases, norms) are left alone, and so is any gradient with
    ``k >= min(m, n)``, where no SVD is computed at all. The hypothesis tested
    with it is that the discarded tail of the spectrum is mostly minibatch
    noise, so that dropping it "denoises" the update.

    The wrapper shares ``param_groups`` with the base optimizer (like timm's
    ``Lookahead``), so learning-rate schedulers and ``add_param_group`` act on
    both. ``rank``, ``method`` and the accuracy knobs are stored per group and
    may differ between groups.

    Args:
        base_optimizer: an already-built optimizer, e.g. ``torch.optim.Adam``.
        rank: k, a positive int.
        method: ``"exact"`` (``torch.linalg.svd``, the reference),
            ``"randomized"`` (Halko et al. sketch, stateless), ``"subspace"``
            (subspace iteration warm-started from the previous step, as in
            PowerSGD) or ``"default"`` (= :data:`DEFAULT_METHOD`).
        oversample: extra basis vectors of the fast methods (``None``: the
            method's default, 8).
        power_iters: extra power iterations per step of the fast methods
            (``None``: 2 for ``randomized``, 1 for ``subspace``).
        reshape_conv: also project conv kernels' gradients, reshaped to
            ``(out, in * kh * kw)``. Off by default, as in the original
            experiment.
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteGradientError`
            naming the parameter; ``"skip"`` skips the whole step (neither the
            projection nor the base step runs) and counts it in
            :attr:`skipped_steps`.
        seed: seeds the Gaussian sketches, so runs are reproducible.

    Example::

        base = torch.optim.Adam(model.named_parameters(), lr=1e-3)
        optimizer = SVDGradient(base, rank=9)
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rank: int,
        method: str = "default",
        *,
        oversample: int | None = None,
        power_iters: int | None = None,
        reshape_conv: bool = False,
        nonfinite: str = "raise",
        seed: int = 0,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer, "
                f"got {type(base_optimizer).__name__}"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        defaults = _group_settings(rank, method, oversample, power_iters)
        # Optimizer.__init__ sets up hooks and would copy the groups into a list
        # of its own: give it a placeholder, then share the base optimizer's list
        # so that both always agree (schedulers, add_param_group).
        super().__init__([torch.zeros(0)], defaults)
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.state = defaultdict(dict)
        self.reshape_conv = bool(reshape_conv)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._generator = torch.Generator().manual_seed(int(seed))
        for group in self.param_groups:
            _apply_settings(group, self._settings_for(group))

    # -- torch.optim contract ------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the base optimizer; unset svd settings take the defaults."""
        if not hasattr(self, "base_optimizer"):
            # Optimizer.__init__'s placeholder group: track nothing.
            return
        settings = self._settings_for(param_group)
        self.base_optimizer.add_param_group(param_group)
        _apply_settings(self.param_groups[-1], settings)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluates ``closure`` (if given), projects the gradients, steps the base optimizer.

        Returns the closure's loss, like every torch optimizer.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        norms = self._gradient_norms()
        if norms is None:
            self.skipped_steps += 1
            return loss
        for group, index, param in self._params_with_grad():
            self._project(group, index, param, norms[index])
        self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus this wrapper's warm-start bases.

        Bases are keyed by the parameter's position across all groups, the
        same convention torch uses, so the dict survives a process restart.
        """
        projection_state = {
            index: {key: value for key, value in self.state[param].items()}
            for _, index, param in self._all_params()
            if self.state.get(param)
        }
        return {
            "base": self.base_optimizer.state_dict(),
            "projection_state": projection_state,
            "generator": self._generator.get_state(),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("base", "projection_state", "generator"):
            if key not in state_dict:
                raise ValueError(f"not an SVDGradient state dict: missing {key!r}")
        self.base_optimizer.load_state_dict(state_dict["base"])
        # load_state_dict may replace the group dicts; keep sharing the list.
        self.param_groups = self.base_optimizer.param_groups
        saved = state_dict["projection_state"]
        self.state = defaultdict(dict)
        for _, index, param in self._all_params():
            if index in saved:
                self.state[param] = {
                    key: value.to(param.device) if isinstance(value, Tensor) else value
                    for key, value in saved[index].items()
                }
        self._generator.set_state(state_dict["generator"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    # -- diagnostics -----------------------------------------------------------

    def energy_tensors(self) -> dict[str, Tensor]:
        """‖G_k‖²/‖G‖² per projected parameter at the last step, as 0-d device tensors.

        No synchronisation: a training loop can accumulate these every step
        and convert once per epoch.
        """
        return {
            self._param_name(group, index, param): self.state[param]["energy"]
            for group, index, param in self._all_params()
            if "energy" in self.state.get(param, {})
        }

    def energy_fractions(self) -> dict[str, float]:
        """:meth:`energy_tensors` as floats (one device synchronisation)."""
        return {name: float(value) for name, value in self.energy_tensors().items()}

    # -- internals -------------------------------------------------------------

    def _settings_for(self, group: dict[str, Any]) -> dict[str, Any]:
        """A group's own svd settings where it has them, the defaults elsewhere."""
        method = group.get("method", self.defaults["method"])
        same_method = method in ("default", self.defaults["method"])
        return _group_settings(
            group.get("rank", self.defaults["rank"]),
            method,
            group.get("oversample", self.defaults["oversample"] if same_method else None),
            group.get("power_iters", self.defaults["power_iters"] if same_method else None),
        )

    def _all_params(self) -> Iterator[tuple[dict[str, Any], int, Tensor]]:
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                yield group, index, param
                index += 1

    def _params_with_grad(self) -> Iterator[tuple[dict[str, Any], int, Tensor]]:
        for group, index, param in self._all_params():
            if param.grad is not None:
                yield group, index, param

    def _param_name(self, group: dict[str, Any], index: int, param: Tensor) -> str:
        names = group.get("param_names")
        if names is not None:
            for name, candidate in zip(names, group["params"], strict=True):
                if candidate is param:
                    return str(name)
        return f"param {index} (shape {'x'.join(map(str, param.shape))})"

    def _gradient_norms(self) -> dict[int, Tensor] | None:
        """‖G‖ of every gradient by parameter index, or ``None`` to skip a non-finite step.

        One fused norm kernel and one device sync per step. The norms are
        reused as the denominators of the captured-energy diagnostic.
        """
        entries = list(self._params_with_grad())
        if not entries:
            return {}
        norms = torch._foreach_norm([param.grad for _, _, param in entries])  # type: ignore[misc]
        device = norms[0].device
        if bool(torch.isfinite(torch.stack([norm.to(device) for norm in norms])).all()):
            return {index: norm for (_, index, _), norm in zip(entries, norms, strict=True)}
        if self.nonfinite == "skip":
            return None
        bad = [
            self._param_name(group, index, param)
            for (group, index, param), norm in zip(entries, norms, strict=True)
            if not bool(torch.isfinite(norm))
        ]
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or inf) in {', '.join(bad)}; "
            "lower the learning rate, or pass nonfinite='skip' to skip such steps"
        )

    def _project(self, group: dict[str, Any], index: int, param: Tensor, norm: Tensor) -> None:
        grad = param.grad
        assert grad is not None
        if grad.ndim == 4 and self.reshape_conv:
            matrix = grad.reshape(grad.shape[0], -1)
        elif grad.ndim == 2:
            matrix = grad
        else:
            return
        rank = group["rank"]
        if rank >= min(matrix.shape):
            return  # already of rank <= k: nothing to drop, no SVD
        method = group["method"]
        state = self.state[param]
        if method == "exact":
            result = lowrank.exact_low_rank(matrix, rank)
        elif method == "randomized":
            result = lowrank.randomized_low_rank(
                matrix,
                rank,
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                generator=self._generator,
            )
        else:
            result = lowrank.subspace_low_rank(
                matrix,
                rank,
                state.get("basis"),
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                generator=self._generator,
            )
            if result.basis is not None:
                state["basis"] = result.basis
        state["energy"] = lowrank.captured_energy(result.singular_values, norm)
        grad.copy_(result.approx.reshape(grad.shape))


def _group_settings(rank: Any, method: Any, oversample: Any, power_iters: Any) -> dict[str, Any]:
    """Validates the svd settings of a group and fills in the method's defaults."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if method == "default":
        method = DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {('default', *METHODS)}")
    knobs = dict(_KNOB_DEFAULTS[method])
    for name, value in (("oversample", oversample), ("power_iters", power_iters)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        knobs[name] = value
    return {"rank": rank, "method": method, **knobs}


def _apply_settings(group: dict[str, Any], settings: dict[str, Any]) -> None:
    group.update(settings)
