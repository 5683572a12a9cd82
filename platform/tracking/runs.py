"""MLflow runs: one run per training job, continued across restarts; only rank 0 logs.

Who does what:
- The driver (`jobs/train.py`, or a sweep trial) enters `tracked_run(spec, ...)` before any worker
  starts. It finds the run of this job by its key (storage path + run name, the same identity Ray
  Train uses to resume from storage) or creates it (`open_run`), logs params, tags and the config
  YAML, and hands the run id to the workers. A worker group restarted by Ray Train after a failure,
  or a re-submitted job, therefore continues the same MLflow run, and no worker ever creates one.
  On leaving, the run is marked FINISHED when the body set `.ok`, else FAILED (`close_run`).
- Global rank 0 of the worker group logs to that run id through `tracking.logger.run_logger`.
- A sweep groups its trials' runs under one parent run (`open_parent_run`, found again by its key
  when the sweep driver restarts).
- Attempts: every driver that opens (or re-finds) a run is one attempt (tag `advflow.attempt` = n).
  A driver that dies (SIGKILL, `ray job stop`) cannot close its run, so the run would stay RUNNING
  with no end time. Whoever notices first records the death: the next driver that finds the run
  (`find_or_create_run`: tag `advflow.attempt.<n>.ended` = "KILLED at <time> ..."), or
  `jobs/stale_runs.py` (`sweep_stale_runs`: status KILLED + end time, and the same tag). Each driver
  records how to tell whether it is still alive: its Ray submission id (every one is kept in
  `ray.submission_ids`, the latest in `ray.submission_id`) and `advflow.driver` (host, pid, start).
- Refusals: a submission refused before launch (`train/preflight.py`) that concerns an existing run
  is an attempt too (`record_refusal`: `advflow.attempt.<n>.ended` = "REFUSED at <time>: <reason>"),
  and leaves the run's status, end time, params and driver tags as they were; so does a resume the
  workers refuse (`TrackedRun.refused`, `close_refused`): a FINISHED run stays FINISHED.

The rest of tracking/: `secrets` (what is masked before anything is logged), `provenance` (git
commit, Ray submission id, advflow version tags), `logger` (rank 0's RunLogger), `registry` and
`model_format` (registered generators). The dataset's provenance tags come from the caller
(`advflow.platform.data.shards.dataset_tags`): tracking does not read the dataset.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from advflow.platform.config import RunSpec, flatten
from advflow.platform.log import get_logger
from advflow.platform.tracking.provenance import advflow_version, git_commit, ray_submission_id
from advflow.platform.tracking.secrets import scrub, secret_values

RUN_KEY_TAG = "advflow.run_key"
ATTEMPT_TAG = "advflow.attempt"
DRIVER_TAG = "advflow.driver"
SUBMISSION_TAG = "ray.submission_id"
SUBMISSIONS_TAG = "ray.submission_ids"
TAG_LIMIT = 5000  # MLflow's tag value limit (characters)
log = get_logger(__name__)


def tracking_uri(spec: RunSpec) -> str | None:
    if not spec.tracking.enabled:
        return None
    return spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class TrackingURIMissing(ValueError):
    """A command that needs the MLflow server was started without MLFLOW_TRACKING_URI."""


def require_tracking_uri(what: str) -> str:
    """MLFLOW_TRACKING_URI, or TrackingURIMissing naming the variable and the fix.

    Why refuse rather than let MLflow default: without a URI MLflow 3 silently opens (and creates)
    ./mlflow.db in the current folder, where no registered model exists; the user then reads
    "model not found" about a model that is on their server, and finds a stray database later."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise TrackingURIMissing(
            f"{what} needs the MLflow tracking server, but MLFLOW_TRACKING_URI is not set; set it, e.g. "
            "`eval \"$(advflow stack env)\"` for the local stack or `export MLFLOW_TRACKING_URI=http://HOST:PORT`")
    return uri


def run_key(spec: RunSpec) -> str:
    """The job's identity, shared with Ray Train's resume-from-storage (storage_path/name)."""
    return f"{spec.run.storage_path.rstrip('/')}/{spec.run.name}"


# ----------------------------------------------------------------------------------------- driver


