"""URL -> Optuna storage, with heartbeats that survive a flaky database; Optuna's internals.

* **Heartbeats that survive a flaky database.** Optuna's own heartbeat thread
  exists only inside ``study.optimize``, and one failed write kills it, after
  which the trial is reaped as stale while still running. :class:`Heartbeat`
  logs the failure and tries again at the next beat; :class:`StaleTrialReaper`
  fails the trials of dead workers, which Optuna does only inside ``optimize``,
  and never those of live workers that an outage kept from beating.
* **Optuna's private API, in this module only.** Each private name used is
  listed in :data:`OPTUNA_INTERNALS`, and ``tests/test_storage.py`` fails with a
  clear message, one test per name, when an Optuna upgrade drops one. The rest
  of svdsweep reaches them through :func:`study_id`, :func:`trial_id`,
  :func:`trial_counts`, :func:`set_user_attrs` and :func:`forget_artifact`.

The URL, retries and the budget lock are :mod:`svdsweep.database`'s. The
environment (``SVDSWEEP_HEARTBEAT_INTERVAL``, ``SVDSWEEP_GRACE_PERIOD``) is read
when a storage is opened or a trial reaped, not at import, so a test or a
command only has to set it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from svdsweep.database import (
    StorageError,
    budget_lock,
    dialect,
    has_optuna_schema,
    reason,
    redact,
    resolve_storage_url,
    retrying,
)

__all__ = [
    "OPTUNA_INTERNALS",
    "Heartbeat",
    "StaleTrialReaper",
    "ask",
    "forget_artifact",
    "grace_period",
    "heartbeat_interval",
    "load_study",
    "open_storage",
    "reap_stale_trials",
    "set_user_attrs",
    "study_id",
    "trial_counts",
    "trial_id",
]

log = logging.getLogger(__name__)

#: Seconds between heartbeats of a running trial ($SVDSWEEP_HEARTBEAT_INTERVAL):
#: a write every 10 s per trial is nothing to the database, and a dead worker's
#: trial is noticed within a grace period of three missed beats
#: ($SVDSWEEP_GRACE_PERIOD), which survives one slow write.
HEARTBEAT_INTERVAL = 10
#: How often a trial whose worker died is retried with the same parameters.
MAX_RETRY = 3

#: Optuna's private names used here, each as (where it is used, how to reach it).
#: ``tests/test_storage.py`` checks every one against the installed Optuna.
OPTUNA_INTERNALS: dict[str, str] = {
    "optuna.storages._rdb.models.TrialModel": "trial_counts: one COUNT ... GROUP BY",
    "optuna.storages._rdb.models.TrialHeartbeatModel": "reap_stale_trials: never-beaten trials",
    "optuna.storages._rdb.models.TrialUserAttributeModel": "set_user_attrs: one transaction",
    "optuna.storages._rdb.models.StudySystemAttributeModel": "forget_artifact: the study's record",
    "optuna.storages._rdb.storage._create_scoped_session": "set_user_attrs: one transaction",
    "optuna.storages.RDBStorage._set_trial_attr_without_commit": "set_user_attrs: an upsert",
    "optuna.storages._CachedStorage._backend": "the RDBStorage under a study's cache",
    "optuna.Study._storage": "the storage of a loaded study",
    "optuna.Study._study_id": "study_id: without a query by name",
    "optuna.Trial._trial_id": "trial_id: heartbeats and attributes of an asked trial",
    "optuna.trial.FrozenTrial._trial_id": "trial_id: reaping and failing stored trials",
}


def heartbeat_interval() -> int:
    """Seconds between heartbeats: ``$SVDSWEEP_HEARTBEAT_INTERVAL``, else 10."""
    return int(os.environ.get("SVDSWEEP_HEARTBEAT_INTERVAL") or HEARTBEAT_INTERVAL)


def grace_period() -> int:
    """Seconds without a heartbeat after which a trial is dead: ``$SVDSWEEP_GRACE_PERIOD``."""
    return int(os.environ.get("SVDSWEEP_GRACE_PERIOD") or 3 * heartbeat_interval())


@contextlib.contextmanager
def _knowing_heartbeats() -> Iterator[None]:
    """Silences Optuna's warnings about what svdsweep does on purpose.

    Heartbeats and their retry callback are "experimental" since Optuna 2.8,
    and the workers use ask/tell with their own :class:`Heartbeat` thread
    rather than ``study.optimize``. Local, so no process-wide filter is set.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def open_storage(
    url: str | None = None, *, heartbeat: bool = True, create: bool = True
) -> RDBStorage:
    """An :class:`RDBStorage` for ``url`` whose workers can be reaped when they die.

    Raises :class:`StorageError` with a one-line reason when the database is
    unreachable or the URL is wrong, at once: retries are for databases that
    go away mid-sweep, not for typos. With ``create=False`` (commands that
    only read) a missing SQLite file is an error instead of a new empty file.
    """
    resolved = resolve_storage_url(url)
    parsed = sqlalchemy.engine.make_url(resolved)
    backend = dialect(parsed)
    if backend == "sqlite" and not create and not Path(parsed.database or "").is_file():
        raise StorageError(f"no SQLite storage at {Path(parsed.database or '').resolve()}")
    if not create and not has_optuna_schema(resolved):
        # Opening an RDBStorage creates Optuna's tables: a command that only
        # reads must not leave them in a database the user merely pointed at.
        raise StorageError(
            f"no Optuna studies in {redact(resolved)} (it has no Optuna tables); "
            "run `svdsweep sweep` or `svdsweep run` on it first, or check --storage"
        )
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
        # A few connections per worker process; Ray runs many of them.
        engine_kwargs.update(pool_size=2, max_overflow=2, pool_recycle=300)
    else:
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        with _knowing_heartbeats():
            heartbeat_kwargs: dict[str, Any] = {}
            if heartbeat:
                heartbeat_kwargs = {
                    "heartbeat_interval": heartbeat_interval(),
                    "grace_period": grace_period(),
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                }
            with _schema_lock(resolved):
                return RDBStorage(resolved, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
    except Exception as error:  # noqa: BLE001 - any failure to open is for the user to fix
        raise StorageError(f"cannot open storage {redact(resolved)}: {reason(error)}") from None


#: The name of the lock under which a storage is opened (see :func:`_schema_lock`).
SCHEMA_LOCK = "svdsweep/optuna-schema"


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Serialises Optuna's schema creation across processes, on PostgreSQL.

    Opening an :class:`RDBStorage` on an empty database creates Optuna's
    tables, then inserts the schema version and stamps Alembic's table, each
    after checking that nobody has: two first-time processes at once (two
    drivers, or a driver and a dashboard) both pass the check and one fails
    with ``UniqueViolation`` on ``version_info`` or ``alembic_version``. Under
    this advisory lock the second finds the schema complete. SQLite is left
    alone: its storage is one machine's, usually one command's, and a lock
    file would be one more file left beside the user's database.
    """
    if sqlalchemy.engine.make_url(url).get_backend_name() != "postgresql":
        yield
        return
    with budget_lock(url, SCHEMA_LOCK):
        yield


def load_study(storage: Any, name: str, **options: Any) -> optuna.Study:
    """``optuna.load_study`` through :func:`retrying`; ``KeyError`` if there is no such study."""
    return retrying(
        functools.partial(optuna.load_study, study_name=name, storage=storage, **options)
    )


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``, for a worker that keeps its trial alive with :class:`Heartbeat`."""
    with _knowing_heartbeats():
        return study.ask()


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage (what optuna-dashboard's URLs use)."""
    return int(study._study_id)


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The trial's id in its storage, which storage calls take (its number is per study)."""
    return int(trial._trial_id)


def _rdb(study: optuna.Study) -> RDBStorage:
    """The :class:`RDBStorage` of a study, under the cache Optuna may wrap it in."""
    storage: Any = study._storage
    backend: RDBStorage = getattr(storage, "_backend", storage)
    return backend


def forget_artifact(study: optuna.Study, artifact_id: str) -> None:
    """Removes the study's record of an artifact, which Optuna has no public call for.

    ``optuna.artifacts.upload_artifact`` records each artifact as the study
    system attribute ``artifacts:<id>``; ``get_all_artifact_meta`` lists them.
    The file itself is the artifact store's to remove (``store.remove``).
    """
    from optuna.storages._rdb import models

    attribute = models.StudySystemAttributeModel

    def delete() -> None:
        with contextlib.closing(_rdb(study).scoped_session()) as session:
            session.execute(
                sqlalchemy.delete(attribute).where(
                    attribute.study_id == study_id(study),
                    attribute.key == f"artifacts:{artifact_id}",
                )
            )
            session.commit()

    retrying(delete)


class Heartbeat:
    """Records a trial's heartbeat every interval in a daemon thread, whatever happens.

    A failed write (database restarting) is logged and retried at the next
    beat instead of ending the thread, so a live trial is never reaped as dead
    because of a transient error.
    """

    def __init__(self, storage: RDBStorage, trial_id: int) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._stop = threading.Event()
        interval = storage.get_heartbeat_interval()
        self._interval = float(interval) if interval else 0.0
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)
        self.failures = 0

    def __enter__(self) -> Heartbeat:
        if self._interval:
            retrying(lambda: self._storage.record_heartbeat(self._trial_id))
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception as error:  # noqa: BLE001 - keep beating through any failure
                self.failures += 1
                log.warning("heartbeat of trial %d failed: %s", self._trial_id, reason(error))


class StaleTrialReaper:
    """Fails the trials of dead workers, judging only over time it has watched the database.

    A trial is stale when its heartbeat is older than the grace period. But
    while the database is unreachable nobody's heartbeat is written, so right
    after an outage longer than the grace period every live trial *looks*
    dead, and reaping them would throw their work away (and rerun them). So the
    reaper restarts its staleness clock whenever its own connection comes back:
    it reaps nothing until it has watched the database for a whole grace
    period, which gives every live worker time to beat again. "Watched" means
    successful calls no further apart than ``grace - interval``: an outage it
    did not see (shorter than that gap) still leaves a live worker's last beat
    within the grace period. A new reaper starts its clock at its first call,
    for the same reason (it cannot know what happened before).

    One reaper per process, called repeatedly (:meth:`reap`), through
    :func:`retrying`: a transient error stops the clock and propagates.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._watching_since: float | None = None
        self._last_seen: float | None = None

    def reap(self, studies: list[optuna.Study]) -> int:
        """Reaps the stale trials of ``studies`` if the clock allows; how many it failed."""
        grace, interval = grace_period(), heartbeat_interval()
        try:
            _ping(studies[0])
        except Exception:
            self._watching_since = self._last_seen = None
            raise
        now = self._clock()
        longest_unseen_outage = max(grace - interval, 1)
        if self._last_seen is None or now - self._last_seen > longest_unseen_outage:
            self._watching_since = now  # (re)connected: restart the staleness clock
        self._last_seen = now
        assert self._watching_since is not None
        if now - self._watching_since < grace:
            return 0
        try:
            return sum(reap_stale_trials(study) for study in studies)
        except Exception:
            self._watching_since = self._last_seen = None
            raise


def _ping(study: optuna.Study) -> None:
    with _rdb(study).engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT 1"))


def reap_stale_trials(study: optuna.Study) -> int:
    """Marks the trials of dead workers FAIL (and re-queues their parameters).

    Optuna does this only inside ``optimize()`` when a live worker asks for its
    next trial, so the last trial of a killed worker would stay RUNNING forever.
    Also reaps RUNNING trials that never recorded a heartbeat (their worker died
    between claiming and the first beat), once they are older than the grace
    period. Returns how many trials were reaped.

    Does not retry: a call that waited through an outage would judge every
    live trial stale. Call it through :class:`StaleTrialReaper`, which knows
    when it may judge.
    """
    storage = study._storage
    before = _count(study, TrialState.FAIL)
    with _knowing_heartbeats():
        optuna.storages.fail_stale_trials(study)
    grace = timedelta(seconds=grace_period())
    now = datetime.now()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        started = trial.datetime_start
        if started is None or now - started <= grace:
            continue
        if _has_heartbeat(study, trial_id(trial)):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL):
                callback = storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
                if callback is not None:
                    with _knowing_heartbeats():
                        callback(study, storage.get_trial(trial_id(trial)))
    return _count(study, TrialState.FAIL) - before


def _has_heartbeat(study: optuna.Study, trial_id: int) -> bool:
    from optuna.storages._rdb import models

    with contextlib.closing(_rdb(study).scoped_session()) as session:
        return models.TrialHeartbeatModel.where_trial_id(trial_id, session) is not None


def set_user_attrs(storage: RDBStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    """Writes every attribute of ``attrs`` on the trial in one transaction, with retries.

    Optuna commits one transaction per ``set_user_attr``; a trial writes about a
    dozen attributes, which made them the largest cost of a short trial. Uses
    Optuna's own per-attribute helper inside one session (an upsert, so a retry
    after a lost connection is harmless); falls back to the public one-by-one
    calls if a future Optuna renames it.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    write_one = getattr(storage, "_set_trial_attr_without_commit", None)
    if write_one is None:  # pragma: no cover - depends on Optuna's internals
        for key, value in attrs.items():
            retrying(functools.partial(storage.set_trial_user_attr, trial_id, key, value))
        return

    def write_all() -> None:
        with _create_scoped_session(storage.scoped_session, True) as session:
            for key, value in attrs.items():
                write_one(session, models.TrialUserAttributeModel, trial_id, key, value)

    retrying(write_all)


def trial_counts(studies: list[optuna.Study]) -> list[dict[TrialState, int]]:
    """How many trials of each study are in each state: one ``COUNT … GROUP BY`` for all.

    The budget claim runs this under a lock that serialises every worker, and
    the driver every second, so it must not load the trials themselves
    (``get_trials`` reads every parameter and attribute of every trial).
    """
    from optuna.storages._rdb import models

    ids = [study_id(study) for study in studies]
    backend = _rdb(studies[0])
    trial = models.TrialModel
    query = (
        sqlalchemy.select(trial.study_id, trial.state, sqlalchemy.func.count())
        .where(trial.study_id.in_(ids))
        .group_by(trial.study_id, trial.state)
    )
    counts: dict[int, dict[TrialState, int]] = {id_: {} for id_ in ids}
    with backend.engine.connect() as connection:
        for id_, state, count in connection.execute(query):
            counts[id_][TrialState(state) if isinstance(state, int) else state] = int(count)
    return [{state: counts[id_].get(state, 0) for state in TrialState} for id_ in ids]


def _count(study: optuna.Study, state: TrialState) -> int:
    return trial_counts([study])[0][state]
