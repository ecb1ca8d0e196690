"""Storage URL -> Optuna storage, with heartbeats, retries and an atomic budget lock.

The storage is only ever given as a URL, resolved here in one place:
``--storage``, else ``$SVDSWEEP_STORAGE``, else an SQLite file in the working
directory. PostgreSQL (``postgresql+psycopg2://...``) is the deployment path;
SQLite is the one-laptop default.

Three things Optuna leaves to its user are handled here:

* **Heartbeats that survive a flaky database.** Optuna's own heartbeat thread
  exists only inside ``study.optimize``, and one failed write kills it, after
  which the trial is reaped as stale while still running. :class:`Heartbeat`
  logs the failure and tries again at the next beat.
* **Transient errors.** A PostgreSQL restart turns every storage call into an
  ``OperationalError`` for a few seconds. :func:`retrying` repeats a call with
  exponential backoff; connections are checked before use (``pool_pre_ping``).
* **Exact budgets.** :func:`budget_lock` is a cross-process lock (a PostgreSQL
  advisory lock, or a lock file next to an SQLite database) under which a
  worker counts the trials already claimed and asks for a new one only if the
  budget has room.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

__all__ = [
    "DEFAULT_STORAGE",
    "Heartbeat",
    "StorageError",
    "budget_lock",
    "has_studies_table",
    "open_storage",
    "reap_stale_trials",
    "redact",
    "resolve_storage_url",
    "retrying",
    "set_user_attrs",
    "trial_counts",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Heartbeats and their retry callback are "experimental" in Optuna since 2.8;
# svdsweep relies on them knowingly, so the warning would only be noise.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# svdsweep's workers use ask/tell with their own Heartbeat thread, on purpose.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

DEFAULT_STORAGE = "sqlite:///svdsweep.db"
#: Seconds between heartbeats of a running trial, and after which a trial
#: without one counts as dead (its worker was killed).
HEARTBEAT_INTERVAL = int(os.environ.get("SVDSWEEP_HEARTBEAT_INTERVAL", "10"))
GRACE_PERIOD = int(os.environ.get("SVDSWEEP_GRACE_PERIOD", str(3 * HEARTBEAT_INTERVAL)))
#: How often a trial whose worker died is retried with the same parameters.
MAX_RETRY = 3
#: Total seconds a storage call keeps retrying through connection errors.
RETRY_SECONDS = float(os.environ.get("SVDSWEEP_RETRY_SECONDS", "120"))


class StorageError(RuntimeError):
    """The storage URL is wrong or the database cannot be reached."""


def resolve_storage_url(url: str | None = None) -> str:
    """``url``, else ``$SVDSWEEP_STORAGE``, else :data:`DEFAULT_STORAGE`; validated."""
    resolved = url or os.environ.get("SVDSWEEP_STORAGE") or DEFAULT_STORAGE
    try:
        parsed = sqlalchemy.engine.make_url(resolved)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(
            f"invalid storage URL {resolved!r}; expected e.g. sqlite:///svdsweep.db or "
            "postgresql+psycopg2://user:password@host:5432/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(
            f"unsupported storage {redact(resolved)}: svdsweep needs sqlite:/// or "
            "postgresql+psycopg2:// (exact trial budgets rely on their locks)"
        )
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StorageError("an in-memory SQLite storage cannot be shared by workers; give a file")
    return resolved


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


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
    backend = parsed.get_backend_name()
    if backend == "sqlite" and not create and not Path(parsed.database or "").is_file():
        raise StorageError(f"no SQLite storage at {Path(parsed.database or '').resolve()}")
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
        # A few connections per worker process; Ray runs many of them.
        engine_kwargs.update(pool_size=2, max_overflow=2, pool_recycle=300)
    else:
        engine_kwargs["connect_args"] = {"timeout": 60}
    heartbeat_kwargs: dict[str, Any] = {}
    if heartbeat:
        heartbeat_kwargs = {
            "heartbeat_interval": HEARTBEAT_INTERVAL,
            "grace_period": GRACE_PERIOD,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        }
    try:
        return RDBStorage(resolved, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
    except Exception as error:  # noqa: BLE001 - any failure to open is for the user to fix
        raise StorageError(f"cannot open storage {redact(resolved)}: {_reason(error)}") from None


def has_studies_table(url: str) -> bool:
    """Whether the storage at ``url`` already holds Optuna's schema. Creates nothing.

    Lets read-only checks run before a sweep writes anything: opening an
    :class:`RDBStorage` would create the schema (and an SQLite file).
    Raises :class:`StorageError` when the database cannot be reached.
    """
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not Path(parsed.database or "").is_file():
            return False
        connect_args: dict[str, Any] = {"timeout": 60}
    else:
        connect_args = {"connect_timeout": 5}
    engine = sqlalchemy.create_engine(
        url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args
    )
    try:
        with engine.connect() as connection:
            return sqlalchemy.inspect(connection).has_table("studies")
    except Exception as error:  # noqa: BLE001 - any failure to connect is for the user to fix
        raise StorageError(f"cannot open storage {redact(url)}: {_reason(error)}") from None
    finally:
        engine.dispose()


def retrying(call: Callable[[], T], *, seconds: float = RETRY_SECONDS) -> T:
    """``call()``, repeated with exponential backoff while the database is unreachable.

    Only connection-level errors are retried; anything else (a constraint, a
    bug) is raised at once. Gives up after ``seconds`` and raises the last error.
    """
    deadline = time.monotonic() + seconds
    delay = 0.25
    while True:
        try:
            return call()
        except Exception as error:
            if not _is_transient(error) or time.monotonic() + delay > deadline:
                raise
            log.warning("storage unavailable (%s); retrying in %.1fs", _reason(error), delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@contextlib.contextmanager
def budget_lock(url: str, name: str) -> Iterator[None]:
    """A lock shared by every process using this storage, for claiming trial slots.

    PostgreSQL: a session-level advisory lock on a dedicated connection, freed
    by the server if the holder dies. SQLite: an exclusive lock on a file next
    to the database (SQLite storages are single-machine by nature).
    """
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        engine = _lock_engine(url)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                try:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    connection.commit()
                except Exception:  # noqa: BLE001 - closing the session frees its locks
                    connection.invalidate()
    else:
        from filelock import FileLock

        database = Path(parsed.database or "svdsweep.db")
        with FileLock(str(database.with_name(database.name + f".{_slug(name)}.lock"))):
            yield


_lock_engines: dict[str, sqlalchemy.engine.Engine] = {}


def _lock_engine(url: str) -> sqlalchemy.engine.Engine:
    if url not in _lock_engines:
        # One pooled connection: PostgreSQL forks a backend per new connection,
        # which cost more than the claim itself. Its advisory lock is released
        # before the connection goes back to the pool, and by the server if the
        # process dies.
        _lock_engines[url] = sqlalchemy.create_engine(
            url,
            pool_size=1,
            max_overflow=4,  # threads of one process claiming at once (tests)
            pool_pre_ping=True,
            connect_args={"connect_timeout": 5},
        )
    return _lock_engines[url]


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
                log.warning("heartbeat of trial %d failed: %s", self._trial_id, _reason(error))


def reap_stale_trials(study: optuna.Study) -> int:
    """Marks the trials of dead workers FAIL (and re-queues their parameters).

    Optuna does this only inside ``optimize()`` when a live worker asks for its
    next trial, so the last trial of a killed worker would stay RUNNING forever.
    Also reaps RUNNING trials that never recorded a heartbeat (their worker died
    between claiming and the first beat), once they are older than the grace
    period. Returns how many trials were reaped.
    """
    storage = study._storage
    before = _count(study, TrialState.FAIL)
    retrying(lambda: optuna.storages.fail_stale_trials(study))
    grace = timedelta(seconds=GRACE_PERIOD)
    now = datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if started is None or now - started <= grace:
            continue
        if _has_heartbeat(study, trial._trial_id):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                callback = storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
                if callback is not None:
                    callback(study, storage.get_trial(trial._trial_id))
    return _count(study, TrialState.FAIL) - before


def _has_heartbeat(study: optuna.Study, trial_id: int) -> bool:
    from optuna.storages._rdb import models

    storage = study._storage
    backend: Any = getattr(storage, "_backend", storage)
    with contextlib.closing(backend.scoped_session()) as session:
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

    ids = [study._study_id for study in studies]
    backend: Any = getattr(studies[0]._storage, "_backend", studies[0]._storage)
    trial = models.TrialModel
    query = (
        sqlalchemy.select(trial.study_id, trial.state, sqlalchemy.func.count())
        .where(trial.study_id.in_(ids))
        .group_by(trial.study_id, trial.state)
    )
    counts: dict[int, dict[TrialState, int]] = {study_id: {} for study_id in ids}
    with backend.engine.connect() as connection:
        for study_id, state, count in connection.execute(query):
            counts[study_id][TrialState(state) if isinstance(state, int) else state] = int(count)
    return [{state: counts[study_id].get(state, 0) for state in TrialState} for study_id in ids]


def _count(study: optuna.Study, state: TrialState) -> int:
    return trial_counts([study])[0][state]


def _is_transient(error: BaseException) -> bool:
    transient = (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.DisconnectionError,
        sqlalchemy.exc.TimeoutError,
    )
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, transient):
            return True
        if (
            isinstance(current, optuna.exceptions.StorageInternalError)
            and "connection" in str(current).lower()
        ):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _reason(error: BaseException) -> str:
    """The first line of the innermost error, e.g. 'connection refused'."""
    current = error
    while current.__cause__ is not None:
        current = current.__cause__
    text = str(getattr(current, "orig", None) or current).strip().splitlines()
    return text[0] if text else type(current).__name__


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
