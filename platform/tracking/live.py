"""Live metrics: the loop's and the sweeps' numbers out through Ray's Prometheus endpoint.

Every Ray node serves the metrics its processes record with `ray.util.metrics` on its metrics-export
port; Prometheus finds the ports through Ray's service-discovery file
(`<temp-dir>/session_latest/prom_metrics_service_discovery.json`) and Ray's dashboard shows them in
its Metrics view (Grafana panels). Ray prefixes every name with `ray_` and adds its own labels
(SessionName, WorkerId, NodeAddress, ...): `advflow_train_loss` is queried as `ray_advflow_train_loss`.

`CATALOGUE` is the one list of what advflow exports (the Grafana dashboards in dashboards/grafana/
are generated against it, and a test checks every series against a real scrape). Names follow
Prometheus conventions: base units in the name (`_seconds`, `_ratio`), counters end in `_total`,
one family per kind of quantity with a `name` label for the member (`advflow_train_loss{name="d_loss"}`).

Labels: `run` (run.name) and `method` (model.method) on every training series; `rank` on the
per-worker timings; `sweep` on the sweep series. The values are the same numbers the run logs to
MLflow: the all-reduced rows of each closed window (the last row's value), the evaluation at each
checkpoint.

Where Ray is not connected (a plain script, a unit test) recording is a no-op: `ray.util.metrics`
drops values of a process that is not a Ray worker. The `--no-ray` launcher connects its ranks to
the cluster named by RAY_ADDRESS when one is given (`connect_for_metrics`), so a local run shows up
too. `tracking.live_metrics: false` turns the export off.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable

from advflow.platform.log import get_logger

log = get_logger(__name__)

LINGER_ENV = "ADVFLOW_LIVE_LINGER_S"
"""Seconds a finishing process keeps serving its last values (set it to Prometheus's scrape interval)."""
PREFIX = "ray_"
"""What Ray puts before every application metric's name in Prometheus."""


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...]

    @property
    def series(self) -> str:
        """The name Prometheus stores (Ray's prefix added)."""
        return PREFIX + self.name


_RUN = ("run", "method")
CATALOGUE: dict[str, Family] = {f.name: f for f in (
    Family("advflow_train_samples_per_second", "gauge",
           "Training throughput of the latest closed metric window (samples of the global batch per second).", _RUN),
    Family("advflow_train_step", "gauge", "The latest completed training step.", _RUN),
    Family("advflow_train_step_duration_seconds", "gauge",
           "Mean wall time per training step over the latest window, per worker.", (*_RUN, "rank")),
    Family("advflow_train_data_wait_ratio", "gauge",
           "Share of the latest window's wall time spent waiting for data, per worker.", (*_RUN, "rank")),
    Family("advflow_train_loss", "gauge",
           "Losses and loss terms of the latest step (name: d_loss, g_loss, fm_loss, d_adv, r1, r2, cp, g_adv, ot, cg).",
           (*_RUN, "name")),
    Family("advflow_train_logit", "gauge",
           "Mean discriminator logits of the latest step (name: d_logit_real, d_logit_fake, g_logit_real, g_logit_fake).",
           (*_RUN, "name")),
    Family("advflow_train_grad_norm", "gauge",
           "Gradient norms before clipping (name: d_grad_norm, g_grad_norm).", (*_RUN, "name")),
    Family("advflow_train_gradnorm_scale", "gauge",
           "The gradient normaliser's divisor (AFM's gn_scale).", _RUN),
    Family("advflow_train_learning_rate", "gauge", "Learning rates (name: lr, lr_g, lr_d).", (*_RUN, "name")),
    Family("advflow_train_loss_weight", "gauge",
           "Loss weights of the current phase (name: lambda_ot, lambda_gp, lambda_cp, lambda_cg).", (*_RUN, "name")),
    Family("advflow_train_augment_probability", "gauge", "Augmentation probability of the current phase.", _RUN),
    Family("advflow_train_phase", "gauge", "Index of the current training phase.", _RUN),
    Family("advflow_train_value", "gauge",
           "Any other per-step metric of the method (name: the MLflow key, e.g. acc).", (*_RUN, "name")),
    Family("advflow_eval_metric", "gauge",
           "Evaluation at the latest checkpoint (name: fd, fid, cls_acc, ...; nfe: the sampler's steps, "
           "'own' for the model's own K).", (*_RUN, "name", "nfe")),
    Family("advflow_checkpoint_save_seconds", "gauge",
           "Wall time of the latest checkpoint on rank 0 (grids, evaluation, registration, writing).", _RUN),
    Family("advflow_checkpoint_report_seconds", "gauge",
           "How long the latest checkpoint's report held the loop (its upload, when synchronous).", _RUN),
    Family("advflow_checkpoints_total", "counter", "Checkpoints saved by this run.", _RUN),
    # Set, not incremented: the run's count (checkpointed, so it survives a resume) exists from the
    # first window on, at 0, and Ray exports its counters with the gauge type anyway.
    Family("advflow_watchdog_rollbacks_total", "gauge",
           "Watchdog rollbacks to the last good checkpoint so far in this run.", _RUN),
    Family("advflow_sweep_trials", "gauge",
           "Trials of a sweep by state (PENDING, RUNNING, TERMINATED, ERROR).", ("sweep", "state")),
    Family("advflow_sweep_best_value", "gauge",
           "The best value of the sweep's metric so far.", ("sweep", "metric")),
)}

