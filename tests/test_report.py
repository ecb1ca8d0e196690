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
from svdsweep.space import config_from_params
from svdsweep.studies import create_or_resume, load_settings, study_name
from svdsweep.sweep import SweepSpec, run_sweep
from svdsweep.train import OPTIMIZERS, train

EXPERIMENT = "rep"
TINY_SWEEP = {"trials": 2, "trial_epochs": 1, "train_subset": 2000}
EPOCHS, SEEDS = 2, 2
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
            assert [study.finished for study in final] == [2, 2]
        yield urls


@pytest.fixture(scope="module")
def reported(
    swept: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ReportOutcome]:
    """One report per backend: 2 seeds x 2 epochs per optimizer."""
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


def _best(url: str, optimizer: str) -> optuna.trial.FrozenTrial:
    return optuna.load_study(study_name=study_name(EXPERIMENT, optimizer), storage=url).best_trial


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_report_from_a_real_sweep(
    backend: str, reported: dict[str, ReportOutcome], swept: dict[str, str]
) -> None:
    outcome = reported[backend]
    assert sorted(p.name for p in outcome.out.iterdir()) == [
        "comparison.png",
        "report.md",
        "results.json",
    ]
    assert not [p for p in outcome.out.parent.iterdir() if p.name.startswith(".results")]

    # The figure: a PNG of sensible size, with the panels results.json records.
    results = json.loads(outcome.results_json.read_text())
    width, height = _png_size(outcome.figure)
    assert (width, height) == tuple(results["figure"]["size_px"])
    assert 1200 <= width <= 2400 and 400 <= height <= 1000
    assert matplotlib.image.imread(outcome.figure).shape[:2] == (height, width)
    assert outcome.figure.stat().st_size > 20_000  # drawn, not blank
    assert results["figure"]["panels"] == ["val_loss", "val_acc", "energy"]

    # results.json: every curve with the right length, every seed, provenance.
    seeds = [FINAL_SEED_BASE + i for i in range(SEEDS)]
    assert results["protocol"]["seeds"] == seeds
    assert results["protocol"]["train_subset"] == TINY_SWEEP["train_subset"]
    for optimizer in OPTIMIZERS:
        runs = [run for run in results["runs"] if run["optimizer"] == optimizer]
        assert sorted(run["seed"] for run in runs) == seeds
        for run in runs:
            assert run["config"]["seed"] == run["seed"] and run["config"]["evaluate_test"]
            for curve in ("train_loss", "val_loss", "val_acc", "epoch_seconds"):
                assert len(run[curve]) == EPOCHS, curve
            assert len(run["energy"]) == (EPOCHS if optimizer == "svd-adam" else 0)
            assert 0.0 < run["test_acc"] <= 1.0 and run["test_loss"] > 0
            assert run["started_at"] < run["finished_at"]
        best = _best(swept[backend], optimizer)
        assert results["studies"][optimizer]["best"]["params"] == best.params
        assert results["studies"][optimizer]["best"]["number"] == best.number
        assert results["studies"][optimizer]["trials"]["COMPLETE"] == 2
    assert set(results["versions"]) >= {"svdsweep", "torch", "optuna", "ray"}
    assert results["hardware"]["driver"]["cpu_count"] >= 1
    assert results["hardware"]["run_devices"] and results["hardware"]["run_nodes"]
    assert results["durations"]["final_trainings_wall_s"] > 0
    assert 0.0 <= results["test"]["p_value"] <= 1.0

    # report.md: both best parameter sets, the table, the figure, a verdict with its p-value.
    text = outcome.report.read_text()
    for optimizer in OPTIMIZERS:
        assert format_params(_best(swept[backend], optimizer).params) in text
    assert "| Adam |" in text and "| SVD(Adam) |" in text
    assert "test accuracy" in text and " ± " in text
    assert "![" in text and "(comparison.png)" in text
    verdict = results["verdict"]
    assert re.search(r"p = \d", verdict), verdict
    assert verdict.split(":")[0] in ("Supported", "Not supported", "Inconclusive")
    assert f"**Verdict. {verdict}**" in text


def test_final_trainings_ran_in_parallel_on_ray_workers(
    ray_cluster: Any, reported: dict[str, ReportOutcome]
) -> None:
    assert ray_cluster.cluster_resources()["CPU"] >= 2
    runs = reported["sqlite"].results.runs
    assert len(runs) == 2 * SEEDS
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
    info = redraw(outcome.results_json, tmp_path / "again.png")
    assert info.panels == ["val_loss", "val_acc", "energy"]
    original = matplotlib.image.imread(outcome.figure)
    again = matplotlib.image.imread(tmp_path / "again.png")
    assert (original == again).all()


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
            assert retrained[-1] == pytest.approx(best.value, abs=1e-6, rel=0)
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
        for optimizer in OPTIMIZERS:
            study = optuna.load_study(study_name=study_name(EXPERIMENT, optimizer), storage=url)
            metas = get_all_artifact_meta(study)
            assert sorted(m.filename for m in metas) == ["comparison.png", "report.md"]
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
    assert len(list(first.artifact_dir.iterdir())) == 2 * len(OPTIMIZERS), "old files removed"
    for ids in after.values():
        report_id = ids["report.md"]
        content = downloaded(report_id, first.out.parent / f"{report_id}.md").decode()
        assert content == rerun.report.read_text()
        assert f"{SEEDS} seeds × 1 epochs" in content
    assert json.loads(rerun.results_json.read_text())["protocol"]["epochs"] == 1
    assert not [p for p in first.out.parent.iterdir() if p.name.startswith(".results")]
    assert sorted(p.name for p in first.out.iterdir()) == [
        "comparison.png",
        "report.md",
        "results.json",
    ], "replaced in place, no staging left"


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
    result = svdsweep_cli(
        "run",
        "--trials",
        "2",
        "--trial-epochs",
        "1",
        "--epochs",
        "1",
        "--seeds",
        "2",
        "--train-subset",
        "2000",
        env=module_env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.startswith("preset quick: 2 trials x 1 epochs per study")
    for name in ("comparison.png", "report.md", "results.json"):
        assert (tmp_path / "results" / name).is_file()
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
    for optimizer in OPTIMIZERS:
        study = optuna.load_study(study_name=f"quick-{optimizer}", storage=url)
        assert len(study.trials) == 2
        assert len(get_all_artifact_meta(study)) == 2
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["experiment"] == "quick" and results["protocol"]["epochs"] == 1


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
