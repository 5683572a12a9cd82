"""What runs around the step cycle: metric rows to MLflow, sample grids, registration and the
progress line on rank 0, and evaluation on every rank (a collective: each rank samples its share).
Each is a callback with its own `Cadence` (one rule, in cadence.py), called by the worker after
every step with a `Moment`.

Two kinds of moments: ordinary steps, and checkpoint steps (`moment.checkpoint_dir` is set, every
rank's state is consistent, and whatever lands in `moment.metrics` is reported with the
checkpoint). Evaluation, registration and the checkpoint's samples.png are checkpoint-bound: their
cadence is checked against the previous checkpoint (`moment.since`), so they land on the first
checkpoint at or after each multiple. MLflow grids and progress lines follow their own cadence at
any step.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from advflow.platform.data.encoders import decode_latents
from advflow.platform.eval import EVALUATORS
from advflow.platform.images import save_grid
from advflow.platform.log import get_logger
from advflow.platform.train.cadence import Cadence
from advflow.platform.train.gather import block_range, gather_rows
from advflow.trainers.flow import euler_sample, generate

log = get_logger(__name__)

GRID_SEED, EVAL_SEED = 1234, 4321  # fixed noise: grids and evaluations compare across steps
GRID_PER_CLASS = 8


@dataclass
class Moment:
    """One step as the callbacks see it."""

    step: int
    final: bool
    ema: Callable[[], torch.nn.Module]
    """The EMA generator; copied at most once per moment (a copy of an XL/2 G is 2.7 GB)."""
    since: int
    """The previous checkpoint's step at a checkpoint (checkpoint-bound cadences), else step - 1."""
    checkpoint_dir: Path | None = None
    rows: list[dict] = field(default_factory=list)
    """The per-step metric rows flushed at this step (all-reduced), if a window closed."""
    window: dict[str, float] = field(default_factory=dict)
    """Throughput of the closed window: samples_per_s, data_wait_frac."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Filled by callbacks (eval/*); reported with the checkpoint."""

    @classmethod
    def at(cls, step: int, final: bool, ema: Callable[[], torch.nn.Module], **kw) -> "Moment":
        return cls(step=step, final=final, ema=functools.cache(ema), **kw)


class Callback(Protocol):
    def __call__(self, moment: Moment) -> None: ...


@dataclass(frozen=True)
class Samples:
    """How to turn generator outputs into pictures for this dataset."""

    data_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    encoder: dict[str, Any]
    """The manifest's encoder record: latents are decoded the way they were made (VAE for sd-vae)."""
    method: str = "afm"
    """`model.method` (afm, fm, meanflow, cafm): how a K other than the model's own is sampled (fm, cafm: Euler on
    its velocity; the others: their generator's sampler, `generate`)."""

    def sample(self, model: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, nfe: int | None = None):
        """The model's samples from noise z with K = nfe steps (None: its own K). FM: Euler steps of
        its velocity (at its own K this is exactly `generate`, which a registered model uses)."""
        if nfe is None or nfe == model.nfe:
            return generate(model, z, y)
        if self.method in ("fm", "cafm"):  # a flow-matching velocity field (cafm post-trains one)
            return euler_sample(model, z, y, nfe)
        return generate(model, z, y, nfe=nfe)  # anystep; the config refuses other K for 1nfe/multistep

    @torch.no_grad()
    def images(self, model: torch.nn.Module, labels: torch.Tensor, gen: torch.Generator,
               batch_size: int | None = None, nfe: int | None = None) -> torch.Tensor:
        """(N,) labels -> decoded images (N, C, H, W) in [-1, 1], noise drawn from `gen` batch by batch."""
        batch_size = batch_size or len(labels)
        out = []
        for i in range(0, len(labels), batch_size):
            y = labels[i:i + batch_size].to(self.device)
            z = torch.randn((len(y), *self.data_shape), generator=gen, device=self.device)
            out.append(decode_latents(self.sample(model, z, y, nfe).cpu(), self.encoder))
        return torch.cat(out)

    def grid(self, model: torch.nn.Module, path: Path) -> None:
        """The fixed-seed grid: one row per class (at most 10), GRID_PER_CLASS samples each."""
        y = torch.arange(min(self.num_classes, 10)).repeat_interleave(GRID_PER_CLASS)
        gen = torch.Generator(device=self.device).manual_seed(GRID_SEED)
        save_grid(self.images(model, y, gen), path, nrow=GRID_PER_CLASS)


class MetricRows:
    """The window's per-step rows to MLflow, with throughput on the last row."""

    def __init__(self, logger):
        self.logger = logger

    def __call__(self, m: Moment) -> None:
        if m.rows:
            self.logger.log_rows(m.rows, m.window)


