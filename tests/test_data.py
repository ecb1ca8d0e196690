"""Finding the dataset (argument, environment, Debian, cache, download) and splitting it."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import svdsweep_cli

from svdsweep import data
from svdsweep.data import DataNotFoundError, Splits, load_splits, resolve_raw_dir

DEBIAN_DIR = data.DEBIAN_DIRS["fashion-mnist"]
DECOMPRESSED_SIZES = {  # bytes of Fashion-MNIST's four idx files
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}
MEAN, STD = data.DATASETS["fashion-mnist"][1:]
needs_debian_package = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)


# -- a tiny idx dataset ---------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    """Writes ``array`` (uint8) in the idx format, gzip-compressed as ``<path>.gz`` or plain."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def tiny_images(count: int, marker: int) -> np.ndarray:
    """Images that carry their own index (pixels 0 and 1) and their dataset's marker (pixel 2)."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(count) % 256
    images[:, 0, 1] = np.arange(count) // 256
    images[:, 0, 2] = marker
    return images


def make_tiny_dataset(
    directory: Path, *, n_train: int = 200, n_test: int = 50, marker: int = 1, compress: bool = True
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    labels = np.arange(max(n_train, n_test)) % 10
    write_idx(
        directory / "train-images-idx3-ubyte", tiny_images(n_train, marker), compress=compress
    )
    write_idx(directory / "train-labels-idx1-ubyte", labels[:n_train], compress=compress)
    write_idx(directory / "t10k-images-idx3-ubyte", tiny_images(n_test, marker), compress=compress)
    write_idx(directory / "t10k-labels-idx1-ubyte", labels[:n_test], compress=compress)
    return directory


def raw_pixels(images: torch.Tensor, row: int, column: int) -> list[int]:
    """Undoes the normalisation of one pixel of every image."""
    values = (images[:, 0, row, column] * STD + MEAN) * 255
    return [round(float(value)) for value in values]


def image_ids(images: torch.Tensor) -> list[int]:
    return [
        low + 256 * high
        for low, high in zip(raw_pixels(images, 0, 0), raw_pixels(images, 0, 1), strict=True)
    ]


def marker(splits: Splits) -> int:
    markers = set(raw_pixels(splits.train_x, 0, 2))
    assert len(markers) == 1
    return markers.pop()


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache, no SVDSWEEP_DATA_DIR, and a download that fails at once."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SVDSWEEP_CACHE_DIR", str(cache))
    monkeypatch.delenv("SVDSWEEP_DATA_DIR", raising=False)

    def offline(class_name: str, root: Path) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(data, "_download", offline)
    return cache


@pytest.fixture
def no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion-mnist": tmp_path / "no-debian-package"})


# -- the Debian package --------------------------------------------------------------


@needs_debian_package
def test_default_lookup_decompresses_the_debian_package_into_the_cache(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = resolve_raw_dir("fashion-mnist")

    assert root.is_relative_to(isolated)
    raw = root / "FashionMNIST" / "raw"
    assert {path.name: path.stat().st_size for path in raw.iterdir()} == DECOMPRESSED_SIZES
    assert not [path for path in raw.parent.iterdir() if path.name.startswith(".raw-")]

    # The second lookup reuses the decompressed copy.
    def no_decompression(*args: object, **kwargs: object) -> None:
        raise AssertionError("decompressed again")

    monkeypatch.setattr(gzip, "open", no_decompression)
    assert resolve_raw_dir("fashion-mnist") == root

    splits = load_splits()
    assert splits.train_x.shape == (50_000, 1, 28, 28)
    assert splits.train_x.dtype == torch.float32
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (50_000, 10_000, 10_000)
    assert splits.train_y.dtype == torch.int64
    assert set(splits.train_y.tolist()) == set(range(10))
    # Normalised with the training set's statistics.
    assert abs(float(splits.train_x.mean())) < 0.02
    assert abs(float(splits.train_x.std()) - 1) < 0.02


# -- explicit directories -----------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
@pytest.mark.usefixtures("no_debian")
def test_data_dir_argument(isolated: Path, tmp_path: Path, compress: bool) -> None:
    directory = make_tiny_dataset(tmp_path / "tiny", compress=compress)
    splits = load_splits(data_dir=directory, validation_size=50)

    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (150, 50, 50)
    assert splits.train_x.shape == (150, 1, 28, 28)
    assert image_ids(splits.test_x) == list(range(50))
    assert splits.test_y.tolist() == [i % 10 for i in range(50)]
    train_ids, val_ids = image_ids(splits.train_x), image_ids(splits.val_x)
    assert sorted(train_ids + val_ids) == list(range(200))
    assert splits.train_y.tolist() == [i % 10 for i in train_ids]  # labels follow their images


@pytest.mark.usefixtures("isolated", "no_debian")
def test_torchvision_layout_is_used_in_place(tmp_path: Path) -> None:
    root = tmp_path / "torchvision-root"
    make_tiny_dataset(root / "FashionMNIST" / "raw", compress=False)
    assert resolve_raw_dir("fashion-mnist", root) == root
    assert len(load_splits(data_dir=root, validation_size=50).train_y) == 150


@pytest.mark.usefixtures("isolated", "no_debian")
def test_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = make_tiny_dataset(tmp_path / "from-env", n_train=120, marker=7)
    monkeypatch.setenv("SVDSWEEP_DATA_DIR", str(directory))
    splits = load_splits(validation_size=20)
    assert len(splits.train_y) == 100
    assert marker(splits) == 7


@pytest.mark.usefixtures("isolated")
def test_lookup_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argument = make_tiny_dataset(tmp_path / "argument", marker=1)
    environment = make_tiny_dataset(tmp_path / "environment", marker=2)
    debian = make_tiny_dataset(tmp_path / "debian", marker=3)
    cached = make_tiny_dataset(
        Path(data.cache_dir()) / "data" / "FashionMNIST" / "raw", marker=4, compress=False
    )
    assert cached.is_dir()
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion-mnist": debian})
    monkeypatch.setenv("SVDSWEEP_DATA_DIR", str(environment))

    def found(**kwargs: object) -> int:
        return marker(load_splits(validation_size=50, **kwargs))  # type: ignore[arg-type]

    assert found(data_dir=argument) == 1  # --data-dir beats everything
    assert found() == 2  # then SVDSWEEP_DATA_DIR
    monkeypatch.delenv("SVDSWEEP_DATA_DIR")
    assert found() == 3  # then Debian's package
    monkeypatch.setattr(data, "DEBIAN_DIRS", {"fashion-mnist": tmp_path / "missing"})
    assert found() == 4  # then an earlier download in the cache; no new download


@pytest.mark.usefixtures("isolated", "no_debian")
def test_missing_data_error_lists_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_argument, empty_environment = tmp_path / "empty-arg", tmp_path / "empty-env"
    empty_argument.mkdir()
    empty_environment.mkdir()
    monkeypatch.setenv("SVDSWEEP_DATA_DIR", str(empty_environment))

    with pytest.raises(DataNotFoundError) as raised:
        load_splits(data_dir=empty_argument)

    message = str(raised.value)
    assert isinstance(raised.value, FileNotFoundError)
    assert f"--data-dir: {empty_argument}" in message
    assert f"SVDSWEEP_DATA_DIR: {empty_environment}" in message
    assert str(tmp_path / "no-debian-package") in message
    assert "download into" in message and "network is unreachable (test)" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte[.gz]" in message
    assert "\n" not in message  # one line, ready for "error: ..."


@pytest.mark.usefixtures("isolated")
def test_missing_mnist_error_reads_well(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"Fix: point --data-dir"):
        resolve_raw_dir("mnist", tmp_path)


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        resolve_raw_dir("nope")


@pytest.mark.usefixtures("no_debian")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validation_size": 0}, "validation_size"),
        ({"validation_size": 200}, "validation_size"),
        ({"validation_size": 50, "train_subset": 0}, "train_subset"),
    ],
)
def test_bad_split_sizes_are_rejected(
    isolated: Path, tmp_path: Path, kwargs: dict[str, int], match: str
) -> None:
    directory = make_tiny_dataset(tmp_path / "tiny")
    with pytest.raises(ValueError, match=match):
        load_splits(data_dir=directory, **kwargs)  # type: ignore[arg-type]


# -- the validation split -------------------------------------------------------------------


@pytest.mark.usefixtures("isolated", "no_debian")
def test_validation_split_is_disjoint_and_independent_of_seeds_and_subsets(
    tmp_path: Path,
) -> None:
    directory = make_tiny_dataset(tmp_path / "tiny", n_train=300)
    torch.manual_seed(1)
    full = load_splits(data_dir=directory, validation_size=60)
    torch.manual_seed(2)  # a different training seed changes the global RNG...
    subset = load_splits(data_dir=directory, validation_size=60, train_subset=40)

    # ...but neither it nor the subset size moves the validation images.
    assert torch.equal(full.val_x, subset.val_x)
    assert torch.equal(full.val_y, subset.val_y)
    val_ids = set(image_ids(full.val_x))
    assert len(val_ids) == 60
    assert val_ids.isdisjoint(image_ids(full.train_x))
    assert image_ids(subset.train_x) == image_ids(full.train_x)[:40]  # the subset is a prefix


def test_real_validation_split_is_the_same_for_every_run(
    fashion_splits: Splits, session_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SVDSWEEP_CACHE_DIR", str(session_cache))
    torch.manual_seed(12345)
    other = load_splits(train_subset=100)
    assert torch.equal(other.val_x, fashion_splits.val_x)
    assert torch.equal(other.val_y, fashion_splits.val_y)
    assert torch.equal(other.train_x, fashion_splits.train_x[:100])
    # No validation image is also a training image (compared by content).
    val_rows = {row.numpy().tobytes() for row in fashion_splits.val_x}
    assert not any(row.numpy().tobytes() in val_rows for row in fashion_splits.train_x)


# -- damaged copies -------------------------------------------------------------------------


def truncate_gzip(directory: Path, name: str) -> Path:
    packed = directory / f"{name}.gz"
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    return packed


def damage_plain(directory: Path, name: str, how: str) -> Path:
    path = directory / name
    if how == "garbage":
        path.write_bytes(b"not an idx file at all")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "wrong-shape":  # 200 images of 14x56 carry the same bytes as 28x28
        header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 200, 14, 56)
        path.write_bytes(header + path.read_bytes()[16:])
    elif how == "fewer-labels":
        write_idx(path, np.arange(199) % 10, compress=False)
    return path


def cached_copies(cache: Path) -> list[Path]:
    return [path for path in cache.rglob("*-idx*-ubyte") if path.is_file()]


@pytest.mark.usefixtures("no_debian")
def test_a_truncated_gzip_is_named_and_never_cached(isolated: Path, tmp_path: Path) -> None:
    directory = make_tiny_dataset(tmp_path / "tiny")
    packed = truncate_gzip(directory, "train-images-idx3-ubyte")

    with pytest.raises(data.CorruptDataError) as raised:
        load_splits(data_dir=directory, validation_size=50)

    message = str(raised.value)
    assert str(packed) in message and "not a complete gzip file" in message
    assert "\n" not in message
    assert cached_copies(isolated) == []  # nothing half-written for a later run to trust


@pytest.mark.usefixtures("no_debian")
@pytest.mark.parametrize(
    ("name", "how", "fragment"),
    [
        ("train-images-idx3-ubyte", "garbage", "is not an idx file of images"),
        ("t10k-labels-idx1-ubyte", "garbage", "is not an idx file of labels"),
        ("train-images-idx3-ubyte", "truncated", "but its header promises"),
        ("train-images-idx3-ubyte", "wrong-shape", "holds 14x56 images; 28x28 are expected"),
        ("train-labels-idx1-ubyte", "fewer-labels", "holds 200 images but its labels file"),
    ],
)
@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_a_damaged_idx_file_is_named_and_never_cached(
    isolated: Path, tmp_path: Path, name: str, how: str, fragment: str, compress: bool
) -> None:
    directory = make_tiny_dataset(tmp_path / "tiny", compress=False)
    damage_plain(directory, name, how)
    if compress:
        for path in list(directory.iterdir()):
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()

    with pytest.raises(data.CorruptDataError, match=fragment) as raised:
        load_splits(data_dir=directory, validation_size=50)

    shown = "train-images-idx3-ubyte" if how == "fewer-labels" else name
    shown += ".gz" if compress else ""
    assert f"{directory / shown} " in str(raised.value)  # the user's file, not a staging copy
    assert cached_copies(isolated) == []


@pytest.mark.usefixtures("isolated", "no_debian")
def test_a_damaged_torchvision_layout_is_refused_in_place(tmp_path: Path) -> None:
    raw = make_tiny_dataset(tmp_path / "root" / "FashionMNIST" / "raw", compress=False)
    damage_plain(raw, "t10k-images-idx3-ubyte", "truncated")
    with pytest.raises(data.CorruptDataError, match="t10k-images-idx3-ubyte has"):
        resolve_raw_dir("fashion-mnist", tmp_path / "root")


@pytest.mark.usefixtures("no_debian")
def test_a_bad_cached_copy_is_rebuilt(isolated: Path, tmp_path: Path) -> None:
    """A copy cached by an older version, without these checks, is discarded, not served."""
    directory = make_tiny_dataset(tmp_path / "tiny")
    root = resolve_raw_dir("fashion-mnist", directory)
    cached = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    intact = cached.read_bytes()
    cached.write_bytes(intact[:-100])

    assert resolve_raw_dir("fashion-mnist", directory) == root
    assert cached.read_bytes() == intact


def test_the_cli_names_a_truncated_file_in_one_line(tmp_path: Path) -> None:
    """What a user sees: one ``error:`` line naming the file, exit 1, not click's "Aborted!"."""
    directory = make_tiny_dataset(tmp_path / "tiny")
    packed = truncate_gzip(directory, "t10k-labels-idx1-ubyte")
    env = {**os.environ, "SVDSWEEP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("SVDSWEEP_DATA_DIR", None)
    result = svdsweep_cli(
        "train", "--data-dir", str(directory), "--device", "cpu", "--epochs", "1",
        "--optimizer", "adam", "--lr", "0.001", env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(packed) in lines[0] and "not a complete gzip file" in lines[0]
    assert cached_copies(tmp_path / "cache") == []
