"""What a training method is on the loop (loop.py), and what the loop hands it.

A method is one class with a `build(env)` factory. It declares what it needs and does one step:
- `streams` (class attribute): the data streams it reads, each its own record sequence;
- `engines`: its DeepSpeed engines by name (checkpointed as `<name>/`, timed as `time/<name>_step`);
- `parts()`: its checkpoint parts (engines, EMA, snapshots, ...);
- `names`: its metric names (the progress line's losses, the watchdog's keys);
- `step(k, phase)`: one iteration, returning its per-step metrics (device tensors);
- `samples` / `evaluation(...)`: its sampler for grids and its evaluation callback;
- `register(...)`: its registered model format.
The loop owns everything else: the step cycle, metric windows, the phase controller, recovery,
checkpoints and callbacks. `METHODS` (methods/__init__.py) maps `model.method` to the class.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol

import torch

from advflow.trainers import draws

if TYPE_CHECKING:
    from advflow.platform.config import RunSpec
    from advflow.platform.train.callbacks import Callback, Samples
    from advflow.platform.train.checkpoint import Part
    from advflow.platform.train.streams import Streams
    from advflow.trainers.schedules import PhaseParams


@dataclass(frozen=True)
class MetricNames:
    """A method's metric names: what the progress line shows and what the watchdog checks."""

    progress: tuple[tuple[str, str], ...]
    """(label, metric) pairs of the progress line, e.g. (("D", "d_loss"), ("G", "g_loss"))."""
    losses: tuple[str, ...] = ()
    """Must stay finite (the watchdog's non-finite check); the first is the run's step key in MLflow."""
    grads: tuple[str, ...] = ()
    """Gradient norms: finite, and the watchdog's spike check."""
    logits: tuple[str, ...] = ()
    """Mean logits bounded by watchdog.logit_bound."""
    terms: tuple[str, ...] = ()
    """Loss terms (exported live as losses: tracking/live.py)."""
    every_step: str = ""
    """A metric the method records at EVERY step (the run logger finds the steps an earlier attempt
    logged by it); empty: the first loss. A method whose losses appear on some steps only (CAFM)
    names another."""

    @property
    def step_key(self) -> str:
        return self.every_step or self.losses[0]

    def line(self, metrics: dict[str, float]) -> str:
        """The progress line's loss part: 'D 0.6931 G 0.6931'."""
        nan = float("nan")
        return " ".join(f"{label} {metrics.get(key, nan):.4f}" for label, key in self.progress)


@dataclass
class StepEnv:
    """What the loop gives a method when it builds it (and again when a rollback rebuilds it)."""

    spec: RunSpec
    rank: int
    world_size: int
    device: torch.device
    micro_batch: int
    """Samples per worker and micro-step (the global batch stays train.global_batch)."""
    streams: Streams
    """The method's data streams (`streams.next(name)` -> (x, y) on the device, timed as data wait)."""
    rollbacks: Callable[[], int] = lambda: 0
    """Rollbacks so far (the watchdog's): the draws after a rollback are new."""
    times: dict[str, float] = field(default_factory=dict)
    """Seconds per engine step since the window opened (the loop reads and resets it)."""

    @property
    def manifest(self):
        return self.streams.manifest

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return tuple(self.streams.manifest.shape)

    @property
    def num_classes(self) -> int:
        return int(self.streams.manifest.num_classes)

    def generator(self, step: int, micro: int, purpose: int) -> draws.BatchSlice:
        """The draws of one micro-batch: seeded alike on every rank by (seed, step, micro-step,
        purpose[, rollbacks]) and keyed by each sample's row in the global micro-batch
        (trainers/draws.py), so they do not depend on the number of workers and a run resumes
        exactly on another number (the data streams' order is global too)."""
        g = torch.Generator(device=self.device)
        parts = [self.spec.train.seed, step, micro, purpose]
        if self.rollbacks():
            parts.append(self.rollbacks())  # new noise after a rollback (checkpointed: resumable)
        g.manual_seed(step_seed(*parts))
        mb = self.micro_batch
        return draws.BatchSlice(g, start=self.rank * mb, rows=mb, total=self.world_size * mb)

    @contextmanager
    def timed(self, engine: str) -> Iterator[None]:
        """Time an engine's step into `time/<engine>_step` of the open window."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[engine] = self.times.get(engine, 0.0) + time.perf_counter() - t0

    def engine_spec(self, stage: int):
        """The EngineSpec of one of this run's engines at ZeRO `stage` (optim, batch, precision)."""
        from advflow.platform.train.engines import EngineSpec

        o, t, d = self.spec.optim, self.spec.train, self.spec.distributed
        bf16 = d.precision == "bf16" or (d.precision == "auto" and d.use_gpu)
        return EngineSpec(stage=stage, micro_batch=self.micro_batch, grad_accum=t.grad_accum, lr=o.lr,
                          betas=o.betas, weight_decay=o.weight_decay, eps=o.eps, grad_clip=o.grad_clip, bf16=bf16)

    def inject_nan(self, step: int) -> bool:
        """debug.inject_nan_step: the fault the watchdog's tests inject into a loss."""
        dbg = self.spec.debug
        if dbg.inject_nan_step != step:
            return False
        return dbg.inject_nan_attempts == 0 or self.rollbacks() < dbg.inject_nan_attempts


def step_seed(*parts: int) -> int:
    """A 63-bit seed from small integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def grad_norm(metrics: dict, key: str, engine, device: torch.device) -> None:
    """DeepSpeed's global gradient norm of the engine's last step, as `metrics[key]` (computed when
    clipping or ZeRO needs it; a tensor under ZeRO 1/2, kept on device: no per-step host sync)."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        metrics[key] = torch.as_tensor(norm).detach().float().to(device)


class Method(Protocol):
    """One training method on the loop (see the module docstring)."""

    streams: ClassVar[tuple[str, ...]]
    names: ClassVar[MetricNames]
    engines: dict[str, Any]

    @classmethod
    def build(cls, env: StepEnv) -> Method:
        """Models, engines and state, seeded alike on every rank (identical initial weights)."""

    def parts(self) -> dict[str, Part]:
        """The checkpoint parts this method owns."""

    def step(self, k: int, phase: PhaseParams) -> dict[str, torch.Tensor]:
        """Iteration k under the phase's parameters: the method's engine updates and its metrics."""

    def set_lr(self, phase: PhaseParams, factor: float) -> dict[str, float]:
        """Set the engines' learning rates for this phase (times the recovery's `factor`); returns
        the per-step phase metrics (lr, lambdas, the phase index)."""

    def on_event(self, event) -> None:
        """A phase event (trainers.schedules.PhaseEvent): EMA reload, D snapshot or reload."""

    def on_new_best(self) -> None:
        """`phases: auto` saw a new best evaluation."""

    def ema_model(self) -> torch.nn.Module:
        """A detached copy of the trained network with the EMA weights (sampled and shipped)."""

    def sizes(self) -> dict[str, float]:
        """Parameter counts, logged once at step 0 (`model/<net>_params`)."""

    @property
    def samples(self) -> Samples | None:
        """The sampler for grids and evaluation (None: the method draws no samples)."""

    def evaluation(self, logger, cadence) -> Callback | None:
        """The evaluation callback at checkpoints (None: eval.kind none)."""

    def register(self, model: torch.nn.Module, *, name: str, step: int, tags: dict[str, str],
                 metrics: dict[str, float], run_id: str):
        """Log and register `model` in this method's registered-model format; returns the
        registry's answer (`model_uri`, `version`)."""
