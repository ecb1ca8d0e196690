"""Bad input, as a hostile user types it: one ``error:`` line, exit 1, nothing written.

Every command is started at once (each spends seconds importing torch), in an
empty working directory that must stay empty; the PostgreSQL cases point at a
fresh, empty database that must stay without tables.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from conftest import SVDSWEEP, free_port, fresh_database

PG = "{pg}"  # replaced by the empty database's URL
CASES: dict[str, tuple[list[str], str]] = {
    "asyncpg driver": (
        ["status", "--storage", "postgresql+asyncpg://postgres@127.0.0.1/test"],
        "unsupported database driver 'postgresql+asyncpg'",
    ),
    "empty storage": (["status", "--storage", ""], "--storage is empty"),
    "empty storage for run": (["run", "--storage", ""], "--storage is empty"),
    "mysql for run": (
        ["run", "--storage", "mysql://root@127.0.0.1/test"],
        "unsupported storage mysql://",
    ),
    "Ray address with nothing listening": (
        ["sweep", "--ray-address", "127.0.0.9:{free}", "--storage", PG],
        "cannot reach Ray at 127.0.0.9:",
    ),
    "worker on a missing storage": (
        ["worker", "--storage", "sqlite:///missing.db"],
        "no SQLite storage at",
    ),
    "tpu": (["train", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    "seed 1e20": (["train", "--seed", "1e20"], "Invalid value for '--seed'"),
    "seed 10**20": (["train", "--seed", str(10**20)], "seed must be in 0..4294967295"),
    "trials 1e26": (["sweep", "--trials", "1e26"], "Invalid value for '--trials'"),
    "trials 10**26": (["sweep", "--trials", str(10**26)], "must be at most 10000 per study"),
    "negative trials": (["sweep", "--trials", "-3"], "positive int"),
    "unknown flag": (["sweep", "--trails", "3"], "No such option"),
    "dashboard port 99999": (["dashboard", "--port", "99999"], "--port must be in 1..65535"),
    "dashboard port in use": (["dashboard", "--port", "{busy}"], "cannot listen on 127.0.0.1"),
    "300-char experiment on SQLite": (
        ["sweep", "--experiment", "a" * 300, "--trials", "1"],
        "bad experiment name",
    ),
    "600-char experiment on PostgreSQL": (
        ["sweep", "--storage", PG, "--experiment", "b" * 600, "--trials", "1"],
        "bad experiment name",
    ),
    "status on an empty PostgreSQL": (["status", "--storage", PG], "no Optuna studies in"),
    "status of one experiment on an empty PostgreSQL": (
        ["status", "--storage", PG, "--experiment", "x"],
        "no studies of experiment 'x'",
    ),
    "report on an empty PostgreSQL": (["report", "--storage", PG], "no Optuna studies in"),
    "dashboard on an empty PostgreSQL": (
        ["dashboard", "--storage", PG, "--port", "{free}"],
        "no Optuna studies in",
    ),
}


@pytest.fixture(scope="module")
def empty_database() -> Iterator[str]:
    with fresh_database("bad_input") as url:
        yield url


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port some other server listens on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture(scope="module")
def results(
    empty_database: str, busy_port: int, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("SVDSWEEP_STORAGE", None)
    started = {}
    for case, (args, _) in CASES.items():
        cwd = tmp_path_factory.mktemp("cwd")
        argv = [
            a.replace(PG, empty_database)
            .replace("{busy}", str(busy_port))
            .replace("{free}", str(free_port()))
            for a in args
        ]
        process = subprocess.Popen(
            [SVDSWEEP, *argv], cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        started[case] = (process, cwd)
    finished = {}
    for case, (process, cwd) in started.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        finished[case] = (
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            cwd,
        )
    return finished


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_1_and_writes_nothing(
    results: dict[str, tuple[subprocess.CompletedProcess[str], Path]], case: str
) -> None:
    result, cwd = results[case]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert CASES[case][1] in lines[0]
    assert result.returncode == 1
    assert list(cwd.iterdir()) == [], "a refused command left files behind"


def test_read_only_commands_leave_an_empty_database_without_tables(
    results: dict[str, tuple[subprocess.CompletedProcess[str], Path]], empty_database: str
) -> None:
    assert all(result.returncode == 1 for result, _ in results.values())  # all have run
    engine = sqlalchemy.create_engine(empty_database, poolclass=sqlalchemy.pool.NullPool)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
