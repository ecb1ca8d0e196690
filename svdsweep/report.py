"""The reporter: best trials -> final trainings on Ray -> results.json -> figure -> report.md.

One flow, top to bottom:

1. **Best trials.** The best COMPLETE trial (lowest finite validation loss) of
   each study, and the study's stored :class:`~svdsweep.space.StudySettings`.
   Each final config is rebuilt by :func:`svdsweep.space.config_from_params`,
   the code the sweep used, overriding only ``epochs``, ``seed`` and
   ``evaluate_test``: the data, subset, model, batch size and low-rank method
   are the trial's.
2. **Final trainings.** Both optimizers x ``seeds`` seeds, as Ray tasks in
   parallel (``num_cpus=1``, ``num_gpus=--gpus-per-run``; device ``auto``
   inside a task is the GPU Ray assigned, else the CPU). Final-run seeds are
   ``FINAL_SEED_BASE + i`` (1000, 1001, ...): distinct from each other, shared
   by both optimizers, and apart from the sweep's training seed (0 by
   default), so no final run repeats a trial.
3. **results.json**: every curve, parameter and seed, the test, versions,
   hardware and durations. The figure is then drawn *from that file* by
   :func:`svdsweep.plot.redraw`, which proves it can be redrawn without
   retraining.
4. **report.md**, with a verdict resting on Welch's t-test over the seeds.
5. **Artifacts**: the figure and the report are attached to both studies in
   an Optuna artifact store, with a note on each study, for optuna-dashboard.
   Rerunning replaces them.

Nothing is left half-written: inputs and the writability of ``--out`` and the
artifact store are checked before any training, everything is written into a
hidden staging directory that is put in place at the very end (see
:class:`_Staging`), and a failure removes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import socket
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from svdsweep.space import StudySettings, config_from_params
from svdsweep.storage import open_storage, redact, resolve_storage_url, retrying
from svdsweep.studies import DEFAULT_EXPERIMENT, ExperimentError, load_settings, study_name
from svdsweep.train import OPTIMIZERS, TrainConfig, TrainingDiverged, TrainResult

__all__ = [
    "ARTIFACT_FILES",
    "DEFAULT_ARTIFACT_DIR",
    "FINAL_SEED_BASE",
    "BestTrial",
    "ReportError",
    "ReportOutcome",
    "ReportSpec",
    "best_trials",
    "build_report",
    "check_outputs",
    "dashboard_command",
    "final_configs",
    "final_training",
    "resolve_artifact_dir",
    "welch_test",
]

#: Seed of final run i (both optimizers): FINAL_SEED_BASE + i.
FINAL_SEED_BASE = 1000
#: Significance level of the verdict.
ALPHA = 0.05
FIGURE, REPORT, RESULTS = "comparison.png", "report.md", "results.json"
#: Files attached to both studies as Optuna artifacts (replaced on every rerun).
ARTIFACT_FILES = (FIGURE, REPORT)
DEFAULT_ARTIFACT_DIR = "svdsweep-artifacts"
LABELS = {"adam": "Adam", "svd-adam": "SVD(Adam)"}
SCHEMA_VERSION = 1


class ReportError(RuntimeError):
    """``--out`` or the artifact store cannot be written, or a final training failed."""


@dataclass(frozen=True)
class ReportSpec:
    """Everything ``svdsweep report`` is given."""

    storage: str | None = None  # URL; None: $SVDSWEEP_STORAGE, else sqlite:///svdsweep.db
    experiment: str = DEFAULT_EXPERIMENT
    epochs: int = 20  # epochs of each final training
    seeds: int = 5  # final trainings per optimizer
    out: Path = Path("results")  # replaced atomically at the end
    ray_address: str | None = None  # None: $RAY_ADDRESS, else start a local Ray
    ray_node_ip: str | None = None  # None: $SVDSWEEP_RAY_NODE_IP, else 127.0.0.2
    gpus_per_run: float | None = None  # None: 1 when the cluster has GPUs, else 0
    artifact_dir: Path | None = None  # None: $SVDSWEEP_ARTIFACT_DIR, else ./svdsweep-artifacts

    def __post_init__(self) -> None:
        for name in ("epochs", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if self.gpus_per_run is not None and not (
            math.isfinite(self.gpus_per_run) and self.gpus_per_run >= 0
        ):
            raise ValueError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run!r}")


@dataclass
class BestTrial:
    """A study's best trial, its settings and its trial counts."""

    optimizer: str
    study: optuna.Study
    settings: StudySettings
    trial: FrozenTrial
    counts: dict[str, int]  # trials per state, plus "diverged" (COMPLETE with value +inf)

    def to_dict(self) -> dict[str, Any]:
        attrs = self.trial.user_attrs
        return {
            "study": self.study.study_name,
            "settings": asdict(self.settings),
            "budget": self.settings.budget,
            "trials": self.counts,
            "best": {
                "number": self.trial.number,
                "value": self.trial.value,
                "params": dict(self.trial.params),
                "curves": attrs.get("curves"),
                "device": attrs.get("device"),
                "duration_s": attrs.get("duration_s"),
                "worker_node_ip": attrs.get("worker_node_ip"),
            },
        }


