"""report.md, and the note shown on each study in optuna-dashboard, from a :class:`Results`.

The report reads top to bottom as a reader checks a claim: the verdict, the
method, the sweep's best parameters, the final trainings, the figure, the
test, the caveats read off the results, how to reproduce, and provenance.
Each section is one function; every number comes from the results object.
"""

from __future__ import annotations

import shlex
import statistics
from pathlib import Path

from svdsweep.report.results import Results
from svdsweep.report.stats import Spread, format_params, mean_curve, number, p_value
from svdsweep.train import OPTIMIZERS

__all__ = ["FIGURE", "LABELS", "REPORT", "dashboard_note", "render_markdown"]

FIGURE, REPORT = "comparison.png", "report.md"
LABELS = {"adam": "Adam", "svd-adam": "SVD(Adam)"}


def render_markdown(results: Results, *, storage_flag: str | None) -> str:
    """report.md: the method, the sweep, the finals, the figure, the test, the verdict.

    ``storage_flag``: the ``--storage`` the user gave (password hidden), repeated
    in the Reproduce section; None when the default storage was used.
    """
    sections = [
        _title(results),
        _method(results),
        _sweep(results),
        _finals(results),
        _significance(results),
        _conclusion(results),
        _reproduce(results, storage_flag),
        "## Provenance\n\n" + _provenance(results) + "\n",
    ]
    return "\n\n".join(sections)


def dashboard_note(
    results: Results, out: Path, optimizer: str, study_id: int, ids: dict[str, str]
) -> str:
    """The Markdown note on a study in optuna-dashboard, showing the attached figure."""
    best = results.studies[optimizer].best
    rows = [
        f"| {LABELS[o]} | {format_params(results.studies[o].best.params)} | "
        f"{mean_std(results.summary[o].test_loss)} | "
        f"{mean_std(results.summary[o].test_acc, pct=True)} |"
        for o in OPTIMIZERS
    ]
    return "\n".join(
        [
            f"## svdsweep report, {results.created_at}",
            "",
            f"**{results.verdict}**",
            "",
            f"Best trial of this study: #{best.number}, validation loss "
            f"{best.value:.4f}, {format_params(best.params)}.",
            "",
            f"Final trainings, {len(results.protocol.seeds)} seeds × "
            f"{results.protocol.epochs} epochs (mean ± std over seeds):",
            "",
            "| optimizer | parameters | test loss (nats) | test accuracy |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"![comparison](/artifacts/{study_id}/{ids[FIGURE]})",
            "",
            f"`{FIGURE}` and `{REPORT}` are attached to this study (Artifacts); all files, "
            f"with `results.json`, are in `{out}`.",
        ]
    )


def _title(results: Results) -> str:
    return "\n".join(
        [
            "# Does SVD(Adam) train better than tuned Adam?",
            "",
            f"**Verdict. {results.verdict}** Read it with the caveats in the "
            "[conclusion](#conclusion).",
            "",
            f"Experiment `{results.experiment}` in `{results.storage}`, reported "
            f"{results.created_at} by svdsweep {results.versions['svdsweep']}.",
        ]
    )


def _method(results: Results) -> str:
    protocol, test = results.protocol, results.test
    settings = results.studies["svd-adam"].settings
    space = settings.space
    data = protocol.dataset + (
        f", the first {protocol.train_subset} images of the 50k training split"
        if protocol.train_subset
        else ", the full 50k training split"
    )
    seeds = protocol.seeds
    return "\n".join(
        [
            "## The method",
            "",
            "SVD(Adam) replaces each 2D weight gradient G (m×n) by its best rank-k approximation "
            "G_k = U_k Σ_k V_kᵀ (Eckart–Young) before Adam's step; biases, and gradients with "
            f"k ≥ min(m, n), are left as they are (low-rank method `{settings.method}`). The "
            "hypothesis is that the dropped tail of the spectrum is mostly minibatch noise, so "
            "that SVD(Adam) trains better than plain Adam tuned just as carefully.",
            "",
            f"- **Sweep.** Two Optuna studies with equal budgets ({settings.budget} trials each), "
            f"the same model (`{protocol.model}`), data ({data}; a fixed 10k-image validation "
            f"split), batch size {protocol.batch_size}, training seed {settings.seed} and "
            f"{_count(settings.epochs, 'epoch')} per trial; they differ only in the optimizer. "
            "Adam tunes "
            f"`lr` (log-uniform on [{space.lr_low:g}, {space.lr_high:g}]); SVD(Adam) tunes "
            f"`lr` and `k` (integer in [{space.k_low}, {space.k_high}]). The objective is "
            "the validation loss after the last epoch, minimised by TPE.",
            f"- **Final trainings.** Each study's best configuration, rebuilt from the trial's "
            f"parameters by the sweep's own code, retrained for "
            f"{_count(protocol.epochs, 'epoch')} with {_count(len(seeds), 'seed')} "
            f"({_seed_range(seeds)}: distinct from each other and from the "
            "sweep's seed, the same for both optimizers), then evaluated once on the test set, "
            "which the sweep never saw.",
            f"- **Test.** {test.name} over the seeds on the final test loss, at the "
            f"{test.alpha:.0%} level, with Cohen's d (Adam − SVD(Adam), divided by the root "
            "mean of both variances: positive means SVD(Adam) is better).",
        ]
    )


