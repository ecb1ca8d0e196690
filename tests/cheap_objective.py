"""A cheap stand-in for training, for tests whose point is orchestration, not learning.

The loss is a smooth function of ``lr`` (and ``k``) with a known optimum, so
samplers have something to find, and each "epoch" sleeps briefly so that trials
overlap across workers like real ones do. ``SVDSWEEP_TEST_TRIAL_SECONDS``
(or ``seconds``) makes trials slower, for tests that interrupt a trial.
"""

from __future__ import annotations

import math
import os
import time

from svdsweep.train import ReportCallback, TrainConfig, TrainResult


def cheap_objective(
    config: TrainConfig, report: ReportCallback, *, seconds: float | None = None
) -> TrainResult:
    if seconds is None:
        seconds = float(os.environ.get("SVDSWEEP_TEST_TRIAL_SECONDS", "0.05"))
    loss = (math.log10(config.lr) + 2.5) ** 2 + (
        0.0 if config.k is None else abs(config.k - 9) / 10
    )
    result = TrainResult(config=config.to_dict(), device="cpu", started_at=time.time())
    for epoch in range(1, config.epochs + 1):
        time.sleep(seconds / config.epochs)
        value = loss + 1.0 / epoch
        result.train_loss.append(value)
        result.val_loss.append(value)
        result.val_acc.append(1.0 / (1.0 + value))
        result.epoch_seconds.append(seconds / config.epochs)
        report(epoch, {"train_loss": value, "val_loss": value, "val_acc": result.val_acc[-1]})
    result.finished_at = time.time()
    return result
