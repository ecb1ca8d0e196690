"""Optimizers: `SVDGradient` and the low-rank math it uses."""

from svdsweep.optim.svd_gradient import (
    DEFAULT_METHOD,
    METHODS,
    NonFiniteGradientError,
    SVDGradient,
)

__all__ = ["DEFAULT_METHOD", "METHODS", "NonFiniteGradientError", "SVDGradient"]
