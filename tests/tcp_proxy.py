"""A TCP proxy on loopback that a test can cut and restore: a database outage on demand.

The shared PostgreSQL must never be stopped (other sessions use it), so an
outage is simulated in front of it: processes reach the database through
:class:`TcpProxy`, and :meth:`TcpProxy.cut` closes the listening socket and
every open connection, exactly what clients see when the server goes away
(connections reset, new ones refused). :meth:`TcpProxy.restore` listens again
on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import sqlalchemy
from conftest import free_port


def address_of(database_url: str) -> tuple[str, int]:
    """Where the database of ``database_url`` listens: what a proxy in front of it forwards to."""
    parsed = sqlalchemy.engine.make_url(database_url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``, until :meth:`cut`; :meth:`restore` resumes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.connections = 0  # accepted so far: tells a test that a client came back
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def url(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by this proxy's."""
        parsed = sqlalchemy.engine.make_url(database_url)
        return parsed.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def restore(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()
        return self

    def cut(self) -> None:
        """The database goes away: no more connections, and the open ones are reset."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._open.clear()

    def __enter__(self) -> TcpProxy:
        return self.restore()

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, server))
                self.connections += 1
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
