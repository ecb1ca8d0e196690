"""The artifact store: the figures and report.md attached to every tuning study (dashboard).

Optuna's artifact store (``optuna.artifacts``) keeps the files; each study
records its artifacts, and optuna-dashboard shows them with a note. A rerun
replaces this report's previous artifacts instead of piling up duplicates.
The store is ``--artifact-dir``, else ``$SVDSWEEP_ARTIFACT_DIR``, else
./svdsweep-artifacts, looked up when the command starts.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import optuna
import sqlalchemy

from svdsweep.database import dialect, retrying
from svdsweep.report.staging import check_writable
from svdsweep.storage import forget_artifact, study_id

__all__ = [
    "DEFAULT_ARTIFACT_DIR",
    "attach_artifacts",
    "check_artifact_dir",
    "dashboard_command",
    "resolve_artifact_dir",
]

#: Next to the default SQLite storage, in the working directory.
DEFAULT_ARTIFACT_DIR = "svdsweep-artifacts"

#: ``note(optimizer, study_id, artifact ids by file name) -> Markdown``.
NoteWriter = Callable[[str, int, dict[str, str]], str]


def resolve_artifact_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """``--artifact-dir``, else ``$SVDSWEEP_ARTIFACT_DIR``, else ./svdsweep-artifacts."""
    return Path(path or os.environ.get("SVDSWEEP_ARTIFACT_DIR") or DEFAULT_ARTIFACT_DIR)


def check_artifact_dir(directory: Path) -> None:
    """Fails before any training if the artifact store cannot be written."""
    check_writable(directory, "--artifact-dir")


def attach_artifacts(
    studies: dict[str, optuna.Study], files: dict[str, Path], artifact_dir: Path, note: NoteWriter
) -> dict[str, dict[str, str]]:
    """Uploads ``files`` to each study, replacing this report's previous ones; notes each.

    A previous artifact of the same file name is removed from the store and
    from the study, only after the new ones are in, so that a failure never
    loses the previous report. Returns the new artifact ids, by study and file name.
    """
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound
    from optuna_dashboard import save_note

    store = FileSystemArtifactStore(str(artifact_dir))
    uploaded: dict[str, dict[str, str]] = {}
    for optimizer, study in studies.items():
        ids = {
            name: retrying(
                partial(
                    upload_artifact, artifact_store=store, file_path=str(path), study_or_trial=study
                )
            )
            for name, path in files.items()
        }
        for meta in retrying(partial(get_all_artifact_meta, study)):
            if meta.filename in files and meta.artifact_id not in ids.values():
                with contextlib.suppress(ArtifactNotFound):  # e.g. in another --artifact-dir
                    store.remove(meta.artifact_id)
                forget_artifact(study, meta.artifact_id)
        retrying(partial(save_note, study, note(optimizer, study_id(study), ids)))
        uploaded[study.study_name] = ids
    return uploaded


def svdsweep_command() -> str:
    """``svdsweep`` if this shell's PATH finds this installation, else its full path.

    A user who ran ``.venv/bin/svdsweep run`` has no ``svdsweep`` on PATH, so a
    printed command must name the script to work as printed.
    """
    installed = Path(sys.executable).with_name("svdsweep")
    if not installed.exists():
        return "svdsweep"
    on_path = shutil.which("svdsweep")
    if on_path and Path(on_path).resolve() == installed.resolve():
        return "svdsweep"
    return str(installed.absolute())


def dashboard_command(storage_url: str, artifact_dir: Path, *, storage_given: bool = True) -> str:
    """The exact command that opens optuna-dashboard on this storage and artifact store.

    A relative SQLite path is made absolute, so the command works from any
    directory; a password is never printed (``$SVDSWEEP_STORAGE`` is then used).
    """
    parts = [svdsweep_command(), "dashboard"]
    parsed = sqlalchemy.engine.make_url(storage_url)
    if dialect(parsed) == "sqlite" and parsed.database:
        storage_url = f"sqlite:///{Path(parsed.database).absolute()}"
        storage_given = True
    elif parsed.password:
        storage_given = False  # the dashboard reads $SVDSWEEP_STORAGE like every command
    if storage_given:
        parts += ["--storage", storage_url]
    parts += ["--artifact-dir", str(artifact_dir.absolute())]
    return shlex.join(parts)
