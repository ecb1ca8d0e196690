"""The trainer: it learns, it is deterministic, it validates its config, it reports divergence."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from svdsweep.data import Splits
from svdsweep.train import TrainConfig, TrainingDiverged, resolve_device, train


def head(splits: Splits, images: int) -> Splits:
    """The first ``images`` training images, with the full validation and test splits."""
    return dataclasses.replace(
        splits, train_x=splits.train_x[:images], train_y=splits.train_y[:images]
    )


def config(**overrides: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "device": "cpu", **overrides})


# -- learning ---------------------------------------------------------------------------


@pytest.mark.slow
def test_adam_learns_in_one_epoch_on_10k_images(fashion_splits: Splits) -> None:
    assert len(fashion_splits.train_y) == 10_000
    result = train(config(), splits=fashion_splits)
    assert len(result.val_acc) == len(result.train_loss) == len(result.epoch_seconds) == 1
    assert result.val_acc[0] > 0.75
    assert result.train_loss[0] < math.log(10)  # better than guessing
    assert result.energy == [] and result.energy_per_layer == {}


@pytest.mark.slow
def test_svd_adam_learns_in_one_epoch_on_10k_images(fashion_splits: Splits) -> None:
    result = train(config(optimizer="svd-adam", k=9), splits=fashion_splits)
    assert result.val_acc[0] > 0.70
    assert len(result.energy) == 1 and 0 < result.energy[0] <= 1
    assert set(result.energy_per_layer) == {"1.weight", "3.weight", "5.weight"}
    assert all(0 < values[0] <= 1 for values in result.energy_per_layer.values())


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(fashion_splits: Splits) -> None:
    splits = head(fashion_splits, 2000)
    reports: list[tuple[int, dict[str, float]]] = []
    runs = [
        train(config(optimizer="svd-adam", k=9, epochs=2), splits=splits),
        train(
            config(optimizer="svd-adam", k=9, epochs=2),
            lambda epoch, metrics: reports.append((epoch, metrics)),
            splits=splits,
        ),
    ]
    curves = [
        (run.train_loss, run.val_loss, run.val_acc, run.energy, run.energy_per_layer)
        for run in runs
    ]
    assert curves[0] == curves[1]
    assert len(runs[0].train_loss) == 2

    # The report callback saw every epoch, with the numbers that ended up in the curves.
    assert [epoch for epoch, _ in reports] == [1, 2]
    assert [metrics["val_acc"] for _, metrics in reports] == runs[1].val_acc
    assert [metrics["energy"] for _, metrics in reports] == runs[1].energy

    other_seed = train(config(optimizer="svd-adam", k=9, epochs=2, seed=1), splits=splits)
    assert other_seed.train_loss != runs[0].train_loss


def test_result_holds_config_test_metrics_and_serialises(fashion_splits: Splits) -> None:
    chosen = config(evaluate_test=True, seed=3)
    result = train(chosen, splits=head(fashion_splits, 1000))
    assert result.test_acc is not None and 0.5 < result.test_acc <= 1
    assert result.test_loss is not None and math.isfinite(result.test_loss)
    assert result.device == "cpu"
    assert result.finished_at >= result.started_at > 0
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["config"] == chosen.to_dict()
    assert as_json["val_acc"] == result.val_acc


# -- config validation --------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0, -1, -1e-3, math.nan, math.inf, -math.inf, "0.1", None])
def test_bad_learning_rate_is_rejected(lr: Any) -> None:
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=lr)


@pytest.mark.parametrize("k", [None, 0, -3, 2.5, True, "9"])
def test_svd_adam_needs_a_positive_int_k(k: Any) -> None:
    with pytest.raises(ValueError, match="k"):
        TrainConfig(optimizer="svd-adam", k=k)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"optimizer": "sgd"}, "optimizer"),
        ({"optimizer": "svd-adam", "k": 9, "method": "svd"}, "method"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"dataset": "nope"}, "dataset"),
        ({"model": "resnet"}, "model"),
        ({"train_subset": 0}, "train_subset"),
    ],
)
def test_bad_config_is_rejected(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)


def test_valid_configs_are_accepted_as_given() -> None:
    svd = TrainConfig(optimizer="svd-adam", k=1, method="exact", lr=1e-5)
    assert (svd.optimizer, svd.k, svd.method, svd.lr) == ("svd-adam", 1, "exact", 1e-5)
    adam = TrainConfig(optimizer="adam", k=None, lr=3)
    assert adam.to_dict() == {**TrainConfig().to_dict(), "lr": 3}
    # What a sweep stores and a retrain rebuilds: the dict round-trips to an equal config.
    assert TrainConfig(**svd.to_dict()) == svd


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


# -- divergence ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer", ["adam", "svd-adam"])
def test_huge_learning_rate_raises_training_diverged(
    fashion_splits: Splits, optimizer: str
) -> None:
    with pytest.raises(TrainingDiverged, match="epoch 1") as raised:
        train(
            config(optimizer=optimizer, k=9, lr=1e15, epochs=3), splits=head(fashion_splits, 1000)
        )
    assert "learning rate" in str(raised.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer", ["adam", "svd-adam"])
def test_nan_in_the_data_raises_training_diverged(fashion_splits: Splits, optimizer: str) -> None:
    splits = head(fashion_splits, 1000)
    poisoned = splits.train_x.clone()
    poisoned[500, 0, 10, 10] = math.nan
    splits = dataclasses.replace(splits, train_x=poisoned)
    with pytest.raises(TrainingDiverged) as raised:
        train(config(optimizer=optimizer, k=9, epochs=3), splits=splits)
    message = str(raised.value)
    assert message.startswith("epoch 1:")
    if optimizer == "svd-adam":
        assert "1.weight" in message  # names the first layer the NaN reached
    else:
        assert "nan" in message
