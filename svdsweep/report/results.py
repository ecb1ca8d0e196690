"""The results of a report, as typed dataclasses, and their JSON file (results.json).

``results.json`` holds enough to redraw the figure and re-judge the verdict
without retraining: the protocol, both studies' best trials, every final run's
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
    max_overlap,
    spread,
    welch_test,
)
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
    "Protocol",
    "Results",
    "SignificanceTest",
    "StudyRecord",
    "assemble",
    "cpu_model",
    "versions",
]

#: Version of the layout below. Unchanged since the first results.json: the
#: dataclasses write exactly the keys the former dict had.
SCHEMA_VERSION = 1


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


@dataclass
class BestTrialRecord:
    number: int
    value: float | None
    params: dict[str, Any]
    curves: dict[str, list[float | None]] | None
    device: str | None
    duration_s: float | None
    worker_node_ip: str | None


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
    test_loss: float | None
    test_acc: float | None
    started_at: float
    finished_at: float
    host: str
    torch_version: str
    python_version: str
    optimizer: str
    seed: int
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

    final_val_loss: Spread
    final_val_acc: Spread
    test_loss: Spread
    test_acc: Spread
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
class Results:
    """Everything a report found: written as results.json, read by the figure and report.md."""

    schema: int
    created_at: str  # ISO 8601, UTC
    experiment: str
    storage: str  # URL, password hidden
    protocol: Protocol
    studies: dict[str, StudyRecord]  # by optimizer
    runs: list[FinalRun]
    summary: dict[str, OptimizerSummary]  # by optimizer
    test: SignificanceTest
    outcome: str  # "supported", "not supported" or "inconclusive"
    verdict: str
    figure: FigureInfo
    versions: dict[str, str]
    hardware: Hardware
    durations: Durations

    def runs_of(self, optimizer: str) -> list[FinalRun]:
        return [run for run in self.runs if run.optimizer == optimizer]

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


#: The metric the verdict rests on: the loss on the test set, which the sweep never saw.
METRIC = "test_loss"


def assemble(
    *,
    experiment: str,
    storage: str,
    protocol: Protocol,
    studies: dict[str, StudyRecord],
    runs: list[FinalRun],
    hardware: Hardware,
    figure: FigureInfo,
    started: float,
) -> Results:
    """The results of finished final trainings: summary, test, verdict, provenance."""
    optimizers = list(studies)
    summary = {}
    for optimizer in optimizers:
        mine = [run for run in runs if run.optimizer == optimizer]
        ok = [run for run in mine if run.diverged is None]
        summary[optimizer] = OptimizerSummary(
            final_val_loss=spread([run.val_loss[-1] for run in ok]),
            final_val_acc=spread([run.val_acc[-1] for run in ok]),
            test_loss=spread([run.test_loss for run in ok]),
            test_acc=spread([run.test_acc for run in ok]),
            runs=len(mine),
            diverged=len(mine) - len(ok),
        )
    adam, svd = summary["adam"], summary["svd-adam"]
    test = welch_test(adam.test_loss.values, svd.test_loss.values)
    accuracy = welch_test(adam.test_acc.values, svd.test_acc.values)
    outcome, verdict = conclude(test, METRIC, len(protocol.seeds))
    tasks = [(run.task_started_at, run.task_finished_at) for run in runs]
    trainings = [(run.started_at, run.finished_at) for run in runs]
    return Results(
        schema=SCHEMA_VERSION,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        experiment=experiment,
        storage=storage,
        protocol=protocol,
        studies=studies,
        runs=runs,
        summary=summary,
        test=SignificanceTest.of(
            "Welch's t-test (scipy.stats.ttest_ind, equal_var=False, two-sided)",
            METRIC,
            ALPHA,
            test,
            accuracy,
        ),
        outcome=outcome,
        verdict=verdict,
        figure=figure,
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
