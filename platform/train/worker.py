"""The worker loop: G, D and EMA(G) in two DeepSpeed engines, alternating D and G steps.

Ray-free on purpose: `Worker` talks to the outside world only through a `WorkerContext` (rank,
world size, report, checkpoint restore). `ray_launch` gives it Ray Train's context; `local_launch`
and tests give it a plain torch.distributed one. The worker owns the step cycle only: checkpoints
are the `Checkpointer`'s (given named parts), and grids, evaluation, registration and progress are
callbacks (callbacks.py), each with its own cadence.

Determinism (what makes resume and the ZeRO-equivalence test exact): every random draw of step k
comes from a generator seeded by (seed, k, micro-batch, purpose[, rollbacks]) and is keyed by the
sample's row in the global batch, not by the rank (trainers/draws.py); the data streams read one
global order and resume from their own state. So a restored run replays the same numbers without
saving RNG states mid-step, on the same number of workers or another (elastic resume).

Two methods share the loop (`model.method`): `afm` alternates a D step and a G step (two engines);
`fm`, the flow-matching baseline, takes one velocity-regression step of G (one engine, one data
stream). Around the steps, two controllers decide from numbers every rank agrees on (all-reduced
metric rows, and the evaluation metric broadcast from rank 0): the divergence watchdog
(`trainers.watchdog`, rolls back to the last good checkpoint) and `phases: auto`
(`trainers.schedules.AutoPhases`, starts the next phase on a plateau). Both are checkpointed.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from advflow.platform.config import RunSpec
from advflow.platform.data.reader import LatentStream
from advflow.platform.log import get_logger, set_rank
from advflow.platform.tracking.logger import run_logger
from advflow.platform.train import callbacks as cb
from advflow.platform.train.cadence import Cadence
from advflow.platform.train.checkpoint import (Checkpointer, EMAState, JSONEntries, NamedJSON, PerRankJSON,
                                               SharedJSON, SnapshotFiles, TensorFile, staging_dir)
from advflow.platform.train.engines import EngineSpec, EngineState, build_engine, read_weights, set_lr, write_weights
from advflow.platform.train.metrics import MetricWindow
from advflow.platform.train.metrics_log import MetricsLog
from advflow.trainers import afm, draws, fm
from advflow.trainers.ema import EMA
from advflow.trainers.models import build_discriminator, build_generator
from advflow.trainers.schedules import AutoPhases, PhasePlan
from advflow.trainers.watchdog import Trigger, Watchdog, WatchdogParams

log = get_logger(__name__)


class WorkerContext(Protocol):
    """What the loop needs from its launcher."""

    rank: int
    world_size: int

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str | None = None) -> None:
        """Report metrics (every rank, same points) and the staged checkpoint, stored under `name`."""

    def restore_dir(self) -> str | None:
        """A local directory holding the latest complete checkpoint, or None for a fresh start."""

    def fetch_checkpoint(self, name: str) -> str:
        """A local directory holding this run's reported checkpoint `name` (the watchdog's
        rollback); raises if it is no longer kept."""

    def run_storage(self) -> str:
        """This run's storage (`<run.storage_path>/<run.name>`, local or s3://): where the
        checkpoints and the metrics log live."""


class WatchdogError(RuntimeError):
    """The watchdog fired after its rollbacks were used up (the message names trigger, step and checkpoint)."""


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
    """Rank 0's metrics log under the run's storage (`ctx.run_storage()`; test contexts without
    one keep no log)."""
    where = getattr(ctx, "run_storage", None)
    return MetricsLog(where()) if ctx.rank == 0 and where is not None else None


def checkpoint_name(step: int, rollbacks: int = 0) -> str:
    """The stored name of a checkpoint: after a rollback a replayed step gets a new name, so a
    name never points at two different states."""
    return f"checkpoint_{step:06d}" + (f"_r{rollbacks}" if rollbacks else "")


def step_seed(*parts: int) -> int:
    """A 63-bit seed from small integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Worker:
    """One worker's share of an AFM run. Construct, then call `train()`."""

    spec: RunSpec
    ctx: WorkerContext
    device: torch.device
    plan: PhasePlan
    state: LoopState
    streams: dict[str, LatentStream]
    """The "d" and "g" data streams (separate record sequences for D's and G's steps)."""
    G: torch.nn.Module
    D: torch.nn.Module
    ema: EMA
    gradnorm: torch.nn.Module
    g_engine: Any
    d_engine: Any
    d_tags: dict[str, dict[str, torch.Tensor]]
    """D snapshots taken at phase ends (and at the best evaluation under `phases: auto`), for
    Table 11's D reload."""
    watchdog: Watchdog | None
    """The divergence watchdog (`watchdog.enabled`)."""
    auto: AutoPhases | None
    """`phases: auto`: decides phase starts at evaluations; `plan` follows it."""
    classifier: torch.nn.Module | None
    """The frozen guidance classifier (`guidance.classifier`), loaded when a phase turns guidance on."""
    window: MetricWindow
    checkpointer: Checkpointer
    callbacks: list[cb.Callback]
    logger: Any
    """Rank 0's RunLogger on the driver's MLflow run; a NullRunLogger elsewhere or untracked."""

    def __init__(self, spec: RunSpec, ctx: WorkerContext, *, device: torch.device | None = None,
                 stream_factory: Callable[..., Any] | None = None, run_id: str | None = None):
        self.spec, self.ctx = spec, ctx
        self.fm = spec.model.method == "fm"
        # On the workers there are (an elastic run may have fewer than distributed.workers).
        self.micro_batch = spec.micro_batch_for(ctx.world_size)
        self.device = device or torch.device("cpu")
        self.run_id = run_id  # the MLflow run opened by the driver; only rank 0 logs to it
        self.stream_factory = stream_factory or LatentStream
        self.auto = spec.auto_controller()
        self.plan = self.auto.plan() if self.auto else spec.phase_plan()
        w = spec.watchdog
        self.watchdog = Watchdog(WatchdogParams(
            max_rollbacks=w.max_rollbacks, logit_bound=w.logit_bound, grad_spike=w.grad_spike,
            grad_window=w.grad_window, rise_patience=w.rise_patience if spec.eval.kind != "none" else 0,
            rise_tolerance=w.rise_tolerance, mode=spec.auto_phases.mode)) if w.enabled else None
        a = spec.adversarial
        self.afm_cfg = afm.AFMConfig(gp_fraction=a.gp_fraction, gp_eps=a.gp_eps, use_gradnorm=a.gradnorm,
                                     gradnorm_momentum=a.gradnorm_momentum, source=a.source,
                                     cg_t_mode=spec.cg_t_mode)
        self.classifier = None
        self.state = LoopState(log=metrics_log(ctx))
        self.d_tags = {}
        self.callbacks = []
        self.registration: cb.Registration | None = None
        self.last_report: dict = {}  # the latest checkpoint's metrics (final_metrics.json)
        self.report_seconds = 0.0  # the latest checkpoint's report (upload) time

    # ------------------------------------------------------------------ building

    def build_data(self) -> None:
        d, rank, world = self.spec.data, self.ctx.rank, self.ctx.world_size
        for s in getattr(self, "streams", {}).values():
            s.close()  # a rollback to the initial state rebuilds the streams
        names = ("g",) if self.fm else ("d", "g")  # FM: one step per iteration, one stream
        self.streams = {name: self.stream_factory(d.prefix, self.micro_batch, stream=name, rank=rank,
                                                  world_size=world, seed=self.spec.train.seed, order=d.order,
                                                  shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch)
                        for name in names}
        m = self.manifest = self.streams[names[0]].manifest
        self.data_shape, self.num_classes = tuple(m.shape), int(m.num_classes)
        self.reset_iterators()

    def reset_iterators(self) -> None:
        self.iters = {k: iter(s) for k, s in self.streams.items()}

    def model_options(self) -> tuple[dict, dict]:
        m = self.spec.model
        c, h, _ = self.data_shape
        common = dict(in_channels=c, input_size=h, num_classes=self.num_classes)
        return dict(common, kind=m.kind, nfe=m.nfe, repeats=m.repeats), dict(common, time_cond=m.kind != "1nfe")

    def build_models(self) -> None:
        g_opts, d_opts = self.model_options()
        torch.manual_seed(self.spec.train.seed)  # identical initial weights on every rank
        self.G = build_generator(self.spec.model.size, **g_opts).to(self.device)
        self.ema = EMA(self.G, decay=self.spec.optim.ema_decay)
        if self.fm:  # flow matching: G alone
            self.D = self.gradnorm = None
            return
        self.D = build_discriminator(self.spec.model.d_size or self.spec.model.size, **d_opts).to(self.device)
        self.gradnorm = afm.make_gradnorm(self.afm_cfg).to(self.device)
        if any(p.get("guidance") for p in self.spec.phase_dicts()):
            self.classifier = self.load_classifier()

    def load_classifier(self) -> torch.nn.Module:
        """The guidance classifier, pickle-free, frozen, on this worker's device; its data shape and
        classes must be the run's."""
        from advflow.platform.tracking.registry import load_classifier

        ref = self.spec.guidance.classifier
        clf = load_classifier(ref, device=self.device)
        want = (self.data_shape, self.num_classes)
        got = ((clf.in_channels, clf.input_size, clf.input_size), clf.num_classes)
        if got != want:
            raise ValueError(f"guidance.classifier={ref}: it classifies {got[0]} inputs into {got[1]} classes, "
                             f"but this run's data is {want[0]} with {want[1]} classes; train a classifier on "
                             "this dataset (jobs/train_classifier.py)")
        return clf.eval().requires_grad_(False)

    def build_engines(self) -> None:
        o, t, dcfg = self.spec.optim, self.spec.train, self.spec.distributed
        bf16 = dcfg.precision == "bf16" or (dcfg.precision == "auto" and dcfg.use_gpu)
        base = dict(micro_batch=self.micro_batch, grad_accum=t.grad_accum, lr=o.lr, betas=o.betas,
                    weight_decay=o.weight_decay, eps=o.eps, grad_clip=o.grad_clip, bf16=bf16)
        self.g_engine = build_engine(self.G, EngineSpec(stage=dcfg.zero_stage_g, **base))
        self.d_engine = None if self.fm else build_engine(self.D, EngineSpec(stage=dcfg.zero_stage_d, **base))

    def build_checkpointer(self) -> None:
        t = self.spec.train
        parts = {"g": EngineState(self.g_engine, "g"), "ema": EMAState(self.ema)}
        if not self.fm:
            parts.update({"d": EngineState(self.d_engine, "d"),
                          "gradnorm": TensorFile(self.gradnorm, "gradnorm.safetensors"),
                          "d_tags": SnapshotFiles(self.d_tags)})
        # data.order global: the streams' state is the same on every rank and the whole checkpoint
        # is independent of the number of workers (elastic resume); partitioned: one file per rank.
        elastic = self.spec.data.order == "global"
        readers = (SharedJSON if elastic else PerRankJSON)(self.streams, after_load=self.reset_iterators)
        parts.update({"readers": readers, "loop": JSONEntries(self.state)})
        if self.watchdog:
            parts["watchdog"] = NamedJSON("watchdog", self.watchdog)
        if self.auto:
            parts["auto_phases"] = NamedJSON("auto_phases", self.auto)
        self.checkpointer = Checkpointer(
            parts, rank=self.ctx.rank, world_size=self.ctx.world_size, every=t.checkpoint_every, last_step=t.steps,
            config=self.spec.to_dict(), elastic=elastic)

    def build_callbacks(self) -> None:
        """The callbacks, in the order they run at a step. Evaluation runs on every rank (a
        collective: each samples its share) and first, so no rank waits for rank 0's grid before it;
        it precedes registration, which tags the model with it. The rest are rank 0's."""
        t, tr, ev = self.spec.train, self.spec.tracking, self.spec.eval
        samples = cb.Samples(self.data_shape, self.num_classes, self.device, self.manifest.encoder,
                             method=self.spec.model.method)
        evaluation = [cb.Evaluation(samples, ev, self.logger, Cadence(ev.every, t.steps), rank=self.ctx.rank,
                                    world_size=self.ctx.world_size)] if ev.kind != "none" else []
        if self.ctx.rank != 0:
            self.callbacks = evaluation
            return
        tracked = self.logger.run_id is not None
        image = Cadence(tr.image_every or t.checkpoint_every, t.steps) if tracked else None
        self.callbacks = [cb.MetricRows(self.logger), *evaluation,
                          cb.SampleGrid(samples, self.logger, image, Cadence(t.sample_every, t.steps))]
        if tracked and tr.register_name:
            self.registration = cb.Registration(samples, self.logger, tr.register_name, self.spec.data.prefix,
                                                Cadence(tr.register_every, t.steps),
                                                tags={"method": self.spec.model.method})
            # Registration runs after the checkpoint's checks passed (save_checkpoint), never before.
        self.progress = cb.ProgressMeter(t.steps, t.global_batch)
        self.callbacks.append(cb.Progress(self.progress))

    def setup(self) -> None:
        self.logger = run_logger(self.spec, self.run_id if self.ctx.rank == 0 else None)
        self.build_data()
        self.build_models()
        self.build_engines()
        self.build_checkpointer()
        restore = self.ctx.restore_dir()
        if restore:
            self.checkpointer.load(restore)  # the "loop" part restores state.step
            if self.auto:
                self.plan = self.auto.plan()  # the phases the checkpointed run had decided
        self.state.continue_from(self.state.step)
        if self.state.step == 0:  # sizes, for reports (jobs/reproduce.py's table)
            sizes = {"model/g_params": float(sum(p.numel() for p in self.G.parameters()))}
            if self.D is not None:
                sizes["model/d_params"] = float(sum(p.numel() for p in self.D.parameters()))
            self.logger.log_event({}, sizes, 0)
        self.window = MetricWindow(self.device, self.ctx.world_size, self.spec.train.global_batch)
        self.window.restart(self.state.step)
        self.build_callbacks()

    # ------------------------------------------------------------------ steps

    def next_batch(self, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        x, y = next(self.iters[stream])
        self.window.times.data += time.perf_counter() - t0
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _generator(self, step: int, micro: int, purpose: int) -> draws.BatchSlice:
        """The draws of one micro-batch: seeded alike on every rank, keyed by each sample's row in
        the global micro-batch (trainers/draws.py), so the noise does not depend on the number of
        workers and a run resumes exactly on another number (the data streams' order is global too)."""
        g = torch.Generator(device=self.device)
        parts = [self.spec.train.seed, step, micro, purpose]
        if self.watchdog and self.watchdog.rollbacks:
            parts.append(self.watchdog.rollbacks)  # new noise after a rollback (checkpointed: resumable)
        g.manual_seed(step_seed(*parts))
        mb = self.micro_batch
        return draws.BatchSlice(g, start=self.ctx.rank * mb, rows=mb, total=self.ctx.world_size * mb)

    def _inject_nan(self, step: int) -> bool:
        """debug.inject_nan_step: the fault the watchdog's tests inject into G's loss."""
        dbg = self.spec.debug
        if dbg.inject_nan_step != step:
            return False
        attempts = dbg.inject_nan_attempts
        return attempts == 0 or (self.watchdog.rollbacks if self.watchdog else 0) < attempts

    def d_step(self, step: int, cfg: afm.AFMConfig) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        metrics = {}
        for micro in range(self.spec.train.grad_accum):
            x, y = self.next_batch("d")
            gen = self._generator(step, micro, 1)
            z = draws.randn(x.shape, gen, device=self.device)
            # G's plain module under no_grad inside d_loss: G's engine never sees this graph.
            loss, metrics = afm.d_loss(self.G, self.d_engine, x, y, z, cfg, generator=gen)
            self.d_engine.backward(loss)
            self.d_engine.step()
        _add_grad_norm(metrics, "d_grad_norm", self.d_engine, self.device)
        self.window.times.d_step += time.perf_counter() - t0
        return metrics

    def g_step(self, step: int, cfg: afm.AFMConfig) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        metrics = {}
        for micro in range(self.spec.train.grad_accum):
            x, y = self.next_batch("g")
            gen = self._generator(step, micro, 2)
            z = draws.randn(x.shape, gen, device=self.device)
            # D's plain module with frozen parameters: D's engine hooks stay silent (engines.py).
            loss, metrics = afm.g_loss(self.g_engine, self.D, self.gradnorm, x, y, z, cfg, self.classifier,
                                       generator=gen)
            if self._inject_nan(step):
                loss = loss + float("nan")
                metrics["g_loss"] = loss.detach()
            self.g_engine.backward(loss)
            self.g_engine.step()
        _add_grad_norm(metrics, "g_grad_norm", self.g_engine, self.device)
        self.ema.update(self.G)
        self.window.times.g_step += time.perf_counter() - t0
        return metrics

    def fm_step(self, step: int) -> dict[str, torch.Tensor]:
        """One flow-matching update of G: regress G.velocity(x_t, y, t) onto z - x (fm.fm_loss).

        The velocity is the module's own method, called through the engine's attribute access
        (DeepSpeed's forward adds nothing at ZeRO 0-2; its gradient hooks sit on the parameters)."""
        t0 = time.perf_counter()
        loss = None
        for micro in range(self.spec.train.grad_accum):
            x, y = self.next_batch("g")
            gen = self._generator(step, micro, 2)
            z = draws.randn(x.shape, gen, device=self.device)
            t = fm.sample_fm_times(len(x), self.spec.model.fm_times, generator=gen, device=self.device)
            loss = fm.fm_loss(self.g_engine.module, x, y, z, t)
            if self._inject_nan(step):
                loss = loss + float("nan")
            self.g_engine.backward(loss)
            self.g_engine.step()
        metrics = {"fm_loss": loss.detach()}
        _add_grad_norm(metrics, "g_grad_norm", self.g_engine, self.device)
        self.ema.update(self.G)
        self.window.times.g_step += time.perf_counter() - t0
        return metrics

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.apply_phase(step)
        if self.fm:
            return {**self.fm_step(step), **self.phase_metrics()}
        return {**self.d_step(step, cfg), **self.g_step(step, cfg), **self.phase_metrics()}

    def lr_factor(self) -> float:
        """watchdog.lr_factor per rollback so far (1 without rollbacks)."""
        n = self.watchdog.rollbacks if self.watchdog else 0
        return self.spec.watchdog.lr_factor ** n

    def apply_phase(self, step: int) -> afm.AFMConfig:
        params = self.plan.at(step)
        for event in self.plan.events(step):
            self.handle_event(event)
        f = self.lr_factor()
        set_lr(self.g_engine, params.lr * self.G.lr_scale * f)
        if self.d_engine is not None:
            set_lr(self.d_engine, params.lr_d * f)
        self._phase = params
        return self.afm_cfg.with_phase(params)

    def handle_event(self, event) -> None:
        """Phase events (Table 11): EMA reload, and D snapshots at phase ends for a later D reload.

        Reloads go through the engines (`engines.write_weights`), so the optimizer's fp32 master
        copy (ZeRO 1/2, bf16) takes the new weights too and the next step continues from them. D
        snapshots hold D's weights only (replicated under ZeRO 0-2, so every rank keeps its own
        copy); a reload replaces the weights and keeps the optimizer's moments, and the snapshots
        travel in every checkpoint so a restarted run can still reload."""
        if event.kind == "ema_reload":
            write_weights(self.g_engine, self.ema.shadow)
        elif event.kind == "save_tag" and self.d_engine is not None:  # FM has no D to snapshot
            self.d_tags[event.tag] = read_weights(self.d_engine)  # fp32 master where there is one
        elif event.kind == "d_reload":
            source = event.source if isinstance(event.source, str) else None
            if source not in self.d_tags:
                raise ValueError(
                    f"phase {event.phase_index}: d_reload_from={event.source!r} is not a saved D snapshot; "
                    f"available: {sorted(self.d_tags)} (snapshots are taken at phase ends, named "
                    "'<phase>_end', and under phases: auto at the best evaluation, named 'best'; reloading "
                    "from a step number is not supported)")
            write_weights(self.d_engine, self.d_tags[source])
        elif event.kind == "phase_enter" and event.phase_index > 0 and self.watchdog:
            self.watchdog.new_phase()
        # phase_enter is also recorded in the history via the phase index.

    def phase_metrics(self) -> dict[str, float]:
        p, f = self._phase, self.lr_factor()
        out = {"lr": p.lr * f, "lr_g": p.lr * self.G.lr_scale * f, "phase": float(p.phase_index)}
        if self.fm:
            return out
        return {**out, "lambda_ot": p.lambda_ot, "lambda_gp": p.lambda_gp, "lambda_cp": p.lambda_cp,
                "lambda_cg": p.lambda_cg, "augment_p": p.augment_p, "lr_d": p.lr_d * f}

    def ema_model(self) -> torch.nn.Module:
        """A detached copy of G holding the EMA weights (the model that is sampled and shipped)."""
        model = copy.deepcopy(self.G).eval()
        with torch.no_grad():
            self.ema.copy_to(model)
        return model

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
                trigger = self.watchdog.check_rows(rows) if self.watchdog else None
                if trigger:  # the rows are all-reduced: every rank sees the same trigger
                    self.rollback(trigger)
                    continue
                self.state.record(rows)
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
        with staging_dir(delete=not getattr(self.ctx, "takes_staging_dir", False)) as tmp:
            # Grid, evaluation and registration share one EMA copy of G, made only if one is due.
            moment = self.run_callbacks(cb.Moment.at(step, step == self.spec.train.steps, self.ema_model,
                                                     since=since, checkpoint_dir=Path(tmp), rows=rows,
                                                     window=window))
            value = self.shared_metric(moment.metrics.get(self.spec.auto_metric)) if self.uses_metric else float("nan")
            trigger = self.watchdog.check_eval(step, value) if self.watchdog else None
            if trigger:
                del moment
                self.rollback(trigger)
                return
            self.decide_phase(step, value)
            name = checkpoint_name(step, self.watchdog.rollbacks if self.watchdog else 0)
            if self.watchdog and not self.watchdog.rising:
                self.watchdog.mark_good(step, name)  # saved with this checkpoint: good from here on
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

    # ------------------------------------------------------------------ decisions every rank agrees on

    @property
    def uses_metric(self) -> bool:
        """Whether rank 0's evaluation metric is shared with every rank at checkpoints (a collective)."""
        return self.auto is not None or bool(self.watchdog and self.watchdog.params.rise_patience)

    @property
    def snapshot_best(self) -> bool:
        """Whether D is snapshotted at each new best evaluation: only if a phase reloads it from there."""
        return self.auto is not None and any(t.get("d_reload_from") == "best" for t in self.auto.templates)

    def shared_metric(self, value: float | None) -> float:
        """Rank 0's evaluation value (NaN where there was none) on every rank."""
        out = torch.tensor([float("nan") if value is None else float(value)], dtype=torch.float64,
                           device=self.device)
        if self.ctx.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast(out, src=0)
        return float(out.item())

    def decide_phase(self, step: int, value: float) -> None:
        """`phases: auto`: feed the evaluation; snapshot D at a new best (`d_reload_from: best`);
        start the next phase at `step` on a plateau, logged as a metric, a tag and a line."""
        if self.auto is None or value != value:  # NaN: no evaluation at this checkpoint
            return
        best_before = self.auto.best_step
        transition = self.auto.observe(step, value)
        if self.auto.best_step != best_before and self.snapshot_best and self.d_engine is not None:
            self.d_tags["best"] = read_weights(self.d_engine)
        if transition is None:
            return
        self.plan = self.auto.plan()
        log.info("phases: auto: %s -> %s at step %d (%s)", transition.from_name, transition.to_name,
                 step, transition.reason)
        # The tag holds the transition as JSON (jobs/reproduce.py reads it back for its report).
        self.logger.log_event({f"phase.transition.{transition.to_index}": json.dumps(transition.to_dict())},
                              {"phase/transition": float(transition.to_index)}, step)

    def rollback(self, trigger: Trigger) -> None:
        """Collective: go back to the last good checkpoint (every rank saw the same trigger), skip
        `watchdog.skip_batches` batches of each stream, and count the rollback; fail past the bound."""
        wd, good = self.watchdog, trigger.good_step
        where = f"checkpoint of step {good}" if good else "the initial state (no good checkpoint yet)"
        if trigger.exhausted:
            raise WatchdogError(f"watchdog: {trigger.kind} at step {trigger.step} ({trigger.reason}); "
                                f"{wd.rollbacks} rollback(s) used, the bound watchdog.max_rollbacks is "
                                f"{wd.params.max_rollbacks}; last good state: {where}")
        log.warning("watchdog: %s at step %d (%s); rolling back to %s (rollback %d of %d)", trigger.kind,
                    trigger.step, trigger.reason, where, wd.rollbacks + 1, wd.params.max_rollbacks)
        rollbacks, events = wd.rollbacks, list(wd.events)
        if good == 0:
            self.reset_to_initial()
            self.state.continue_from(0)
        else:
            try:
                restored = self.ctx.fetch_checkpoint(trigger.good_name)
            except FileNotFoundError as err:
                raise WatchdogError(f"watchdog: {trigger.kind} at step {trigger.step} ({trigger.reason}); cannot roll "
                                    f"back: {err}") from None
            self.checkpointer.load(restored)
            self.state.rewind(good)
        wd.rollbacks, wd.events = rollbacks, events  # the loaded state predates this rollback
        wd.rolled_back(trigger)
        if self.auto:
            self.plan = self.auto.plan()
        for it in self.iters.values():  # a new data order from here on (the skip is in the next checkpoint)
            for _ in range(self.spec.watchdog.skip_batches * self.spec.train.grad_accum):
                next(it)
        self.window.restart(good)
        self.logger.rewind(good)  # the replayed steps are logged again
        self.logger.log_event({f"watchdog.rollback.{wd.rollbacks}": f"{trigger.kind} at step {trigger.step}: "
                               f"{trigger.reason} -> {where}"}, {"watchdog/rollbacks": float(wd.rollbacks)},
                              trigger.step)

    def reset_to_initial(self) -> None:
        """The state of step 0, rebuilt as at the start (seeded: identical weights and streams)."""
        self.d_tags.clear()
        self.state = LoopState(resumes=self.state.resumes, log=self.state.log)
        self.build_data()
        self.build_models()
        self.build_engines()
        self.auto = self.spec.auto_controller()
        self.build_checkpointer()

    def close(self) -> None:
        drain = getattr(self.ctx, "drain", None)
        if drain is not None:
            drain()  # asynchronous uploads in flight finish before the run ends
        for s in getattr(self, "streams", {}).values():
            s.close()
        logger = getattr(self, "logger", None)
        if logger is not None:
            registered = self.registration.registered if self.registration else []
            logger.log_final({"step": self.state.step, **self.last_report, "registered": registered,
                              "resumed_from": self.state.resumes})
            logger.close()


def _add_grad_norm(metrics: dict, key: str, engine, device) -> None:
    """DeepSpeed's global gradient norm of the last step (computed when clipping or ZeRO needs it)."""
    norm = engine.get_global_grad_norm()
    if norm is not None:  # a tensor under ZeRO 1/2: kept on device, no per-step host sync
        metrics[key] = torch.as_tensor(norm).detach().float().to(device)


def run_worker(config: dict, ctx: WorkerContext, device: torch.device | None = None) -> LoopState:
    """The per-worker entry every launcher calls with its own context.

    config: {"spec": RunSpec.to_dict(), "mlflow_run_id": str | None, "mlflow_uri": str | None}."""
    spec = RunSpec.from_dict(config["spec"])
    set_rank(ctx.rank)
    torch.set_num_threads(max(1, spec.distributed.cpus_per_worker))
    if config.get("mlflow_uri"):  # resolved by the driver, so workers need no environment of their own
        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_uri"]
    return Worker(spec, ctx, device=device, run_id=config.get("mlflow_run_id")).train()
