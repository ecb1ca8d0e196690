"""The CLI's one error policy: user errors in one line (exit 1), bugs with a traceback (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from svdsweep import cli, studies
from svdsweep.errors import ConfigError, UserError
from svdsweep.studies import ExperimentError


def _status(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> tuple[int, str]:
    """`svdsweep status`, in-process, with the library raising ``error``."""

    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(studies, "experiment_status", broken)
    result = CliRunner().invoke(
        cli.app, ["status", "--storage", "sqlite:///unused.db", "--experiment", "x"]
    )
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    "error",
    [
        UserError("the storage is\nunreachable"),
        ConfigError("--trials must be positive"),
        ExperimentError("no study 'x-adam'"),
        PermissionError(13, "Permission denied", "/root/out"),
    ],
)
def test_an_error_the_user_can_fix_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    code, stderr = _status(monkeypatch, error)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "error", [ValueError("an internal invariant"), KeyError("bug"), AttributeError("typo")]
)
def test_any_other_error_is_a_bug_with_its_traceback_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    code, stderr = _status(monkeypatch, error)
    assert code == 2
    assert stderr.startswith("Traceback (most recent call last):")
    assert f"{type(error).__name__}: " in stderr
    assert "internal error" in stderr.strip().splitlines()[-1]


def test_the_real_library_raises_user_errors_for_bad_input(tmp_path: Path) -> None:
    """Bad flags reach the policy as UserError, not as a bare ValueError."""
    result = CliRunner().invoke(
        cli.app, ["status", "--storage", f"sqlite:///{tmp_path}/missing.db"]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no SQLite storage at ")
    result = CliRunner().invoke(cli.app, ["train", "--lr", "-1", "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: lr must be a positive finite number, got -1.0"
