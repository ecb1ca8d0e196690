"""Atomic --out: a failed report leaves nothing; a finished one replaces the old files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

from svdsweep.report.staging import OWNER, ReportError, Staging, check_writable


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


_KILLED_REPORTER = """
import subprocess, sys, time
from pathlib import Path
from svdsweep.report.staging import Staging
staging = Staging(Path(sys.argv[1])).__enter__()
ray_stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
staging.record_processes([ray_stand_in.pid])
print(ray_stand_in.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "out-in-place"])
def test_the_next_report_removes_what_a_killed_report_left(tmp_path: Path, existing: bool) -> None:
    """SIGKILL leaves a staging directory and the reporter's Ray; the next report removes both.

    A leftover it cannot recognise as a dead reporter's (no owner file, or a
    live owner: a report running now) is left alone.
    """
    out = tmp_path / "results"
    if existing:
        out.mkdir()
        (out / "results.json").write_text("old")
    reporter = subprocess.Popen(
        [sys.executable, "-c", _KILLED_REPORTER, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert reporter.stdout is not None
    orphan = int(reporter.stdout.readline())
    live = Staging(out).__enter__()  # a report running at the same time
    reporter.kill()
    reporter.wait(timeout=30)
    unknown = out / ".staging-not-ours" if existing else tmp_path / ".results.tmp-not-ours"
    unknown.mkdir()
    leftovers = [p for p in [*tmp_path.glob(".results.tmp-*"), *out.glob(".staging-*")]
                 if p not in (live.path, unknown)]  # fmt: skip
    assert len(leftovers) == 1 and _alive(orphan)

    with Staging(out) as staging:
        assert staging.leftovers == leftovers
        (staging.path / "results.json").write_text("new")
        staging.commit()
    assert not leftovers[0].exists()
    wait_until(lambda: not _alive(orphan), timeout=30, what="the killed report's Ray to stop")
    assert live.path.is_dir() and unknown.is_dir(), "not a dead reporter's: kept"
    assert (out / "results.json").read_text() == "new"
    assert not (out / OWNER).exists()
    live.__exit__(None, None, None)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead: only its parent, gone, could reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
