"""The results of a report, as typed dataclasses, and their JSON file (results.json).

``results.json`` holds enough to redraw the figure and re-judge the verdict
without retraining: the protocol, every replicate's best trials, every final run's
curves, the summary, the test, versions, hardware and durations. The figure
(:mod:`svdsweep.plot`) and the Markdown report (:mod:`.markdown`) read a
:class:`Results`, never string keys.

:meth:`Results.to_dict` writes non-finite floats as null (strict JSON has no
NaN); :meth:`Results.from_dict` reads any file of :data:`SCHEMA_VERSION` and
ignores keys it does not know, so a newer writer's additions do not break it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import socket
import statistics
import time
import types
import typing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from svdsweep.report.stats import (
    ALPHA,
    Spread,
    WelchTest,
    conclude,
    conclude_across,
    max_overlap,
    spread,
    welch_test,
)
from svdsweep.score import NO_TRUNCATION, kept_energy
from svdsweep.space import StudySettings
from svdsweep.train import TrainConfig

__all__ = [
    "SCHEMA_VERSION",
    "BestTrialRecord",
    "Durations",
    "FigureInfo",
    "FinalRun",
    "Hardware",
    "OptimizerSummary",
    "Profile",
    "ProfilePoint",
    "Protocol",
    "Replicate",
    "Results",
    "SignificanceTest",
    "StudyRecord",
    "assemble",
    "cpu_model",
    "judge_replicate",
    "summarize",
    "versions",
]

#: Version of the layout below. 2: tuning replicates, the early-stopped score
#: and the rank profile (1 had one pair of studies and last-epoch scores).
SCHEMA_VERSION = 2


@dataclass
class Protocol:
    """How the final trainings were run."""

    epochs: int
    seeds: list[int]
    seed_rule: str
    dataset: str
    model: str
    train_subset: int | None  # None: the full 50k training split
    batch_size: int
    evaluate_test: bool
    band: str  # what the figure's shaded band shows
    replicates: int  # independent tuning replicates per optimizer
    primary_metric: str  # fixed in the code, before any result is seen
    secondary_metric: str
    verdict_rule: str


@dataclass
class BestTrialRecord:
    number: int
    value: float | None
    params: dict[str, Any]
    curves: dict[str, Any] | None  # per-epoch curves; energy_per_layer: by layer
    device: str | None
    duration_s: float | None
    worker_node_ip: str | None
    best_epoch: int | None = None  # of the early-stopped score


@dataclass
class StudyRecord:
    """A study: its settings, its trial counts and its best trial."""

    study: str
    settings: StudySettings
    budget: int
    trials: dict[str, int]  # per state, plus "diverged" (COMPLETE with value +inf)
    best: BestTrialRecord


@dataclass
class FinalRun:
    """One final training: the trainer's result, then where and how it ran."""

    config: TrainConfig
    device: str
    train_loss: list[float | None]
    val_loss: list[float | None]
    val_acc: list[float | None]
    epoch_seconds: list[float]
    energy: list[float | None]
    energy_per_layer: dict[str, list[float | None]]
    best_epoch: int  # the early-stopped model's epoch (svdsweep.score)
    best_val_loss: float | None
    test_loss: float | None  # early-stopped model: the primary metric
    test_acc: float | None
    last_test_loss: float | None  # last epoch's model, for comparison
    last_test_acc: float | None
    started_at: float
    finished_at: float
    host: str
    torch_version: str
    python_version: str
    optimizer: str
    seed: int
    replicate: int  # whose winner this run retrains
    diverged: str | None  # why, for a run whose loss stopped being finite
    device_name: str
    torch_threads: int
    pid: int
    node_ip: str | None
    gpu_ids: list[str]
    cpu_count: int | None
    task_started_at: float
    task_finished_at: float


