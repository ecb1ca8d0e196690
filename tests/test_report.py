"""The reporter and ``svdsweep run``, on real components.

Real Optuna storages (SQLite and PostgreSQL), a real local Ray (one per module,
loopback-only, token auth), real training on a 2000-image slice of
Fashion-MNIST: tiny sweeps of 2 trials x 1 epoch per study, reports of
2 seeds x 2 epochs per optimizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import optuna
import pytest
import torch
from conftest import SVDSWEEP, fresh_database, svdsweep_cli
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna_dashboard import get_note

from svdsweep.cluster import LOCAL_RAY_NODE_IP, ray_session
from svdsweep.plot import redraw
from svdsweep.report import FINAL_SEED_BASE, ReportOutcome, ReportSpec, build_report
from svdsweep.report.stats import format_params
from svdsweep.score import early_stopped
from svdsweep.space import config_from_params
from svdsweep.studies import create_or_resume, load_settings, study_name
from svdsweep.sweep import SweepSpec, run_sweep
from svdsweep.train import OPTIMIZERS, train

EXPERIMENT = "rep"
#: Two tuning replicates and a two-rank profile: every part of the protocol, tiny.
TINY_SWEEP = {
    "trials": 2,
    "trial_epochs": 2,
    "train_subset": 2000,
    "replicates": 2,
    "profile_trials": 2,
    "profile_ranks": (4, 256),
}
EPOCHS, SEEDS = 2, 2
TUNING_STUDIES = [
    f"{EXPERIMENT}-{optimizer}{suffix}"
    for suffix in ("", "-r2")
    for optimizer in ("adam", "svd-adam")
]
FILES = ["comparison.png", "rank_profile.png", "report.md", "results.json"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Token auth, an isolated data cache, no inherited storage/Ray/artifact settings.

    Set before Ray starts, so its workers inherit it; subprocesses get it too.
    """
    saved = dict(os.environ)
    for name in ("RAY_ADDRESS", "SVDSWEEP_STORAGE", "SVDSWEEP_ARTIFACT_DIR"):
        os.environ.pop(name, None)
    os.environ.update(
        RAY_AUTH_MODE="token",
        SVDSWEEP_RAY_LOGS="0",
        SVDSWEEP_CACHE_DIR=str(tmp_path_factory.mktemp("cache")),
    )
    yield {**os.environ, "RAY_ADDRESS": ""}
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def ray_cluster(module_env: dict[str, str]) -> Iterator[Any]:
    """One local Ray for the module (ray.init takes seconds); reports reuse it."""
    with ray_session("local") as ray:
        yield ray


