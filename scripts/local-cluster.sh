#!/usr/bin/env bash
# The docker-compose topology as local processes, on loopback addresses only:
#   PostgreSQL (the running local one, or --storage URL)
#   a Ray head on 127.0.0.2 (no CPUs: it schedules, it does not train)
#   2 Ray worker nodes on 127.0.0.3 and 127.0.0.4 (1 CPU each), token auth
#   the sweep driver, optuna-dashboard, the reporter
# then tears down everything it started, and only that (by PID, never `ray stop`).
#
# Usage: scripts/local-cluster.sh [--storage URL] [--experiment NAME] [--trials N]
#          [--trial-epochs E] [--train-subset N] [--report-epochs E] [--seeds S]
#          [--workdir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SVDSWEEP="$ROOT/.venv/bin/svdsweep"
RAY="$ROOT/.venv/bin/ray"
PYTHON="$ROOT/.venv/bin/python"

STORAGE=${SVDSWEEP_STORAGE:-postgresql+psycopg2://postgres@127.0.0.1:5432/postgres}
EXPERIMENT="local-$(date +%Y%m%d-%H%M%S)"
TRIALS=4
TRIAL_EPOCHS=1
TRAIN_SUBSET=5000
REPORT_EPOCHS=3
SEEDS=2
WORKDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --storage) STORAGE=$2; shift 2 ;;
    --experiment) EXPERIMENT=$2; shift 2 ;;
    --trials) TRIALS=$2; shift 2 ;;
    --trial-epochs) TRIAL_EPOCHS=$2; shift 2 ;;
    --train-subset) TRAIN_SUBSET=$2; shift 2 ;;
    --report-epochs) REPORT_EPOCHS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "local-cluster: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
WORKDIR=${WORKDIR:-$(mktemp -d -t svdsweep-cluster-XXXXXX)}
mkdir -p "$WORKDIR/logs"
export RAY_AUTH_MODE=token          # every Ray process: head, nodes, driver
export SVDSWEEP_RAY_LOGS=0

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HEAD_PORT=$(free_port)
DASHBOARD_PORT=$(free_port)
HEAD="127.0.0.2:$HEAD_PORT"

STARTED=()
teardown() {
  local code=$?
  for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "local-cluster: stopped ${#STARTED[@]} processes; logs in $WORKDIR/logs" >&2
  exit "$code"
}
trap teardown EXIT
trap 'exit 130' INT TERM

step() { echo "local-cluster: $*" >&2; }

step "1/5 PostgreSQL: $("$PYTHON" -c 'import sys; from svdsweep.storage import redact; print(redact(sys.argv[1]))' "$STORAGE")"
"$PYTHON" - "$STORAGE" <<'EOF'
import sys
import sqlalchemy
from svdsweep.storage import redact
try:
    with sqlalchemy.create_engine(sys.argv[1]).connect():
        pass
except Exception as error:
    sys.exit(f"local-cluster: cannot reach {redact(sys.argv[1])}: {str(error).splitlines()[0]}")
EOF

step "2/5 Ray head on $HEAD and worker nodes on 127.0.0.3, 127.0.0.4 (token auth)"
"$RAY" start --head --block --node-ip-address 127.0.0.2 --port "$HEAD_PORT" \
  --num-cpus 0 --num-gpus 0 --include-dashboard false >"$WORKDIR/logs/ray-head.log" 2>&1 &
STARTED+=($!)
for _ in $(seq 60); do "$RAY" status --address "$HEAD" >/dev/null 2>&1 && break; sleep 1; done
alive_nodes() {
  "$PYTHON" - "$HEAD" <<'EOF' 2>/dev/null || echo 0
import sys, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.2", logging_level="ERROR", log_to_driver=False)
print(sum(1 for node in ray.nodes() if node["Alive"]))
EOF
}
nodes=1
for ip in 127.0.0.3 127.0.0.4; do
  # One node at a time: raylets registering at once on one machine can time out.
  "$RAY" start --block --address "$HEAD" --node-ip-address "$ip" --num-cpus 1 --num-gpus 0 \
    >"$WORKDIR/logs/ray-node-$ip.log" 2>&1 &
  STARTED+=($!)
  want=$((nodes + 1))
  for _ in $(seq 90); do nodes=$(alive_nodes); [ "$nodes" = "$want" ] && break; sleep 1; done
  [ "$nodes" = "$want" ] || { echo "local-cluster: Ray node $ip did not join" >&2; exit 1; }
done

step "3/5 sweep driver: $TRIALS trials per study on 2 workers (one per node)"
"$SVDSWEEP" sweep --storage "$STORAGE" --experiment "$EXPERIMENT" --trials "$TRIALS" \
  --workers 2 --gpus-per-worker 0 --cpus-per-worker 1 --ray-address "$HEAD" \
  --ray-node-ip 127.0.0.2 --trial-epochs "$TRIAL_EPOCHS" --train-subset "$TRAIN_SUBSET"

step "4/5 optuna-dashboard on http://127.0.0.1:$DASHBOARD_PORT/"
"$SVDSWEEP" dashboard --storage "$STORAGE" --artifact-dir "$WORKDIR/artifacts" \
  --port "$DASHBOARD_PORT" >"$WORKDIR/logs/dashboard.log" 2>&1 &
STARTED+=($!)
"$PYTHON" - "$DASHBOARD_PORT" "$EXPERIMENT" <<'EOF'
import json, sys, time, urllib.request
port, experiment = sys.argv[1], sys.argv[2]
for _ in range(120):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as answer:
            names = [s["study_name"] for s in json.load(answer)["study_summaries"]]
            ours = sorted(n for n in names if n.startswith(experiment + "-"))
            print(f"local-cluster: dashboard answered with studies {ours}", file=sys.stderr)
            sys.exit(0 if len(ours) == 2 else 1)
    except OSError:
        time.sleep(0.5)
sys.exit("local-cluster: the dashboard did not answer")
EOF

step "5/5 reporter: $SEEDS seeds x $REPORT_EPOCHS epochs per optimizer on the cluster"
"$SVDSWEEP" report --storage "$STORAGE" --experiment "$EXPERIMENT" --epochs "$REPORT_EPOCHS" \
  --seeds "$SEEDS" --out "$WORKDIR/results" --ray-address "$HEAD" --gpus-per-run 0 \
  --artifact-dir "$WORKDIR/artifacts"

"$SVDSWEEP" status --storage "$STORAGE" --experiment "$EXPERIMENT" --json >"$WORKDIR/status.json"
step "done: report in $WORKDIR/results, status in $WORKDIR/status.json"
