#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: one head and N worker nodes, all on 127.0.0.1,
# dashboard and Jobs API bound to 127.0.0.1 only, token authentication on every node.
#
#   infra/local/ray-cluster.sh start [WORKERS] [CPUS_PER_NODE]   # default 2 workers, 1 CPU each
#   RAY_ADDRESS=127.0.0.1:6379 RAY_AUTH_MODE=token make repro      # train on it (a driver here)
#   infra/local/ray-cluster.sh stop
#
# RAY_HEAD_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_PORT (10001), RAY_AGENT_PORT (52365)
# and RAY_TEMP_DIR (/tmp/ray) change where it listens and keeps its state; `stop` ends only the processes of the cluster in RAY_TEMP_DIR, so
# another Ray on the machine (one a test or a laptop run started) is left alone. The head has no
# CPUs of its own (RAY_HEAD_CPUS, default 0), so every training worker lands on a worker node.
# Each worker node keeps its own folder (RAY_TEMP_DIR/worker-i), as on separate machines: a node cleaning up a job's
# working directory must not delete the copy the head is running the job in.
set -euo pipefail
PORT=${RAY_HEAD_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
TEMP_DIR=${RAY_TEMP_DIR:-/tmp/ray}
# Every node's dashboard agent needs a port of its own on a shared machine: head AGENT_PORT, worker i AGENT_PORT+i.
AGENT_PORT=${RAY_AGENT_PORT:-52365}
CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# Token authentication on every node; the token lives in ~/.ray/auth_token (or RAY_AUTH_TOKEN).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Ray's state API in the cluster's own processes (Ray Train's placement-group cleaner among them)
# goes to this dashboard; without it, it fails when this machine runs a second Ray.
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"

case "${1:-}" in
  start)
    workers=${2:-2}
    cpus=${3:-1}
    [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null
    ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="${RAY_HEAD_CPUS:-0}" --temp-dir="$TEMP_DIR" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
      --ray-client-server-port="$CLIENT_PORT" --disable-usage-stats
    for i in $(seq 1 "$workers"); do  # the worker nodes join at once
      ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$cpus" \
        --temp-dir="$TEMP_DIR/worker-$i" --node-name="worker-$i" --dashboard-agent-listen-port=$((AGENT_PORT + i)) \
        --disable-usage-stats >"$TEMP_DIR/worker-$i.start.log" 2>&1 &
    done
    failed=0
    for job in $(jobs -p); do wait "$job" || failed=1; done
    if [ "$failed" = 1 ]; then
      cat "$TEMP_DIR"/worker-*.start.log >&2
      exit 1
    fi
    [ ! -t 1 ] || ray status --address="127.0.0.1:$PORT"
    echo "cluster up: RAY_ADDRESS=127.0.0.1:$PORT  dashboard/jobs: http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  stop)
    if [ "$TEMP_DIR" = /tmp/ray ]; then
      ray stop --force
    else  # only this cluster's processes: those naming its folder, and its Ray client server
      mine="$TEMP_DIR/|ray[.]util[.]client[.]server --address=[^ ]*:$PORT "
      pkill -TERM -f -- "$mine" || true
      for _ in $(seq 1 10); do pgrep -f -- "$mine" >/dev/null || exit 0; sleep 0.2; done
      pkill -KILL -f -- "$mine" || true
    fi
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
