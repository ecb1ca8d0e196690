"""results.json as typed results, and report.md, the dashboard note and the figures drawn from them.

Uses the results of a real run of the quick preset at small sizes (3 tuning
replicates, a rank profile; tests/data/results-quick.json, written by
``svdsweep run --trials 4 --trial-epochs 3 --seeds 3 --train-subset 1000
--profile-trials 2``, its profile's noise, sentence and verdict then recomputed by the
current reporter), and copies of it changed the way a different run would differ.
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
from svdsweep.report.stats import conclude_across, format_params

QUICK = Path(__file__).resolve().parent / "data" / "results-quick.json"


@pytest.fixture
def quick() -> Results:
    return Results.read(QUICK)


def test_results_json_reads_into_typed_results_and_writes_back_byte_for_byte(
    quick: Results,
) -> None:
    assert quick.to_json() == QUICK.read_text()
    assert quick.replicates[0].studies["svd-adam"].settings.space.k_high == 256
    assert quick.runs[0].config.optimizer == quick.runs[0].optimizer
    assert len(quick.runs_of("adam")) == 3 * len(quick.protocol.seeds) == 9
    assert len(quick.runs_of("adam", replicate=2)) == 3
    assert quick.profile is not None and [p.rank for p in quick.profile.ranks] == [
        1,
        4,
        16,
        64,
        256,
    ]


def test_an_unknown_schema_is_refused() -> None:
    raw = json.loads(QUICK.read_text())
    raw["schema"] = 1  # the layout before tuning replicates and early stopping
    with pytest.raises(ValueError, match="results schema 1, this svdsweep reads 2"):
        Results.from_dict(raw)


def test_non_finite_values_are_written_as_null(quick: Results) -> None:
    quick.runs[0].val_loss[-1] = float("nan")
    written = json.loads(quick.to_json())
    assert written["runs"][0]["val_loss"][-1] is None


def test_report_md_states_the_metric_first_then_the_verdict_and_how_to_reproduce(
    quick: Results,
) -> None:
    text = render_markdown(quick, storage_flag="postgresql+psycopg2://u:***@db/x y")
    headings = [line for line in text.splitlines() if line.startswith(("# ", "## "))]
    assert headings == [
        "# Does SVD(Adam) train better than tuned Adam?",
        "## The method",
        "## The sweep: each replicate's winners",
        "## Final trainings: 3 seeds × 3 epochs per winner",
        "## The rank profile",
        "## Conclusion",
        "## Reproduce",
        "# redraw the figures from results.json alone, without retraining:",
        "## Provenance",
    ]
    metric, verdict = text.index("**Primary metric**"), text.index("**Verdict.")
    assert metric < verdict and "early-stopped model" in text[metric:verdict]
    assert f"**Verdict. {quick.verdict}**" in text
    assert quick.verdict.startswith("Inconclusive: the replicates do not agree")
    for replicate in quick.replicates:
        for optimizer in ("adam", "svd-adam"):
            assert format_params(replicate.studies[optimizer].best.params) in text
        summary = replicate.summary["svd-adam"].test_loss
        assert summary.mean is not None and summary.std is not None
        assert f"{summary.mean:.4f} ± {summary.std:.4f}" in text
    assert "| 1 | `quick-svd-adam` |" in text and "| 3 | `quick-svd-adam-r3` |" in text
    assert "(comparison.png)" in text and "(rank_profile.png)" in text
    assert quick.profile is not None
    assert f"**{quick.profile.sentence[0].upper()}{quick.profile.sentence[1:]}**" in text
    assert "the published MLP baseline" in text and "88.33%" in text
    assert "**The original experiment** tuned each optimizer once" in text
    # The storage flag is quoted for the shell; the seeds and epochs are the report's.
    assert (
        "svdsweep report --storage 'postgresql+psycopg2://u:***@db/x y' "
        "--experiment quick --epochs 3 --seeds 3"
    ) in text
    assert text.endswith("Per-run times are in results.json.\n")


def test_the_caveats_are_read_off_the_results(quick: Results) -> None:
    text = render_markdown(quick, storage_flag=None)
    assert "Training used 1000 images, not the full 50k: a quick run" in text
    assert "diverged and are left out" not in text
    assert "--storage" not in text, "no storage flag when the default was used"
    energies = ", ".join(f"{100 * r.kept_energy:.3f}%" for r in quick.replicates if r.kept_energy)
    assert f"The tuned SVD(Adam) keeps {energies} of the gradient energy" in text

    changed = copy.deepcopy(quick)
    changed.protocol.train_subset = None
    changed.replicates[0].summary["adam"].diverged = 1
    changed.protocol.epochs = 20
    text = render_markdown(changed, storage_flag=None)
    assert "quick run" not in text
    assert "1 final run(s) diverged and are left out of the tests." in text
    assert "Trials trained 3 epochs but the finals 20" in text


def test_an_untruncated_winner_reads_as_no_test_of_denoising(quick: Results) -> None:
    """The headline a reader sees first, when the tuned k keeps all the energy."""
    changed = copy.deepcopy(quick)
    for replicate in changed.replicates:
        replicate.truncates, replicate.why_not = False, "k=51 keeps 99.9996% ..."
    assert changed.profile is not None
    changed.outcome, changed.verdict = conclude_across(
        [(r.outcome, r.truncates, r.why_not) for r in changed.replicates],
        changed.profile.sentence,
    )
    text = render_markdown(changed, storage_flag=None)
    assert "**Verdict. This comparison does not test denoising: in 3 of 3" in text
    assert "The rank profile shows: " + changed.profile.sentence in text
    assert "no truncation: k=51 keeps 99.9996%" in text  # the replicate's row says why


def test_the_dashboard_note_shows_the_verdict_and_the_attached_figure(quick: Results) -> None:
    ids = {"comparison.png": "fig-id", "report.md": "md-id"}
    note = dashboard_note(quick, Path("/out"), "quick-svd-adam-r2", 7, ids)
    assert note.startswith(f"## svdsweep report, {quick.created_at}")
    assert f"**{quick.verdict}**" in note
    assert "This note is attached to `quick-svd-adam-r2`" in note
    assert "![comparison](/artifacts/7/fig-id)" in note
    params = format_params(quick.replicates[1].studies["svd-adam"].best.params)
    assert f"| 2 | SVD(Adam) | {params} |" in note
    assert "are in `/out`" in note


def test_the_figures_are_drawn_from_results_json_as_recorded(tmp_path: Path) -> None:
    info = redraw(QUICK, tmp_path)
    recorded = Results.read(QUICK)
    assert info == [recorded.figure, recorded.profile_figure]
    for figure in info:
        data = (tmp_path / figure.file).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert list(struct.unpack(">II", data[16:24])) == figure.size_px
