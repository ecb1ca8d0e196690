"""Atomic --out: a failed report leaves nothing; a finished one replaces the old files."""

from __future__ import annotations

from pathlib import Path

import pytest

from svdsweep.report.staging import ReportError, Staging, check_writable


def test_a_failure_after_staging_leaves_no_results_directory(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "er" / "results"
    with pytest.raises(RuntimeError, match="boom"), Staging(out) as staging:
        (staging.path / "results.json").write_text("{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [], "staging and the parents it created are gone"
    assert not out.exists()


def test_a_new_out_appears_whole_on_commit(tmp_path: Path) -> None:
    out = tmp_path / "results"
    with Staging(out) as staging:
        (staging.path / "results.json").write_text("new")
        assert not out.exists(), "nothing in place before the commit"
        staging.commit()
    assert [p.name for p in out.iterdir()] == ["results.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"], "no staging left beside it"


def test_an_existing_report_is_replaced_in_place_or_kept(tmp_path: Path) -> None:
    # An existing report (or a bind mount, which cannot be renamed over) is
    # updated in place: kept as it was on failure, replaced file by file on success.
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), Staging(report) as staging:
        (staging.path / "results.json").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in report.iterdir()] == ["results.json"]
    assert (report / "results.json").read_text() == "old"
    with Staging(report) as staging:
        (staging.path / "results.json").write_text("new")
        (staging.path / "report.md").write_text("new")
        staging.commit()
    assert sorted(p.name for p in report.iterdir()) == ["report.md", "results.json"]
    assert (report / "results.json").read_text() == "new"


def test_a_directory_that_is_not_a_report_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ReportError, match="does not hold an svdsweep report"):
        Staging(tmp_path / "mine").__enter__()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ReportError, match="exists and is not a directory"):
        Staging(tmp_path / "a-file").__enter__()


def test_an_unwritable_directory_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ReportError) as raised:
        check_writable(tmp_path / "a-file" / "store", "--artifact-dir")
    message = str(raised.value)
    assert message.startswith(f"cannot write --artifact-dir {tmp_path / 'a-file' / 'store'}")
    assert "\n" not in message
