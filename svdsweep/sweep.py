"""The sweep driver: create or resume every study, start Ray workers, watch them finish.

Ray is the distributed engine: the driver connects to an existing cluster
(``--ray-address`` / ``RAY_ADDRESS``) or starts a local, loopback-only one, and
launches one :func:`svdsweep.worker.run_worker` task per worker with
``num_gpus=--gpus-per-worker``. Code inside a task uses whatever GPU Ray
assigned it (``"cuda"`` under Ray's ``CUDA_VISIBLE_DEVICES``), or the CPU.
The driver itself trains nothing: it shows progress, reaps the trials of dead
workers, and on Ctrl-C stops the workers and marks their trials FAIL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NoReturn

import optuna
from optuna.trial import TrialState

from svdsweep.cluster import ClusterError, ray_session
from svdsweep.database import is_transient, ping, reason, redact, resolve_storage_url, retrying
from svdsweep.errors import ConfigError, UserError
from svdsweep.progress import say
from svdsweep.space import MAX_REPLICATES, SearchSpace, StudySettings
from svdsweep.storage import StaleTrialReaper, load_study, open_storage, trial_id
from svdsweep.studies import (
    DEFAULT_EXPERIMENT,
    StudyStatus,
    check_resumable,
    create_or_resume,
    experiment_status,
    settings_study_name,
    study_names,
)
from svdsweep.train import MAX_SEED, OPTIMIZERS
from svdsweep.worker import Objective, run_worker

__all__ = ["SweepError", "SweepInterrupted", "SweepSpec", "run_sweep", "status_table"]

log = logging.getLogger(__name__)


class SweepError(UserError, RuntimeError):
    """A worker failed for good, or the cluster lacks what the sweep asks of it."""


@dataclass(frozen=True)
class SweepSpec:
    """Everything ``svdsweep sweep`` is given; the CLI's defaults are these.

    Settings flow one way: this spec derives every study's :class:`StudySettings`
    (:meth:`study_settings`), which derive each trial's ``TrainConfig``. A
    training default is written once, in ``TrainConfig``, and read from there.
    """

    storage: str | None = None  # URL; None: $SVDSWEEP_STORAGE, else sqlite:///svdsweep.db
    experiment: str = DEFAULT_EXPERIMENT
    trials: int = StudySettings.budget  # finished trials per study
    workers: int | None = None  # None: one per GPU, else one per cpus_per_worker CPUs
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0  # a trial trains on one thread (torch on 1 CPU)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else start a local Ray
    ray_node_ip: str | None = None  # None: see svdsweep.cluster.ray_session
    trial_epochs: int = StudySettings.epochs
    dataset: str = StudySettings.dataset
    model: str = StudySettings.model
    method: str = StudySettings.method  # low-rank method of svd-adam
    train_subset: int | None = StudySettings.train_subset
    seed: int = StudySettings.seed  # training seed of every trial; seeds the samplers
    pruner: str = StudySettings.pruner
    space: SearchSpace = field(default_factory=SearchSpace)
    #: independent tuning replicates per optimizer (the paper preset runs 3; AlgoPerf 5)
    replicates: int = 1
    #: finished trials per rank-profile study: one study per rank of ``profile_ranks``
    #: (k fixed, lr tuned) and Adam's; 0 (the default here): no profile. The paper preset: 10.
    profile_trials: int = 0
    #: ranks of the profile; () is powers of two up to the model's full rank, and full rank
    profile_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and not 0 <= self.gpus_per_worker < float("inf"):
            raise ConfigError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker:g}")
        if not 0 < self.cpus_per_worker < float("inf"):
            raise ConfigError(f"--cpus-per-worker must be positive, got {self.cpus_per_worker:g}")
        if isinstance(self.replicates, bool) or not 1 <= self.replicates <= MAX_REPLICATES:
            raise ConfigError(f"--replicates must be in 1..{MAX_REPLICATES}, got {self.replicates}")
        if isinstance(self.profile_trials, bool) or self.profile_trials < 0:
            raise ConfigError(
                f"--profile-trials must be 0 (no rank profile) or more, got {self.profile_trials}"
            )
        self.study_settings()  # validates --trials, --trial-epochs, dataset, model, method, ...

    def study_settings(self) -> list[StudySettings]:
        """Every study's settings: identical but for the optimizer, replicate and profile rank.

        Replicate r trains its trials with seed ``seed + r - 1``, and its
        samplers draw by study name (:func:`svdsweep.worker.trial_sampler`),
        so replicates are independent draws of the whole tuning process.
        """
        common = {
            "epochs": self.trial_epochs,
            "dataset": self.dataset,
            "model": self.model,
            "method": self.method,
            "train_subset": self.train_subset,
            "pruner": self.pruner,
        }
        tuning = [
            StudySettings(
                optimizer=optimizer,
                space=self.space,
                budget=self.trials,
                seed=(self.seed + replicate - 1) % (MAX_SEED + 1),
                replicate=replicate,
                **common,
            )
            for replicate in range(1, self.replicates + 1)
            for optimizer in OPTIMIZERS
        ]
        if self.profile_trials == 0:
            return tuning
        profile = [
            StudySettings(
                optimizer="adam",
                space=self.space,
                budget=self.profile_trials,
                seed=self.seed,
                profile=True,
                **common,
            )
        ]
        for rank in self.ranks():
            fixed = replace(self.space, k_low=rank, k_high=rank)
            profile.append(
                StudySettings(
                    optimizer="svd-adam",
                    space=fixed,
                    budget=self.profile_trials,
                    seed=self.seed,
                    profile=True,
                    **common,
                )
            )
        return tuning + profile

    def ranks(self) -> list[int]:
        """The rank profile's grid: 1, 2, 4, ... and the model's full rank (256 for the MLP)."""
        from svdsweep.models import full_rank

        top = full_rank(self.model)
        if self.profile_ranks:
            bad = [rank for rank in self.profile_ranks if not 1 <= rank <= top]
            if bad:
                raise ConfigError(f"--profile-ranks must lie in 1..{top} (full rank), got {bad}")
            return sorted(set(self.profile_ranks))
        grid = [2**i for i in range(top.bit_length()) if 2**i < top]
        return [*grid, top]


def run_sweep(
    spec: SweepSpec, *, objective: Objective | None = None, progress: bool = True
) -> list[StudyStatus]:
    """Runs the sweep to completion and returns the final status of every study."""
    url = resolve_storage_url(spec.storage)
    # Read-only checks first: a refused sweep writes nothing and starts no Ray.
    finished = check_resumable(url, spec.experiment, spec.study_settings())
    settings = spec.study_settings()
    names = [settings_study_name(spec.experiment, study) for study in settings]
    if all(
        finished.get(name, 0) >= study.budget for name, study in zip(names, settings, strict=True)
    ):
        create_or_resume(url, spec.experiment, spec.study_settings())  # records the budget
        say(f"storage {redact(url)}; studies: {', '.join(names)}", progress)
        say("every study already has its budget: nothing to run", progress)
        return experiment_status(url, spec.experiment)

    with ray_session(spec.ray_address, spec.ray_node_ip) as ray:
        resources = ray.cluster_resources()
        gpus = spec.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        if gpus > resources.get("GPU", 0):
            raise ClusterError(
                f"--gpus-per-worker {gpus:g} asks for more GPUs than the Ray cluster has "
                f"({resources.get('GPU', 0):g}); use --gpus-per-worker 0 to train on CPUs"
            )
        if spec.cpus_per_worker > resources.get("CPU", 0):
            raise ClusterError(
                f"--cpus-per-worker {spec.cpus_per_worker:g} asks for more CPUs than the Ray "
                f"cluster has ({resources.get('CPU', 0):g})"
            )
        workers = spec.workers or _default_workers(resources, gpus, spec)
        create_or_resume(url, spec.experiment, spec.study_settings())
        say(f"storage {redact(url)}; {len(names)} studies: {', '.join(names)}", progress)
        sweep_id = uuid.uuid4().hex[:12]
        say(
            f"{workers} Ray workers ({gpus:g} GPU, {spec.cpus_per_worker:g} CPU each), "
            f"{spec.trials} trials per tuning study"
            + (f", {spec.profile_trials} per profile study" if spec.profile_trials else "")
            + f", sweep id {sweep_id}",
            progress,
        )
        task = ray.remote(run_worker).options(
            num_gpus=gpus,
            num_cpus=spec.cpus_per_worker,
            # A retried worker just claims new slots: no trial is counted twice.
            max_retries=2,
            retry_exceptions=False,
            name="svdsweep-worker",
        )
        refs = [
            task.remote(
                url,
                spec.experiment,
                worker_id=worker_id,
                seed=spec.seed,
                objective=objective,
                sweep_id=sweep_id,
            )
            for worker_id in range(workers)
        ]
        try:
            _watch(ray, refs, url, spec.experiment, progress)
        except KeyboardInterrupt:
            _interrupt(ray, refs, url, spec.experiment, sweep_id, progress)
    return experiment_status(url, spec.experiment)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the sweep; the message says what became of its trials."""


