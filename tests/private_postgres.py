"""A throwaway PostgreSQL cluster of a test's own, which it may restart: never the shared one.

Built with Debian's binaries (``/usr/lib/postgresql/<version>/bin``): ``initdb``
in a new temporary directory, trust authentication on 127.0.0.1 only, a free
port, and its socket in its own directory. PostgreSQL refuses to run as
root, so under root the cluster belongs to the ``postgres`` user (``runuser``).
Removed, server and files, when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port


def _binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@dataclass
class PrivateCluster:
    """A running PostgreSQL of one test: its URL, and :meth:`restart`."""

    bindir: Path
    datadir: Path
    port: int
    run_as: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.datadir}"
        subprocess.run(
            [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.datadir / "data"),
             "-l", str(self.datadir / "server.log"), "-o", options, "-w", "-t", "60", *args],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip

    def restart(self) -> None:
        """A fast restart: every client connection is cut, as in a real server restart."""
        self.pg_ctl("-m", "fast", "restart")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivateCluster]:
    """A new PostgreSQL cluster on a free loopback port; skips without Debian's binaries."""
    bindir = _binaries()
    if bindir is None:
        pytest.skip("a private PostgreSQL needs initdb under /usr/lib/postgresql/*/bin")
    run_as: list[str] = []
    directory = Path(tempfile.mkdtemp(prefix="svdsweep-pg-"))
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    cluster = PrivateCluster(bindir, directory, free_port(), run_as)
    try:
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(directory / "data"), "-U", "postgres",
             "-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        cluster.pg_ctl("start")
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(directory, ignore_errors=True)
