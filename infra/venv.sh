#!/usr/bin/env bash
# Create or reuse the project's virtual environment (./.venv) and install advflow into it.
# Sourced by infra/test.sh and infra/demo.sh, so each of them installs what it needs by itself.
# Re-installs only when pyproject.toml changed since the last successful install (stamp file).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ADVFLOW_VENV:-$repo/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[advflow] creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
stamp="$venv/.advflow-installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[advflow] installing advflow and its dependencies into $venv (first time: a few minutes)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch is named with the range's CPU build so that a machine without a GPU does not pull a
    # multi-GB CUDA wheel; on a GPU cluster, install your CUDA torch first and set ADVFLOW_TORCH="".
    torch_req="${ADVFLOW_TORCH-torch==2.13.0}"
    "$venv/bin/python" -m pip install -q $torch_req -e "$repo[stack,test]"
    "$venv/bin/python" -m pip check
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
