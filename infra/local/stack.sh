#!/usr/bin/env bash
# The scale-out stack on this machine, everything on 127.0.0.1: an S3-compatible server (moto),
# an MLflow server (basic auth, artifacts proxied to that S3; infra/mlflow/serve.sh) and a Ray
# cluster with token authentication (a head and N worker nodes; infra/local/ray-cluster.sh).
#
#   infra/local/stack.sh up [WORKERS] [CPUS_PER_NODE]    # default 2 worker nodes, 1 CPU each
#   source .stack/env                                    # addresses and this stack's credentials
#   python -m pipelines.cluster_job submit               # dvc repro as a Ray job (see that module)
#   infra/local/stack.sh down
#
# The stack is for trying things out and for tests: `down` forgets its runs and objects.
# `up` makes fresh credentials (an MLflow admin password, S3 keys) and writes them, with the
# addresses, to $STACK_DIR/env (mode 0600, git-ignored); the Ray nodes start with that
# environment, so jobs and their workers reach MLflow and S3 without credentials in any command.
# Settings: STACK_DIR (.stack), STACK_BUCKET (cvflow), S3_PORT (9000), MLFLOW_PORT (5050),
# RAY_HEAD_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_PORT (10001), RAY_AGENT_PORT
# (52365, +1 per worker node), RAY_TEMP_DIR (/tmp/cvflow-ray).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
STACK_DIR=${STACK_DIR:-.stack}
mkdir -p "$STACK_DIR"
STACK_DIR=$(cd "$STACK_DIR" && pwd)

wait_http() {  # URL, what: wait up to 60 s for an HTTP answer (any status)
  for _ in $(seq 1 240); do
    if python - "$1" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
PY
    sleep 0.25
  done
  echo "stack.sh: $2 did not answer at $1; see $STACK_DIR/*.log" >&2
  return 1
}

start_bg() {  # NAME, command...: a background process in its own session, pid in NAME.pid
  local name=$1
  shift
  setsid nohup "$@" >"$STACK_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$STACK_DIR/$name.pid"
}

stop_bg() {  # NAME: end the process group started by start_bg
  local pidfile="$STACK_DIR/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 15); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

down() {
  if [ -f "$STACK_DIR/ray.settings" ]; then
    # shellcheck disable=SC1091
    source "$STACK_DIR/ray.settings"
    "$here/ray-cluster.sh" stop || true
    rm -f "$STACK_DIR/ray.settings"
  fi
  stop_bg mlflow
  stop_bg s3
  # The S3 server keeps its objects in memory, so runs whose artifacts are gone are dropped too;
  # the next `up` starts empty, with new credentials.
  rm -rf "$STACK_DIR/mlflow"
  rm -f "$STACK_DIR/env" "$STACK_DIR/env.partial"
}

up() {
  local workers=${1:-2} cpus=${2:-1}
  if [ -f "$STACK_DIR/env" ]; then
    echo "stack.sh: $STACK_DIR/env exists: the stack is up (run \`$0 down\` first)" >&2
    exit 2
  fi
  local s3_port=${S3_PORT:-9000} mlflow_port=${MLFLOW_PORT:-5050} bucket=${STACK_BUCKET:-cvflow}
  local ray_port=${RAY_HEAD_PORT:-6379} dashboard_port=${RAY_DASHBOARD_PORT:-8265}
  trap 'echo "stack.sh: start failed; stopping what started" >&2; down' ERR
  umask 077
  new_secret() { python -c 'import secrets; print(secrets.token_urlsafe(24))'; }
  cat >"$STACK_DIR/env.partial" <<ENV
# The local stack's addresses and credentials: \`source\` it. Made by infra/local/stack.sh up.
export AWS_ACCESS_KEY_ID=$(new_secret)
export AWS_SECRET_ACCESS_KEY=$(new_secret)
export AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port
export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD=$(new_secret)
export CVFLOW_STORAGE_PATH=s3://$bucket/ray
export RAY_AUTH_MODE=token
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port
ENV
  cat >"$STACK_DIR/ray.settings" <<SET
export RAY_HEAD_PORT=$ray_port RAY_DASHBOARD_PORT=$dashboard_port RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/cvflow-ray}
export RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001} RAY_AGENT_PORT=${RAY_AGENT_PORT:-52365}
SET
  # shellcheck disable=SC1091
  source "$STACK_DIR/env.partial"

  start_bg s3 moto_server -H 127.0.0.1 -p "$s3_port"
  wait_http "$AWS_ENDPOINT_URL/moto-api/" "the S3 server"
  python -c "import boto3; boto3.client('s3').create_bucket(Bucket='$bucket')"

  MLFLOW_BACKEND_STORE_URI="sqlite:///$STACK_DIR/mlflow/mlflow.db" \
    MLFLOW_ARTIFACTS_DESTINATION="s3://$bucket/mlflow" \
    MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" \
    MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
    MLFLOW_DATA_DIR="$STACK_DIR/mlflow" MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL" \
    MLFLOW_HOST=127.0.0.1 MLFLOW_PORT="$mlflow_port" MLFLOW_AUTH_CACHE_TTL_SECONDS=60 \
    start_bg mlflow "$here/../mlflow/serve.sh"
  wait_http "$MLFLOW_TRACKING_URI/health" "the MLflow server"

  # shellcheck disable=SC1091
  source "$STACK_DIR/ray.settings"
  "$here/ray-cluster.sh" start "$workers" "$cpus"
  echo "export RAY_ADDRESS=127.0.0.1:$ray_port  # a driver on this machine (e.g. make repro)" >>"$STACK_DIR/env.partial"
  mv "$STACK_DIR/env.partial" "$STACK_DIR/env"
  trap - ERR
  echo "stack up: S3 $AWS_ENDPOINT_URL (bucket $bucket), MLflow $MLFLOW_TRACKING_URI, Ray jobs $RAY_API_SERVER_ADDRESS"
  echo "credentials and addresses: source $STACK_DIR/env"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
