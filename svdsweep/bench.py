"""`svdsweep bench optimizer`: speed and accuracy of every low-rank method, in one run.

Speed is the median training-epoch time (evaluation excluded) of each
configuration, printed as a ratio to Adam's measured in the same process, so
the ratios hold even when the machine is slower or busier than usual. The
configurations are timed in rounds, one epoch each per round, so that a busy
moment falls on all of them alike. The headline rows (Adam, exact,
randomized, the default) run through :func:`svdsweep.train.train`; the
variants (accuracy knobs the trainer does not expose, other ranks, one
intra-op thread as the sweep's Ray workers run) through :func:`_epoch`, the
same loop with the optimizer built here.

Accuracy is sampled over a real training run of each fast variant on its own
trajectory (warm starts depend on history): at every step the gradients are
also decomposed exactly, and

    captured-energy ratio = ‖Ĝ_k‖² / ‖G_k‖²   (1 is optimal; Ĝ_k is an orthogonal projection)
    error ratio           = ‖G − Ĝ_k‖ / ‖G − G_k‖ (1 is optimal)

are reported as median and worst over all (step, layer) samples, with the
fraction of projections whose certificate escalated. Last, the spectra suite
(:mod:`svdsweep.optim.spectra`) per method.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from svdsweep.data import DATASETS, Splits, load_splits, resolve_raw_dir
from svdsweep.models import build_model
from svdsweep.optim import DEFAULT_METHOD, METHODS, SVDGradient, spectra
from svdsweep.train import TrainConfig, resolve_device, train

__all__ = ["print_report", "run_optimizer_benchmark"]

FAST_METHODS = tuple(method for method in METHODS if method != "exact")

#: Ranks the sweeps have been picking, timed besides the requested one.
EXTRA_RANKS = (35, 51, 64)


@dataclass(frozen=True)
class Variant:
    """An optimizer configuration timed and sampled by the benchmark."""

    name: str
    k: int | None  # None: plain Adam
    method: str = "default"
    oversample: int | None = None
    power_iters: int | None = None
    sync_every: int | None = None
    threads: int | None = None  # None: torch's default
    sample_quality: bool = True

    def build(self, model: torch.nn.Module, seed: int) -> torch.optim.Optimizer:
        base = torch.optim.Adam(model.named_parameters(), lr=1e-3)
        if self.k is None:
            return base
        return SVDGradient(
            base,
            rank=self.k,
            method=self.method,
            oversample=self.oversample,
            power_iters=self.power_iters,
            sync_every=self.sync_every,
            seed=seed,
        )


def variants(k: int, threads: int) -> list[Variant]:
    """What the benchmark times besides the trainer's own rows (see BENCHMARKS.md)."""
    rows = [
        Variant("subspace p=8 q=1 (previous default)", k, "subspace", 8, 1),
        Variant("subspace p=8 q=0", k, "subspace", 8, 0),
        Variant("subspace p=16 q=0", k, "subspace", 16, 0),
        Variant("subspace sync-free (sync_every=16)", k, "subspace", sync_every=16),
    ]
    rows += [Variant(f"default, k={rank}", rank) for rank in EXTRA_RANKS if rank != k]
    if threads > 1:
        rows += [
            Variant("adam, 1 thread", None, threads=1, sample_quality=False),
            Variant("default, 1 thread", k, threads=1, sample_quality=False),
        ]
    return rows


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
    base = TrainConfig(epochs=1, model=model, device=str(resolved), data_dir=data_dir)
    trainer_rows = [("adam", base)] + [
        (f"svd-adam {method}", _svd(base, k, method)) for method in METHODS
    ]
    extra = variants(k, torch.get_num_threads())
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
        "load_average": _load_average(),
    }
    times: dict[str, list[float]] = figures["epoch_seconds"]
    samples = [v for v in extra if v.sample_quality]
    with Progress(disable=not progress, transient=True) as bar:
        total = epochs * (len(trainer_rows) + len(extra)) + 1 + len(FAST_METHODS) + len(samples)
        task = bar.add_task("timing epochs", total=total + 4)
        for round_index in range(epochs):
            for name, config in trainer_rows:
                if name == "svd-adam exact" and round_index > 0:
                    bar.advance(task)
                    continue  # ~8x Adam: one epoch is enough for the reference
                bar.update(task, description=f"timing {name} (round {round_index + 1})")
                seeded = TrainConfig(**{**config.to_dict(), "seed": round_index})
                times.setdefault(name, []).extend(train(seeded, splits=splits).epoch_seconds)
                bar.advance(task)
            for variant in extra:
                bar.update(task, description=f"timing {variant.name} (round {round_index + 1})")
                times.setdefault(variant.name, []).append(_epoch(variant, splits, round_index))
                bar.advance(task)
        bar.update(task, description="timing a naive DataLoader epoch")
        figures["naive_dataloader_epoch_seconds"] = _naive_dataloader_epoch(
            model, resolved, data_dir, train_subset
        )
        bar.advance(task)
        figures["quality"] = {}
        for method in FAST_METHODS:
            bar.update(task, description=f"sampling quality of {method}")
            figures["quality"][method] = _sample_quality(
                Variant(method, k, method), model, splits, quality_steps
            )
            bar.advance(task)
        for variant in samples:
            bar.update(task, description=f"sampling quality of {variant.name}")
            figures["quality"][variant.name] = _sample_quality(
                variant, model, splits, quality_steps
            )
            bar.advance(task)
        bar.update(task, description="running the spectra suite")
        figures["spectra"] = _spectra_figures()
        bar.advance(task, 4)

    adam = statistics.median(times["adam"])
    adam_one_thread = statistics.median(times.get("adam, 1 thread", times["adam"]))
    figures["ratio_to_adam"] = {
        name: statistics.median(values) / (adam_one_thread if "1 thread" in name else adam)
        for name, values in times.items()
    }
    figures["trainer_speedup_over_naive_dataloader"] = (
        figures["naive_dataloader_epoch_seconds"] / adam
    )
    figures["load_average_after"] = _load_average()
    return figures


