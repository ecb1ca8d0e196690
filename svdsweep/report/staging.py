"""Atomic ``--out``: a report is written aside and put in place at the very end, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from svdsweep.errors import UserError

__all__ = [
    "RESULTS",
    "ReportError",
    "Staging",
    "check_writable",
    "child_processes",
    "os_reason",
    "remove_leftovers",
]

#: The file that marks a directory as an svdsweep report; replaced last.
RESULTS = "results.json"
#: Inside a staging directory: who writes it (host, PID, process start), and the
#: processes it started (its local Ray), so that the next report can tell a
#: dead reporter's leftovers from a live one's.
OWNER = ".svdsweep-owner.json"


class ReportError(UserError, RuntimeError):
    """``--out`` or the artifact store cannot be written, or a final training failed."""


class Staging:
    """Where a report is written before it is put in place by :meth:`commit`.

    A new ``out`` is written as a hidden sibling and renamed into place: one
    atomic step. An existing ``out`` (a previous report, an empty directory, a
    bind mount as in docker-compose, which cannot be renamed over) is written
    as a hidden directory inside it, whose files then replace the old ones one
    by one with ``os.replace`` (results.json last). An existing ``out`` that
    holds anything but a previous report is refused.

    Entering checks that ``out`` can be written (creating missing parents);
    leaving without a commit removes the staging directory and any parent it
    created, so a failed report leaves nothing that looks like a result. A
    report killed outright (SIGKILL, out of memory) cannot clean up: the next
    one for the same ``out`` removes its leftovers (:func:`remove_leftovers`).
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out).absolute()
        self.in_place = self.out.is_dir()
        tag = uuid.uuid4().hex[:8]
        self.path = (
            self.out / f".staging-{tag}"
            if self.in_place
            else self.out.parent / f".{self.out.name}.tmp-{tag}"
        )
        self._created: list[Path] = []
        self.leftovers: list[Path] = []  # what killed reports had left, removed on entering
        self._committed = False

    def __enter__(self) -> Staging:
        out = self.out
        if not out.name or out == out.parent:
            raise ReportError(f"--out {out} cannot hold a report; name a directory")
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise ReportError(f"--out {out} exists and is not a directory")
            if any(out.iterdir()) and not (out / RESULTS).is_file():
                raise ReportError(
                    f"--out {out} exists and does not hold an svdsweep report (no {RESULTS}); "
                    "choose another directory or empty it"
                )
        missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
        self.leftovers = remove_leftovers(out)
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self._created.append(directory)
            self.path.mkdir()
            self.record_processes([])
        except OSError as error:
            self._clean()
            if error.filename in (str(self.path), str(self.path / OWNER)):
                error.filename = str(self.path.parent)  # name the user's directory, not ours
            raise ReportError(f"cannot write --out {out}: {os_reason(error)}") from None
        return self

    def record_processes(self, pids: Iterable[int]) -> None:
        """Records this process, and ``pids`` it started, as the staging directory's owners.

        A reporter killed by SIGKILL cannot clean up: the next one removes its
        staging directory and stops the processes recorded here (its Ray),
        once it sees that the owner is dead (:func:`remove_leftovers`).
        """
        owner = {**_identity(os.getpid()), "processes": [_identity(pid) for pid in pids]}
        (self.path / OWNER).write_text(json.dumps(owner))

    def commit(self) -> None:
        (self.path / OWNER).unlink(missing_ok=True)
        if self.in_place:
            for name in sorted(os.listdir(self.path), key=lambda name: name == RESULTS):
                os.replace(self.path / name, self.out / name)
            self.path.rmdir()
        else:
            self.path.rename(self.out)
        self._committed = True

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self._clean()

    def _clean(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty


def remove_leftovers(out: Path) -> list[Path]:
    """Removes what reporters killed on this machine left for ``out``; returns what it removed.

    A leftover is a staging directory of ``out`` (``out/.staging-*``, or
    ``.<out>.tmp-*`` beside it) whose :data:`OWNER` file names a process of
    this host that is no longer running. The processes it recorded (its
    local Ray: GCS, raylet, agents, workers) are killed if they are still
    running, as those same processes (same start time, so never a reused
    PID). Anything else (no owner file, another host, a live owner: a report
    running now) is left alone.
    """
    candidates = list(out.parent.glob(f".{out.name}.tmp-*"))
    if out.is_dir():
        candidates += out.glob(".staging-*")
    removed = []
    for candidate in sorted(candidates):
        try:
            owner = json.loads((candidate / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
            continue
        if _running(owner):
            continue
        for process in owner.get("processes", []):
            if _running(process):
                with contextlib.suppress(OSError):
                    os.kill(int(process["pid"]), signal.SIGKILL)
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def child_processes(pid: int | None = None) -> list[int]:
    """Every descendant of ``pid`` (else this process), from ``/proc``; [] elsewhere than Linux."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            parents.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [os.getpid() if pid is None else pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _identity(pid: int) -> dict[str, Any]:
    stat = _stat(pid)
    return {"host": socket.gethostname(), "pid": pid, "started": stat and stat[19]}


def _running(identity: dict[str, Any]) -> bool:
    """Whether the process ``identity`` names (same PID, same start time) is still running."""
    try:
        pid = int(identity["pid"])
        os.kill(pid, 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _stat(pid)
    if stat is None or identity.get("started") is None:
        return True  # cannot tell a reused PID: assume the owner is alive
    return bool(stat[19] == identity["started"]) and stat[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, ..., [19] the start time); None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def check_writable(directory: Path, flag: str) -> None:
    """Creates ``directory`` if needed and writes a probe file; :class:`ReportError` if it fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ReportError(f"cannot write {flag} {directory}: {os_reason(error)}") from None


def os_reason(error: OSError) -> str:
    """'cannot write in /proc: No such file or directory', naming the path that failed."""
    if error.filename and error.strerror:
        return f"cannot write in {error.filename}: {error.strerror}"
    return error.strerror or str(error)