@dataclass
class TrackedRun:
    """The driver's view of its run inside `tracked_run`: set `.ok = True` when the job succeeded."""

    run_id: str | None
    """The MLflow run id (None: untracked)."""
    url: str | None
    """The run's page on an HTTP tracking server (None: untracked or not an HTTP server)."""
    ok: bool = False
    attempt: int | None = None
    """This driver's attempt number (`advflow.attempt`; None: untracked)."""
    refused: str | None = None
    """Set by the body when the workers refused to resume (a checkpoint check, not a training
    failure): the run is then closed as it was before this attempt (a FINISHED run stays
    FINISHED) with the attempt recorded REFUSED, see `close_refused`."""
    previous_status: str | None = None
    previous_end_time: int | None = None


@contextmanager
def tracked_run(spec: RunSpec, *, config_yaml: str | None = None, parent_run_id: str | None = None,
                extra_tags: dict[str, str] | None = None,
                data_tags: dict[str, str] | None = None) -> Iterator[TrackedRun]:
    """Open (or find again) this job's run for the body, then close it: FINISHED if the body set
    `.ok`, FAILED if not or if it raised (the exception propagates). Untracked: run_id None.

    data_tags: the dataset's provenance (`advflow.platform.data.shards.dataset_tags(spec.data.prefix)`)."""
    opened = _open_run(spec, config_yaml=config_yaml, parent_run_id=parent_run_id, extra_tags=extra_tags,
                       data_tags=data_tags)
    run_id = opened.run_id if opened else None
    run = TrackedRun(run_id=run_id, url=run_url(spec, run_id), attempt=opened.attempt if opened else None,
                     previous_status=opened.previous_status if opened else None,
                     previous_end_time=opened.previous_end_time if opened else None)
    try:
        yield run
    except BaseException:
        close_run(spec, run_id, ok=False)
        raise
    if run.refused and not run.ok:
        close_refused(spec, run)
    else:
        close_run(spec, run_id, ok=run.ok)


@dataclass
class _Opened:
    run_id: str
    attempt: int
    previous_status: str | None
    previous_end_time: int | None


def open_run(spec: RunSpec, *, config_yaml: str | None = None, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None, data_tags: dict[str, str] | None = None) -> str | None:
    """Create this job's MLflow run, or find it again on a restart; returns its id (None: untracked).

    Logs params (the flattened validated config), tags (commit, Ray submission id, advflow version,
    run key, the caller's `data_tags`: manifest URI and hash) and the config YAML. `parent_run_id`
    nests the run (sweep trials)."""
    opened = _open_run(spec, config_yaml=config_yaml, parent_run_id=parent_run_id, extra_tags=extra_tags,
                       data_tags=data_tags)
    return opened.run_id if opened else None


def _open_run(spec: RunSpec, *, config_yaml: str | None = None, parent_run_id: str | None = None,
              extra_tags: dict[str, str] | None = None, data_tags: dict[str, str] | None = None) -> _Opened | None:
    uri = tracking_uri(spec)
    if uri is None:
        if spec.tracking.enabled:
            log.warning("MLflow: MLFLOW_TRACKING_URI is not set and tracking.uri is empty; this run is "
                        "NOT tracked (`eval \"$(advflow stack env)\"` exports the local server)")
        return None
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    key = run_key(spec)
    run_id, found = find_or_create_run(client, spec.tracking.experiment, RUN_KEY_TAG, key, spec.run.name)
    secrets = secret_values()
    tags = {RUN_KEY_TAG: key, "advflow.version": advflow_version(), "git.commit": git_commit(),
            "mlflow.source.name": "jobs/train.py", "advflow.model": spec.model.size,
            "advflow.method": spec.model.method,
            **(extra_tags or {})}
    sub = ray_submission_id()
    if sub:
        tags[SUBMISSION_TAG] = sub
        # Resubmissions continue this run: keep every submission id, not only the latest.
        tags[SUBMISSIONS_TAG] = submission_ids_tag(found.data.tags if found else {}, sub)
    tags.update(data_tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if found:
        tags["advflow.resubmissions"] = str(int(found.data.tags.get("advflow.resubmissions", "0")) + 1)
    params = {k: _param_value(v) for k, v in scrub(flatten(spec.to_dict()), secrets).items()}
    if found:  # params are immutable in MLflow: keep the first values, note what changed
        old = found.data.params
        changed = {k: v for k, v in params.items() if k in old and old[k] != v}
        params = {k: v for k, v in params.items() if k not in old}
        if changed:
            tags["advflow.changed_on_resubmit"] = json.dumps(changed)[:5000]
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, str(v)) for k, v in scrub(tags, secrets).items()])
    if config_yaml is not None:
        client.log_text(run_id, scrub(config_yaml, secrets), "config/config.yaml")
    attempt = current_attempt(found.data.tags) + 1 if found else 1
    return _Opened(run_id, attempt, found.info.status if found else None, found.info.end_time if found else None)


