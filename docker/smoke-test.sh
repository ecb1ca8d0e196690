#!/bin/bash
# Runs the image's entry point roles on this machine, without Docker: a Ray head,
# a worker node and a driver node (each on its own loopback address, as each
# container has its own), token auth, and a tiny `svdsweep sweep` from the driver.
#
# Meant to run in private network and PID namespaces, so that it neither meets
# nor stops any other Ray on the machine (`ray stop` in the driver role stops
# every Ray process it can see, as it would in its own container):
#
#   unshare --net --pid --fork --mount-proc bash docker/smoke-test.sh WORKDIR
#
# Needs svdsweep and ray on PATH (e.g. PATH=.venv/bin:$PATH) and Fashion-MNIST.
set -euo pipefail
work=${1:?usage: smoke-test.sh WORKDIR}
entrypoint=$(cd "$(dirname "$0")" && pwd)/entrypoint.sh
mkdir -p "$work/home"
ip link set lo up 2>/dev/null || true

export HOME=$work/home SVDSWEEP_CACHE_DIR=$work/cache
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 RAY_HEAD_ADDRESS=127.0.0.2:6379
RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN

step() { echo "smoke: $*"; }

step "a Ray role without a token is refused"
if RAY_AUTH_TOKEN='' "$entrypoint" ray-head 2>"$work/notoken.log"; then
  echo "smoke: FAIL: ray-head started without a token" >&2; exit 1
fi
grep -q RAY_AUTH_TOKEN "$work/notoken.log"

step "ray-head"
RAY_NODE_IP=127.0.0.2 RAY_START_ARGS="$(tmp h)" "$entrypoint" ray-head >"$work/head.log" 2>&1 &
for _ in $(seq 90); do
  ray status --address "$RAY_HEAD_ADDRESS" >/dev/null 2>&1 && break
  sleep 1
done
ray status --address "$RAY_HEAD_ADDRESS" >/dev/null  # the compose healthcheck

step "a wrong token is rejected by the head"
if RAY_AUTH_TOKEN=0000 timeout 60 ray status --address "$RAY_HEAD_ADDRESS" >"$work/wrong.log" 2>&1; then
  echo "smoke: FAIL: the head answered a wrong token" >&2; exit 1
fi

step "ray-worker"
# Containers have a /tmp each; nodes sharing this machine's need their own.
# (Unix socket paths under it must stay short: keep WORKDIR near /tmp.)
tmp() { echo "--temp-dir=$work/$1"; }
RAY_NODE_IP=127.0.0.3 RAY_START_ARGS="--num-cpus=2 --dashboard-agent-listen-port=52366 $(tmp w)" \
  "$entrypoint" ray-worker >"$work/worker.log" 2>&1 &

step "ray-driver svdsweep sweep"
RAY_NODE_IP=127.0.0.4 RAY_START_ARGS="--dashboard-agent-listen-port=52367 $(tmp d)" \
  SVDSWEEP_WAIT_FOR_WORKERS=1 SVDSWEEP_WAIT_TIMEOUT=120 \
  SVDSWEEP_STORAGE="sqlite:///$work/sweep.db" \
  "$entrypoint" ray-driver svdsweep sweep --experiment smoke --trials 2 --workers 2 \
  --trial-epochs 1 --train-subset 256

step "svdsweep status"
"$entrypoint" svdsweep status --storage "sqlite:///$work/sweep.db" --experiment smoke --json \
  >"$work/status.json"
python - "$work/status.json" <<'PY'
import json, sys
studies = json.load(open(sys.argv[1]))
for study in studies:
    print(f"smoke: {study['study']}: {study['counts']}")
    assert study["counts"]["COMPLETE"] == study["budget"] == 2, study
PY
echo "smoke: OK"
