"""The distributed sweep against real PostgreSQL, real SQLite and a real (local) Ray.

Orchestration tests use a cheap objective (tests/cheap_objective.py); the
integration test at the end trains for real through the CLI.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cheap_objective
import optuna
import pytest
import ray
import ray.cloudpickle
from cheap_objective import cheap_objective as objective
from conftest import SVDSWEEP as SVDSWEEP_PATH
from conftest import free_port, svdsweep_cli, wait_until
from optuna.trial import TrialState
from private_postgres import private_postgres
from tcp_proxy import TcpProxy, address_of

from svdsweep.database import has_optuna_schema
from svdsweep.space import SearchSpace
from svdsweep.storage import open_storage, trial_id
from svdsweep.studies import (
    OBJECTIVE_NAME,
    ExperimentError,
    create_or_resume,
    experiment_status,
    study_name,
)
from svdsweep.sweep import SweepSpec as _SweepSpec
from svdsweep.sweep import run_sweep
from svdsweep.train import OPTIMIZERS
from svdsweep.worker import run_worker

# Ray workers cannot import the tests directory: ship the objective by value.
ray.cloudpickle.register_pickle_by_value(cheap_objective)

#: Orchestration tests count COMPLETE trials: no pruning unless a test asks for it
#: (test_successive_halving_keeps_budgets_exact... does).
SweepSpec = functools.partial(_SweepSpec, pruner="none")

REPO = Path(__file__).resolve().parents[1]
#: Dead workers are noticed within seconds. Read from the environment by the
#: driver (this process), the Ray workers it starts and the subprocesses.
HEARTBEAT = {"SVDSWEEP_HEARTBEAT_INTERVAL": "1", "SVDSWEEP_GRACE_PERIOD": "3"}


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sweep.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One loopback-only Ray for the module: 2 CPUs and 2 fake GPUs, token auth.

    Workers inherit the short heartbeat settings, so that dead workers are
    noticed within seconds.
    """
    saved = dict(os.environ)
    os.environ.update(HEARTBEAT, RAY_AUTH_MODE="token", SVDSWEEP_RAY_LOGS="0")
    ray.init(
        address="local",
        _node_ip_address="127.0.0.2",
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _trials(url: str, experiment: str, optimizer: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials. Opened as svdsweep opens it, under its schema lock: a test that
    polls while a sweep creates Optuna's schema would otherwise race it (and fail on
    ``UniqueViolation ... alembic_version``)."""
    storage = open_storage(url, heartbeat=False)
    try:
        study = optuna.load_study(study_name=study_name(experiment, optimizer), storage=storage)
        return study.get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _states(url: str, experiment: str, optimizer: str) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState}
    for trial in _trials(url, experiment, optimizer):
        counts[trial.state.name] += 1
    return counts


def _max_overlap(trials: list[optuna.trial.FrozenTrial]) -> int:
    events = []
    for trial in trials:
        if "started_at" in trial.user_attrs:
            events += [(trial.user_attrs["started_at"], 1), (trial.user_attrs["finished_at"], -1)]
    running = best = 0
    for _, step in sorted(events):
        running += step
        best = max(best, running)
    return best


def test_budget_is_exact_with_eight_concurrent_workers(storage_url: str) -> None:
    """Stock MaxTrialsCallback overshoots to n + workers; the claim lock must not."""
    repetitions = 2 if storage_url.startswith("postgresql") else 1  # the deployment path twice
    for repetition in range(repetitions):
        experiment = f"exact{repetition}"
        spec = SweepSpec(
            storage=storage_url,
            experiment=experiment,
            trials=20,
            workers=8,
            gpus_per_worker=0,
            cpus_per_worker=0.25,
            trial_epochs=1,
            seed=repetition,
        )
        # Half-second trials: long against a claim, so that overlap shows even on a slow 2-core CI.
        half_second = functools.partial(objective, seconds=0.5)
        final = run_sweep(spec, objective=half_second, progress=False)
        assert [study.finished for study in final] == [20, 20]
        for optimizer in OPTIMIZERS:
            counts = _states(storage_url, experiment, optimizer)
            assert counts["COMPLETE"] == 20, counts
            assert counts["RUNNING"] == counts["WAITING"] == 0, counts
            trials = _trials(storage_url, experiment, optimizer)
            params = [tuple(sorted(t.params.items())) for t in trials]
            assert len(set(params)) == len(params), "two workers proposed the same parameters"
        both = _trials(storage_url, experiment, "adam") + _trials(
            storage_url, experiment, "svd-adam"
        )
        assert _max_overlap(both) > 1, "trials never ran concurrently"
        # (A trial reaped before its first heartbeat, on a loaded machine, ran nowhere.)
        ran = [t for t in both if t.state == TrialState.COMPLETE]
        assert len({t.user_attrs["worker_id"] for t in ran}) > 1


def test_trials_record_what_the_issue_asks(pg_url: str) -> None:
    spec = SweepSpec(storage=pg_url, experiment="attrs", trials=3, workers=2, trial_epochs=2)
    run_sweep(spec, objective=objective, progress=False)
    for optimizer in OPTIMIZERS:
        for trial in _trials(pg_url, "attrs", optimizer):
            attrs = trial.user_attrs
            assert len(attrs["curves"]["val_loss"]) == 2
            assert trial.value == min(attrs["curves"]["val_loss"])  # the early-stopped score
            assert attrs["best_epoch"] == 2
            assert attrs["worker_host"] and attrs["worker_node_ip"] == "127.0.0.2"
            assert attrs["device"] == "cpu"
            assert attrs["duration_s"] > 0
            assert attrs["svdsweep_version"]
            # Two fake GPUs, one per worker: each trial sees exactly one id.
            assert len(attrs["gpu_ids"]) == 1
            assert set(trial.params) == ({"lr"} if optimizer == "adam" else {"lr", "k"})


def test_workers_get_distinct_gpus(pg_url: str) -> None:
    spec = SweepSpec(storage=pg_url, experiment="gpus", trials=6, trial_epochs=2)
    final = run_sweep(spec, objective=objective, progress=False)  # 1 GPU per worker by default
    assert [study.finished for study in final] == [6, 6]
    trials = _trials(pg_url, "gpus", "adam") + _trials(pg_url, "gpus", "svd-adam")
    by_worker: dict[int, set[str]] = {}
    for trial in trials:
        by_worker.setdefault(trial.user_attrs["worker_id"], set()).update(
            trial.user_attrs["gpu_ids"]
        )
    assert sorted(by_worker) == [0, 1], "one worker per (fake) GPU"
    assert all(len(ids) == 1 for ids in by_worker.values())
    assert by_worker[0] != by_worker[1]


def test_resuming_full_studies_starts_nothing(
    storage_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = SweepSpec(storage=storage_url, experiment="resume", trials=2, workers=2, trial_epochs=1)
    run_sweep(spec, objective=objective, progress=False)
    before = {opt: len(_trials(storage_url, "resume", opt)) for opt in OPTIMIZERS}
    capfd.readouterr()
    final = run_sweep(spec, objective=objective)
    assert "nothing to run" in capfd.readouterr().err
    assert [study.finished for study in final] == [2, 2]
    assert {opt: len(_trials(storage_url, "resume", opt)) for opt in OPTIMIZERS} == before
    # A larger budget resumes the same studies and adds exactly the difference.
    grown = run_sweep(
        SweepSpec(storage=storage_url, experiment="resume", trials=3, workers=2, trial_epochs=1),
        objective=objective,
        progress=False,
    )
    assert [study.finished for study in grown] == [3, 3]


def test_a_study_with_another_search_space_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/space.db"
    spec = SweepSpec(storage=url, experiment="space", trials=2)
    create_or_resume(url, "space", spec.study_settings())
    other = SweepSpec(
        storage=url, experiment="space", trials=2, space=SearchSpace(lr_low=1e-3, lr_high=1e-2)
    )
    with pytest.raises(ExperimentError, match="lr_high"):
        run_sweep(other, objective=objective, progress=False)
    # The stored settings are untouched, and the CLI says it in one line.
    assert json.loads(
        optuna.load_study(study_name="space-adam", storage=url).user_attrs["svdsweep_settings"]
    )["space"]["lr_high"] == pytest.approx(0.1)
    result = svdsweep_cli(
        *("sweep", "--storage", url, "--experiment", "space", "--lr-range", "1e-3", "1e-2"),
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: study 'space-adam' already exists")
    assert len(result.stderr.strip().splitlines()) == 1


def test_successive_halving_keeps_budgets_exact_with_eight_workers_on_postgresql(
    pg_url: str,
) -> None:
    """The default pruner, on every study of the full protocol: replicates and the profile."""
    spec = _SweepSpec(
        storage=pg_url,
        experiment="sha",
        trials=12,
        workers=8,
        gpus_per_worker=0,
        cpus_per_worker=0.25,
        trial_epochs=6,
        replicates=2,
        profile_trials=4,
        profile_ranks=(2, 256),
    )
    assert spec.pruner == "successive-halving"
    final = run_sweep(spec, objective=functools.partial(objective, seconds=0.3), progress=False)
    budgets = {status.name: status.budget for status in final}
    assert budgets == {
        "sha-adam": 12,
        "sha-svd-adam": 12,
        "sha-adam-r2": 12,
        "sha-svd-adam-r2": 12,
        "sha-profile-adam": 4,
        "sha-profile-k2": 4,
        "sha-profile-k256": 4,
    }
    pruned = 0
    for name, budget in budgets.items():
        study = optuna.load_study(study_name=name, storage=pg_url)
        states = [trial.state for trial in study.trials]
        assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == budget
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states
        pruned += states.count(TrialState.PRUNED)
        for trial in study.trials:
            if trial.state == TrialState.PRUNED:  # stopped at a rung, before the horizon
                assert len(trial.user_attrs["curves"]["val_loss"]) < 6
    assert pruned > 0


def test_median_pruning_counts_toward_the_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/prune.db"
    spec = SweepSpec(
        storage=url, experiment="prune", trials=14, workers=2, trial_epochs=4, pruner="median"
    )
    final = run_sweep(spec, objective=objective, progress=False)
    assert [study.finished for study in final] == [14, 14]
    pruned = sum(_states(url, "prune", opt)["PRUNED"] for opt in OPTIMIZERS)
    assert pruned > 0
    assert all(_states(url, "prune", opt)["RUNNING"] == 0 for opt in OPTIMIZERS)


_WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from cheap_objective import cheap_objective
    from svdsweep.worker import run_worker
    run_worker({url!r}, {experiment!r}, worker_id=7, objective=cheap_objective)
    """
)