def print_report(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=(
            f"{figures['model']} on {figures['train_images']} images, batch "
            f"{figures['batch_size']}, k={figures['k']}, {figures['device']} "
            f"({figures['threads']} threads; load average {figures['load_average']} before, "
            f"{figures['load_average_after']} after)"
        )
    )
    for column in ("configuration", "epoch times", "median", "ratio to Adam"):
        table.add_column(column, justify="right" if column != "configuration" else "left")
    for name, times in figures["epoch_seconds"].items():
        table.add_row(
            name,
            ", ".join(f"{value:.2f}" for value in times),
            f"{statistics.median(times):.2f} s",
            f"{figures['ratio_to_adam'][name]:.2f}x"
            + (" (to Adam, 1 thread)" if "1 thread" in name else ""),
        )
    table.add_row(
        "naive DataLoader + ToTensor (Adam)",
        "",
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
        "escalated",
    ):
        quality.add_column(column)
    for method, q in figures["quality"].items():
        quality.add_row(
            method,
            str(q["samples"]),
            f"{q['energy_ratio_median']:.5f}",
            f"{q['energy_ratio_min']:.5f}",
            f"{q['error_ratio_median']:.4f}" if q["error_ratio_median"] is not None else "-",
            f"{q['error_ratio_max']:.4f}" if q["error_ratio_max"] is not None else "-",
            f"{q['escalation_rate']:.1%}",
        )
    console.print(quality)
    suite = Table(title=f"Spectra suite ({figures['spectra']['steps']} steps, k={spectra.RANK})")
    for column in (
        "method",
        "worst captured/optimal",
        "worst case",
        "escalated",
        "certificate < 0.99",
        "unsound",
    ):
        suite.add_column(column)
    for method, row in figures["spectra"]["methods"].items():
        suite.add_row(
            method,
            f"{row['worst_ratio']:.5f}",
            row["worst_case"],
            f"{row['escalation_rate']:.1%}",
            str(row["flagged"]),
            str(row["unsound_certificates"]),
        )
    console.print(suite)
    console.print(
        f"trainer speed-up over the naive DataLoader pipeline: "
        f"{figures['trainer_speedup_over_naive_dataloader']:.1f}x; default method: "
        f"{figures['default_method']}"
    )


