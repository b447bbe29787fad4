#!/usr/bin/env bash
# Stop the servers infra/local/start.sh started (by the pids recorded under $SFTFLOW_HOME/services).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-$here/../../.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
export SFTFLOW_HOME="${SFTFLOW_HOME:-$PWD/.sftflow}"
exec "$PY" -m sftflow.ops.services stop "$@"
