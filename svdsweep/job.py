"""``svdsweep run``: the whole job in one command, on the embedded defaults.

A sweep of both studies, then the report, on a local loopback-only Ray and an
SQLite file in the working directory (``sqlite:///svdsweep.db``), both used by
one Ray session. Two presets size it; every size is overridable:

* ``quick`` (default): a 10k-image subset of Fashion-MNIST, few trials and
  epochs, sized to finish within about 5 minutes on 2 CPU cores (58 s measured
  on idle ones);
* ``paper``: the original protocol: 30 trials of 5 epochs per study on the
  full 50k training split, then 20-epoch finals over 5 seeds.

Each preset has its own default experiment name, so a quick run never resumes,
or collides with, the paper's studies (which have other settings).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from svdsweep.cluster import local_ray
from svdsweep.database import DEFAULT_STORAGE, redact, resolve_storage_url
from svdsweep.errors import ConfigError
from svdsweep.progress import say
from svdsweep.report import (
    ReportOutcome,
    ReportSpec,
    build_report,
    check_outputs,
    resolve_artifact_dir,
)
from svdsweep.studies import check_resumable
from svdsweep.sweep import SweepSpec, run_sweep

__all__ = ["PRESETS", "Preset", "run_job"]


@dataclass(frozen=True)
class Preset:
    """The sizes of one ``svdsweep run``."""

    name: str
    experiment: str  # default experiment name: one per preset
    trials: int  # finished trials per study
    trial_epochs: int  # epochs per trial
    epochs: int  # epochs of each final training
    seeds: int  # final trainings per optimizer
    train_subset: int | None  # training images (None: the full 50k split)
    expected: str  # how long it takes, as measured

    def describe(self) -> str:
        data = (
            f"{self.train_subset} training images"
            if self.train_subset
            else "the full 50k training split"
        )
        return (
            f"preset {self.name}: {self.trials} trials x {self.trial_epochs} epochs per study, "
            f"then {self.seeds} seeds x {self.epochs} epochs per optimizer, on {data} of "
            f"Fashion-MNIST; experiment {self.experiment!r}; {self.expected}"
        )


#: The original protocol: exactly the sweep's and the reporter's own defaults.
PAPER = Preset(
    name="paper",
    experiment="paper",
    trials=SweepSpec.trials,
    trial_epochs=SweepSpec.trial_epochs,
    epochs=ReportSpec.epochs,
    seeds=ReportSpec.seeds,
    train_subset=SweepSpec.train_subset,
    expected="measured 15 minutes on 2 CPU cores",
)
#: The paper protocol shrunk to finish within about 5 minutes on 2 CPU cores.
QUICK = replace(
    PAPER,
    name="quick",
    experiment="quick",
    trials=20,
    trial_epochs=4,
    epochs=12,
    train_subset=10_000,
    expected="measured 58 s on 2 idle CPU cores, under 5 minutes on busy ones",
)
PRESETS = {preset.name: preset for preset in (QUICK, PAPER)}


def run_job(
    preset: str = "quick",
    *,
    trials: int | None = None,
    trial_epochs: int | None = None,
    epochs: int | None = None,
    seeds: int | None = None,
    train_subset: int | None = None,
    experiment: str | None = None,
    out: Path = Path("results"),
    storage: str | None = None,
    artifact_dir: Path | None = None,
    ray_node_ip: str | None = None,
    progress: bool = True,
) -> ReportOutcome:
    """Sweeps both studies, then reports on them; returns where everything went.

    Flags left ``None`` take the preset's value. Bad sizes and an unwritable
    ``out`` fail here, before any training.
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    sizes = PRESETS[preset]
    overrides: dict[str, Any] = {
        "trials": trials,
        "trial_epochs": trial_epochs,
        "epochs": epochs,
        "seeds": seeds,
        "train_subset": train_subset,
        "experiment": experiment,
    }
    changed = {name: value for name, value in overrides.items() if value is not None}
    if changed:
        sizes = replace(sizes, **changed, expected="sizes overridden by flags")
    # `run` keeps to its own default rather than $SVDSWEEP_STORAGE; "" is an error.
    url = resolve_storage_url(DEFAULT_STORAGE if storage is None else storage)
    report_spec = ReportSpec(  # validates --epochs and --seeds
        storage=url,
        experiment=sizes.experiment,
        epochs=sizes.epochs,
        seeds=sizes.seeds,
        out=out,
        ray_address="local",
        ray_node_ip=ray_node_ip,
        artifact_dir=resolve_artifact_dir(artifact_dir),
    )
    sweep_spec = SweepSpec(  # raises ConfigError on a bad size, before Ray starts
        storage=url,
        experiment=sizes.experiment,
        trials=sizes.trials,
        trial_epochs=sizes.trial_epochs,
        train_subset=sizes.train_subset,
        ray_address="local",
        ray_node_ip=ray_node_ip,
    )
    # Everything that can be checked, before anything is written and before Ray starts
    # (~10 s): the storage URL, the database's reachability, any existing studies.
    check_resumable(url, sweep_spec.experiment, sweep_spec.study_settings())
    check_outputs(out, report_spec.artifact_dir or Path(), progress=progress)
    say(f"{sizes.describe()}; storage {redact(url)}", progress)
    with local_ray(ray_node_ip):
        run_sweep(sweep_spec, progress=progress)
        return build_report(report_spec, progress=progress)
