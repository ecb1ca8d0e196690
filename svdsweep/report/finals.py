"""Best trials -> final configs -> final trainings on Ray.

* **Best trials.** The best COMPLETE trial (lowest finite early-stopped
  validation loss) of each tuning study, every replicate, and the study's
  stored :class:`~svdsweep.space.StudySettings`.
* **Final configs.** Each is rebuilt by :func:`svdsweep.space.config_from_params`,
  the code the sweep used, overriding only ``epochs``, ``seed`` and
  ``evaluate_test``: the data, subset, model, batch size and low-rank method
  are the trial's. Final-run seeds are ``FINAL_SEED_BASE + i`` (1000, 1001, ...):
  distinct from each other, shared by both optimizers, and apart from the
  sweep's training seed (0 by default), so no final run repeats a trial.
* **Final trainings.** Each replicate's two winners x ``seeds`` seeds (the
  same seeds for every replicate, so that replicates differ only in what
  their tuning picked), as Ray tasks in
  parallel (``num_cpus=1``, ``num_gpus=--gpus-per-run``; device ``auto``
  inside a task is the GPU Ray assigned, else the CPU).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from svdsweep import cluster
from svdsweep.database import retrying
from svdsweep.progress import count_progress, say
from svdsweep.report.results import (
    BestTrialRecord,
    ClusterNode,
    Driver,
    FinalRun,
    Hardware,
    StudyRecord,
    cpu_model,
)
from svdsweep.report.staging import ReportError
from svdsweep.score import early_stopped
from svdsweep.space import StudySettings, config_from_params
from svdsweep.storage import load_study
from svdsweep.studies import ExperimentError, load_settings, study_names
from svdsweep.train import OPTIMIZERS, TrainConfig, TrainingDiverged, TrainResult

__all__ = [
    "FINAL_SEED_BASE",
    "BestTrial",
    "FinalJob",
    "best_trials",
    "final_configs",
    "final_training",
    "run_final_trainings",
]

#: Seed of final run i (both optimizers): FINAL_SEED_BASE + i.
FINAL_SEED_BASE = 1000


@dataclass
class BestTrial:
    """A study's best trial, its settings and its trial counts."""

    optimizer: str
    study: optuna.Study
    settings: StudySettings
    trial: FrozenTrial
    counts: dict[str, int]  # trials per state, plus "diverged" (COMPLETE with value +inf)

    def record(self) -> StudyRecord:
        attrs = self.trial.user_attrs
        return StudyRecord(
            study=self.study.study_name,
            settings=self.settings,
            budget=self.settings.budget,
            trials=self.counts,
            best=BestTrialRecord(
                number=self.trial.number,
                value=self.trial.value,
                params=dict(self.trial.params),
                curves=attrs.get("curves"),
                device=attrs.get("device"),
                duration_s=attrs.get("duration_s"),
                worker_node_ip=attrs.get("worker_node_ip"),
                best_epoch=attrs.get("best_epoch"),
            ),
        )


def best_trials(storage: Any, experiment: str) -> dict[int, dict[str, BestTrial]]:
    """The best COMPLETE trial of every tuning study, by replicate and optimizer.

    :class:`ExperimentError` if a study is missing, has no finite trial, or a
    replicate lacks one of its two studies.
    """
    found: dict[int, dict[str, BestTrial]] = {}
    names = study_names(storage, experiment) or [f"{experiment}-{o}" for o in OPTIMIZERS]
    for name in names:
        settings = load_settings(storage, experiment, name)  # missing study -> error
        if settings.profile:
            continue
        found.setdefault(settings.replicate, {})[settings.optimizer] = best_trial(
            storage, experiment, name, settings
        )
    for replicate, pair in found.items():
        for optimizer in OPTIMIZERS:
            if optimizer not in pair:
                load_settings(storage, experiment, f"{experiment}-{optimizer}")
                raise ExperimentError(
                    f"replicate {replicate} of experiment {experiment!r} has no {optimizer} "
                    "study; run `svdsweep sweep` with the same --replicates to create it"
                )
    return dict(sorted(found.items()))


def best_trial(storage: Any, experiment: str, name: str, settings: StudySettings) -> BestTrial:
    """The study's best finite COMPLETE trial, with its trial counts."""
    study = load_study(storage, name)
    trials = retrying(lambda: study.get_trials(deepcopy=False))
    counts = {state.name: 0 for state in TrialState}
    for trial in trials:
        counts[trial.state.name] += 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    counts["diverged"] = sum(1 for t in complete if not math.isfinite(float(t.value or 0.0)))
    finite = [t for t in complete if math.isfinite(float(t.value or 0.0))]
    if not finite:
        raise ExperimentError(
            f"study {name!r} has no completed trial"
            + (" with a finite validation loss (every one diverged)" if complete else "")
            + f" ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}"
            + ("" if trials else "no trials")
            + f"); run `svdsweep sweep --experiment {experiment}` until it has one"
        )
    best = min(finite, key=lambda t: (float(t.value or 0.0), t.number))
    return BestTrial(settings.optimizer, study, settings, best, counts)


@dataclass(frozen=True)
class FinalJob:
    """One final training: a replicate's winner, retrained with one seed."""

    replicate: int
    config: TrainConfig


def final_configs(
    best: dict[int, dict[str, BestTrial]], epochs: int | None, seeds: int
) -> list[FinalJob]:
    """Every replicate's two winners x ``seeds`` seeds, interleaved so that all progress together.

    ``epochs`` None: the trials' own horizon, so that the finals measure what
    the sweep tuned.
    """
    return [
        FinalJob(
            replicate,
            config_from_params(
                pair[optimizer].settings,
                pair[optimizer].trial.params,
                epochs=epochs or pair[optimizer].settings.epochs,
                seed=FINAL_SEED_BASE + index,
                evaluate_test=True,
            ),
        )
        for index in range(seeds)
        for replicate, pair in best.items()
        for optimizer in OPTIMIZERS
    ]


