"""The reporter: best trials -> final trainings on Ray -> results.json -> figure -> report.md.

One flow, each step in its own module:

1. :mod:`.finals`: each tuning replicate's best trial per optimizer, its
   config rebuilt by the sweep's own code, retrained over several seeds as Ray
   tasks in parallel; :mod:`.profile`: the rank profile's best score per rank;
2. :mod:`.results`: every curve, parameter and seed, the test (:mod:`.stats`),
   versions, hardware and durations, written as ``results.json``. The figure
   is then drawn *from that file* (:func:`svdsweep.plot.redraw`), which proves
   it can be redrawn without retraining, and so is report.md (:mod:`.markdown`);
3. :mod:`.artifacts`: the figures and the report attached to every tuning study in an
   Optuna artifact store, with a note on each, for optuna-dashboard. Rerunning
   replaces them.

Nothing is left half-written: inputs and the writability of ``--out`` and the
artifact store are checked before any training, everything is written into a
hidden staging directory that is put in place at the very end
(:mod:`.staging`), and a failure removes it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from svdsweep.cluster import ray_session
from svdsweep.database import redact, resolve_storage_url
from svdsweep.errors import ConfigError
from svdsweep.plot import BAND, PROFILE_FIGURE, figure_info, profile_figure_info, redraw
from svdsweep.progress import say
from svdsweep.report.artifacts import (
    attach_artifacts,
    check_artifact_dir,
    dashboard_command,
    resolve_artifact_dir,
)
from svdsweep.report.finals import FINAL_SEED_BASE, best_trials, final_configs, run_final_trainings
from svdsweep.report.markdown import FIGURE, REPORT, dashboard_note, render_markdown
from svdsweep.report.profile import read_profile
from svdsweep.report.profile import sentence as profile_sentence
from svdsweep.report.results import (
    PRIMARY_METRIC,
    SECONDARY_METRIC,
    VERDICT_RULE,
    Protocol,
    Results,
    assemble,
    judge_replicate,
    seed_noise,
)
from svdsweep.report.staging import RESULTS, ReportError, Staging, child_processes
from svdsweep.report.stats import format_params
from svdsweep.storage import open_storage
from svdsweep.studies import DEFAULT_EXPERIMENT

__all__ = [
    "FINAL_SEED_BASE",
    "ReportError",
    "ReportOutcome",
    "ReportSpec",
    "build_report",
    "check_outputs",
    "dashboard_command",
    "resolve_artifact_dir",
]

#: Files attached to every tuning study as Optuna artifacts (replaced on every rerun).
ARTIFACT_FILES = (FIGURE, REPORT)


@dataclass(frozen=True)
class ReportSpec:
    """Everything ``svdsweep report`` is given; each default is the CLI's."""

    storage: str | None = None  # URL; None: $SVDSWEEP_STORAGE, else sqlite:///svdsweep.db
    experiment: str = DEFAULT_EXPERIMENT
    #: Epochs of each final training; None: the trials' own horizon (20 in the paper
    #: preset), so that the finals measure what the sweep tuned.
    epochs: int | None = None
    #: Final trainings per optimizer: the original protocol's 5 (Welch's test needs 2).
    seeds: int = 5
    out: Path = Path("results")  # replaced atomically at the end
    ray_address: str | None = None  # None: $RAY_ADDRESS, else start a local Ray
    ray_node_ip: str | None = None  # None: see svdsweep.cluster.ray_session
    gpus_per_run: float | None = None  # None: 1 when the cluster has GPUs, else 0
    artifact_dir: Path | None = None  # None: $SVDSWEEP_ARTIFACT_DIR, else ./svdsweep-artifacts

    def __post_init__(self) -> None:
        for name in ("epochs", "seeds"):
            value = getattr(self, name)
            if name == "epochs" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
        if self.gpus_per_run is not None and not (
            math.isfinite(self.gpus_per_run) and self.gpus_per_run >= 0
        ):
            raise ConfigError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run!r}")


@dataclass
class ReportOutcome:
    """Where everything went, and the verdict."""

    out: Path
    artifact_dir: Path
    storage_url: str
    verdict: str
    outcome: str  # "supported", "not supported", "inconclusive" or "untested"
    results: Results = field(repr=False)
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


