#!/usr/bin/env bash
# Start a Prefect server and an MLflow tracking server on 127.0.0.1, both on SQLite under
# $SFTFLOW_HOME (default ./.sftflow): Prefect in $SFTFLOW_HOME/prefect/prefect.db, MLflow in
# $SFTFLOW_HOME/mlflow/mlflow.db with artifacts in $SFTFLOW_HOME/mlflow/artifacts.
# Pid files and logs: $SFTFLOW_HOME/services/. Stop with infra/local/stop.sh.
#
#   infra/local/start.sh [--prefect-port 4200] [--mlflow-port 5000] [--host 127.0.0.1]
#   source "${SFTFLOW_HOME:-.sftflow}/services/env.sh"     # PREFECT_API_URL + MLFLOW_TRACKING_URI
#   sftflow serve                                          # schedules; or: sftflow run smoke
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# The project's venv when there is one; $PYTHON wins.
PY="${PYTHON:-$here/../../.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
export SFTFLOW_HOME="${SFTFLOW_HOME:-$PWD/.sftflow}"
exec "$PY" -m sftflow.ops.services start --backend sqlite "$@"
