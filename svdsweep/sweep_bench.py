"""`svdsweep bench sweep`: what orchestration costs, against stock Optuna, in one run.

Three measurements on the given storage (PostgreSQL is the one that matters),
all on the same Ray:

1. **Stock Optuna**: ``workers`` Ray tasks, half per study, each running
   ``study.optimize`` of a no-op objective with ``MaxTrialsCallback(trials)``.
   This is the baseline the issue measured (26-31 trials/s, with overshoot).
2. **svdsweep**: :func:`svdsweep.sweep.run_sweep` with ``workers`` workers and a
   no-op objective: claim under the budget lock, identity attributes,
   heartbeat, one reported epoch, curves, tell. Budgets must come out exact.
3. **A real trial**: one worker trains ``real_trials`` real trials per study of
   ``real_epochs`` epochs; the time a trial spends outside ``train()`` (claim,
   ask, attribute writes, per-epoch reports, tell) is its overhead. The first
   trial also loads the dataset, once per worker, and is left out.

1 and 2 run ``repeats`` times, alternating, and their medians are compared: one
100-trial run of either varies by about ±20 % between runs on a small shared
machine. Throughput is finished trials over the span from the first trial's start
to the last one's end, read from the storage itself. A warm-up sweep runs first,
unmeasured, so that no measurement includes Ray starting worker processes (which,
for svdsweep's workers, import torch). Every study the benchmark creates is
deleted at the end.
"""

from __future__ import annotations

import itertools
import statistics
import time
import uuid
from datetime import datetime
from importlib.metadata import version
from typing import Any

import optuna
from optuna.trial import TrialState

from svdsweep.cluster import ray_session
from svdsweep.database import redact, resolve_storage_url
from svdsweep.errors import ConfigError
from svdsweep.progress import say
from svdsweep.storage import load_study, open_storage
from svdsweep.studies import study_name
from svdsweep.sweep import SweepSpec, run_sweep
from svdsweep.train import OPTIMIZERS, ReportCallback, TrainConfig, TrainResult

__all__ = ["noop_objective", "print_sweep_report", "run_sweep_benchmark"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def noop_objective(config: TrainConfig, report: ReportCallback) -> TrainResult:
    """Trains nothing: one epoch whose loss depends on the parameters, reported once."""
    import math

    started = time.time()
    loss = abs(math.log10(config.lr) + 2.5) + (0.0 if config.k is None else config.k / 100)
    report(1, {"train_loss": loss, "val_loss": loss, "val_acc": 0.0})
    result = TrainResult(config=config.to_dict(), device="cpu", started_at=started)
    result.train_loss, result.val_loss, result.val_acc = [loss], [loss], [0.0]
    result.epoch_seconds = [time.time() - started]
    result.finished_at = time.time()
    return result


def run_sweep_benchmark(
    storage: str | None,
    *,
    workers: int = 8,
    trials: int = 100,
    real_trials: int = 2,
    real_epochs: int = 5,
    repeats: int = 3,
    train_subset: int | None = None,
    ray_address: str | None = None,
    ray_node_ip: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the three measurements (see the module docstring) and returns the figures."""
    for flag, value in (
        ("--workers", workers),
        ("--trials", trials),
        ("--real-trials", real_trials),
        ("--real-epochs", real_epochs),
        ("--repeats", repeats),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    url = resolve_storage_url(storage)
    open_storage(url, heartbeat=False)  # an unreachable database fails here, before Ray starts
    experiment = f"bench-{uuid.uuid4().hex[:8]}"
    figures: dict[str, Any] = {
        "storage": redact(url),
        "workers": workers,
        "trials_per_study": trials,
        "repeats": repeats,
        "optuna": version("optuna"),
    }
    with ray_session(ray_address, ray_node_ip) as ray:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        cpus_per_worker = min(1.0, cpus / workers)
        figures["cluster_cpus"] = cpus
        try:
            # Warm-up, not measured: Ray keeps its worker processes, so the measured
            # runs below do not include starting them and importing torch.
            say("0/3 warming up the Ray workers", progress)
            _noop_sweep(url, f"{experiment}-warmup", workers, workers, cpus_per_worker)
            runs: dict[str, list[dict[str, Any]]] = {"stock": [], "svdsweep": []}
            for repeat in range(repeats):
                say(f"1/3 stock Optuna, run {repeat + 1}/{repeats}", progress)
                runs["stock"].append(
                    _stock_optuna(ray, url, f"{experiment}-stock{repeat}", workers, trials)
                )
                say(f"2/3 svdsweep workers, no-op objective, run {repeat + 1}/{repeats}", progress)
                runs["svdsweep"].append(
                    _noop_sweep(
                        url, f"{experiment}-noop{repeat}", trials, workers, cpus_per_worker, repeat
                    )
                )
            for name, measured in runs.items():
                figures[name] = {
                    "trials_per_second": statistics.median(
                        r["trials_per_second"] for r in measured
                    ),
                    "runs": measured,
                }
            say(
                f"3/3 real trials: {real_trials} per study x {real_epochs} epochs, 1 worker",
                progress,
            )
            real = SweepSpec(
                storage=url,
                experiment=f"{experiment}-real",
                trials=real_trials,
                workers=1,
                gpus_per_worker=None,
                cpus_per_worker=min(1.0, cpus),
                trial_epochs=real_epochs,
                train_subset=train_subset,
            )
            run_sweep(real, progress=progress)
            figures["real"] = _overhead(url, [study_name(real.experiment, o) for o in OPTIMIZERS])
        finally:
            _delete_studies(url, experiment)
    return figures


def _noop_sweep(
    url: str, experiment: str, trials: int, workers: int, cpus_per_worker: float, seed: int = 0
) -> dict[str, Any]:
    """svdsweep's own sweep of the no-op objective on CPU workers; its throughput."""
    spec = SweepSpec(
        storage=url,
        experiment=experiment,
        trials=trials,
        workers=workers,
        gpus_per_worker=0,
        cpus_per_worker=cpus_per_worker,
        trial_epochs=1,
        seed=seed,
    )
    run_sweep(spec, objective=noop_objective, progress=False)
    return _throughput(url, [study_name(experiment, optimizer) for optimizer in OPTIMIZERS])


def _stock_worker(url: str, name: str, budget: int, seed: int) -> None:
    """Stock Optuna's way: optimize until MaxTrialsCallback sees the budget met."""
    study = optuna.load_study(
        study_name=name,
        storage=url,
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: optuna.Trial) -> float:
        import math

        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        k = trial.suggest_int("k", 1, 64) if name.endswith("svd-adam") else 0
        return abs(math.log10(lr) + 2.5) + k / 100

    study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(budget, states=FINISHED)])