@dataclass
class ReportOutcome:
    """Where everything went, and the verdict."""

    out: Path
    artifact_dir: Path
    storage_url: str
    verdict: str
    outcome: str  # "supported", "not supported" or "inconclusive"
    results: dict[str, Any] = field(repr=False)
    artifact_ids: dict[str, dict[str, str]] = field(default_factory=dict)  # study -> file -> id

    @property
    def figure(self) -> Path:
        return self.out / FIGURE

    @property
    def report(self) -> Path:
        return self.out / REPORT

    @property
    def results_json(self) -> Path:
        return self.out / RESULTS


# --- 1. best trials -------------------------------------------------------


def best_trials(storage: Any, experiment: str) -> dict[str, BestTrial]:
    """The best COMPLETE trial of both studies; :class:`ExperimentError` if there is none."""
    found: dict[str, BestTrial] = {}
    for optimizer in OPTIMIZERS:
        settings = load_settings(storage, experiment, optimizer)  # missing study -> error
        name = study_name(experiment, optimizer)
        study = retrying(partial(optuna.load_study, study_name=name, storage=storage))
        trials = retrying(partial(study.get_trials, deepcopy=False))
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
        found[optimizer] = BestTrial(optimizer, study, settings, best, counts)
    return found


def final_configs(best: dict[str, BestTrial], epochs: int, seeds: int) -> list[TrainConfig]:
    """Both optimizers x ``seeds`` seeds, interleaved so that both progress together.

    Everything but ``epochs``, ``seed`` and ``evaluate_test`` comes from the
    trial through the sweep's own :func:`config_from_params`.
    """
    return [
        config_from_params(
            best[optimizer].settings,
            best[optimizer].trial.params,
            epochs=epochs,
            seed=FINAL_SEED_BASE + index,
            evaluate_test=True,
        )
        for index in range(seeds)
        for optimizer in OPTIMIZERS
        if optimizer in best
    ]


# --- 2. final trainings on Ray -------------------------------------------


def final_training(config: TrainConfig) -> dict[str, Any]:
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
            started_at=task_started_at,
            finished_at=time.time(),
        )
    run = result.to_dict()
    run.update(
        optimizer=config.optimizer,
        seed=config.seed,
        diverged=diverged,
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()),
        torch_threads=torch.get_num_threads(),
        pid=os.getpid(),
        node_ip=_ray_node_ip(),
        gpu_ids=_ray_gpu_ids(),
        cpu_count=os.cpu_count(),
        task_started_at=task_started_at,
        task_finished_at=time.time(),
    )
    return run