_FIXED = {"gn_scale": "advflow_train_gradnorm_scale", "phase": "advflow_train_phase",
          "augment_p": "advflow_train_augment_probability"}


def family_of(key: str, losses: Iterable[str] = (), grads: Iterable[str] = (),
              logits: Iterable[str] = (), terms: Iterable[str] = ()) -> str:
    """The family a per-step row key belongs to. A method's MetricNames say which keys are its
    losses, loss terms, gradient norms and logits; names like `*_loss`, `*grad_norm`, `*logit*`
    are recognised without it."""
    if key in _FIXED:
        return _FIXED[key]
    if key in grads or key.endswith("grad_norm"):
        return "advflow_train_grad_norm"
    if key in logits or "logit" in key:
        return "advflow_train_logit"
    if key == "lr" or key.startswith("lr_"):
        return "advflow_train_learning_rate"
    if key.startswith("lambda_"):
        return "advflow_train_loss_weight"
    if key in losses or key in terms or key.endswith("_loss"):
        return "advflow_train_loss"
    return "advflow_train_value"


def split_eval_key(key: str) -> tuple[str, str]:
    """'eval/fd@2' -> ('fd', '2'); 'eval/fd' -> ('fd', 'own')."""
    body = key.split("/", 1)[1] if "/" in key else key
    name, _, nfe = body.partition("@")
    return name, nfe or "own"


def _ray_connected() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def connect_for_metrics() -> bool:
    """Connect this process to the Ray cluster named by RAY_ADDRESS (the `--no-ray` launcher's
    ranks), only so that its metrics are served; False (and a no-op export) where there is none."""
    if _ray_connected():
        return True
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return False
    try:
        import ray

        from advflow.platform.train.connect import wait_reachable

        # A stale RAY_ADDRESS (a stopped stack) must not hold the ranks in ray.init's own retries.
        wait_reachable(address, "RAY_ADDRESS", timeout_s=2.0)
        ray.init(address=address, log_to_driver=False, namespace="advflow-live-metrics",
                 logging_level="WARNING", configure_logging=False)
        return True
    except Exception as exc:  # the metrics are an extra: a run without them still trains
        log.warning("live metrics off: could not connect to the Ray cluster at RAY_ADDRESS=%s (%s)", address, exc)
        return False


def linger(last_set: float, timeout_s: float | None = None) -> None:
    """Keep the process alive until Ray's next metrics report after `last_set` (time.monotonic of
    the last value; 0: nothing was set), plus ADVFLOW_LIVE_LINGER_S: a process that exits at once
    takes its final numbers with it."""
    if not last_set:
        return
    try:
        import ray

        interval = ray._config.metrics_report_interval_ms() / 1000.0
    except Exception:
        interval = 10.0
    # ADVFLOW_LIVE_LINGER_S: also outlive a scrape of Prometheus (the node's endpoint drops a
    # process's series soon after it exits); the local stack sets it from its scrape interval.
    try:
        extra = float(os.environ.get(LINGER_ENV) or 0.0)
    except ValueError:
        extra = 0.0
    wait = interval * 1.2 + 0.5 + extra - (time.monotonic() - last_set)
    if timeout_s is not None:
        wait = min(wait, timeout_s)
    if wait > 0:
        time.sleep(wait)


class _Metrics:
    """The `ray.util.metrics` objects, made once per process (Ray keeps one per name)."""

    _made: dict[str, object] = {}

    @classmethod
    def get(cls, name: str):
        if name not in cls._made:
            from ray.util.metrics import Counter, Gauge

            fam = CATALOGUE[name]
            make = Counter if fam.kind == "counter" else Gauge
            cls._made[name] = make(fam.name, description=fam.help, tag_keys=fam.labels)
        return cls._made[name]


