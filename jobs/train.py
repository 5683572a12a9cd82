"""Train any method of the platform (`model.method`: afm, fm, meanflow, classifier) on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/digits_tiny.yaml
    python jobs/train.py --config jobs/configs/digits_tiny.yaml --set train.steps=50   # local Ray
    python jobs/train.py --config ... --no-ray        # plain processes (debugging), same loop
    python jobs/train.py --config jobs/configs/digits_classifier.yaml   # the guidance classifier

The lifecycle: validate the config (errors name the field and the fix) -> check before launch
(platform/train/preflight.py: the dataset, the run's storage, a resume's checkpoint and settings, the
cluster; a refusal is one line `[advflow] refused: ...`, exit 2, recorded as an attempt on the job's
existing MLflow run without changing its status) -> open or re-find the job's MLflow run -> train on
Ray (or local processes) -> close the run FINISHED or FAILED.
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
    from advflow.platform.log import get_logger
    from advflow.platform.tracking.runs import tracked_run

    log = get_logger("jobs.train")
    log.info(f"{spec.run.name}: {describe(spec)}")
    if not args.no_ray:
        from advflow.platform.train.ray_launch import connect_driver

        if not connect_driver(args.ray_address):  # before the MLflow run opens
            return 2
    findings = preflight(spec, ray=not args.no_ray, log=log)
    if findings is None:
        return 2
    with tracked_run(spec, config_yaml=config_yaml(spec), data_tags=findings.data_tags) as run:
        if run.url:
            log.info("MLflow run: %s", run.url)
        resuming = findings.resume_line(run.attempt)
        if resuming:
            log.info(resuming)
        run.ok = (train_local if args.no_ray else train_on_ray)(spec, run, log)
    if run.url:
        log.info("MLflow run: %s", run.url)
    return 0 if run.ok else 1


def preflight(spec, *, ray: bool, log):
    """The checks before launch (platform/train/preflight.py), before the MLflow run is opened or
    changed and before any worker starts: their findings, or None after one line
    `[advflow] refused: <what, the value(s), the fix>` (the refusal is recorded as an attempt on the
    job's existing run, whose status stays as it was)."""
    import time

    from advflow.platform.tracking.runs import find_run, record_refusal
    from advflow.platform.train.preflight import Refused, cluster_facts, run_preflight

    t0 = time.perf_counter()
    previous = find_run(spec)  # read only
    try:
        findings = run_preflight(spec, ray=ray, previous_run=previous, cluster=cluster_facts() if ray else None)
    except Refused as err:
        print(f"[advflow] refused: {err}", file=sys.stderr)
        record_refusal(spec, str(err), previous)
        return None
    log.info("preflight: passed in %.2f s (%s)", time.perf_counter() - t0,
             ", ".join(f"{k} {v:.2f} s" for k, v in findings.seconds.items()))
    return findings


def describe(spec) -> str:
    """One line: the method, its network and the run's shape."""
    d, t, m = spec.distributed, spec.train, spec.model
    if m.method == "classifier":
        net = f"classifier {m.size}, t ~ U{tuple(spec.classifier.t_range)}, ZeRO {d.zero_stage_g}"
    elif m.method in ("fm", "meanflow"):
        net = f"G {m.size} ({m.kind}, K={m.nfe}, R={m.repeats}), ZeRO {d.zero_stage_g}"
    elif m.method == "cafm":
        c = spec.cafm
        net = (f"G {m.size} ({m.kind}, K={m.nfe}) from {m.init}, ZeRO G/D {d.zero_stage_g}/{d.zero_stage_d}; "
               f"steps are optimizer updates of D or G ({c.warmup} D-only, then {c.d_steps} D per G)")
    else:
        net = f"G {m.size} ({m.kind}, K={m.nfe}, R={m.repeats}), ZeRO G/D {d.zero_stage_g}/{d.zero_stage_d}"
    return (f"{m.method.upper()} {net}, {t.steps} steps x global batch {t.global_batch} on {d.workers} worker(s), "
            f"data {spec.data.prefix}")


def summary(spec, metrics: dict) -> str:
    """The method's losses (and the classifier's EMA accuracy) from a metrics dict."""
    from advflow.platform.train.methods import METHODS

    out = METHODS[spec.model.method].names.line(metrics)
    accs = " ".join(f"{k.removeprefix('eval/acc_')} {v:.3f}" for k, v in metrics.items() if k.startswith("eval/acc_"))
    return out + (f"; EMA accuracy {accs}" if accs else "")


def printed_config(spec) -> str:
    """The validated config as YAML, headed by the unit every step count is in."""
    import textwrap

    from advflow.platform.config import UNITS

    t = spec.train
    updates = 2 if spec.model.method == "afm" else 1  # AFM: a D and a G update per iteration
    head = (f"{UNITS} This run: {t.steps} iterations x {updates} x {t.global_batch} samples = "
            f"{updates * t.steps * t.global_batch:,} samples seen.")
    return "\n".join("# " + line for line in textwrap.wrap(head, 98)) + "\n" + config_yaml(spec)


def config_yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(spec.to_dict())), sort_keys=False)


def note_refusal(run, cause: str) -> None:
    """Mark the attempt refused when the workers refused to resume (a ResumeError: a checkpoint
    check, the last line of defence behind preflight): such an attempt trained nothing, so
    `tracked_run` records it REFUSED and leaves the run's status as it was (FINISHED stays FINISHED).
    `run`: the TrackedRun. The cause is the one-line text of a worker's exception (it crossed a
    process boundary), which names its class: `ResumeError: ...` or `rank 0: ResumeError: ...`."""
    if "ResumeError" in cause:
        run.refused = cause


def train_local(spec, run, log) -> bool:
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    run_dir = Path(spec.run.storage_path) / spec.run.name
    try:
        history = run_local(spec, run_dir, run_id=run.run_id)
    except Exception as err:  # noqa: BLE001 - a worker process failed: one line, the traceback in a file
        from advflow.platform.train.failures import one_line

        trace = run_dir / "failures" / "local.txt"
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(str(err))
        log.error("training failed: %s (traceback: %s)", one_line(err), trace)
        note_refusal(run, one_line(err))
        return False
    last = latest_checkpoint(run_dir)
    samples = f"; samples {last / 'samples.png'}" if (last / "samples.png").is_file() else ""
    log.info(f"done: {len(history)} steps; final {summary(spec, history[-1] if history else {})}; "
             f"checkpoint {last}{samples}")
    return True


def train_on_ray(spec, run, log) -> bool:
    from advflow.platform.train.ray_launch import build_torch_trainer, checkpoint_uri, ensure_ray, fit

    ensure_ray()
    causes: list[str] = []
    result = fit(build_torch_trainer(spec, run_id=run.run_id), spec, log, causes=causes)  # prints the one failure line
    if result is None:
        note_refusal(run, causes[0] if causes else "")
        return False
    log.info(f"done: final metrics {summary(spec, result.metrics or {})}")
    where = checkpoint_uri(spec, result.checkpoint)
    log.info("checkpoint: %s", where)
    if where and spec.model.method != "classifier":  # the classifier draws no samples
        log.info("samples:    %s/samples.png", where.rstrip("/"))
    return True


if __name__ == "__main__":
    sys.exit(main())
