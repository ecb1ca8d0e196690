"""The database rules (retries, the budget lock) and Optuna's internals that svdsweep relies on.

Each private Optuna name used by svdsweep.storage has its own test here, so
that an Optuna upgrade that drops one fails with a message naming it.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import wait_until

from svdsweep import storage as storage_module
from svdsweep.database import budget_lock, is_transient, lock_directory, retrying
from svdsweep.storage import (
    OPTUNA_INTERNALS,
    forget_artifact,
    grace_period,
    heartbeat_interval,
    open_storage,
    study_id,
    trial_counts,
    trial_id,
)


def _reach(dotted: str) -> object:
    """The object named ``dotted`` (module path, then attributes), or AttributeError."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


def _instance_attributes(study: optuna.Study, trial: optuna.Trial) -> dict[str, object]:
    """The private attributes set in __init__, so only visible on instances."""
    frozen = study.trials[0]
    cached = study._storage
    return {
        "optuna.Study._storage": study,
        "optuna.Study._study_id": study,
        "optuna.Trial._trial_id": trial,
        "optuna.trial.FrozenTrial._trial_id": frozen,
        "optuna.storages._CachedStorage._backend": cached,
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, optuna.Trial]:
    url = f"sqlite:///{tmp_path_factory.mktemp('internals')}/internals.db"
    study = optuna.create_study(study_name="pins", storage=open_storage(url, heartbeat=False))
    study.tell(study.ask(), 1.0)
    return study, study.ask()


@pytest.mark.parametrize("name", sorted(OPTUNA_INTERNALS))
def test_optuna_still_has_the_private_name(
    name: str, live: tuple[optuna.Study, optuna.Trial]
) -> None:
    study, trial = live
    holders = _instance_attributes(study, trial)
    try:
        if name in holders:
            getattr(holders[name], name.rsplit(".", 1)[1])
        else:
            _reach(name)
    except (AttributeError, ImportError):
        pytest.fail(
            f"Optuna {optuna.__version__} no longer has {name}, which svdsweep.storage uses for "
            f"{OPTUNA_INTERNALS[name]}: adapt svdsweep/storage.py (or pin optuna<"
            f"{optuna.__version__})"
        )


def test_the_internals_give_what_the_public_api_says(
    live: tuple[optuna.Study, optuna.Trial], tmp_path: Path
) -> None:
    study, trial = live
    storage = study._storage
    assert study_id(study) == storage.get_study_id_from_name("pins")
    assert trial_id(trial) == storage.get_trial_id_from_study_id_trial_number(
        study_id(study), trial.number
    )
    (counts,) = trial_counts([study])
    assert counts[optuna.trial.TrialState.COMPLETE] == 1
    assert counts[optuna.trial.TrialState.RUNNING] == 1
    storage_module.set_user_attrs(storage, trial_id(trial), {"a": 1, "b": [2, 3]})
    assert storage.get_trial(trial_id(trial)).user_attrs == {"a": 1, "b": [2, 3]}


def test_an_artifact_is_forgotten_by_its_study(tmp_path: Path) -> None:
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/a.db")
    store = FileSystemArtifactStore(str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    (tmp_path / "file.txt").write_text("x")
    kept, gone = (
        upload_artifact(artifact_store=store, file_path=str(tmp_path / "file.txt"),
                        study_or_trial=study)
        for _ in range(2)
    )  # fmt: skip
    forget_artifact(study, gone)
    assert [meta.artifact_id for meta in get_all_artifact_meta(study)] == [kept]


# -- the transient-error classifier and the backoff ---------------------------------------


def _operational(message: str = "connection refused") -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(message))


def test_connection_errors_are_transient_wherever_they_sit_in_the_chain() -> None:
    assert is_transient(_operational())
    assert is_transient(sqlalchemy.exc.InterfaceError("x", {}, Exception("closed")))
    wrapped = RuntimeError("storage call failed")
    wrapped.__cause__ = _operational()
    assert is_transient(wrapped)
    assert is_transient(optuna.exceptions.StorageInternalError("lost connection to server"))


def test_other_errors_are_not_transient() -> None:
    assert not is_transient(KeyError("no such study"))
    assert not is_transient(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate")))
    assert not is_transient(optuna.exceptions.StorageInternalError("an internal bug"))
    assert not is_transient(ValueError("bad"))


def test_retrying_backs_off_exponentially_until_the_call_succeeds() -> None:
    failures = [_operational()] * 5
    waits: list[float] = []

    def call() -> str:
        if failures:
            raise failures.pop()
        return "done"

    assert retrying(call, seconds=60, sleep=waits.append) == "done"
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0]


