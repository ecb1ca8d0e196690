"""Fashion-MNIST and MNIST as in-memory tensors, found without surprises.

Lookup order for the raw files (first hit wins):

1. ``data_dir`` given by the caller (``--data-dir``);
2. the ``SVDSWEEP_DATA_DIR`` environment variable;
3. Debian's ``dataset-fashion-mnist`` package in /usr/share/datasets/fashion-mnist,
   decompressed once into torchvision's ``raw/`` layout under the cache
   directory (the package's gzip bytes differ from torchvision's checksums, so
   torchvision cannot "download" from it);
4. torchvision's download into the cache directory, when online.

A directory counts when it holds the four idx files (``.gz`` or decompressed)
either directly or in torchvision's ``<root>/<Class>/raw/`` layout.

The whole dataset is kept as one tensor on the training device and batches are
drawn by index: on MNIST-sized data a per-sample ``DataLoader`` spends ~8x
longer assembling batches than the model spends training on them.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from svdsweep.errors import ConfigError, UserError

__all__ = [
    "DATASETS",
    "CorruptDataError",
    "DataError",
    "DataNotFoundError",
    "Splits",
    "cache_dir",
    "cached_splits",
    "load_splits",
    "resolve_raw_dir",
]

log = logging.getLogger(__name__)

DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: name -> (torchvision class name, mean, std) of the training images in [0, 1].
DATASETS = {
    "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530),
    "mnist": ("MNIST", 0.1307, 0.3081),
}
#: Images carved from the 60k training set for validation, with a fixed seed,
#: independent of the training seed, so every trial validates on the same images.
VALIDATION_SIZE = 10_000
SPLIT_SEED = 20_240_601


class DataError(UserError):
    """The dataset cannot be used as found; the message names the file or places and the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """No copy of the dataset could be found or fetched; the message says what was tried."""


class CorruptDataError(DataError):
    """An idx file is truncated, not gzip, or not the shape its header promises.

    Raised before anything is cached, so a bad copy never poisons later runs.
    """


#: idx magic numbers (unsigned byte data): 3 dimensions for images, 1 for labels.
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801
IMAGE_SHAPE = (28, 28)


