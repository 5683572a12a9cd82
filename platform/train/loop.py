"""The training loop, one for every method: setup -> step cycle -> metric windows -> controllers
-> checkpoint -> callbacks -> close.

Ray-free on purpose: the loop talks to the outside world only through a `WorkerContext` (rank,
world size, report, checkpoint restore). `ray_launch` gives it Ray Train's context; `local_launch`
and tests give it a plain torch.distributed one. What a method does is its step object's
(methods/, one file each, `METHODS[model.method]`); the loop owns the schedule around it:
- the phase controller (phases.py: the plan, `phases: auto`) says which parameters step k runs with;
- recovery (recovery.py: the divergence watchdog) checks every closed window and evaluation and
  rolls back to the last good checkpoint;
- checkpoints are the `Checkpointer`'s, given named parts (the method's, the streams', the loop's,
  the controllers');
- grids, evaluation, registration and progress are callbacks (callbacks.py), each with its own cadence.

Determinism (what makes resume and the ZeRO-equivalence test exact): every random draw of step k
comes from a generator seeded by (seed, k, micro-batch, purpose[, rollbacks]) and keyed by the
sample's row in the global batch, not by the rank (methods/base.py `StepEnv.generator`); the data
streams' order is defined by canonical partitions, not ranks (platform/data/reader.py), and they
resume from their own state. So a restored run replays the
same numbers without saving RNG states mid-step, on the same number of workers or another.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from advflow.platform.log import get_logger, set_rank
from advflow.platform.tracking.live import LiveMetrics, live_metrics
from advflow.platform.tracking.logger import run_logger
from advflow.platform.train import callbacks as cb
from advflow.platform.train.cadence import Cadence
from advflow.platform.train.checkpoint import Checkpointer, JSONEntries, staging_dir
from advflow.platform.train.methods import METHODS, Method, StepEnv
from advflow.platform.train.metrics import MetricWindow
from advflow.platform.train.metrics_log import MetricsLog
from advflow.platform.train.phases import PhaseController
from advflow.platform.train.recovery import Recovery
from advflow.platform.train.streams import Streams
from advflow.trainers.watchdog import Trigger

log = get_logger(__name__)


class WorkerContext(Protocol):
    """What the loop needs from its launcher."""

    rank: int
    world_size: int
    takes_staging_dir: bool
    """True when `report` takes the staged checkpoint directory over (an asynchronous upload)."""

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None = None) -> None:
        """Report metrics (every rank, same points) and the staged checkpoint, stored under `name`."""

    restore_uri: str | None
    """Where the checkpoint `restore_dir` returned is stored (s3://.../checkpoint_000400 or a path),
    named in messages instead of a temporary local copy; None before `restore_dir` or without one."""

    def restore_dir(self) -> str | None:
        """A local directory holding the latest complete checkpoint, or None for a fresh start."""

    def fetch_checkpoint(self, name: str) -> str:
        """A local directory holding this run's reported checkpoint `name` (the watchdog's
        rollback); raises FileNotFoundError if it is no longer kept."""

    def run_storage(self) -> str | None:
        """This run's storage (`<run.storage_path>/<run.name>`, local or s3://): where the
        checkpoints and the metrics log live (None: keep no metrics log, e.g. a test)."""

    def drain(self) -> None:
        """Wait for checkpoint uploads in flight (before the run ends)."""


@dataclass
class LoopState:
    """The loop's position. Checkpointed: the step and the resumes (constant size). The per-step
    metric rows are not: rank 0 appends them to the run's metrics log (metrics_log.py) and MLflow."""

    step: int = 0
    resumes: list[int] = field(default_factory=list)
    """Steps this run was resumed from after a failure or restart (observability)."""
    last_row: dict = field(default_factory=dict)
    """The latest metric row (reported with each checkpoint)."""
    log: MetricsLog | None = field(default=None, repr=False)
    """Rank 0's metrics log under the run's storage; None on other ranks and with test contexts."""

    def state_dict(self) -> dict[str, Any]:
        return {"resumes": self.resumes}

    def record(self, rows: list[dict]) -> None:
        """A closed window's rows (all-reduced, the same on every rank)."""
        if rows:
            self.last_row = rows[-1]
            if self.log is not None:
                self.log.append(rows)

    def continue_from(self, step: int) -> None:
        """Training continues after `step` (a fresh start, a resume, a rollback): the rows after it
        that an earlier attempt logged are dropped, they will be trained and logged again."""
        if self.log is not None:
            self.log.truncate(step)

    def rewind(self, meta_step: int) -> None:
        """After a rollback loaded the state of `meta_step`: that was no resume (drop the entry the
        load added) and the rows end there."""
        self.resumes.pop()
        self.continue_from(meta_step)

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        self.step = int(meta["step"])
        self.resumes = list(meta.get("resumes", [])) + [self.step]