class LiveMetrics:
    """One worker's export. Every rank exports its own timings; rank 0 the run's shared numbers
    (the rows are the same on every rank, so one copy suffices)."""

    enabled = True

    def __init__(self, run: str, method: str, rank: int, *, losses: Iterable[str] = (), grads: Iterable[str] = (),
                 logits: Iterable[str] = (), terms: Iterable[str] = ()):
        self.base = {"run": run, "method": method}
        self.rank = rank
        self.losses, self.grads, self.logits, self.terms = tuple(losses), tuple(grads), tuple(logits), tuple(terms)
        self._last_set = 0.0

    def _set(self, family: str, value: float, **labels: str) -> None:
        _Metrics.get(family).set(float(value), tags={**self.base, **labels})
        self._last_set = time.monotonic()

    def _inc(self, family: str, value: float = 1.0, **labels: str) -> None:
        _Metrics.get(family).inc(float(value), tags={**self.base, **labels})
        self._last_set = time.monotonic()

    def window(self, rows: list[dict], window: dict[str, float], total_seconds: float, data_seconds: float,
               rollbacks: int = 0) -> None:
        """A closed window: this rank's timings; on rank 0 the last row, the throughput and the
        watchdog's rollback count."""
        steps = len(rows)
        if steps:
            self._set("advflow_train_step_duration_seconds", total_seconds / steps, rank=str(self.rank))
        self._set("advflow_train_data_wait_ratio", data_seconds / total_seconds if total_seconds else 0.0,
                  rank=str(self.rank))
        if self.rank != 0 or not rows:
            return
        last = rows[-1]
        self._set("advflow_train_samples_per_second", window.get("samples_per_s", 0.0))
        self._set("advflow_watchdog_rollbacks_total", rollbacks)
        self._set("advflow_train_step", last["step"])
        for key, value in last.items():
            if key == "step":
                continue
            family = family_of(key, self.losses, self.grads, self.logits, self.terms)
            if "name" in CATALOGUE[family].labels:
                self._set(family, value, name=key)
            else:
                self._set(family, value)

    def evaluation(self, metrics: dict[str, float]) -> None:
        """Rank 0's evaluation at a checkpoint (eval/fd, eval/fd@2, ...)."""
        for key, value in metrics.items():
            if key.startswith("eval/") and key != "eval/seconds":
                name, nfe = split_eval_key(key)
                self._set("advflow_eval_metric", value, name=name, nfe=nfe)

    def checkpoint(self, save_seconds: float, report_seconds: float) -> None:
        if self.rank != 0:
            return
        self._set("advflow_checkpoint_save_seconds", save_seconds)
        self._set("advflow_checkpoint_report_seconds", report_seconds)
        self._inc("advflow_checkpoints_total")

    def rollback(self, rollbacks: int) -> None:
        """A rollback happened (`rollbacks` so far): shown at once, not at the next window."""
        if self.rank == 0:
            self._set("advflow_watchdog_rollbacks_total", rollbacks)

    def flush(self, timeout_s: float | None = None) -> None:
        """Keep the process alive until its last values are served (`linger`)."""
        linger(self._last_set, timeout_s)


class NoLiveMetrics(LiveMetrics):
    """The export turned off (tracking.live_metrics false) or no Ray here: every call does nothing."""

    enabled = False

    def __init__(self):
        super().__init__("", "", 0)

    def _set(self, family: str, value: float, **labels: str) -> None:
        pass

    def _inc(self, family: str, value: float = 1.0, **labels: str) -> None:
        pass

    def window(self, *a, **kw) -> None:
        pass  # not even the classification of the row's keys


def live_metrics(spec, rank: int, names=None) -> LiveMetrics:
    """The loop's exporter: a real one where Ray is connected and the config allows it."""
    if not getattr(spec.tracking, "live_metrics", True) or not _ray_connected():
        return NoLiveMetrics()
    return LiveMetrics(spec.run.name, spec.model.method, rank, losses=getattr(names, "losses", ()),
                       grads=getattr(names, "grads", ()), logits=getattr(names, "logits", ()),
                       terms=getattr(names, "terms", ()))


class SweepMetrics:
    """The sweep driver's export: trial counts by state and the best value so far."""

    STATES = ("PENDING", "RUNNING", "TERMINATED", "ERROR")

    def __init__(self, sweep: str, metric: str):
        self.sweep, self.metric = sweep, metric
        self.enabled = _ray_connected()
        self._last_set = 0.0

    def update(self, states: Iterable[str], best: float | None) -> None:
        if not self.enabled:
            return
        counts = {s: 0 for s in self.STATES}
        for state in states:
            counts[state] = counts.get(state, 0) + 1
        for state, n in counts.items():
            _Metrics.get("advflow_sweep_trials").set(float(n), tags={"sweep": self.sweep, "state": state})
        if best is not None:
            _Metrics.get("advflow_sweep_best_value").set(float(best), tags={"sweep": self.sweep, "metric": self.metric})
        self._last_set = time.monotonic()

    def flush(self) -> None:
        """Before the driver exits: its final counts reach the node's endpoint (`linger`)."""
        linger(self._last_set)
