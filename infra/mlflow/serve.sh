#!/usr/bin/env bash
# An MLflow tracking server with basic auth and artifacts proxied to S3 (or any store MLflow takes).
# Configured by the environment only, so nothing secret is written to a tracked file:
#
#   MLFLOW_BACKEND_STORE_URI      required  runs and the registry, e.g. postgresql://mlflow:$PW@db:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  required  e.g. s3://bucket/mlflow (clients upload through the server)
#   MLFLOW_AUTH_ADMIN_PASSWORD    required  the admin's password; there is no default
#   MLFLOW_AUTH_ADMIN_USERNAME    optional  default: admin
#   MLFLOW_AUTH_DATABASE_URI      optional  the basic-auth user store; default sqlite in MLFLOW_DATA_DIR
#   MLFLOW_DATA_DIR               optional  default: ./mlflow-server (auth config and sqlite stores)
#   MLFLOW_HOST / MLFLOW_PORT     optional  default: 127.0.0.1 / 5000 (loopback unless told otherwise)
#   MLFLOW_WORKERS                optional  default: 2 server processes
#   MLFLOW_FLASK_SERVER_SECRET_KEY optional signs the UI's CSRF tokens; set the same one on every
#                                           replica; default: a random key per start
#   MLFLOW_AUTH_CACHE_TTL_SECONDS optional  cache a checked password this long (default 0: hash every
#                                           request; a password change then takes up to this long)
#   MLFLOW_S3_ENDPOINT_URL        optional  an S3-compatible server; AWS credentials from the
#                                           usual AWS environment variables, files or role
#
# infra/mlflow/docker-compose.yaml runs it against Postgres; infra/local/stack.sh on 127.0.0.1.
set -euo pipefail

need() {
  if [ -z "${!1:-}" ]; then
    echo "serve.sh: $1 is not set ($2)" >&2
    exit 2
  fi
}
need MLFLOW_BACKEND_STORE_URI "where runs are stored, e.g. postgresql://user:password@host:5432/mlflow"
need MLFLOW_ARTIFACTS_DESTINATION "where artifacts are stored, e.g. s3://bucket/mlflow"
need MLFLOW_AUTH_ADMIN_PASSWORD "the admin password of basic auth; choose one, there is no default"

# One key for all worker processes of this server (MLflow refuses to start basic auth without it).
if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi

data_dir=${MLFLOW_DATA_DIR:-mlflow-server}
mkdir -p "$data_dir"
export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
auth_db=${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$(cd "$data_dir" && pwd)/basic_auth.db}

# The auth config names the user store only; the admin password stays in the environment
# (MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD) and never reaches a file.
umask 077
export MLFLOW_AUTH_CONFIG_PATH="$data_dir/basic_auth.ini"
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = $auth_db
admin_username = $MLFLOW_AUTH_ADMIN_USERNAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}
INI

exec mlflow server --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}"
