"""Reproduce the paper's claims on digits: one job, a fixed set of runs, one HTML report.

    python jobs/reproduce.py --config jobs/configs/digits_tiny.yaml --set data.prefix=s3://advflow/datasets/digits
    python jobs/reproduce.py ... --no-ray --steps 1000          # local processes instead of Ray Train

Every run starts from the same config (`--config` + `--set`), sees the same number of images
(`--steps` AFM iterations x 2 batches; FM takes one batch per iteration, so it runs 2 x steps) and is
evaluated the same way (the config's `eval`, at every checkpoint). The runs (names are fixed; the
report's claims refer to them):

    afm_1nfe        AFM, 1 step (also the "no phases" run of the phase comparison)
    fm              flow matching, the same DiT, evaluated at K = 1, 2, 4, 8, 16, 32 Euler steps
    afm_k2, afm_k4  multi-step AFM, K = 2 and 4
    afm_r2, afm_r4  depth-repeated 1NFE AFM, R = 2 and 4 (the compute of K = 2 and 4)
    phases_manual   AFM 1NFE with Table 11's phases placed by hand (at 50 % / 75 % of the steps)
    phases_auto     AFM 1NFE with `phases: auto`

Each run is an MLflow run nested under one parent run (found again by `--name`), trained through the
same launch as jobs/train.py. The job is resumable: results.json (under `--out`) records every
finished run, and running the same command again skips them and trains only what is missing. At
the end it writes report.html (advflow.dashboards.reproduce_report: table, eval/fd curves, grids, a
verdict per claim) next to results.json and logs both to the parent run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

EVALS = 10  # evaluations per run (the curves' points; phases: auto decides at them)
IMAGES_NOTE = "AFM: 2 batches per iteration (D and G); FM: 1 (one velocity regression step)"


def runs_for(steps: int) -> list[dict]:
    """The fixed run set: name, label, report group and the config overrides of each run."""
    fm_steps = 2 * steps  # the same images as an AFM run of `steps` iterations
    manual = [{"name": "decay", "start": 0},
              {"name": "ema", "start": steps // 2, "lr_factor": 0.8, "lambda_ot": "end", "ema_reload_every":
               max(1, steps // 20)},
              {"name": "low_lr", "start": 3 * steps // 4, "lr_factor": 0.3, "d_reload_from": "decay_end"}]
    return [
        {"name": "afm_1nfe", "label": "AFM 1NFE", "group": "afm", "set": {}},
        {"name": "fm", "label": "FM (Euler)", "group": "fm",
         "set": {"model.method": "fm", "model.kind": "multistep", "model.nfe": 32, "train.steps": fm_steps,
                 "eval.nfe": [1, 2, 4, 8, 16, 32]}},
        {"name": "afm_k2", "label": "AFM 2-step", "group": "multistep",
         "set": {"model.kind": "multistep", "model.nfe": 2}},
        {"name": "afm_k4", "label": "AFM 4-step", "group": "multistep",
         "set": {"model.kind": "multistep", "model.nfe": 4}},
        {"name": "afm_r2", "label": "AFM 1NFE, R=2", "group": "depth", "set": {"model.repeats": 2}},
        {"name": "afm_r4", "label": "AFM 1NFE, R=4", "group": "depth", "set": {"model.repeats": 4}},
        {"name": "phases_manual", "label": "AFM 1NFE, hand-placed phases", "group": "phases", "set": {},
         "phases": manual},
        {"name": "phases_auto", "label": "AFM 1NFE, phases: auto", "group": "phases",
         "set": {"phases": "auto"}},
    ]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/digits_tiny.yaml", help="the config every run starts from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every run (repeatable)")
    p.add_argument("--steps", type=int, help="AFM iterations per run (default: the config's train.steps)")
    p.add_argument("--name", default="reproduce_digits", help="the job's name: parent run and run-name prefix")
    p.add_argument("--out", default="runs/reproduce", help="where results.json and report.html go")
    p.add_argument("--only", help="comma-separated run names to train now (the report covers all)")
    p.add_argument("--no-ray", action="store_true", help="train with local processes instead of Ray Train")
    return p.parse_args(argv)


def spec_for(run: dict, args, base):
    """The run's validated spec: the base config, its overrides, and its phase list."""
    from advflow.platform.config import RunSpec, apply_override
    from advflow.trainers.schedules import Schedule

    raw = base.to_dict()
    steps = args.steps or base.train.steps
    run_steps = run["set"].get("train.steps", steps)
    every = max(1, run_steps // EVALS)  # the same images between evaluations in every run
    common = {"train.steps": steps, "train.checkpoint_every": every, "eval.every": every,
              "tracking.register_name": None,  # comparisons, not models to ship
              # phases: auto gets the hand-placed phases' contents (runs_for); only the placement differs.
              "auto_phases.patience": 2, "auto_phases.min_phase_steps": max(1, steps // 5),
              "auto_phases.ema_reload_every": max(1, steps // 20)}
    for key, value in {**common, **run["set"], "run.name": f"{args.name}_{run['name']}"}.items():
        apply_override(raw, f"{key}={json.dumps(value)}")
    if "phases" in run:
        ot = Schedule.coerce(base.adversarial.ot_scale)
        phases = []
        for p in run["phases"]:
            p = dict(p)
            if "lr_factor" in p:
                p["lr"] = base.optim.lr * p.pop("lr_factor")
            if p.get("lambda_ot") == "end":
                p["lambda_ot"] = ot.end if ot.end is not None else ot.start
            phases.append(p)
        raw["phases"] = phases
    return RunSpec.from_dict(raw)


def main(argv=None) -> int:
    args = parse(argv)
    from advflow.platform.config import ConfigError, load_config

    try:
        base = load_config(args.config, args.overrides)
        runs = runs_for(args.steps or base.train.steps)
        specs = {r["name"]: spec_for(r, args, base) for r in runs}
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from advflow.platform.outputs import OutputError, check_writable

    try:  # before any run trains: results.json and report.html go there after each run and at the end
        check_writable(Path(args.out) / args.name, "--out (with --name)", folder=True)
    except OutputError as err:
        print(err, file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(specs)
    if unknown:
        print(f"--only: unknown run(s) {sorted(unknown)}; the runs are {sorted(specs)}", file=sys.stderr)
        return 2

    from advflow.dashboards.reproduce_report import write_report
    from advflow.platform.atomic import write_text
    from advflow.platform.log import get_logger
    from advflow.platform.tracking.runs import close_run, open_parent_run, tracking_uri

    log = get_logger("jobs.reproduce")
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}, "seconds": 0.0}
    parent = open_parent_run(base, key_tag="advflow.reproduce", key=str(out.resolve()), run_name=args.name,
                             kind="reproduce", params={"steps": args.steps or base.train.steps,
                                                       "config": args.config})
    t_job = time.perf_counter()
    ok = True
    todo = [r for r in runs if (only is None or r["name"] in only) and
            done["runs"].get(r["name"], {}).get("status") != "FINISHED"]
    skipped = [r["name"] for r in runs if r["name"] in done["runs"] and r not in todo]
    if skipped:
        log.info("already finished (skipped): %s", ", ".join(skipped))
    for i, run in enumerate(todo, 1):
        spec = specs[run["name"]]
        log.info("[%d/%d] %s: %s, %d iterations", i, len(todo), run["name"], run["label"], spec.train.steps)
        record = train_one(spec, run, parent, args.no_ray, log)
        done["runs"][run["name"]] = record
        ok &= record["status"] == "FINISHED"
        write_text(results_path, json.dumps(done, indent=1))  # after every run: a killed job resumes here
    done["seconds"] = float(done.get("seconds", 0.0)) + time.perf_counter() - t_job
    write_text(results_path, json.dumps(done, indent=1))

    results = report_input(done, runs, specs, base, args, parent, out)
    report = write_report(results, out / "report.html")
    log.info("report: %s", report)
    if parent and tracking_uri(base):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(base))
        client.log_artifact(parent, str(report))
        client.log_artifact(parent, str(results_path))
        complete = all(done["runs"].get(r["name"], {}).get("status") == "FINISHED" for r in runs)
        for claim in results["claims"]:
            log.info("claim: %s -> %s", claim["claim"], claim["verdict"])
        if complete or not ok:
            close_run(base, parent, ok=ok)
    return 0 if ok else 1


def train_one(spec, run: dict, parent: str | None, no_ray: bool, log) -> dict:
    """Train one run nested under `parent`; returns its results.json record."""
    from train import config_yaml, train_local, train_on_ray

    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.tracking.runs import tracked_run

    t0 = time.perf_counter()
    record = {"status": "FAILED", "run_id": None}
    try:
        with tracked_run(spec, config_yaml=config_yaml(spec), parent_run_id=parent,
                         extra_tags={"advflow.reproduce.run": run["name"]},
                         data_tags=dataset_tags(spec.data.prefix)) as tracked:
            record["run_id"] = tracked.run_id
            tracked.ok = (train_local if no_ray else train_on_ray)(spec, tracked, log)
            record["status"] = "FINISHED" if tracked.ok else "FAILED"
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
        log.error("%s failed: %s", run["name"], str(err).strip().splitlines()[-1] if str(err).strip() else err)
    record["wall_seconds"] = time.perf_counter() - t0
    return record


def report_input(done: dict, runs: list[dict], specs: dict, base, args, parent: str | None, out: Path) -> dict:
    """The report's input (dashboards.reproduce_report): each run's final metrics, curves, grid and
    phase transitions, read back from its MLflow run."""
    from advflow.dashboards.reproduce_report import assess_claims
    from advflow.platform.tracking.runs import tracking_uri

    uri = tracking_uri(base)
    client = None
    if uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
    rows = []
    steps = args.steps or base.train.steps
    for run in runs:
        rec = done["runs"].get(run["name"], {})
        spec = specs[run["name"]]
        row = {"name": run["name"], "label": run["label"], "group": run["group"], "method": spec.model.method,
               "nfe": spec.model.nfe, "repeats": spec.model.repeats, "params": None,
               "train_seconds": None, "status": rec.get("status", "MISSING"), "run_id": rec.get("run_id"),
               "metrics": {}, "fd_at": {}, "curve": [], "curve_at": {}, "grid_png": None, "phase_transitions": []}
        if client and rec.get("run_id"):
            fill_from_mlflow(client, row, rec, spec, out)
        rows.append(row)
    # "no phases" is the plain AFM 1NFE run; the report shows it under its own name.
    none = dict(next(r for r in rows if r["name"] == "afm_1nfe"), name="phases_none",
                label="AFM 1NFE, no phases (= AFM 1NFE)", group="phases")
    rows.append(none)
    results = {"title": f"advflow reproduction on digits ({args.name})",
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parent_run_id": parent,
               "wall_seconds": done.get("seconds", 0.0), "images_per_run": 2 * steps * base.train.global_batch,
               "note": IMAGES_NOTE, "runs": rows}
    results["claims"] = assess_claims(results)
    return results


def fill_from_mlflow(client, row: dict, rec: dict, spec, out: Path) -> None:
    from advflow.platform.tracking.logger import mlflow_metric_key

    run_id = rec["run_id"]
    data = client.get_run(run_id).data

    def history(key: str) -> list[list[float]]:
        return [[m.step, m.value] for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    from advflow.platform.eval import COVERAGE_KEYS

    row["metrics"] = {k: data.metrics[k] for k in ("eval/fd", "eval/fd_floor", "eval/cls_acc", *COVERAGE_KEYS)
                      if k in data.metrics}
    row["params"] = int(data.metrics["model/g_params"]) if "model/g_params" in data.metrics else None
    row["curve"] = history("eval/fd")
    for k in spec.eval.nfe or []:
        key = mlflow_metric_key(f"eval/fd@{k}")
        if key in data.metrics:
            row["fd_at"][str(k)] = data.metrics[key]
            row["curve_at"][str(k)] = history(key)
    eval_seconds = sum(v for _, v in history("eval/seconds"))
    row["train_seconds"] = max(0.0, rec.get("wall_seconds", 0.0) - eval_seconds)
    if spec.phases == "auto":
        row["phase_transitions"] = [json.loads(v) for k, v in sorted(data.tags.items())
                                    if k.startswith("phase.transition.")]
    elif spec.phases:
        row["phase_transitions"] = [{"step": p["start"], "from": a["name"], "to": p["name"],
                                     "reason": "hand-placed"} for a, p in zip(spec.phases, spec.phases[1:])]
    try:
        grid = Path(client.download_artifacts(run_id, "samples/samples.png", str(out / "grids" / row["name"])))
        row["grid_png"] = str(grid.resolve())
    except Exception:  # noqa: BLE001 - an untracked grid: the report says "no grid"
        row["grid_png"] = None
    fd = row["metrics"].get("eval/fd")
    if fd is not None and not math.isfinite(fd):
        row["metrics"]["eval/fd"] = None


if __name__ == "__main__":
    sys.exit(main())