def test_retrying_caps_the_wait_and_gives_up_at_the_deadline() -> None:
    calls = 0

    def always_down() -> None:
        nonlocal calls
        calls += 1
        raise _operational()

    waits: list[float] = []
    with pytest.raises(sqlalchemy.exc.OperationalError):
        retrying(always_down, seconds=0.5, sleep=lambda s: (waits.append(s), time.sleep(s)))
    assert waits == [0.25] and calls == 2, "a wait that would pass the deadline is not started"

    down_for = iter(range(9))
    capped: list[float] = []

    def down_nine_times() -> str:
        if next(down_for, None) is None:
            return "back"
        raise _operational()

    assert retrying(down_nine_times, seconds=1e9, sleep=capped.append) == "back"
    assert capped == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0], "waits are capped at 5 s"


def test_retrying_raises_a_non_transient_error_at_once() -> None:
    waits: list[float] = []
    with pytest.raises(KeyError):
        retrying(functools.partial(dict().__getitem__, "x"), seconds=60, sleep=waits.append)
    assert waits == []


def test_timings_are_read_from_the_environment_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVDSWEEP_HEARTBEAT_INTERVAL", raising=False)
    monkeypatch.delenv("SVDSWEEP_GRACE_PERIOD", raising=False)
    assert (heartbeat_interval(), grace_period()) == (10, 30)
    monkeypatch.setenv("SVDSWEEP_HEARTBEAT_INTERVAL", "2")
    assert (heartbeat_interval(), grace_period()) == (2, 6)
    monkeypatch.setenv("SVDSWEEP_GRACE_PERIOD", "5")
    assert grace_period() == 5


# -- the budget lock ------------------------------------------------------------------------


def _held_alone(url: str, name: str, threads: int = 4, rounds: int = 5) -> list[str]:
    """Threads take the lock in turn; returns any overlap seen (none if it excludes)."""
    inside: list[int] = []
    overlaps: list[str] = []

    def worker(number: int) -> None:
        for _ in range(rounds):
            with budget_lock(url, name):
                inside.append(number)
                if len(inside) > 1:
                    overlaps.append(f"{inside} inside at once")
                time.sleep(0.005)
                inside.remove(number)

    started = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout=60)
    return overlaps


def test_the_budget_lock_excludes_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/lock.db"
    assert _held_alone(url, "exp") == []
    assert list(tmp_path.iterdir()) == [], "no lock file left beside the database"
    assert list(lock_directory().glob("lock-*.lock")), "the lock file is in the lock directory"


def test_the_budget_lock_takes_any_experiment_name_on_sqlite(tmp_path: Path) -> None:
    """A 300-character name once overflowed the lock file's name (ENAMETOOLONG)."""
    url = f"sqlite:///{tmp_path}/lock.db"
    assert _held_alone(url, "x" * 300, threads=2, rounds=2) == []
    assert _held_alone(url, "../not/a/path", threads=2, rounds=2) == []


def test_the_budget_lock_excludes_on_postgresql(pg_url: str) -> None:
    assert _held_alone(pg_url, "exp") == []


def test_budget_locks_of_two_experiments_do_not_wait_for_each_other(pg_url: str) -> None:
    with budget_lock(pg_url, "one"):
        done = threading.Event()

        def other() -> None:
            with budget_lock(pg_url, "two"):
                done.set()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=30)
        assert done.is_set(), "the lock of another experiment was blocked"


_FIRST_OPEN = """
import sys, time
from pathlib import Path
from svdsweep.storage import open_storage
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported: ready to go
while not go.exists():
    time.sleep(0.005)
open_storage(sys.argv[1])
"""


def test_first_time_processes_at_once_on_an_empty_postgresql_all_open_it(
    pg_url: str, tmp_path: Path
) -> None:
    """Two drivers (or a driver and a dashboard) on a new database: Optuna's schema, once.

    Without a lock both create the tables, insert the schema version and stamp
    Alembic's table, and one dies on ``UniqueViolation``. Three processes,
    released together once each has imported svdsweep.
    """
    import subprocess
    import sys

    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_OPEN, pg_url, str(go), str(tmp_path / f"ready-{n}")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    wait_until(
        lambda: len(list(tmp_path.glob("ready-*"))) == 3 or any(p.poll() for p in processes),
        timeout=120,
        what="three processes ready",
    )
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], "\n".join(errors)[-3000:]
    engine = sqlalchemy.create_engine(pg_url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        versions = connection.execute(sqlalchemy.text("SELECT count(*) FROM version_info"))
        assert versions.scalar() == 1
    engine.dispose()
