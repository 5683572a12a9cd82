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

The rest of tracking/: `secrets` (what is masked before anything is logged), `provenance` (git
commit, Ray submission id, advflow version tags), `logger` (rank 0's RunLogger), `registry` and
`model_format` (registered generators). The dataset's provenance tags come from the caller
(`advflow.platform.data.shards.dataset_tags`): tracking does not read the dataset.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from advflow.platform.config import RunSpec, flatten
from advflow.platform.log import get_logger
from advflow.platform.tracking.provenance import advflow_version, git_commit, ray_submission_id
from advflow.platform.tracking.secrets import scrub, secret_values

RUN_KEY_TAG = "advflow.run_key"
log = get_logger(__name__)


def tracking_uri(spec: RunSpec) -> str | None:
    if not spec.tracking.enabled:
        return None
    return spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


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


@contextmanager
def tracked_run(spec: RunSpec, *, config_yaml: str | None = None, parent_run_id: str | None = None,
                extra_tags: dict[str, str] | None = None,
                data_tags: dict[str, str] | None = None) -> Iterator[TrackedRun]:
    """Open (or find again) this job's run for the body, then close it: FINISHED if the body set
    `.ok`, FAILED if not or if it raised (the exception propagates). Untracked: run_id None.

    data_tags: the dataset's provenance (`advflow.platform.data.shards.dataset_tags(spec.data.prefix)`)."""
    run_id = open_run(spec, config_yaml=config_yaml, parent_run_id=parent_run_id, extra_tags=extra_tags,
                      data_tags=data_tags)
    run = TrackedRun(run_id=run_id, url=run_url(spec, run_id))
    try:
        yield run
    except BaseException:
        close_run(spec, run_id, ok=False)
        raise
    close_run(spec, run_id, ok=run.ok)


def open_run(spec: RunSpec, *, config_yaml: str | None = None, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None, data_tags: dict[str, str] | None = None) -> str | None:
    """Create this job's MLflow run, or find it again on a restart; returns its id (None: untracked).

    Logs params (the flattened validated config), tags (commit, Ray submission id, advflow version,
    run key, the caller's `data_tags`: manifest URI and hash) and the config YAML. `parent_run_id`
    nests the run (sweep trials)."""
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
            **(extra_tags or {})}
    sub = ray_submission_id()
    if sub:
        tags["ray.submission_id"] = sub
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
    return run_id


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
    again, or a new run carrying that tag. The key is how a restarted driver finds its run."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{key_tag}` = '{_quote(key)}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, found[0]
    return client.create_run(exp_id, run_name=run_name, tags={key_tag: key}).info.run_id, None


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
