#!/bin/bash
# Runs the image's entry point roles on this machine, without Docker: a Ray head,
# a worker node and a driver node (each on its own loopback address, as each
# container has its own), token auth, and a tiny `svdsweep sweep` from the driver.
#
# Meant to run in private network and PID namespaces, so that it meets no other
# Ray on the machine and leaves none behind (all end with the namespace):
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

step "SIGTERM (docker stop) stops a running sweep as Ctrl-C does"
# Started with SIGINT at its default, as under the container's init; a
# background command of this script would inherit it ignored.
sigint_default() {
  exec python -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}
RAY_NODE_IP=127.0.0.5 RAY_START_ARGS="--dashboard-agent-listen-port=52368 $(tmp d2)" \
  SVDSWEEP_WAIT_FOR_WORKERS=1 SVDSWEEP_WAIT_TIMEOUT=120 \
  SVDSWEEP_STORAGE="sqlite:///$work/sweep.db" \
  sigint_default "$entrypoint" ray-driver svdsweep sweep --experiment stopped --trials 50 \
  --workers 2 --trial-epochs 50 --train-subset 256 >"$work/stopped.log" 2>&1 &
driver=$!
for _ in $(seq 120); do
  grep -Eq "adam: 0/50 done, [12] running" "$work/stopped.log" && break
  sleep 1
done
kill -TERM "$driver"
status=0
wait "$driver" || status=$?
if [ "$status" != 130 ] || ! grep -q "interrupted" "$work/stopped.log"; then
  echo "smoke: FAIL: SIGTERM gave status $status" >&2; cat "$work/stopped.log" >&2; exit 1
fi
svdsweep status --storage "sqlite:///$work/sweep.db" --experiment stopped --json >"$work/stopped.json"
python - "$work/stopped.json" <<'PY'
import json, sys
counts = [study["counts"] for study in json.load(open(sys.argv[1]))]
print(f"smoke: after SIGTERM: {counts}")
assert all(c["RUNNING"] == 0 for c in counts) and sum(c["FAIL"] for c in counts) >= 1, counts
PY

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
