"""The two small networks of the experiment."""

from __future__ import annotations

from torch import nn

from svdsweep.errors import ConfigError

__all__ = ["MODELS", "build_model", "full_rank"]

MODELS = ("mlp", "cnn")


def build_model(name: str) -> nn.Module:
    """``mlp``: 784-256-128-10 with ReLU, so every weight is a 2D matrix (default).

    ``cnn``: two 3x3 conv blocks (16, 32 channels, max-pooled) and a 2-layer
    classifier head. Conv kernels are 4D, so :class:`SVDGradient` leaves them
    alone unless ``reshape_conv`` is set.
    """
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    raise ConfigError(f"unknown model {name!r}; choose one of {MODELS}")


def full_rank(name: str) -> int:
    """The largest rank any 2D weight gradient of the model can have: max over them of min(m, n).

    At ``k >= full_rank`` SVD(Adam) truncates nothing and is plain Adam, so the
    search range of ``k`` ends there: "no truncation" is then a result the
    study can find, not a wall it hits (256 for the MLP).
    """
    ranks = [min(p.shape) for p in build_model(name).parameters() if p.dim() == 2]
    return max(ranks)
