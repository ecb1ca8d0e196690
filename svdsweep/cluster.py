"""Ray, in one place: connect to a cluster or start a loopback-only one; where a task runs.

Every svdsweep process that uses Ray (the sweep driver, the reporter, the
sweep benchmark, ``svdsweep run``) enters :func:`ray_session`; code running
inside a Ray task asks :func:`node_ip` and :func:`gpu_ids` where it is.

Two rules of this project's network live here:

* A Ray started by svdsweep listens on loopback only. Ray 2.60 binds its
  servers (GCS, raylet, core workers, object manager, dashboard and runtime-env
  agents) to loopback only when the node address *is* ``127.0.0.1`` or
  ``localhost``; any other address, ``127.0.0.2`` included, gets ``0.0.0.0``
  (Ray's pull request 59852 bound them to the node address, but Ray's
  ``is_localhost`` test still decides between "localhost" and "all
  interfaces"). And ``ray.init`` rewrites ``127.0.0.1`` to the machine's
  external address, unless Ray's own single-machine switch
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the mode Ray uses on macOS and
  Windows) is off. So a local Ray is started with that switch off and node
  address 127.0.0.1: every listening socket of its processes is then on
  loopback (``tests/test_cluster.py`` lists them).
* Token auth is on (``RAY_AUTH_MODE=token``, Ray 2.60). Ray reads the mode once,
  when it is first imported, so :mod:`svdsweep` sets the default on import. A
  token file that Ray generates for svdsweep is made readable by its owner only.

A driver that joins a running cluster (``--ray-address``) announces the node
address given (``--ray-node-ip``, ``$SVDSWEEP_RAY_NODE_IP``), else 127.0.0.2:
the cluster must reach it, and Ray would rewrite 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from svdsweep.errors import UserError

__all__ = [
    "DEFAULT_RAY_NODE_IP",
    "LOCAL_RAY_NODE_IP",
    "ClusterError",
    "gpu_ids",
    "local_ray",
    "node_ip",
    "ray_session",
    "sigterm_as_interrupt",
]

#: Node address of a driver joining a cluster (see the module docstring).
DEFAULT_RAY_NODE_IP = "127.0.0.2"
#: Node address of a Ray that svdsweep starts itself: the one Ray binds to loopback.
LOCAL_RAY_NODE_IP = "127.0.0.1"
#: Ray's switch for a Ray confined to one machine (read by every Ray process at import).
SINGLE_MACHINE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ClusterError(UserError, RuntimeError):
    """Ray could not be started or reached, or lacks what the command asks of it."""


@contextlib.contextmanager
def ray_session(address: str | None, node_ip_address: str | None = None) -> Iterator[Any]:
    """Connects to ``address`` (else ``$RAY_ADDRESS``), or starts a loopback-only local Ray.

    ``address`` ``"local"`` always starts one, on node address 127.0.0.1 with
    every server on loopback; ``node_ip_address`` (else ``$SVDSWEEP_RAY_NODE_IP``)
    overrides that, for a local Ray other machines must reach, and Ray then
    listens on all interfaces. A driver joining a cluster announces
    ``node_ip_address``, else ``$SVDSWEEP_RAY_NODE_IP``, else 127.0.0.2.
    ``$SVDSWEEP_RAY_LOGS=0`` keeps task output off the driver's terminal. All
    are read here, when a command starts. Shuts down what it started; leaves a
    running cluster (or a Ray this process already joined) running.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    address = address or os.environ.get("RAY_ADDRESS") or None
    starts_here = not address or address == "local"
    node_ip_address = (
        node_ip_address
        or os.environ.get("SVDSWEEP_RAY_NODE_IP")
        or (LOCAL_RAY_NODE_IP if starts_here else DEFAULT_RAY_NODE_IP)
    )
    already = ray.is_initialized()
    with contextlib.ExitStack() as stack:
        if not already:
            if starts_here and node_ip_address == LOCAL_RAY_NODE_IP:
                stack.enter_context(_single_machine_ray(ray))
            kwargs: dict[str, Any] = {
                "_node_ip_address": node_ip_address,
                "log_to_driver": os.environ.get("SVDSWEEP_RAY_LOGS", "1") == "1",
                "configure_logging": False,
            }
            if address and not starts_here:
                _check_reachable(address)
            if threading.current_thread() is threading.main_thread():
                # Put back, after the shutdown, the handler that ray.init replaces.
                before = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL
                stack.callback(signal.signal, signal.SIGTERM, before)
            token = _auth_token_path()
            token_existed = token.exists()
            try:
                if starts_here:
                    ray.init(address="local", include_dashboard=False, **kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ClusterError(
                    f"cannot start or reach Ray at {address or 'local'}: {error}"
                ) from None
            if not token_existed and token.exists():
                token.chmod(0o600)  # Ray writes it 0644: a token others can read is no token
            stack.callback(ray.shutdown)
            stack.enter_context(sigterm_as_interrupt())  # replaces the handler ray.init set
        yield ray


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt``, as Ctrl-C does, until the block ends.

    ``ray.init`` makes SIGTERM exit the driver at once (Ray's own handler):
    the workers' trials then stay RUNNING until they are reaped as stale, and
    their configurations run again. ``kill``, ``docker stop`` and schedulers
    send SIGTERM, so it must stop a sweep as cleanly as Ctrl-C: workers
    stopped, their trials marked FAIL, exit status 130. Only the main thread
    can set a handler; elsewhere (a test's thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _single_machine_ray(ray: Any) -> Iterator[None]:
    """Ray's single-machine mode, for the processes this one starts and for itself.

    The Ray processes started from here inherit the environment variable; this
    process read it when it imported Ray, so its own copy of the flag is set
    too (a private Ray name, pinned by ``tests/test_cluster.py``).
    """
    constants = ray._private.ray_constants
    saved_environment = os.environ.get(SINGLE_MACHINE_SWITCH)
    saved_flag = constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_SWITCH] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_environment is None:
            os.environ.pop(SINGLE_MACHINE_SWITCH, None)
        else:
            os.environ[SINGLE_MACHINE_SWITCH] = saved_environment


def _check_reachable(address: str) -> None:
    """:class:`ClusterError` at once if ``HOST:PORT`` refuses connections.

    ``ray.init`` would instead retry for minutes, and first rewrite 127.0.0.1
    to the machine's external address. ``auto`` and ``ray://`` addresses are
    left to Ray.
    """
    import socket

    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as error:
        raise ClusterError(
            f"cannot reach Ray at {address}: {error.strerror or error}; start the head "
            "(`ray start --head`) or check --ray-address / $RAY_ADDRESS"
        ) from None


def _auth_token_path() -> Path:
    """Where Ray 2.60 writes the token it generates for a new local cluster."""
    return Path.home() / ".ray" / "auth_token"


@contextlib.contextmanager
def local_ray(node_ip_address: str | None = None) -> Iterator[Any]:
    """A Ray of this machine's own, for ``svdsweep run``, which must not join a cluster."""
    with ray_session("local", node_ip_address) as ray:
        yield ray


def node_ip() -> str | None:
    """The address of the Ray node this process runs on; None outside Ray."""
    import ray

    return str(ray.util.get_node_ip_address()) if ray.is_initialized() else None


def gpu_ids() -> list[str]:
    """The GPUs Ray assigned to this task, else those visible to the process."""
    import ray

    if ray.is_initialized():
        return [str(gpu) for gpu in ray.get_gpu_ids()]
    return [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu]
