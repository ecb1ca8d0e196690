"""Step 3 of scripts/gpu-check.sh: the sync-free SVD(Adam) step on a device.

Prints, for ``python gpu_sync_free_check.py cuda`` (or ``cpu`` to try it without a GPU):

- the SVD(Adam)/Adam step-time ratio, certified (``sync_every=1``) and sync-free
  (``sync_every=16``), alternating rounds after a warm-up;
- host synchronisations per step, counted by ``torch.cuda.set_sync_debug_mode``
  over a window of steady-state steps between two deferred reads (CUDA only);
- agreement of the sync-free low-rank math on the device with a CPU float64 SVD,
  and of 40 training steps (sync-free on the device) with the certified CPU reference.

Exits non-zero, naming each failed check, if the sync-free window has a host sync, if
the sync-free math keeps < 0.99 of the optimum on drifting decaying spectra, or if the
short training disagrees with the CPU reference.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from svdsweep.models import build_model
from svdsweep.optim import SVDGradient, lowrank

K = 9
BATCHES = 64
SYNC_EVERY = 16
failures: list[str] = []


def check(name: str, ok: bool, detail: object) -> None:
    if not ok:
        failures.append(f"{name}: {detail}")


def main(device: torch.device) -> None:
    images = torch.randn(BATCHES * 128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (BATCHES * 128,), generator=torch.Generator().manual_seed(1))
    data = (images.to(device), labels.to(device))
    setups = {kind: make(kind, device) for kind in ("adam", "sync-free", "certified")}
    step_times(setups, data, device)
    host_syncs(setups, data, device)
    low_rank_agreement(device)
    training_agreement(images, labels, device)
    if failures:
        sys.exit("gpu-check FAILED:\n  " + "\n  ".join(failures))
    print("sync-free step: OK")


def make(kind: str, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model("mlp").to(device)
    base = torch.optim.Adam(model.named_parameters(), lr=1e-3)
    if kind == "adam":
        return model, base
    sync_every = SYNC_EVERY if kind == "sync-free" else 1
    return model, SVDGradient(base, rank=K, sync_every=sync_every)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    data: tuple[torch.Tensor, torch.Tensor],
    offset: int = 0,
) -> None:
    images, labels = data
    for step in range(offset, offset + steps):
        rows = slice((step % BATCHES) * 128, (step % BATCHES + 1) * 128)
        loss = F.cross_entropy(model(images[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(setups: dict, data: tuple, device: torch.device, steps: int = 160) -> None:
    for model, optimizer in setups.values():
        train(model, optimizer, 20, data)  # warm-up: allocator, cuBLAS handles, first bases
    times: dict[str, list[float]] = {kind: [] for kind in setups}
    for round_index in range(3):
        for kind, (model, optimizer) in setups.items():
            synchronize(device)
            start = time.perf_counter()
            train(model, optimizer, steps, data, offset=20 + steps * round_index)
            if isinstance(optimizer, SVDGradient):
                optimizer.synchronize()
            synchronize(device)
            times[kind].append((time.perf_counter() - start) / steps * 1e3)
    adam = statistics.median(times["adam"])
    for kind, values in times.items():
        median = statistics.median(values)
        rounds = ", ".join(f"{value:.3f}" for value in values)
        print(
            f"step time, {kind}: {median:.3f} ms (rounds {rounds}); "
            f"ratio to Adam {median / adam:.2f}x"
        )


def host_syncs(setups: dict, data: tuple, device: torch.device) -> None:
    if device.type != "cuda":
        print("host syncs per step: n/a on the CPU (torch.cuda.set_sync_debug_mode is CUDA-only)")
        return
    window = SYNC_EVERY - 1  # steps between two deferred reads
    for kind, (model, optimizer) in setups.items():
        if isinstance(optimizer, SVDGradient):
            optimizer.synchronize()  # the pending read happens here, before the window
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(model, optimizer, window, data, offset=1000)
                in_window = len(caught)
                if kind == "sync-free":
                    train(model, optimizer, 1, data, offset=2000)  # the read at step 16
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        window_syncs = [w for w in caught[:in_window] if w in syncs]
        sources = sorted({f"{w.filename}:{w.lineno}" for w in window_syncs})
        line = f"host syncs per step, {kind}: {len(window_syncs) / window:.2f} over {window} steps"
        if kind == "sync-free":
            line += f" (+{len(syncs) - len(window_syncs)} at the read every {SYNC_EVERY} steps)"
        if sources:
            line += f"; from {', '.join(sources[:6])}"
        print(line)
        if kind == "sync-free":
            check("sync-free host syncs", not window_syncs, sources)


def low_rank_agreement(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    ratios = []
    for m, n in ((256, 784), (128, 256), (10, 128)):
        r = min(m, n)
        spectrum = 1 / torch.arange(1, r + 1, dtype=torch.float64)
        u = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64)).Q
        reference, basis = (u * spectrum) @ v.T, None
        drift = 0.05 * float(reference.norm()) / (m * n) ** 0.5
        for _ in range(10):
            noise = torch.randn(m, n, generator=generator, dtype=torch.float64)
            reference = reference + drift * noise
            result = lowrank.subspace_low_rank(
                reference.float().to(device), K, basis, generator=generator, sync_free=True
            )
            basis = result.basis
            optimal = torch.linalg.svdvals(reference)[:K].square().sum()
            ratios.append(float(result.approx.cpu().double().square().sum() / optimal))
    print(
        f"sync-free low-rank on {device.type} against a CPU float64 SVD: energy ratio median "
        f"{statistics.median(ratios):.6f}, min {min(ratios):.6f} over {len(ratios)} matrices"
    )
    check(
        "sync-free low-rank",
        min(ratios) >= 0.99 and max(ratios) <= 1 + 1e-4,
        (min(ratios), max(ratios)),
    )


def training_agreement(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
    finals = {}
    for kind, on in (("sync-free", device), ("certified", torch.device("cpu"))):
        model, optimizer = make(kind, on)
        assert isinstance(optimizer, SVDGradient)
        train(model, optimizer, 40, (images.to(on), labels.to(on)))
        optimizer.synchronize()
        with torch.no_grad():
            loss = float(F.cross_entropy(model(images[:1024].to(on)), labels[:1024].to(on)))
        finals[kind] = (loss, optimizer.energy_fractions(), optimizer.diagnostics())
    (loss_device, energy_device, diagnostics), (loss_cpu, energy_cpu, _) = finals.values()
    gap = max(abs(energy_device[name] - energy_cpu[name]) for name in energy_cpu)
    print(
        f"40 steps: loss {loss_device:.4f} (sync-free, {device.type}) against {loss_cpu:.4f} "
        f"(certified, cpu); largest per-layer energy difference {gap:.4f}; "
        f"sync-free diagnostics {diagnostics}"
    )
    check(
        "training agreement",
        abs(loss_device - loss_cpu) <= 0.05 * loss_cpu and gap <= 0.02,
        (loss_device, loss_cpu, gap),
    )


if __name__ == "__main__":
    main(torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
