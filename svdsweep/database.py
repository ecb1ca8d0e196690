"""The database under the Optuna storage: its URL, its transient errors, a lock shared by all.

Plain SQLAlchemy, no Optuna storage: what every process needs before and
beside one.

* **One URL, resolved in one place**: ``--storage``, else ``$SVDSWEEP_STORAGE``,
  else an SQLite file in the working directory. PostgreSQL
  (``postgresql+psycopg2://...``) is the deployment path; SQLite the one-laptop default.
* **Transient errors.** A PostgreSQL restart turns every storage call into an
  ``OperationalError`` for a few seconds. :func:`retrying` repeats a call with
  exponential backoff while :func:`is_transient` says the database is only away.
  Every storage call of the sweep, the workers and the reporter goes through it.
* **Exact budgets.** :func:`budget_lock` is a cross-process lock (a PostgreSQL
  advisory lock, or a lock file next to an SQLite database) under which a
  worker counts the trials already claimed and asks for a new one only if the
  budget has room.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy

from svdsweep.errors import UserError

__all__ = [
    "DEFAULT_STORAGE",
    "StorageError",
    "budget_lock",
    "dialect",
    "has_optuna_schema",
    "is_transient",
    "lock_directory",
    "ping",
    "reason",
    "redact",
    "resolve_storage_url",
    "retry_seconds",
    "retrying",
    "single_connection",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_STORAGE = "sqlite:///svdsweep.db"
#: Total seconds a storage call keeps retrying through connection errors
#: ($SVDSWEEP_RETRY_SECONDS): long enough for PostgreSQL to restart.
RETRY_SECONDS = 120.0


class StorageError(UserError, RuntimeError):
    """The storage URL is wrong or the database cannot be reached."""


def retry_seconds() -> float:
    """How long :func:`retrying` keeps trying: ``$SVDSWEEP_RETRY_SECONDS``, else 120."""
    return float(os.environ.get("SVDSWEEP_RETRY_SECONDS") or RETRY_SECONDS)


#: Database drivers svdsweep runs on, by backend: what it installs (psycopg2-binary)
#: and Python's own sqlite3; its locks and retries are written for these.
SUPPORTED_DRIVERS = {"postgresql": ("psycopg2",), "sqlite": ("pysqlite",)}


def resolve_storage_url(url: str | None = None) -> str:
    """``url``, else ``$SVDSWEEP_STORAGE``, else :data:`DEFAULT_STORAGE`; validated.

    An empty ``url`` is an error rather than "not given": ``--storage ""``
    (say, from an unset shell variable) must not quietly use ./svdsweep.db.
    """
    if url is not None and not url.strip():
        raise StorageError(
            "--storage is empty; give a URL such as sqlite:///svdsweep.db or "
            "postgresql+psycopg2://user@host:5432/db, or leave it out for the default"
        )
    resolved = url or os.environ.get("SVDSWEEP_STORAGE") or DEFAULT_STORAGE
    try:
        parsed = sqlalchemy.engine.make_url(resolved)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(
            f"invalid storage URL {resolved!r}; expected e.g. sqlite:///svdsweep.db or "
            "postgresql+psycopg2://user:password@host:5432/db"
        ) from None
    backend = dialect(parsed)
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(
            f"unsupported storage {redact(resolved)}: svdsweep needs sqlite:/// or "
            "postgresql+psycopg2:// (exact trial budgets rely on their locks)"
        )
    if parsed.get_driver_name() not in SUPPORTED_DRIVERS[backend]:
        raise StorageError(
            f"unsupported database driver {parsed.drivername!r} in {redact(resolved)}; "
            "svdsweep runs on sqlite:///FILE and postgresql:// (= postgresql+psycopg2://)"
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


def has_optuna_schema(url: str) -> bool:
    """Whether the storage at ``url`` already holds Optuna's whole schema. Creates nothing.

    Lets read-only checks run before a sweep writes anything: opening an
    ``RDBStorage`` would create the schema (and an SQLite file). Optuna creates
    its tables, then stamps ``alembic_version`` in a second transaction; a
    storage opened between the two would create that table again, at the same
    time, and one of them fails. So the schema counts only once both are there.
    Raises :class:`StorageError` when the database cannot be reached.
    """
    parsed = sqlalchemy.engine.make_url(url)
    is_sqlite = dialect(parsed) == "sqlite"
    if is_sqlite and not Path(parsed.database or "").is_file():
        return False
    try:
        # SQLite waits out another process's write lock; PostgreSQL fails fast when away.
        with single_connection(url, timeout=60 if is_sqlite else 5) as connection:
            inspector = sqlalchemy.inspect(connection)
            return all(inspector.has_table(name) for name in ("studies", "alembic_version"))
    except Exception as error:  # noqa: BLE001 - any failure to connect is for the user to fix
        raise StorageError(f"cannot open storage {redact(url)}: {reason(error)}") from None


@contextlib.contextmanager
def single_connection(url: str, *, timeout: int) -> Iterator[sqlalchemy.Connection]:
    """One new connection, no pool, given up after ``timeout`` seconds: for a check, not work."""
    key = "timeout" if dialect(url) == "sqlite" else "connect_timeout"
    engine = sqlalchemy.create_engine(
        url, poolclass=sqlalchemy.pool.NullPool, connect_args={key: timeout}
    )
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def ping(url: str, *, timeout: int = 3) -> None:
    """``SELECT 1`` on a new connection; raises if the database does not answer in time."""
    with single_connection(url, timeout=timeout) as connection:
        connection.execute(sqlalchemy.text("SELECT 1"))


def dialect(url: str | sqlalchemy.engine.URL) -> str:
    """``sqlite`` or ``postgresql`` (or whatever else): the URL's scheme without its driver."""
    parsed = sqlalchemy.engine.make_url(url) if isinstance(url, str) else url
    return parsed.drivername.partition("+")[0]