class SampleGrid:
    """The EMA grid: to MLflow on `image` cadence (None: untracked), and into the checkpoint as
    samples.png on the checkpoint-bound `sample` cadence, at the end, and whenever it is drawn at a
    checkpoint anyway."""

    def __init__(self, samples: Samples, logger, image: Cadence | None, sample: Cadence):
        self.samples, self.logger, self.image, self.sample = samples, logger, image, sample

    def __call__(self, m: Moment) -> None:
        to_mlflow = self.image is not None and self.image.due(m.step)
        at_ckpt = m.checkpoint_dir is not None
        into_ckpt = at_ckpt and (m.final or to_mlflow or self.sample.due(m.step, m.since))
        if not (to_mlflow or into_ckpt):
            return
        with tempfile.TemporaryDirectory(prefix="advflow-grid-") as tmp:
            path = (m.checkpoint_dir if into_ckpt else Path(tmp)) / "samples.png"
            self.samples.grid(m.ema(), path)
            if to_mlflow:
                self.logger.log_grid(path, m.step)


# Evaluation keys that do not depend on the samples: not repeated per K.
_NOT_PER_K = ("eval/fd_floor", "eval/classifier_heldout_acc", "eval/num_samples", "eval/seconds")


class Evaluation:
    """Sample quality (`eval.kind`) of the EMA generator with fixed seeds and class-balanced labels:
    at the model's own K as `eval/...`, and at every K of `eval.nfe` as `eval/...@K` (the same
    noise for every K).

    Collective: every rank runs it at the same checkpoints (the cadence sees the same step and
    `since` everywhere). Sample i has label i % num_classes and lies in block i // eval.batch_size;
    a block's noise comes from a generator seeded by its index, and each rank samples and featurises
    whole blocks of its contiguous share (`gather.block_range`), so sample i's noise and features do
    not depend on the world size. Rank 0 gathers every rank's feature rows in sample order, computes
    the metrics, logs them and puts them in `moment.metrics`; the other ranks return with none (the
    worker broadcasts the metric it decides on)."""

    def __init__(self, samples: Samples, eval_cfg, logger, cadence: Cadence, *, rank: int = 0, world_size: int = 1):
        self.samples, self.cfg, self.logger, self.cadence = samples, eval_cfg, logger, cadence
        self.rank, self.world_size = rank, world_size
        self._evaluator = None  # built at the first evaluation (the digits classifier trains once)

    @staticmethod
    def block_seed(block: int) -> int:
        return EVAL_SEED * 1_000_003 + block  # one stream per block, and never a grid's seed

    def features(self, model: torch.nn.Module, labels: torch.Tensor, nfe: int | None):
        """This rank's rows: its blocks sampled and featurised one block at a time, in sample order."""
        s, b = self.samples, int(self.cfg.batch_size)
        rows = []
        for block in block_range(len(labels), b, self.rank, self.world_size):
            gen = torch.Generator(device=s.device).manual_seed(self.block_seed(block))
            y = labels[block * b:(block + 1) * b]
            rows.append(self._evaluator.features(s.images(model, y, gen, b, nfe)))
        return np.concatenate(rows) if rows else np.zeros((0, 0))

    def __call__(self, m: Moment) -> None:
        if m.checkpoint_dir is None or not self.cadence.due(m.step, m.since):
            return
        t0 = time.perf_counter()
        s, ev = self.samples, self.cfg
        if self._evaluator is None:
            self._evaluator = EVALUATORS[ev.kind].build(ev, encoder=s.encoder, data_shape=s.data_shape,
                                                        num_classes=s.num_classes)
        labels = torch.arange(ev.num_samples) % s.num_classes
        model = m.ema()

        def at(nfe: int | None) -> dict[str, float]:
            try:
                local, error = self.features(model, labels, nfe), None
            except Exception as exc:  # told to the other ranks first, so none waits for this one's rows
                local, error = None, exc
            rows = gather_rows(local, rank=self.rank, world_size=self.world_size, device=s.device, error=error)
            return dict(self._evaluator.metrics_from_features(rows, labels)) if self.rank == 0 else {}

        own = at(None)
        out = dict(own)
        for k in ev.nfe or []:
            per_k = own if k == model.nfe else at(k)
            out.update({f"{key}@{k}": v for key, v in per_k.items() if key not in _NOT_PER_K})
        if self.rank != 0:
            return
        out["eval/seconds"] = time.perf_counter() - t0
        shown = {k: v for k, v in out.items() if k.split("@")[0] in ("eval/fd", "eval/fid", "eval/cls_acc")}
        log.info("eval at step %d: %s (%.1f s)", m.step, ", ".join(f"{k} {v:.4g}" for k, v in shown.items()),
                 out["eval/seconds"])
        self.logger.log_metrics(out, m.step)
        m.metrics.update(out)


