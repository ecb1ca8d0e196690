"""Database outages, through a TCP proxy the test cuts: the shared PostgreSQL is never stopped."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import cheap_objective
import optuna
import pytest
from optuna.trial import TrialState
from tcp_proxy import TcpProxy, address_of

from svdsweep.database import retrying
from svdsweep.storage import StaleTrialReaper, load_study, open_storage
from svdsweep.studies import create_or_resume, study_name
from svdsweep.sweep import SweepSpec
from svdsweep.train import OPTIMIZERS, TrainConfig
from svdsweep.worker import run_worker

#: A beat a second, dead after 6 s: long enough for the worker to beat again
#: between its connection's return and the end of the reaper's grace period.
HEARTBEAT = {"SVDSWEEP_HEARTBEAT_INTERVAL": "1", "SVDSWEEP_GRACE_PERIOD": "6"}


def test_an_outage_longer_than_the_grace_period_reaps_no_live_trial(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The reaper (as the driver runs it) and a worker each reach PostgreSQL through a proxy.

    Both lose it for longer than the grace period; the reaper's connection
    comes back first, the worker's two seconds later. The worker's trial was
    alive throughout: it must finish COMPLETE, and nothing may be reaped.
    """
    for name, value in HEARTBEAT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SVDSWEEP_RETRY_SECONDS", "120")
    create_or_resume(pg_url, "outage", SweepSpec(experiment="outage", trials=1).study_settings())
    grace = int(HEARTBEAT["SVDSWEEP_GRACE_PERIOD"])
    address = address_of(pg_url)

    def objective(config: TrainConfig, report: Any) -> Any:
        # Adam's trial (claimed first) spans the outage; svd-adam's is short.
        seconds = 3.0 * grace + 8 if config.optimizer == "adam" else 0.1
        return cheap_objective.cheap_objective(config, report, seconds=seconds)

    with TcpProxy(address) as to_reaper, TcpProxy(address) as to_worker:
        storage = open_storage(to_reaper.url(pg_url))
        studies = [load_study(storage, study_name("outage", opt)) for opt in OPTIMIZERS]
        reaper, reaped, stop = StaleTrialReaper(), [], threading.Event()

        def watch() -> None:  # what the driver's loop does, every half second
            while not stop.wait(0.5):
                reaped.append(retrying(functools.partial(reaper.reap, studies)))

        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["summary"] = run_worker(to_worker.url(pg_url), "outage", poll_seconds=0.2,
                                                objective=objective)  # fmt: skip
            except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = error

        watcher, worker = threading.Thread(target=watch), threading.Thread(target=work)
        watcher.start()
        worker.start()
        try:
            time.sleep(grace + 2)  # the trial runs and beats; the reaper watches long enough
            to_reaper.cut()
            to_worker.cut()
            time.sleep(grace + 3)  # the outage: longer than the grace period
            seen = to_reaper.connections
            to_reaper.restore()
            while to_reaper.connections == seen:  # the reaper is connected again
                time.sleep(0.1)
            time.sleep(2)
            to_worker.restore()
            worker.join(timeout=120)
        finally:
            stop.set()
            watcher.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert [state for _, _, state in outcome["summary"].trials] == ["COMPLETE", "COMPLETE"]
    for optimizer in OPTIMIZERS:
        trials = optuna.load_study(
            study_name=study_name("outage", optimizer), storage=pg_url
        ).get_trials(deepcopy=False)
        assert [t.state for t in trials] == [TrialState.COMPLETE], optimizer
    assert sum(reaped) == 0
    tracebacks = [
        r for r in caplog.records if r.exc_info or "UpdateFinishedTrialError" in r.message
    ]
    assert not tracebacks, tracebacks[0].getMessage()


def test_a_reaper_reaps_a_dead_workers_trial_once_it_has_watched_a_grace_period(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock that spares live trials after an outage still lets dead ones go."""
    for name, value in HEARTBEAT.items():
        monkeypatch.setenv(name, value)
    create_or_resume(pg_url, "dead", SweepSpec(experiment="dead", trials=1).study_settings())
    storage = open_storage(pg_url)
    study = load_study(storage, study_name("dead", "adam"))
    dead = study.ask()
    storage.record_heartbeat(dead._trial_id)  # then its worker dies: no more beats
    now = [0.0]
    reaper = StaleTrialReaper(clock=lambda: now[0])
    grace = int(HEARTBEAT["SVDSWEEP_GRACE_PERIOD"])
    time.sleep(grace + 1)  # its heartbeat is older than the grace period
    assert reaper.reap([study]) == 0, "a new reaper has not watched long enough"
    for _ in range(2 * grace - 1):  # watched for less than the grace period
        now[0] += 0.5
        assert reaper.reap([study]) == 0
    now[0] += grace
    assert reaper.reap([study]) == 0, "a gap longer than grace - interval restarts the clock"
    for _ in range(2 * grace - 1):
        now[0] += 0.5
        assert reaper.reap([study]) == 0
    now[0] += 0.5  # watched for a whole grace period since the gap
    assert reaper.reap([study]) == 1
    assert storage.get_trial(dead._trial_id).state == TrialState.FAIL


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("svdsweep").setLevel(logging.INFO)
