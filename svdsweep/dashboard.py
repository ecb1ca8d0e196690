"""optuna-dashboard on the project's storage and artifact store, checked before it starts.

Every check that can fail on the user's input (the address, the port, the
storage) runs before anything is created, so a refused dashboard leaves no
artifact directory and no Optuna tables behind.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from svdsweep.errors import ConfigError
from svdsweep.progress import say
from svdsweep.storage import open_storage

__all__ = ["check_listen_address", "serve_dashboard"]


def serve_dashboard(
    storage_url: str | None, artifact_dir: Path | None, host: str, port: int
) -> None:
    """Serves until interrupted. Unlike the reporter, no default artifact directory:
    without ``artifact_dir`` (or ``$SVDSWEEP_ARTIFACT_DIR``) no artifacts are shown."""
    import optuna_dashboard

    check_listen_address(host, port)
    opened = open_storage(storage_url, heartbeat=False, create=False)
    directory = artifact_dir or _env_path("SVDSWEEP_ARTIFACT_DIR")
    store = None
    if directory is not None:
        from optuna.artifacts import FileSystemArtifactStore

        directory.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(directory))
    say(f"optuna-dashboard on http://{host}:{port}/ (Ctrl-C to stop)")
    optuna_dashboard.run_server(opened, host=host, port=port, artifact_store=store)


def check_listen_address(host: str, port: int) -> None:
    """:class:`ConfigError` now, rather than a server's traceback, if ``host:port`` can't listen."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host!r} is not an address of this machine: {error}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {error.strerror or error}"
                " (another server may have it; pick another --port)"
            ) from None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None