@dataclass
class OptimizerSummary:
    """One optimizer's final runs; diverged runs are left out of the spreads."""

    best_val_loss: Spread  # early-stopped
    best_epoch: Spread
    test_loss: Spread  # early-stopped: the primary metric
    test_acc: Spread  # early-stopped: the secondary metric
    last_test_loss: Spread
    last_test_acc: Spread
    runs: int
    diverged: int


@dataclass
class SignificanceTest:
    """The test the verdict rests on, and the same test on test accuracy for information."""

    name: str
    metric: str
    alpha: float
    n_adam: int
    n_svd_adam: int
    mean_adam: float | None
    mean_svd_adam: float | None
    statistic: float | None
    df: float | None
    p_value: float | None
    cohens_d: float | None
    test_acc: WelchTest

    @classmethod
    def of(
        cls, name: str, metric: str, alpha: float, test: WelchTest, accuracy: WelchTest
    ) -> SignificanceTest:
        return cls(name=name, metric=metric, alpha=alpha, **asdict(test), test_acc=accuracy)


@dataclass
class FigureInfo:
    """What the figure shows, recorded before it is drawn."""

    file: str
    panels: list[str]
    band: str
    dpi: int
    size_px: list[int]


@dataclass
class Driver:
    """The machine that ran the report."""

    host: str
    cpu_count: int | None
    cpu_model: str
    platform: str

    @classmethod
    def here(cls) -> Driver:
        return cls(
            host=socket.gethostname(),
            cpu_count=os.cpu_count(),
            cpu_model=cpu_model(),
            platform=platform.platform(),
        )


@dataclass
class ClusterNode:
    node_ip: str | None
    host: str | None
    resources: dict[str, float]


@dataclass
class Hardware:
    """Where the final trainings ran, and how they were placed on the Ray cluster."""

    driver: Driver
    run_devices: list[str]
    run_nodes: list[str]
    gpus_per_run: float
    cpus_per_run: int
    cluster_resources: dict[str, float]
    nodes: list[ClusterNode]
    wall_s: float


@dataclass
class Durations:
    report_s: float
    final_trainings_wall_s: float
    final_trainings_task_s_sum: float
    training_s_sum: float
    max_concurrent_runs: int
    max_concurrent_trainings: int


@dataclass
class Replicate:
    """One tuning replicate: its two studies, their winners' finals, its test and outcome."""

    replicate: int
    studies: dict[str, StudyRecord]  # by optimizer
    summary: dict[str, OptimizerSummary]  # by optimizer
    test: SignificanceTest  # primary metric, with test accuracy's own test inside
    outcome: str  # this replicate alone: "supported", "not supported" or "inconclusive"
    kept_energy: float | None  # SVD(Adam) winner's least-kept layer, mean over its finals
    truncates: bool  # False: its k keeps >= NO_TRUNCATION or sits at the top of the range
    why_not: str | None  # why it does not truncate, when it does not


@dataclass
class ProfilePoint:
    """The best trial of one rank-profile study (Adam's: rank None)."""

    study: str
    rank: int | None
    value: float | None  # best early-stopped validation loss; None: no finite trial
    params: dict[str, Any]
    best_epoch: int | None
    kept_energy: float | None  # least-kept layer, mean over the best trial's epochs
    trials: dict[str, int]


@dataclass
class Profile:
    """The rank profile: the best score at each rank, lr tuned per rank; Adam as reference."""

    full_rank: int
    adam: ProfilePoint
    ranks: list[ProfilePoint]
    budget: int  # trials per profile study
    trials: int  # finished trials, all profile studies
    training_s: float  # trial seconds spent, all profile studies
    sentence: str  # what the figure shows, in one sentence
    #: seed-to-seed std of the early-stopped validation loss (the finals' winners, pooled):
    #: differences between points within twice it are ties
    noise: float | None = None


