"""`SVDGradient`: replace each weight gradient by its best rank-k approximation, then step.

The wrapper only does bookkeeping: which gradients to touch, where the warm
start bases live, how the state is saved. The math is in
:mod:`svdsweep.optim.lowrank`.
"""

from __future__ import annotations

import math
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
#: ``oversample=None`` in this table means :func:`~svdsweep.optim.lowrank.default_oversample`.
_KNOB_DEFAULTS: dict[str, dict[str, int | None]] = {
    "exact": {"oversample": 0, "power_iters": 0},
    "randomized": {"oversample": None, "power_iters": 2},
    "subspace": {"oversample": None, "power_iters": 0},
}

NONFINITE_POLICIES = ("raise", "skip")

#: The svd settings stored in every param group.
SETTING_KEYS = ("rank", "method", "oversample", "power_iters")

#: Steps between host reads of the deferred checks when parameters live on an
#: accelerator (``sync_every=None``); on the CPU a read costs nothing, so every step.
DEFAULT_SYNC_EVERY_ON_ACCELERATORS = 16


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
        oversample: extra basis vectors of the fast methods (``None``:
            :func:`~svdsweep.optim.lowrank.default_oversample`, max(8, 32 − k)).
        power_iters: extra power iterations per step of the fast methods
            (``None``: 2 for ``randomized``, 0 for ``subspace``, whose warm
            basis plus the certificate's escalation make iterations a loss).
        reshape_conv: also project conv kernels' gradients, reshaped to
            ``(out, in * kh * kw)``. Off by default, as in the original
            experiment.
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteGradientError`
            naming the parameter; ``"skip"`` skips the whole step (neither the
            projection nor the base step runs) and counts it in
            :attr:`skipped_steps`.
        seed: seeds the Gaussian sketches, so runs are reproducible.
        sync_every: steps between host reads. ``1`` (the default on the CPU):
            every step is certified (see :mod:`svdsweep.optim.lowrank`) and
            escalated when needed, and a non-finite gradient is refused before
            anything changes. ``N > 1`` (default ``16`` when the parameters
            live on an accelerator): the sync-free path, whose step never
            waits on the host; the checks are folded into device tensors and
            read every N steps (:meth:`synchronize`), a non-finite step is
            undone on the device and reported at the read, and a parameter
            whose certificate fell short is restarted from a cold basis.

    Diagnostics: :meth:`energy_tensors` / :meth:`energy_fractions` (captured
    energy per layer), :meth:`certificates` (the guaranteed fraction of the
    optimum), :meth:`diagnostics` (skipped steps, escalation counts).

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
        sync_every: int | None = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer, "
                f"got {type(base_optimizer).__name__}"
            )
        if isinstance(base_optimizer, SVDGradient):
            # Two projections in a row would run at two ranks; this wrapper's settings win.
            inner: Optimizer = base_optimizer.__dict__["base_optimizer"]
            base_optimizer = inner
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if sync_every is not None and (
            isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1
        ):
            raise ValueError(f"sync_every must be a positive int or None, got {sync_every!r}")
        settings = _group_settings(rank, method, oversample, power_iters)
        requested = {
            "rank": rank,
            "method": method,
            "oversample": oversample,
            "power_iters": power_iters,
        }
        # Validate every group's own settings before any group is changed.
        resolved = [
            _resolve(group, requested, _own_settings(group))
            for group in base_optimizer.param_groups
        ]
        # Optimizer.__init__ sets up hooks and would copy the groups into a list
        # of its own: give it a placeholder. `param_groups` is then a view of the
        # base optimizer's list (see the property), so both always agree, even
        # after `base_optimizer.load_state_dict` replaced the list.
        # `defaults` holds the base's hyperparameters too: schedulers such as
        # OneCycleLR read them (`betas`, `momentum`) from there.
        super().__init__([torch.zeros(0)], {**base_optimizer.defaults, **settings})
        self.base_optimizer = base_optimizer
        self._requested = requested
        self.state = defaultdict(dict)
        self.reshape_conv = bool(reshape_conv)
        self.nonfinite = nonfinite
        self.sync_every = sync_every
        self.skipped_steps = 0
        self.escalations = dict.fromkeys(lowrank.ESCALATION_LEVELS, 0)
        self.uncertified_steps = 0
        self._generator = torch.Generator().manual_seed(int(seed))
        self._pending: list[_PendingStep] = []
        for group, (own, values) in zip(self.param_groups, resolved, strict=True):
            group.update(values)
            group["svd_own"] = own

    # -- torch.optim contract ------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's own list of groups (shared, never copied)."""
        if "base_optimizer" in self.__dict__:
            groups: list[dict[str, Any]] = self.base_optimizer.param_groups
            return groups
        placeholder: list[dict[str, Any]] = self.__dict__.setdefault("_placeholder_groups", [])
        return placeholder

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.param_groups = groups
        else:
            self.__dict__["_placeholder_groups"] = groups

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for `copy.deepcopy` and `pickle` (Optimizer keeps only three fields)."""
        state = dict(self.__dict__)
        state.pop("_placeholder_groups", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the base optimizer; unset svd settings take the defaults."""
        if "base_optimizer" not in self.__dict__:
            # Optimizer.__init__'s placeholder group: track nothing.
            return
        own = _own_settings(param_group)
        own_keys, values = _resolve(param_group, self._requested, own)
        self.base_optimizer.add_param_group(param_group)
        self.param_groups[-1].update(values)
        self.param_groups[-1]["svd_own"] = own_keys

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Projects the gradients, then steps the base optimizer; returns the closure's loss.

        With a ``closure``, the base optimizer evaluates it (as often as it
        needs: LBFGS re-evaluates during its line search) and each evaluation's
        gradients are projected before the base optimizer sees them.
        """
        if closure is None:
            if self._sync_free():
                self._step_sync_free()
                return None
            if self._check_and_project():
                self.base_optimizer.step()
            return None

        def projected_closure() -> Any:
            loss = closure()
            with torch.no_grad():
                if not self._check_and_project():
                    raise _SkipStep(loss)
            return loss

        try:
            loss = self.base_optimizer.step(projected_closure)
        except _SkipStep as skipped:
            return skipped.loss  # type: ignore[no-any-return]
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus this wrapper's warm-start bases and counts.

        Bases are keyed by the parameter's position across all groups, the
        same convention torch uses, so the dict survives a process restart.
        ``register_state_dict_pre_hook`` / ``post_hook`` hooks run as in torch.
        """
        self.synchronize()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        projection_state = {
            index: dict(self.state[param].items())
            for _, index, param in self._all_params()
            if self.state.get(param)
        }
        state_dict: dict[str, Any] = {
            "base": self.base_optimizer.state_dict(),
            "projection_state": projection_state,
            "generator": self._generator.get_state(),
            "skipped_steps": self.skipped_steps,
            "escalations": dict(self.escalations),
            "uncertified_steps": self.uncertified_steps,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("base", "projection_state", "generator"):
            if key not in state_dict:
                raise ValueError(f"not an SVDGradient state dict: missing {key!r}")
        self.base_optimizer.load_state_dict(state_dict["base"])
        saved = state_dict["projection_state"]
        self.state = defaultdict(dict)
        self._pending = []
        for _, index, param in self._all_params():
            if index in saved:
                self.state[param] = {
                    key: value.to(param.device) if isinstance(value, Tensor) else value
                    for key, value in saved[index].items()
                }
        self._generator.set_state(state_dict["generator"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.escalations = dict.fromkeys(lowrank.ESCALATION_LEVELS, 0)
        self.escalations.update(state_dict.get("escalations", {}))
        self.uncertified_steps = int(state_dict.get("uncertified_steps", 0))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- diagnostics -----------------------------------------------------------

    def energy_tensors(self) -> dict[str, Tensor]:
        """‖G_k‖²/‖G‖² per parameter projected at the last step, as 0-d device tensors.

        No synchronisation: a training loop can accumulate these every step
        and convert once per epoch. A parameter without a gradient at the last
        step has no entry.
        """
        return {
            self._param_name(group, index, param): self.state[param]["energy"]
            for group, index, param in self._all_params()
            if "energy" in self.state.get(param, {})
        }

    def energy_fractions(self) -> dict[str, float]:
        """:meth:`energy_tensors` as floats (one device synchronisation)."""
        return {name: float(value) for name, value in self.energy_tensors().items()}

    def certificates(self) -> dict[str, float]:
        """Per projected parameter, the guaranteed lower bound on captured / optimal energy.

        For the last step (after escalation), as floats; 1 for ``exact``.
        """
        return {
            self._param_name(group, index, param): float(self.state[param]["certificate"])
            for group, index, param in self._all_params()
            if "certificate" in self.state.get(param, {})
        }

    def diagnostics(self) -> dict[str, Any]:
        """Counts a user reads to see what their workload costs.

        ``escalations`` counts projected matrices by the work they needed
        (``none``: the fast method certified itself; ``widened``: fresh columns
        and more iterations; ``exact``: the exact top-k subspace). In the
        sync-free mode, ``uncertified_steps`` counts matrices whose certificate
        fell below the target (read every ``sync_every`` steps); their basis is
        then restarted cold.
        """
        self.synchronize()
        return {
            "skipped_steps": self.skipped_steps,
            "escalations": dict(self.escalations),
            "uncertified_steps": self.uncertified_steps,
        }

    def synchronize(self) -> None:
        """Reads back what the sync-free mode deferred (finiteness, certificates).

        Raises :class:`NonFiniteGradientError` (policy ``raise``) if a deferred
        step had a non-finite gradient; that step changed nothing. A no-op in
        the default (synchronous) mode.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        certified = [(step, param_id) for step in pending for param_id in step.certificates]
        read = torch.cat(
            [
                torch.stack([step.finite.double() for step in pending]),
                torch.stack([step.certificates[param_id].double() for step, param_id in certified])
                if certified
                else torch.zeros(0, dtype=torch.float64, device=pending[0].finite.device),
            ]
        ).tolist()  # the one host read
        finite = dict(
            zip(map(id, pending), (flag == 1.0 for flag in read[: len(pending)]), strict=True)
        )
        restart: set[int] = set()
        for (step, param_id), value in zip(certified, read[len(pending) :], strict=True):
            if not finite[id(step)]:
                continue  # undone: its certificate certifies nothing
            if value < lowrank.CERTIFIED_FRACTION:
                self.uncertified_steps += 1
                restart.add(param_id)
            else:
                self.escalations["none"] += 1
        for _, _, param in self._all_params():
            if id(param) in restart:
                self.state[param].pop("basis", None)
        bad_steps = [step for step in pending if not finite[id(step)]]
        for step in bad_steps:
            step.undo_host_counters()
        if not bad_steps:
            return
        if self.nonfinite == "skip":
            self.skipped_steps += len(bad_steps)
            return
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or inf) in {len(bad_steps)} of the last "
            f"{len(pending)} steps (sync_every={self._sync_every()}); those steps "
            "changed neither parameters nor optimizer state. Lower the learning "
            "rate, or pass nonfinite='skip' to skip such steps"
        )

    # -- internals -------------------------------------------------------------

    def _sync_every(self) -> int:
        if self.sync_every is not None:
            return self.sync_every
        return DEFAULT_SYNC_EVERY_ON_ACCELERATORS if self._on_accelerator() else 1

    def _on_accelerator(self) -> bool:
        for _, _, param in self._all_params():
            return param.device.type != "cpu"
        return False

    def _sync_free(self) -> bool:
        return self._sync_every() > 1

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

    def _check_and_project(self) -> bool:
        """Checks every gradient, then projects; ``False`` when the step is to be skipped.

        Nothing is modified before every gradient has been checked: a
        non-finite one raises (or skips) with all gradients as they were.
        """
        entries = list(self._params_with_grad())
        norms = self._gradient_norms(entries)
        if norms is None:
            self.skipped_steps += 1
            return False
        for group, index, param in entries:
            self._project(group, param, norms[index])
        self._forget_energy_without_grad()
        return True

    def _forget_energy_without_grad(self) -> None:
        for _, _, param in self._all_params():
            if param.grad is None and param in self.state:
                self.state[param].pop("energy", None)

    def _gradient_norms(
        self, entries: list[tuple[dict[str, Any], int, Tensor]]
    ) -> dict[int, float] | None:
        """‖G‖ of every gradient by parameter index, or ``None`` to skip a non-finite step.

        One fused float64 norm kernel and one host read per step; float64, so
        that large finite gradients (fp16 entries of 1000, float32 of 1e20)
        are not mistaken for infinite ones. The norms come back as Python
        floats: the low-rank math uses them for its scaling, its certificate
        and the captured-energy diagnostic without launching a kernel.
        """
        if not entries:
            return {}
        norms = torch.stack(_norms([param.grad for _, _, param in entries])).tolist()  # type: ignore[misc]
        bad = []
        for position, ((group, index, param), norm) in enumerate(zip(entries, norms, strict=True)):
            if math.isfinite(norm):
                continue
            grad = param.grad
            assert grad is not None
            values = grad.coalesce().values() if grad.is_sparse else grad
            if bool(torch.isfinite(values).all()):
                norms[position] = float(_overflow_safe_norm(values))  # finite, beyond float64
            else:
                bad.append(self._param_name(group, index, param))
        if not bad:
            return {index: norm for (_, index, _), norm in zip(entries, norms, strict=True)}
        if self.nonfinite == "skip":
            return None
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or inf) in {', '.join(bad)}; "
            "lower the learning rate, or pass nonfinite='skip' to skip such steps"
        )

    def _matrix_of(self, grad: Tensor, group: dict[str, Any]) -> Tensor | None:
        """The matrix to project, or ``None`` for gradients left alone."""
        if grad.is_sparse:
            return None  # passed through untouched: its rows are a lookup, not a spectrum
        if grad.ndim == 4 and self.reshape_conv:
            matrix = grad.reshape(grad.shape[0], -1)
        elif grad.ndim == 2:
            matrix = grad
        else:
            return None
        if group["rank"] >= min(matrix.shape):
            return None  # already of rank <= k: nothing to drop, no SVD
        return matrix

    def _low_rank(
        self,
        group: dict[str, Any],
        param: Tensor,
        matrix: Tensor,
        norm: Tensor | float,
        sync_free: bool,
    ) -> lowrank.LowRankResult:
        method = group["method"]
        if method == "exact":
            return lowrank.exact_low_rank(matrix, group["rank"])
        if method == "randomized":
            return lowrank.randomized_low_rank(
                matrix,
                group["rank"],
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                generator=self._generator,
                frobenius_norm=norm,
                certify=None if sync_free else lowrank.CERTIFIED_FRACTION,
            )
        return lowrank.subspace_low_rank(
            matrix,
            group["rank"],
            self.state[param].get("basis"),
            oversample=group["oversample"],
            power_iters=group["power_iters"],
            generator=self._generator,
            frobenius_norm=norm,
            sync_free=sync_free,
        )

    def _project(self, group: dict[str, Any], param: Tensor, norm: float) -> None:
        grad = param.grad
        assert grad is not None
        matrix = self._matrix_of(grad, group)
        state = self.state[param]
        if matrix is None:
            state.pop("energy", None)
            return
        result = self._low_rank(group, param, matrix, norm, sync_free=False)
        if result.basis is not None:
            state["basis"] = result.basis
        state["energy"] = _as_tensor(result.energy, grad.device)
        state["certificate"] = float(result.certificate)
        self.escalations[lowrank.ESCALATION_LEVELS[result.escalation]] += 1
        grad.copy_(result.approx.reshape(grad.shape))

    def _step_sync_free(self) -> None:
        """One step without a host read: checks folded into device tensors, read later.

        A non-finite gradient cannot be refused before the step without a host
        read, so the step runs on zeroed gradients and every parameter and
        optimizer-state tensor is restored (``torch.where``) to its value
        before the step: nothing of it survives. Host-side counters of the
        base (e.g. Adam's CPU ``step``) are restored at the next read.
        """
        entries = list(self._params_with_grad())
        if not entries:
            self.base_optimizer.step()
            return
        norms = _norms([param.grad for _, _, param in entries])  # type: ignore[misc]
        device = entries[0][2].device
        finite = torch.isfinite(torch.stack([norm.to(device) for norm in norms])).all()
        certificates: dict[int, Tensor] = {}
        for (group, _, param), norm in zip(entries, norms, strict=True):
            grad = param.grad
            assert grad is not None
            if grad.is_sparse:
                continue
            safe_grad = torch.where(finite, grad, torch.zeros((), dtype=grad.dtype, device=device))
            safe_norm = torch.where(finite, norm, torch.zeros_like(norm))
            matrix = self._matrix_of(safe_grad, group)
            state = self.state[param]
            if matrix is None:
                grad.copy_(safe_grad)
                state.pop("energy", None)
                continue
            result = self._low_rank(group, param, matrix, safe_norm, sync_free=True)
            if result.basis is not None:
                old = state.get("basis")
                state["basis"] = (
                    result.basis if old is None else torch.where(finite, result.basis, old)
                )
            state["energy"] = _as_tensor(result.energy, device)
            state["certificate"] = result.certificate
            certificates[id(param)] = torch.as_tensor(result.certificate, device=device)
            grad.copy_(result.approx.reshape(grad.shape))
        self._forget_energy_without_grad()
        pending = _PendingStep(finite, certificates)
        touched = [param for _, _, param in entries]
        snapshot = pending.snapshot(touched, self.base_optimizer.state, device)
        self.base_optimizer.step()
        pending.restore_unless_finite(snapshot)
        self._pending.append(pending)
        if len(self._pending) >= self._sync_every():
            self.synchronize()


class _SkipStep(Exception):
    """Raised inside a closure to skip the base step under ``nonfinite='skip'``."""

    def __init__(self, loss: Any) -> None:
        super().__init__("skipped")
        self.loss = loss


class _PendingStep:
    """A sync-free step's device-side flags, and how to undo the step on the host side."""

    def __init__(self, finite: Tensor, certificates: dict[int, Tensor]) -> None:
        self.finite = finite
        self.certificates = certificates
        self.host_counters: list[tuple[Tensor, Tensor]] = []
        self.fresh: list[Tensor] = []
        self.base_state: dict[Any, Any] = {}

    def snapshot(
        self, params: list[Tensor], base_state: dict[Any, Any], device: torch.device
    ) -> list[tuple[Tensor, Tensor]]:
        """Copies of the parameters and their device state tensors; host ones kept aside."""
        copies = [(param, param.detach().clone()) for param in params]
        self.fresh = [param for param in params if not base_state.get(param)]
        self.base_state = base_state
        for param in params:
            for value in base_state.get(param, {}).values():
                if not isinstance(value, Tensor):
                    continue
                if value.device == device:
                    copies.append((value, value.clone()))
                else:
                    self.host_counters.append((value, value.clone()))
        return copies

    def restore_unless_finite(self, snapshot: list[tuple[Tensor, Tensor]]) -> None:
        for tensor, before in snapshot:
            if tensor.shape == before.shape:
                tensor.data.copy_(torch.where(self.finite, tensor.data, before))
        # State the step created from nothing goes back to zeros, which every torch
        # optimizer treats like fresh state (Adam: step 0, zero moments).
        for param in self.fresh:
            for value in self.base_state.get(param, {}).values():
                if isinstance(value, Tensor) and value.device == self.finite.device:
                    value.copy_(torch.where(self.finite, value, torch.zeros_like(value)))

    def undo_host_counters(self) -> None:
        for tensor, before in self.host_counters:
            tensor.copy_(before)


def _as_tensor(value: Tensor | float, device: torch.device) -> Tensor:
    """A 0-d float64 tensor on ``device`` (energies are summed on the device by the trainer)."""
    if isinstance(value, Tensor):
        return value.double()
    return torch.tensor(value, dtype=torch.float64, device=device)


def _resolve(
    group: dict[str, Any], requested: dict[str, Any], own: tuple[str, ...]
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A group's own svd settings where it has them, the wrapper's elsewhere; validated.

    ``requested`` holds the wrapper's arguments as given (``None`` knobs stay
    ``None``), so that a group of another rank or method gets that rank's and
    method's default knobs rather than ones resolved for the wrapper's.
    """
    method = group["method"] if "method" in own else requested["method"]
    same_method = method in ("default", requested["method"]) or (
        method == DEFAULT_METHOD and requested["method"] == "default"
    )

    def knob(name: str) -> Any:
        if name in own:
            return group[name]
        return requested[name] if same_method else None

    values = _group_settings(
        group["rank"] if "rank" in own else requested["rank"],
        method,
        knob("oversample"),
        knob("power_iters"),
    )
    return own, values


def _own_settings(group: dict[str, Any]) -> tuple[str, ...]:
    """The svd settings a group carries by the user's choice, not a previous wrapper's."""
    if "svd_own" in group:
        return tuple(group["svd_own"])
    return tuple(key for key in SETTING_KEYS if key in group)


def _norms(grads: list[Tensor]) -> list[Tensor]:
    """Frobenius norms in float64, dense gradients in one fused kernel."""
    dense = [grad for grad in grads if not grad.is_sparse]
    fused = iter(torch._foreach_norm(dense, 2, torch.float64) if dense else [])
    return [
        torch.linalg.vector_norm(grad.coalesce().values(), dtype=torch.float64)
        if grad.is_sparse
        else next(fused)
        for grad in grads
    ]


def _overflow_safe_norm(values: Tensor) -> Tensor:
    """‖x‖ for finite x whose squares overflow even float64: max|x| · ‖x / max|x|‖."""
    peak = values.abs().amax().double()
    norm: Tensor = peak * torch.linalg.vector_norm(values.double() / peak.clamp_min(1e-300))
    return norm


def _group_settings(rank: Any, method: Any, oversample: Any, power_iters: Any) -> dict[str, Any]:
    """Validates the svd settings of a group and fills in the method's defaults."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if method == "default":
        method = DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {('default', *METHODS)}")
    knobs = dict(_KNOB_DEFAULTS[method])
    if knobs["oversample"] is None:
        knobs["oversample"] = lowrank.default_oversample(rank)
    for name, value in (("oversample", oversample), ("power_iters", power_iters)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        knobs[name] = value
    return {"rank": rank, "method": method, **knobs}
