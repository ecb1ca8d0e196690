"""What the tests share: real data, one PostgreSQL fixture, a free port, the CLI, a wait.

* ``fashion_splits``: the real Fashion-MNIST splits, loaded once, in an isolated cache.
* ``pg_url``: a fresh, uniquely named PostgreSQL database per test, dropped
  afterwards; :func:`fresh_database` is the same for a module-scoped fixture.
  Other sessions may run their own databases beside these: names never collide.
* :func:`free_port`: a free TCP port on loopback, for servers a test starts.
* :func:`svdsweep_cli`: the installed ``svdsweep`` console script, run as a user runs it.
* :func:`wait_until`: polls a condition, instead of each test's own loop.

Tests import the plain functions with ``from conftest import ...``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from svdsweep.data import Splits, load_splits

T = TypeVar("T")

#: Training images of the real-data slice shared by the training tests.
REAL_TRAIN_IMAGES = 10_000
#: The local PostgreSQL every test database lives in (trust auth).
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
#: The console script of the environment running the tests, not of any checkout.
SVDSWEEP = shutil.which("svdsweep", path=str(Path(sys.executable).parent)) or str(
    Path(sys.executable).with_name("svdsweep")
)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory for the whole session, so tests never write to ~/.cache."""
    return tmp_path_factory.mktemp("svdsweep-cache")


@pytest.fixture(scope="session")
def fashion_splits(session_cache: Path) -> Splits:
    """The first 10k training images, the 10k validation and the test split, on CPU.

    Found the way a user's run finds them (``SVDSWEEP_DATA_DIR``, else Debian's
    package). Shared by many tests: never modify these tensors in place.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SVDSWEEP_CACHE_DIR", str(session_cache))
        return load_splits("fashion-mnist", device="cpu", train_subset=REAL_TRAIN_IMAGES)


@contextlib.contextmanager
def fresh_database(tag: str = "test") -> Iterator[str]:
    """A new PostgreSQL database with a unique name; its URL; dropped afterwards.

    Skips the test when PostgreSQL is not running on 127.0.0.1:5432.
    """
    psycopg2 = pytest.importorskip("psycopg2")
    name = f"svdsweep_{tag}_{uuid.uuid4().hex[:10]}"

    def admin(sql: str) -> None:
        connection = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
        try:
            connection.autocommit = True
            connection.cursor().execute(sql)
        finally:
            connection.close()

    try:
        admin(f'CREATE DATABASE "{name}"')
    except psycopg2.OperationalError as error:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is needed: {error}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    with fresh_database() as url:
        yield url


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a server started at once will get it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def svdsweep_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``svdsweep ARGS`` in a subprocess, as a user runs it; output captured as text."""
    return subprocess.run(
        [SVDSWEEP, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.5,
    what: str = "the condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Polls ``condition()`` until it returns something truthy, and returns that.

    Errors of the types in ``ignore`` count as "not yet" (e.g. a study not
    created yet); an ``AssertionError`` names ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except ignore:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