def test_a_trial_reaped_while_it_runs_does_not_stop_its_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a long database outage a live trial may be failed as stale: the worker goes on.

    It says so in one line: no ``UpdateFinishedTrialError`` traceback.
    """
    url = f"sqlite:///{tmp_path}/reaped.db"
    create_or_resume(url, "reaped", SweepSpec(experiment="reaped", trials=2).study_settings())
    storage = optuna.storages.RDBStorage(url)
    reaped: list[int] = []

    def objective(config: Any, report: Any) -> Any:
        if not reaped:  # what a driver's reaper does to a trial whose heartbeat went silent
            study = storage.get_study_id_from_name("reaped-adam")
            (running,) = storage.get_all_trials(study, states=(TrialState.RUNNING,))
            storage.set_trial_state_values(trial_id(running), TrialState.FAIL)
            reaped.append(running.number)
        return cheap_objective.cheap_objective(config, report, seconds=0.01)

    with caplog.at_level("WARNING", logger="svdsweep"):
        summary = run_worker(url, "reaped", objective=objective, poll_seconds=0.1)
    assert summary.trials[0] == ("reaped-adam", reaped[0], "FAIL")
    assert not [record for record in caplog.records if record.exc_info]
    assert any("failed as stale while it ran" in record.message for record in caplog.records)
    for optimizer in OPTIMIZERS:
        assert _states(url, "reaped", optimizer)["COMPLETE"] == 2
    assert _states(url, "reaped", "adam")["FAIL"] == 1


def test_a_killed_workers_last_trial_is_reaped_and_retried(pg_url: str) -> None:
    """SIGKILL mid-trial: heartbeats go stale, the trial is FAILed and its params rerun."""
    spec = SweepSpec(storage=pg_url, experiment="kill", trials=2)
    create_or_resume(pg_url, "kill", spec.study_settings())
    script = _WORKER_SCRIPT.format(tests=str(REPO / "tests"), url=pg_url, experiment="kill")
    doomed = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, **HEARTBEAT, "SVDSWEEP_TEST_TRIAL_SECONDS": "600"},
    )
    try:
        running = wait_until(
            lambda: [t for t in _running(pg_url, "kill", with_attr="worker_pid") if t.params],
            timeout=60,
            what="the worker to start a trial",
        )
        time.sleep(1.5)  # let it beat at least once
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
    killed = running[0]
    killed_study = "adam" if killed.params.keys() == {"lr"} else "svd-adam"

    # The worker starts again, as Ray restarts a killed task: same id, same seed.
    # It fills every other slot, then waits for the dead trial's grace period
    # and runs its parameters again, although it was the last one.
    summary = run_worker(pg_url, "kill", worker_id=7, objective=objective, poll_seconds=0.5)
    assert len(summary.trials) == 4
    for optimizer in OPTIMIZERS:
        counts = _states(pg_url, "kill", optimizer)
        assert counts["COMPLETE"] == 2 and counts["RUNNING"] == 0 and counts["WAITING"] == 0
    trials = _trials(pg_url, "kill", killed_study)
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert_each_configuration_completed_once(pg_url, "kill")


def assert_each_configuration_completed_once(url: str, experiment: str) -> None:
    """No two COMPLETE trials of a study share parameters (a FAIL trial's retry is its one run)."""
    for optimizer in OPTIMIZERS:
        seen: dict[tuple[tuple[str, Any], ...], int] = {}
        for trial in _trials(url, experiment, optimizer):
            if trial.state != TrialState.COMPLETE:
                continue
            key = tuple(sorted(trial.params.items()))
            assert key not in seen, (
                f"{optimizer}: trials {seen[key]} and {trial.number} both ran {dict(key)}"
            )
            seen[key] = trial.number


def test_a_resumed_sweep_adds_new_configurations(tmp_path: Path) -> None:
    """Trials 2 and 3 of a sweep resumed with a larger budget are not trials 0 and 1 again."""
    url = f"sqlite:///{tmp_path}/grow.db"
    for trials in (2, 4):
        spec = SweepSpec(storage=url, experiment="grow", trials=trials, workers=1, trial_epochs=1)
        run_sweep(spec, objective=objective, progress=False)
    for optimizer in OPTIMIZERS:
        assert _states(url, "grow", optimizer)["COMPLETE"] == 4
    assert_each_configuration_completed_once(url, "grow")


def test_two_drivers_on_one_experiment_propose_different_configurations(pg_url: str) -> None:
    """Each driver's worker 0, same seed, at the same time: still no configuration twice."""
    spec = SweepSpec(storage=pg_url, experiment="twice", trials=6)
    create_or_resume(pg_url, "twice", spec.study_settings())
    errors: list[BaseException] = []

    def driver_worker(seconds: float) -> None:
        # Trials of different lengths, so that both drivers claim from both studies.
        slower = functools.partial(objective, seconds=seconds)
        try:
            run_worker(pg_url, "twice", worker_id=0, seed=0, objective=slower)
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=driver_worker, args=(s,)) for s in (0.05, 0.13)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    for optimizer in OPTIMIZERS:
        assert _states(pg_url, "twice", optimizer)["COMPLETE"] == 6
    trials = _trials(pg_url, "twice", "adam") + _trials(pg_url, "twice", "svd-adam")
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 1  # one process, two "drivers"
    assert_each_configuration_completed_once(pg_url, "twice")