def _stock_optuna(ray: Any, url: str, experiment: str, workers: int, trials: int) -> dict[str, Any]:
    names = [study_name(experiment, optimizer) for optimizer in OPTIMIZERS]
    for name in names:
        optuna.create_study(study_name=name, storage=open_storage(url, heartbeat=False))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    task = ray.remote(_stock_worker).options(num_cpus=min(1.0, cpus / workers), max_retries=0)
    ray.get([task.remote(url, names[worker % 2], trials, worker) for worker in range(workers)])
    return _throughput(url, names)


def _throughput(url: str, names: list[str]) -> dict[str, Any]:
    finished = []
    for name in names:
        study = load_study(url, name)
        finished.append(study.get_trials(deepcopy=False, states=FINISHED))
    every = [trial for trials in finished for trial in trials]
    span = _seconds(max(_end(t) for t in every) - min(_start(t) for t in every))
    return {
        "finished_per_study": [len(trials) for trials in finished],
        "seconds": round(span, 3),
        "trials_per_second": round(len(every) / span, 2),
    }


def _overhead(url: str, names: list[str]) -> dict[str, Any]:
    """Per trial after the first: wall time from the previous trial's end, minus train()."""
    trials = sorted(
        (
            trial
            for name in names
            for trial in load_study(url, name).get_trials(deepcopy=False, states=FINISHED)
        ),
        key=_start,
    )
    rows = []
    for previous, trial in itertools.pairwise(trials):
        wall = _seconds(_end(trial) - _end(previous))
        training = trial.user_attrs["finished_at"] - trial.user_attrs["started_at"]
        rows.append({"wall_s": round(wall, 3), "train_s": round(training, 3)})
    fractions = [1 - row["train_s"] / row["wall_s"] for row in rows]
    return {
        "trials": rows,
        "overhead_seconds_median": round(
            statistics.median(row["wall_s"] - row["train_s"] for row in rows), 3
        ),
        "overhead_fraction_median": round(statistics.median(fractions), 5),
        "overhead_fraction_max": round(max(fractions), 5),
        "first_trial_wall_s": round(_seconds(_end(trials[0]) - _start(trials[0])), 3),
    }


def _delete_studies(url: str, experiment: str) -> None:
    storage = open_storage(url, heartbeat=False)
    for summary in storage.get_all_studies():
        if summary.study_name.startswith(f"{experiment}-"):
            optuna.delete_study(study_name=summary.study_name, storage=storage)


def _start(trial: optuna.trial.FrozenTrial) -> datetime:
    assert trial.datetime_start is not None
    return trial.datetime_start


def _end(trial: optuna.trial.FrozenTrial) -> datetime:
    assert trial.datetime_complete is not None
    return trial.datetime_complete


def _seconds(delta: Any) -> float:
    return float(delta.total_seconds())


def print_sweep_report(figures: dict[str, Any]) -> None:
    stock, ours, real = figures["stock"], figures["svdsweep"], figures["real"]
    budget = figures["trials_per_study"]
    print(
        f"storage {figures['storage']}, {figures['workers']} workers on "
        f"{figures['cluster_cpus']:g} CPUs, budget {budget} trials per study"
    )
    print(
        f"no-op objective, {figures['repeats']} alternating runs each "
        "(trials/s; finished per study)"
    )
    for label, row in (("stock Optuna", stock), ("svdsweep", ours)):
        each = ", ".join(
            f"{r['trials_per_second']:.1f} ({'/'.join(str(n) for n in r['finished_per_study'])})"
            for r in row["runs"]
        )
        print(f"  {label:<14} median {row['trials_per_second']:5.1f}   runs: {each}")
    ratio = ours["trials_per_second"] / stock["trials_per_second"]
    print(f"svdsweep / stock throughput (medians): {ratio:.2f}x")
    exact = all(n == budget for r in ours["runs"] for n in r["finished_per_study"])
    overshoot = max(n - budget for r in stock["runs"] for n in r["finished_per_study"])
    print(
        f"budgets: svdsweep {'exact in every run' if exact else 'NOT EXACT'}; "
        f"stock Optuna overshot by up to {overshoot}"
    )
    print(
        f"real trial overhead (outside train()): median {real['overhead_seconds_median']:.3f} s, "
        f"{real['overhead_fraction_median']:.2%} of a trial's wall time "
        f"(max {real['overhead_fraction_max']:.2%}, over {len(real['trials'])} trials)"
    )