def _interrupt(
    ray: Any, refs: list[Any], url: str, experiment: str, sweep_id: str, progress: bool
) -> NoReturn:
    """Stops the workers and fails this sweep's RUNNING trials, or says who will.

    With the database down, waiting for it (two minutes of retries) would
    leave a user's Ctrl-C unanswered: the workers are stopped at once instead,
    and the trials they leave RUNNING stop beating, so that the next sweep or
    worker on this experiment reaps them as stale (and queues their
    parameters again) once the grace period has passed.
    """
    later = (
        "workers stopped; this sweep's running trials will be reaped as stale by the next "
        f"sweep on experiment {experiment!r}"
    )
    try:
        ping(url)
    except Exception as error:  # noqa: BLE001 - any failure to connect means "down"
        for ref in refs:
            ray.cancel(ref, force=True)
        raise SweepInterrupted(f"the database is unreachable ({reason(error)}): {later}") from None
    say("interrupted: stopping workers and marking their trials FAIL", progress)
    _stop_workers(ray, refs)
    try:
        fail_running_trials(url, experiment, sweep_id, seconds=INTERRUPT_RETRY_SECONDS)
    except Exception as error:
        if not is_transient(error):
            raise
        raise SweepInterrupted(f"the database went away ({reason(error)}): {later}") from None
    # (Workers that stopped in time marked their own trials; the rest were marked here.)
    raise SweepInterrupted(
        "workers stopped and this sweep's running trials marked FAIL; rerun to resume"
    ) from None


