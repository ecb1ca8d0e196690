"""svdsweep: does a top-k SVD of every weight gradient train better than plain Adam?

Public surface: the optimizer wrapper and the trainer. The sweep, the reporter
and the CLI live in their own modules and are not imported here, so that
``import svdsweep`` stays light (no Optuna, no Ray).
"""

from importlib.metadata import PackageNotFoundError, version

from svdsweep.optim import DEFAULT_METHOD, METHODS, NonFiniteGradientError, SVDGradient
from svdsweep.train import TrainConfig, TrainingDiverged, TrainResult, train

try:
    __version__ = version("svdsweep")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "NonFiniteGradientError",
    "SVDGradient",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "__version__",
    "train",
]
