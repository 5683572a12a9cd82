#!/usr/bin/env bash
# The checks that need a CUDA GPU (bf16 master weights surviving EMA/D reloads, tests/test_gpu.py).
# Run on a GPU machine whose Python already has a CUDA torch: ADVFLOW_TORCH="" keeps it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ADVFLOW_TORCH="${ADVFLOW_TORCH-}"
source "$repo/infra/venv.sh"
cd "$repo"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks: no CUDA device visible')"
exec python -m pytest tests/test_gpu.py -q -rs "$@"
