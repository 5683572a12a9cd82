#!/usr/bin/env bash
# The README's test command: set up (or reuse) the venv, then run the whole test suite.
# Tests start the services they need themselves (S3 endpoint, MLflow server, Ray head) on 127.0.0.1.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/infra/venv.sh"
cd "$repo"
# Tests use tiny models: one intra-op thread per process avoids oversubscribing the cores when
# several worker processes (gloo ranks, Ray workers) run at once.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Run every test, the slow Ray-task prepare test too (set ADVFLOW_TEST_RAY= to skip it locally).
export ADVFLOW_TEST_RAY="${ADVFLOW_TEST_RAY-1}"
exec python -m pytest "$@"