def _sweep(results: Results) -> str:
    lines = [
        "## The sweep: best parameters",
        "",
        "| study | trials (complete / pruned / failed; diverged) | best validation loss "
        "(nats) | best parameters | best trial |",
        "| --- | --- | --- | --- | --- |",
    ]
    for optimizer in OPTIMIZERS:
        study = results.studies[optimizer]
        c = study.trials
        lines.append(
            f"| `{study.study}` | {c['COMPLETE']} / {c['PRUNED']} / {c['FAIL']}; "
            f"{c['diverged']} (budget {study.budget}) | {study.best.value:.4f} | "
            f"{format_params(study.best.params)} | #{study.best.number} |"
        )
    return "\n".join(lines)


def _finals(results: Results) -> str:
    protocol = results.protocol
    seeds = len(protocol.seeds)
    lines = [
        f"## Final trainings: {seeds} seeds × {protocol.epochs} epochs",
        "",
        "| optimizer | parameters | final validation loss (nats) | final validation accuracy "
        "| test loss (nats) | test accuracy | runs (diverged) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for optimizer in OPTIMIZERS:
        s = results.summary[optimizer]
        lines.append(
            f"| {LABELS[optimizer]} | {format_params(results.studies[optimizer].best.params)} | "
            f"{mean_std(s.final_val_loss)} | {mean_std(s.final_val_acc, pct=True)} | "
            f"{mean_std(s.test_loss)} | {mean_std(s.test_acc, pct=True)} | "
            f"{s.runs} ({s.diverged}) |"
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds (sample std, ddof = 1). Diverged runs, if any, "
        "are left out of the means and of the test.",
        "",
        f"![Validation loss, validation accuracy and top-k gradient energy per epoch]({FIGURE})",
        "",
        f"*Lines: mean over {seeds} seeds; bands: {protocol.band}. Right: the fraction "
        "‖G_k‖²/‖G‖² of each weight gradient's energy that SVD(Adam)'s rank-k approximation "
        "keeps, averaged over the epoch's steps and the projected layers.*",
    ]
    return "\n".join(lines)


def _significance(results: Results) -> str:
    test = results.test
    return (
        "## Significance test\n\n"
        f"{test.name} on the final test loss: t = {number(test.statistic, 3)}, "
        f"df = {number(test.df, 1)}, p = {p_value(test.p_value)}; Cohen's d = "
        f"{number(test.cohens_d, 2)}. Mean test loss: SVD(Adam) {number(test.mean_svd_adam)}, "
        f"tuned Adam {number(test.mean_adam)} nats ({test.n_svd_adam} and {test.n_adam} "
        f"runs). For information, the same test on test accuracy gives p = "
        f"{p_value(test.test_acc.p_value)}."
    )


def _conclusion(results: Results) -> str:
    return f"## Conclusion\n\n{results.verdict}\n\n{caveats(results)}"


def _reproduce(results: Results, storage_flag: str | None) -> str:
    protocol = results.protocol
    return "\n".join(
        [
            "## Reproduce",
            "",
            "```bash",
            "svdsweep report"
            + (f" --storage {shlex.quote(storage_flag)}" if storage_flag else "")
            + f" --experiment {shlex.quote(results.experiment)} --epochs {protocol.epochs}"
            f" --seeds {len(protocol.seeds)}",
            "# redraw the figure from results.json alone, without retraining:",
            'python -c "from svdsweep.plot import redraw; '
            "redraw('results.json', 'comparison.png')\"",
            "```",
        ]
    )


def caveats(results: Results) -> str:
    """What a careful reader should weigh against the verdict, read off the results."""
    protocol, summary, test = results.protocol, results.summary, results.test
    notes = [
        f"This is one dataset ({protocol.dataset}) and one model ({protocol.model}).",
        f"Each trial trained {_count(results.studies['adam'].settings.epochs, 'epoch')} and "
        f"each final run {protocol.epochs}: the tuned learning rates are the best for the "
        "sweep's horizon, for both optimizers alike.",
    ]
    overfit = []
    for optimizer in OPTIMIZERS:
        curve = mean_curve([run.val_loss for run in results.runs_of(optimizer) if not run.diverged])
        if len(curve) >= 3:
            best = min(range(len(curve)), key=curve.__getitem__)
            if best < len(curve) - 1 and curve[-1] > 1.02 * curve[best]:
                overfit.append(
                    f"{LABELS[optimizer]}'s is lowest at epoch {best + 1} ({curve[best]:.4f}) "
                    f"and {curve[-1]:.4f} at epoch {len(curve)}"
                )
    if overfit:
        notes.append(
            "The mean validation loss rises before the end (overfitting): "
            + "; ".join(overfit)
            + ". The final losses then also measure how fast each tuned learning rate "
            "overfits over the longer horizon."
        )
    accuracy = test.test_acc
    if (
        results.outcome != "inconclusive"
        and accuracy.p_value is not None
        and accuracy.p_value >= test.alpha
    ):
        notes.append(
            f"Test accuracy does not differ significantly (SVD(Adam) "
            f"{mean_std(summary['svd-adam'].test_acc, pct=True)}, tuned Adam "
            f"{mean_std(summary['adam'].test_acc, pct=True)}; p = "
            f"{p_value(accuracy.p_value)}): the difference is in the loss, i.e. in the "
            "confidence of the predictions, not in how many are right."
        )
    if protocol.train_subset:
        notes.append(
            f"Training used {protocol.train_subset} images, not the full 50k: a quick run, "
            "not the paper protocol."
        )
    notes += _rank_caveats(results)
    diverged = sum(summary[o].diverged for o in OPTIMIZERS)
    if diverged:
        notes.append(f"{diverged} final run(s) diverged and are left out of the test.")
    return " ".join(notes)


def _rank_caveats(results: Results) -> list[str]:
    """Whether SVD(Adam)'s best k truncated anything worth the name."""
    svd = results.studies["svd-adam"]
    space, k = svd.settings.space, svd.best.params.get("k")
    energy = [run.energy[-1] for run in results.runs if run.energy and run.energy[-1] is not None]
    notes = []
    if k is not None and k >= space.k_high:
        notes.append(
            f"The best k ({k}) is the top of the searched range [{space.k_low}, "
            f"{space.k_high}]: the sweep preferred the least truncation."
        )
    if energy and statistics.fmean(energy) > 0.999:
        notes.append(
            f"The rank-{k} gradient keeps {100 * statistics.fmean(energy):.4f}% of the "
            "gradient's energy at the last epoch: SVD(Adam) is then nearly plain Adam, so a "
            "difference between them is unlikely to come from denoising the gradient."
        )
    return notes


def _provenance(results: Results) -> str:
    hardware, durations = results.hardware, results.durations
    driver = hardware.driver
    return "\n".join(
        [
            "- Versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items()) + ".",
            f"- Driver: {driver.host}, {driver.cpu_count} CPUs ({driver.cpu_model}).",
            f"- Final runs on: {', '.join(hardware.run_devices)}; nodes "
            f"{', '.join(hardware.run_nodes)}; {hardware.gpus_per_run:g} GPU and "
            f"{hardware.cpus_per_run} CPU per run on a cluster of "
            f"{hardware.cluster_resources.get('CPU', 0):g} CPUs and "
            f"{hardware.cluster_resources.get('GPU', 0):g} GPUs.",
            f"- Durations: final trainings {durations.final_trainings_wall_s:.1f} s wall "
            f"for {durations.final_trainings_task_s_sum:.1f} s of Ray tasks (up to "
            f"{durations.max_concurrent_runs} at once); the whole report "
            f"{durations.report_s:.1f} s. Per-run times are in results.json.",
        ]
    )


def mean_std(spread: Spread, *, pct: bool = False) -> str:
    """``0.4123 ± 0.0051`` (or ``85.12 ± 0.40%``); ``n/a`` without a finite run."""
    if spread.mean is None:
        return "n/a"
    scale, unit, digits = (100.0, "%", 2) if pct else (1.0, "", 4)
    text = f"{spread.mean * scale:.{digits}f}"
    if spread.std is not None:
        text += f" ± {spread.std * scale:.{digits}f}"
    return text + unit


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _seed_range(seeds: list[int]) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}…{seeds[-1]}"
