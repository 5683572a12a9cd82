"""Sweep AFM's loss weights, learning rate, depth repetition and NFE with Ray Tune + Optuna (TPE).

    python jobs/sweep.py --config jobs/configs/digits_tiny.yaml --space jobs/configs/sweeps/digits_space.yaml --trials 16
    ray job submit --working-dir . -- python jobs/sweep.py --config ... --space ... --trials 16

The Optuna study lives in the space's `storage` (SQLite by default; a relative path is taken from
the current directory). Under `ray job submit` the job runs in a fresh copy of the working
directory, so give an absolute path (`--storage sqlite:////shared/sweeps/x.db`) or a database
server URL there, or the next submission will not find the study. Running the same command again
after the driver died resumes the sweep: finished trials are kept (and inform TPE), trials the dead
driver left running are marked failed, and only the missing trials run. At the end the best trial's
EMA generator gets the registry alias `candidate`, and this job writes an HTML report from what the
sweep returns and logs it to the sweep's parent MLflow run (`python -m advflow.dashboards.sweep_report`
rebuilds it for any study).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config every trial starts from (jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value for every trial (repeatable)")
    p.add_argument("--space", required=True, help="search space YAML (jobs/configs/sweeps/)")
    p.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    p.add_argument("--study", help="override the space's study_name")
    p.add_argument("--storage", help="override the space's Optuna storage URL (e.g. sqlite:///sweeps/x.db)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="the Ray cluster (host:port or ray://host:10001; default RAY_ADDRESS); unreachable: the sweep "
                        "fails within ADVFLOW_RAY_CONNECT_TIMEOUT_S (30 s); neither set: a private local Ray")
    p.add_argument("--report", help="where to write the HTML report (default: next to the study)")
    return p.parse_args(argv)


def write_sweep_report(spec, report, out=None) -> dict:
    """Render the sweep's HTML report from `report` (a `tune.SweepReport`) to `out` (default
    `report.out`) and log it to the sweep's parent run. Returns the summary's entries: {"report":
    path} and, when anything failed, {"report_error": why}; a report problem never fails the sweep."""
    from advflow.platform.log import get_logger
    from advflow.platform.sweep.tune import attach_report

    path = Path(out or report.out)
    entries: dict = {}
    try:
        from advflow.dashboards.sweep_report import write_report

        write_report(report.storage, report.study_name, path, metric_name=report.metric,
                     annotations=report.annotations, extra_columns=list(report.extra_columns))
        entries["report"] = str(path)
        attach_report(spec, report, path)
    except Exception as err:  # noqa: BLE001 - a report problem must not lose the sweep's results
        get_logger("jobs.sweep").warning(f"sweep report failed: {err}")
        entries["report_error"] = str(err)
    return entries


def main(argv=None) -> int:
    args = parse(argv)
    from advflow.platform.config import ConfigError, load_config
    from advflow.platform.sweep.space import SweepSpace

    try:
        if args.trials < 1:
            raise ConfigError("--trials: must be >= 1")
        spec = load_config(args.config, args.overrides)
        space = SweepSpace.load(args.space)
        if args.study:
            space.study_name = args.study
        if args.storage:
            space.storage = args.storage
    except ConfigError as err:
        print(f"[advflow] config error: {err}", file=sys.stderr)
        return 2
    from advflow.platform.outputs import OutputError, check_writable
    from advflow.platform.sweep.study import sweep_dir

    try:
        # Before Ray starts and any trial trains: the report is written only at the very end, and the
        # SQLite study and Tune's state go to the sweep's folder (beside a SQLite study, else ./sweeps).
        check_writable(args.report or space.report, "--report" if args.report else "the space's report:")
        if space.storage.startswith("sqlite:///"):
            check_writable(space.storage[len("sqlite:///"):] or None,
                           "--storage" if args.storage else "the space's storage: sqlite:///")
        check_writable(sweep_dir(space), "the sweep's folder", folder=True)
    except OutputError as err:
        print(f"[advflow] {err}", file=sys.stderr)
        return 2
    from advflow.platform.train.connect import check_configured
    from advflow.platform.train.preflight import Refused, check_dataset, check_storage

    try:  # the cluster first, as jobs/train.py does: an unreachable one is the first thing to fix
        check_configured(args.ray_address)
    except ConfigError as err:
        print(f"[advflow] config error: {err}", file=sys.stderr)
        return 2
    try:  # what every trial would otherwise find out on its workers, once per trial
        check_dataset(spec.data.prefix)
        check_storage(spec)
    except Refused as err:
        print(f"[advflow] refused: {err}", file=sys.stderr)
        return 2
    from advflow.platform.sweep.tune import run_sweep

    try:
        outcome = run_sweep(spec, space, args.trials, space_yaml=Path(args.space).read_text(),
                            ray_address=args.ray_address)
    except ConfigError as err:
        print(f"[advflow] config error: {err}", file=sys.stderr)
        return 2
    from advflow.platform.log import get_logger

    summary = {**outcome.summary, **write_sweep_report(spec, outcome.report, args.report)}
    get_logger("jobs.sweep").info("sweep summary: %s", json.dumps(summary, indent=1, default=str))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