def open_parent_run(spec: RunSpec, *, key_tag: str, key: str, run_name: str, kind: str,
                    params: dict[str, Any] | None = None, texts: dict[str, str] | None = None) -> str | None:
    """A run that groups other runs (their `parent_run_id`), e.g. one per sweep. Found again by
    `key_tag`=`key` (a restarted driver continues it); a new one gets the tags advflow.kind=`kind`,
    git.commit and advflow.version, `params`, and `texts` ({artifact file: text}), all scrubbed.
    Returns its id (None: untracked); close it with `close_run`."""
    uri = tracking_uri(spec)
    if uri is None:
        return None
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id, found = find_or_create_run(client, spec.tracking.experiment, key_tag, key, run_name)
    if not found:
        secrets = secret_values()
        tags = {"advflow.kind": kind, "git.commit": git_commit(), "advflow.version": advflow_version()}
        client.log_batch(run_id, params=[Param(k, scrub(str(v), secrets)) for k, v in (params or {}).items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        for artifact_file, text in (texts or {}).items():
            client.log_text(run_id, scrub(text, secrets), artifact_file)
    return run_id


def find_or_create_run(client, experiment: str, key_tag: str, key: str, run_name: str):
    """(run_id, existing Run or None): the run of `experiment` tagged `key_tag`=`key`, set RUNNING
    again, or a new run carrying that tag. The key is how a restarted driver finds its run.

    A found run is a new attempt: how the previous attempt ended is recorded first (`advflow.attempt.
    <n>.ended`; a run still RUNNING means its driver died without closing it: KILLED at now). Every
    attempt records its driver (`advflow.driver`) so `jobs/stale_runs.py` can tell whether it lives."""
    from mlflow.entities import RunTag

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{key_tag}` = '{_quote(key)}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run = found[0]
        ended = previous_attempt_end(run)
        attempt = current_attempt(run.data.tags) + 1
        tags = {**ended, ATTEMPT_TAG: str(attempt), DRIVER_TAG: driver_identity()}
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.update_run(run.info.run_id, status="RUNNING")
        if ended:
            log.info("MLflow run %s: attempt %d ended %s; this is attempt %d", run.info.run_id,
                     attempt - 1, next(iter(ended.values())), attempt)
        return run.info.run_id, run
    tags = {key_tag: key, ATTEMPT_TAG: "1", DRIVER_TAG: driver_identity()}
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, None


# ----------------------------------------------------------------------------------------- refusals


def find_run(spec: RunSpec):
    """This job's existing run (found by its run key), or None (untracked, or no run yet). Read
    only: the driver's preflight compares a resubmission with what the run recorded before any
    run is opened or changed."""
    uri = tracking_uri(spec)
    if uri is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{_quote(run_key(spec))}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def record_refusal(spec: RunSpec, reason: str, run=None) -> str | None:
    """Record a refused submission of an existing run as an attempt: `advflow.attempt` bumped and
    `advflow.attempt.<n>.ended` = "REFUSED at <time>: <reason>". The run's status, end time and
    params are left as they were (a FINISHED run stays FINISHED); no run is created when none
    exists (returns None), else the run id.

    `run`: the run as `find_run` returned it (looked up again when None). Its driver tag and
    submission ids are not touched either: they name the driver of the run's last real attempt,
    which `jobs/stale_runs.py` checks while the run is RUNNING."""
    run = run or find_run(spec)
    if run is None:
        return None
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(spec))
    n = current_attempt(run.data.tags)
    tags: dict[str, str] = {}
    # How the previous attempt ended, as the next real driver would record it; except while the run
    # is RUNNING under a driver that may still live: that attempt has not ended.
    if run.info.status != "RUNNING" or driver_alive(run.data.tags.get(DRIVER_TAG)) is False:
        tags.update(previous_attempt_end(run))
    tags[ATTEMPT_TAG] = str(n + 1)
    tags[attempt_ended_tag(n + 1)] = f"REFUSED at {iso(now_ms())}: {reason}"[:TAG_LIMIT]
    client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in scrub(tags, secret_values()).items()])
    log.info("MLflow run %s: attempt %d refused before launch; the run stays %s", run.info.run_id, n + 1,
             run.info.status)
    return run.info.run_id


def close_refused(spec: RunSpec, run: TrackedRun) -> None:
    """Close an attempt whose workers refused to resume (`TrackedRun.refused`): the attempt is
    recorded REFUSED and the run goes back to the status and end time it had before this attempt
    (FINISHED stays FINISHED); a run that had not ended before (new, or KILLED/RUNNING) is FAILED."""
    if run.run_id is None:
        return
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(spec))
    tag = attempt_ended_tag(run.attempt or 1)
    client.log_batch(run.run_id, tags=[RunTag(tag, scrub(f"REFUSED at {iso(now_ms())}: {run.refused}",
                                                        secret_values())[:TAG_LIMIT])])
    if run.previous_status in ("FINISHED", "FAILED"):
        client.set_terminated(run.run_id, status=run.previous_status, end_time=run.previous_end_time)
    else:
        client.set_terminated(run.run_id, status="FAILED")


# ----------------------------------------------------------------------------------------- attempts


def now_ms() -> int:
    return int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000)


def iso(ms: int | None) -> str:
    if not ms:
        return "an unknown time"
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).isoformat(timespec="seconds")


def current_attempt(tags: dict[str, str]) -> int:
    """The attempt number a run's tags record (runs opened before attempts were counted: 1 plus
    their resubmissions)."""
    try:
        return int(tags[ATTEMPT_TAG])
    except (KeyError, ValueError):
        try:
            return 1 + int(tags.get("advflow.resubmissions", "0"))
        except ValueError:
            return 1


def attempt_ended_tag(attempt: int) -> str:
    return f"advflow.attempt.{attempt}.ended"


def previous_attempt_end(run) -> dict[str, str]:
    """{advflow.attempt.<n>.ended: "<STATUS> at <time>[: why]"} for the attempt that last had `run`,
    or {} when that is already recorded (e.g. by jobs/stale_runs.py)."""
    n = current_attempt(run.data.tags)
    tag = attempt_ended_tag(n)
    if tag in run.data.tags:
        return {}
    if run.info.status == "RUNNING":
        # Its driver never closed it: it was killed (SIGKILL, `ray job stop`, a lost node). The
        # moment of death is unknown; now is the moment it was noticed.
        return {tag: f"KILLED at {iso(now_ms())}: found RUNNING by the next driver (the driver of attempt "
                     f"{n} ended without closing the run)"}
    return {tag: f"{run.info.status} at {iso(run.info.end_time)}"}


def submission_ids_tag(old_tags: dict[str, str], sub: str) -> str:
    """The JSON list of every Ray submission id that drove this run, `sub` last. Runs tagged before
    the list existed contribute their single `ray.submission_id`."""
    try:
        ids = json.loads(old_tags.get(SUBMISSIONS_TAG, "[]"))
        ids = [str(i) for i in ids] if isinstance(ids, list) else []
    except ValueError:
        ids = []
    if not ids and old_tags.get(SUBMISSION_TAG):
        ids = [old_tags[SUBMISSION_TAG]]
    if not ids or ids[-1] != sub:
        ids.append(sub)
    # Past MLflow's tag limit (over a hundred resubmissions) the oldest after the first give way,
    # marked by one "..." entry.
    while len(json.dumps(ids)) > TAG_LIMIT and len(ids) > 3:
        ids = [ids[0], "..."] + ids[3 if ids[1] == "..." else 2:]
    return json.dumps(ids)


def driver_identity() -> str:
    """This driver process as JSON {host, pid, started (epoch s)}: enough to tell later, on this host,
    whether it is still alive (the start time guards against a reused pid)."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _process_started(os.getpid())})


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:  # psutil missing or the process is gone: no start time to compare
        return None


def driver_alive(tag: str | None) -> bool | None:
    """Is the driver recorded in an `advflow.driver` tag alive? None: cannot tell (another host,
    no tag, unreadable tag)."""
    try:
        d = json.loads(tag or "")
        host, pid, started = d["host"], int(d["pid"]), d.get("started")
    except (ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        import psutil
    except ImportError:
        return None
    if not psutil.pid_exists(pid):
        return False
    now_started = _process_started(pid)
    if started is not None and now_started is not None and abs(now_started - float(started)) > 1.0:
        return False  # the pid was reused by another process
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class StaleRun:
    """One RUNNING run looked at by `sweep_stale_runs`."""

    run_id: str
    name: str
    experiment: str
    verdict: str
    """"dead" (marked KILLED unless dry run), "alive" or "unknown"."""
    reason: str


def sweep_stale_runs(client, ray_job_status=None, *, dry_run: bool = False,
                     experiments: list[str] | None = None) -> list[StaleRun]:
    """Find RUNNING runs whose driver is gone and mark them KILLED with the time (unless `dry_run`).

    A driver is gone when its latest Ray submission is in a terminal state according to Ray's job
    API (`ray_job_status(submission_id)` -> status name, or None when Ray cannot say), or, without
    a submission id, when its recorded pid on this host no longer exists. Runs whose driver cannot
    be checked (another host, Ray unreachable) are left as they are and reported "unknown"."""
    from mlflow.entities import RunTag, ViewType

    exps = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if experiments:
        exps = [e for e in exps if e.name in experiments]
    out: list[StaleRun] = []
    for exp in exps:
        token = None
        while True:
            page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                      max_results=500, page_token=token)
            for run in page:
                verdict, reason = _judge(run, ray_job_status)
                item = StaleRun(run.info.run_id, run.info.run_name or "-", exp.name, verdict, reason)
                out.append(item)
                if verdict == "dead" and not dry_run:
                    at = now_ms()
                    tag = attempt_ended_tag(current_attempt(run.data.tags))
                    client.log_batch(run.info.run_id, tags=[
                        RunTag(tag, f"KILLED at {iso(at)}: {reason} (jobs/stale_runs.py)"),
                        RunTag("advflow.killed", f"{iso(at)}: {reason}")])
                    client.set_terminated(run.info.run_id, status="KILLED", end_time=at)
            token = page.token
            if not token:
                break
    return out


TERMINAL_RAY_STATES = ("STOPPED", "SUCCEEDED", "FAILED")


def _judge(run, ray_job_status) -> tuple[str, str]:
    tags = run.data.tags
    sub = tags.get(SUBMISSION_TAG)
    if sub and ray_job_status is not None:
        state = ray_job_status(sub)
        if state is None:
            pass  # Ray cannot say (unreachable, unknown to this cluster): try the pid below
        elif str(state).upper() in TERMINAL_RAY_STATES:
            return "dead", f"Ray submission {sub} is {str(state).upper()}"
        else:
            return "alive", f"Ray submission {sub} is {str(state).upper()}"
    alive = driver_alive(tags.get(DRIVER_TAG))
    if alive is False:
        d = json.loads(tags[DRIVER_TAG])
        return "dead", f"driver pid {d['pid']} on {d['host']} is gone"
    if alive:
        d = json.loads(tags[DRIVER_TAG])
        return "alive", f"driver pid {d['pid']} on {d['host']} is running"
    if sub:
        return "unknown", f"Ray cannot say whether submission {sub} runs (set RAY_API_SERVER_ADDRESS)"
    return "unknown", "no Ray submission id, and no driver pid recorded on this host"


def close_run(spec: RunSpec, run_id: str | None, ok: bool) -> None:
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri(spec)).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def run_url(spec: RunSpec, run_id: str | None) -> str | None:
    uri = tracking_uri(spec)
    if not run_id or not uri or not uri.startswith("http"):
        return None
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def _quote(s: str) -> str:
    return s.replace("'", "\\'")


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return text if len(text) <= 6000 else text[:5997] + "..."