@dataclass
class Results:
    """Everything a report found: written as results.json, read by the figures and report.md."""

    schema: int
    created_at: str  # ISO 8601, UTC
    experiment: str
    storage: str  # URL, password hidden
    protocol: Protocol
    replicates: list[Replicate]
    runs: list[FinalRun]
    profile: Profile | None
    outcome: str  # "supported", "not supported", "inconclusive" or "untested"
    verdict: str  # the first line a reader sees
    figure: FigureInfo
    profile_figure: FigureInfo | None
    baseline: dict[str, Any]  # a published accuracy to compare tuned Adam with
    versions: dict[str, str]
    hardware: Hardware
    durations: Durations

    def runs_of(self, optimizer: str, replicate: int | None = None) -> list[FinalRun]:
        return [
            run
            for run in self.runs
            if run.optimizer == optimizer and replicate in (None, run.replicate)
        ]

    def to_dict(self) -> dict[str, Any]:
        finite: dict[str, Any] = _finite(asdict(self))
        return finite

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Results:
        if raw.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"results schema {raw.get('schema')!r}, this svdsweep reads {SCHEMA_VERSION}"
            )
        results: Results = _build(cls, raw)
        return results

    @classmethod
    def read(cls, path: str | Path) -> Results:
        return cls.from_dict(json.loads(Path(path).read_text()))


#: The metric the verdict rests on, fixed here before any result: the test loss
#: of each final run's early-stopped model, on the test set the sweep never saw.
METRIC = "test_loss"
PRIMARY_METRIC = (
    "test loss (cross-entropy, nats) of the early-stopped model: the state of the epoch "
    "with the lowest validation loss"
)
SECONDARY_METRIC = "test accuracy of the same early-stopped model"
VERDICT_RULE = (
    "each replicate's two winners are retrained over the same seeds and compared by "
    f"Welch's t-test at the {ALPHA:.0%} level; the verdict says 'supported' or 'not "
    "supported' only when every replicate finds the same significant direction, and says "
    "the comparison does not test denoising when most replicates' tuned k truncates nothing "
    f"(keeps >= {100 * NO_TRUNCATION:g}% of the energy in every layer, or is the top of the "
    "range)"
)
#: Published Fashion-MNIST baseline for an MLP (the README table of Debian's dataset-fashion-mnist).
BASELINE = {
    "name": "MLPClassifier (activation=relu, hidden_layer_sizes=[100])",
    "test_accuracy": 0.8833,
    "source": "README of Debian's dataset-fashion-mnist (the Fashion-MNIST benchmark table)",
}


def summarize(runs: list[FinalRun]) -> OptimizerSummary:
    """One optimizer's finals of one replicate; diverged runs are left out of the spreads."""
    ok = [run for run in runs if run.diverged is None]
    return OptimizerSummary(
        best_val_loss=spread([run.best_val_loss for run in ok]),
        best_epoch=spread([float(run.best_epoch) for run in ok]),
        test_loss=spread([run.test_loss for run in ok]),
        test_acc=spread([run.test_acc for run in ok]),
        last_test_loss=spread([run.last_test_loss for run in ok]),
        last_test_acc=spread([run.last_test_acc for run in ok]),
        runs=len(runs),
        diverged=len(runs) - len(ok),
    )