def test_a_trials_sampler_is_reproducible_and_unique_to_its_number() -> None:
    from svdsweep.worker import trial_sampler

    def first_draw(seed: int, optimizer: str, number: int) -> float:
        study = optuna.create_study(sampler=trial_sampler(seed, optimizer, number))
        return study.ask().suggest_float("lr", 1e-5, 1e-1, log=True)

    assert first_draw(0, "adam", 3) == first_draw(0, "adam", 3)
    draws = {first_draw(seed, optimizer, number)
             for seed in (0, 1) for optimizer in OPTIMIZERS for number in range(5)}  # fmt: skip
    assert len(draws) == 20


def _running(url: str, experiment: str, with_attr: str) -> list[optuna.trial.FrozenTrial]:
    """The RUNNING trials of both studies that have recorded ``with_attr``.

    Polls while a sweep starts: before the sweep has created Optuna's schema,
    opening the storage here would create it at the same time (and one fails).
    """
    if not has_optuna_schema(url):
        return []
    return [
        trial
        for optimizer in OPTIMIZERS
        for trial in _trials(url, experiment, optimizer)
        if trial.state == TrialState.RUNNING and with_attr in trial.user_attrs
    ]


@contextlib.contextmanager
def _sweep_in_background(spec: SweepSpec, seconds_per_trial: float) -> Iterator[None]:
    """Runs the sweep in a thread while the body disturbs it; it must still finish cleanly."""
    outcome: dict[str, BaseException] = {}

    def sweep() -> None:
        try:
            slow = functools.partial(objective, seconds=seconds_per_trial)
            run_sweep(spec, objective=slow, progress=False)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=sweep)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=300)
        # Raised here, it names the sweep's own failure even when the body failed first.
        if "error" in outcome:
            raise AssertionError(f"the sweep failed: {outcome['error']!r}") from outcome["error"]
    assert not thread.is_alive(), "the sweep did not finish"


