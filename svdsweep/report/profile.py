"""The rank profile, read from its studies: the best score at each rank, lr tuned per rank.

The sweep runs one study per rank of a grid (``<experiment>-profile-k<k>``,
SVD(Adam) with ``k`` fixed, ``lr`` tuned) and one of Adam with the same budget
(``<experiment>-profile-adam``), the full-rank reference: equal budgets, so
that no point is favoured by more trials. Each point is its study's best
early-stopped validation score; its energy is what that rank kept in the
least-kept layer during the best trial.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from svdsweep.database import retrying
from svdsweep.models import full_rank
from svdsweep.report.finals import best_trial
from svdsweep.report.results import Profile, ProfilePoint
from svdsweep.report.stats import profile_sentence
from svdsweep.score import NO_TRUNCATION, kept_energy
from svdsweep.storage import load_study
from svdsweep.studies import ExperimentError, load_settings, study_names

__all__ = ["read_profile", "sentence"]


def read_profile(storage: Any, experiment: str) -> Profile | None:
    """The experiment's rank profile; None when it has no profile studies."""
    points: list[ProfilePoint] = []
    adam: ProfilePoint | None = None
    budget = trials = 0
    training_s = 0.0
    model = None
    for name in study_names(storage, experiment):
        settings = load_settings(storage, experiment, name)
        if not settings.profile:
            continue
        model, budget = settings.model, settings.budget
        rank = None if settings.optimizer == "adam" else settings.space.k_low
        try:
            best = best_trial(storage, experiment, name, settings)
        except ExperimentError:  # every trial diverged, say: the point has no score
            best = None
        study = load_study(storage, name)
        all_trials = retrying(partial(study.get_trials, deepcopy=False))
        trials += sum(1 for t in all_trials if t.state.is_finished() and t.state.name != "FAIL")
        training_s += sum(float(t.user_attrs.get("duration_s") or 0.0) for t in all_trials)
        point = ProfilePoint(
            study=name,
            rank=rank,
            value=float(best.trial.value) if best and best.trial.value is not None else None,
            params=dict(best.trial.params) if best else {},
            best_epoch=best.trial.user_attrs.get("best_epoch") if best else None,
            kept_energy=_kept(best.trial.user_attrs.get("curves")) if best else None,
            trials=best.counts if best else {},
        )
        if rank is None:
            adam = point
        else:
            points.append(point)
    if adam is None or model is None:
        return None
    points.sort(key=lambda point: point.rank or 0)
    top = full_rank(model)
    for point in [adam, *points]:
        if point.rank is None or point.rank >= top:
            point.kept_energy = 1.0  # nothing is truncated: no layer was projected
    return Profile(
        full_rank=top,
        adam=adam,
        ranks=points,
        budget=budget,
        trials=trials,
        training_s=round(training_s, 1),
        sentence=sentence(adam, points, None),
    )


def sentence(adam: ProfilePoint, points: list[ProfilePoint], noise: float | None) -> str:
    """The profile's one-sentence reading, given the seed-to-seed noise of one run's score."""
    ranks = [(p.rank or 0, p.value, p.kept_energy) for p in points]
    return profile_sentence(adam.value, ranks, noise, NO_TRUNCATION)


def _kept(curves: dict[str, Any] | None) -> float | None:
    per_layer = (curves or {}).get("energy_per_layer")
    return kept_energy(per_layer) if per_layer else None
