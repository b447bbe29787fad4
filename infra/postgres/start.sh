#!/usr/bin/env bash
# Start PostgreSQL + Prefect server + MLflow tracking server on 127.0.0.1, PostgreSQL being the
# backend store of both:
#   - first run: initdb a cluster in $SFTFLOW_HOME/postgres/data (superuser `sftflow`, random
#     password kept in $SFTFLOW_HOME/postgres/credentials.json, mode 0600). As root, the cluster
#     runs as the `postgres` OS account (initdb refuses root); SFTFLOW_PG_OS_USER picks another.
#   - pg_ctl start on 127.0.0.1:<pg-port> (TCP only), databases `prefect` and `mlflow` created;
#   - Prefect:  PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://.../prefect
#   - MLflow:   --backend-store-uri postgresql+psycopg2://.../mlflow, artifacts proxied by the
#     server into $SFTFLOW_HOME/mlflow/artifacts, or into S3/MinIO when configured:
#       SFTFLOW_MLFLOW_ARTIFACTS=s3://mlflow/artifacts MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 \
#       AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... infra/postgres/start.sh    (needs boto3)
# Needs Debian's postgresql package (.ci/setup_services.sh installs it; PG_BINDIR overrides).
#
#   infra/postgres/start.sh [--pg-port 5432] [--prefect-port 4200] [--mlflow-port 5000] [--artifacts URI]
#   source "${SFTFLOW_HOME:-.sftflow}/services/env.sh"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-$here/../../.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
export SFTFLOW_HOME="${SFTFLOW_HOME:-$PWD/.sftflow}"
exec "$PY" -m sftflow.ops.services start --backend postgres "$@"