def test_the_sweep_survives_a_postgres_restart() -> None:
    """A PostgreSQL restart mid-sweep: every storage call retries, and the budget is exact.

    The restarted server is a throwaway cluster of this test's own
    (tests/private_postgres.py): the machine's PostgreSQL is never touched.
    """
    with private_postgres() as postgres:
        url = postgres.url
        spec = SweepSpec(
            storage=url,
            experiment="restart",
            trials=12,
            workers=2,
            gpus_per_worker=0,
            trial_epochs=4,
        )
        with _sweep_in_background(spec, seconds_per_trial=1.0):
            wait_until(
                lambda: sum(s.finished for s in experiment_status(url, "restart")) >= 3,
                timeout=90,
                what="3 finished trials",
                ignore=(ExperimentError,),  # the studies may not exist yet
            )
            postgres.restart()
        for optimizer in OPTIMIZERS:
            counts = _states(url, "restart", optimizer)
            assert counts["COMPLETE"] + counts["PRUNED"] == 12, counts
            assert counts["RUNNING"] == 0, counts


_DRIVER_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import ray.cloudpickle, cheap_objective
    ray.cloudpickle.register_pickle_by_value(cheap_objective)
    from svdsweep.sweep import SweepSpec, run_sweep
    spec = SweepSpec(storage={url!r}, experiment="ctrlc", trials=4, workers=2,
                     gpus_per_worker=0, trial_epochs=2, ray_node_ip="127.0.0.5",
                     pruner="none")
    try:
        run_sweep(spec, objective=cheap_objective.cheap_objective)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {{interrupt}}", file=sys.stderr)
        sys.exit(130)
    """
)


def _start_driver(url: str) -> subprocess.Popen[str]:
    """The Ctrl-C test's sweep in its own process (its own local Ray), slow trials, stderr piped."""
    script = _DRIVER_SCRIPT.format(tests=str(REPO / "tests"), url=url)
    env = {**os.environ, **HEARTBEAT, "SVDSWEEP_TEST_TRIAL_SECONDS": "600", "RAY_ADDRESS": ""}
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True
    )


