#!/bin/bash
# Entry point of the svdsweep image. The first argument picks the role:
#
#   ray-head               Ray head node (GCS, dashboard); runs no trials itself
#   ray-worker             Ray worker node joining $RAY_HEAD_ADDRESS; runs the trials
#   ray-driver CMD...      joins $RAY_HEAD_ADDRESS as a node without CPUs or GPUs,
#                          then runs CMD (svdsweep sweep / report) as a Ray driver there
#   init-db                creates or upgrades the Optuna schema in $SVDSWEEP_STORAGE
#   anything else          run as is (svdsweep status, bash, ...)
#
# Ray runs a driver only on a machine that has a Ray node of the cluster (its
# raylet), so the driver containers start one with no resources: Ray schedules
# nothing there, and the driver's own tasks go to the worker nodes.
#
# Every Ray role needs RAY_AUTH_MODE=token and the cluster's token in
# RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH); Ray 2.60 reads them
# itself, this script only checks that one is there. RAY_START_ARGS adds flags
# to every `ray start` (e.g. --object-store-memory=2000000000).
set -euo pipefail

log() { echo "svdsweep-entrypoint: $*" >&2; }

# This container's address on the compose network: what Ray advertises to the
# other nodes, and where a driver looks for its local raylet.
node_ip() {
  if [ -n "${RAY_NODE_IP:-}" ]; then echo "$RAY_NODE_IP"; return; fi
  python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))'
}

require_token() {
  if [ "${RAY_AUTH_MODE:-token}" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] \
     && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    log "RAY_AUTH_TOKEN is empty: every Ray container needs the cluster's token"
    exit 64
  fi
}

# The secrets of .env.example are placeholders that anyone can read in the
# repository: refuse to run with them, in one line, before anything starts.
refuse_placeholders() {
  case "${RAY_AUTH_TOKEN:-}" in *change-me-*)
    log "RAY_AUTH_TOKEN is still the .env.example placeholder: set it in .env (openssl rand -hex 32)"
    exit 64 ;;
  esac
  case "${SVDSWEEP_STORAGE:-}" in *change-me-*)
    log "POSTGRES_PASSWORD is still the .env.example placeholder: set it in .env (openssl rand -hex 24)"
    exit 64 ;;
  esac
}

head_address() {
  if [ -z "${RAY_HEAD_ADDRESS:-}" ]; then
    log "RAY_HEAD_ADDRESS (HOST:PORT of the Ray head) is not set"
    exit 64
  fi
  echo "$RAY_HEAD_ADDRESS"
}

# Waits until $1 Ray nodes with CPUs (the worker nodes: the head and the drivers
# have none) are alive, so that `svdsweep sweep` sees every GPU when it decides
# how many workers to start and whether they get a GPU.
wait_for_workers() {
  local want=$1 timeout=${SVDSWEEP_WAIT_TIMEOUT:-600}
  [ "$want" -gt 0 ] || return 0
  log "waiting up to ${timeout}s for ${want} Ray worker node(s)"
  WANT=$want TIMEOUT=$timeout python - <<'PY'
import os, sys, time
import ray

want, timeout = int(os.environ["WANT"]), float(os.environ["TIMEOUT"])
ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address=os.environ["SVDSWEEP_RAY_NODE_IP"],
         log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + timeout
while True:
    workers = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(workers) >= want or time.monotonic() > deadline:
        break
    time.sleep(2)
total = ray.cluster_resources()
ray.shutdown()
print(f"svdsweep-entrypoint: {len(workers)} worker node(s), {total.get('CPU', 0):g} CPU, "
      f"{total.get('GPU', 0):g} GPU", file=sys.stderr)
if len(workers) < want:
    sys.exit(f"svdsweep-entrypoint: only {len(workers)} of {want} Ray worker node(s) joined "
             f"within {timeout:g}s; see `docker compose logs ray-worker`")
PY
}

# Extra `ray start` flags, split on whitespace.
read -r -a extra_args <<< "${RAY_START_ARGS:-}"

refuse_placeholders
role=${1:-}
case "$role" in
  ray-head)
    shift
    require_token
    exec ray start --head --block \
      --node-ip-address="$(node_ip)" \
      --port="${RAY_HEAD_PORT:-6379}" \
      --num-cpus="${RAY_HEAD_CPUS:-0}" --num-gpus=0 \
      --dashboard-host=0.0.0.0 --dashboard-port=8265 \
      --disable-usage-stats \
      "${extra_args[@]}" "$@"
    ;;
  ray-worker)
    shift
    require_token
    address=$(head_address)
    exec ray start --block --address="$address" \
      --node-ip-address="$(node_ip)" \
      --disable-usage-stats \
      "${extra_args[@]}" "$@"
    ;;
  ray-driver)
    shift
    [ $# -gt 0 ] || { log "ray-driver needs a command, e.g. svdsweep sweep"; exit 64; }
    require_token
    address=$(head_address)
    ip=$(node_ip)
    ray start --address="$address" --node-ip-address="$ip" \
      --num-cpus=0 --num-gpus=0 --disable-usage-stats "${extra_args[@]}" >/dev/null
    # svdsweep connects to the raylet just started (svdsweep.sweep.ray_session
    # reads both); Ray's own `ray.init("auto")` finds it as well.
    export RAY_ADDRESS="$address" SVDSWEEP_RAY_NODE_IP="$ip"
    wait_for_workers "${SVDSWEEP_WAIT_FOR_WORKERS:-0}"
    # Run the command as a child, turning `docker stop` (SIGTERM) into the Ctrl-C
    # that svdsweep handles: workers are stopped and their trials marked FAIL.
    # Job control on while starting it: bash starts background commands with
    # SIGINT ignored otherwise, and Python then never raises KeyboardInterrupt.
    set -m
    "$@" &
    child=$!
    set +m
    trap 'kill -INT "$child" 2>/dev/null || true' INT TERM
    # `wait` returns early when a trapped signal arrives: wait until the child is
    # gone, then once more for its own exit status.
    while kill -0 "$child" 2>/dev/null; do
      wait "$child" || true
    done
    status=0
    wait "$child" || status=$?
    # No `ray stop`: it would stop every Ray process it can see, and this
    # container's raylet ends with the container anyway (the head then marks
    # the node dead after its health checks).
    exit "$status"
    ;;
  init-db)
    shift
    python - "$@" <<'PY'
"""Creates the Optuna tables once, before any other service opens the database."""
import os, sys
import optuna
from optuna.storages import RDBStorage

url = os.environ.get("SVDSWEEP_STORAGE")
if not url:
    sys.exit("svdsweep-entrypoint: SVDSWEEP_STORAGE is not set")
storage = RDBStorage(url, skip_compatibility_check=True)  # creates missing tables
if storage.get_current_version() != storage.get_head_version():
    storage.upgrade()
print(f"svdsweep-entrypoint: storage schema {storage.get_current_version()} (optuna {optuna.__version__})",
      file=sys.stderr)
PY
    ;;
  "")
    exec svdsweep --help
    ;;
  *)
    exec "$@"
    ;;
esac
