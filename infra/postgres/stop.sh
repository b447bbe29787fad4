#!/usr/bin/env bash
# Stop Prefect + MLflow servers (by recorded pid) and the PostgreSQL cluster (pg_ctl stop -m fast).
# The cluster's data stays in $SFTFLOW_HOME/postgres/data; start.sh reuses it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-$here/../../.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
export SFTFLOW_HOME="${SFTFLOW_HOME:-$PWD/.sftflow}"
exec "$PY" -m sftflow.ops.services stop "$@"
