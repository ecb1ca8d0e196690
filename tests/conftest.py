"""Shared fixtures: real Fashion-MNIST splits, loaded once, in an isolated cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from svdsweep.data import Splits, load_splits

#: Training images of the real-data slice shared by the training tests.
REAL_TRAIN_IMAGES = 10_000


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory for the whole session, so tests never write to ~/.cache."""
    return tmp_path_factory.mktemp("svdsweep-cache")


@pytest.fixture(scope="session")
def fashion_splits(session_cache: Path) -> Splits:
    """The first 10k training images, the 10k validation and the test split, on CPU.

    Found the way a user's run finds them (``SVDSWEEP_DATA_DIR``, else Debian's
    package). Shared by many tests: never modify these tensors in place.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SVDSWEEP_CACHE_DIR", str(session_cache))
        return load_splits("fashion-mnist", device="cpu", train_subset=REAL_TRAIN_IMAGES)
