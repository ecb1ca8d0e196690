"""The score the sweep and the verdict share, the verdict across replicates, and the search space.

Fast and pure where they can be: the score, the verdict rules, the profile's
sentence; the trainer's early-stopped test evaluation on a few hundred real
images; old-objective studies refused on a real SQLite storage.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

import svdsweep.report.finals
import svdsweep.worker
from svdsweep.errors import ConfigError
from svdsweep.report.results import (
    BestTrialRecord,
    FinalRun,
    StudyRecord,
    judge_replicate,
    seed_noise,
)
from svdsweep.report.stats import conclude_across, profile_sentence
from svdsweep.score import NO_TRUNCATION, OBJECTIVE_NAME, EarlyStopped, early_stopped, kept_energy
from svdsweep.space import SearchSpace, StudySettings, distributions
from svdsweep.studies import ExperimentError, check_resumable, create_or_resume, load_settings
from svdsweep.sweep import SweepSpec
from svdsweep.train import TrainConfig, TrainResult, train
from svdsweep.worker import run_worker

#: The module (``svdsweep.train`` is also the package's re-exported function).
trainer = importlib.import_module("svdsweep.train")


def test_the_score_is_the_lowest_validation_loss_and_its_epoch() -> None:
    assert early_stopped([0.9, 0.5, 0.7, 0.5]) == EarlyStopped(0.5, 2)  # earliest epoch on ties
    assert early_stopped([0.9, None, math.nan, 0.8]) == EarlyStopped(0.8, 4)
    assert early_stopped([]).value == math.inf and early_stopped([math.inf]).epoch == 0


def test_the_sweep_objective_and_the_finals_primary_score_come_from_one_function(
    tmp_path: Path,
) -> None:
    """One function object everywhere, and a worker's trial value is its curve's minimum."""
    assert svdsweep.worker.early_stopped is early_stopped
    assert trainer.early_stopped is early_stopped
    assert svdsweep.report.finals.early_stopped is early_stopped

    curve = [0.9, 0.4, 0.6, 0.8]  # overfits after epoch 2

    def overfitting(config: TrainConfig, report: Any) -> TrainResult:
        result = TrainResult(config=config.to_dict(), device="cpu")
        for epoch, value in enumerate(curve[: config.epochs], start=1):
            result.val_loss.append(value)
            result.train_loss.append(value)
            result.val_acc.append(0.5)
            report(epoch, {"train_loss": value, "val_loss": value, "val_acc": 0.5})
        return result

    url = f"sqlite:///{tmp_path}/one.db"
    spec = SweepSpec(storage=url, experiment="one", trials=1, trial_epochs=4, pruner="none")
    create_or_resume(url, "one", spec.study_settings())
    run_worker(url, "one", objective=overfitting)
    for optimizer in ("adam", "svd-adam"):
        study = optuna.load_study(study_name=f"one-{optimizer}", storage=url)
        (trial,) = study.trials
        assert trial.value == early_stopped(curve).value == 0.4  # not the last epoch's 0.8
        assert trial.user_attrs["best_epoch"] == 2
        assert study.metric_names == [OBJECTIVE_NAME]


def test_the_test_set_is_evaluated_on_the_best_epochs_state_not_the_last(
    fashion_splits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation loss scripted to rise after epoch 2: the test numbers are epoch 2's model's."""
    from svdsweep.data import Splits

    names = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    splits = Splits(*(getattr(fashion_splits, name)[:512] for name in names))
    real_evaluate = trainer.evaluate
    scripted = iter([0.9, 0.3, 0.5, 0.7])
    weights: dict[str, list[torch.Tensor]] = {"val": [], "test": []}

    def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Any:
        split = "test" if images.data_ptr() == splits.test_x.data_ptr() else "val"
        weights[split].append(next(model.parameters()).detach().clone())
        loss, accuracy = real_evaluate(model, images, labels)
        return (next(scripted), accuracy) if split == "val" else (loss, accuracy)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    config = TrainConfig(epochs=4, lr=3e-3, evaluate_test=True, device="cpu")
    result = train(config, splits=splits)

    assert result.val_loss == [0.9, 0.3, 0.5, 0.7]
    assert (result.best_epoch, result.best_val_loss) == (2, 0.3)
    last_state, best_state = weights["test"]  # the last epoch's model first, then the best
    assert torch.equal(last_state, weights["val"][3])
    assert torch.equal(best_state, weights["val"][1])
    assert not torch.equal(best_state, weights["val"][3]), "training changed the weights"
    assert result.test_loss != result.last_test_loss


