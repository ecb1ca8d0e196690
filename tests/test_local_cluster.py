"""scripts/local-cluster.sh: the compose topology as processes, end to end, with a tiny budget."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[1]


def _processes_of_cluster(head: str) -> list[str]:
    """Command lines of the Ray processes of the cluster whose head is ``head`` (address:port).

    Other sessions may run their own Ray beside this one; only this cluster's
    GCS server and raylets name its head's unique port.
    """
    port = head.rsplit(":", 1)[1]
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if head in text or f"gcs_server_port={port}" in text:
            found.append(text)
    return found


@pytest.mark.slow
def test_local_cluster_runs_sweep_dashboard_and_report(pg_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(REPO / "scripts/local-cluster.sh"),
            "--storage",
            pg_url,
            "--experiment",
            "cluster",
            "--trials",
            "3",
            "--trial-epochs",
            "2",
            "--train-subset",
            "4000",
            "--report-epochs",
            "1",
            "--seeds",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
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
    # Everything it started is gone.
    (head,) = re.findall(r"Ray head on (127\.0\.0\.2:\d+)", result.stderr)
    assert _processes_of_cluster(head) == []
