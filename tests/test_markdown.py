"""results.json as typed results, and report.md, the dashboard note and the figure drawn from them.

Uses the committed report of the paper protocol (docs/results/results.json),
and copies of it changed the way a different run would differ.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest

from svdsweep.plot import redraw
from svdsweep.report.markdown import dashboard_note, render_markdown
from svdsweep.report.results import Results
from svdsweep.report.stats import format_params

PAPER = Path(__file__).resolve().parents[1] / "docs" / "results" / "results.json"


@pytest.fixture
def paper() -> Results:
    return Results.read(PAPER)


def test_results_json_reads_into_typed_results_and_writes_back_byte_for_byte(
    paper: Results,
) -> None:
    assert paper.to_json() == PAPER.read_text()
    assert paper.studies["svd-adam"].settings.space.k_high == 64
    assert paper.runs[0].config.optimizer == paper.runs[0].optimizer
    assert len(paper.runs_of("adam")) == len(paper.protocol.seeds) == 5
    assert paper.test.test_acc.p_value == pytest.approx(0.8567599632877732)


def test_an_unknown_schema_is_refused() -> None:
    raw = json.loads(PAPER.read_text())
    raw["schema"] = 99
    with pytest.raises(ValueError, match="results schema 99"):
        Results.from_dict(raw)


def test_non_finite_values_are_written_as_null(paper: Results) -> None:
    paper.runs[0].val_loss[-1] = float("nan")
    written = json.loads(paper.to_json())
    assert written["runs"][0]["val_loss"][-1] is None


def test_report_md_states_the_verdict_the_numbers_and_how_to_reproduce(paper: Results) -> None:
    text = render_markdown(paper, storage_flag="postgresql+psycopg2://u:***@db/x y")
    headings = [line for line in text.splitlines() if line.startswith(("# ", "## "))]
    assert headings == [
        "# Does SVD(Adam) train better than tuned Adam?",
        "## The method",
        "## The sweep: best parameters",
        "## Final trainings: 5 seeds × 20 epochs",
        "## Significance test",
        "## Conclusion",
        "## Reproduce",
        "# redraw the figure from results.json alone, without retraining:",
        "## Provenance",
    ]
    assert f"**Verdict. {paper.verdict}**" in text
    assert "Supported: SVD(Adam) reaches a lower final test loss" in text
    for optimizer in ("adam", "svd-adam"):
        assert format_params(paper.studies[optimizer].best.params) in text
    summary = paper.summary["svd-adam"]
    assert summary.test_loss.mean is not None and summary.test_loss.std is not None
    assert f"{summary.test_loss.mean:.4f} ± {summary.test_loss.std:.4f}" in text
    assert "| `paper-svd-adam` | 30 / 0 / 0; 2 (budget 30) | 0.3053 |" in text
    assert "p = 0.857" in text  # test accuracy, for information
    assert "(comparison.png)" in text
    # The storage flag is quoted for the shell; the seeds and epochs are the report's.
    assert (
        "svdsweep report --storage 'postgresql+psycopg2://u:***@db/x y' "
        "--experiment paper --epochs 20 --seeds 5"
    ) in text
    assert text.endswith("Per-run times are in results.json.\n")


def test_the_caveats_are_read_off_the_results(paper: Results) -> None:
    text = render_markdown(paper, storage_flag=None)
    assert "Adam's is lowest at epoch 8 (0.3039) and 0.3811 at epoch 20" in text
    assert "The rank-51 gradient keeps 99.9996% of the gradient's energy" in text
    assert "Test accuracy does not differ significantly" in text
    assert "quick run" not in text and "diverged and are left out" not in text
    assert "--storage" not in text, "no storage flag when the default was used"

    changed = copy.deepcopy(paper)
    changed.protocol.train_subset = 10_000
    changed.summary["adam"].diverged = 1
    changed.studies["svd-adam"].best.params["k"] = 64
    text = render_markdown(changed, storage_flag=None)
    assert "Training used 10000 images, not the full 50k: a quick run" in text
    assert "1 final run(s) diverged and are left out of the test." in text
    assert "The best k (64) is the top of the searched range [1, 64]" in text


def test_the_dashboard_note_shows_the_verdict_and_the_attached_figure(paper: Results) -> None:
    ids = {"comparison.png": "fig-id", "report.md": "md-id"}
    note = dashboard_note(paper, Path("/out"), "svd-adam", 7, ids)
    assert note.startswith(f"## svdsweep report, {paper.created_at}")
    assert f"**{paper.verdict}**" in note
    assert f"Best trial of this study: #{paper.studies['svd-adam'].best.number}" in note
    assert "![comparison](/artifacts/7/fig-id)" in note
    assert "| SVD(Adam) | lr=0.000658, k=51 |" in note
    assert "are in `/out`" in note


def test_the_figure_is_drawn_from_results_json_as_recorded(tmp_path: Path) -> None:
    info = redraw(PAPER, tmp_path / "comparison.png")
    recorded = Results.read(PAPER).figure
    assert info == recorded
    data = (tmp_path / "comparison.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(struct.unpack(">II", data[16:24])) == recorded.size_px
