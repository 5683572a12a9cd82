"""The worker loop: G, D and EMA(G) in two DeepSpeed engines, alternating D and G steps.

Ray-free on purpose: `AFMTrainer` talks to the outside world only through a `WorkerContext`
(rank/world size, report, checkpoint restore). `advflow.platform.train.ray_launch` gives it Ray Train's
context; tests give it a plain torch.distributed one. `train()` is short and linear; each piece is a
method a subclass can override (torchtitan style).

Determinism (what makes resume and the ZeRO-equivalence test exact): every random draw of step k on
rank r comes from a generator seeded by (seed, k, r, purpose), and the data streams resume from their
own state, so a restored run replays the same numbers without saving RNG states mid-step.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from advflow.platform.config import RunSpec
from advflow.platform.train.engines import EngineSpec, build_engine, set_lr
from advflow.platform.train import checkpoint as ckpt
from advflow.trainers import afm
from advflow.trainers.ema import EMA
from advflow.trainers.flow import generate
from advflow.trainers.models import build_discriminator, build_generator


class WorkerContext(Protocol):
    """What the loop needs from its launcher."""

    rank: int
    world_size: int

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def restore_dir(self) -> str | None:
        """A local directory holding the latest complete checkpoint, or None for a fresh start."""


@dataclass
class StepTimes:
    """Wall-time breakdown of the loop (seconds, summed since the last report)."""

    data: float = 0.0
    d_step: float = 0.0
    g_step: float = 0.0
    checkpoint: float = 0.0
    total: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.__dict__.items()}
        out["time/data_wait_frac"] = self.data / self.total if self.total else 0.0
        return out


@dataclass
class LoopState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    """Steps this run was resumed from after a failure or restart (observability)."""


def step_seed(*parts: int) -> int:
    """A 63-bit seed from small integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class AFMTrainer:
    """One worker's share of an AFM run. Construct, then call `train()`."""

    def __init__(self, spec: RunSpec, ctx: WorkerContext, *, device: torch.device | None = None,
                 stream_factory: Callable[..., Any] | None = None, run_id: str | None = None):
        self.spec, self.ctx = spec, ctx
        self.run_id = run_id  # MLflow run opened by the driver; only rank 0 logs to it
        self.logger = None
        self._evaluator = None
        self.registered: list[dict] = []
        self.last_report: dict = {}  # the latest checkpoint's metrics (final_metrics.json)
        self.device = device or torch.device("cpu")
        self.plan = spec.phase_plan()
        self.afm_cfg = afm.AFMConfig(
            gp_fraction=spec.adversarial.gp_fraction, gp_eps=spec.adversarial.gp_eps,
            use_gradnorm=spec.adversarial.gradnorm, gradnorm_momentum=spec.adversarial.gradnorm_momentum)
        self.stream_factory = stream_factory
        self.state = LoopState()
        self.times = StepTimes()
        self.d_tags: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: list[dict[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ building

    def build_data(self) -> None:
        from advflow.platform.data.reader import LatentStream

        make = self.stream_factory or LatentStream
        d = self.spec.data
        kw = dict(rank=self.ctx.rank, world_size=self.ctx.world_size, seed=self.spec.train.seed,
                  shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch)
        self.streams = {name: make(d.prefix, self.spec.micro_batch, stream=name, **kw) for name in ("d", "g")}
        m = self.streams["d"].manifest
        self.data_shape, self.num_classes = tuple(m.shape), int(m.num_classes)
        self.iters = {k: iter(s) for k, s in self.streams.items()}

    def model_options(self) -> tuple[dict, dict]:
        m = self.spec.model
        c, h, w = self.data_shape
        common = dict(in_channels=c, input_size=h, num_classes=self.num_classes)
        g = dict(common, kind=m.kind, nfe=m.nfe, repeats=m.repeats)
        d = dict(common, time_cond=m.kind != "1nfe")
        return g, d

    def build_models(self) -> None:
        g_opts, d_opts = self.model_options()
        torch.manual_seed(self.spec.train.seed)  # identical initial weights on every rank
        self.G = build_generator(self.spec.model.size, **g_opts).to(self.device)
        self.D = build_discriminator(self.spec.model.d_size or self.spec.model.size, **d_opts).to(self.device)
        self.ema = EMA(self.G, decay=self.spec.optim.ema_decay)
        self.gradnorm = afm.make_gradnorm(self.afm_cfg).to(self.device)

    def build_engines(self) -> None:
        o, t, dcfg = self.spec.optim, self.spec.train, self.spec.distributed
        bf16 = dcfg.precision == "bf16" or (dcfg.precision == "auto" and dcfg.use_gpu)
        base = dict(micro_batch=self.spec.micro_batch, grad_accum=t.grad_accum, lr=o.lr, betas=o.betas,
                    weight_decay=o.weight_decay, eps=o.eps, grad_clip=o.grad_clip, bf16=bf16)
        self.g_engine = build_engine(self.G, EngineSpec(stage=dcfg.zero_stage_g, **base))
        self.d_engine = build_engine(self.D, EngineSpec(stage=dcfg.zero_stage_d, **base))

    # ------------------------------------------------------------------ steps

    def next_batch(self, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        x, y = next(self.iters[stream])
        self.times.data += time.perf_counter() - t0
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _generator(self, step: int, micro: int, purpose: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(step_seed(self.spec.train.seed, step, micro, self.ctx.rank, purpose))
        return g

    def d_step(self, step: int, cfg: afm.AFMConfig) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        metrics = {}
        for micro in range(self.spec.train.grad_accum):
            x, y = self.next_batch("d")
            gen = self._generator(step, micro, 1)
            z = torch.randn(x.shape, generator=gen, device=self.device)
            # G's plain module under no_grad inside d_loss: G's engine never sees this graph.
            loss, metrics = afm.d_loss(self.G, self.d_engine, x, y, z, cfg, generator=gen)
            self.d_engine.backward(loss)
            self.d_engine.step()
        _add_grad_norm(metrics, "d_grad_norm", self.d_engine, self.device)
        self.times.d_step += time.perf_counter() - t0
        return metrics

    def g_step(self, step: int, cfg: afm.AFMConfig) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        metrics = {}
        for micro in range(self.spec.train.grad_accum):
            x, y = self.next_batch("g")
            gen = self._generator(step, micro, 2)
            z = torch.randn(x.shape, generator=gen, device=self.device)
            # D's plain module with frozen parameters: D's engine hooks stay silent (module doc).
            loss, metrics = afm.g_loss(self.g_engine, self.D, self.gradnorm, x, y, z, cfg, generator=gen)
            self.g_engine.backward(loss)
            self.g_engine.step()
        _add_grad_norm(metrics, "g_grad_norm", self.g_engine, self.device)
        self.ema.update(self.G)
        self.times.g_step += time.perf_counter() - t0
        return metrics

    def apply_phase(self, step: int) -> afm.AFMConfig:
        params = self.plan.at(step)
        for event in self.plan.events(step):
            self.handle_event(event)
        set_lr(self.g_engine, params.lr * self.G.lr_scale)
        set_lr(self.d_engine, params.lr_d)
        self._phase = params
        return self.afm_cfg.with_phase(params)

    def handle_event(self, event) -> None:
        """Phase events (Table 11): EMA reload, and D snapshots at phase ends for a later D reload.

        D snapshots hold D's weights only (replicated under ZeRO 0-2, so every rank keeps its own
        copy); a reload restores the weights and keeps the optimizer's moments, and the snapshots
        travel in every checkpoint so a restarted run can still reload."""
        if event.kind == "ema_reload":
            with torch.no_grad():
                self.ema.copy_to(self.G)
        elif event.kind == "save_tag":
            self.d_tags[event.tag] = {k: v.detach().to("cpu", copy=True) for k, v in self.D.state_dict().items()}
        elif event.kind == "d_reload":
            source = event.source if isinstance(event.source, str) else None
            if source not in self.d_tags:
                raise ValueError(
                    f"phase {event.phase_index}: d_reload_from={event.source!r} is not a saved D snapshot; "
                    f"available: {sorted(self.d_tags)} (snapshots are taken at phase ends, named "
                    "'<phase>_end'; reloading from a step number is not supported)")
            with torch.no_grad():
                self.D.load_state_dict(self.d_tags[source])
        # phase_enter: recorded in the history via the phase index.

    # ------------------------------------------------------------------ bookkeeping

    def record(self, step: int, d_metrics: dict, g_metrics: dict) -> None:
        """Keep this step's metrics on-device; they are averaged over ranks in `flush_metrics`."""
        merged = {**d_metrics, **g_metrics}
        p = self._phase
        for key, value in (("lambda_ot", p.lambda_ot), ("lambda_gp", p.lambda_gp), ("lambda_cp", p.lambda_cp),
                           ("lr", p.lr), ("lr_g", p.lr * self.G.lr_scale), ("lr_d", p.lr_d),
                           ("phase", float(p.phase_index))):
            merged[key] = torch.tensor(value, device=self.device)
        self._pending.append({k: v.detach().float().reshape(()) for k, v in merged.items()})

    def flush_metrics(self, first_step: int) -> list[dict]:
        """All-reduce the pending per-step metrics in ONE collective (no per-step host sync)."""
        if not self._pending:
            return []
        keys = sorted(set().union(*self._pending))
        nan = torch.tensor(float("nan"), device=self.device)
        table = torch.stack([torch.stack([m.get(k, nan) for k in keys]) for m in self._pending])  # (S, K)
        if dist.is_available() and dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(table)
            table /= self.ctx.world_size
        rows = [{"step": first_step + i + 1, **dict(zip(keys, map(float, row)))} for i, row in enumerate(table.cpu())]
        self._pending.clear()
        self.state.history.extend(rows)
        return rows

    def ema_model(self) -> torch.nn.Module:
        """A detached copy of G holding the EMA weights (the model that is sampled and shipped)."""
        model = copy.deepcopy(self.G).eval()
        with torch.no_grad():
            self.ema.copy_to(model)
        return model

    def sample_grid(self, out_path: Path, per_class: int = 8, ema: Callable[[], torch.nn.Module] | None = None) -> None:
        """`ema`: returns the EMA model (default `ema_model`; a checkpoint shares one copy)."""
        from advflow.platform.data.encoders import decode_latents
        from advflow.platform.images import save_grid

        model = (ema or self.ema_model)()
        with torch.no_grad():
            n_cls = min(self.num_classes, 10)
            y = torch.arange(n_cls, device=self.device).repeat_interleave(per_class)
            gen = torch.Generator(device=self.device).manual_seed(1234)
            z = torch.randn((len(y), *self.data_shape), generator=gen, device=self.device)
            x = generate(model, z, y)
        # Latents go back to pixels the way the dataset says they were made (VAE for sd-vae).
        images = decode_latents(x.cpu(), self.streams["d"].manifest.encoder)
        save_grid(images, out_path, nrow=per_class)

    def evaluate(self, step: int, final: bool, ema: Callable[[], torch.nn.Module] | None = None) -> dict[str, float]:
        """Sample quality (eval.kind) on rank 0 from the EMA generator with fixed seeds and labels."""
        ev = self.spec.eval
        if ev.kind == "none" or not (final or self._due(step, ev.every)):
            return {}
        from advflow.platform.data.encoders import decode_latents
        from advflow.platform.eval.frechet import build_evaluator

        t0 = time.perf_counter()
        encoder = self.streams["d"].manifest.encoder
        if self._evaluator is None:
            self._evaluator = build_evaluator(
                ev.kind, manifest_encoder=encoder, data_shape=self.data_shape, num_classes=self.num_classes,
                options={"inception_path": ev.inception_path, "reference_stats": ev.reference_stats,
                         "batch_size": ev.batch_size})
        model = (ema or self.ema_model)()
        labels = torch.arange(ev.num_samples) % self.num_classes  # class-balanced
        gen = torch.Generator(device=self.device).manual_seed(4321)  # the same noise at every evaluation
        images = []
        with torch.no_grad():
            for i in range(0, ev.num_samples, ev.batch_size):
                y = labels[i:i + ev.batch_size].to(self.device)
                z = torch.randn((len(y), *self.data_shape), generator=gen, device=self.device)
                images.append(decode_latents(generate(model, z, y).cpu(), encoder))
        out = dict(self._evaluator.evaluate(torch.cat(images), labels))
        out["eval/seconds"] = time.perf_counter() - t0
        return out

    def image_due(self, step: int, at_checkpoint: bool) -> bool:
        """Log a sample grid to MLflow at `step`? Every tracking.image_every steps (0: at each
        checkpoint), and always at the end."""
        m = self.spec.tracking.image_every
        return self.logger is not None and (step == self.spec.train.steps or
                                            (step % m == 0 if m else at_checkpoint))

    def _due(self, step: int, every: int) -> bool:
        """At checkpoint `step`: does a multiple of `every` fall in (previous checkpoint, step]?"""
        c = self.spec.train.checkpoint_every
        return bool(every) and step // every > max(step - c, 0) // every

    def register_model(self, step: int, final: bool, eval_metrics: dict[str, float],
                       ema: Callable[[], torch.nn.Module] | None = None) -> None:
        """Log + register the EMA generator (rank 0) at tracking.register_every steps and at the end."""
        tr = self.spec.tracking
        if self.logger is None or not tr.register_name:
            return
        if not (final or self._due(step, tr.register_every)):
            return
        from advflow.platform.tracking.registry import log_generator

        # log_generator adds run_id, step and one `metric.<key>` tag per evaluation result.
        tags = {"data.prefix": self.spec.data.prefix, **self.logger.data_tags}
        metrics = {k: v for k, v in eval_metrics.items() if k != "eval/seconds"}
        reg = log_generator((ema or self.ema_model)(), decoder=self.streams["d"].manifest.encoder,
                            data_shape=self.data_shape, num_classes=self.num_classes,
                            registered_name=tr.register_name, tags=tags, step=step,
                            run_id=self.logger.run_id, metrics=metrics)
        self.registered.append({"step": step, "model_uri": reg.model_uri, "version": reg.version})
        print(f"[advflow] registered {tr.register_name} version {reg.version} (step {step})", flush=True)

    def save_checkpoint(self, step: int, final: bool) -> None:
        t0 = time.perf_counter()
        t = self.spec.train
        with ckpt.staging_dir() as tmp:
            ckpt.save(tmp, self, step)
            extra: dict[str, float] = {}
            if self.ctx.rank == 0:
                # Grid, evaluation and registration share one EMA copy of G, made only if one is due
                # (a deep copy of an XL/2 generator is 2.7 GB).
                ema = functools.cache(self.ema_model)
                grid = Path(tmp) / "samples.png"
                to_mlflow = self.image_due(step, at_checkpoint=True)
                if final or (t.sample_every and step % t.sample_every == 0) or to_mlflow:
                    self.sample_grid(grid, ema=ema)
                    if to_mlflow:
                        self.logger.log_grid(grid, step)
                extra = self.evaluate(step, final, ema=ema)
                if self.logger is not None and extra:
                    self.logger.log_metrics(extra, step)
                self.register_model(step, final, extra, ema=ema)
                del ema  # drop the copy before the checkpoint is reported
            self.times.checkpoint += time.perf_counter() - t0
            metrics = {**(self.state.history[-1] if self.state.history else {}),
                       **self.times.as_metrics(), **extra, "step": step}
            self.last_report = metrics
            self.ctx.report(metrics, tmp)

    def log_window(self, rows: list[dict], window_s: float) -> None:
        """Rank 0: the window's metric rows to MLflow, with throughput and data-wait fraction."""
        if self.logger is None or not rows:
            return
        t = self.spec.train
        extra = {"samples_per_s": len(rows) * t.global_batch / max(window_s, 1e-9),
                 "data_wait_frac": self.times.as_metrics()["time/data_wait_frac"]}
        self.logger.log_rows(rows, extra)
        step = int(rows[-1]["step"])
        at_checkpoint = step % t.checkpoint_every == 0 or step == t.steps  # save_checkpoint logs those
        if not at_checkpoint and self.image_due(step, at_checkpoint=False):
            with ckpt.staging_dir() as tmp:
                self.sample_grid(Path(tmp) / "samples.png")
                self.logger.log_grid(Path(tmp) / "samples.png", step)

    def report_progress(self, rows: list[dict]) -> None:
        """Progress between checkpoints: a line from rank 0 (Ray forwards it to the driver's log).

        Not through ctx.report: Ray Train's controller takes one report per poll (2 s), so
        reporting every few steps would stall fast training loops (measured: 2.2x slower)."""
        if not rows or self.ctx.rank != 0:
            return
        now = time.perf_counter()
        last_t, last_step = getattr(self, "_progress_mark", (self._t_start, self._step_start))
        rate = (self.state.step - last_step) / max(now - last_t, 1e-9)
        self._progress_mark = (now, self.state.step)
        eta = (self.spec.train.steps - self.state.step) / rate if rate > 0 else float("nan")
        m = rows[-1]
        print(f"[advflow] step {self.state.step}/{self.spec.train.steps} | "
              f"{rate * self.spec.train.global_batch:.1f} samples/s | D {m['d_loss']:.4f} G {m['g_loss']:.4f} | "
              f"data wait {100 * self.times.as_metrics()['time/data_wait_frac']:.1f}% | ETA {eta:.0f}s", flush=True)

    # ------------------------------------------------------------------ the loop

    def setup(self) -> None:
        if self.run_id and self.ctx.rank == 0:
            from advflow.platform.tracking.runs import RunLogger

            self.logger = RunLogger(self.spec, self.run_id)
        self.build_data()
        self.build_models()
        self.build_engines()
        restore = self.ctx.restore_dir()
        if restore:
            ckpt.load(restore, self)

    def train(self) -> LoopState:
        self.setup()
        t = self.spec.train
        first_pending = self.state.step
        self._t_start, self._step_start = time.perf_counter(), self.state.step
        window_start = time.perf_counter()
        while self.state.step < t.steps:
            step = self.state.step
            cfg = self.apply_phase(step)
            d_metrics = self.d_step(step, cfg)
            g_metrics = self.g_step(step, cfg)
            self.record(step, d_metrics, g_metrics)
            self.state.step = step + 1
            done = self.state.step == t.steps
            if self.state.step % t.log_every == 0 or done or self.state.step % t.checkpoint_every == 0:
                rows = self.flush_metrics(first_pending)
                first_pending = self.state.step
                # The window's wall time includes the metric all-reduce and any checkpoint.
                self.times.total = time.perf_counter() - window_start
                self.log_window(rows, self.times.total)
                if self.state.step % t.checkpoint_every == 0 or done:
                    self.save_checkpoint(self.state.step, final=done)
                else:
                    self.report_progress(rows)
                self.times = StepTimes()
                window_start = time.perf_counter()
        self.close()
        return self.state

    def close(self) -> None:
        for s in getattr(self, "streams", {}).values():
            s.close()
        if self.logger is not None:
            self.logger.log_final({"step": self.state.step, **self.last_report,
                                   "registered": self.registered, "resumed_from": self.state.resumes})
            self.logger.close()
            self.logger = None


def _add_grad_norm(metrics: dict, key: str, engine, device) -> None:
    """DeepSpeed's global gradient norm of the last step (computed when clipping or ZeRO needs it)."""
    norm = engine.get_global_grad_norm()
    if norm is not None:  # a tensor under ZeRO 1/2: kept on device, no per-step host sync
        metrics[key] = torch.as_tensor(norm).detach().float().to(device)