def _wait_mid_trial(url: str, experiment: str, running: int) -> None:
    wait_until(
        lambda: sum(s.counts["RUNNING"] for s in experiment_status(url, experiment)) == running,
        timeout=120,
        what="both workers to be mid-trial",
        ignore=(ExperimentError,),  # not created yet
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_fails_running_trials_and_a_rerun_resumes(pg_url: str, signum: int) -> None:
    """SIGTERM (kill, docker stop) is Ctrl-C: trials FAIL, exit 130, a rerun adds no duplicate."""
    driver = _start_driver(pg_url)
    try:
        _wait_mid_trial(pg_url, "ctrlc", running=2)
        driver.send_signal(signum)
        _, stderr = driver.communicate(timeout=90)
        assert driver.returncode == 130, stderr[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert "Traceback" not in stderr and "SIGTERM" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == (
        "interrupted: workers stopped and this sweep's running trials marked FAIL; rerun to resume"
    )
    status = experiment_status(pg_url, "ctrlc")
    assert sum(s.counts["RUNNING"] for s in status) == 0
    assert sum(s.counts["FAIL"] for s in status) == 2
    failed = [
        t for opt in OPTIMIZERS for t in _trials(pg_url, "ctrlc", opt) if t.state == TrialState.FAIL
    ]
    assert all(
        "interrupted" in t.user_attrs.get("error", "")
        or "KeyboardInterrupt" in t.user_attrs.get("error", "")
        for t in failed
    )
    # The same command again resumes and finishes the budget exactly.
    spec = SweepSpec(
        storage=pg_url, experiment="ctrlc", trials=4, workers=2, gpus_per_worker=0, trial_epochs=2
    )
    final = run_sweep(spec, objective=objective, progress=False)
    assert [study.finished for study in final] == [4, 4]
    assert_each_configuration_completed_once(pg_url, "ctrlc")


def test_ctrl_c_with_the_database_down_exits_at_once_and_the_next_run_reaps(
    pg_url: str,
) -> None:
    """The driver reaches PostgreSQL through a proxy the test cuts, then gets Ctrl-C.

    It must not wait for the database: one line, exit 130, its trials left
    RUNNING. The next sweep (with the database back) reaps them and finishes
    the budget, each configuration once.
    """
    with TcpProxy(address_of(pg_url)) as proxy:
        driver = _start_driver(proxy.url(pg_url))
        try:
            _wait_mid_trial(pg_url, "ctrlc", running=2)
            proxy.cut()
            driver.send_signal(signal.SIGINT)
            # Retrying would take two minutes; stopping the workers takes seconds.
            _, stderr = driver.communicate(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
    assert driver.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.splitlines()[-1]
    assert last.startswith("interrupted: the database is unreachable (") and last.endswith(
        "workers stopped; this sweep's running trials will be reaped as stale by the next "
        "sweep on experiment 'ctrlc'"
    ), last
    left = [t for opt in OPTIMIZERS for t in _trials(pg_url, "ctrlc", opt)]
    assert [t.state for t in left] == [TrialState.RUNNING] * 2
    spec = SweepSpec(
        storage=pg_url, experiment="ctrlc", trials=4, workers=2, gpus_per_worker=0, trial_epochs=2
    )
    final = run_sweep(spec, objective=objective, progress=False)
    assert [study.finished for study in final] == [4, 4]
    assert [study.counts["RUNNING"] for study in final] == [0, 0]
    for trial in left:
        assert _trials(pg_url, "ctrlc", trial_study(trial))[trial.number].state == TrialState.FAIL
    assert_each_configuration_completed_once(pg_url, "ctrlc")


def trial_study(trial: optuna.trial.FrozenTrial) -> str:
    """The optimizer whose study ``trial`` belongs to (only svd-adam's trials have ``k``)."""
    return "adam" if trial.params.keys() == {"lr"} else "svd-adam"


def test_status_reports_counts_and_best_as_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/status.db"
    run_sweep(
        SweepSpec(storage=url, experiment="st", trials=3, workers=2, trial_epochs=1),
        objective=objective,
        progress=False,
    )
    result = svdsweep_cli("status", "--storage", url, "--experiment", "st", "--json")
    assert result.returncode == 0, result.stderr
    studies = json.loads(result.stdout)
    assert [s["study"] for s in studies] == ["st-adam", "st-svd-adam"]
    for study in studies:
        assert study["finished"] == 3 and study["counts"]["COMPLETE"] == 3
        assert study["best_value"] == min(
            t.value for t in _trials(url, "st", study["optimizer"]) if t.value is not None
        )
        assert set(study["best_params"]) == (
            {"lr"} if study["optimizer"] == "adam" else {"lr", "k"}
        )
    missing = svdsweep_cli("status", "--storage", f"sqlite:///{tmp_path}/none.db")
    assert missing.returncode == 1 and missing.stderr.startswith("error: no SQLite storage")
    assert not (tmp_path / "none.db").exists()

    # Without --experiment: every experiment in the storage, each with its two studies,
    # and the table whole although stdout is a pipe (rich would cut it at 80 columns).
    run_sweep(
        SweepSpec(storage=url, experiment="a-long-experiment-name", trials=1, trial_epochs=1),
        objective=objective,
        progress=False,
    )
    listed = svdsweep_cli("status", "--storage", url)
    assert listed.returncode == 0, listed.stderr
    assert "experiment st\n" in listed.stdout
    assert "experiment a-long-experiment-name\n" in listed.stdout
    long_names = ("a-long-experiment-name-adam", "a-long-experiment-name-svd-adam")
    for name in ("st-adam", "st-svd-adam", *long_names):
        assert name in listed.stdout
    assert "…" not in listed.stdout, listed.stdout  # nothing elided
    both = json.loads(svdsweep_cli("status", "--storage", url, "--json").stdout)
    assert sorted(s["study"] for s in both) == sorted(["st-adam", "st-svd-adam", *long_names])
    wrong = svdsweep_cli("status", "--storage", url, "--experiment", "quick")
    assert wrong.returncode == 1
    assert wrong.stderr.strip().endswith("there: a-long-experiment-name, st"), wrong.stderr


@pytest.mark.slow
def test_a_real_training_sweep_through_the_cli(tmp_path: Path) -> None:
    """The integration: svdsweep sweep trains real models on Ray workers."""
    url = f"sqlite:///{tmp_path}/real.db"
    env = {**os.environ, "RAY_ADDRESS": "", "SVDSWEEP_RAY_NODE_IP": "127.0.0.6"}
    result = svdsweep_cli(
        *("sweep", "--storage", url, "--experiment", "real", "--trials", "2", "--workers", "2"),
        *("--trial-epochs", "1", "--train-subset", "2000"),
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "real-adam" in result.stderr and "real-svd-adam" in result.stderr
    for optimizer in OPTIMIZERS:
        trials = _trials(url, "real", optimizer)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
        for trial in trials:
            assert 0 < trial.value < float("inf")  # a cross-entropy
            assert 0 <= trial.user_attrs["curves"]["val_acc"][-1] <= 1
            if optimizer == "svd-adam":
                assert 0 < trial.user_attrs["curves"]["energy"][0] <= 1
        # A real model learned (a sampled lr near 0.1 may not: trial 0 of adam
        # draws lr 0.075 from seed 0 and ends at a loss of 3.6 after one epoch).
        best = min(trials, key=lambda trial: trial.value)
        assert best.value < 2 and best.user_attrs["curves"]["val_acc"][-1] > 0.3


def test_a_ray_worker_killed_mid_trial_is_retried_without_double_counting(pg_url: str) -> None:
    """Ray retries the dead worker's task; the storage, not Ray, decides what counts."""
    spec = SweepSpec(
        storage=pg_url,
        experiment="raykill",
        trials=3,
        workers=2,
        gpus_per_worker=0,
        trial_epochs=2,
    )
    with _sweep_in_background(spec, seconds_per_trial=4.0):
        # A trial in its first epoch (of two, 2 s each): still running when its worker dies.
        victim = wait_until(
            lambda: [
                trial
                for trial in _running(pg_url, "raykill", with_attr="worker_pid")
                if not trial.intermediate_values
            ],
            timeout=90,
            interval=0.3,
            what="a trial to start",
            ignore=(KeyError,),  # the studies do not exist yet
        )[0]
        os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    for optimizer in OPTIMIZERS:
        counts = _states(pg_url, "raykill", optimizer)
        assert counts["COMPLETE"] == 3 and counts["RUNNING"] == 0, counts
    victim_study = "adam" if victim.params.keys() == {"lr"} else "svd-adam"
    assert _trials(pg_url, "raykill", victim_study)[victim.number].state == TrialState.FAIL


def _studies_in(url: str) -> dict[str, tuple[int, str | None]]:
    """Study name -> (trial count, stored settings), read without creating anything."""
    if url.startswith("sqlite") and not Path(url.removeprefix("sqlite:///")).exists():
        return {}
    return {
        summary.study_name: (summary.n_trials, summary.user_attrs.get("svdsweep_settings"))
        for summary in optuna.get_all_study_summaries(storage=url)
    }


def test_bad_sweep_input_is_one_line_nonzero_and_writes_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    """Each bad input of the issue through the CLI, started at once (each imports torch)."""
    # An experiment whose studies exist with another space, and one with another direction.
    run_sweep(
        SweepSpec(storage=pg_url, experiment="kept", trials=2, workers=2, trial_epochs=1),
        objective=objective,
        progress=False,
    )
    optuna.create_study(study_name="upside-adam", storage=pg_url, direction="maximize")
    before = _studies_in(pg_url)
    sqlite_url = f"sqlite:///{tmp_path}/never.db"
    env = {**os.environ, "RAY_ADDRESS": "", "SVDSWEEP_RAY_NODE_IP": "127.0.0.7"}
    cases = {
        "malformed URL": (["--storage", "postgres ql://nowhere"], "invalid storage URL"),
        "unsupported URL": (["--storage", "mysql://root@127.0.0.1/db"], "needs sqlite:///"),
        "unreachable database": (
            ["--storage", "postgresql+psycopg2://postgres@127.0.0.1:1/svdsweep"],
            "cannot open storage postgresql+psycopg2://postgres@127.0.0.1:1/svdsweep",
        ),
        "missing database": (
            ["--storage", "postgresql+psycopg2://postgres@127.0.0.1:5432/no_such_db_here"],
            'database "no_such_db_here" does not exist',
        ),
        "another search space": (
            [
                *("--storage", pg_url, "--experiment", "kept", "--trial-epochs", "1"),
                *("--lr-range", "1e-3", "1e-2"),
            ],
            "study 'kept-adam' already exists with other settings (space: stored",
        ),
        "another direction": (
            ["--storage", pg_url, "--experiment", "upside"],
            "study 'upside-adam' already exists and does not minimise",
        ),
        "zero trials": (
            ["--storage", pg_url, "--trials", "0"],
            "the trial budget must be a positive int, got 0",
        ),
        "zero trials, SQLite": (["--storage", sqlite_url, "--trials", "0"], "positive int"),
        "zero workers": (["--storage", pg_url, "--workers", "0"], "--workers must be at least 1"),
        "bad lr range": (["--storage", pg_url, "--lr-range", "0", "1"], "lr range must satisfy"),
        "more GPUs than the cluster": (
            ["--storage", sqlite_url, "--gpus-per-worker", "64", "--trials", "1"],
            "--gpus-per-worker 64 asks for more GPUs than the Ray cluster has (0)",
        ),
    }
    processes = {
        case: subprocess.Popen(
            [SVDSWEEP_PATH, "sweep", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for case, (args, _) in cases.items()
    }
    for case, process in processes.items():
        # An unreachable database fails at once: retries are for a database lost mid-sweep.
        _, stderr = process.communicate(timeout=120)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert process.returncode == 1, (case, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr)
        assert cases[case][1] in lines[0], (case, lines[0])
    # Nothing written: no study created or changed, no SQLite file, no trial run.
    assert _studies_in(pg_url) == before
    assert not (tmp_path / "never.db").exists()


def test_optuna_cli_and_optuna_dashboard_open_the_sweeps_storage(pg_url: str) -> None:
    """Interop: the storage is plain Optuna, readable by Optuna's own tools."""
    run_sweep(
        SweepSpec(storage=pg_url, experiment="interop", trials=3, workers=2, trial_epochs=1),
        objective=objective,
        progress=False,
    )
    optuna_cli = str(Path(sys.executable).with_name("optuna"))
    listed = subprocess.run(
        [optuna_cli, "studies", "--storage", pg_url, "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    studies = {study["name"]: study for study in json.loads(listed.stdout)}
    assert set(studies) == {"interop-adam", "interop-svd-adam"}
    assert all(study["n_trials"] == 3 for study in studies.values())
    for optimizer in OPTIMIZERS:
        best = subprocess.run(
            [
                optuna_cli,
                "best-trial",
                "--storage",
                pg_url,
                "--study-name",
                f"interop-{optimizer}",
                "-f",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        trial = json.loads(best.stdout)
        expected = optuna.load_study(study_name=f"interop-{optimizer}", storage=pg_url).best_trial
        assert trial["number"] == expected.number
        # The value carries its name (set_metric_names), as optuna-dashboard shows it.
        assert trial["value"] == {OBJECTIVE_NAME: pytest.approx(expected.value)}
        assert set(trial["params"]) == ({"lr"} if optimizer == "adam" else {"lr", "k"})

    # optuna-dashboard's own command and storage loader, given only the URL.
    port = free_port()
    dashboard = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("optuna-dashboard")),
            pg_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answer = _get_json(f"http://127.0.0.1:{port}/api/studies", dashboard)
        names = {study["study_name"]: study for study in answer["study_summaries"]}
        assert set(names) == {"interop-adam", "interop-svd-adam"}
        study_id = names["interop-svd-adam"]["study_id"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}", dashboard)
        assert len(detail["trials"]) == 3
        assert {p["name"] for p in detail["trials"][0]["params"]} == {"lr", "k"}
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def _get_json(url: str, server: subprocess.Popen[str]) -> Any:
    import urllib.error
    import urllib.request

    def answer() -> Any:
        if server.poll() is not None:
            raise AssertionError(f"optuna-dashboard exited: {server.stderr.read()}")
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    return wait_until(answer, timeout=90, what=url, ignore=(urllib.error.URLError, ConnectionError))


@pytest.mark.slow
def test_the_sweep_benchmark_measures_both_and_cleans_up(pg_url: str) -> None:
    """`svdsweep bench sweep` in small: figures from the storage, exact budgets, no leftovers."""
    from svdsweep.sweep_bench import run_sweep_benchmark

    small: dict[str, Any] = {
        "workers": 4,
        "trials": 6,
        "repeats": 2,
        "real_trials": 2,
        "real_epochs": 1,
    }
    figures = run_sweep_benchmark(pg_url, **small, train_subset=500, progress=False)
    for name in ("stock", "svdsweep"):
        runs = figures[name]["runs"]
        assert len(runs) == 2 and all(r["trials_per_second"] > 0 and r["seconds"] > 0 for r in runs)
        rates = sorted(r["trials_per_second"] for r in runs)
        assert figures[name]["trials_per_second"] == pytest.approx(sum(rates) / 2)
    assert [r["finished_per_study"] for r in figures["svdsweep"]["runs"]] == [[6, 6], [6, 6]]
    # Stock Optuna only stops a worker after its trial ends: at least the budget, often more.
    assert all(n >= 6 for r in figures["stock"]["runs"] for n in r["finished_per_study"])
    real = figures["real"]
    assert len(real["trials"]) == 3  # 4 real trials, the first (which loads data) left out
    for trial in real["trials"]:
        assert 0 < trial["train_s"] < trial["wall_s"]
    assert 0 < real["overhead_fraction_median"] < 1
    assert optuna.get_all_study_summaries(storage=pg_url) == []
