#!/bin/bash
# The image's entrypoint. With a command, run it (KubeRay sets its own command and bypasses this);
# without one, print what the image holds and whether it sees a GPU: `docker run --gpus all IMAGE`.
set -euo pipefail
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec python - <<'PY'
import importlib.metadata as m
import torch
print("advflow", m.version("advflow"), "| ray", m.version("ray"), "| deepspeed", m.version("deepspeed"),
      "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPUs visible:", torch.cuda.device_count())
PY