def check_outputs(out: Path, artifact_dir: Path, *, progress: bool = True) -> None:
    """Fails now, before any training, if ``out`` or the artifact store cannot be written.

    Also removes what a killed report left for ``out`` (see :class:`Staging`).
    """
    with Staging(out) as staging:
        _say_leftovers(staging, progress)
    check_artifact_dir(artifact_dir)


def _say_leftovers(staging: Staging, progress: bool) -> None:
    if staging.leftovers:
        names = ", ".join(str(path) for path in staging.leftovers)
        say(f"removed what a killed report left (and stopped its Ray): {names}", progress)


def build_report(spec: ReportSpec, *, progress: bool = True) -> ReportOutcome:
    """Best trials -> final trainings -> results.json, comparison.png, report.md -> artifacts."""
    started = time.time()
    url = resolve_storage_url(spec.storage)
    storage = open_storage(url, heartbeat=False, create=False)
    best = best_trials(storage, spec.experiment)
    profile = read_profile(storage, spec.experiment)
    jobs = final_configs(best, spec.epochs, spec.seeds)
    artifact_dir = resolve_artifact_dir(spec.artifact_dir).absolute()
    with Staging(spec.out) as staging:  # fails now if --out cannot be written
        _say_leftovers(staging, progress)
        check_artifact_dir(artifact_dir)
        for replicate, pair in best.items():
            for optimizer, found in pair.items():
                say(
                    f"replicate {replicate}, {optimizer}: best trial #{found.trial.number} of "
                    f"{found.study.study_name}, early-stopped val loss {found.trial.value:.4f}, "
                    f"{format_params(found.trial.params)}",
                    progress,
                )
        with ray_session(spec.ray_address, spec.ray_node_ip) as ray:
            # If this process is killed, the next report stops the Ray it started.
            staging.record_processes(child_processes())
            runs, hardware = run_final_trainings(ray, jobs, spec.gpus_per_run, progress=progress)
        replicates = [
            judge_replicate(
                replicate,
                {optimizer: found.record() for optimizer, found in pair.items()},
                [run for run in runs if run.replicate == replicate],
            )
            for replicate, pair in best.items()
        ]
        if profile is not None:  # read now against the finals' seed-to-seed noise
            profile.noise = seed_noise(runs)
            profile.sentence = profile_sentence(profile.adam, profile.ranks, profile.noise)
        settings = best[min(best)]["adam"].settings
        assembled = assemble(
            experiment=spec.experiment,
            storage=redact(url),
            protocol=Protocol(
                epochs=jobs[0].config.epochs,
                seeds=[FINAL_SEED_BASE + i for i in range(spec.seeds)],
                seed_rule=f"final run i of each winner uses seed {FINAL_SEED_BASE} + i",
                dataset=settings.dataset,
                model=settings.model,
                train_subset=settings.train_subset,
                batch_size=settings.batch_size,
                evaluate_test=True,
                band=BAND,
                replicates=len(best),
                primary_metric=PRIMARY_METRIC,
                secondary_metric=SECONDARY_METRIC,
                verdict_rule=VERDICT_RULE,
            ),
            replicates=replicates,
            runs=runs,
            profile=profile,
            hardware=hardware,
            figure=figure_info(FIGURE),
            profile_figure=profile_figure_info() if profile else None,
            started=started,
        )
        (staging.path / RESULTS).write_text(assembled.to_json())
        # Everything below is drawn from the file, as a reader would redraw it.
        results = Results.read(staging.path / RESULTS)
        drawn = redraw(staging.path / RESULTS, staging.path)
        if drawn != [results.figure, *([results.profile_figure] if results.profile_figure else [])]:
            raise AssertionError(f"figures drawn as {drawn}, recorded as {results.figure}")
        storage_flag = redact(spec.storage) if spec.storage else None
        (staging.path / REPORT).write_text(render_markdown(results, storage_flag=storage_flag))
        files = [*ARTIFACT_FILES, *([PROFILE_FIGURE] if results.profile_figure else [])]
        ids = attach_artifacts(
            {
                found.study.study_name: found.study
                for pair in best.values()
                for found in pair.values()
            },
            {name: staging.path / name for name in files},
            artifact_dir,
            partial(dashboard_note, results, staging.out),
        )
        staging.commit()
    return ReportOutcome(
        out=staging.out,
        artifact_dir=artifact_dir,
        storage_url=url,
        verdict=results.verdict,
        outcome=results.outcome,
        results=results,
        artifact_ids=ids,
    )