def run_final_trainings(
    ray: Any, configs: list[TrainConfig], gpus_per_run: float | None, *, progress: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs every config as a Ray task at once; returns the runs and how they were placed."""
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
    refs = {task.remote(config): config for config in configs}
    _say(
        f"{len(configs)} final trainings ({gpus:g} GPU, 1 CPU each) on a Ray cluster with "
        f"{resources.get('CPU', 0):g} CPUs and {cluster_gpus:g} GPUs",
        progress,
    )
    runs: list[dict[str, Any]] = []
    pending = list(refs)
    try:
        with _run_progress(len(configs), progress) as advance:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    config = refs[ref]
                    try:
                        run = ray.get(ref)
                    except Exception as error:  # noqa: BLE001 - any task failure ends the report
                        cause = getattr(error, "cause", None) or error
                        raise ReportError(
                            f"the final training of {config.optimizer} with seed {config.seed} "
                            f"failed: {type(cause).__name__}: {cause}"
                        ) from None
                    runs.append(run)
                    advance(_run_line(run))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    placement = {
        "gpus_per_run": gpus,
        "cpus_per_run": 1,
        "cluster_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
        "nodes": [
            {
                "node_ip": node.get("NodeManagerAddress"),
                "host": node.get("NodeManagerHostname"),
                "resources": {
                    k: v for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")
                },
            }
            for node in ray.nodes()
            if node.get("Alive")
        ],
        "wall_s": round(time.time() - started, 3),
    }
    order = {(c.optimizer, c.seed): i for i, c in enumerate(configs)}
    runs.sort(key=lambda run: order[(run["optimizer"], run["seed"])])
    return runs, placement


# --- 3. results, statistics ----------------------------------------------


def welch_test(adam: list[float], svd: list[float]) -> dict[str, Any]:
    """Welch's t-test of SVD(Adam) against Adam (two-sided), and Cohen's d.

    ``d = (mean_adam - mean_svd) / sqrt((var_adam + var_svd) / 2)``: positive
    when SVD(Adam) has the lower (better) loss. ``None`` where undefined.
    """
    result: dict[str, Any] = {
        "n_adam": len(adam),
        "n_svd_adam": len(svd),
        "mean_adam": statistics.fmean(adam) if adam else None,
        "mean_svd_adam": statistics.fmean(svd) if svd else None,
        "statistic": None,
        "df": None,
        "p_value": None,
        "cohens_d": None,
    }
    if min(len(adam), len(svd)) < 2:
        return result
    from scipy import stats

    with warnings.catch_warnings():  # identical values: p is nan, reported as such below
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(svd, adam, equal_var=False)
    statistic, p_value = float(test.statistic), float(test.pvalue)
    result["statistic"] = statistic if math.isfinite(statistic) else None
    result["p_value"] = p_value if math.isfinite(p_value) else None
    df = float(getattr(test, "df", math.nan))
    result["df"] = df if math.isfinite(df) else None
    spread = math.sqrt((statistics.variance(adam) + statistics.variance(svd)) / 2)
    if spread > 0:
        result["cohens_d"] = (statistics.fmean(adam) - statistics.fmean(svd)) / spread
    return result


def conclude(test: dict[str, Any], metric: str, seeds: int) -> tuple[str, str]:
    """(outcome, one-sentence verdict) for the hypothesis "SVD(Adam) trains better"."""
    what = metric.replace("_", " ")
    a, s = test["mean_adam"], test["mean_svd_adam"]
    means = (
        f"mean final {what}: SVD(Adam) {_num(s)}, tuned Adam {_num(a)} nats"
        if a is not None and s is not None
        else f"no final {what} to compare"
    )
    if min(test["n_adam"], test["n_svd_adam"]) < 2:
        return "inconclusive", (
            f"Inconclusive: too few seeds for a test ({min(test['n_adam'], test['n_svd_adam'])} "
            f"usable run(s) per optimizer of {seeds}; Welch's t-test needs at least 2); {means}."
        )
    p = test["p_value"]
    stats_text = (
        f"Welch's t = {_num(test['statistic'], 3)}, p = {_p(p)}, "
        f"Cohen's d = {_num(test['cohens_d'], 2)}"
    )
    if p is None:
        return "inconclusive", (
            f"Inconclusive: the final {what} does not vary across seeds, so Welch's t-test is "
            f"undefined (p = nan); {means}."
        )
    if p >= ALPHA:
        return "inconclusive", (
            f"Inconclusive: the difference in final {what} between SVD(Adam) and tuned Adam is "
            f"not significant at the {ALPHA:.0%} level ({stats_text}; {means}), so the "
            "hypothesis is not supported by this evidence."
        )
    if s < a:
        return "supported", (
            f"Supported: SVD(Adam) reaches a lower final {what} than tuned Adam "
            f"({stats_text}; {means})."
        )
    return "not supported", (
        f"Not supported: tuned Adam reaches a lower final {what} than SVD(Adam) "
        f"({stats_text}; {means})."
    )


def assemble_results(
    spec: ReportSpec,
    url: str,
    best: dict[str, BestTrial],
    runs: list[dict[str, Any]],
    placement: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """The results dict written as results.json: enough to redraw and re-judge everything."""
    from svdsweep.plot import BAND, figure_info

    settings = best[OPTIMIZERS[0]].settings
    summary: dict[str, Any] = {}
    for optimizer in OPTIMIZERS:
        mine = [run for run in runs if run["optimizer"] == optimizer]
        ok = [run for run in mine if run["diverged"] is None]
        summary[optimizer] = {
            "final_val_loss": _stats([run["val_loss"][-1] for run in ok]),
            "final_val_acc": _stats([run["val_acc"][-1] for run in ok]),
            "test_loss": _stats([run["test_loss"] for run in ok]),
            "test_acc": _stats([run["test_acc"] for run in ok]),
            "runs": len(mine),
            "diverged": len(mine) - len(ok),
        }
    metric = "test_loss"
    test = welch_test(summary["adam"][metric]["values"], summary["svd-adam"][metric]["values"])
    accuracy = welch_test(
        summary["adam"]["test_acc"]["values"], summary["svd-adam"]["test_acc"]["values"]
    )
    outcome, verdict = conclude(test, metric, spec.seeds)
    intervals = [(run["task_started_at"], run["task_finished_at"]) for run in runs]
    training = [(run["started_at"], run["finished_at"]) for run in runs]
    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "experiment": spec.experiment,
        "storage": redact(url),
        "protocol": {
            "epochs": spec.epochs,
            "seeds": [FINAL_SEED_BASE + i for i in range(spec.seeds)],
            "seed_rule": f"final run i of each optimizer uses seed {FINAL_SEED_BASE} + i",
            "dataset": settings.dataset,
            "model": settings.model,
            "train_subset": settings.train_subset,
            "batch_size": settings.batch_size,
            "evaluate_test": True,
            "band": BAND,
        },
        "studies": {optimizer: best[optimizer].to_dict() for optimizer in OPTIMIZERS},
        "runs": runs,
        "summary": summary,
        "test": {
            "name": "Welch's t-test (scipy.stats.ttest_ind, equal_var=False, two-sided)",
            "metric": metric,
            "alpha": ALPHA,
            **test,
            "test_acc": accuracy,
        },
        "outcome": outcome,
        "verdict": verdict,
        "figure": figure_info(),
        "versions": versions(),
        "hardware": {
            "driver": {
                "host": socket.gethostname(),
                "cpu_count": os.cpu_count(),
                "cpu_model": cpu_model(),
                "platform": platform.platform(),
            },
            "run_devices": sorted({f"{run['device']} ({run['device_name']})" for run in runs}),
            "run_nodes": sorted({f"{run['host']} ({run['node_ip']})" for run in runs}),
            **placement,
        },
        "durations": {
            "report_s": round(time.time() - started, 3),
            "final_trainings_wall_s": placement["wall_s"],
            "final_trainings_task_s_sum": round(sum(b - a for a, b in intervals), 3),
            "training_s_sum": round(sum(sum(run["epoch_seconds"]) for run in runs), 3),
            "max_concurrent_runs": max_overlap(intervals),
            "max_concurrent_trainings": max_overlap(training),
        },
    }
    finite: dict[str, Any] = _finite(results)
    return finite


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at the same instant (parallelism achieved)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def versions() -> dict[str, str]:
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


# --- 4. report.md ---------------------------------------------------------


def render_markdown(results: dict[str, Any], *, storage_flag: str | None) -> str:
    """report.md: the method, the sweep, the finals, the figure, the test, the verdict."""
    protocol, studies, summary, test = (
        results["protocol"],
        results["studies"],
        results["summary"],
        results["test"],
    )
    settings = studies["svd-adam"]["settings"]
    space = settings["space"]
    data = protocol["dataset"] + (
        f", the first {protocol['train_subset']} images of the 50k training split"
        if protocol["train_subset"]
        else ", the full 50k training split"
    )
    seeds = protocol["seeds"]
    lines = [
        "# Does SVD(Adam) train better than tuned Adam?",
        "",
        f"**Verdict. {results['verdict']}** Read it with the caveats in the "
        "[conclusion](#conclusion).",
        "",
        f"Experiment `{results['experiment']}` in `{results['storage']}`, reported "
        f"{results['created_at']} by svdsweep {results['versions']['svdsweep']}.",
        "",
        "## The method",
        "",
        "SVD(Adam) replaces each 2D weight gradient G (m×n) by its best rank-k approximation "
        "G_k = U_k Σ_k V_kᵀ (Eckart–Young) before Adam's step; biases, and gradients with "
        f"k ≥ min(m, n), are left as they are (low-rank method `{settings['method']}`). The "
        "hypothesis is that the dropped tail of the spectrum is mostly minibatch noise, so that "
        "SVD(Adam) trains better than plain Adam tuned just as carefully.",
        "",
        f"- **Sweep.** Two Optuna studies with equal budgets ({settings['budget']} trials each), "
        f"the same model (`{protocol['model']}`), data ({data}; a fixed 10k-image validation "
        f"split), batch size {protocol['batch_size']}, training seed {settings['seed']} and "
        f"{_count(settings['epochs'], 'epoch')} per trial; they differ only in the optimizer. "
        "Adam tunes "
        f"`lr` (log-uniform on [{space['lr_low']:g}, {space['lr_high']:g}]); SVD(Adam) tunes "
        f"`lr` and `k` (integer in [{space['k_low']}, {space['k_high']}]). The objective is "
        "the validation loss after the last epoch, minimised by TPE.",
        f"- **Final trainings.** Each study's best configuration, rebuilt from the trial's "
        f"parameters by the sweep's own code, retrained for {_count(protocol['epochs'], 'epoch')} "
        f"with {_count(len(seeds), 'seed')} ({_seed_range(seeds)}: distinct from each other and "
        "from the "
        "sweep's seed, the same for both optimizers), then evaluated once on the test set, "
        "which the sweep never saw.",
        f"- **Test.** {test['name']} over the seeds on the final test loss, at the "
        f"{test['alpha']:.0%} level, with Cohen's d (Adam − SVD(Adam), divided by the root "
        "mean of both variances: positive means SVD(Adam) is better).",
        "",
        "## The sweep: best parameters",
        "",
        "| study | trials (complete / pruned / failed; diverged) | best validation loss "
        "(nats) | best parameters | best trial |",
        "| --- | --- | --- | --- | --- |",
    ]
    for optimizer in OPTIMIZERS:
        study = studies[optimizer]
        c = study["trials"]
        lines.append(
            f"| `{study['study']}` | {c['COMPLETE']} / {c['PRUNED']} / {c['FAIL']}; "
            f"{c['diverged']} (budget {study['budget']}) | {study['best']['value']:.4f} | "
            f"{_params(study['best']['params'])} | #{study['best']['number']} |"
        )
    lines += [
        "",
        f"## Final trainings: {len(seeds)} seeds × {protocol['epochs']} epochs",
        "",
        "| optimizer | parameters | final validation loss (nats) | final validation accuracy "
        "| test loss (nats) | test accuracy | runs (diverged) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for optimizer in OPTIMIZERS:
        s = summary[optimizer]
        lines.append(
            f"| {LABELS[optimizer]} | {_params(studies[optimizer]['best']['params'])} | "
            f"{_mean_std(s['final_val_loss'])} | {_mean_std(s['final_val_acc'], pct=True)} | "
            f"{_mean_std(s['test_loss'])} | {_mean_std(s['test_acc'], pct=True)} | "
            f"{s['runs']} ({s['diverged']}) |"
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds (sample std, ddof = 1). Diverged runs, if any, "
        "are left out of the means and of the test.",
        "",
        f"![Validation loss, validation accuracy and top-k gradient energy per epoch]({FIGURE})",
        "",
        f"*Lines: mean over {len(seeds)} seeds; bands: {protocol['band']}. Right: the fraction "
        "‖G_k‖²/‖G‖² of each weight gradient's energy that SVD(Adam)'s rank-k approximation "
        "keeps, averaged over the epoch's steps and the projected layers.*",
        "",
        "## Significance test",
        "",
        f"{test['name']} on the final test loss: t = {_num(test['statistic'], 3)}, "
        f"df = {_num(test['df'], 1)}, p = {_p(test['p_value'])}; Cohen's d = "
        f"{_num(test['cohens_d'], 2)}. Mean test loss: SVD(Adam) {_num(test['mean_svd_adam'])}, "
        f"tuned Adam {_num(test['mean_adam'])} nats ({test['n_svd_adam']} and {test['n_adam']} "
        f"runs). For information, the same test on test accuracy gives p = "
        f"{_p(test['test_acc']['p_value'])}.",
        "",
        "## Conclusion",
        "",
        results["verdict"],
        "",
        _caveats(results),
        "",
        "## Reproduce",
        "",
        "```bash",
        "svdsweep report"
        + (f" --storage {shlex.quote(storage_flag)}" if storage_flag else "")
        + f" --experiment {shlex.quote(results['experiment'])} --epochs {protocol['epochs']}"
        f" --seeds {len(seeds)}",
        "# redraw the figure from results.json alone, without retraining:",
        "python -c \"from svdsweep.plot import redraw; redraw('results.json', 'comparison.png')\"",
        "```",
        "",
        "## Provenance",
        "",
        _provenance(results),
        "",
    ]
    return "\n".join(lines)


def _caveats(results: dict[str, Any]) -> str:
    """What a careful reader should weigh against the verdict, read off the results."""
    protocol, summary, test = results["protocol"], results["summary"], results["test"]
    settings = results["studies"]["adam"]["settings"]
    notes = [
        f"This is one dataset ({protocol['dataset']}) and one model ({protocol['model']}).",
        f"Each trial trained {_count(settings['epochs'], 'epoch')} and each final run "
        f"{protocol['epochs']}: the tuned learning rates are the best for the sweep's horizon, "
        "for both optimizers alike.",
    ]
    overfit = []
    for optimizer in OPTIMIZERS:
        curve = _mean_curve([run["val_loss"] for run in results["runs"]
                             if run["optimizer"] == optimizer and not run["diverged"]])  # fmt: skip
        if len(curve) >= 3:
            best = min(range(len(curve)), key=curve.__getitem__)
            if best < len(curve) - 1 and curve[-1] > 1.02 * curve[best]:
                overfit.append(
                    f"{LABELS[optimizer]}'s is lowest at epoch {best + 1} ({curve[best]:.4f}) "
                    f"and {curve[-1]:.4f} at epoch {len(curve)}"
                )
    if overfit:
        notes.append(
            "The mean validation loss rises before the end (overfitting): "
            + "; ".join(overfit)
            + ". The final losses then also measure how fast each tuned learning rate "
            "overfits over the longer horizon."
        )
    accuracy = test.get("test_acc", {})
    if (
        results["outcome"] != "inconclusive"
        and accuracy.get("p_value") is not None
        and accuracy["p_value"] >= test["alpha"]
    ):
        notes.append(
            f"Test accuracy does not differ significantly (SVD(Adam) "
            f"{_mean_std(summary['svd-adam']['test_acc'], pct=True)}, tuned Adam "
            f"{_mean_std(summary['adam']['test_acc'], pct=True)}; p = "
            f"{_p(accuracy['p_value'])}): the difference is in the loss, i.e. in the "
            "confidence of the predictions, not in how many are right."
        )
    if protocol["train_subset"]:
        notes.append(
            f"Training used {protocol['train_subset']} images, not the full 50k: a quick run, "
            "not the paper protocol."
        )
    space = results["studies"]["svd-adam"]["settings"]["space"]
    k = results["studies"]["svd-adam"]["best"]["params"].get("k")
    energy = [run["energy"][-1] for run in results["runs"] if run.get("energy")]
    if k is not None and k >= space["k_high"]:
        notes.append(
            f"The best k ({k}) is the top of the searched range [{space['k_low']}, "
            f"{space['k_high']}]: the sweep preferred the least truncation."
        )
    if energy and statistics.fmean(energy) > 0.999:
        notes.append(
            f"The rank-{k} gradient keeps {100 * statistics.fmean(energy):.4f}% of the "
            "gradient's energy at the last epoch: SVD(Adam) is then nearly plain Adam, so a "
            "difference between them is unlikely to come from denoising the gradient."
        )
    diverged = sum(summary[o]["diverged"] for o in OPTIMIZERS)
    if diverged:
        notes.append(f"{diverged} final run(s) diverged and are left out of the test.")
    return " ".join(notes)


def _mean_curve(curves: list[list[float | None]]) -> list[float]:
    """The per-epoch mean over the runs that reached that epoch with a finite value."""
    length = max((len(c) for c in curves), default=0)
    mean = []
    for epoch in range(length):
        values = [c[epoch] for c in curves if epoch < len(c) and c[epoch] is not None]
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not finite:
            break
        mean.append(statistics.fmean(finite))
    return mean


def _provenance(results: dict[str, Any]) -> str:
    hardware, durations, versions_ = (
        results["hardware"],
        results["durations"],
        results["versions"],
    )
    driver = hardware["driver"]
    return "\n".join(
        [
            "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions_.items()) + ".",
            f"- Driver: {driver['host']}, {driver['cpu_count']} CPUs ({driver['cpu_model']}).",
            f"- Final runs on: {', '.join(hardware['run_devices'])}; nodes "
            f"{', '.join(hardware['run_nodes'])}; {hardware['gpus_per_run']:g} GPU and "
            f"{hardware['cpus_per_run']} CPU per run on a cluster of "
            f"{hardware['cluster_resources'].get('CPU', 0):g} CPUs and "
            f"{hardware['cluster_resources'].get('GPU', 0):g} GPUs.",
            f"- Durations: final trainings {durations['final_trainings_wall_s']:.1f} s wall "
            f"for {durations['final_trainings_task_s_sum']:.1f} s of Ray tasks (up to "
            f"{durations['max_concurrent_runs']} at once); the whole report "
            f"{durations['report_s']:.1f} s. Per-run times are in results.json.",
        ]
    )


# --- 5. artifacts and notes for optuna-dashboard --------------------------


def resolve_artifact_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """``--artifact-dir``, else ``$SVDSWEEP_ARTIFACT_DIR``, else ./svdsweep-artifacts."""
    return Path(path or os.environ.get("SVDSWEEP_ARTIFACT_DIR") or DEFAULT_ARTIFACT_DIR)


def attach_artifacts(
    best: dict[str, BestTrial],
    files: dict[str, Path],
    artifact_dir: Path,
    note: Callable[[str, int, dict[str, str]], str],
) -> dict[str, dict[str, str]]:
    """Uploads ``files`` to both studies, replacing this report's previous ones; notes each.

    A previous artifact of the same file name is removed from the store and
    from the study (its ``artifacts:<id>`` system attribute), so reruns never
    pile up duplicates. Returns the new artifact ids, by study and file name.
    """
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
    from optuna_dashboard import save_note

    store = FileSystemArtifactStore(str(artifact_dir))
    uploaded: dict[str, dict[str, str]] = {}
    for optimizer, found in best.items():
        study = found.study
        ids = {
            name: retrying(
                partial(
                    upload_artifact, artifact_store=store, file_path=str(path), study_or_trial=study
                )
            )
            for name, path in files.items()
        }
        # Only after the new ones are in: a failure never loses the previous report.
        for meta in retrying(partial(get_all_artifact_meta, study)):
            if meta.filename in files and meta.artifact_id not in ids.values():
                _remove_study_artifact(study, store, meta.artifact_id)
        retrying(partial(save_note, study, note(optimizer, study._study_id, ids)))
        uploaded[study.study_name] = ids
    return uploaded


def _remove_study_artifact(study: optuna.Study, store: Any, artifact_id: str) -> None:
    """Deletes the file and the study attribute that records it (Optuna has no API for it)."""
    from optuna.artifacts.exceptions import ArtifactNotFound
    from optuna.storages._rdb import models

    with contextlib.suppress(ArtifactNotFound):  # e.g. uploaded with another --artifact-dir
        store.remove(artifact_id)
    storage = study._storage
    backend: Any = getattr(storage, "_backend", storage)

    def delete() -> None:
        with contextlib.closing(backend.scoped_session()) as session:
            session.execute(
                sqlalchemy.delete(models.StudySystemAttributeModel).where(
                    models.StudySystemAttributeModel.study_id == study._study_id,
                    models.StudySystemAttributeModel.key == f"artifacts:{artifact_id}",
                )
            )
            session.commit()

    retrying(delete)


def dashboard_note(
    results: dict[str, Any], out: Path, optimizer: str, study_id: int, ids: dict[str, str]
) -> str:
    """The Markdown note on a study in optuna-dashboard, showing the attached figure."""
    study = results["studies"][optimizer]
    rows = [
        f"| {LABELS[o]} | {_params(results['studies'][o]['best']['params'])} | "
        f"{_mean_std(results['summary'][o]['test_loss'])} | "
        f"{_mean_std(results['summary'][o]['test_acc'], pct=True)} |"
        for o in OPTIMIZERS
    ]
    return "\n".join(
        [
            f"## svdsweep report, {results['created_at']}",
            "",
            f"**{results['verdict']}**",
            "",
            f"Best trial of this study: #{study['best']['number']}, validation loss "
            f"{study['best']['value']:.4f}, {_params(study['best']['params'])}.",
            "",
            f"Final trainings, {len(results['protocol']['seeds'])} seeds × "
            f"{results['protocol']['epochs']} epochs (mean ± std over seeds):",
            "",
            "| optimizer | parameters | test loss (nats) | test accuracy |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"![comparison](/artifacts/{study_id}/{ids[FIGURE]})",
            "",
            f"`{FIGURE}` and `{REPORT}` are attached to this study (Artifacts); all files, "
            f"with `{RESULTS}`, are in `{out}`.",
        ]
    )


# --- the whole report -----------------------------------------------------


def check_outputs(out: Path, artifact_dir: Path) -> None:
    """Fails now, before any training, if ``out`` or the artifact store cannot be written."""
    with _Staging(out):
        pass
    _check_artifact_dir(artifact_dir)


def build_report(spec: ReportSpec, *, progress: bool = True) -> ReportOutcome:
    """Best trials -> final trainings -> results.json, comparison.png, report.md -> artifacts."""
    from svdsweep.plot import redraw
    from svdsweep.sweep import ray_session

    started = time.time()
    url = resolve_storage_url(spec.storage)
    storage = open_storage(url, heartbeat=False, create=False)
    best = best_trials(storage, spec.experiment)
    configs = final_configs(best, spec.epochs, spec.seeds)
    artifact_dir = resolve_artifact_dir(spec.artifact_dir).absolute()
    with _Staging(spec.out) as staging:  # fails now if --out cannot be written
        _check_artifact_dir(artifact_dir)
        for optimizer, found in best.items():
            _say(
                f"{optimizer}: best trial #{found.trial.number} of {found.study.study_name}, "
                f"val loss {found.trial.value:.4f}, {_params(found.trial.params)}",
                progress,
            )
        with ray_session(spec.ray_address, spec.ray_node_ip) as ray:
            runs, placement = run_final_trainings(
                ray, configs, spec.gpus_per_run, progress=progress
            )
        results = assemble_results(spec, url, best, runs, placement, started)
        (staging.path / RESULTS).write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
        drawn = redraw(staging.path / RESULTS, staging.path / FIGURE)
        if drawn != results["figure"]:
            raise AssertionError(f"figure drawn as {drawn}, recorded as {results['figure']}")
        storage_flag = redact(spec.storage) if spec.storage else None
        (staging.path / REPORT).write_text(render_markdown(results, storage_flag=storage_flag))
        files = {name: staging.path / name for name in ARTIFACT_FILES}
        ids = attach_artifacts(
            best, files, artifact_dir, partial(dashboard_note, results, staging.out)
        )
        staging.commit()
    return ReportOutcome(
        out=staging.out,
        artifact_dir=artifact_dir,
        storage_url=url,
        verdict=results["verdict"],
        outcome=results["outcome"],
        results=results,
        artifact_ids=ids,
    )


def dashboard_command(storage_url: str, artifact_dir: Path, *, storage_given: bool = True) -> str:
    """The exact command that opens optuna-dashboard on this storage and artifact store.

    A relative SQLite path is made absolute, so the command works from any
    directory; a password is never printed (``$SVDSWEEP_STORAGE`` is then used).
    """
    parts = ["svdsweep", "dashboard"]
    parsed = sqlalchemy.engine.make_url(storage_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        storage_url = f"sqlite:///{Path(parsed.database).absolute()}"
        storage_given = True
    elif parsed.password:
        storage_given = False  # the dashboard reads $SVDSWEEP_STORAGE like every command
    if storage_given:
        parts += ["--storage", storage_url]
    parts += ["--artifact-dir", str(artifact_dir.absolute())]
    return shlex.join(parts)


class _Staging:
    """Where a report is written before it is put in place by :meth:`commit`.

    A new ``out`` is written as a hidden sibling and renamed into place: one
    atomic step. An existing ``out`` (a previous report, an empty directory, a
    bind mount as in docker-compose, which cannot be renamed over) is written
    as a hidden directory inside it, whose files then replace the old ones one
    by one with ``os.replace`` (results.json last). An existing ``out`` that
    holds anything but a previous report is refused.

    Entering checks that ``out`` can be written (creating missing parents);
    leaving without a commit removes the staging directory and any parent it
    created, so a failed report leaves nothing that looks like a result.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out).absolute()
        self.in_place = self.out.is_dir()
        tag = uuid.uuid4().hex[:8]
        self.path = (
            self.out / f".staging-{tag}"
            if self.in_place
            else self.out.parent / f".{self.out.name}.tmp-{tag}"
        )
        self._created: list[Path] = []
        self._committed = False

    def __enter__(self) -> _Staging:
        out = self.out
        if not out.name or out == out.parent:
            raise ReportError(f"--out {out} cannot hold a report; name a directory")
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise ReportError(f"--out {out} exists and is not a directory")
            if any(out.iterdir()) and not (out / RESULTS).is_file():
                raise ReportError(
                    f"--out {out} exists and does not hold an svdsweep report (no {RESULTS}); "
                    "choose another directory or empty it"
                )
        missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self._created.append(directory)
            self.path.mkdir()
            (self.path / ".write-test").write_bytes(b"")
            (self.path / ".write-test").unlink()
        except OSError as error:
            self._clean()
            if error.filename in (str(self.path), str(self.path / ".write-test")):
                error.filename = str(self.path.parent)  # name the user's directory, not ours
            raise ReportError(f"cannot write --out {out}: {_os_reason(error)}") from None
        return self

    def commit(self) -> None:
        if self.in_place:
            for name in sorted(os.listdir(self.path), key=lambda name: name == RESULTS):
                os.replace(self.path / name, self.out / name)
            self.path.rmdir()
        else:
            self.path.rename(self.out)
        self._committed = True

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self._clean()

    def _clean(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty


def _check_artifact_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ReportError(f"cannot write --artifact-dir {directory}: {_os_reason(error)}") from None


def _os_reason(error: OSError) -> str:
    """'cannot write in /proc: No such file or directory', naming the path that failed."""
    if error.filename and error.strerror:
        return f"cannot write in {error.filename}: {error.strerror}"
    return error.strerror or str(error)


# --- small helpers --------------------------------------------------------


def _stats(values: list[float | None]) -> dict[str, Any]:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
        "n": len(finite),
        "values": finite,
    }


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _params(params: dict[str, Any]) -> str:
    from svdsweep.plot import format_params

    return format_params(params)


