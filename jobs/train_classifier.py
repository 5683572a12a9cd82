"""Train the time-conditioned classifier for classifier guidance (the paper's phase 4) on Ray Train
+ DeepSpeed, from the same latent shards as the AFM job.

    ray job submit --working-dir . -- python jobs/train_classifier.py --config jobs/configs/digits_classifier.yaml
    python jobs/train_classifier.py --config jobs/configs/digits_classifier.yaml --set train.steps=100   # local Ray
    python jobs/train_classifier.py --config ... --no-ray        # plain processes (debugging), same loop

The lifecycle: validate the config (errors name the field and the fix) -> open or re-find the job's
MLflow run -> train on Ray (or local processes) -> close the run FINISHED or FAILED. With
`tracking.register_name`, the EMA classifier is registered (pickle-free); load it for guidance with
`advflow.platform.tracking.registry.load_classifier("models:/NAME/VERSION")`, or from a checkpoint
directory of this job.
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
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="the Ray cluster (host:port or ray://host:10001; default RAY_ADDRESS). Unreachable: the job "
                        "fails within ADVFLOW_RAY_CONNECT_TIMEOUT_S (30 s). Neither set: a private local Ray")
    p.add_argument("--no-ray", action="store_true", help="run the workers as local processes without Ray")
    p.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from advflow.platform.config_classifier import ConfigError, load_classifier_config

    try:
        spec = load_classifier_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(spec.to_dict(), indent=2))
        return 0
    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.log import get_logger
    from advflow.platform.tracking.runs import tracked_run

    log = get_logger("jobs.train_classifier")
    c, t, d, o = spec.classifier, spec.train, spec.distributed, spec.optim
    log.info(f"{spec.run.name}: classifier {c.size}, t ~ U{tuple(c.t_range)}, {t.steps} steps x global batch "
             f"{t.global_batch} on {d.workers} worker(s), ZeRO {d.zero_stage}, lr {o.lr:g}, EMA {o.ema_decay:g}, "
             f"data {spec.data.prefix}")
    if not args.no_ray:
        from advflow.platform.train.ray_launch import connect_driver

        if not connect_driver(args.ray_address):  # before the MLflow run opens
            return 2
    tags = {"mlflow.source.name": "jobs/train_classifier.py", "advflow.kind": "classifier"}
    with tracked_run(spec, config_yaml=config_yaml(spec), data_tags=dataset_tags(spec.data.prefix),
                     extra_tags=tags) as run:
        if run.url:
            log.info("MLflow run: %s", run.url)
        run.ok = (train_local if args.no_ray else train_on_ray)(spec, run.run_id, log)
    if run.url:
        log.info("MLflow run: %s", run.url)
    return 0 if run.ok else 1


def config_yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(spec.to_dict())), sort_keys=False)


def _summary(metrics: dict) -> str:
    nan = float("nan")
    accs = " ".join(f"{k.removeprefix('eval/acc_')} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/acc_"))
    return (f"loss {metrics.get('loss', nan):.4f} acc {metrics.get('acc', nan):.3f}"
            + (f"; EMA accuracy {accs}" if accs else ""))


def train_local(spec, run_id, log) -> bool:
    from advflow.platform.train.classifier import ENTRY
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    run_dir = Path(spec.run.storage_path) / spec.run.name
    history = run_local(spec, run_dir, run_id=run_id, entry=ENTRY)
    last = latest_checkpoint(run_dir)
    log.info(f"done: {len(history)} steps; {_summary(history[-1])}; checkpoint {last}")
    return True


def train_on_ray(spec, run_id, log) -> bool:
    from advflow.platform.train.classifier import ENTRY, ClassifierProgressMeter
    from advflow.platform.train.ray_launch import build_torch_trainer, checkpoint_uri, ensure_ray, fit

    ensure_ray()
    meter = ClassifierProgressMeter(spec.train.steps, spec.train.global_batch)
    result = fit(build_torch_trainer(spec, run_id=run_id, entry=ENTRY, meter=meter), spec, log)
    if result is None:
        return False
    log.info(f"done: final metrics {_summary(result.metrics or {})}")
    log.info("checkpoint: %s", checkpoint_uri(spec, result.checkpoint))
    return True


if __name__ == "__main__":
    sys.exit(main())
