"""The score of a training run, defined once: the validation loss of the early-stopped model.

Both optimizers overfit this MLP after 8-11 epochs, so the last epoch's
validation loss mostly measures *when* a learning rate starts to overfit, not
how well it trains. The early-stopped model (the state of the epoch with the
lowest validation loss) is what a practitioner would keep, and its score does
not reward a low learning rate for overfitting later. The sweep's objective
(:mod:`svdsweep.worker`), the per-epoch value the pruner sees, the state the
trainer keeps for the test set (:mod:`svdsweep.train`) and the finals'
primary metric (:mod:`svdsweep.report`) all come from :func:`early_stopped`.

Also here: :func:`kept_energy`, the one definition of how much gradient energy
a rank keeps, which decides whether a comparison tests truncation at all.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["NO_TRUNCATION", "OBJECTIVE_NAME", "EarlyStopped", "early_stopped", "kept_energy"]

#: What a trial's value is, as optuna-dashboard and ``optuna`` show it. Studies
#: that store another objective (the former "validation loss, last epoch") are refused.
OBJECTIVE_NAME = "validation loss of the early-stopped model (lowest over epochs)"

#: A rank that keeps at least this fraction of the gradient energy in every
#: layer truncates nothing that matters: SVD(Adam) with it is plain Adam.
NO_TRUNCATION = 0.999


@dataclass(frozen=True)
class EarlyStopped:
    """The lowest validation loss of a run, and the epoch (1-based) where it occurred."""

    value: float
    epoch: int


def early_stopped(val_losses: Sequence[float | None]) -> EarlyStopped:
    """The early-stopped score of per-epoch validation losses (index 0 is epoch 1).

    The lowest finite value, the earliest epoch on ties (fewer epochs for the
    same score). A run with no finite value (it diverged at once) scores +inf
    at epoch 0, which every finite score beats.
    """
    best = EarlyStopped(math.inf, 0)
    for epoch, value in enumerate(val_losses, start=1):
        if value is not None and math.isfinite(value) and value < best.value:
            best = EarlyStopped(float(value), epoch)
    return best


def kept_energy(energy_per_layer: Mapping[str, Sequence[float | None]]) -> float | None:
    """The energy fraction ‖G_k‖²/‖G‖² kept by the *least* kept layer, averaged over epochs.

    The minimum over layers, not their mean: a rank truncates something only
    if some layer loses energy, and a layer with fewer than k singular values
    (the 10-class output layer) keeps everything at any k, which would flatter
    a mean. None when no layer was projected.
    """
    means = []
    for curve in energy_per_layer.values():
        finite = [float(v) for v in curve if v is not None and math.isfinite(v)]
        if finite:
            means.append(statistics.fmean(finite))
    return min(means) if means else None
