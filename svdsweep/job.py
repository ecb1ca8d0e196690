"""``svdsweep run``: the whole job in one command, on the embedded defaults.

A sweep of every study (the tuning replicates of both optimizers and the rank
profile), then the report, on a local loopback-only Ray and an SQLite file in
the working directory (``sqlite:///svdsweep.db``), both used by one Ray
session. Two presets size it; every size is overridable:

* ``quick`` (default): the paper's protocol shrunk to a 10k-image subset of
  Fashion-MNIST, few trials and epochs and a coarse rank grid, sized to
  finish within about 5 minutes on 2 CPU cores;
* ``paper``: 3 tuning replicates of 30 trials per optimizer, trials of 20
  epochs (the finals' horizon) with successive-halving pruning, on the full
  50k training split; a rank profile of 10 trials per rank k in {1, 4, 16, 64,
  256}; 20-epoch finals
  over 5 seeds for each replicate's winners.

Trials and finals always train for the same number of epochs.

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
    trials: int  # finished trials per tuning study
    trial_epochs: int  # epochs per trial, and of each final training
    seeds: int  # final trainings per winner
    train_subset: int | None  # training images (None: the full 50k split)
    replicates: int  # tuning replicates per optimizer
    profile_trials: int  # trials per rank-profile study (0: no profile)
    profile_ranks: tuple[int, ...]  # () : powers of two up to full rank, and full rank
    expected: str  # how long it takes, as measured

    def describe(self) -> str:
        data = (
            f"{self.train_subset} training images"
            if self.train_subset
            else "the full 50k training split"
        )
        profile = (
            f"a rank profile of {self.profile_trials} trials per rank"
            if self.profile_trials
            else "no rank profile"
        )
        return (
            f"preset {self.name}: {self.replicates} tuning replicates of {self.trials} trials x "
            f"{self.trial_epochs} epochs per optimizer, {profile}, then {self.seeds} seeds x "
            f"{self.trial_epochs} epochs per winner, on {data} of Fashion-MNIST; experiment "
            f"{self.experiment!r}; {self.expected}"
        )


#: The full protocol: the sweep's and the reporter's defaults, with 3 tuning replicates
#: and the rank profile.
PAPER = Preset(
    name="paper",
    experiment="paper",
    # 20, not the sweep's default 30: with 3 replicates and 20-epoch trials, 30 would take
    # about 65 minutes on 2 CPU cores (measured per-epoch costs), against a 45-minute target.
    trials=20,
    trial_epochs=SweepSpec.trial_epochs,
    seeds=3,  # per winner: 9 final runs per optimizer over the 3 replicates
    train_subset=SweepSpec.train_subset,
    replicates=3,
    profile_trials=6,
    # Every fourth power of two from 1 to full rank: the ranks where the kept energy goes
    # from ~60 % (k=1) through ~99 % (k=16) to all of it, at a cost that fits 45 minutes.
    profile_ranks=(1, 4, 16, 64, 256),
    expected="measured 74 minutes on 2 CPU cores",
)
#: The paper protocol shrunk to finish within about 5 minutes on 2 CPU cores.
QUICK = replace(
    PAPER,
    name="quick",
    experiment="quick",
    trials=12,  # TPE's 10 random trials, then 2 it proposes
    trial_epochs=5,
    seeds=3,
    train_subset=8_000,
    profile_trials=4,
    expected="measured 3.5 minutes on 2 idle CPU cores",
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
    replicates: int | None = None,
    profile_trials: int | None = None,
    profile: bool = True,
    profile_ranks: tuple[int, ...] | None = None,
    experiment: str | None = None,
    out: Path = Path("results"),
    storage: str | None = None,
    artifact_dir: Path | None = None,
    ray_node_ip: str | None = None,
    progress: bool = True,
) -> ReportOutcome:
    """Sweeps every study, then reports on them; returns where everything went.

    Flags left ``None`` take the preset's value. ``epochs`` is a synonym of
    ``trial_epochs`` (trials and finals share the horizon); giving both with
    different values is refused. Bad sizes and an unwritable ``out`` fail
    here, before any training.
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    sizes = PRESETS[preset]
    if epochs is not None and trial_epochs is not None and epochs != trial_epochs:
        raise ConfigError(
            f"--epochs {epochs} and --trial-epochs {trial_epochs} differ: trials and finals "
            "train for the same horizon, so that the sweep tunes what the verdict measures"
        )
    overrides: dict[str, Any] = {
        "trials": trials,
        "trial_epochs": trial_epochs if trial_epochs is not None else epochs,
        "seeds": seeds,
        "train_subset": train_subset,
        "replicates": replicates,
        "profile_trials": 0 if not profile else profile_trials,
        "profile_ranks": profile_ranks,
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
        epochs=sizes.trial_epochs,
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
        replicates=sizes.replicates,
        profile_trials=sizes.profile_trials,
        profile_ranks=sizes.profile_ranks,
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