#: First and longest wait between two tries of :func:`retrying`, in seconds:
#: a dropped connection is often back at once, a restarting PostgreSQL within
#: seconds, and a wait over 5 s would only delay the sweep once it is back.
FIRST_RETRY_DELAY, MAX_RETRY_DELAY = 0.25, 5.0


def retrying(
    call: Callable[[], T],
    *,
    seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, repeated with exponential backoff while the database is unreachable.

    Only connection-level errors are retried (see :func:`is_transient`);
    anything else (a constraint, a missing study, a bug) is raised at once.
    Gives up after ``seconds`` (else :func:`retry_seconds`) and raises the last error.
    """
    deadline = time.monotonic() + (retry_seconds() if seconds is None else seconds)
    delay = FIRST_RETRY_DELAY
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient(error) or time.monotonic() + delay > deadline:
                raise
            log.warning("storage unavailable (%s); retrying in %.1fs", reason(error), delay)
            sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)


@contextlib.contextmanager
def budget_lock(url: str, name: str) -> Iterator[None]:
    """A lock shared by every process using this storage, for claiming trial slots.

    PostgreSQL: a session-level advisory lock on a dedicated connection, freed
    by the server if the holder dies. SQLite: an exclusive lock on a file in
    :func:`lock_directory`, named after the database's path and ``name``
    (SQLite storages are single-machine by nature). Not next to the database:
    lock files cannot be deleted safely after use, so they would pile up in
    the user's working directory, and a long ``name`` would overflow a file name.
    """
    parsed = sqlalchemy.engine.make_url(url)
    if dialect(parsed) == "postgresql":
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

        database = Path(parsed.database or "svdsweep.db").resolve()
        digest = hashlib.sha256(f"{database}\0{name}".encode()).hexdigest()[:24]
        directory = lock_directory()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with FileLock(str(directory / f"{_slug(database.stem)[:40]}-{digest}.lock")):
            yield


def lock_directory() -> Path:
    """Where SQLite storages' lock files live: one directory per user in the temp dir.

    Every process of the user on this machine finds the same one, whatever its
    working directory, ``$HOME`` or cache settings (Ray workers included).
    """
    import tempfile

    return Path(tempfile.gettempdir()) / f"svdsweep-locks-{os.getuid()}"


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


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or any error it was raised from) says the database is unreachable.

    Connection-level SQLAlchemy errors, and Optuna's ``StorageInternalError``
    when it wraps a lost connection. A constraint violation, a missing study or
    a bug is not transient: retrying it would only hide it for two minutes.
    """
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


def reason(error: BaseException) -> str:
    """The first line of the innermost error, e.g. 'connection refused'."""
    current = error
    while current.__cause__ is not None:
        current = current.__cause__
    text = str(getattr(current, "orig", None) or current).strip().splitlines()
    return text[0] if text else type(current).__name__


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