def _svd(base: TrainConfig, k: int, method: str) -> TrainConfig:
    return TrainConfig(**{**base.to_dict(), "optimizer": "svd-adam", "k": k, "method": method})


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "n/a"


def _epoch(variant: Variant, splits: Splits, seed: int) -> float:
    """One training epoch, timed as :func:`svdsweep.train.train` times it (same loop)."""
    device = splits.train_x.device
    threads = torch.get_num_threads()
    if variant.threads is not None:
        torch.set_num_threads(variant.threads)
    try:
        torch.manual_seed(seed)
        model = build_model("mlp").to(device)
        optimizer = variant.build(model, seed)
        order = torch.Generator().manual_seed(seed)
        loss_sum = torch.zeros((), device=device)
        energy_sums: dict[str, torch.Tensor] = {}
        _synchronize(device)
        start = time.perf_counter()
        for batch in torch.randperm(len(splits.train_y), generator=order).split(128):
            batch = batch.to(device, non_blocking=True)
            loss = F.cross_entropy(model(splits.train_x[batch]), splits.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            if isinstance(optimizer, SVDGradient):
                for name, value in optimizer.energy_tensors().items():
                    energy_sums[name] = energy_sums[name] + value if name in energy_sums else value
        if isinstance(optimizer, SVDGradient):
            optimizer.synchronize()
        _synchronize(device)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_quality(
    variant: Variant, model_name: str, splits: Splits, steps: int
) -> dict[str, Any]:
    """Trains ``variant`` for ``steps`` steps, comparing each projection with the exact one."""
    device = splits.train_x.device
    k = variant.k or 0
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    optimizer = variant.build(model, 0)
    assert isinstance(optimizer, SVDGradient)
    generator = torch.Generator().manual_seed(0)
    energy_ratios: list[float] = []
    error_ratios: list[float] = []
    worst: dict[str, float] = {}
    done = 0
    while done < steps:
        for batch in torch.randperm(len(splits.train_y), generator=generator).split(128):
            if done == steps:
                break
            batch = batch.to(device)
            loss = F.cross_entropy(model(splits.train_x[batch]), splits.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            before = {
                name: param.grad.detach().double().clone()
                for name, param in model.named_parameters()
                if param.grad is not None and param.grad.ndim == 2 and k < min(param.grad.shape)
            }
            optimizer.step()
            for name, param in model.named_parameters():
                if name not in before:
                    continue
                assert param.grad is not None
                energy, error = _quality(before[name], param.grad.double(), k)
                energy_ratios.append(energy)
                if error is not None:
                    error_ratios.append(error)
                worst[name] = min(worst.get(name, 1.0), energy)
            done += 1
    diagnostics = optimizer.diagnostics()
    counts = diagnostics["escalations"]
    projected = sum(counts.values()) + diagnostics["uncertified_steps"]
    escalated = projected - counts["none"]
    return {
        "samples": len(energy_ratios),
        "steps": steps,
        "energy_ratio_median": statistics.median(energy_ratios),
        "energy_ratio_min": min(energy_ratios),
        "error_ratio_median": statistics.median(error_ratios) if error_ratios else None,
        "error_ratio_max": max(error_ratios) if error_ratios else None,
        "energy_ratio_min_per_layer": worst,
        "escalations": counts,
        "uncertified_steps": diagnostics["uncertified_steps"],
        "escalation_rate": escalated / max(projected, 1),
    }


def _spectra_figures() -> dict[str, Any]:
    rows = {}
    steps = 0
    for method in spectra.methods():
        result = spectra.run_suite(method)
        steps = result.steps
        rows[method] = {
            "worst_ratio": result.worst_ratio,
            "worst_case": result.worst_case,
            "escalations": result.escalations,
            "escalation_rate": result.escalation_rate,
            "unsound_certificates": result.unsound_certificates,
            "flagged": result.flagged,
        }
    return {"steps": steps, "methods": rows}


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
