#!/usr/bin/env bash
# The README's main command: the whole demo from a fresh clone.
#   1. create/reuse ./.venv and install advflow        (infra/venv.sh)
#   2. start the local stack: Ray head with token auth, S3 endpoint, MLflow, Prometheus (advflow stack up)
#   3. encode scikit-learn's handwritten digits into latent shards on the S3 bucket
#   4. submit the training job to Ray with `ray job submit` and wait for it
#   5. copy the 1NFE sample grid out of the final checkpoint
#   6. promote the registered EMA generator to `champion` and generate a grid from the registry
# Extra arguments go to jobs/train.py, e.g. `bash infra/demo.sh --set train.steps=200`.
# The stack keeps running afterwards (`advflow stack down` stops it).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/infra/venv.sh"
source "$repo/infra/apt.sh"
cd "$repo"
# The stack's Prometheus scrapes the job's live metrics (Ray's Metrics view, dashboards/grafana/);
# without it the demo still runs, and `advflow stack up` says what is missing.
if [[ -z "${ADVFLOW_PROMETHEUS:-}" ]] && ! command -v prometheus >/dev/null 2>&1; then
  apt_install prometheus "the stack's live metrics" --no-install-recommends  # the server only
fi

advflow stack up
eval "$(advflow stack env)"
data="s3://$ADVFLOW_BUCKET/datasets/digits"
run_name="digits_tiny_$(date +%Y%m%d_%H%M%S)"

# --overwrite: a dataset left by an older advflow (other parameters) is replaced, an identical one kept.
python jobs/prepare_latents.py --source digits --encoder pixel --out "$data" --overwrite
# `--working-dir` uploads the files without .git: the commit travels as an environment variable.
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
ray job submit --working-dir . --runtime-env-json "{\"env_vars\": {\"ADVFLOW_GIT_COMMIT\": \"$commit\"}}" \
    -- python jobs/train.py --config jobs/configs/digits_tiny.yaml \
    --set "data.prefix=$data" --set "run.storage_path=s3://$ADVFLOW_BUCKET/runs" \
    --set "run.name=$run_name" "$@"

out="runs/demo/$run_name"
mkdir -p "$out"
python - "$ADVFLOW_BUCKET" "runs/$run_name" "$out" <<'PY'
import json, sys
import boto3
bucket, prefix, out = sys.argv[1:]
s3 = boto3.client("s3")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
grids = sorted(k for k in keys if k.endswith("/samples.png"))
if not grids:
    sys.exit(f"no samples.png under s3://{bucket}/{prefix}/: did the job fail? see `ray job logs`")
final = grids[-1].rsplit("/", 1)[0]
s3.download_file(bucket, grids[-1], f"{out}/samples.png")
meta = json.loads(s3.get_object(Bucket=bucket, Key=final + "/trainer.json")["Body"].read())
from advflow.platform.train.metrics_log import MetricsLog  # the run's per-step rows (not in checkpoints)
last = MetricsLog(f"s3://{bucket}/{prefix}").read()[-1]
print(f"\n[advflow] demo finished: {meta['step']} steps, final D loss {last['d_loss']:.4f}, G loss {last['g_loss']:.4f}")
print(f"[advflow] checkpoint:  s3://{bucket}/{final}/")
print(f"[advflow] sample grid: {out}/samples.png  (1NFE samples from the EMA generator, one row per digit)")
PY
python jobs/promote.py --name afm-digits --alias champion --best-metric eval/fd --mode min
python jobs/generate.py --model models:/afm-digits@champion --labels 0-9 --per-label 8 --seed 0 \
    --out "$out/generated.png"
echo "[advflow] registry grid: $out/generated.png  (models:/afm-digits@champion, one step per image)"
echo "[advflow] Ray dashboard: $RAY_API_SERVER_ADDRESS   MLflow UI: $MLFLOW_TRACKING_URI (user $MLFLOW_TRACKING_USERNAME, password from \`advflow stack env\`)   stop: advflow stack down"
