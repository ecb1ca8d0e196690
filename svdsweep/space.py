"""The search space, and the only place that calls ``trial.suggest_*``.

The sweep proposes parameters through :func:`suggest`; the reporter rebuilds a
trial's training config through :func:`config_from_params`. Both read the
study's :class:`StudySettings`, stored in the study itself, so that a retrain
always matches the trial it came from, and a study can never silently be
resumed with another search space.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from svdsweep.errors import ConfigError
from svdsweep.train import OPTIMIZERS, TrainConfig

__all__ = [
    "SETTINGS_ATTR",
    "SearchSpace",
    "StudySettings",
    "config_from_params",
    "distributions",
    "suggest",
]

PRUNERS = ("none", "median")

#: Study user attribute holding the JSON of :class:`StudySettings`.
SETTINGS_ATTR = "svdsweep_settings"


@dataclass(frozen=True)
class SearchSpace:
    """Ranges searched, as in the original experiment's parameter names.

    ``lr`` is log-uniform: good Adam learning rates for this MLP span two
    decades (1e-4 .. 1e-2) and a log scale spends trials evenly across them.
    ``k`` spans 1 .. 64: the original best was k=9, and above ~64 the rank-k
    gradient of a 784-256-128-10 MLP keeps nearly all of its energy, i.e.
    SVD(Adam) becomes plain Adam.
    """

    lr_low: float = 1e-4
    lr_high: float = 1e-1
    k_low: int = 1
    k_high: int = 64

    def __post_init__(self) -> None:
        if not (0 < self.lr_low < self.lr_high and math.isfinite(self.lr_high)):
            raise ConfigError(
                f"lr range must satisfy 0 < low < high, got {self.lr_low:g}..{self.lr_high:g}"
            )
        if not (1 <= self.k_low <= self.k_high):
            raise ConfigError(
                f"k range must satisfy 1 <= low <= high, got {self.k_low}..{self.k_high}"
            )


#: Largest trial budget per study. TPE fits its densities to every earlier trial
#: at each proposal, and the sweep's status polls count them all: 10,000 trials
#: already take days of proposals and orders of magnitude beyond any budget used.
MAX_BUDGET = 10_000


@dataclass(frozen=True)
class StudySettings:
    """What a study searches and how each of its trials trains (fixed per study).

    A training setting's default is :class:`TrainConfig`'s, written there once
    with its unit; :class:`~svdsweep.sweep.SweepSpec` and the CLI take theirs
    from here.
    """

    optimizer: str
    space: SearchSpace
    #: Finished (COMPLETE + PRUNED) trials: the original protocol's 30, three
    #: times the 10 random trials with which TPE starts.
    budget: int = 30
    epochs: int = TrainConfig.epochs  # per trial
    dataset: str = TrainConfig.dataset
    model: str = TrainConfig.model
    method: str = TrainConfig.method
    batch_size: int = TrainConfig.batch_size
    train_subset: int | None = TrainConfig.train_subset
    seed: int = TrainConfig.seed  # of every trial: trials differ only in their parameters
    pruner: str = "none"  # "none" or "median" (on the per-epoch validation loss)

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ConfigError(f"the trial budget must be a positive int, got {self.budget!r}")
        if self.budget > MAX_BUDGET:
            raise ConfigError(
                f"the trial budget must be at most {MAX_BUDGET} per study, got {self.budget}: "
                "TPE's cost per trial grows with the trials before it; run more experiments instead"
            )
        # Validates epochs, dataset, model, method, batch size and subset.
        self.train_config({"lr": self.space.lr_low, "k": self.space.k_low})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudySettings:
        raw = json.loads(text)
        raw["space"] = SearchSpace(**raw["space"])
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})

    def search_differences(self, other: StudySettings) -> list[str]:
        """What makes trials of ``other`` incomparable with ours (the budget may differ)."""
        mine, theirs = asdict(self), asdict(other)
        return [
            f"{key}: stored {theirs[key]!r}, requested {mine[key]!r}"
            for key in mine
            if key != "budget" and mine[key] != theirs[key]
        ]

    def train_config(self, params: dict[str, Any], **overrides: Any) -> TrainConfig:
        return config_from_params(self, params, **overrides)


def distributions(settings: StudySettings) -> dict[str, Any]:
    """Optuna distributions of the study's parameters, by name."""
    from optuna.distributions import FloatDistribution, IntDistribution

    space = settings.space
    result: dict[str, Any] = {"lr": FloatDistribution(space.lr_low, space.lr_high, log=True)}
    if settings.optimizer == "svd-adam":
        result["k"] = IntDistribution(space.k_low, space.k_high)
    return result


def suggest(trial: Any, settings: StudySettings) -> TrainConfig:
    """Asks ``trial`` for this study's parameters and returns the config to train."""
    params: dict[str, Any] = {}
    for name, distribution in distributions(settings).items():
        if name == "lr":
            params[name] = trial.suggest_float(
                name, distribution.low, distribution.high, log=distribution.log
            )
        else:
            params[name] = trial.suggest_int(name, distribution.low, distribution.high)
    return config_from_params(settings, params)


def config_from_params(
    settings: StudySettings, params: dict[str, Any], **overrides: Any
) -> TrainConfig:
    """The training config of a trial with ``params``; ``overrides`` for retrains.

    The reporter overrides ``epochs``, ``seed`` and ``evaluate_test``; a
    retrain with no overrides reproduces the trial.
    """
    values: dict[str, Any] = {
        "optimizer": settings.optimizer,
        "lr": float(params["lr"]),
        "k": int(params["k"]) if settings.optimizer == "svd-adam" else None,
        "method": settings.method,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "dataset": settings.dataset,
        "model": settings.model,
        "train_subset": settings.train_subset,
    }
    values.update(overrides)
    return TrainConfig(**values)