def test_kept_energy_is_the_least_kept_layer() -> None:
    assert kept_energy({"1.weight": [0.9, 0.8], "3.weight": [1.0, 1.0]}) == pytest.approx(0.85)
    assert kept_energy({}) is None


def _study(optimizer: str, params: dict[str, Any], k_high: int = 256) -> StudyRecord:
    settings = StudySettings(optimizer=optimizer, space=SearchSpace(k_high=k_high))
    return StudyRecord(
        study=f"x-{optimizer}",
        settings=settings,
        budget=30,
        trials={"COMPLETE": 30, "PRUNED": 0, "FAIL": 0, "diverged": 0},
        best=BestTrialRecord(1, 0.3, params, None, "cpu", 1.0, None, 3),
    )


def _run(optimizer: str, seed: int, test_loss: float, energy: float | None) -> FinalRun:
    per_layer = {} if energy is None else {"1.weight": [energy], "3.weight": [1.0]}
    return FinalRun(
        config=TrainConfig(),
        device="cpu",
        train_loss=[0.3],
        val_loss=[0.3],
        val_acc=[0.9],
        epoch_seconds=[1.0],
        energy=[],
        energy_per_layer=per_layer,
        best_epoch=1,
        best_val_loss=0.3,
        test_loss=test_loss,
        test_acc=0.9 - test_loss / 10,
        last_test_loss=test_loss,
        last_test_acc=0.9,
        started_at=0.0,
        finished_at=1.0,
        host="h",
        torch_version="t",
        python_version="p",
        optimizer=optimizer,
        seed=seed,
        replicate=1,
        diverged=None,
        device_name="cpu",
        torch_threads=1,
        pid=1,
        node_ip=None,
        gpu_ids=[],
        cpu_count=2,
        task_started_at=0.0,
        task_finished_at=1.0,
    )


def _replicate(k: int, energy: float, svd_losses: list[float]) -> Any:
    studies = {
        "adam": _study("adam", {"lr": 1e-3}),
        "svd-adam": _study("svd-adam", {"lr": 1e-3, "k": k}),
    }
    adam_losses = [0.40, 0.41, 0.42]
    runs = [_run("adam", 1000 + i, v, None) for i, v in enumerate(adam_losses)]
    runs += [_run("svd-adam", 1000 + i, v, energy) for i, v in enumerate(svd_losses)]
    return judge_replicate(1, studies, runs)


def test_a_tuned_k_that_keeps_all_the_energy_gets_the_does_not_test_denoising_headline() -> None:
    better = [0.30, 0.31, 0.30]  # significantly lower than Adam's: would read "supported"
    untruncated = _replicate(51, 0.999996, better)
    assert not untruncated.truncates and "99.9996%" in (untruncated.why_not or "")
    assert untruncated.outcome == "supported"  # the replicate's own test, kept for the record
    outcome, verdict = conclude_across(
        [(untruncated.outcome, untruncated.truncates, untruncated.why_not)] * 3, "a profile line."
    )
    assert outcome == "untested"
    assert verdict.startswith("This comparison does not test denoising")
    assert "upported" not in verdict  # neither "supported" nor "not supported"
    assert verdict.endswith("The rank profile shows: a profile line.")

    at_the_top = _replicate(256, 0.95, better)  # the top of the range: full rank
    assert not at_the_top.truncates and "top of the searched range" in (at_the_top.why_not or "")


