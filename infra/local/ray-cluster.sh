#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: one head and N worker nodes, all on 127.0.0.1,
# dashboard and Jobs API bound to 127.0.0.1 only.
#
#   infra/local/ray-cluster.sh start [WORKERS] [CPUS_PER_NODE]   # default 2 workers, 1 CPU each
#   RAY_ADDRESS=127.0.0.1:6379 make repro                          # train on it
#   infra/local/ray-cluster.sh stop
set -euo pipefail
PORT=${RAY_HEAD_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
# Token authentication on every node; the token lives in ~/.ray/auth_token (or RAY_AUTH_TOKEN).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

case "${1:-}" in
  start)
    workers=${2:-2}
    cpus=${3:-1}
    [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -f ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null
    ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=0 \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats
    for i in $(seq 1 "$workers"); do
      ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$cpus" \
        --node-name="worker-$i" --disable-usage-stats
    done
    ray status --address="127.0.0.1:$PORT"
    echo "cluster up: RAY_ADDRESS=127.0.0.1:$PORT  dashboard/jobs: http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  stop)
    ray stop --force
    ;;
  *)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
