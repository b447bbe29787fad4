#!/usr/bin/env bash
# Install the system packages the service integration tests need (Debian/Ubuntu):
#   postgresql        - backend store for Prefect + MLflow in the PostgreSQL variant
#   chromium, chromium-driver - headless browser for tests/integration/test_web.py
# Idempotent and quiet: does nothing when everything is already there.
# Usage: .ci/setup_services.sh        (as root, or with passwordless sudo)
set -euo pipefail

need=()
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
[[ -n "$(pg_bin)" && -x "$(pg_bin)/initdb" ]] || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if ((${#need[@]} == 0)); then
  echo "setup_services: postgresql, chromium, chromium-driver already installed"
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup_services: need root or sudo to install ${need[*]}" >&2; exit 1; }
  SUDO="sudo"
fi

echo "setup_services: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# --no-install-recommends keeps chromium's footprint small; policy-rc.d-free: the Debian postgresql
# package may try to start a system cluster, which we never use (our scripts run their own).
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "setup_services: done ($("$(pg_bin)/postgres" --version); $(chromium --version 2>/dev/null || echo "chromium ?"))"