def test_a_truncating_tuned_k_gets_the_normal_verdict() -> None:
    truncating = _replicate(9, 0.93, [0.30, 0.31, 0.30])
    assert truncating.truncates and truncating.kept_energy == pytest.approx(0.93)
    assert truncating.kept_energy < NO_TRUNCATION
    entry = (truncating.outcome, truncating.truncates, truncating.why_not)
    outcome, verdict = conclude_across([entry] * 3, None)
    assert outcome == "supported" and verdict.startswith("Supported: in every one of 3")


def test_the_verdict_counts_only_what_every_replicate_agrees_on() -> None:
    supported = ("supported", True, None)
    unclear = ("inconclusive", True, None)
    against = ("not supported", True, None)
    assert conclude_across([against] * 3, None)[0] == "not supported"
    outcome, verdict = conclude_across([supported, supported, unclear], None)
    assert outcome == "inconclusive"
    assert "2 of 3 replicates find SVD(Adam) significantly better" in verdict
    # One untruncated replicate of three is not a majority: the normal rule, which it breaks.
    outcome, verdict = conclude_across(
        [supported, supported, ("supported", False, "k=256 ...")], None
    )
    assert outcome == "inconclusive" and "1 truncate nothing" in verdict


def test_the_profile_sentence_says_which_truncating_ranks_beat_tuned_adam() -> None:
    ranks = [(1, 0.60, 0.55), (4, 0.40, 0.90), (16, 0.31, 0.99), (64, 0.29, 0.9999)]
    sentence = profile_sentence(0.305, ranks, 0.004, NO_TRUNCATION)
    # k=64 keeps 99.99 %: not a truncation, whatever its score.
    assert sentence.startswith("among the ranks that truncate (k = 1, 4, 16:")
    assert "none beats tuned Adam's validation score (0.3050 nats)" in sentence
    assert "2σ = 0.0080 nats" in sentence and "k=16 within it" in sentence
    assert "every k <= 4 is worse by >= 0.0950 nats" in sentence
    better = profile_sentence(0.35, ranks, 0.004, NO_TRUNCATION)
    assert "1 beats tuned Adam's validation score (0.3500 nats)" in better
    assert "the best k=16 by 0.0400 nats" in better
    untruncated = profile_sentence(0.3, [(64, 0.29, 0.9999)], 0.004, NO_TRUNCATION)
    assert "does not reach truncation" in untruncated


def test_the_seed_noise_is_pooled_over_the_winners_final_runs() -> None:
    runs = [_run("adam", 1000 + i, 0.4, None) for i in range(3)]
    for run, value in zip(runs, (0.30, 0.32, 0.34), strict=True):
        run.best_val_loss = value
    assert seed_noise(runs) == pytest.approx(0.02)
    assert seed_noise(runs[:1]) is None


def test_the_k_range_reaches_full_rank_log_scaled() -> None:
    settings = StudySettings(optimizer="svd-adam", space=SearchSpace())
    k = distributions(settings)["k"]
    assert (k.low, k.high, k.log) == (1, 256, True)  # 256 = the MLP's full rank
    with pytest.raises(ConfigError, match="above the mlp's full rank 256"):
        StudySettings(optimizer="svd-adam", space=SearchSpace(k_high=300))
    profile = SweepSpec(profile_trials=3).study_settings()
    ranks = [s.space.k_low for s in profile if s.profile and s.optimizer == "svd-adam"]
    assert ranks == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert all(s.budget == 3 for s in profile if s.profile)
    assert "k" not in distributions(next(s for s in profile if s.profile and s.space.k_low == 8))


def test_a_study_scored_by_the_former_objective_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    spec = SweepSpec(storage=url, experiment="old", trials=2)
    create_or_resume(url, "old", spec.study_settings())
    study = optuna.load_study(study_name="old-adam", storage=url)
    study.set_metric_names(["validation loss, last epoch"])  # as svdsweep before this change
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 1e-3},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)},
            value=0.4,
        )
    )
    message = "scored its trials by 'validation loss, last epoch'; this svdsweep scores"
    with pytest.raises(ExperimentError, match=message):
        check_resumable(url, "old", spec.study_settings())
    with pytest.raises(ExperimentError, match=message):
        load_settings(optuna.storages.RDBStorage(url), "old", "adam")
