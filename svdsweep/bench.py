"""`svdsweep bench optimizer`: speed and accuracy of every low-rank method, in one run.

Speed is the median training-epoch time (evaluation excluded) of each
configuration, printed as a ratio to Adam's measured in the same process, so
the ratios hold even when the machine is slower or busier than usual.

Accuracy is sampled over a real training run of each fast method on its own
trajectory (warm starts depend on history): at every step the gradients are
also decomposed exactly, and

    captured-energy ratio = ‖Ĝ_k‖² / ‖G_k‖²   (1 is optimal; Ĝ_k is an orthogonal projection)
    error ratio           = ‖G − Ĝ_k‖ / ‖G − G_k‖ (1 is optimal)

are reported as median and worst over all (step, layer) samples.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from svdsweep.data import DATASETS, Splits, load_splits, resolve_raw_dir
from svdsweep.optim import DEFAULT_METHOD, METHODS, SVDGradient
from svdsweep.train import TrainConfig, build_optimizer, resolve_device, train

__all__ = ["print_report", "run_optimizer_benchmark"]

FAST_METHODS = tuple(method for method in METHODS if method != "exact")


def run_optimizer_benchmark(
    *,
    epochs: int = 2,
    k: int = 9,
    model: str = "mlp",
    device: str = "auto",
    quality_steps: int = 400,
    train_subset: int | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs every configuration and returns the figures (see the module docstring)."""
    from rich.progress import Progress

    resolved = resolve_device(device)
    splits = load_splits(data_dir=data_dir, device=resolved, train_subset=train_subset)
    base = TrainConfig(epochs=epochs, model=model, device=str(resolved), data_dir=data_dir)
    configs = (
        [("adam", base)]
        + [(f"svd-adam {method}", _svd(base, k, method)) for method in METHODS]
        + [("adam (again)", base)]
    )

    figures: dict[str, Any] = {
        "k": k,
        "model": model,
        "device": str(resolved),
        "threads": torch.get_num_threads(),
        "train_images": len(splits.train_y),
        "batch_size": base.batch_size,
        "default_method": DEFAULT_METHOD,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "epoch_seconds": {},
    }
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("timing epochs", total=len(configs) + 1 + len(FAST_METHODS))
        for name, config in configs:
            bar.update(task, description=f"timing {name}")
            figures["epoch_seconds"][name] = train(config, splits=splits).epoch_seconds
            bar.advance(task)
        adam_times = figures["epoch_seconds"].pop("adam (again)")
        figures["epoch_seconds"]["adam"] += adam_times
        bar.update(task, description="timing a naive DataLoader epoch")
        figures["naive_dataloader_epoch_seconds"] = _naive_dataloader_epoch(
            model, resolved, data_dir, train_subset
        )
        bar.advance(task)
        figures["quality"] = {}
        for method in FAST_METHODS:
            bar.update(task, description=f"sampling quality of {method}")
            figures["quality"][method] = _sample_quality(
                _svd(base, k, method), splits, quality_steps
            )
            bar.advance(task)

    adam = statistics.median(figures["epoch_seconds"]["adam"])
    figures["ratio_to_adam"] = {
        name: statistics.median(times) / adam for name, times in figures["epoch_seconds"].items()
    }
    figures["trainer_speedup_over_naive_dataloader"] = (
        figures["naive_dataloader_epoch_seconds"] / adam
    )
    return figures


def print_report(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=(
            f"{figures['model']} on {figures['train_images']} images, batch "
            f"{figures['batch_size']}, k={figures['k']}, {figures['device']} "
            f"({figures['threads']} threads)"
        )
    )
    for column in ("configuration", "epoch time (median)", "ratio to Adam"):
        table.add_column(column, justify="right" if column != "configuration" else "left")
    for name, times in figures["epoch_seconds"].items():
        table.add_row(
            name, f"{statistics.median(times):.2f} s", f"{figures['ratio_to_adam'][name]:.2f}x"
        )
    table.add_row(
        "naive DataLoader + ToTensor (Adam)",
        f"{figures['naive_dataloader_epoch_seconds']:.2f} s",
        f"{figures['trainer_speedup_over_naive_dataloader']:.2f}x",
    )
    console.print(table)
    quality = Table(title="Approximation quality over a real training run (1.0 is exact)")
    for column in (
        "method",
        "samples",
        "energy ratio median",
        "energy ratio min",
        "error ratio median",
        "error ratio max",
    ):
        quality.add_column(column)
    for method, q in figures["quality"].items():
        quality.add_row(
            method,
            str(q["samples"]),
            f"{q['energy_ratio_median']:.5f}",
            f"{q['energy_ratio_min']:.5f}",
            f"{q['error_ratio_median']:.4f}",
            f"{q['error_ratio_max']:.4f}",
        )
    console.print(quality)
    console.print(
        f"trainer speed-up over the naive DataLoader pipeline: "
        f"{figures['trainer_speedup_over_naive_dataloader']:.1f}x; default method: "
        f"{figures['default_method']}"
    )


