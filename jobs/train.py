"""Train an AFM generator/discriminator pair on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/digits_tiny.yaml
    python jobs/train.py --config jobs/configs/digits_tiny.yaml --set train.steps=50   # local Ray
    python jobs/train.py --config ... --no-ray        # plain processes (debugging), same loop

The lifecycle: validate the config (errors name the field and the fix) -> open or re-find the job's
MLflow run -> train on Ray (or local processes) -> close the run FINISHED or FAILED.
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
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="the Ray cluster (host:port or ray://host:10001; default RAY_ADDRESS). Unreachable: the job "
                        "fails within ADVFLOW_RAY_CONNECT_TIMEOUT_S (30 s). Neither set: a private local Ray")
    p.add_argument("--no-ray", action="store_true", help="run the workers as local processes without Ray")
    p.add_argument("--print-config", action="store_true",
                   help="print the validated config (YAML, with its step units) and exit")
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
        print(printed_config(spec))
        return 0
    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.log import get_logger
    from advflow.platform.tracking.runs import tracked_run

    log = get_logger("jobs.train")
    d, t, m = spec.distributed, spec.train, spec.model
    log.info(f"{spec.run.name}: {m.method.upper()} G {m.size} ({m.kind}, K={m.nfe}, R={m.repeats}), {t.steps} steps x global batch "
             f"{t.global_batch} on {d.workers} worker(s), ZeRO G/D {d.zero_stage_g}/{d.zero_stage_d}, "
             f"data {spec.data.prefix}")
    if not args.no_ray:
        from advflow.platform.train.ray_launch import connect_driver

        if not connect_driver(args.ray_address):  # before the MLflow run opens
            return 2
    with tracked_run(spec, config_yaml=config_yaml(spec), data_tags=dataset_tags(spec.data.prefix)) as run:
        if run.url:
            log.info("MLflow run: %s", run.url)
        run.ok = (train_local if args.no_ray else train_on_ray)(spec, run.run_id, log)
    if run.url:
        log.info("MLflow run: %s", run.url)
    return 0 if run.ok else 1


def printed_config(spec) -> str:
    """The validated config as YAML, headed by the unit every step count is in."""
    import textwrap

    from advflow.platform.config import UNITS

    t = spec.train
    head = (f"{UNITS} This run: {t.steps} iterations x 2 x {t.global_batch} samples = "
            f"{2 * t.steps * t.global_batch:,} samples seen.")
    return "\n".join("# " + line for line in textwrap.wrap(head, 98)) + "\n" + config_yaml(spec)


def config_yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(spec.to_dict())), sort_keys=False)


def train_local(spec, run_id, log) -> bool:
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    run_dir = Path(spec.run.storage_path) / spec.run.name
    try:
        history = run_local(spec, run_dir, run_id=run_id)
    except Exception as err:  # noqa: BLE001 - a worker process failed: one line, the traceback in a file
        from advflow.platform.train.failures import one_line

        trace = run_dir / "failures" / "local.txt"
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(str(err))
        log.error("training failed: %s (traceback: %s)", one_line(err), trace)
        return False
    last = latest_checkpoint(run_dir)
    last_row = history[-1] if history else {}
    losses = " ".join(f"{k} {last_row[k]:.4f}" for k in ("d_loss", "g_loss", "fm_loss") if k in last_row)
    log.info(f"done: {len(history)} steps; final {losses}; checkpoint {last}; samples {last / 'samples.png'}")
    return True


def train_on_ray(spec, run_id, log) -> bool:
    from advflow.platform.train.ray_launch import build_torch_trainer, checkpoint_uri, ensure_ray, fit

    ensure_ray()
    result = fit(build_torch_trainer(spec, run_id=run_id), spec, log)  # prints the one failure line
    if result is None:
        return False
    losses = " ".join(f"{k} {result.metrics[k]:.4f}" for k in ("d_loss", "g_loss", "fm_loss") if k in result.metrics)
    log.info(f"done: final metrics {losses}")
    where = checkpoint_uri(spec, result.checkpoint)
    log.info("checkpoint: %s", where)
    if where:
        log.info("samples:    %s/samples.png", where.rstrip("/"))
    return True


if __name__ == "__main__":
    sys.exit(main())
