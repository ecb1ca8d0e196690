"""`svdsweep bench optimizer`'s pieces on a small slice: it times and samples what it says."""

from __future__ import annotations

import dataclasses

import torch

from svdsweep import bench
from svdsweep.data import Splits
from svdsweep.optim import SVDGradient


def small(splits: Splits, images: int) -> Splits:
    return dataclasses.replace(
        splits, train_x=splits.train_x[:images], train_y=splits.train_y[:images]
    )


def test_variants_build_what_their_names_say() -> None:
    rows = {variant.name: variant for variant in bench.variants(9, threads=2)}
    model = torch.nn.Linear(4, 4)
    previous = rows["subspace p=8 q=1 (previous default)"].build(model, 0)
    assert isinstance(previous, SVDGradient)
    assert (previous.param_groups[0]["oversample"], previous.param_groups[0]["power_iters"]) == (
        8,
        1,
    )
    assert rows["subspace sync-free (sync_every=16)"].build(model, 0).sync_every == 16
    assert {rows[f"default, k={k}"].k for k in bench.EXTRA_RANKS} == set(bench.EXTRA_RANKS)
    assert isinstance(rows["adam, 1 thread"].build(model, 0), torch.optim.Adam)
    assert "adam, 1 thread" not in {variant.name for variant in bench.variants(9, threads=1)}


def test_an_epoch_is_timed_and_the_thread_count_restored(fashion_splits: Splits) -> None:
    threads = torch.get_num_threads()
    seconds = bench._epoch(
        bench.Variant("default, 1 thread", 9, threads=1), small(fashion_splits, 512), 0
    )
    assert seconds > 0
    assert torch.get_num_threads() == threads


def test_quality_sampling_reports_the_floor_and_the_escalations(fashion_splits: Splits) -> None:
    quality = bench._sample_quality(bench.Variant("default", 9), "mlp", fashion_splits, steps=6)
    assert quality["samples"] == 6 * 3  # three weight matrices a step
    assert 0.99 <= quality["energy_ratio_min"] <= quality["energy_ratio_median"] <= 1 + 1e-5
    assert sum(quality["escalations"].values()) == 18
    assert 0 <= quality["escalation_rate"] <= 1