def judge_replicate(
    replicate: int, studies: dict[str, StudyRecord], runs: list[FinalRun]
) -> Replicate:
    """A replicate's summaries, Welch tests, outcome and whether its tuned k truncates."""
    summary = {
        optimizer: summarize([run for run in runs if run.optimizer == optimizer])
        for optimizer in studies
    }
    adam, svd = summary["adam"], summary["svd-adam"]
    test = welch_test(adam.test_loss.values, svd.test_loss.values)
    accuracy = welch_test(adam.test_acc.values, svd.test_acc.values)
    outcome, _ = conclude(test, METRIC, len(runs) // 2)
    energies = [
        kept_energy(run.energy_per_layer)
        for run in runs
        if run.optimizer == "svd-adam" and run.energy_per_layer
    ]
    finite = [e for e in energies if e is not None]
    energy = statistics.fmean(finite) if finite else None
    svd_study = studies["svd-adam"]
    k, top = svd_study.best.params.get("k"), svd_study.settings.space.k_high
    why_not = None
    if energy is not None and energy >= NO_TRUNCATION:
        why_not = f"k={k} keeps {100 * energy:.4f}% of the gradient energy in its least-kept layer"
    elif k is not None and top is not None and k >= top:
        why_not = f"k={k} is the top of the searched range (full rank)"
    return Replicate(
        replicate=replicate,
        studies=studies,
        summary=summary,
        test=SignificanceTest.of(
            "Welch's t-test (scipy.stats.ttest_ind, equal_var=False, two-sided)",
            METRIC,
            ALPHA,
            test,
            accuracy,
        ),
        outcome=outcome,
        kept_energy=energy,
        truncates=why_not is None,
        why_not=why_not,
    )


def seed_noise(runs: list[FinalRun]) -> float | None:
    """Pooled seed-to-seed standard deviation of the early-stopped validation loss.

    Pooled over every (replicate, optimizer) group of final runs, whose runs
    differ only in their seed: the noise one training run's score carries.
    """
    groups: dict[tuple[int, str], list[float]] = {}
    for run in runs:
        if run.diverged is None and run.best_val_loss is not None:
            groups.setdefault((run.replicate, run.optimizer), []).append(run.best_val_loss)
    usable = [values for values in groups.values() if len(values) > 1]
    if not usable:
        return None
    squares = sum(statistics.variance(values) * (len(values) - 1) for values in usable)
    return math.sqrt(squares / sum(len(values) - 1 for values in usable))


def assemble(
    *,
    experiment: str,
    storage: str,
    protocol: Protocol,
    replicates: list[Replicate],
    runs: list[FinalRun],
    profile: Profile | None,
    hardware: Hardware,
    figure: FigureInfo,
    profile_figure: FigureInfo | None,
    started: float,
) -> Results:
    """The results of finished final trainings: verdict across replicates, provenance."""
    outcome, verdict = conclude_across(
        [(r.outcome, r.truncates, r.why_not) for r in replicates],
        profile.sentence if profile else None,
    )
    tasks = [(run.task_started_at, run.task_finished_at) for run in runs]
    trainings = [(run.started_at, run.finished_at) for run in runs]
    return Results(
        schema=SCHEMA_VERSION,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        experiment=experiment,
        storage=storage,
        protocol=protocol,
        replicates=replicates,
        runs=runs,
        profile=profile,
        outcome=outcome,
        verdict=verdict,
        figure=figure,
        profile_figure=profile_figure,
        baseline=dict(BASELINE),
        versions=versions(),
        hardware=hardware,
        durations=Durations(
            report_s=round(time.time() - started, 3),
            final_trainings_wall_s=hardware.wall_s,
            final_trainings_task_s_sum=round(sum(b - a for a, b in tasks), 3),
            training_s_sum=round(sum(sum(run.epoch_seconds) for run in runs), 3),
            max_concurrent_runs=max_overlap(tasks),
            max_concurrent_trainings=max_overlap(trainings),
        ),
    )


def versions() -> dict[str, str]:
    """The versions of Python and of every package a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in (
        "svdsweep",
        "torch",
        "optuna",
        "ray",
        "optuna-dashboard",
        "numpy",
        "scipy",
        "matplotlib",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _build(kind: Any, raw: Any) -> Any:
    """``raw`` (parsed JSON) as ``kind``: dataclasses, and lists and dicts of them, by type hint."""
    if raw is None:
        return None
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        hints = typing.get_type_hints(kind)
        return kind(
            **{
                f.name: _build(hints[f.name], raw[f.name])
                for f in dataclasses.fields(kind)
                if f.name in raw
            }
        )
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return [_build(args[0], item) for item in raw]
    if origin is dict:
        return {key: _build(args[1], item) for key, item in raw.items()}
    if origin in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _build(inner, raw)
    return raw
