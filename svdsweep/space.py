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
from dataclasses import asdict, dataclass, fields, replace
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

#: "successive-halving" (the default) stops a trial at epoch rungs where it is not in the
#: best third of the trials that reached that rung; "median" is Optuna's median rule.
PRUNERS = ("none", "median", "successive-halving")

#: Study user attribute holding the JSON of :class:`StudySettings`.
SETTINGS_ATTR = "svdsweep_settings"


@dataclass(frozen=True)
class SearchSpace:
    """Ranges searched, as in the original experiment's parameter names.

    ``lr`` is log-uniform: good Adam learning rates for this MLP span two
    decades (1e-4 .. 1e-2) and a log scale spends trials evenly across them.
    ``k`` is log-uniform from 1 to the model's full rank (``k_high=None``;
    256 for the MLP, see :func:`svdsweep.models.full_rank`): at full rank
    SVD(Adam) is plain Adam, so "no truncation" is a result the study can
    find rather than a wall it hits (the former range 1..64 was hit), and the
    log scale gives ranks 1-16, where truncation bites, as many trials as 16-256.
    ``k_low == k_high`` fixes ``k`` (the rank profile's studies tune only ``lr``).
    """

    lr_low: float = 1e-4
    lr_high: float = 1e-1
    k_low: int = 1
    k_high: int | None = None  # None: the model's full rank

    def __post_init__(self) -> None:
        if not (0 < self.lr_low < self.lr_high and math.isfinite(self.lr_high)):
            raise ConfigError(
                f"lr range must satisfy 0 < low < high, got {self.lr_low:g}..{self.lr_high:g}"
            )
        if not (1 <= self.k_low <= (self.k_high if self.k_high is not None else self.k_low)):
            raise ConfigError(
                f"k range must satisfy 1 <= low <= high, got {self.k_low}..{self.k_high}"
            )

    @property
    def k_fixed(self) -> bool:
        return self.k_low == self.k_high


#: Largest trial budget per study. TPE fits its densities to every earlier trial
#: at each proposal, and the sweep's status polls count them all: 10,000 trials
#: already take days of proposals and orders of magnitude beyond any budget used.
MAX_BUDGET = 10_000
#: Most tuning replicates per optimizer (AlgoPerf uses 5 studies per workload).
MAX_REPLICATES = 20


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
    #: per trial: the finals' horizon (20 epochs), so the sweep tunes what the verdict measures
    epochs: int = 20
    dataset: str = TrainConfig.dataset
    model: str = TrainConfig.model
    method: str = TrainConfig.method
    batch_size: int = TrainConfig.batch_size
    train_subset: int | None = TrainConfig.train_subset
    seed: int = TrainConfig.seed  # of every trial: trials differ only in their parameters
    #: on the per-epoch early-stopped score (svdsweep.score); see PRUNERS
    pruner: str = "successive-halving"
    #: tuning replicate (1..R): an independent study of the same space, its own sampler draws
    replicate: int = 1
    #: a study of the rank profile (k fixed by ``space``), not a tuning replicate
    profile: bool = False

    def __post_init__(self) -> None:
        if self.space.k_high is None:  # the model's full rank, resolved once and stored
            from svdsweep.models import MODELS, full_rank

            if self.model in MODELS:
                object.__setattr__(self, "space", replace(self.space, k_high=full_rank(self.model)))
        if (
            isinstance(self.replicate, bool)
            or not isinstance(self.replicate, int)
            or not (1 <= self.replicate <= MAX_REPLICATES)
        ):
            raise ConfigError(
                f"replicate must be an int in 1..{MAX_REPLICATES}, got {self.replicate!r}"
            )
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
        if self.optimizer == "svd-adam" and self.space.k_high is not None:
            from svdsweep.models import full_rank

            top = full_rank(self.model)
            if self.space.k_high > top:
                raise ConfigError(
                    f"k range ends at {self.space.k_high}, above the {self.model}'s full rank "
                    f"{top}: every k >= {top} is plain Adam; end the range at {top} at most"
                )

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
    if settings.optimizer == "svd-adam" and not space.k_fixed:
        result["k"] = IntDistribution(space.k_low, space.k_high, log=True)
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
            params[name] = trial.suggest_int(
                name, distribution.low, distribution.high, log=distribution.log
            )
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
        "k": int(params.get("k", settings.space.k_low))
        if settings.optimizer == "svd-adam"
        else None,
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