def final_training(config: TrainConfig, replicate: int = 1) -> FinalRun:
    """One final training, run as a Ray task: the trainer's result plus where it ran.

    A diverged run is a result, not an error: its curves so far are kept and
    ``diverged`` says why. The dataset is loaded once per worker process.
    """
    import torch

    from svdsweep.data import cached_splits
    from svdsweep.train import resolve_device, train

    task_started_at = time.time()
    device = resolve_device(config.device)
    splits = cached_splits(
        config.dataset,
        data_dir=config.data_dir,
        device=device,
        train_subset=config.train_subset,
    )
    curves: dict[str, list[float]] = {}

    def record(epoch: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            curves.setdefault(name, []).append(value)

    diverged = None
    try:
        result = train(config, record, splits=splits)
    except TrainingDiverged as error:
        diverged = str(error)
        result = TrainResult(
            config=config.to_dict(),
            device=str(device),
            train_loss=curves.get("train_loss", []),
            val_loss=curves.get("val_loss", []),
            val_acc=curves.get("val_acc", []),
            energy=curves.get("energy", []),
            best_epoch=early_stopped(curves.get("val_loss", [])).epoch,
            started_at=task_started_at,
            finished_at=time.time(),
        )
    trained = asdict(result)
    trained["config"] = config
    return FinalRun(
        **trained,
        optimizer=config.optimizer,
        seed=config.seed,
        replicate=replicate,
        diverged=diverged,
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()),
        torch_threads=torch.get_num_threads(),
        pid=os.getpid(),
        node_ip=cluster.node_ip(),
        gpu_ids=cluster.gpu_ids(),
        cpu_count=os.cpu_count(),
        task_started_at=task_started_at,
        task_finished_at=time.time(),
    )


def run_final_trainings(
    ray: Any, jobs: list[FinalJob], gpus_per_run: float | None, *, progress: bool = True
) -> tuple[list[FinalRun], Hardware]:
    """Runs every config as a Ray task at once; returns the runs (in order) and where they ran."""
    resources = ray.cluster_resources()
    cluster_gpus = float(resources.get("GPU", 0))
    gpus = gpus_per_run if gpus_per_run is not None else (1.0 if cluster_gpus > 0 else 0.0)
    if gpus > cluster_gpus:
        raise ReportError(
            f"--gpus-per-run {gpus:g} but the Ray cluster has {cluster_gpus:g} GPUs; "
            "use --gpus-per-run 0"
        )
    task = ray.remote(final_training).options(
        num_gpus=gpus, num_cpus=1, name="svdsweep-final-training"
    )
    started = time.time()
    refs = {task.remote(job.config, job.replicate): job.config for job in jobs}
    say(
        f"{len(jobs)} final trainings ({gpus:g} GPU, 1 CPU each) on a Ray cluster with "
        f"{resources.get('CPU', 0):g} CPUs and {cluster_gpus:g} GPUs",
        progress,
    )
    runs: list[FinalRun] = []
    pending = list(refs)
    try:
        with count_progress("final trainings", len(jobs), progress) as advance:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    runs.append(_result_of(ray, ref, refs[ref]))
                    advance(run_line(runs[-1]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    wall_s = round(time.time() - started, 3)
    order = {(j.replicate, j.config.optimizer, j.config.seed): i for i, j in enumerate(jobs)}
    runs.sort(key=lambda run: order[(run.replicate, run.optimizer, run.seed)])
    hardware = Hardware(
        driver=Driver.here(),
        run_devices=sorted({f"{run.device} ({run.device_name})" for run in runs}),
        run_nodes=sorted({f"{run.host} ({run.node_ip})" for run in runs}),
        gpus_per_run=gpus,
        cpus_per_run=1,
        cluster_resources={k: v for k, v in resources.items() if k in ("CPU", "GPU")},
        nodes=[
            ClusterNode(
                node_ip=node.get("NodeManagerAddress"),
                host=node.get("NodeManagerHostname"),
                resources={
                    k: v for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")
                },
            )
            for node in ray.nodes()
            if node.get("Alive")
        ],
        wall_s=wall_s,
    )
    return runs, hardware


def _result_of(ray: Any, ref: Any, config: TrainConfig) -> FinalRun:
    try:
        run: FinalRun = ray.get(ref)
    except Exception as error:  # noqa: BLE001 - any task failure ends the report
        cause = getattr(error, "cause", None) or error
        raise ReportError(
            f"the final training of {config.optimizer} with seed {config.seed} "
            f"failed: {type(cause).__name__}: {cause}"
        ) from None
    return run


def run_line(run: FinalRun) -> str:
    """One finished run, as the progress log shows it."""
    where = f"{run.device} on {run.node_ip or run.host}"
    if run.diverged:
        return (
            f"replicate {run.replicate} {run.optimizer} seed {run.seed}: "
            f"diverged ({run.diverged}); {where}"
        )
    return (
        f"replicate {run.replicate} {run.optimizer} seed {run.seed}: best val loss "
        f"{run.best_val_loss:.4f} at epoch {run.best_epoch}, early-stopped test loss "
        f"{run.test_loss:.4f}, test acc {run.test_acc:.2%} "
        f"({run.task_finished_at - run.task_started_at:.1f} s, {where})"
    )
