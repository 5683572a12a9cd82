#!/usr/bin/env bash
# The README's test command: set up (or reuse) the venv, then run the whole test suite.
# Tests start the services they need themselves (S3 endpoint, MLflow server, Ray head) on 127.0.0.1.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/infra/venv.sh"
cd "$repo"
# apt_install PACKAGE WHAT: install a Debian package the tests need, as root or with passwordless
# sudo; otherwise say what to install and what fails without it (the run goes on).
apt_install() {
  local apt_get=()
  if [[ "$(id -u)" -eq 0 ]]; then
    apt_get=(env DEBIAN_FRONTEND=noninteractive apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt_get=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get)
  fi
  if ((${#apt_get[@]} == 0)); then
    echo "test.sh: $1 is not installed and this user cannot run apt-get (not root, no passwordless sudo):" \
         "install the '$1' package; $2 need it" >&2
    return 0
  fi
  echo "test.sh: installing $1 ($2 need it) via apt-get ..." >&2
  # Try the cached package lists first; refresh them only when that fails (fresh or stale image).
  if ! "${apt_get[@]}" install -y -qq "$1" >/dev/null 2>&1; then
    "${apt_get[@]}" update -qq >/dev/null && "${apt_get[@]}" install -y -qq "$1" >/dev/null \
      || echo "test.sh: apt-get could not install $1; $2 will fail until it is installed" >&2
  fi
}

# The dashboard tests render reports in headless Chromium (tests/chromium.py); CHROMIUM=/path/to/browser
# names another browser.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && [[ -z "${CHROMIUM:-}" ]]; then
  apt_install chromium "the dashboard tests"
fi
# tests/test_postgres.py and the sweep test start a throw-away PostgreSQL on 127.0.0.1
# (infra/local/postgres.py). Debian keeps its server binaries in /usr/lib/postgresql/<version>/bin,
# outside PATH; ADVFLOW_PG_BINDIR=/path/to/bin (initdb, postgres) names others. The package's own
# cluster service is not needed: the tests start their own server.
pg_found=""
for dir in "${ADVFLOW_PG_BINDIR:-}" "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin \
    "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"; do
  if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/postgres" ]]; then pg_found="$dir"; break; fi
done
if [[ -z "$pg_found" ]]; then
  apt_install postgresql "tests/test_postgres.py and the sweep test"
fi
# Tests use tiny models: one intra-op thread per process avoids oversubscribing the cores when
# several worker processes (gloo ranks, Ray workers) run at once.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Run every test, the slow Ray-task prepare test too (set ADVFLOW_TEST_RAY= to skip it locally).
export ADVFLOW_TEST_RAY="${ADVFLOW_TEST_RAY-1}"
exec python -m pytest "$@"
