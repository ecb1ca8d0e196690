"""svdsweep: does a top-k SVD of every weight gradient train better than plain Adam?

Public surface: the optimizer wrapper and the trainer. The sweep, the reporter
and the CLI live in their own modules and are not imported here, so that
``import svdsweep`` stays light (no Optuna, no Ray).
"""

import os
from importlib.metadata import PackageNotFoundError, version

# Ray 2.60 reads its auth mode once, when ray is first imported, and every
# process of a cluster (head, nodes, drivers, workers) must agree on it.
# svdsweep's clusters use token auth; set RAY_AUTH_MODE=disabled to opt out.
os.environ.setdefault("RAY_AUTH_MODE", "token")

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
