"""scripts/local-cluster.sh: the compose topology as processes, end to end, with a tiny budget."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import wait_until

from svdsweep.report.staging import child_processes

REPO = Path(__file__).resolve().parents[1]


def _start_time(pid: int) -> str | None:
    """The process's start time (a PID can be reused; a PID and its start time cannot)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _still_running(started: set[tuple[int, str | None]]) -> list[int]:
    return [pid for pid, start in started if start is not None and _start_time(pid) == start]


@pytest.mark.slow
def test_local_cluster_runs_sweep_dashboard_and_report(pg_url: str, tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        script = subprocess.Popen(
            [
                str(REPO / "scripts/local-cluster.sh"),
                *("--storage", pg_url, "--experiment", "cluster", "--trials", "3"),
                *("--trial-epochs", "2", "--train-subset", "4000", "--report-epochs", "1"),
                *("--seeds", "2", "--workdir", str(tmp_path)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
        # Every process the script starts (Ray's head and nodes, their raylets,
        # GCS, agents and workers, the dashboard): this test's, and only these.
        started: set[tuple[int, str | None]] = set()
        deadline = time.monotonic() + 900
        while script.poll() is None and time.monotonic() < deadline:
            started |= {(pid, _start_time(pid)) for pid in child_processes(script.pid)}
            time.sleep(0.5)
        if script.poll() is None:
            script.kill()
    result = subprocess.CompletedProcess(script.args, script.wait(), "", stderr_path.read_text())
    assert result.returncode == 0, result.stderr[-3000:]

    status = json.loads((tmp_path / "status.json").read_text())
    assert [(s["study"], s["finished"], s["counts"]["RUNNING"]) for s in status] == [
        ("cluster-adam", 3, 0),
        ("cluster-svd-adam", 3, 0),
    ]
    nodes = {
        trial.user_attrs["worker_node_ip"]
        for optimizer in ("adam", "svd-adam")
        for trial in optuna.load_study(
            study_name=f"cluster-{optimizer}", storage=pg_url
        ).get_trials(deepcopy=False)
    }
    # Six trials of a few seconds each leave both workers time to start and pull.
    assert nodes == {"127.0.0.3", "127.0.0.4"}, "trials should run on both worker nodes"
    assert "dashboard answered with studies ['cluster-adam', 'cluster-svd-adam']" in result.stderr
    assert (tmp_path / "results" / "report.md").is_file()
    assert (tmp_path / "results" / "comparison.png").stat().st_size > 10_000
    # Everything it started is gone (and nothing else was looked at).
    assert len(started) > 5, "the processes the script started were seen"
    wait_until(
        lambda: not _still_running(started), timeout=60, what="the script's processes to stop"
    )
