"""Reproduce the paper's claims on digits: runs side by side over several seeds, one HTML report.

    python jobs/reproduce.py --config jobs/configs/digits_tiny.yaml --no-ray          # local processes
    python jobs/reproduce.py --config jobs/configs/digits_tiny.yaml                   # Ray Train (a cluster)
    python jobs/reproduce.py ... --steps 1000 --seeds 0 1 2 --only afm_1nfe,meanflow  # a subset now

Every run starts from the same config (`--config` + `--set`), is trained once per seed of `--seeds`
(`train.seed` = the seed; default 0 1 2), sees the same number of images (`--steps` AFM iterations x
2 batches, D and G; FM and MeanFlow take one batch per iteration, so they run 2 x steps) and is
evaluated the same way (the config's `eval`, at EVALS evenly spaced checkpoints). The runs (names are
fixed; the report's claims refer to them):

    afm_1nfe        AFM, 1 step (the base config; also the "no phases" run of the phase comparison)
    meanflow        MeanFlow 1NFE (model.method=meanflow, kind anystep), the same size, evaluated at K = 1, 2, 4
    meanflow_up     the same, one size up the ladder (tiny -> XXS/2 -> XS/2 -> S/2 -> B/2 -> ...)
    fm              flow matching, the same DiT, K = 4, evaluated at K = 1, 2, 4, 8 Euler steps; its EMA model
                    is registered as `<--name>-fm` (one version per seed; the only run that registers)
    cafm            CAFM post-training (model.method=cafm, multistep, K = 4) of the model the fm run of the same
                    seed registered (model.init=models:/<--name>-fm/<that run's version>, found by its MLflow
                    run id in results.json), trained after it; evaluated at K = 1, 2, 4, 8. The budget,
                    measured on digits: 1200 iterations (one update each, of D or G), cafm.warmup 200
                    D-only iterations, cafm.d_steps 4 D updates per G update, optim.lr 1e-4 (the other
                    optimizer values are the base config's), scaled with --steps (x steps / 1000). Its spec
                    is built when it runs; a seed whose fm run is missing or failed is recorded SKIPPED
                    (and retried on the next run of the job)
    afm_k2          multi-step AFM, K = 2
    afm_r2          depth-repeated 1NFE AFM, R = 2 (the compute of K = 2)
    afm_ot0         AFM 1NFE with adversarial.ot_scale = 0 (no OT term: a relativistic GAN)
    phases_manual   AFM 1NFE with Table 11's phases placed by hand (at 50 % / 75 % of the steps)
    phases_auto     AFM 1NFE with `phases: auto`

The claims (advflow.dashboards.reproduce_report.assess_claims: mean, sample std and min-max over
seeds per run; a verdict from the seed spread): AFM 1NFE beats MeanFlow 1NFE at equal size and
approaches MeanFlow one size up; AFM 1NFE beats FM at K = 1, 2, 4; R = 2 beats K = 2 at equal compute;
the OT term prevents mode collapse (afm_1nfe vs afm_ot0: diversity, recall); phases: auto is no worse
than hand-placed phases; CAFM post-training improves a flow model's few-step samples (cafm vs fm at
K = 1, 2, 4, 8: eval/fd@K decides, precision / recall / diversity @K quoted, with the budget in G and D
updates); the ImageNet-scale claims are listed as "needs ImageNet scale". Every method
uses the base config's values (no per-method tuning in this job).

Each (run, seed) is an MLflow run nested under one parent run (found again by `--out`/`--name`),
trained through the same launch as jobs/train.py. The job is resumable: results.json (under
`--out/--name`) records every finished (run, seed) as "run/s<seed>" (e.g. "afm_1nfe/s0"), and
running the same command again skips them and trains only what is missing. At the end it writes
report.html (and report_input.json, the report's input: `python -m advflow.dashboards.reproduce_report
--results report_input.json --out report.html` re-renders it) next to results.json and logs the report
and results.json to the parent run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

EVALS = 10  # evaluations per run (the curves' points; phases: auto decides at them)
SEEDS = (0, 1, 2)
# The size ladder meanflow_up climbs one rung of (trainers/sizes.py's SIZES, small to large).
LADDER = ("tiny", "XXS/2", "XS/2", "S/2", "B/2", "M/2", "L/2", "XL/2")
FEW_KS = [1, 2, 4]  # the K the MeanFlow runs are evaluated at
CAFM_KS = [1, 2, 4, 8]  # the K the FM and CAFM runs are evaluated at
# CAFM post-training budget at --steps 1000 (measured on digits), scaled linearly with --steps.
CAFM_STEPS, CAFM_WARMUP, CAFM_D_STEPS, CAFM_LR = 1200, 200, 4, 1e-4
IMAGES_NOTE = "AFM: 2 batches per iteration (D and G); FM and MeanFlow: 1 (they run 2 x steps iterations)"
TUNING_NOTE = "tuning budget: the base config's values for every method (no per-method sweep in this run)"


def size_up(size: str) -> str:
    """The next size of LADDER after `size`; ValueError for the last one or a size not on it."""
    if size not in LADDER:
        raise ValueError(f"model.size {size!r} is not on the ladder {list(LADDER)}: meanflow_up cannot go one up")
    i = LADDER.index(size)
    if i + 1 == len(LADDER):
        raise ValueError(f"model.size {size!r} is the largest on the ladder: meanflow_up has no size up")
    return LADDER[i + 1]


def cafm_budget(steps: int) -> dict:
    """The cafm run's budget for `steps` AFM iterations: {"steps", "warmup", "d_steps", "lr",
    "g_updates", "d_updates"} (the G and D updates as trainers.cafm.step_kind counts them)."""
    n, warmup = round(CAFM_STEPS * steps / 1000), max(1, round(CAFM_WARMUP * steps / 1000))
    g = sum(1 for k in range(warmup + 1, n) if k % (CAFM_D_STEPS + 1) == CAFM_D_STEPS)
    return {"steps": n, "warmup": warmup, "d_steps": CAFM_D_STEPS, "lr": CAFM_LR, "g_updates": g,
            "d_updates": n - g}


def runs_for(steps: int, size: str = "tiny") -> list[dict]:
    """The fixed run set: name, label, report group and the config overrides of each run. `steps` is
    the AFM iterations; `size` the base config's model.size (meanflow_up is one rung up from it)."""
    one_batch_steps = 2 * steps  # the same images as an AFM run of `steps` iterations
    budget = cafm_budget(steps)
    manual = [{"name": "decay", "start": 0},
              {"name": "ema", "start": steps // 2, "lr_factor": 0.8, "lambda_ot": "end", "ema_reload_every":
               max(1, steps // 20)},
              {"name": "low_lr", "start": 3 * steps // 4, "lr_factor": 0.3, "d_reload_from": "decay_end"}]
    meanflow = {"model.method": "meanflow", "model.kind": "anystep", "model.nfe": 1,
                "train.steps": one_batch_steps, "eval.nfe": FEW_KS}
    return [
        {"name": "afm_1nfe", "label": "AFM 1NFE", "group": "afm", "set": {}},
        {"name": "meanflow", "label": "MeanFlow 1NFE", "group": "meanflow", "set": dict(meanflow)},
        {"name": "meanflow_up", "label": f"MeanFlow 1NFE, {size_up(size)}", "group": "meanflow",
         "set": {**meanflow, "model.size": size_up(size)}},
        {"name": "fm", "label": "FM (Euler)", "group": "fm",
         "register": True,  # cafm post-trains the model it registers
         "set": {"model.method": "fm", "model.kind": "multistep", "model.nfe": 4, "train.steps": one_batch_steps,
                 "eval.nfe": CAFM_KS}},
        {"name": "cafm", "label": "CAFM (FM post-trained)", "group": "cafm", "after": "fm",  # model.init: lazy
         "set": {"model.method": "cafm", "model.kind": "multistep", "model.nfe": 4,
                 "train.steps": budget["steps"], "cafm.warmup": budget["warmup"], "cafm.d_steps": budget["d_steps"],
                 "optim.lr": budget["lr"], "eval.nfe": CAFM_KS}},
        {"name": "afm_k2", "label": "AFM K=2", "group": "multistep",
         "set": {"model.kind": "multistep", "model.nfe": 2}},
        {"name": "afm_r2", "label": "AFM 1NFE, R=2", "group": "depth", "set": {"model.repeats": 2}},
        {"name": "afm_ot0", "label": "AFM 1NFE, lambda_ot=0", "group": "ot", "set": {"adversarial.ot_scale": 0.0}},
        {"name": "phases_manual", "label": "AFM 1NFE, hand-placed phases", "group": "phases", "set": {},
         "phases": manual},
        {"name": "phases_auto", "label": "AFM 1NFE, phases: auto", "group": "phases",
         "set": {"phases": "auto"}},
    ]


def seed_key(name: str, seed: int) -> str:
    """results.json's key of one (run, seed): "afm_1nfe/s0"."""
    return f"{name}/s{seed}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/digits_tiny.yaml", help="the config every run starts from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every run (repeatable)")
    p.add_argument("--steps", type=int, help="AFM iterations per run (default: the config's train.steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                   help="train.seed of each repetition of every run (default: 0 1 2; a verdict needs >= 2)")
    p.add_argument("--name", default="reproduce_digits", help="the job's name: parent run and run-name prefix")
    p.add_argument("--out", default="runs/reproduce", help="where results.json and report.html go")
    p.add_argument("--only", help="comma-separated run names to train now (the report covers all)")
    p.add_argument("--no-ray", action="store_true", help="train with local processes instead of Ray Train")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: repeated seed in {args.seeds}")
    return args


def spec_for(run: dict, args, base, seed: int = 0, init: str | None = None):
    """The run's validated spec for one seed: the base config, its overrides, its phase list and
    train.seed = `seed`. A run with "register" registers its model as `<--name>-<run>`; a run with
    "after" (cafm) starts from `init` (model.init; without it a placeholder version 1 of the model
    its "after" run registers, to validate the config before anything trains)."""
    from advflow.platform.config import RunSpec, apply_override
    from advflow.trainers.schedules import Schedule

    raw = base.to_dict()
    steps = args.steps or base.train.steps
    run_steps = run["set"].get("train.steps", steps)
    every = max(1, run_steps // EVALS)  # the same images between evaluations in every run
    common = {"train.steps": steps, "train.checkpoint_every": every, "eval.every": every, "train.seed": seed,
              "tracking.register_name": None,  # comparisons, not models to ship
              # phases: auto gets the hand-placed phases' contents (runs_for); only the placement differs.
              "auto_phases.patience": 2, "auto_phases.min_phase_steps": max(1, steps // 5),
              "auto_phases.ema_reload_every": max(1, steps // 20)}
    extra = {"run.name": f"{args.name}_{run['name']}_s{seed}"}
    if run.get("register"):
        extra["tracking.register_name"] = register_name(args, run["name"])
    if run.get("after"):
        extra["model.init"] = init or f"models:/{register_name(args, run['after'])}/1"
    for key, value in {**common, **run["set"], **extra}.items():
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


def register_name(args, run_name: str) -> str:
    """The registered model a run registers its EMA generator as: "<--name>-<run>"."""
    return f"{args.name}-{run_name}"


def registered_version(client, run_id: str, name: str) -> str | None:
    """The (latest) version of registered model `name` that MLflow run `run_id` registered, or None."""
    versions = [mv for mv in client.search_model_versions(f"run_id='{run_id}'") if mv.name == name]
    return str(max(int(mv.version) for mv in versions)) if versions else None


def init_for(run: dict, seed: int, done: dict, args, client) -> tuple[str | None, str]:
    """(model.init of a lazy run, e.g. "models:/reproduce_digits-fm/3", or None, why not): the version
    its "after" run of the same seed registered, found by that run's MLflow run id in results.json."""
    after = run["after"]
    rec = done["runs"].get(seed_key(after, seed), {})
    status = rec.get("status", "MISSING")
    if status != "FINISHED":
        return None, f"{seed_key(after, seed)} is {status}"
    if not rec.get("run_id"):
        return None, f"{seed_key(after, seed)} has no MLflow run id"
    if client is None:
        return None, "no MLflow tracking URI to find the registered model in"
    name = register_name(args, after)
    try:
        version = registered_version(client, rec["run_id"], name)
    except Exception as err:  # noqa: BLE001 - an unreachable registry skips this seed, not the job
        return None, f"looking up {name} of run {rec['run_id']} failed: {err}"
    if version is None:
        return None, f"{seed_key(after, seed)} (run {rec['run_id']}) registered no version of {name}"
    return f"models:/{name}/{version}", ""


def plan(runs: list[dict], seeds: list[int], done: dict, only: set[str] | None) -> tuple[list, list[str]]:
    """(the (run, seed) pairs to train now, the keys skipped because they finished before)."""
    todo, skipped = [], []
    for run in runs:
        if only is not None and run["name"] not in only:
            continue
        for seed in seeds:
            key = seed_key(run["name"], seed)
            if done["runs"].get(key, {}).get("status") == "FINISHED":
                skipped.append(key)
            else:
                todo.append((run, seed))
    return todo, skipped


def main(argv=None) -> int:
    args = parse(argv)
    from advflow.platform.config import ConfigError, load_config

    try:
        base = load_config(args.config, args.overrides)
        runs = runs_for(args.steps or base.train.steps, base.model.size)
        specs = {(r["name"], s): spec_for(r, args, base, s) for r in runs for s in args.seeds}
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from advflow.platform.outputs import OutputError, check_writable

    try:  # before any run trains: results.json and report.html go there after each run and at the end
        check_writable(Path(args.out) / args.name, "--out (with --name)", folder=True)
    except OutputError as err:
        print(err, file=sys.stderr)
        return 2
    names = [r["name"] for r in runs]
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(names)
    if unknown:
        print(f"--only: unknown run(s) {sorted(unknown)}; the runs are {sorted(names)}", file=sys.stderr)
        return 2

    from advflow.dashboards.reproduce_report import write_report
    from advflow.platform.atomic import write_text
    from advflow.platform.log import get_logger
    from advflow.platform.tracking.runs import close_run, open_parent_run, tracking_uri

    log = get_logger("jobs.reproduce")
    if len(args.seeds) < 2:
        log.warning("--seeds %s: a claim needs >= 2 finished seeds per run (3 recommended); the report will "
                    "say 'incomplete'", args.seeds)
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}, "seconds": 0.0}
    parent = open_parent_run(base, key_tag="advflow.reproduce", key=str(out.resolve()), run_name=args.name,
                             kind="reproduce", params={"steps": args.steps or base.train.steps,
                                                       "config": args.config})
    t_job = time.perf_counter()
    ok = True
    todo, skipped = plan(runs, args.seeds, done, only)
    if skipped:
        log.info("already finished (skipped): %s", ", ".join(skipped))
    registry = None
    if tracking_uri(base):
        from mlflow.tracking import MlflowClient

        registry = MlflowClient(tracking_uri(base))
    for i, (run, seed) in enumerate(todo, 1):
        if run.get("after"):  # built now: it starts from the model its "after" run of this seed registered
            init, why = init_for(run, seed, done, args, registry)
            if init is None:
                log.warning("[%d/%d] %s seed %d skipped: %s", i, len(todo), run["name"], seed, why)
                done["runs"][seed_key(run["name"], seed)] = {"status": "SKIPPED", "run_id": None, "seed": seed,
                                                            "reason": why}
                ok = False
                write_text(results_path, json.dumps(done, indent=1))
                continue
            try:
                specs[(run["name"], seed)] = spec_for(run, args, base, seed, init=init)
            except (ConfigError, ValueError) as err:
                print(f"config error: {err}", file=sys.stderr)
                return 2
        spec = specs[(run["name"], seed)]
        log.info("[%d/%d] %s seed %d: %s, %s, %d iterations", i, len(todo), run["name"], seed, run["label"],
                 spec.model.size, spec.train.steps)
        record = train_one(spec, run, seed, parent, args.no_ray, log)
        done["runs"][seed_key(run["name"], seed)] = record
        ok &= record["status"] == "FINISHED"
        write_text(results_path, json.dumps(done, indent=1))  # after every run: a killed job resumes here
    done["seconds"] = float(done.get("seconds", 0.0)) + time.perf_counter() - t_job
    write_text(results_path, json.dumps(done, indent=1))

    results = report_input(done, runs, specs, base, args, parent, out)
    write_text(out / "report_input.json", json.dumps(results, indent=1))  # re-render: reproduce_report --results
    report = write_report(results, out / "report.html")
    log.info("report: %s", report)
    for claim in results["claims"]:
        log.info("claim: %s -> %s", claim["claim"], claim["verdict"])
    if parent and tracking_uri(base):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(base))
        client.log_artifact(parent, str(report))
        client.log_artifact(parent, str(results_path))
        complete = all(done["runs"].get(seed_key(r["name"], s), {}).get("status") == "FINISHED"
                       for r in runs for s in args.seeds)
        if complete or not ok:
            close_run(base, parent, ok=ok)
    return 0 if ok else 1


def train_one(spec, run: dict, seed: int, parent: str | None, no_ray: bool, log) -> dict:
    """Train one (run, seed) nested under `parent`; returns its results.json record."""
    from train import config_yaml, train_local, train_on_ray

    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.tracking.runs import tracked_run

    t0 = time.perf_counter()
    record = {"status": "FAILED", "run_id": None, "seed": seed}
    try:
        with tracked_run(spec, config_yaml=config_yaml(spec), parent_run_id=parent,
                         extra_tags={"advflow.reproduce.run": run["name"], "advflow.reproduce.seed": str(seed)},
                         data_tags=dataset_tags(spec.data.prefix)) as tracked:
            record["run_id"] = tracked.run_id
            tracked.ok = (train_local if no_ray else train_on_ray)(spec, tracked, log)
            record["status"] = "FINISHED" if tracked.ok else "FAILED"
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
        log.error("%s seed %d failed: %s", run["name"], seed,
                  str(err).strip().splitlines()[-1] if str(err).strip() else err)
    record["wall_seconds"] = time.perf_counter() - t0
    return record


def report_input(done: dict, runs: list[dict], specs: dict, base, args, parent: str | None, out: Path) -> dict:
    """The report's input (dashboards.reproduce_report.build_report): per run its settings and one
    row per seed (final metrics, per-K metrics, curves, grid, phase transitions, read back from its
    MLflow run)."""
    from advflow.dashboards.reproduce_report import assess_claims
    from advflow.platform.tracking.runs import tracking_uri

    uri = tracking_uri(base)
    client = None
    if uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
    steps = args.steps or base.train.steps
    rows = []
    for run in runs:
        spec0 = specs[(run["name"], args.seeds[0])]
        row = {"name": run["name"], "label": run["label"], "group": run["group"], "method": spec0.model.method,
               "size": spec0.model.size, "nfe": spec0.model.nfe, "repeats": spec0.model.repeats,
               "steps": spec0.train.steps, "eval_nfe": list(spec0.eval.nfe or []), "seeds": []}
        for seed in args.seeds:
            rec = done["runs"].get(seed_key(run["name"], seed), {})
            srow = {"seed": seed, "status": rec.get("status", "MISSING"), "run_id": rec.get("run_id"),
                    "reason": rec.get("reason"),
                    "params": None, "train_seconds": None, "metrics": {}, "curve": [], "curve_at": {},
                    "grid_png": None, "phase_transitions": []}
            if client and rec.get("run_id"):
                fill_from_mlflow(client, srow, rec, specs[(run["name"], seed)], out / "grids" / run["name"])
            row["seeds"].append(srow)
        rows.append(row)
    sizes = sorted({r["size"] for r in rows}, key=lambda s: LADDER.index(s) if s in LADDER else len(LADDER))
    results = {"title": f"advflow reproduction on digits ({args.name})",
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parent_run_id": parent,
               "wall_seconds": done.get("seconds", 0.0), "images_per_run": 2 * steps * base.train.global_batch,
               "steps": steps, "seeds": list(args.seeds), "sizes": sizes, "base_size": base.model.size,
               "note": IMAGES_NOTE, "tuning": TUNING_NOTE, "cafm_budget": cafm_budget(steps), "runs": rows}
    results["claims"] = assess_claims(results)
    return results


def fill_from_mlflow(client, row: dict, rec: dict, spec, grids: Path) -> None:
    """One seed's row from its MLflow run: final metrics (eval/fd, coverage, and per K `eval/fd@K`,
    `eval/precision@K`, ...), the eval/fd curve (and per K), parameters, training time, the sample grid
    (under `grids`/s<seed>) and the phase transitions."""
    from advflow.platform.eval import COVERAGE_KEYS
    from advflow.platform.tracking.logger import mlflow_metric_key

    run_id = rec["run_id"]
    data = client.get_run(run_id).data

    def history(key: str) -> list[list[float]]:
        return [[m.step, m.value] for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    def finite(v):
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    keys = ("eval/fd", "eval/fd_floor", "eval/cls_acc", *COVERAGE_KEYS)
    row["metrics"] = {k: finite(data.metrics[k]) for k in keys if k in data.metrics}
    row["params"] = int(data.metrics["model/g_params"]) if "model/g_params" in data.metrics else None
    row["curve"] = history("eval/fd")
    for k in spec.eval.nfe or []:
        for key in ("eval/fd", *COVERAGE_KEYS):
            logged = mlflow_metric_key(f"{key}@{k}")
            if logged in data.metrics:
                row["metrics"][f"{key}@{k}"] = finite(data.metrics[logged])
        if mlflow_metric_key(f"eval/fd@{k}") in data.metrics:
            row["curve_at"][str(k)] = history(mlflow_metric_key(f"eval/fd@{k}"))
    eval_seconds = sum(v for _, v in history("eval/seconds"))
    row["train_seconds"] = max(0.0, rec.get("wall_seconds", 0.0) - eval_seconds)
    if spec.phases == "auto":
        row["phase_transitions"] = [json.loads(v) for k, v in sorted(data.tags.items())
                                    if k.startswith("phase.transition.")]
    elif spec.phases:
        row["phase_transitions"] = [{"step": p["start"], "from": a["name"], "to": p["name"],
                                     "reason": "hand-placed"} for a, p in zip(spec.phases, spec.phases[1:])]
    try:
        grid = Path(client.download_artifacts(run_id, "samples/samples.png", str(grids / f"s{row['seed']}")))
        row["grid_png"] = str(grid.resolve())
    except Exception:  # noqa: BLE001 - an untracked grid: the report says "no grid"
        row["grid_png"] = None


if __name__ == "__main__":
    sys.exit(main())
