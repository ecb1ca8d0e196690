#!/usr/bin/env bash
# GPU check for a bare CUDA machine with PyTorch but no internet.
#
# Here, online, once:     bash scripts/gpu-check.sh --prepare
#   builds ./wheelhouse (~40 MB): the svdsweep wheel, the packages its `train` and
#   `bench` commands import (typer, rich and their needs; pydantic-core for each Python
#   in GPU_CHECK_PYTHONS) and a copy of Fashion-MNIST's four .gz files in
#   wheelhouse/fashion-mnist. torch, torchvision, numpy and pillow are left out: the GPU
#   machine's own CUDA builds are used. (The full dependency list, Ray and Optuna
#   included, is not needed for training and would not fit a 64 MiB carry.)
# There, offline:         bash scripts/gpu-check.sh
#   (with the device tool: command "bash scripts/gpu-check.sh", carry ["wheelhouse"])
#   installs the wheelhouse into a private folder (pip --no-index --find-links), then
#   1. trains Adam and SVD(Adam) k=9 for one epoch each with --device cuda;
#   2. checks the exact and the fast low-rank methods on CUDA against a CPU float64 SVD;
#   3. scripts/gpu_sync_free_check.py: the SVD(Adam)/Adam step-time ratio (certified and
#      sync-free modes), host synchronisations per step (torch.cuda.set_sync_debug_mode),
#      agreement of the sync-free math with a CPU float64 SVD and of a short training with
#      the certified CPU reference;
#   4. prints `svdsweep bench optimizer --device cuda --epochs 2` (the longest step;
#      GPU_CHECK_SKIP_BENCH=1 skips it).
#
# Environment: PYTHON (default python3, the interpreter that holds CUDA torch),
# GPU_CHECK_SKIP_BENCH (1: skip step 4),
# WHEELHOUSE (default ./wheelhouse), GPU_CHECK_DEVICE (default cuda; "cpu" runs the
# same steps on the CPU, to try the script on a machine without a GPU),
# GPU_CHECK_PYTHONS (--prepare: Python versions to fetch wheels for, default "3.12"
# plus this machine's).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CHECKS=$(pwd)/scripts
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
# What `svdsweep train` and `svdsweep bench` import beyond torch, torchvision and numpy.
CLI_REQUIREMENTS=("typer>=0.29" "rich>=13")

