"""`SVDGradient`: replace each weight gradient by its best rank-k approximation, then step.

The wrapper only does bookkeeping: which gradients to touch, where the warm
start bases live, how the state is saved, what is counted. The rest lives in
modules of its own, each testable without the others:

- :mod:`svdsweep.optim.lowrank`: the math (tensors in, tensors out);
- :mod:`svdsweep.optim._projection`: one gradient projected, with its state;
- :mod:`svdsweep.optim._gradient_checks`: what is refused before anything changes;
- :mod:`svdsweep.optim._deferred`: the sync-free mode's deferred checks;
- :mod:`svdsweep.optim._settings`: a param group's svd settings.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from svdsweep.optim import lowrank
from svdsweep.optim._deferred import DeferredChecks, guarded_step, steps_between_reads
from svdsweep.optim._gradient_checks import (
    NonFiniteGradientError,
    checked_norms,
    refuse_layouts,
)
from svdsweep.optim._projection import (
    load_projection_state,
    project,
    project_all_sync_free,
    save_projection_state,
)
from svdsweep.optim._settings import (
    DEFAULT_METHOD,
    METHODS,
    check_step_policies,
    group_settings,
    own_settings,
    resolve_settings,
)

__all__ = ["DEFAULT_METHOD", "METHODS", "NonFiniteGradientError", "SVDGradient"]


class SVDGradient(Optimizer):
    r"""Wraps a torch optimizer and low-rank-projects 2D gradients before each step.

    For every parameter whose gradient ``G`` is an ``m x n`` matrix with
    ``k < min(m, n)``, the gradient is replaced in place by its best rank-k
    approximation in Frobenius norm (Eckart & Young, 1936),

    .. math:: G_k = U_{:, :k} \, \mathrm{diag}(\sigma_{1..k}) \, V_{:, :k}^\top,

    then the base optimizer steps on the modified gradients. Gradients of
    other shapes (biases, norms) are left alone, and so is any gradient with
    ``k >= min(m, n)``, where no SVD is computed at all, and any sparse one
    (refused before anything changes if the base would refuse it). The
    hypothesis tested with it is that the discarded tail of the spectrum is
    mostly minibatch noise, so that dropping it "denoises" the update.

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
        check_step_policies(nonfinite, sync_every)
        settings = group_settings(rank, method, oversample, power_iters)
        requested = dict(rank=rank, method=method, oversample=oversample, power_iters=power_iters)
        # Validate every group's own settings before any group is changed.
        resolved = [
            resolve_settings(group, requested, own_settings(group))
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
        self._deferred = DeferredChecks()
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the base optimizer; unset svd settings take the defaults."""
        if "base_optimizer" not in self.__dict__:
            # Optimizer.__init__'s placeholder group: track nothing.
            return
        own = own_settings(param_group)
        own_keys, values = resolve_settings(param_group, self._requested, own)
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
            if self._sync_every() > 1:  # the sync-free mode
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
        state_dict: dict[str, Any] = {
            "base": self.base_optimizer.state_dict(),
            "projection_state": save_projection_state(self.state, self._all_params()),
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
        self.state = load_projection_state(state_dict["projection_state"], self._all_params())
        self._deferred.clear()
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
        return self._state_by_name("energy")

    def energy_fractions(self) -> dict[str, float]:
        """:meth:`energy_tensors` as floats (one device synchronisation)."""
        return {name: float(value) for name, value in self.energy_tensors().items()}

    def certificates(self) -> dict[str, float]:
        """Per projected parameter, the guaranteed lower bound on captured / optimal energy.

        For the last step (after escalation), as floats; 1 for ``exact``.
        """
        return {name: float(value) for name, value in self._state_by_name("certificate").items()}

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
        read = self._deferred.read(lowrank.CERTIFIED_FRACTION)
        self.escalations["none"] += read.certified
        self.uncertified_steps += read.uncertified
        for _, _, param in self._all_params():
            if id(param) in read.restart:
                self.state[param].pop("basis", None)
        if not read.bad_steps:
            return
        if self.nonfinite == "skip":
            self.skipped_steps += read.bad_steps
            return
        raise read.nonfinite_error(self._sync_every())

    # -- internals -------------------------------------------------------------

    def _sync_every(self) -> int:
        return steps_between_reads(self.sync_every, (param for _, _, param in self._all_params()))

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

    def _state_by_name(self, key: str) -> dict[str, Any]:
        return {
            self._param_name(group, index, param): self.state[param][key]
            for group, index, param in self._all_params()
            if key in self.state.get(param, {})
        }

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
        grad_norms = self._checked_norms(entries)
        if grad_norms is None:
            self.skipped_steps += 1
            return False
        for group, index, param in entries:
            self._project(group, param, grad_norms[index])
        self._forget_energy_without_grad()
        return True

    def _forget_energy_without_grad(self) -> None:
        for _, _, param in self._all_params():
            if param.grad is None and param in self.state:
                self.state[param].pop("energy", None)

    def _checked_norms(
        self, entries: list[tuple[dict[str, Any], int, Tensor]]
    ) -> dict[int, float] | None:
        """‖G‖ of every gradient by parameter index, or ``None`` to skip a non-finite step.

        Raises first if the base refuses a gradient's layout (sparse gradients
        pass through to a base that takes them), then, under ``nonfinite="raise"``,
        if one is non-finite. As Python floats: the low-rank math uses them for
        its scaling, certificate and energy diagnostic without launching a kernel.
        """
        grads: list[Tensor] = [param.grad for _, _, param in entries]  # type: ignore[misc]

        def name_of(position: int) -> str:
            return self._param_name(*entries[position])

        refuse_layouts(self.base_optimizer, grads, name_of)
        values = checked_norms(grads, name_of, skip=self.nonfinite == "skip")
        if values is None:
            return None
        return {index: norm for (_, index, _), norm in zip(entries, values, strict=True)}

    def _project(self, group: dict[str, Any], param: Tensor, norm: float) -> None:
        grad = param.grad
        assert grad is not None
        state = self.state[param]
        level = project(grad, group, state, norm, self._generator, self.reshape_conv)
        if level is not None:
            self.escalations[lowrank.ESCALATION_LEVELS[level]] += 1

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
        refuse_layouts(
            self.base_optimizer,
            [param.grad for _, _, param in entries],  # type: ignore[misc]
            lambda position: self._param_name(*entries[position]),
        )
        finite, certificates = project_all_sync_free(
            [(group, param) for group, _, param in entries],
            self.state,
            self._generator,
            self.reshape_conv,
        )
        self._forget_energy_without_grad()
        touched = [param for _, _, param in entries]
        base = self.base_optimizer
        self._deferred.append(
            guarded_step(base.step, finite, certificates, touched, base.state, finite.device)
        )
        if len(self._deferred) >= self._sync_every():
            self.synchronize()


class _SkipStep(Exception):
    """Raised inside a closure to skip the base step under ``nonfinite='skip'``."""

    def __init__(self, loss: Any) -> None:
        super().__init__("skipped")
        self.loss = loss
