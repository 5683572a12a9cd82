#!/usr/bin/env bash
# The README's main command: set up (or reuse) the venv, then run the main job.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/infra/venv.sh"
cd "$repo"
exec python jobs/toy.py --out "${ADVFLOW_OUT:-runs/toy}" "$@"
