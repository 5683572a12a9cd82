#!/usr/bin/env bash
# The README's test command: set up (or reuse) the venv, then run the whole test suite.
# Tests start the services they need themselves (S3 endpoint, MLflow server, Ray head) on 127.0.0.1.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/infra/venv.sh"
cd "$repo"
source "$repo/infra/apt.sh"

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
# The live-metrics tests and the stack run Prometheus (infra/local/services.py start_prometheus);
# ADVFLOW_PROMETHEUS=/path/to/prometheus names another binary.
if [[ -z "${ADVFLOW_PROMETHEUS:-}" ]] && ! command -v prometheus >/dev/null 2>&1; then
  # Without recommends: the server only (not node-exporter, which would listen on every interface).
  apt_install prometheus "tests/test_live_metrics.py and the stack's live metrics" --no-install-recommends
fi
# Tests use tiny models: one intra-op thread per process avoids oversubscribing the cores when
# several worker processes (gloo ranks, Ray workers) run at once.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Run every test, the slow Ray-task prepare test too (set ADVFLOW_TEST_RAY= to skip it locally).
export ADVFLOW_TEST_RAY="${ADVFLOW_TEST_RAY-1}"
exec python -m pytest "$@"
