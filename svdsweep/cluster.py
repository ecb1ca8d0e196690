"""Ray, in one place: connect to a cluster or start a loopback-only one; where a task runs.

Every svdsweep process that uses Ray (the sweep driver, the reporter, the
sweep benchmark, ``svdsweep run``) enters :func:`ray_session`; code running
inside a Ray task asks :func:`node_ip` and :func:`gpu_ids` where it is.

Two rules of this project's network live here:

* A Ray started by svdsweep listens on a loopback address, never on the
  machine's external one. Not 127.0.0.1: Ray rewrites that to the external
  address, hence :data:`DEFAULT_RAY_NODE_IP`.
* Token auth is on (``RAY_AUTH_MODE=token``, Ray 2.60). Ray reads the mode once,
  when it is first imported, so :mod:`svdsweep` sets the default on import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from svdsweep.errors import UserError

__all__ = ["DEFAULT_RAY_NODE_IP", "ClusterError", "gpu_ids", "local_ray", "node_ip", "ray_session"]

#: Loopback address of a Ray that svdsweep starts itself (see the module docstring).
DEFAULT_RAY_NODE_IP = "127.0.0.2"


class ClusterError(UserError, RuntimeError):
    """Ray could not be started or reached, or lacks what the command asks of it."""


@contextlib.contextmanager
def ray_session(address: str | None, node_ip_address: str | None = None) -> Iterator[Any]:
    """Connects to ``address`` (else ``$RAY_ADDRESS``), or starts a loopback-only local Ray.

    ``address`` ``"local"`` always starts one. The node address of a started Ray
    is ``node_ip_address``, else ``$SVDSWEEP_RAY_NODE_IP``, else 127.0.0.2;
    ``$SVDSWEEP_RAY_LOGS=0`` keeps task output off the driver's terminal. Both
    are read here, when a command starts. Shuts down what it started; leaves a
    running cluster (or a Ray this process already joined) running.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    address = address or os.environ.get("RAY_ADDRESS") or None
    node_ip_address = (
        node_ip_address or os.environ.get("SVDSWEEP_RAY_NODE_IP") or DEFAULT_RAY_NODE_IP
    )
    already = ray.is_initialized()
    if not already:
        kwargs: dict[str, Any] = {
            "_node_ip_address": node_ip_address,
            "log_to_driver": os.environ.get("SVDSWEEP_RAY_LOGS", "1") == "1",
            "configure_logging": False,
        }
        try:
            if address and address != "local":
                ray.init(address=address, **kwargs)
            else:
                ray.init(address="local", include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterError(
                f"cannot start or reach Ray at {address or 'local'}: {error}"
            ) from None
    try:
        yield ray
    finally:
        if not already:
            ray.shutdown()


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
