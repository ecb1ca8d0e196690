"""The svd settings of a param group, validated and with each method's default knobs.

A group carries ``rank``, ``method``, ``oversample`` and ``power_iters``. Some
it holds by the user's choice (``add_param_group({"params": ..., "rank": 4})``),
the rest it takes from the wrapper's arguments; :func:`resolve_settings` tells
the two apart, so that a second wrapper on the same base, or a group of another
rank, gets its own defaults rather than ones resolved for someone else.
"""

from __future__ import annotations

from typing import Any

from svdsweep.optim import lowrank

#: Methods by name. ``default`` is resolved to :data:`DEFAULT_METHOD`.
METHODS = ("exact", "randomized", "subspace")

#: The method ``"default"`` stands for. Chosen by ``svdsweep bench optimizer``
#: (see BENCHMARKS.md): the warm-started subspace iteration captures
#: >= 0.99 of the optimal rank-k energy at every sampled step at a fraction of
#: the exact SVD's cost.
DEFAULT_METHOD = "subspace"

#: Per-method defaults of the accuracy knobs (see :mod:`svdsweep.optim.lowrank`).
#: ``oversample=None`` in this table means :func:`~svdsweep.optim.lowrank.default_oversample`.
KNOB_DEFAULTS: dict[str, dict[str, int | None]] = {
    "exact": {"oversample": 0, "power_iters": 0},
    "randomized": {"oversample": None, "power_iters": 2},
    "subspace": {"oversample": None, "power_iters": 0},
}

#: What a step does with a non-finite gradient (``SVDGradient(nonfinite=...)``).
NONFINITE_POLICIES = ("raise", "skip")

#: The svd settings stored in every param group.
SETTING_KEYS = ("rank", "method", "oversample", "power_iters")


def resolve_settings(
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

    values = group_settings(
        group["rank"] if "rank" in own else requested["rank"],
        method,
        knob("oversample"),
        knob("power_iters"),
    )
    return own, values


def own_settings(group: dict[str, Any]) -> tuple[str, ...]:
    """The svd settings a group carries by the user's choice, not a previous wrapper's."""
    if "svd_own" in group:
        return tuple(group["svd_own"])
    return tuple(key for key in SETTING_KEYS if key in group)


def group_settings(rank: Any, method: Any, oversample: Any, power_iters: Any) -> dict[str, Any]:
    """Validates the svd settings of a group and fills in the method's defaults."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if method == "default":
        method = DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {('default', *METHODS)}")
    knobs = dict(KNOB_DEFAULTS[method])
    if knobs["oversample"] is None:
        knobs["oversample"] = lowrank.default_oversample(rank)
    for name, value in (("oversample", oversample), ("power_iters", power_iters)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        knobs[name] = value
    return {"rank": rank, "method": method, **knobs}


def check_step_policies(nonfinite: Any, sync_every: Any) -> None:
    """Validates ``SVDGradient``'s ``nonfinite`` and ``sync_every`` arguments."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if sync_every is not None and (
        isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1
    ):
        raise ValueError(f"sync_every must be a positive int or None, got {sync_every!r}")