class Registration:
    """Log and register the EMA model (pickle-free, in the method's format: `register`) with this
    checkpoint's eval metrics (the LoggedModel's metrics, linked to the run and to the dataset the
    data tags name) and the run's data tags (version tags)."""

    def __init__(self, register: Callable[..., Any], logger, name: str, data_prefix: str, cadence: Cadence):
        self.register, self.logger, self.name, self.prefix, self.cadence = register, logger, name, data_prefix, cadence
        self.registered: list[dict] = []

    def __call__(self, m: Moment) -> None:
        if m.checkpoint_dir is None or not self.cadence.due(m.step, m.since):
            return
        tags = {"data.prefix": self.prefix, **self.logger.data_tags}
        metrics = {k: v for k, v in m.metrics.items() if k != "eval/seconds"}
        reg = self.register(m.ema(), name=self.name, step=m.step, tags=tags, metrics=metrics, run_id=self.logger.run_id)
        self.registered.append({"step": m.step, "model_uri": reg.model_uri, "version": reg.version})
        log.info("registered %s version %s (step %d)", self.name, reg.version, m.step)


class ProgressMeter:
    """The progress line and its ETA maths, shared by the loop and the driver's Ray callback.
    `summary` renders the method's losses (`MetricNames.line`: 'D 0.6931 G 0.6931').

    The rate is measured between two moments of one attempt: `start` (the loop, once its state is
    restored) or a previous line. Until there are two, it is not known, and the line says so
    (`— samples/s`, `ETA —`) instead of printing 0.0 samples/s and a NaN ETA. A new attempt (a
    restart: the driver's callback calls `new_attempt`) or a step that went back (a rollback) forgets
    the mark: the time in between was spent restarting or redoing steps, not on this attempt's steps,
    and the first report of a resumed attempt (at a step > 0) is no rate from step 0 either."""

    UNKNOWN = "—"

    def __init__(self, total_steps: int, global_batch: int, summary: Callable[[dict], str] | None = None):
        self.total, self.batch = total_steps, global_batch
        self.summary = summary or (lambda metrics: "")
        self._mark: tuple[float, int] | None = None

    def start(self, step: int, now: float | None = None) -> None:
        """This attempt begins at `step` now (the next line's rate is measured from here)."""
        self._mark = (time.perf_counter() if now is None else now, step)

    def new_attempt(self) -> None:
        """A new attempt is about to begin (e.g. after a worker failure): the next line's rate is
        unknown, unless `start` is called first."""
        self._mark = None

    def rate(self, step: int, now: float) -> float | None:
        """Steps per second since the mark, or None when there is no mark of this attempt to measure
        from (first line, after a restart or a rollback, or no time passed)."""
        if self._mark is None:
            return None
        then, last = self._mark
        if step <= last or now <= then:
            return None
        return (step - last) / (now - then)

    def line(self, step: int, metrics: dict, now: float | None = None, suffix: str = "") -> str:
        now = time.perf_counter() if now is None else now
        rate = self.rate(step, now)
        self._mark = (now, step)
        if rate is None:
            speed, eta = f"{self.UNKNOWN} samples/s", self.UNKNOWN
        else:
            speed, eta = f"{rate * self.batch:.1f} samples/s", f"{max(self.total - step, 0) / rate:.0f}s"
        return (f"step {step}/{self.total} | {speed} | {self.summary(metrics)} | "
                f"data wait {100 * metrics.get('time/data_wait_frac', 0.0):.1f}% | ETA {eta}{suffix}")


class Progress:
    """A line per metric window between checkpoints (the driver prints one at each checkpoint).

    Not through ctx.report: Ray Train's controller takes one report per poll (2 s), so reporting
    every few steps would stall fast training loops (measured: 2.2x slower)."""

    def __init__(self, meter: ProgressMeter):
        self.meter = meter

    def __call__(self, m: Moment) -> None:
        if m.rows and m.checkpoint_dir is None:
            # Each key's latest value in the window (a key may be recorded on some steps only: CAFM's g_loss).
            latest: dict = {}
            for row in m.rows:
                latest.update(row)
            metrics = {**latest, "time/data_wait_frac": m.window.get("data_wait_frac", 0.0)}
            log.info(self.meter.line(m.step, metrics))