def _mean_std(stats: dict[str, Any], *, pct: bool = False) -> str:
    if stats["mean"] is None:
        return "n/a"
    scale, unit, digits = (100.0, "%", 2) if pct else (1.0, "", 4)
    text = f"{stats['mean'] * scale:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std'] * scale:.{digits}f}"
    return text + unit


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "nan"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _seed_range(seeds: list[int]) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}…{seeds[-1]}"


def _run_line(run: dict[str, Any]) -> str:
    where = f"{run['device']} on {run['node_ip'] or run['host']}"
    if run["diverged"]:
        return f"{run['optimizer']} seed {run['seed']}: diverged ({run['diverged']}); {where}"
    return (
        f"{run['optimizer']} seed {run['seed']}: final val loss {run['val_loss'][-1]:.4f}, "
        f"test loss {run['test_loss']:.4f}, test acc {run['test_acc']:.2%} "
        f"({run['task_finished_at'] - run['task_started_at']:.1f} s, {where})"
    )


@contextlib.contextmanager
def _run_progress(total: int, enabled: bool) -> Iterator[Any]:
    """A bar over finished runs on a terminal, and a line per run (kept in logs)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from svdsweep.progress import stderr_console

    with Progress(
        TextColumn("final trainings"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console,
        transient=True,
        disable=not enabled or not stderr_console.is_terminal,
    ) as bar:
        task = bar.add_task("final trainings", total=total)

        def advance(line: str) -> None:
            bar.advance(task)
            if enabled:
                if stderr_console.is_terminal:
                    bar.console.print(line, highlight=False)
                else:
                    print(line, file=sys.stderr, flush=True)

        yield advance


def _ray_node_ip() -> str | None:
    try:
        import ray

        return str(ray.util.get_node_ip_address()) if ray.is_initialized() else None
    except ImportError:  # pragma: no cover - ray is a dependency
        return None


def _ray_gpu_ids() -> list[str]:
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except ImportError:  # pragma: no cover
        return []


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
