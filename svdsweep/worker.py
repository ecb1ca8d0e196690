"""The worker loop: claim a trial slot, train, tell, repeat until every budget is met.

This is the unit Ray runs (one per GPU), and what ``svdsweep worker`` runs by
hand against the same storage. Workers *pull*: each claims its next trial from
whichever study of the experiment (both optimizers, every tuning replicate,
the rank profile) has the most room left, so all studies progress together,
and Optuna's storage is the single source of truth for what has been done.

A trial's value is :func:`svdsweep.score.early_stopped`'s score of its
validation curve; the pruner sees that score epoch by epoch (the best so far),
so it stops a trial by the same measure the study minimises.

Exact budgets: a slot is claimed under :func:`~svdsweep.storage.budget_lock` by
counting COMPLETE + PRUNED + RUNNING trials and asking only while that count is
below the budget. A trial that FAILs (its worker was killed, or the run
crashed) frees its slot, and the retry callback re-queues its parameters.
Workers whose own studies are full keep polling while other workers' trials
are RUNNING, so that the slot of a trial killed at the very end is still
refilled, and the sweep ends with exactly the budget and nothing RUNNING.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import optuna
from optuna.trial import TrialState

from svdsweep import cluster
from svdsweep.database import budget_lock, retrying
from svdsweep.errors import UserError
from svdsweep.score import early_stopped
from svdsweep.space import StudySettings, suggest
from svdsweep.storage import (
    Heartbeat,
    StaleTrialReaper,
    ask,
    load_study,
    open_storage,
    set_user_attrs,
    trial_counts,
    trial_id,
)
from svdsweep.studies import ExperimentError, load_settings, study_names
from svdsweep.train import ReportCallback, TrainConfig, TrainingDiverged, TrainResult

__all__ = [
    "Objective",
    "WorkerError",
    "WorkerSummary",
    "pruner_for",
    "run_worker",
    "training_objective",
    "trial_sampler",
]

log = logging.getLogger(__name__)

#: ``objective(config, report) -> TrainResult``: the trainer, or a cheap
#: stand-in in orchestration tests.
Objective = Callable[[TrainConfig, ReportCallback], TrainResult]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_REAPED_WHILE_RUNNING = (
    "trial %d of %s was failed as stale while it ran (no heartbeat reached the database "
    "for longer than the grace period); its parameters are queued again"
)
CLAIMED = (*FINISHED, TrialState.RUNNING)


class WorkerError(UserError, RuntimeError):
    """The worker stopped because its trials keep failing (a bug, not bad luck)."""


@dataclass
class WorkerSummary:
    worker_id: int
    host: str
    node_ip: str | None
    gpu_ids: list[str]
    trials: list[tuple[str, int, str]] = field(default_factory=list)  # (study, number, state)


def training_objective() -> Objective:
    """The real objective: :func:`svdsweep.train.train`, loading each dataset once per worker."""
    from svdsweep.data import cached_splits
    from svdsweep.train import resolve_device, train

    def objective(config: TrainConfig, report: ReportCallback) -> TrainResult:
        splits = cached_splits(
            config.dataset,
            data_dir=config.data_dir,
            device=resolve_device(config.device),
            train_subset=config.train_subset,
        )
        return train(config, report, splits=splits)

    return objective


def run_worker(
    storage_url: str | None,
    experiment: str,
    *,
    worker_id: int = 0,
    seed: int = 0,
    objective: Objective | None = None,
    sweep_id: str | None = None,
    poll_seconds: float = 1.0,
    max_consecutive_failures: int = 3,
    max_trials: int | None = None,
) -> WorkerSummary:
    """Runs trials of ``experiment`` until every one of its studies has its budget.

    ``seed`` and the number of the trial being claimed seed the sampler of each
    new trial (see :func:`trial_sampler`). ``max_trials`` stops after that many
    trials (for tests and manual runs).
    """
    objective = objective or training_objective()
    # A worker only joins studies that `svdsweep sweep` created: it never creates a storage.
    storage = open_storage(storage_url, create=False)
    url = storage.url
    studies: dict[str, tuple[optuna.Study, StudySettings]] = {}
    for name in study_names(storage, experiment):
        settings = load_settings(storage, experiment, name)
        study = load_study(
            storage,
            name,
            sampler=trial_sampler(seed, name, 0),  # replaced at each claim
            pruner=pruner_for(settings),
        )
        studies[name] = (study, settings)
    if not studies:
        load_settings(storage, experiment, "adam")  # the missing-study error, with its advice
        raise ExperimentError(f"no studies of experiment {experiment!r}")

    summary = WorkerSummary(worker_id, socket.gethostname(), cluster.node_ip(), cluster.gpu_ids())
    reaper = StaleTrialReaper()
    failures = 0
    while max_trials is None or len(summary.trials) < max_trials:
        claim = retrying(lambda: _claim(url, experiment, studies, seed))
        if claim is None:
            counts = retrying(lambda: trial_counts([study for study, _ in studies.values()]))
            if all(
                sum(count[state] for state in FINISHED) >= settings.budget
                for (_, settings), count in zip(studies.values(), counts, strict=True)
            ):
                break
            # Every slot is taken, but a RUNNING trial may belong to a dead
            # worker: reap it (Optuna would only do so inside optimize()), so
            # that its slot is refilled even when it was the last one.
            retrying(partial(reaper.reap, [study for study, _ in studies.values()]))
            time.sleep(poll_seconds)
            continue
        study, settings, trial = claim
        state = _run_trial(study, settings, trial, storage, objective, summary, sweep_id)
        summary.trials.append((study.study_name, trial.number, state.name))
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures >= max_consecutive_failures:
            raise WorkerError(
                f"worker {worker_id}: {failures} trials failed in a row; last error: "
                f"{study.trials[trial.number].user_attrs.get('error', '?')}"
            )
    return summary


def _claim(
    url: str,
    experiment: str,
    studies: dict[str, tuple[optuna.Study, StudySettings]],
    seed: int,
) -> tuple[optuna.Study, StudySettings, optuna.Trial] | None:
    """Atomically asks for a trial in the study with the most room, if any has room.

    The new trial's number is the study's trial count, read under the lock
    that serialises every claim, so it seeds the trial's sampler uniquely.
    """
    with budget_lock(url, experiment):
        room = []
        counts = trial_counts([study for study, _ in studies.values()])
        for (name, (study, settings)), count in zip(studies.items(), counts, strict=True):
            claimed = sum(count[state] for state in CLAIMED)
            if claimed < settings.budget:
                room.append((claimed / settings.budget, name, study, settings, count))
        if not room:
            return None
        _, name, study, settings, count = min(room, key=lambda entry: entry[:2])
        study.sampler = trial_sampler(seed, name, sum(count.values()))
        return study, settings, ask(study)


def _run_trial(
    study: optuna.Study,
    settings: StudySettings,
    trial: optuna.Trial,
    storage: Any,
    objective: Objective,
    summary: WorkerSummary,
    sweep_id: str | None,
) -> TrialState:
    from svdsweep import __version__

    started = time.time()
    with Heartbeat(storage, trial_id(trial)):
        # Who runs the trial is written first, so that a RUNNING trial can be
        # traced to its worker (and Ctrl-C fails only this sweep's trials).
        identity: dict[str, Any] = {
            "worker_host": summary.host,
            "worker_node_ip": summary.node_ip,
            "worker_id": summary.worker_id,
            "worker_pid": os.getpid(),
            "gpu_ids": summary.gpu_ids,
            "svdsweep_version": __version__,
            "sweep_id": sweep_id,
        }
        attrs: dict[str, Any] = {}
        curves: dict[str, list[float]] = {}

        def report(epoch: int, metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                curves.setdefault(name, []).append(value)
            score = early_stopped(curves["val_loss"]).value  # the objective, so far
            retrying(lambda: trial.report(score, epoch))
            # A trial that has trained its whole horizon is complete, never pruned.
            if (
                settings.pruner != "none"
                and epoch < settings.epochs
                and retrying(trial.should_prune)
            ):
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        value: float | None = None
        try:
            set_user_attrs(storage, trial_id(trial), identity)
            config = retrying(partial(suggest, trial, settings))
            result = objective(config, report)
            attrs.update(
                device=result.device,
                curves=_curves(result),
                epoch_seconds=result.epoch_seconds,
                started_at=result.started_at,
                finished_at=result.finished_at,
            )
            best = early_stopped(result.val_loss)
            attrs["best_epoch"] = best.epoch
            value, state = best.value, TrialState.COMPLETE
        except optuna.TrialPruned:
            attrs["curves"], state = curves, TrialState.PRUNED
        except TrainingDiverged as error:
            # A learning rate so high that training blows up is a legitimate,
            # terrible result: it counts toward the budget with value +inf.
            attrs.update(curves=curves, diverged=str(error))
            value, state = float("inf"), TrialState.COMPLETE
        except optuna.exceptions.UpdateFinishedTrialError:
            # Reaped as stale while it ran (its worker could not reach the
            # database for longer than the grace period): already FAIL, its
            # slot freed and its parameters re-queued. Nothing more to write.
            log.warning(_REAPED_WHILE_RUNNING, trial.number, study.study_name)
            return TrialState.FAIL
        except BaseException as error:
            attrs.update(curves=curves, error=f"{type(error).__name__}: {error}"[:2000])
            _finish(study, trial, storage, attrs, started, None, TrialState.FAIL)
            if not isinstance(error, Exception):
                raise  # KeyboardInterrupt, SystemExit: the trial is FAIL, not RUNNING
            log.exception("trial %d of %s failed", trial.number, study.study_name)
            return TrialState.FAIL
        return _finish(study, trial, storage, attrs, started, value, state)


def _finish(
    study: optuna.Study,
    trial: optuna.Trial,
    storage: Any,
    attrs: dict[str, Any],
    started: float,
    value: float | None,
    state: TrialState,
) -> TrialState:
    """Writes the trial's attributes and tells its result; returns its final state."""
    attrs["duration_s"] = round(time.time() - started, 3)
    try:
        set_user_attrs(storage, trial_id(trial), attrs)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Reaped as stale while it ran (heartbeats lost longer than the grace
        # period): its slot was already freed and its parameters re-queued.
        log.warning(_REAPED_WHILE_RUNNING, trial.number, study.study_name)
        return TrialState.FAIL
    told = retrying(
        lambda: study.tell(
            trial, value if state == TrialState.COMPLETE else None, state, skip_if_finished=True
        )
    )
    return told.state  # FAIL if it was reaped between the attributes and the tell


def _curves(result: TrainResult) -> dict[str, Any]:
    curves: dict[str, Any] = {
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_acc": result.val_acc,
    }
    if result.energy:
        curves["energy"] = result.energy
        curves["energy_per_layer"] = result.energy_per_layer
    return curves


def pruner_for(settings: StudySettings) -> optuna.pruners.BasePruner:
    """The study's pruner, on the per-epoch early-stopped score.

    Successive halving (Optuna's asynchronous variant) checks a trial at rungs
    of ``r, 3r, 9r, ...`` epochs, ``r = max(1, epochs // 10)`` (2, 6 and 18 for
    20 epochs) and continues it only while it is in the best third of the
    trials that reached that rung: about 5 epochs per trial on average instead
    of 20, the cost of the former 5-epoch trials. A pruned trial counts toward the budget as
    finished, so budgets stay exact; its score is never the study's best.
    """
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if settings.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, settings.epochs // 10), reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def trial_sampler(seed: int, study: str, trial_number: int) -> optuna.samplers.BaseSampler:
    """The TPE sampler that proposes trial ``trial_number`` of the study named ``study``.

    Seeded by the trial's number, not by the process: a seed per process made a
    restarted worker, a resumed sweep and a second driver on the same experiment
    replay the same random draws, and so evaluate the same configurations
    again. A number belongs to one trial only, so no two trials share draws,
    while a sweep with one worker stays reproducible from ``seed``.
    ``constant_liar`` keeps parallel workers from piling onto one region.
    Keyed by the study's name, so tuning replicates draw independently.
    """
    key = f"{seed}:{study}:{trial_number}".encode()
    return optuna.samplers.TPESampler(seed=zlib.crc32(key), constant_liar=True)
