"""One training run: config in, curves out. Knows nothing of Optuna or Ray.

The data flow fits on one screen: data -> model -> step -> eval -> numbers.
The whole dataset lives on the training device and minibatches are drawn by
index from a seeded permutation, so a run is a pure function of its config on
CPU (same seed, same thread count -> bit-identical curves).
"""

from __future__ import annotations

import math
import platform
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from svdsweep.data import DATASETS, Splits, load_splits
from svdsweep.errors import ConfigError, UserError
from svdsweep.models import MODELS, build_model
from svdsweep.optim import METHODS, NonFiniteGradientError, SVDGradient
from svdsweep.score import early_stopped

__all__ = [
    "OPTIMIZERS",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "resolve_device",
    "train",
]

OPTIMIZERS = ("adam", "svd-adam")
#: Steps between checks that the running loss is finite (each check syncs the device).
DIVERGENCE_CHECK_STEPS = 50

#: ``report(epoch, metrics)``: called after every epoch (1-based) with that
#: epoch's metrics; used by the sweep for pruning and by the CLI for progress.
ReportCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(UserError, ArithmeticError):
    """The loss or a gradient became NaN/inf: the learning rate is too high for this run."""


#: Largest seed every generator a run seeds accepts (NumPy's are 32-bit).
MAX_SEED = 2**32 - 1
#: Devices a run can train on: ``auto`` picks the Ray-assigned GPU, else the CPU.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Units in comments."""

    optimizer: str = "adam"  # "adam" or "svd-adam"
    lr: float = 1e-3  # Adam learning rate
    k: int | None = None  # rank kept by SVD(Adam); required for svd-adam
    method: str = "default"  # low-rank method of SVD(Adam), see svdsweep.optim
    epochs: int = 5  # passes over the training split
    batch_size: int = 128  # images per step
    seed: int = 0  # model init and minibatch order
    dataset: str = "fashion-mnist"
    model: str = "mlp"
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    train_subset: int | None = None  # keep only N training images (None: all 50k)
    #: also evaluate the test set, on the early-stopped model and on the last epoch's
    evaluate_test: bool = False
    data_dir: str | None = None  # see svdsweep.data for the lookup order

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.optimizer == "svd-adam":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise ConfigError(f"svd-adam needs k, a positive int, got {self.k!r}")
            if self.method not in ("default", *METHODS):
                raise ConfigError(
                    f"unknown method {self.method!r}; choose one of {('default', *METHODS)}"
                )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.model not in MODELS:
            raise ConfigError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError(f"train_subset must be positive, got {self.train_subset!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:  # what torch and NumPy generators accept
            raise ConfigError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """Per-epoch curves (index 0 is epoch 1) and the run's provenance."""

    config: dict[str, Any]
    device: str
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # training only, no eval
    #: mean over the epoch's steps of ‖G_k‖²/‖G‖², averaged over projected layers
    energy: list[float] = field(default_factory=list)
    energy_per_layer: dict[str, list[float]] = field(default_factory=dict)
    #: the early-stopped model: the epoch of lowest validation loss (svdsweep.score)
    best_epoch: int = 0
    best_val_loss: float | None = None
    #: test set, on the early-stopped model's state (evaluate_test only)
    test_loss: float | None = None
    test_acc: float | None = None
    #: test set, on the last epoch's state (evaluate_test only)
    last_test_loss: float | None = None
    last_test_acc: float | None = None
    started_at: float = 0.0  # unix time
    finished_at: float = 0.0  # unix time
    host: str = field(default_factory=socket.gethostname)
    torch_version: str = torch.__version__
    python_version: str = platform.python_version()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the (Ray-assigned) CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available")
    return resolved


def train(
    config: TrainConfig,
    report: ReportCallback | None = None,
    *,
    splits: Splits | None = None,
) -> TrainResult:
    """Trains ``config.model`` with ``config.optimizer`` and returns its curves.

    ``splits`` lets a caller that trains many configs on the same data (the
    benchmark, a worker) load it once; it must already be on the device.
    Raises :class:`TrainingDiverged` when the loss or a gradient stops being
    finite.
    """
    device = resolve_device(config.device)
    if splits is None:
        splits = load_splits(
            config.dataset,
            data_dir=config.data_dir,
            device=device,
            train_subset=config.train_subset,
        )
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    optimizer = build_optimizer(config, model)
    order_generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(config=config.to_dict(), device=str(device), started_at=time.time())
    n_train = len(splits.train_y)
    best_state: dict[str, torch.Tensor] | None = None  # early-stopped model, for the test set

    for epoch in range(1, config.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        energy_sums: dict[str, torch.Tensor] = {}
        steps = 0
        _synchronize(device)
        start = time.perf_counter()
        for batch in torch.randperm(n_train, generator=order_generator).split(config.batch_size):
            batch = batch.to(device, non_blocking=True)
            loss = F.cross_entropy(model(splits.train_x[batch]), splits.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            try:
                optimizer.step()
            except NonFiniteGradientError as error:
                raise TrainingDiverged(f"epoch {epoch}: {error}") from None
            loss_sum += loss.detach() * len(batch)
            steps += 1
            if steps % DIVERGENCE_CHECK_STEPS == 0 and not bool(torch.isfinite(loss_sum)):
                # NaN arithmetic is ~25x slower on CPU: stop early, not at epoch end.
                raise TrainingDiverged(
                    f"epoch {epoch}, step {steps}: training loss is not finite with "
                    f"lr={config.lr}; lower the learning rate"
                )
            if isinstance(optimizer, SVDGradient):
                for name, value in optimizer.energy_tensors().items():
                    energy_sums[name] = energy_sums[name] + value if name in energy_sums else value
        _synchronize(device)
        result.epoch_seconds.append(time.perf_counter() - start)

        train_loss = float(loss_sum) / n_train
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"epoch {epoch}: training loss is {train_loss} with lr={config.lr}; "
                "lower the learning rate"
            )
        val_loss, val_acc = evaluate(model, splits.val_x, splits.val_y)
        result.train_loss.append(train_loss)
        result.val_loss.append(val_loss)
        result.val_acc.append(val_acc)
        if config.evaluate_test and early_stopped(result.val_loss).epoch == epoch:
            # In memory: the MLP's state is ~1 MB, copied only on a new best epoch.
            best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}
        if energy_sums:
            per_layer = {name: float(total) / steps for name, total in energy_sums.items()}
            for name, fraction in per_layer.items():
                result.energy_per_layer.setdefault(name, []).append(fraction)
            result.energy.append(sum(per_layer.values()) / len(per_layer))
            metrics["energy"] = result.energy[-1]
        if report is not None:
            report(epoch, metrics)

    best = early_stopped(result.val_loss)
    result.best_epoch, result.best_val_loss = best.epoch, best.value
    if config.evaluate_test:
        result.last_test_loss, result.last_test_acc = evaluate(model, splits.test_x, splits.test_y)
        if best_state is not None:
            model.load_state_dict(best_state)
        result.test_loss, result.test_acc = evaluate(model, splits.test_x, splits.test_y)
    result.finished_at = time.time()
    return result


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, or Adam wrapped in :class:`SVDGradient` for ``svd-adam``.

    Parameters are passed with their names so that errors and diagnostics name
    layers (``1.weight``) rather than positions.
    """
    base = torch.optim.Adam(model.named_parameters(), lr=config.lr)
    if config.optimizer == "adam":
        return base
    assert config.k is not None
    return SVDGradient(base, rank=config.k, method=config.method, seed=config.seed)


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000
) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy (fraction) over a whole split."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    return float(loss_sum) / len(labels), float(correct) / len(labels)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
