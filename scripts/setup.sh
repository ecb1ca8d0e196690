#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages, a virtualenv in .venv, the project.
# Idempotent: rerunning it only installs what is missing. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ -z "${SVDSWEEP_DATA_DIR:-}" ]; then
  need_apt+=(dataset-fashion-mnist)
fi
# Debian's Chromium drives the dashboard's browser test (no browser downloads).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# Debian's shellcheck lints the deployment scripts (scripts/validate-compose.sh).
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    # Wait (up to 10 min) for another apt/dpkg process instead of failing at once.
    apt_wait=(-o DPkg::Lock::Timeout=600)
    apt-get "${apt_wait[@]}" update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_wait[@]}" install -y -q "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install Debian packages: sudo apt-get install -y ${need_apt[*]}" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import svdsweep, torch, optuna, ray, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: pip install -e .[test] (torch comes from local disk when available, ~80 s)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi
