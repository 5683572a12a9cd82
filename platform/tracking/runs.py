"""MLflow run tracking: one run per training job, continued across restarts; only rank 0 logs.

Who does what:
- The driver (`jobs/train.py`, or a sweep trial) calls `open_run` before any worker starts. It
  finds the run of this job by its key (storage path + run name, the same identity Ray Train uses
  to resume from storage) or creates it, logs params, tags and the config YAML, and passes the run
  id to the workers. A worker group restarted by Ray Train after a failure, or a re-submitted job,
  therefore continues the same MLflow run, and no worker ever creates one.
- Global rank 0 of the worker group opens a `RunLogger` on that run id: metrics every
  `train.log_every` steps, sample grids, final metrics, system metrics, and registered models.
  Steps already logged before a restart are not logged twice (the replay after a restore is
  deterministic, so the dropped rows are the same numbers).
- The driver marks the run FINISHED or FAILED at the end (`close_run`).

Secrets: params, tags and artifacts pass through `scrub`, which masks the values of secret-looking
environment variables (AWS keys, the Ray token, anything named *SECRET*/*TOKEN*/*PASSWORD*...)
and credentials embedded in URLs; the worker environment itself is never logged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from advflow.platform.config import RunSpec, flatten

RUN_KEY_TAG = "advflow.run_key"
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY|AUTH", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@", re.I)
MASK = "***"


# ----------------------------------------------------------------------------------------- secrets


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values that must never be logged: secret-named environment variables and the Ray token."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 4}
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if token_path and os.path.isfile(token_path):
        try:
            values.add(Path(token_path).read_text().strip())
        except OSError:
            pass
    values.discard("")
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another


def scrub(value: Any, secrets: Iterable[str] | None = None) -> Any:
    """Mask secret values and URL credentials inside strings (recursing into dicts and lists)."""
    secrets = secret_values() if secrets is None else list(secrets)
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, secrets) for v in value)
    if not isinstance(value, str):
        return value
    out = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", value)
    for s in secrets:
        out = out.replace(s, MASK)
    return out


# ----------------------------------------------------------------------------------------- facts


def tracking_uri(spec: RunSpec) -> str | None:
    if not spec.tracking.enabled:
        return None
    return spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def run_key(spec: RunSpec) -> str:
    """The job's identity, shared with Ray Train's resume-from-storage (storage_path/name)."""
    return f"{spec.run.storage_path.rstrip('/')}/{spec.run.name}"


def git_commit() -> str:
    """The source commit: the checkout's HEAD (+ '-dirty'), else $ADVFLOW_GIT_COMMIT, else 'unknown'.

    `ray job submit --working-dir .` uploads the files without .git, so demo.sh passes the commit
    in ADVFLOW_GIT_COMMIT."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ADVFLOW_GIT_COMMIT", "unknown")


def ray_submission_id() -> str | None:
    """The Ray job submission id when running as a `ray job submit` driver (from Ray's job config)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


def manifest_facts(prefix: str) -> dict[str, str]:
    """{'data.manifest_uri', 'data.manifest_sha256'} for the dataset at `prefix`."""
    import hashlib

    from advflow.platform.data.shards import MANIFEST_NAME
    from advflow.platform.data.storage import Storage

    storage = Storage(prefix)
    raw = storage.read(MANIFEST_NAME)
    return {"data.manifest_uri": storage.url(MANIFEST_NAME), "data.manifest_sha256": hashlib.sha256(raw).hexdigest()}


def advflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("advflow")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------- driver


def open_run(spec: RunSpec, *, config_yaml: str | None = None, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None) -> str | None:
    """Create this job's MLflow run, or find it again on a restart; returns its id (None: untracked).

    Logs params (the flattened validated config), tags (commit, manifest URI and hash, Ray
    submission id, advflow version, run key) and the config YAML. `parent_run_id` nests the run
    (sweep trials)."""
    uri = tracking_uri(spec)
    if uri is None:
        if spec.tracking.enabled:
            print("[advflow] MLflow: MLFLOW_TRACKING_URI is not set and tracking.uri is empty; this run is "
                  "NOT tracked (`eval \"$(advflow stack env)\"` exports the local server)", file=sys.stderr)
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
    try:
        tags.update(manifest_facts(spec.data.prefix))
    except Exception as err:  # noqa: BLE001 - tracking must not hide the reader's own, clearer error
        tags["data.manifest_error"] = str(err)[:500]
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


# ----------------------------------------------------------------------------------------- rank 0


class RunLogger:
    """Rank 0's handle on the job's run: metrics, images, final metrics, registered models."""

    def __init__(self, spec: RunSpec, run_id: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.spec, self.run_id = spec, run_id
        self.uri = tracking_uri(spec) or os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)  # for the registry calls, which use the fluent API
        self.client = MlflowClient(self.uri)
        self._secrets = secret_values()
        # The driver tagged the run with the dataset's manifest; registered versions reuse the tags
        # instead of reading the manifest again at every registration.
        tags = self.client.get_run(run_id).data.tags
        self.data_tags = {k: v for k, v in tags.items() if k.startswith("data.")}
        # Steps a previous attempt already logged (the restored replay reproduces them exactly).
        history = self.client.get_metric_history(run_id, "d_loss")
        self.last_logged_step = max((m.step for m in history), default=0)
        # Grids and evaluations at or before this step were logged by that attempt too.
        self.resumed_through = self.last_logged_step
        self._monitor = None
        if spec.tracking.system_metrics:
            # MLflow's own monitor (CPU, memory, disk, network; GPU with pynvml), attached to the
            # job's run without making it the process's active fluent run.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=spec.tracking.system_metrics_interval,
                                                 samples_before_logging=1, resume_logging=True,
                                                 tracking_uri=self.uri)
            self._monitor.start()

    def log_rows(self, rows: list[dict], extra: dict[str, float] | None = None) -> None:
        """Per-step metric rows ({'step': s, name: value}); `extra` goes with the last row."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for i, row in enumerate(rows):
            step = int(row["step"])
            if step <= self.last_logged_step:
                continue
            values = {**row, **(extra or {})} if i == len(rows) - 1 else row
            metrics += [Metric(_metric_key(k), float(v), now, step) for k, v in values.items() if k != "step"]
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        if rows:
            self.last_logged_step = max(self.last_logged_step, max(int(r["step"]) for r in rows))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Checkpoint-time metrics (eval/*); skipped for steps a previous attempt logged."""
        from mlflow.entities import Metric

        if step <= self.resumed_through:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_metric_key(k), float(v), now, step)
                                                    for k, v in metrics.items()])

    def log_grid(self, png_path: str | Path, step: int) -> None:
        """The fixed-seed EMA sample grid: an MLflow image (key `samples`, stepped) plus a plain file.
        Skipped for steps a previous attempt logged."""
        from PIL import Image

        if step <= self.resumed_through:
            return

        with Image.open(png_path) as img:
            self.client.log_image(self.run_id, img.copy(), key="samples", step=step)
        self.client.log_artifact(self.run_id, str(png_path), artifact_path="samples")  # latest grid

    def log_final(self, metrics: dict[str, Any]) -> None:
        self.client.log_text(self.run_id, json.dumps(scrub(metrics, self._secrets), indent=1, sort_keys=True),
                             "final_metrics.json")

    def close(self) -> None:
        """Stop the system-metrics thread; the driver sets the run's terminal status."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def _metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)

