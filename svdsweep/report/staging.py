"""Atomic ``--out``: a report is written aside and put in place at the very end, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from svdsweep.errors import UserError

__all__ = ["RESULTS", "ReportError", "Staging", "check_writable", "os_reason"]

#: The file that marks a directory as an svdsweep report; replaced last.
RESULTS = "results.json"


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
    created, so a failed report leaves nothing that looks like a result.
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
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self._created.append(directory)
            self.path.mkdir()
            (self.path / ".write-test").write_bytes(b"")
            (self.path / ".write-test").unlink()
        except OSError as error:
            self._clean()
            if error.filename in (str(self.path), str(self.path / ".write-test")):
                error.filename = str(self.path.parent)  # name the user's directory, not ours
            raise ReportError(f"cannot write --out {out}: {os_reason(error)}") from None
        return self

    def commit(self) -> None:
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
