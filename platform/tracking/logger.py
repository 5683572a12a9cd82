"""Rank 0's handle on the job's MLflow run (`RunLogger`), and its do-nothing twin (`NullRunLogger`).

`run_logger(spec, run_id)` gives the worker one or the other: a `RunLogger` on the driver's run
(`tracking.runs.open_run` / `tracked_run` created it), or a `NullRunLogger` when `run_id` is None
(untracked jobs, ranks other than 0), so callers never check `if logger is None`.

The RunLogger logs metrics every `train.log_every` steps, sample grids, checkpoint-time metrics,
final metrics and system metrics. Steps already logged before a restart are not logged twice (the
replay after a restore is deterministic, so the dropped rows are the same numbers).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from advflow.platform.config import RunSpec
from advflow.platform.tracking.runs import tracking_uri
from advflow.platform.tracking.secrets import scrub, secret_values


class RunLogger:
    """Rank 0's handle on the job's run: metrics, images, final metrics, registered models."""

    def __init__(self, spec: RunSpec, run_id: str, step_key: str = "d_loss"):
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
        # `step_key` is a metric the method logs at every step (its first loss).
        history = self.client.get_metric_history(run_id, step_key)
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
            metrics += [Metric(mlflow_metric_key(k), float(v), now, step) for k, v in values.items() if k != "step"]
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
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_metric_key(k), float(v), now, step)
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

    def log_event(self, tags: dict[str, str], metrics: dict[str, float], step: int) -> None:
        """A decision of the loop (phase transition, watchdog rollback): tags plus stepped metrics."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_metric_key(k), float(v), now, step)
                                                    for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def rewind(self, step: int) -> None:
        """A rollback went back to `step`: the steps after it are trained again and logged again."""
        self.last_logged_step = min(self.last_logged_step, step)
        self.resumed_through = min(self.resumed_through, step)

    def log_final(self, metrics: dict[str, Any]) -> None:
        self.client.log_text(self.run_id, json.dumps(scrub(metrics, self._secrets), indent=1, sort_keys=True),
                             "final_metrics.json")

    def close(self) -> None:
        """Stop the system-metrics thread; the driver sets the run's terminal status."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


class NullRunLogger:
    """A RunLogger that logs nothing: untracked jobs and ranks other than 0. Same methods and
    attributes (run_id None, data_tags {}), so callers never check for a missing logger."""

    def __init__(self, spec: RunSpec | None = None, run_id: str | None = None):
        self.spec = spec
        self.run_id: str | None = None
        self.data_tags: dict[str, str] = {}
        self.last_logged_step = 0
        self.resumed_through = 0

    def log_rows(self, rows: list[dict], extra: dict[str, float] | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_grid(self, png_path: str | Path, step: int) -> None:
        pass

    def log_event(self, tags: dict[str, str], metrics: dict[str, float], step: int) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def log_final(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def run_logger(spec: RunSpec, run_id: str | None, step_key: str = "d_loss") -> RunLogger | NullRunLogger:
    """A RunLogger on `run_id`, or a NullRunLogger when there is no run (untracked, not rank 0).
    `step_key`: a metric the method logs at every step (finds the steps an earlier attempt logged)."""
    if run_id is None:
        return NullRunLogger(spec)
    return RunLogger(spec, run_id, step_key)


def mlflow_metric_key(key: str) -> str:
    """The MLflow name of a metric: MLflow refuses '@', so `eval/fd@4` is logged as `eval/fd_at_4`;
    other characters it refuses become '_'."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key.replace("@", "_at_"))