@dataclass(frozen=True)
class Splits:
    """Normalised images (N x 1 x 28 x 28, float32) and labels (N, int64) per split."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor


def cache_dir() -> Path:
    """``$SVDSWEEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/svdsweep``, else ``~/.cache/svdsweep``."""
    if os.environ.get("SVDSWEEP_CACHE_DIR"):
        return Path(os.environ["SVDSWEEP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "svdsweep"


def resolve_raw_dir(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The torchvision root that holds ``<Class>/raw/`` for ``dataset``, preparing it if needed.

    Raises :class:`DataNotFoundError` listing every place tried and how to fix it.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    class_name = DATASETS[dataset][0]
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if data_dir is not None:
        candidates.append(("--data-dir", Path(data_dir)))
    if os.environ.get("SVDSWEEP_DATA_DIR"):
        candidates.append(("SVDSWEEP_DATA_DIR", Path(os.environ["SVDSWEEP_DATA_DIR"])))
    if dataset in DEBIAN_DIRS:
        candidates.append((f"Debian package dataset-{dataset}", DEBIAN_DIRS[dataset]))
    for label, directory in candidates:
        source = _find_raw_files(directory, class_name)
        if source is None:
            tried.append(f"{label}: {directory} (no {dataset} idx files)")
            continue
        if tried:  # a location the user named was empty: say which one is used instead
            log.warning("%s; using %s %s", "; ".join(tried), label, directory)
        return _as_torchvision_root(source, class_name, dataset)

    cached = cache_dir() / "data"
    if _find_raw_files(cached / class_name / "raw", class_name) is not None:
        return cached
    try:
        _download(class_name, cached)
        return cached
    except Exception as error:  # noqa: BLE001 - any download failure means "not found"
        tried.append(f"download into {cached}: {type(error).__name__}: {error}".splitlines()[0])
    hint = (
        "install Debian's package (apt-get install -y dataset-fashion-mnist), or "
        if dataset == "fashion-mnist"
        else ""
    )
    raise DataNotFoundError(
        f"{dataset} not found; tried "
        + "; ".join(tried)
        + ". Fix: "
        + hint
        + "point --data-dir / SVDSWEEP_DATA_DIR at a directory holding "
        + ", ".join(f"{name}[.gz]" for name in RAW_FILES)
    )


def load_splits(
    dataset: str = "fashion-mnist",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    train_subset: int | None = None,
    validation_size: int = VALIDATION_SIZE,
) -> Splits:
    """Train/validation/test tensors on ``device``.

    The validation split is a fixed random ``validation_size`` images of the
    official training set; ``train_subset`` keeps only the first N of the
    remaining training images (for quick runs and tests). The official test set
    is returned untouched, for final reports only.
    """
    from torchvision import datasets  # heavy import, only when data is needed

    class_name, mean, std = DATASETS[dataset]
    root = resolve_raw_dir(dataset, data_dir)
    dataset_class = getattr(datasets, class_name)
    train = dataset_class(str(root), train=True, download=False)
    test = dataset_class(str(root), train=False, download=False)

    def normalise(images: Tensor) -> Tensor:
        return ((images.float() / 255.0 - mean) / std).unsqueeze(1).to(device)

    order = torch.randperm(len(train.data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    if not 0 < validation_size < len(order):
        raise ConfigError(f"validation_size must be in 1..{len(order) - 1}, got {validation_size}")
    val_idx, train_idx = order[:validation_size], order[validation_size:]
    if train_subset is not None:
        if train_subset < 1:
            raise ConfigError(f"train_subset must be positive, got {train_subset}")
        train_idx = train_idx[:train_subset]
    return Splits(
        train_x=normalise(train.data[train_idx]),
        train_y=train.targets[train_idx].to(device),
        val_x=normalise(train.data[val_idx]),
        val_y=train.targets[val_idx].to(device),
        test_x=normalise(test.data),
        test_y=test.targets.to(device),
    )


_last_loaded: dict[tuple[object, ...], Splits] = {}


def cached_splits(
    dataset: str,
    *,
    data_dir: str | os.PathLike[str] | None,
    device: torch.device,
    train_subset: int | None,
) -> Splits:
    """:func:`load_splits`, remembered for the process (the last one only).

    A sweep worker or a reporter task trains many configs on the same data:
    it loads and normalises the dataset once, and a different dataset
    replaces the old one instead of piling up in memory.
    """
    key = (dataset, str(data_dir), train_subset, str(device))
    if key not in _last_loaded:
        _last_loaded.clear()
        _last_loaded[key] = load_splits(
            dataset, data_dir=data_dir, device=device, train_subset=train_subset
        )
    return _last_loaded[key]


def _find_raw_files(directory: Path, class_name: str) -> Path | None:
    """The directory among ``directory`` and ``directory/<Class>/raw`` holding all idx files."""
    for candidate in (directory, directory / class_name / "raw"):
        if all(
            (candidate / name).is_file() or (candidate / f"{name}.gz").is_file()
            for name in RAW_FILES
        ):
            return candidate
    return None


def _as_torchvision_root(source: Path, class_name: str, dataset: str) -> Path:
    """A root whose ``<Class>/raw/`` holds the decompressed files of ``source``.

    Uses ``source`` in place when it already is such a layout; otherwise
    decompresses into the cache, atomically, so a crash never leaves a
    half-written copy that later runs would trust.
    """
    if source.name == "raw" and all((source / name).is_file() for name in RAW_FILES):
        _check_idx_files(source)
        return source.parent.parent
    # One cache entry per source directory and version of its files, so two
    # sources never mix and replaced files are never served stale.
    fingerprint = [str(source.resolve())]
    for path in sorted(source.iterdir()):
        if path.name.split(".")[0] in RAW_FILES:
            stat = path.stat()
            fingerprint.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha1("|".join(fingerprint).encode()).hexdigest()[:10]
    target_root = cache_dir() / "data" / f"{dataset}-{digest}"
    raw = target_root / class_name / "raw"
    if all((raw / name).is_file() for name in RAW_FILES):
        try:
            _check_idx_files(raw)
            return target_root
        except CorruptDataError as error:  # written by an older version: rebuild it
            log.warning("discarding a bad cached copy (%s)", error)
            shutil.rmtree(raw, ignore_errors=True)
    raw.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=raw.parent, prefix=".raw-"))
    try:
        for name in RAW_FILES:
            plain, packed = source / name, source / f"{name}.gz"
            if plain.is_file():
                shutil.copyfile(plain, staging / name)
            else:
                _gunzip(packed, staging / name)
        _check_idx_files(staging, shown=source)
        if raw.exists():  # another process won the race
            shutil.rmtree(staging)
        else:
            staging.rename(raw)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target_root


def _gunzip(packed: Path, target: Path) -> None:
    """Decompresses ``packed`` into ``target``, naming the file when it is not a whole gzip."""
    try:
        with gzip.open(packed, "rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        # EOFError is what a truncated file raises; left alone, click turns it into a
        # bare "Aborted!".
        raise CorruptDataError(
            f"{packed} is not a complete gzip file ({type(error).__name__}: {error}); "
            "replace it with an intact copy"
        ) from None


def _check_idx_files(directory: Path, *, shown: Path | None = None) -> None:
    """Checks the four decompressed idx files in ``directory`` against their headers.

    Each file must carry the idx magic number of its kind, 28x28 images, exactly
    as many bytes as its header promises, and as many labels as its split has
    images. Only the headers are read and the sizes stat'ed, so this is cheap
    enough to run on every use of a cached copy. ``shown`` is the directory to
    name in the message (the user's source, not the staging copy).
    """
    counts: dict[str, int] = {}
    for name in RAW_FILES:
        path = directory / name
        label = _source_file(shown or directory, name)
        is_images = "images" in name
        magic, dims = (IDX_IMAGES, 3) if is_images else (IDX_LABELS, 1)
        with open(path, "rb") as handle:
            header = handle.read(4 + 4 * dims)
        if len(header) < 4 + 4 * dims or struct.unpack(">I", header[:4])[0] != magic:
            kind = "images" if is_images else "labels"
            raise CorruptDataError(f"{label} is not an idx file of {kind} (bad header)")
        shape = struct.unpack(f">{dims}I", header[4:])
        if is_images and tuple(shape[1:]) != IMAGE_SHAPE:
            raise CorruptDataError(
                f"{label} holds {shape[1]}x{shape[2]} images; 28x28 are expected"
            )
        expected = len(header) + math.prod(shape)
        actual = path.stat().st_size
        if actual != expected:
            raise CorruptDataError(
                f"{label} has {actual} bytes but its header promises {expected} "
                "(truncated or padded); replace it with an intact copy"
            )
        counts[name] = shape[0]
    for split in ("train", "t10k"):
        images, labels = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if images != labels:
            images_file = _source_file(shown or directory, f"{split}-images-idx3-ubyte")
            raise CorruptDataError(
                f"{images_file} holds {images} images but its labels file holds {labels} labels"
            )


def _source_file(directory: Path, name: str) -> Path:
    """``directory/name`` if it exists, else its ``.gz``: the file a user would go and fix."""
    plain = directory / name
    return plain if plain.is_file() else directory / f"{name}.gz"


def _download(class_name: str, root: Path) -> None:
    from torchvision import datasets

    root.mkdir(parents=True, exist_ok=True)
    getattr(datasets, class_name)(str(root), train=True, download=True)
    getattr(datasets, class_name)(str(root), train=False, download=True)