#: How long, after Ctrl-C, failing the running trials may retry through a
#: database that goes away: a user waits for the prompt, and the next sweep
#: reaps what is left anyway.
INTERRUPT_RETRY_SECONDS = 10.0


def fail_running_trials(
    storage_url: str, experiment: str, sweep_id: str, *, seconds: float | None = None
) -> int:
    """Marks this sweep's RUNNING trials FAIL, so that a rerun resumes cleanly.

    Runs on Ctrl-C, when the database may be as unreachable as at any other
    time, so every call retries like the rest of the sweep's, for ``seconds``
    (else :func:`~svdsweep.database.retry_seconds`).
    """
    again = partial(retrying, seconds=seconds)
    storage = open_storage(storage_url, heartbeat=False)
    failed = 0
    for name in study_names(storage, experiment):
        study = load_study(storage, name)
        running = again(partial(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)))
        for trial in running:
            if trial.user_attrs.get("sweep_id") != sweep_id:
                continue  # another sweep's (or a hand-started worker's) trial
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                again(
                    partial(
                        storage.set_trial_user_attr, trial_id(trial), "error", "sweep interrupted"
                    )
                )
                if again(partial(storage.set_trial_state_values, trial_id(trial), TrialState.FAIL)):
                    failed += 1
    return failed


