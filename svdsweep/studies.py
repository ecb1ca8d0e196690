"""The experiment's Optuna studies: names, creation, resumption, status.

An *experiment* is a set of studies in one storage:

* tuning replicate 1: ``<experiment>-adam`` and ``<experiment>-svd-adam``;
* tuning replicate r >= 2: ``<experiment>-adam-r<r>`` and ``<experiment>-svd-adam-r<r>``,
  the same search again with other sampler draws (see :mod:`svdsweep.worker`);
* the rank profile: ``<experiment>-profile-adam`` and one
  ``<experiment>-profile-k<k>`` per rank of its grid (SVD(Adam), ``k`` fixed).

Each study stores its :class:`StudySettings` (search space, budget, training
settings, replicate, profile) as a user attribute, so that a worker started by
hand needs only the storage URL and the experiment name, and so that a study
cannot be resumed with another search space by mistake. Each also stores the
name of its objective; a study scored another way (the former last-epoch
validation loss) is refused, never mixed.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import optuna
from optuna.trial import TrialState

from svdsweep.database import has_optuna_schema, redact, resolve_storage_url, retrying
from svdsweep.errors import ConfigError
from svdsweep.score import OBJECTIVE_NAME
from svdsweep.space import SETTINGS_ATTR, StudySettings
from svdsweep.storage import load_study, open_storage, trial_counts
from svdsweep.train import OPTIMIZERS

__all__ = [
    "DEFAULT_EXPERIMENT",
    "OBJECTIVE_NAME",
    "ExperimentError",
    "StudyStatus",
    "check_resumable",
    "create_or_resume",
    "experiment_status",
    "list_experiments",
    "load_settings",
    "settings_study_name",
    "study_name",
    "study_names",
]

DEFAULT_EXPERIMENT = "fashion-mnist-mlp"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class ExperimentError(ConfigError):
    """A study is missing, or exists with other settings than requested."""


#: An experiment name: it names studies (Optuna keeps 512 characters) and
#: appears in lock names, commands and file names, so it is kept short and plain.
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

#: The study-name suffixes of one experiment (see the module docstring).
STUDY_SUFFIX = r"-(?:profile-(?:adam|k\d+)|(?:svd-adam|adam)(?:-r\d+)?)"
PROFILE_STUDY = re.compile(r".+-profile-(?:adam|k\d+)")


def _name_objective(study: optuna.Study) -> None:
    with warnings.catch_warnings():  # set_metric_names is "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([OBJECTIVE_NAME])


def study_name(experiment: str, optimizer: str) -> str:
    """``<experiment>-<optimizer>``; :class:`ExperimentError` for a name that cannot be one.

    Every command derives study names from the experiment before it reads or
    writes the storage, so a bad name is refused before anything is written.
    """
    if not EXPERIMENT_NAME.fullmatch(experiment):
        shown = experiment if len(experiment) <= 40 else experiment[:40] + "..."
        raise ExperimentError(
            f"bad experiment name {shown!r} ({len(experiment)} characters): use 1-100 "
            "letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return f"{experiment}-{optimizer}"


def settings_study_name(experiment: str, settings: StudySettings) -> str:
    """The name of the study with ``settings`` in ``experiment`` (see the module docstring)."""
    base = study_name(experiment, settings.optimizer)
    if settings.profile:
        if settings.optimizer == "adam":
            return f"{experiment}-profile-adam"
        return f"{experiment}-profile-k{settings.space.k_low}"
    return base if settings.replicate == 1 else f"{base}-r{settings.replicate}"


def study_names(storage: Any, experiment: str) -> list[str]:
    """The names of every study of ``experiment`` in ``storage``, sorted."""
    study_name(experiment, "adam")  # validates the experiment name
    pattern = re.compile(re.escape(experiment) + STUDY_SUFFIX)
    names = retrying(lambda: [s.study_name for s in storage.get_all_studies()])
    return sorted(name for name in names if pattern.fullmatch(name))


def check_objective(study: optuna.Study) -> None:
    """Refuses a study whose trials were scored by another objective than :data:`OBJECTIVE_NAME`."""
    stored = retrying(lambda: study.metric_names)
    if stored == [OBJECTIVE_NAME]:
        return
    (counts,) = retrying(partial(trial_counts, [study]))
    if any(counts.values()):
        raise ExperimentError(
            f"study {study.study_name!r} scored its trials by "
            f"{stored[0] if stored else 'an unnamed objective'!r}; this svdsweep scores "
            f"{OBJECTIVE_NAME!r}, so its trials cannot be mixed in or reported; "
            "use another --experiment name"
        )


def create_or_resume(storage_url: str, experiment: str, settings: list[StudySettings]) -> list[str]:
    """Creates the studies, or checks that existing ones searched the same space.

    A different budget is allowed (it extends or caps the sweep) and is
    stored; any other difference raises :class:`ExperimentError` naming it.
    Every study is checked before any is created or changed, so a refused
    sweep leaves the storage as it was. Returns the study names.
    """
    check_resumable(storage_url, experiment, settings)
    storage = open_storage(storage_url, heartbeat=False)
    names = []
    for study_settings in settings:
        name = settings_study_name(experiment, study_settings)
        study = retrying(
            partial(
                optuna.create_study,
                study_name=name,
                storage=storage,
                direction="minimize",
                load_if_exists=True,
            )
        )
        retrying(partial(study.set_user_attr, SETTINGS_ATTR, study_settings.to_json()))
        if study.metric_names != [OBJECTIVE_NAME]:  # what optuna-dashboard calls the value
            retrying(partial(_name_objective, study))
        names.append(name)
    return names


def check_resumable(
    storage_url: str, experiment: str, settings: list[StudySettings]
) -> dict[str, int]:
    """Raises :class:`ExperimentError` if an existing study differs from ``settings``.

    Reads only: it opens the storage without creating it, so that an unreachable
    database or a conflicting study is reported before anything is written.
    Returns the finished-trial count of each study that already exists, by name.
    """
    url = resolve_storage_url(storage_url)
    if not has_optuna_schema(url):
        return {}
    storage = open_storage(url, heartbeat=False, create=False)
    existing = retrying(lambda: {s.study_name: s for s in storage.get_all_studies()})
    finished: dict[str, int] = {}
    for study_settings in settings:
        name = settings_study_name(experiment, study_settings)
        if name not in existing:
            continue
        summary = existing[name]
        if summary.directions != [optuna.study.StudyDirection.MINIMIZE]:
            raise ExperimentError(
                f"study {name!r} already exists and does not minimise the validation loss; "
                "use another --experiment name"
            )
        study = load_study(storage, name)
        check_objective(study)
        (counts,) = retrying(partial(trial_counts, [study]))
        stored = summary.user_attrs.get(SETTINGS_ATTR)
        if stored is None and any(counts.values()):
            raise ExperimentError(
                f"study {name!r} already exists with trials but was not created by svdsweep; "
                "use another --experiment name"
            )
        # (An empty study without settings is one whose creation was interrupted.)
        if stored is not None:
            differences = study_settings.search_differences(StudySettings.from_json(stored))
            if differences:
                raise ExperimentError(
                    f"study {name!r} already exists with other settings ("
                    + "; ".join(differences)
                    + "); use another --experiment name or the stored settings"
                )
        finished[name] = sum(counts[state] for state in FINISHED)
    return finished


def load_settings(
    storage: Any, experiment: str, optimizer: str, *, objective_checked: bool = True
) -> StudySettings:
    """The stored settings of one study; :class:`ExperimentError` if it is missing.

    ``optimizer`` names replicate 1's study of that optimizer; a full study
    name (from :func:`study_names`) names any study of the experiment.
    ``objective_checked=False`` skips :func:`check_objective` (two more queries),
    for the status display, which polls and uses no trial's value.
    """
    name = (
        optimizer if optimizer.startswith(f"{experiment}-") else study_name(experiment, optimizer)
    )
    try:
        study = load_study(storage, name)
    except KeyError:
        raise ExperimentError(
            f"no study {name!r} in this storage; run `svdsweep sweep --experiment {experiment}` "
            "first, or check --storage / --experiment"
        ) from None
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        raise ExperimentError(f"study {name!r} was not created by svdsweep (no settings stored)")
    if objective_checked:
        check_objective(study)
    return StudySettings.from_json(stored)


@dataclass
class StudyStatus:
    """Trial counts per state, and the best so far, of one study."""

    name: str
    optimizer: str
    budget: int
    counts: dict[str, int]
    best_value: float | None
    best_params: dict[str, Any] | None
    best_trial: int | None

    @property
    def finished(self) -> int:
        return self.counts.get("COMPLETE", 0) + self.counts.get("PRUNED", 0)

    @property
    def done(self) -> bool:
        return self.finished >= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.name,
            "optimizer": self.optimizer,
            "budget": self.budget,
            "finished": self.finished,
            "counts": self.counts,
            "best_value": self.best_value,
            "best_params": self.best_params,
            "best_trial": self.best_trial,
        }


def list_experiments(storage: Any) -> list[str]:
    """Names of the experiments in ``storage``: those with an ``-adam`` or ``-svd-adam`` study."""
    names = retrying(lambda: [s.study_name for s in storage.get_all_studies()])
    suffixes = [f"-{optimizer}" for optimizer in sorted(OPTIMIZERS, key=len, reverse=True)]
    found = set()
    for name in names:
        if PROFILE_STUDY.fullmatch(name):  # "x-profile-adam" is x's profile, not "x-profile"
            continue
        for suffix in suffixes:  # longest first: "x-svd-adam" is x's, not "x-svd"'s
            if name.endswith(suffix) and EXPERIMENT_NAME.fullmatch(name[: -len(suffix)]):
                found.add(name[: -len(suffix)])
                break
    if not found:
        raise ExperimentError(
            f"no svdsweep experiments in {redact(storage.url)}"
            + (f"; studies there: {', '.join(sorted(names))}" if names else "")
        )
    return sorted(found)


def experiment_status(
    storage_url: str | None, experiment: str, *, storage: Any = None
) -> list[StudyStatus]:
    """Status of every study of the experiment; :class:`ExperimentError` when there is none.

    ``storage``: an already open storage for ``storage_url``, for callers that
    poll (the sweep driver, every second), so that each poll costs two queries
    per study rather than a new connection pool and every trial's attributes.
    Reads only: a PostgreSQL database without Optuna's schema is left without
    it (creating it would race with a sweep creating it at that moment).
    """
    if storage is None:
        url = resolve_storage_url(storage_url)
        if not url.startswith("sqlite") and not has_optuna_schema(url):
            raise ExperimentError(f"no studies of experiment {experiment!r} in {redact(url)}")
        storage = open_storage(url, heartbeat=False, create=False)
    names = study_names(storage, experiment)
    if not names:
        try:
            others = "; experiments there: " + ", ".join(list_experiments(storage))
        except ExperimentError:
            others = ""
        raise ExperimentError(
            f"no studies of experiment {experiment!r} in {redact(storage.url)}{others}"
        )
    return [_study_status(storage, experiment, name) for name in names]


def _study_status(storage: Any, experiment: str, name: str) -> StudyStatus:
    settings = load_settings(storage, experiment, name, objective_checked=False)
    study = load_study(storage, name)
    (counts,) = retrying(lambda: trial_counts([study]))
    best = None
    if counts[TrialState.COMPLETE]:
        best = retrying(lambda: study.best_trial)  # one ORDER BY value query
    return StudyStatus(
        name=name,
        optimizer=settings.optimizer,
        budget=settings.budget,
        counts={state.name: count for state, count in counts.items()},
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else None,
        best_trial=best.number if best else None,
    )
