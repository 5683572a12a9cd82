"""Mark MLflow runs whose driver died as KILLED, with the time.

    python jobs/stale_runs.py [--dry-run] [--experiment NAME ...]

A driver that is SIGKILLed (or whose Ray job is stopped) cannot close its run, which then stays
RUNNING with no end time. This command looks at every RUNNING run of the tracking server
(MLFLOW_TRACKING_URI) and asks whether its driver still lives: the run's latest Ray submission id
(tag `ray.submission_id`) through Ray's job API (RAY_API_SERVER_ADDRESS / RAY_ADDRESS; the local
stack's `advflow stack env` exports them), else the driver's pid recorded on this host (tag
`advflow.driver`). A dead driver's run gets status KILLED, its end time and the tags
`advflow.attempt.<n>.ended` and `advflow.killed` (when and why). Runs it cannot judge are left as
they are. One line per RUNNING run, then a summary; --dry-run changes nothing. Exit 0, or 2 on a
usage error (no tracking URI).

A resubmitted job records the same on its own (`tracking.runs.find_or_create_run`); this command is
for runs nobody resubmits.
"""

from __future__ import annotations

import argparse
import sys


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="report what would be marked, change nothing")
    p.add_argument("--experiment", action="append", default=[], help="only these experiments (repeatable)")
    return p.parse_args(argv)


def ray_job_status_fn():
    """A function submission id -> Ray job status name, or None when Ray cannot say (no address,
    unreachable, unknown to this cluster). None when no Ray address is configured at all."""
    import os

    address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    from advflow.platform.log import get_logger

    log = get_logger("jobs.stale_runs")
    clients = {}

    def status(submission_id: str):
        try:
            if "c" not in clients:
                from ray.job_submission import JobSubmissionClient

                clients["c"] = JobSubmissionClient(address)
            return str(clients["c"].get_job_status(submission_id).value)
        except Exception as err:  # unreachable or unknown id: judge by the pid instead
            log.debug("Ray job status of %s: %s", submission_id, err)
            return None

    return status


def main(argv=None) -> int:
    args = parse(argv)
    from advflow.platform.log import get_logger
    from advflow.platform.tracking.runs import TrackingURIMissing, require_tracking_uri, sweep_stale_runs

    log = get_logger("jobs.stale_runs")
    try:
        uri = require_tracking_uri("jobs/stale_runs.py")
    except TrackingURIMissing as err:
        log.error("%s", err)
        return 2
    from mlflow.tracking import MlflowClient

    found = sweep_stale_runs(MlflowClient(uri), ray_job_status_fn(), dry_run=args.dry_run,
                             experiments=args.experiment or None)
    word = {"dead": "would mark KILLED" if args.dry_run else "KILLED", "alive": "alive", "unknown": "left as is"}
    for r in found:
        print(f"{word[r.verdict]}: run {r.run_id} ({r.experiment}/{r.name}): {r.reason}")
    dead = sum(r.verdict == "dead" for r in found)
    alive = sum(r.verdict == "alive" for r in found)
    unknown = len(found) - dead - alive
    log.info("%d RUNNING run(s): %d %s, %d alive, %d undetermined", len(found), dead,
             "would be marked KILLED (dry run)" if args.dry_run else "marked KILLED", alive, unknown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
