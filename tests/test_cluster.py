"""A Ray that svdsweep starts stays on loopback: every listening socket, and its token file.

The check inspects sockets only (``/proc``), while a real ``svdsweep sweep`` runs;
no traffic goes anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import SVDSWEEP, wait_until

from svdsweep import cluster
from svdsweep.report.staging import child_processes

#: /proc/net/tcp* state code of a listening socket.
LISTEN = "0A"


def socket_owners(pids: set[int]) -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, command name) for the sockets these processes hold open."""
    owners: dict[int, tuple[int, str]] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                if match:
                    owners[int(match.group(1))] = (pid, name)
        except OSError:
            continue
    return owners


def decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def listening_sockets(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``pids``."""
    owners = socket_owners(pids)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != LISTEN or inode not in owners:
                continue
            hex_address, hex_port = local.split(":")
            found.append((str(decode_address(hex_address)), int(hex_port, 16), owners[inode][1]))
    return found


def test_proc_addresses_decode_as_ss_prints_them() -> None:
    assert str(decode_address("0100007F")) == "127.0.0.1"
    assert str(decode_address("00000000")) == "0.0.0.0"
    assert str(decode_address("0000000000000000FFFF00000200007F")) == "127.0.0.2"
    assert str(decode_address("00000000000000000000000000000000")) == "::"


def test_the_private_ray_flag_this_module_sets_still_exists() -> None:
    """Ray reads its single-machine switch at import; cluster.py sets Ray's copy too."""
    import ray._private.ray_constants as constants

    assert isinstance(getattr(constants, "ENABLE_RAY_CLUSTER", None), bool), (
        "ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone: svdsweep.cluster"
        "._single_machine_ray must find Ray's new way to keep a local Ray on loopback"
    )
    assert constants.ENABLE_RAY_CLUSTERS_ENV_VAR == cluster.SINGLE_MACHINE_SWITCH


@pytest.mark.slow
def test_a_local_sweep_listens_on_loopback_only(tmp_path: Path) -> None:
    """Every listening socket of a running local sweep is on 127.0.0.0/8; the token is 0600."""
    home = tmp_path / "home"  # a fresh ~/.ray, so that this sweep's Ray generates the token
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_ADDRESS": "", "SVDSWEEP_RAY_LOGS": "0"}
    env.pop("SVDSWEEP_RAY_NODE_IP", None)
    env.pop(cluster.SINGLE_MACHINE_SWITCH, None)
    sweep = subprocess.Popen(
        [SVDSWEEP, "sweep", "--storage", f"sqlite:///{tmp_path}/loopback.db",
         "--experiment", "loopback", "--trials", "2", "--workers", "1",
         "--trial-epochs", "1", "--train-subset", "500"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def ray_is_up() -> list[tuple[str, int, str]] | None:
            assert sweep.poll() is None, "the sweep ended before Ray was seen"
            sockets = listening_sockets({sweep.pid, *child_processes(sweep.pid)})
            names = {name for _, _, name in sockets}
            # The servers Ray starts first and the worker that runs the trials.
            if {"gcs_server", "raylet"} <= names and any("ray::" in n for n in names):
                return sockets
            return None

        sockets = wait_until(ray_is_up, timeout=120, interval=0.5, what="Ray's servers")
        sockets += listening_sockets({sweep.pid, *child_processes(sweep.pid)})  # later starters too
    finally:
        try:
            _, stderr = sweep.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            sweep.kill()
            _, stderr = sweep.communicate()
    assert sweep.returncode == 0, stderr[-2000:]
    outside = sorted({s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback})
    assert not outside, f"listening beyond loopback: {outside}"
    assert len(sockets) >= 4
    token = home / ".ray" / "auth_token"
    assert token.is_file()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
