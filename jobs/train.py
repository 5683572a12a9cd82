"""Train an AFM generator/discriminator pair on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/digits_tiny.yaml
    python jobs/train.py --config jobs/configs/digits_tiny.yaml --set train.steps=50   # local Ray
    python jobs/train.py --config ... --no-ray        # plain processes (debugging), same loop

The config is validated before anything is launched; errors name the field and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (recipes in jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set adversarial.ot_scale=0.1 (repeatable)")
    p.add_argument("--no-ray", action="store_true", help="run the workers as local processes without Ray")
    p.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from advflow.platform.config import ConfigError, load_config

    try:
        spec = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(spec.to_dict(), indent=2))
        return 0
    from advflow.platform.tracking import runs as tracking

    run_id = tracking.open_run(spec, config_yaml=config_yaml(spec))
    url = tracking.run_url(spec, run_id)
    if url:
        print(f"[advflow] MLflow run: {url}", flush=True)
    try:
        ok = _train(spec, args, run_id)
    except BaseException:
        tracking.close_run(spec, run_id, ok=False)
        raise
    tracking.close_run(spec, run_id, ok=ok)
    if url:
        print(f"[advflow] MLflow run: {url}")
    return 0 if ok else 1


def config_yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(spec.to_dict())), sort_keys=False)


def _train(spec, args, run_id) -> bool:
    d, t = spec.distributed, spec.train
    print(f"[advflow] {spec.run.name}: G {spec.model.size} ({spec.model.kind}, K={spec.model.nfe}, "
          f"R={spec.model.repeats}), {t.steps} steps x global batch {t.global_batch} on {d.workers} "
          f"worker(s), ZeRO G/D {d.zero_stage_g}/{d.zero_stage_d}, data {spec.data.prefix}", flush=True)
    if args.no_ray:
        from advflow.platform.train.local_launch import latest_checkpoint, run_local

        run_dir = Path(spec.run.storage_path) / spec.run.name
        history = run_local(spec, run_dir, run_id=run_id)
        last = latest_checkpoint(run_dir)
        print(f"[advflow] done: {len(history)} steps; final D {history[-1]['d_loss']:.4f} "
              f"G {history[-1]['g_loss']:.4f}; checkpoint {last}; samples {last / 'samples.png'}")
        return True

    from advflow.platform.train.ray_launch import build_trainer, ensure_ray

    ensure_ray()
    result = build_trainer(spec, run_id=run_id).fit()
    if result.error:
        print(f"[advflow] training failed: {result.error}", file=sys.stderr)
        return False
    ckpt = result.checkpoint
    where = ckpt.path if ckpt else None
    if where and spec.run.storage_path.startswith("s3://") and not where.startswith("s3://"):
        where = "s3://" + where  # Ray reports the path inside its pyarrow S3 filesystem
    print(f"[advflow] done: final metrics D {result.metrics.get('d_loss', float('nan')):.4f} "
          f"G {result.metrics.get('g_loss', float('nan')):.4f}")
    print(f"[advflow] checkpoint: {where}")
    if where:
        print(f"[advflow] samples:    {where.rstrip('/')}/samples.png")
    return True


if __name__ == "__main__":
    sys.exit(main())