def _default_workers(resources: dict[str, float], gpus: float, spec: SweepSpec) -> int:
    if gpus > 0:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1) // spec.cpus_per_worker))


def _watch(ray: Any, refs: list[Any], url: str, experiment: str, progress: bool) -> None:
    """Shows live progress and reaps dead workers' trials until every worker returns."""
    storage = open_storage(url)
    studies = [load_study(storage, name) for name in study_names(storage, experiment)]
    reaper = StaleTrialReaper()
    pending = list(refs)
    last_poll = -math.inf
    with _live_status(progress) as show:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in refs:
                if ref not in pending:
                    _raise_worker_error(ray, ref, refs)
            if time.monotonic() - last_poll < STATUS_SECONDS:
                continue
            last_poll = time.monotonic()
            retrying(partial(reaper.reap, studies))
            show(retrying(partial(experiment_status, url, experiment, storage=storage)))


#: Seconds between the driver's reads of every study (progress, stale trials). The
#: driver shares the CPUs with the workers: polling 12 studies every second took a
#: quarter of a core on a 2-core machine. A worker's failure is still seen within 1 s.
STATUS_SECONDS = 5.0


def _raise_worker_error(ray: Any, ref: Any, refs: list[Any]) -> None:
    try:
        ray.get(ref)
    except Exception as error:  # noqa: BLE001 - any worker failure stops the sweep
        for other in refs:
            ray.cancel(other, force=True)
        cause = getattr(error, "cause", None) or error
        raise SweepError(f"a worker failed: {type(cause).__name__}: {cause}") from None


def _stop_workers(ray: Any, refs: list[Any]) -> None:
    """Asks workers to stop (KeyboardInterrupt in the task), then forces the stragglers."""
    for ref in refs:
        ray.cancel(ref, force=False)
    deadline = time.monotonic() + 15
    pending = list(refs)
    while pending and time.monotonic() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    for ref in pending:
        ray.cancel(ref, force=True)


@contextlib.contextmanager
def _live_status(enabled: bool) -> Iterator[Any]:
    """A live table on a terminal; a line per change elsewhere (CI logs)."""
    from rich.live import Live

    from svdsweep.progress import stderr_console

    if not enabled:
        yield lambda status: None
        return
    if stderr_console.is_terminal:
        with Live(console=stderr_console, refresh_per_second=2, transient=False) as live:
            yield lambda status: live.update(status_table(status))
        return
    last: list[str] = []

    def show(status: list[StudyStatus]) -> None:
        line = "  |  ".join(status_line(study) for study in status)
        if [line] != last:
            say(line)
            last[:] = [line]

    yield show


def status_line(study: StudyStatus) -> str:
    best = "-" if study.best_value is None else f"{study.best_value:.4f} {study.best_params}"
    c = study.counts
    return (
        f"{study.name}: {study.finished}/{study.budget} done, {c['RUNNING']} running, "
        f"{c['FAIL']} failed, best {best}"
    )


def status_table(status: list[StudyStatus]) -> Any:
    from rich.table import Table

    table = Table(title="svdsweep")
    for column in ("study", "done", "running", "failed", "pruned", "best val loss", "best params"):
        table.add_column(column)
    for study in status:
        table.add_row(
            study.name,
            f"{study.finished}/{study.budget}",
            str(study.counts["RUNNING"]),
            str(study.counts["FAIL"]),
            str(study.counts["PRUNED"]),
            "-" if study.best_value is None else f"{study.best_value:.4f}",
            "-" if study.best_params is None else _format_params(study.best_params),
        )
    return table


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in params.items()
    )