def metrics_log(ctx: WorkerContext) -> MetricsLog | None:
    """Rank 0's metrics log under the run's storage (None elsewhere, or where the context keeps none)."""
    where = ctx.run_storage() if ctx.rank == 0 else None
    return MetricsLog(where) if where is not None else None


class TrainLoop:
    """One worker's share of a run of any method. Construct, then call `train()`."""

    spec: Any
    ctx: WorkerContext
    device: torch.device
    method_cls: type
    """The method's step class (`METHODS[model.method]`, or one given by the caller)."""
    state: LoopState
    window: MetricWindow
    recovery: Recovery
    """The divergence watchdog; outlives a rollback to the initial state (it counts rollbacks)."""
    logger: Any
    """Rank 0's RunLogger on the driver's MLflow run; a NullRunLogger elsewhere or untracked."""
    live: LiveMetrics
    """The live export through Ray's Prometheus endpoint (a no-op without Ray; tracking/live.py)."""
    # Built together by `build()` (and rebuilt by a rollback to the initial state):
    streams: Streams
    method: Method
    phases: PhaseController
    checkpointer: Checkpointer
    # Built at setup from the above:
    callbacks: list[cb.Callback]
    registration: cb.Registration | None

    def __init__(self, spec, ctx: WorkerContext, *, device: torch.device | None = None,
                 stream_factory: Callable[..., Any] | None = None, run_id: str | None = None,
                 method: type | None = None):
        self.spec, self.ctx = spec, ctx
        self.device = device or torch.device("cpu")
        self.run_id = run_id  # the MLflow run opened by the driver; only rank 0 logs to it
        self.stream_factory = stream_factory
        self.method_cls = method or METHODS[spec.model.method]
        # On the workers there are (an elastic run may have fewer than distributed.workers).
        self.micro_batch = spec.micro_batch_for(ctx.world_size)
        self.state = LoopState(log=metrics_log(ctx))
        self.window = MetricWindow(self.device, ctx.world_size, spec.train.global_batch)
        self.recovery = Recovery(spec, self.method_cls.names)
        self.callbacks, self.registration = [], None
        self.last_report: dict = {}  # the latest checkpoint's metrics (final_metrics.json)
        self.report_seconds = 0.0  # the latest checkpoint's report (upload) time

    # ------------------------------------------------------------------ building

    def build(self) -> None:
        """The streams, the method (models, engines), the phase controller and the checkpointer over
        all their parts: the state of step 0, seeded alike on every rank."""
        if getattr(self, "streams", None) is not None:
            self.streams.close()  # a rollback to the initial state rebuilds them
        self.streams = Streams(self.spec, self.method_cls.streams, rank=self.ctx.rank, world_size=self.ctx.world_size,
                               micro_batch=self.micro_batch, device=self.device, times=self.window.times,
                               factory=self.stream_factory)
        env = StepEnv(self.spec, self.ctx.rank, self.ctx.world_size, self.device, self.micro_batch, self.streams,
                      rollbacks=lambda: self.recovery.rollbacks, times=self.window.times.steps)
        self.method = self.method_cls.build(env)
        self.phases = PhaseController(self.spec, self.on_event, self.method.on_new_best)
        t = self.spec.train
        parts = {**self.method.parts(), "readers": self.streams.part(), "loop": JSONEntries(self.state),
                 **self.recovery.parts(), **self.phases.parts()}
        # Canonical data partitions: the whole checkpoint is independent of the number of workers (elastic).
        self.checkpointer = Checkpointer(parts, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                         every=t.checkpoint_every, last_step=t.steps, config=self.spec.to_dict(),
                                         elastic=True)

    def build_callbacks(self) -> None:
        """The callbacks, in the order they run at a step. Evaluation runs first (for generators a
        collective: each rank samples its share), so no rank waits for rank 0's grid before it; it
        precedes registration, which tags the model with it. The rest are rank 0's. Registration
        runs after the checkpoint's checks passed (`save_checkpoint`), never before."""
        t, tr, ev = self.spec.train, self.spec.tracking, self.spec.eval
        evaluation = self.method.evaluation(self.logger, Cadence(ev.every, t.steps))
        evaluation = [evaluation] if evaluation is not None else []
        self.registration = None
        if self.ctx.rank != 0:
            self.callbacks = evaluation
            return
        tracked = self.logger.run_id is not None
        self.callbacks = [cb.MetricRows(self.logger), *evaluation]
        if self.method.samples is not None:
            image = Cadence(tr.image_every or t.checkpoint_every, t.steps) if tracked else None
            self.callbacks.append(cb.SampleGrid(self.method.samples, self.logger, image, Cadence(t.sample_every, t.steps)))
        if tracked and tr.register_name:
            # Through self.method at call time: a rollback to the initial state rebuilds the method.
            self.registration = cb.Registration(lambda *a, **kw: self.method.register(*a, **kw), self.logger, tr.register_name,
                                                self.spec.data.prefix, Cadence(tr.register_every, t.steps))
        self.progress = cb.ProgressMeter(t.steps, t.global_batch, self.method_cls.names.line)
        self.callbacks.append(cb.Progress(self.progress))

    def setup(self) -> None:
        self.logger = run_logger(self.spec, self.run_id if self.ctx.rank == 0 else None,
                                 step_key=self.method_cls.names.step_key)
        self.live = live_metrics(self.spec, self.ctx.rank, self.method_cls.names)
        self.build()
        restore = self.ctx.restore_dir()
        if restore:
            # Messages name the stored checkpoint (s3://.../checkpoint_000400), not a temp copy of it.
            stored = self.ctx.restore_uri or restore
            self.checkpointer.load(restore, shown_as=stored)  # the "loop" part restores state.step
            self.phases.loaded()
            if self.ctx.rank == 0:
                log.info("resuming from %s (step %d)", stored, self.state.step)
        self.state.continue_from(self.state.step)
        if self.state.step == 0:  # sizes, for reports (jobs/reproduce.py's table)
            self.logger.log_event({}, self.method.sizes(), 0)
        self.window.restart(self.state.step)
        self.build_callbacks()

    # ------------------------------------------------------------------ the step

    def on_event(self, event) -> None:
        """A phase event: the method's (EMA reload, D snapshot/reload); a new phase resets the
        watchdog's evaluation best."""
        if event.kind == "phase_enter" and event.phase_index > 0:
            self.recovery.new_phase()
        self.method.on_event(event)

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        phase = self.phases.at(step)
        phase_metrics = self.method.set_lr(phase, self.recovery.lr_factor())
        return {**self.method.step(step, phase), **phase_metrics}

    def ema_model(self) -> torch.nn.Module:
        return self.method.ema_model()

    # ------------------------------------------------------------------ the loop

    def train(self) -> LoopState:
        self.setup()
        t = self.spec.train
        log_cadence = Cadence(t.log_every, t.steps)
        if self.ctx.rank == 0:
            self.progress.start(self.state.step)
        while self.state.step < t.steps:
            step = self.state.step
            self.window.record(self.train_step(step))
            self.state.step = step = step + 1
            at_checkpoint = self.checkpointer.due(step)
            if log_cadence.due(step) or at_checkpoint:
                rows, window = self.window.flush()  # collective, at the same steps on every rank
                trigger = self.recovery.check_rows(rows)
                if trigger:  # the rows are all-reduced: every rank sees the same trigger
                    self.rollback(trigger)
                    continue
                self.state.record(rows)
                self.live.window(rows, window, self.window.times.total, self.window.times.data,
                                 rollbacks=self.recovery.rollbacks)
                if at_checkpoint:
                    self.save_checkpoint(step, rows, window)
                else:
                    self.run_callbacks(cb.Moment.at(step, False, self.ema_model, since=step - 1, rows=rows,
                                                    window=window))
                self.window.restart(step)
            elif self.callbacks:
                self.run_callbacks(cb.Moment.at(step, False, self.ema_model, since=step - 1))
        self.close()
        return self.state

    def run_callbacks(self, moment: cb.Moment) -> cb.Moment:
        for callback in self.callbacks:
            callback(moment)
        return moment

    def save_checkpoint(self, step: int, rows: list[dict], window: dict[str, float]) -> None:
        """Collective: rank 0's callbacks add grids and the evaluation; every rank then gets the
        evaluation metric and runs the same checks (watchdog: a rise rolls back and nothing of this
        checkpoint is written; `phases: auto`: a plateau starts the next phase at this step). Only
        then every rank writes its parts, rank 0 registers, and the checkpoint is reported."""
        t0 = time.perf_counter()
        since = self.checkpointer.last_saved
        # An asynchronous upload (RayContext, run.checkpoint_upload async) takes the staged files over.
        with staging_dir(delete=not self.ctx.takes_staging_dir) as tmp:
            # Grid, evaluation and registration share one EMA copy, made only if one is due.
            moment = self.run_callbacks(cb.Moment.at(step, step == self.spec.train.steps, self.ema_model,
                                                     since=since, checkpoint_dir=Path(tmp), rows=rows,
                                                     window=window))
            value = float("nan")
            if self.phases.decides or self.recovery.decides:
                value = self.shared_metric(moment.metrics.get(self.spec.auto_metric))
            trigger = self.recovery.check_eval(step, value)
            if trigger:
                del moment
                self.rollback(trigger)
                return
            self.live.evaluation(moment.metrics)
            self.phases.decide(step, value, self.logger)
            name = self.recovery.name(step)
            self.recovery.passed(step, name)  # saved with this checkpoint: good from here on
            self.checkpointer.save(tmp, step)
            if self.registration:
                self.registration(moment)
            self.window.times.checkpoint += time.perf_counter() - t0
            metrics = {**self.state.last_row,
                       **self.window.times.as_metrics(), **moment.metrics, "step": step,
                       # how long the previous checkpoint's report held the loop (its upload, when
                       # synchronous): reported with the next one, as a report cannot time itself
                       "time/previous_report": self.report_seconds}
            del moment  # drop the EMA copy before the checkpoint is reported
            self.last_report = metrics
            t_report = time.perf_counter()
            self.ctx.report(metrics, tmp, name)
            self.report_seconds = time.perf_counter() - t_report
            self.live.checkpoint(self.window.times.checkpoint, self.report_seconds)

    def shared_metric(self, value: float | None) -> float:
        """Rank 0's evaluation value (NaN where there was none) on every rank."""
        out = torch.tensor([float("nan") if value is None else float(value)], dtype=torch.float64,
                           device=self.device)
        if self.ctx.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast(out, src=0)
        return float(out.item())

    def rollback(self, trigger: Trigger) -> None:
        """Collective: go back to the last good checkpoint (every rank saw the same trigger), skip
        `watchdog.skip_batches` batches of each stream, and count the rollback; fail past the bound."""
        kept = self.recovery.begin(trigger)
        good = trigger.good_step
        if good == 0:  # the state of step 0, rebuilt as at the start (seeded: identical weights and streams)
            self.state = LoopState(resumes=self.state.resumes, log=self.state.log)
            self.build()
            self.state.continue_from(0)
        else:
            try:
                restored = self.ctx.fetch_checkpoint(trigger.good_name)
            except FileNotFoundError as err:
                raise self.recovery.cannot(trigger, err) from None
            self.checkpointer.load(restored)
            self.phases.loaded()
            self.state.rewind(good)
        self.recovery.finish(trigger, kept)
        # A new data order from here on (the skip is in the next checkpoint).
        self.streams.skip(self.recovery.skip_batches * self.spec.train.grad_accum)
        self.window.restart(good)
        self.logger.rewind(good)  # the replayed steps are logged again
        rollbacks = self.recovery.rollbacks
        self.live.rollback(rollbacks)
        self.logger.log_event({f"watchdog.rollback.{rollbacks}": f"{trigger.kind} at step {trigger.step}: "
                               f"{trigger.reason} -> {self.recovery.where(trigger)}"},
                              {"watchdog/rollbacks": float(rollbacks)}, trigger.step)

    def close(self) -> None:
        self.ctx.drain()  # asynchronous uploads in flight finish before the run ends
        live = getattr(self, "live", None)
        if live is not None:  # the final numbers reach Ray's endpoint before the worker exits
            live.flush()
        if getattr(self, "streams", None) is not None:
            self.streams.close()
        logger = getattr(self, "logger", None)
        if logger is not None:
            registered = self.registration.registered if self.registration else []
            logger.log_final({"step": self.state.step, **self.last_report, "registered": registered,
                              "resumed_from": self.state.resumes})
            logger.close()


def run_worker(config: dict, ctx: WorkerContext, device: torch.device | None = None) -> LoopState:
    """The per-worker entry every launcher calls with its own context.

    config: {"spec": RunSpec.to_dict(), "mlflow_run_id": str | None, "mlflow_uri": str | None}."""
    from advflow.platform.config import RunSpec

    spec = RunSpec.from_dict(config["spec"])
    set_rank(ctx.rank)
    torch.set_num_threads(max(1, spec.distributed.cpus_per_worker))
    if config.get("mlflow_uri"):  # resolved by the driver, so workers need no environment of their own
        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_uri"]
    return TrainLoop(spec, ctx, device=device, run_id=config.get("mlflow_run_id")).train()