def _svd(base: TrainConfig, k: int, method: str) -> TrainConfig:
    return TrainConfig(**{**base.to_dict(), "optimizer": "svd-adam", "k": k, "method": method})


def _sample_quality(config: TrainConfig, splits: Splits, steps: int) -> dict[str, Any]:
    """Trains ``config`` for ``steps`` steps, comparing each projection with the exact one."""
    from svdsweep.models import build_model

    device = splits.train_x.device
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    optimizer = build_optimizer(config, model)
    assert isinstance(optimizer, SVDGradient)
    generator = torch.Generator().manual_seed(config.seed)
    energy_ratios: list[float] = []
    error_ratios: list[float] = []
    worst: dict[str, float] = {}
    done = 0
    while done < steps:
        for batch in torch.randperm(len(splits.train_y), generator=generator).split(
            config.batch_size
        ):
            if done == steps:
                break
            batch = batch.to(device)
            loss = F.cross_entropy(model(splits.train_x[batch]), splits.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            before = {
                name: param.grad.detach().double().clone()
                for name, param in model.named_parameters()
                if param.grad is not None
                and param.grad.ndim == 2
                and (config.k or 0) < min(param.grad.shape)
            }
            optimizer.step()
            for name, param in model.named_parameters():
                if name not in before:
                    continue
                assert param.grad is not None
                energy, error = _quality(before[name], param.grad.double(), config.k or 0)
                energy_ratios.append(energy)
                if error is not None:
                    error_ratios.append(error)
                worst[name] = min(worst.get(name, 1.0), energy)
            done += 1
    return {
        "samples": len(energy_ratios),
        "steps": steps,
        "energy_ratio_median": statistics.median(energy_ratios),
        "energy_ratio_min": min(energy_ratios),
        "error_ratio_median": statistics.median(error_ratios),
        "error_ratio_max": max(error_ratios),
        "energy_ratio_min_per_layer": worst,
    }


def _quality(grad: torch.Tensor, approx: torch.Tensor, k: int) -> tuple[float, float | None]:
    """(‖Ĝ_k‖²/‖G_k‖², ‖G − Ĝ_k‖/‖G − G_k‖) against an exact float64 SVD of ``grad``.

    The error ratio is ``None`` when G is numerically of rank <= k (its optimal
    residual is below float32 resolution): it then compares two rounding
    errors. This happens every step for the classifier head, whose gradient's
    rows sum to zero (softmax), so a 10-class head has rank <= 9.
    """
    values = torch.linalg.svdvals(grad)
    kept_optimal = float(values[:k].square().sum())
    residual_optimal = float(values[k:].square().sum().sqrt())
    energy = float(approx.square().sum()) / kept_optimal if kept_optimal > 0 else 1.0
    if residual_optimal <= 1e-5 * float(values[0]):
        return energy, None
    residual = float(torch.linalg.matrix_norm(grad - approx))
    return energy, residual / residual_optimal


def _naive_dataloader_epoch(
    model_name: str, device: torch.device, data_dir: str | None, train_subset: int | None
) -> float:
    """One Adam epoch fed by torchvision's per-sample ``ToTensor`` + ``DataLoader``."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from svdsweep.models import build_model

    class_name = DATASETS["fashion-mnist"][0]
    dataset = getattr(datasets, class_name)(
        str(resolve_raw_dir("fashion-mnist", data_dir)),
        train=True,
        transform=transforms.ToTensor(),
    )
    size = 50_000 if train_subset is None else train_subset
    loader = DataLoader(Subset(dataset, range(size)), batch_size=128, shuffle=True)
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for images, labels in loader:
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