prepare() {
  local python=$PYTHON
  [ -x .venv/bin/python ] && python=.venv/bin/python
  rm -rf "$WHEELHOUSE"
  mkdir -p "$WHEELHOUSE/fashion-mnist"
  echo "gpu-check: building the svdsweep wheel"
  "$python" -m pip wheel -q --no-deps -w "$WHEELHOUSE" .
  local here
  here=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  for version in ${GPU_CHECK_PYTHONS:-3.12 $here}; do
    echo "gpu-check: downloading ${CLI_REQUIREMENTS[*]} for Python $version"
    "$python" -m pip download -q --only-binary=:all: --python-version "$version" \
      -d "$WHEELHOUSE" "${CLI_REQUIREMENTS[@]}"
  done
  local data=${SVDSWEEP_DATA_DIR:-/usr/share/datasets/fashion-mnist}
  for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
              t10k-labels-idx1-ubyte; do
    if [ -f "$data/$name.gz" ]; then
      cp "$data/$name.gz" "$WHEELHOUSE/fashion-mnist/"
    elif [ -f "$data/$name" ]; then
      gzip -c "$data/$name" >"$WHEELHOUSE/fashion-mnist/$name.gz"
    else
      echo "gpu-check: $data/$name[.gz] not found; set SVDSWEEP_DATA_DIR" >&2
      exit 1
    fi
  done
  ls -1 "$WHEELHOUSE"
  echo "gpu-check: $(du -sh "$WHEELHOUSE" | cut -f1) in $WHEELHOUSE (the device tool carries 64 MiB)"
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/gpu-check.sh [--prepare]" >&2
  exit 2
fi

[ -d "$WHEELHOUSE/fashion-mnist" ] || {
  echo "gpu-check: no $WHEELHOUSE/; run 'bash scripts/gpu-check.sh --prepare' first" >&2
  exit 1
}
WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
[[ $PYTHON == */* ]] && PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"

# -- install: a private folder in front of the machine's own packages ----------------
# svdsweep without its pinned dependencies (the machine's torch stays), then what the CLI
# needs, resolved for this Python (pydantic-core, pulled in by typer, is a binary wheel).
SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
pip_install=("$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" --no-compile
  --target "$SITE")
"${pip_install[@]}" --no-deps svdsweep
"${pip_install[@]}" --upgrade "${CLI_REQUIREMENTS[@]}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export SVDSWEEP_DATA_DIR="$WHEELHOUSE/fashion-mnist"
export SVDSWEEP_CACHE_DIR="${SVDSWEEP_CACHE_DIR:-$(mktemp -d /tmp/gpu-check-cache.XXXXXX)}"
export PYTHONUNBUFFERED=1
cd "$SITE"  # out of the source tree, so that Python imports the installed wheel
svdsweep() { "$PYTHON" -m svdsweep.cli "$@"; }

"$PYTHON" - "$DEVICE" <<'EOF'
import sys

import torch
import torchvision

import svdsweep

device = sys.argv[1]
print(f"gpu-check: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, svdsweep from {svdsweep.__file__}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu-check: torch sees no CUDA GPU")
    print(f"gpu-check: {torch.cuda.get_device_name()}")
EOF

# -- 1. one epoch of each optimizer on the device ----------------------------------------
cat >"$SITE/summary.py" <<'EOF'
import json
import sys

result, device = json.load(sys.stdin), sys.argv[1]
line = (f"device {result['device']}  epoch {result['epoch_seconds'][0]:.2f} s  "
        f"val acc {result['val_acc'][0]:.2%}")
if result["energy"]:
    line += f"  top-k energy {result['energy'][0]:.4f}"
print(line)
assert result["device"].startswith(device), result["device"]
assert result["val_acc"][0] > 0.75, "validation accuracy after one epoch is too low"
assert all(0 < e <= 1 for e in result["energy"]), result["energy"]
EOF
for args in "--optimizer adam" "--optimizer svd-adam --k 9"; do
  echo "== svdsweep train $args --epochs 1 --device $DEVICE"
  # shellcheck disable=SC2086  # $args holds several words on purpose
  svdsweep train $args --lr 0.001 --epochs 1 --device "$DEVICE" --json \
    | "$PYTHON" "$SITE/summary.py" "$DEVICE"
done

# -- 2. low-rank methods on the device against a CPU float64 SVD ---------------------------
echo "== low-rank methods on $DEVICE against a CPU float64 SVD (k=9)"
"$PYTHON" - "$DEVICE" <<'EOF'
import statistics
import sys

import torch

from svdsweep.models import build_model
from svdsweep.optim import SVDGradient, lowrank

device, k = torch.device(sys.argv[1]), 9
generator = torch.Generator().manual_seed(0)  # a CPU generator seeds device sketches too
failures = []


def with_spectrum(m, n, spectrum, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64)).Q
    return (u * spectrum) @ v.T


def best(reference):  # CPU float64 Eckart-Young optimum and its singular values
    u, s, vh = torch.linalg.svd(reference, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def check(name, ok, detail):
    if not ok:
        failures.append(f"{name}: {detail}")


ratios = {"randomized": [], "subspace (cold)": [], "subspace (warm)": []}
worst_exact = {torch.float32: 0.0, torch.float64: 0.0}
seed = 0
for m, n in [(256, 784), (784, 256), (128, 256), (10, 128), (100, 100)]:
    r = min(m, n)
    i = torch.arange(1, r + 1, dtype=torch.float64)
    for spectrum in (1 / i, torch.exp(-i / 10)):
        seed += 1
        reference = with_spectrum(m, n, spectrum, seed)
        optimum, values = best(reference)
        kept = float(values[:k].square().sum())
        for dtype in worst_exact:
            approx = lowrank.exact_low_rank(reference.to(device, dtype), k).approx
            check(f"exact {dtype} {m}x{n}", approx.device.type == device.type, approx.device)
            error = float((approx.cpu().double() - optimum).norm() / optimum.norm())
            worst_exact[dtype] = max(worst_exact[dtype], error)
        matrix = reference.float().to(device)
        for name, fn in (
            ("randomized", lambda x: lowrank.randomized_low_rank(x, k, generator=generator)),
            ("subspace (cold)", lambda x: lowrank.subspace_low_rank(x, k, None, generator=generator)),
        ):
            approx = fn(matrix).approx
            ratios[name].append(float(approx.cpu().double().square().sum()) / kept)
        basis, drift = None, 0.05 * float(reference.norm()) / (m * n) ** 0.5
        for _ in range(10):
            reference = reference + drift * torch.randn(m, n, generator=generator, dtype=torch.float64)
            result = lowrank.subspace_low_rank(reference.float().to(device), k, basis, generator=generator)
            basis = result.basis
            _, values = best(reference)
            ratios["subspace (warm)"].append(
                float(result.approx.cpu().double().square().sum()) / float(values[:k].square().sum())
            )
        half = lowrank.exact_low_rank(reference.to(device, torch.bfloat16), k).approx
        check(f"bf16 {m}x{n}", half.dtype == torch.bfloat16, half.dtype)

print(f"exact: worst relative error {worst_exact[torch.float32]:.2e} (float32), "
      f"{worst_exact[torch.float64]:.2e} (float64)")
check("exact float32", worst_exact[torch.float32] < 1e-4, worst_exact[torch.float32])
check("exact float64", worst_exact[torch.float64] < 1e-10, worst_exact[torch.float64])
for name, values in ratios.items():
    median, low = statistics.median(values), min(values)
    print(f"{name}: energy ratio median {median:.6f}, min {low:.6f} over {len(values)} matrices")
    check(name, median >= 0.999 and low >= 0.99 and max(values) <= 1 + 1e-4, (median, low))

# The wrapper on the device: a few steps of the MLP, diagnostics in (0, 1].
for method in ("exact", "randomized", "subspace"):
    torch.manual_seed(0)
    model = build_model("mlp").to(device)
    optimizer = SVDGradient(torch.optim.Adam(model.named_parameters(), lr=1e-3), rank=k, method=method)
    for step in range(20):
        images = torch.randn(128, 1, 28, 28, device=device)
        labels = torch.randint(0, 10, (128,), device=device)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    fractions = optimizer.energy_fractions()
    print(f"SVDGradient {method}: energy {', '.join(f'{n} {v:.4f}' for n, v in fractions.items())}")
    check(f"SVDGradient {method}", len(fractions) == 3 and all(0 < v <= 1 for v in fractions.values()), fractions)

if failures:
    sys.exit("gpu-check FAILED:\n  " + "\n  ".join(failures))
print("low-rank methods: OK")
EOF

# -- 3. the sync-free step: time, host syncs, agreement with the CPU reference ---------------
echo "== sync-free SVD(Adam) step on $DEVICE: step-time ratio, host syncs per step, CPU agreement"
"$PYTHON" "$CHECKS/gpu_sync_free_check.py" "$DEVICE"

# -- 4. the benchmark -----------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_BENCH:-0}" = "1" ]; then
  echo "== svdsweep bench optimizer: skipped (GPU_CHECK_SKIP_BENCH=1)"
else
  echo "== svdsweep bench optimizer --device $DEVICE --epochs 2"
  svdsweep bench optimizer --device "$DEVICE" --epochs 2
fi
echo "gpu-check: all steps passed"