@pytest.fixture(scope="module")
def swept(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tiny real sweep in SQLite and one in PostgreSQL: backend -> storage URL.

    Read-only for the tests: one that changes a storage works on a copy.
    """
    with fresh_database("report") as pg_url:
        urls = {
            "sqlite": f"sqlite:///{tmp_path_factory.mktemp('sqlite')}/sweep.db",
            "postgresql": pg_url,
        }
        for url in urls.values():
            final = run_sweep(
                SweepSpec(storage=url, experiment=EXPERIMENT, **TINY_SWEEP), progress=False
            )
            assert [study.finished for study in final] == [2] * 7  # 4 tuning + 3 profile
        yield urls


@pytest.fixture(scope="module")
def reported(
    swept: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ReportOutcome]:
    """One report per backend: 2 seeds x 2 epochs per winner."""
    return {
        backend: _report(url, tmp_path_factory.mktemp(f"report-{backend}"))
        for backend, url in swept.items()
    }


def _report(url: str, directory: Path, epochs: int = EPOCHS) -> ReportOutcome:
    """A report of the tiny sweep at ``url``, into ``directory``/results and /artifacts."""
    spec = ReportSpec(
        storage=url,
        experiment=EXPERIMENT,
        epochs=epochs,
        seeds=SEEDS,
        out=directory / "results",
        artifact_dir=directory / "artifacts",
    )
    return build_report(spec, progress=False)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _best(url: str, optimizer: str, replicate: int = 1) -> optuna.trial.FrozenTrial:
    name = study_name(EXPERIMENT, optimizer) + ("" if replicate == 1 else f"-r{replicate}")
    return optuna.load_study(study_name=name, storage=url).best_trial


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_report_from_a_real_sweep(
    backend: str, reported: dict[str, ReportOutcome], swept: dict[str, str]
) -> None:
    outcome = reported[backend]
    assert sorted(p.name for p in outcome.out.iterdir()) == FILES
    assert not [p for p in outcome.out.parent.iterdir() if p.name.startswith(".results")]

    # The figures: PNGs of sensible size, with the panels results.json records.
    results = json.loads(outcome.results_json.read_text())
    for figure, key in (
        (outcome.figure, "figure"),
        (outcome.out / "rank_profile.png", "profile_figure"),
    ):
        width, height = _png_size(figure)
        assert (width, height) == tuple(results[key]["size_px"])
        assert 600 <= width <= 2400 and 400 <= height <= 1000
        assert matplotlib.image.imread(figure).shape[:2] == (height, width)
        assert figure.stat().st_size > 20_000  # drawn, not blank
    assert results["figure"]["panels"] == ["val_loss", "val_acc", "energy", "test_loss"]

    # results.json: every replicate's winners retrained over every seed, with the
    # early-stopped and the last epoch's test numbers.
    seeds = [FINAL_SEED_BASE + i for i in range(SEEDS)]
    assert results["protocol"]["seeds"] == seeds
    assert results["protocol"]["replicates"] == 2
    assert results["protocol"]["train_subset"] == TINY_SWEEP["train_subset"]
    assert results["protocol"]["primary_metric"].startswith(
        "test loss (cross-entropy, nats) of the early-stopped model"
    )
    for replicate in (1, 2):
        (record,) = [r for r in results["replicates"] if r["replicate"] == replicate]
        for optimizer in OPTIMIZERS:
            runs = [
                run
                for run in results["runs"]
                if run["optimizer"] == optimizer and run["replicate"] == replicate
            ]
            assert sorted(run["seed"] for run in runs) == seeds
            best = _best(swept[backend], optimizer, replicate)
            for run in runs:
                assert run["config"]["seed"] == run["seed"] and run["config"]["evaluate_test"]
                assert run["config"]["lr"] == best.params["lr"]
                for curve in ("train_loss", "val_loss", "val_acc", "epoch_seconds"):
                    assert len(run[curve]) == EPOCHS, curve
                assert len(run["energy"]) == (EPOCHS if optimizer == "svd-adam" else 0)
                assert 1 <= run["best_epoch"] <= EPOCHS
                assert run["best_val_loss"] == min(run["val_loss"])
                assert 0.0 < run["test_acc"] <= 1.0 and run["test_loss"] > 0
                assert 0.0 < run["last_test_acc"] <= 1.0 and run["last_test_loss"] > 0
                if run["best_epoch"] == EPOCHS:  # the last epoch is the early-stopped model
                    assert run["test_loss"] == run["last_test_loss"]
                assert run["started_at"] < run["finished_at"]
            study = record["studies"][optimizer]
            assert study["best"]["params"] == best.params
            assert study["best"]["number"] == best.number
            assert study["best"]["value"] == best.value
            assert study["trials"]["COMPLETE"] + study["trials"]["PRUNED"] == 2
        assert 0.0 <= record["test"]["p_value"] <= 1.0
        assert record["outcome"] in ("supported", "not supported", "inconclusive")
    assert set(results["versions"]) >= {"svdsweep", "torch", "optuna", "ray"}
    assert results["hardware"]["driver"]["cpu_count"] >= 1
    assert results["hardware"]["run_devices"] and results["hardware"]["run_nodes"]
    assert results["durations"]["final_trainings_wall_s"] > 0

    # The rank profile: one best score per grid rank, and Adam's reference.
    profile = results["profile"]
    assert [point["rank"] for point in profile["ranks"]] == [4, 256]
    assert profile["full_rank"] == 256 and profile["budget"] == 2
    for point in [*profile["ranks"], profile["adam"]]:
        name = point["study"]
        study = optuna.load_study(study_name=name, storage=swept[backend])
        assert point["value"] == study.best_value and point["params"] == study.best_params
    assert profile["ranks"][1]["kept_energy"] == 1.0  # full rank truncates nothing
    assert 0.0 < profile["ranks"][0]["kept_energy"] < 1.0
    assert profile["sentence"] and profile["trials"] == 6

    # report.md: the primary metric before any number, every winner, both figures, the verdict.
    text = outcome.report.read_text()
    assert text.index("**Primary metric**") < text.index("**Verdict.")
    assert not re.search(r"\d", text[: text.index("**Verdict.")].split("**Primary metric**")[0])
    for replicate in (1, 2):
        for optimizer in OPTIMIZERS:
            assert format_params(_best(swept[backend], optimizer, replicate).params) in text
    assert "| 1 | Adam |" in text and "| 2 | SVD(Adam) |" in text
    assert "(comparison.png)" in text and "(rank_profile.png)" in text
    assert "## The rank profile" in text and profile["sentence"][1:] in text
    assert "**The original experiment**" in text and "88.33%" in text
    verdict = results["verdict"]
    assert verdict.split(":")[0] in (
        "Supported",
        "Not supported",
        "Inconclusive",
        "This comparison does not test denoising",
    )
    assert f"**Verdict. {verdict}**" in text


def test_final_trainings_ran_in_parallel_on_ray_workers(
    ray_cluster: Any, reported: dict[str, ReportOutcome]
) -> None:
    assert ray_cluster.cluster_resources()["CPU"] >= 2
    runs = reported["sqlite"].results.runs
    assert len(runs) == 2 * 2 * SEEDS  # 2 replicates x 2 optimizers
    assert len({run.pid for run in runs}) >= 2, "all runs in one worker process"
    assert all(run.node_ip == LOCAL_RAY_NODE_IP for run in runs)  # loopback-only
    # Some two runs were in flight at the same instant.
    intervals = sorted((run.task_started_at, run.task_finished_at) for run in runs)
    assert any(
        later[0] < earlier[1] for i, earlier in enumerate(intervals) for later in intervals[i + 1 :]
    ), intervals
    assert reported["sqlite"].results.durations.max_concurrent_runs >= 2


def test_the_figure_is_redrawn_from_results_json_alone(
    reported: dict[str, ReportOutcome], tmp_path: Path
) -> None:
    outcome = reported["sqlite"]
    info = redraw(outcome.results_json, tmp_path)
    assert [figure.file for figure in info] == ["comparison.png", "rank_profile.png"]
    assert info[0].panels == ["val_loss", "val_acc", "energy", "test_loss"]
    for name in ("comparison.png", "rank_profile.png"):
        original = matplotlib.image.imread(outcome.out / name)
        again = matplotlib.image.imread(tmp_path / name)
        assert (original == again).all(), name


def test_a_retrain_reproduces_its_trial(swept: dict[str, str]) -> None:
    """config_from_params(settings, best.params) on CPU gives the trial's own curve."""
    url = swept["sqlite"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial's Ray worker (num_cpus=1)
    try:
        for optimizer in OPTIMIZERS:
            best = _best(url, optimizer)
            settings = load_settings(optuna.storages.RDBStorage(url), EXPERIMENT, optimizer)
            config = config_from_params(settings, best.params, device="cpu")
            assert config.epochs == TINY_SWEEP["trial_epochs"]
            assert config.train_subset == TINY_SWEEP["train_subset"]
            recorded = best.user_attrs["curves"]["val_loss"]
            retrained = train(config).val_loss
            assert retrained == pytest.approx(recorded, abs=1e-6, rel=0)
            assert early_stopped(retrained).value == pytest.approx(best.value, abs=1e-6, rel=0)
    finally:
        torch.set_num_threads(threads)


def test_artifacts_are_attached_and_a_rerun_replaces_them(
    swept: dict[str, str], reported: dict[str, ReportOutcome], tmp_path: Path
) -> None:
    """On a copy of the SQLite sweep, whose studies hold the shared report's artifacts."""
    shutil.copy(swept["sqlite"].removeprefix("sqlite:///"), tmp_path / "sweep.db")
    url = f"sqlite:///{tmp_path}/sweep.db"

    # The shared report's artifacts (in another store) are replaced by this one's.
    first = _report(url, tmp_path)
    store = FileSystemArtifactStore(str(first.artifact_dir))

    def attached() -> dict[str, dict[str, str]]:
        found = {}
        for name in TUNING_STUDIES:
            study = optuna.load_study(study_name=name, storage=url)
            metas = get_all_artifact_meta(study)
            assert sorted(m.filename for m in metas) == [
                "comparison.png",
                "rank_profile.png",
                "report.md",
            ]
            found[study.study_name] = {m.filename: m.artifact_id for m in metas}
            assert found[study.study_name]["comparison.png"] in get_note(study), (
                "the note shows the figure"
            )
        return found

    def downloaded(artifact_id: str, path: Path) -> bytes:
        download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(path))
        return path.read_bytes()

    before = attached()
    assert before == first.artifact_ids
    for ids in before.values():
        report_id = ids["report.md"]
        assert downloaded(report_id, first.out.parent / f"{report_id}.md") == (
            first.report.read_bytes()
        )

    rerun = _report(url, tmp_path, epochs=1)
    after = attached()  # still exactly one figure and one report per study
    assert after == rerun.artifact_ids
    for name in after:
        assert set(after[name].values()).isdisjoint(before[name].values())
    assert len(list(first.artifact_dir.iterdir())) == 3 * len(TUNING_STUDIES), "old files removed"
    for ids in after.values():
        report_id = ids["report.md"]
        content = downloaded(report_id, first.out.parent / f"{report_id}.md").decode()
        assert content == rerun.report.read_text()
        assert f"{SEEDS} seeds × 1 epochs per winner" in content
    assert json.loads(rerun.results_json.read_text())["protocol"]["epochs"] == 1
    assert not [p for p in first.out.parent.iterdir() if p.name.startswith(".results")]
    assert sorted(p.name for p in first.out.iterdir()) == FILES, "replaced in place, no staging"


@pytest.fixture(scope="module")
def empty_study(module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """An experiment whose studies exist but have no trial."""
    url = f"sqlite:///{tmp_path_factory.mktemp('empty')}/empty.db"
    spec = SweepSpec(storage=url, experiment="empty", **TINY_SWEEP)
    create_or_resume(url, "empty", spec.study_settings())
    return url


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing study", "error: no study 'nope-adam' in this storage"),
        ("no completed trial", "error: study 'empty-adam' has no completed trial (no trials)"),
        ("--out under a file", "error: cannot write --out "),
        ("--out in /proc", "error: cannot write --out /proc/"),
        ("--seeds 0", "error: --seeds must be a positive integer, got 0"),
        ("--epochs 0", "error: --epochs must be a positive integer, got 0"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_results(
    case: str,
    message: str,
    swept: dict[str, str],
    empty_study: str,
    module_env: dict[str, str],
    tmp_path: Path,
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    out = {
        "--out under a file": tmp_path / "a-file" / "results",
        "--out in /proc": Path(f"/proc/svdsweep-{uuid.uuid4().hex[:6]}"),
    }.get(case, tmp_path / "results")
    args = {
        "missing study": ["--storage", swept["sqlite"], "--experiment", "nope"],
        "no completed trial": ["--storage", empty_study, "--experiment", "empty"],
        "--seeds 0": ["--storage", swept["sqlite"], "--experiment", EXPERIMENT, "--seeds", "0"],
        "--epochs 0": ["--storage", swept["sqlite"], "--experiment", EXPERIMENT, "--epochs", "0"],
    }.get(case, ["--storage", swept["sqlite"], "--experiment", EXPERIMENT])
    artifacts = tmp_path / "artifacts"
    result = svdsweep_cli(
        "report", *args, "--out", str(out), "--artifact-dir", str(artifacts), env=module_env
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], "nothing else written"


def test_svdsweep_run_quick_end_to_end(module_env: dict[str, str], tmp_path: Path) -> None:
    """The quick preset at test sizes: replicates, the rank profile, the report, the dashboard."""
    result = svdsweep_cli(
        *("run", "--trials", "2", "--trial-epochs", "2", "--seeds", "2"),
        *("--train-subset", "2000", "--profile-trials", "1"),
        env=module_env,
        cwd=tmp_path,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.startswith(
        "preset quick: 3 tuning replicates of 2 trials x 2 epochs per optimizer, a rank profile "
        "of 1 trials per rank, then 2 seeds x 2 epochs per winner"
    )
    for name in FILES:
        assert (tmp_path / "results" / name).is_file()
    for name in ("comparison.png", "report.md", "results.json"):
        assert f"{tmp_path / 'results' / name}" in result.stdout
    program, arguments = result.stdout.strip().splitlines()[-1].strip().split(" ", 1)
    assert arguments == (
        f"dashboard --storage sqlite:///{tmp_path}/svdsweep.db "
        f"--artifact-dir {tmp_path}/svdsweep-artifacts"
    )
    # It works as printed, from the user's shell: the program is found as written.
    found = shutil.which(program, path=module_env.get("PATH"))
    assert found and Path(found).resolve() == Path(SVDSWEEP).resolve(), program
    url = f"sqlite:///{tmp_path}/svdsweep.db"
    names = optuna.get_all_study_names(url)
    tuning = [f"quick-{o}{r}" for r in ("", "-r2", "-r3") for o in OPTIMIZERS]
    profile = ["quick-profile-adam"] + [f"quick-profile-k{k}" for k in (1, 4, 16, 64, 256)]
    assert sorted(names) == sorted(tuning + profile)
    for name in tuning:
        study = optuna.load_study(study_name=name, storage=url)
        assert len(study.trials) == 2
        assert len(get_all_artifact_meta(study)) == 3
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["experiment"] == "quick" and results["protocol"]["epochs"] == 2
    assert len(results["replicates"]) == 3
    assert [point["rank"] for point in results["profile"]["ranks"]] == [1, 4, 16, 64, 256]
    assert all(point["value"] is not None for point in results["profile"]["ranks"])


def test_two_runs_of_the_quick_preset_reach_the_same_verdict_category(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    """Parallel TPE makes each tuning run one draw; the verdict must not depend on it.

    12 trials per study, so that TPE (after its 10 random trials) proposes from
    histories whose order the 2 workers decide; smaller data and epochs than
    the preset, for time.
    """
    outcomes = []
    for attempt in ("first", "second"):
        directory = tmp_path / attempt
        directory.mkdir()
        result = svdsweep_cli(
            *("run", "--trials", "12", "--trial-epochs", "3", "--seeds", "3"),
            *("--train-subset", "3000", "--no-profile"),
            env=module_env,
            cwd=directory,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outcomes.append(json.loads((directory / "results" / "results.json").read_text()))
    first, second = outcomes
    assert first["outcome"] == second["outcome"], (first["verdict"], second["verdict"])
    assert first["outcome"] in ("supported", "not supported", "inconclusive", "untested")


def test_svdsweep_run_refuses_bad_sizes_before_doing_anything(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    result = svdsweep_cli("run", "--seeds", "0", env=module_env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --seeds must be a positive integer, got 0"
    assert list(tmp_path.iterdir()) == [], "no database, no results, no artifact store"


def test_a_printed_command_names_the_script_when_path_does_not_find_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`.venv/bin/svdsweep run` without an active venv: bare `svdsweep` would not run."""
    from svdsweep.report.artifacts import svdsweep_command

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert Path(svdsweep_command()).resolve() == Path(SVDSWEEP).resolve()
    monkeypatch.setenv("PATH", f"{Path(SVDSWEEP).parent}:/usr/bin")
    assert svdsweep_command() == "svdsweep"
