"""The classifier worker: the time-conditioned DiT classifier of classifier guidance (the paper's
phase 4), trained on flow-noised latents, on the same platform as the AFM worker (worker.py).

One step = one optimizer update of one DeepSpeed engine: per sample t ~ U(classifier.t_range),
z ~ N(0, I), x_t = (1 - t) x + t z, loss = CE(C(x_t, t), y) (`trainers.losses.classifier_loss`),
then the EMA update. The EMA is what is evaluated, registered and shipped. Everything else is the
AFM worker's machinery reused as it is: one `LatentStream` ("c"), `engines.build_engine` /
`EngineState`, the `Checkpointer` over named parts (engine, EMA, classifier.json, the stream state
per rank, the loop state), `MetricWindow` (one all-reduce per window), `Cadence`, the
`WorkerContext` protocol (so `local_launch` and `ray_launch` both drive it: per-worker entry
`ENTRY`), and rank 0's `RunLogger`.

Determinism: every draw of step k, micro-step m on rank r comes from a generator seeded by
(seed, k, m, r, purpose) (`worker.step_seed`) and the stream resumes from its own state, so a
restored run replays the same numbers.

At checkpoints, rank 0 evaluates the EMA classifier (`eval.every`) at the fixed times `eval.times`
with fixed noise, on the dataset's held-out split if it has one (the digits hold-out recorded in the
manifest) or on a fixed batch of training records, and registers it (`tracking.register_every`)
as a pickle-free MLflow model (`tracking.registry.log_classifier`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from advflow.platform.config_classifier import ClassifierEvalConfig, ClassifierRunSpec, time_key
from advflow.platform.data.reader import LatentStream
from advflow.platform.log import get_logger, set_rank
from advflow.platform.tracking.logger import run_logger
from advflow.platform.tracking.model_format import (CLASSIFIER_SPEC_FILE, ClassifierSpec, read_classifier_spec,
                                                    write_classifier_spec)
from advflow.platform.train.cadence import Cadence
from advflow.platform.train.callbacks import ProgressMeter
from advflow.platform.train.checkpoint import (Checkpointer, EMAState, JSONEntries, PerRankJSON, ResumeError,
                                               staging_dir)
from advflow.platform.train.engines import EngineSpec, EngineState, build_engine
from advflow.platform.train.metrics import MetricWindow
from advflow.platform.train.worker import LoopState, WorkerContext, metrics_log, step_seed
from advflow.trainers.ema import EMA
from advflow.trainers.flow import interp
from advflow.trainers.models import build_classifier

log = get_logger(__name__)

ENTRY = "advflow.platform.train.classifier:run_classifier_worker"
"""The per-worker entry for `local_launch.run_local(entry=...)` / `ray_launch.build_torch_trainer(entry=...)`."""
EVAL_SEED = 4321  # the evaluation's noise (and fixed batch): the same at every checkpoint
NOISE_PURPOSE = 1  # step_seed purpose of the training draws (t, then z)


# ----------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalSet:
    """What the EMA classifier is evaluated on: x (N, C, H, W), labels (N,), fixed noise z."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    heldout: bool
    description: str


def heldout_split(manifest) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dataset's held-out split as the stored records would hold it, or None if it has none.

    Shards hold only a train split; the one dataset with a recorded hold-out is scikit-learn's digits
    in pixel space (prepare writes `encoder["holdout"]` and replays `resize_digits`)."""
    from advflow.platform.data.digits import digits_pixels, digits_split, resize_digits

    enc, params = manifest.encoder or {}, manifest.params or {}
    holdout = enc.get("holdout")
    c, h, w = manifest.shape
    if not holdout or enc.get("name") != "pixel" or params.get("source") != "digits" or c != 1 or h != w:
        return None
    _, held_idx = digits_split(int(holdout["seed"]), float(holdout["fraction"]))
    x, y = digits_pixels(held_idx)
    return resize_digits(x, h), y


def eval_set(stream: LatentStream, cfg: ClassifierEvalConfig) -> EvalSet:
    """The held-out split (eval.split auto/heldout) or a fixed batch of training records."""
    m = stream.manifest
    held = heldout_split(m) if cfg.split != "train" else None
    if held is None and cfg.split == "heldout":
        raise _no_heldout(stream.prefix)
    if held is not None:
        x, y = held
        what = f"held-out split, {len(y)} records"
    else:
        n = min(cfg.num_samples, m.num_records)
        fixed = LatentStream(stream.prefix, n, seed=EVAL_SEED, stream="eval", shuffle_buffer=max(n, 256), prefetch=1)
        try:
            x, y = next(iter(fixed))
        finally:
            fixed.close()
        what = f"fixed batch of {n} training records (the dataset has no held-out split)"
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    return EvalSet(x.float(), y.long(), z, held is not None, what)


def _no_heldout(prefix: str) -> ValueError:
    return ValueError(f"eval.split: heldout, but the dataset at {prefix} records no held-out split (only digits "
                      "datasets do); use eval.split=auto or train")


@torch.no_grad()
def evaluate(model: torch.nn.Module, es: EvalSet, times: list[float], batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on x_t = (1 - t) x + t z at each t, same z for all."""
    out: dict[str, float] = {}
    n = len(es.y)
    for t in times:
        correct, ce = 0, 0.0
        for a in range(0, n, batch_size):
            x, z, y = (v[a:a + batch_size].to(device) for v in (es.x, es.z, es.y))
            tt = torch.full((len(y),), float(t), device=device)
            logits = model(interp(x, z, tt), tt).float()
            correct += int((logits.argmax(1) == y).sum())
            ce += float(F.cross_entropy(logits, y, reduction="sum"))
        out[f"eval/acc_{time_key(t)}"] = correct / n
        out[f"eval/loss_{time_key(t)}"] = ce / n
    out["eval/num_samples"] = float(n)
    out["eval/heldout"] = float(es.heldout)
    return out


# ----------------------------------------------------------------------------------------- progress


class ClassifierProgressMeter(ProgressMeter):
    """The shared progress line (rate since the previous line, ETA) with the classifier's loss and
    training accuracy instead of the AFM job's D/G losses."""

    def line(self, step: int, metrics: dict, now: float | None = None, suffix: str = "") -> str:
        now = time.perf_counter() if now is None else now
        rate = 0.0 if self._mark is None or step <= self._mark[1] else \
            (step - self._mark[1]) / max(now - self._mark[0], 1e-9)
        self._mark = (now, step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        nan = float("nan")
        return (f"step {step}/{self.total} | {rate * self.batch:.1f} samples/s | "
                f"loss {metrics.get('loss', nan):.4f} acc {metrics.get('acc', nan):.3f} | "
                f"data wait {100 * metrics.get('time/data_wait_frac', 0.0):.1f}% | ETA {eta:.0f}s{suffix}")


# ----------------------------------------------------------------------------------------- checkpoint part


class SpecFile:
    """classifier.json in every checkpoint (rank 0), so `registry.load_classifier(checkpoint_dir)`
    rebuilds the EMA classifier from the checkpoint alone; on resume it must match this run's."""

    def __init__(self, spec: ClassifierSpec):
        self.spec = spec

    def save(self, root: Path, rank: int) -> None:
        if rank == 0:
            write_classifier_spec(self.spec, root)

    def load(self, root: Path, rank: int, meta: dict[str, Any]) -> None:
        saved = read_classifier_spec(root)
        if (saved.classifier, saved.data_shape, saved.num_classes) != \
                (self.spec.classifier, self.spec.data_shape, self.spec.num_classes):
            raise ResumeError(f"{root}: the checkpoint's classifier {saved.classifier} on data {saved.data_shape} is "
                              f"not this run's {self.spec.classifier} on {self.spec.data_shape}; resume it with its "
                              "own config, or use another run.name")

    def required(self, world_size: int) -> list[str]:
        return [CLASSIFIER_SPEC_FILE]


# ----------------------------------------------------------------------------------------- the worker


class ClassifierWorker:
    """One worker's share of a classifier run. Construct, then call `train()`."""

    def __init__(self, spec: ClassifierRunSpec, ctx: WorkerContext, *, device: torch.device | None = None,
                 stream_factory: Callable[..., Any] | None = None, run_id: str | None = None):
        self.spec, self.ctx = spec, ctx
        self.device = device or torch.device("cpu")
        self.run_id = run_id  # the MLflow run opened by the driver; only rank 0 logs to it
        self.stream_factory = stream_factory or LatentStream
        self.state = LoopState(log=metrics_log(ctx))
        self.registered: list[dict] = []
        self.last_report: dict = {}
        self.eval_data: EvalSet | None = None

    # ------------------------------------------------------------------ building

    def build_data(self) -> None:
        d = self.spec.data
        self.stream = self.stream_factory(d.prefix, self.spec.micro_batch, stream="c", rank=self.ctx.rank,
                                          world_size=self.ctx.world_size, seed=self.spec.train.seed,
                                          order=d.order, shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch)
        m = self.stream.manifest
        self.data_shape, self.num_classes = tuple(m.shape), int(m.num_classes)
        if self.spec.eval.split == "heldout" and heldout_split(m) is None:  # on every rank: all fail together
            raise _no_heldout(d.prefix)
        self.reset_iterator()

    def reset_iterator(self) -> None:
        self.iter = iter(self.stream)

    def build_model(self) -> None:
        c, h, _ = self.data_shape
        torch.manual_seed(self.spec.train.seed)  # identical initial weights on every rank
        self.C = build_classifier(self.spec.classifier.size, in_channels=c, input_size=h,
                                  num_classes=self.num_classes).to(self.device)
        o = self.spec.optim
        self.ema = EMA(self.C, decay=o.ema_decay, warmup=o.ema_warmup)  # fp32 shadow, built before bf16
        self.model_spec = ClassifierSpec(classifier=dict(self.C.config), data_shape=self.data_shape,
                                         num_classes=self.num_classes, encoder=dict(self.stream.manifest.encoder),
                                         t_range=tuple(self.spec.classifier.t_range))

    def build_engine(self) -> None:
        o, t, d = self.spec.optim, self.spec.train, self.spec.distributed
        bf16 = d.precision == "bf16" or (d.precision == "auto" and d.use_gpu)
        self.engine = build_engine(self.C, EngineSpec(stage=d.zero_stage, micro_batch=self.spec.micro_batch,
                                                      grad_accum=t.grad_accum, lr=o.lr, betas=o.betas,
                                                      weight_decay=o.weight_decay, eps=o.eps,
                                                      grad_clip=o.grad_clip, bf16=bf16))
        self.param_dtype = next(self.C.parameters()).dtype  # bf16 after DeepSpeed converted the module

    def build_checkpointer(self) -> None:
        t = self.spec.train
        self.checkpointer = Checkpointer(
            {"c": EngineState(self.engine, "c"), "ema": EMAState(self.ema), "spec": SpecFile(self.model_spec),
             "readers": PerRankJSON({"c": self.stream}, after_load=self.reset_iterator),
             "loop": JSONEntries(self.state)},
            rank=self.ctx.rank, world_size=self.ctx.world_size, every=t.checkpoint_every, last_step=t.steps,
            config=self.spec.to_dict())

    def build_logger(self) -> None:
        self.logger = run_logger(self.spec, self.run_id if self.ctx.rank == 0 else None)
        if self.logger.run_id is not None:
            # RunLogger finds the steps a previous attempt logged from the AFM job's `d_loss`; ours is `loss`.
            logged = self.logger.client.get_metric_history(self.logger.run_id, "loss")
            self.logger.last_logged_step = self.logger.resumed_through = max((m.step for m in logged), default=0)

    def setup(self) -> None:
        self.build_logger()
        self.build_data()
        self.build_model()
        self.build_engine()
        self.build_checkpointer()
        restore = self.ctx.restore_dir()
        if restore:
            self.checkpointer.load(restore)  # the "loop" part restores state.step
        self.state.continue_from(self.state.step)
        t, tr = self.spec.train, self.spec.tracking
        self.window = MetricWindow(self.device, self.ctx.world_size, t.global_batch)
        self.window.restart(self.state.step)
        self.eval_cadence = Cadence(self.spec.eval.every, t.steps)
        self.register_cadence = Cadence(tr.register_every, t.steps)
        if self.ctx.rank == 0:
            self.eval_data = eval_set(self.stream, self.spec.eval)
            self.progress = ClassifierProgressMeter(t.steps, t.global_batch)
            log.info(f"classifier {self.spec.classifier.size} on {self.data_shape} latents, {self.num_classes} "
                     f"classes, t ~ U{tuple(self.spec.classifier.t_range)}; evaluation on the {self.eval_data.description}"
                     + (f"; resumed at step {self.state.step}" if restore else ""))

    # ------------------------------------------------------------------ the step

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        x, y = next(self.iter)
        self.window.times.data += time.perf_counter() - t0
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def draws(self, step: int, micro: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (N,), z like x) of step `step`, micro-step `micro` on this rank."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(step_seed(self.spec.train.seed, step, micro, self.ctx.rank, NOISE_PURPOSE))
        lo, hi = self.spec.classifier.t_range
        t = lo + (hi - lo) * torch.rand(x.shape[0], generator=gen, device=self.device)
        z = torch.randn(x.shape, generator=gen, device=self.device)
        return t, z

    def train_step(self, step: int) -> dict[str, torch.Tensor | float]:
        accum = self.spec.train.grad_accum
        loss_sum = acc_sum = 0.0
        for micro in range(accum):
            x, y = self.next_batch()
            t, z = self.draws(step, micro, x)
            # = trainers.losses.classifier_loss(C, x, y, t, z), with the logits kept for the accuracy.
            xt = interp(x, z, t).to(self.param_dtype)
            logits = self.engine(xt, t).float()
            loss = F.cross_entropy(logits, y)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum = loss_sum + loss.detach()
            acc_sum = acc_sum + (logits.detach().argmax(1) == y).float().mean()
        self.ema.update(self.C)
        metrics: dict[str, torch.Tensor | float] = {"loss": loss_sum / accum, "acc": acc_sum / accum,
                                                    "lr": float(self.engine.optimizer.param_groups[0]["lr"])}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:  # a tensor under ZeRO 1/2: kept on device, no per-step host sync
            metrics["grad_norm"] = torch.as_tensor(norm).detach().float().to(self.device)
        return metrics

    def ema_model(self) -> torch.nn.Module:
        """A float32 classifier holding the EMA weights (what is evaluated and registered)."""
        with torch.random.fork_rng(devices=[]):  # building initialises weights: keep the global RNG as it was
            model = build_classifier(**self.C.config)
        self.ema.copy_to(model)
        return model.to(self.device).eval().requires_grad_(False)

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
                self.state.record(rows)
                if self.ctx.rank == 0:
                    self.logger.log_rows(rows, window)
                    if not at_checkpoint:  # at checkpoints the driver (Ray) prints the line
                        log.info(self.progress.line(step, {**rows[-1], "time/data_wait_frac": window["data_wait_frac"]}))
                if at_checkpoint:
                    self.save_checkpoint(step, window)
                self.window.restart(step)
        self.close()
        return self.state

    def save_checkpoint(self, step: int, window: dict[str, float]) -> None:
        """Collective: every rank writes its parts; rank 0 evaluates and registers the EMA
        classifier; the checkpoint is reported with the latest metrics."""
        t0 = time.perf_counter()
        since = self.checkpointer.last_saved
        with staging_dir(delete=not getattr(self.ctx, "takes_staging_dir", False)) as tmp:
            self.checkpointer.save(tmp, step)
            extra = self.at_checkpoint(step, since) if self.ctx.rank == 0 else {}
            self.window.times.checkpoint += time.perf_counter() - t0
            metrics = {**self.state.last_row, **extra, "step": step,
                       "time/data_wait_frac": window["data_wait_frac"], "samples_per_s": window["samples_per_s"],
                       "time/checkpoint": self.window.times.checkpoint}
            self.last_report = metrics
            self.ctx.report(metrics, tmp)

    def at_checkpoint(self, step: int, since: int) -> dict[str, float]:
        """Rank 0: evaluation (eval.every) and registration (tracking.register_every) of the EMA."""
        evaluate_now = self.eval_cadence.due(step, since)
        tr = self.spec.tracking
        register_now = self.logger.run_id is not None and bool(tr.register_name) and self.register_cadence.due(step, since)
        if not (evaluate_now or register_now):
            return {}
        model = self.ema_model()
        out: dict[str, float] = {}
        if evaluate_now:
            t0 = time.perf_counter()
            out = evaluate(model, self.eval_data, self.spec.eval.times, self.spec.eval.batch_size, self.device)
            out["eval/seconds"] = time.perf_counter() - t0
            self.logger.log_metrics(out, step)
            accs = " ".join(f"{time_key(t)} {out[f'eval/acc_{time_key(t)}']:.3f}" for t in self.spec.eval.times)
            log.info(f"step {step}: EMA accuracy {accs} ({self.eval_data.description})")
        if register_now:
            from advflow.platform.tracking.registry import log_classifier  # MLflow: only where a model is logged

            tags = {"data.prefix": self.spec.data.prefix, "advflow.kind": "classifier", **self.logger.data_tags}
            reg = log_classifier(model, data_shape=self.data_shape, num_classes=self.num_classes,
                                 registered_name=tr.register_name, encoder=self.model_spec.encoder,
                                 t_range=self.model_spec.t_range, tags=tags, step=step, run_id=self.logger.run_id,
                                 metrics={k: v for k, v in out.items() if k != "eval/seconds"})
            self.registered.append({"step": step, "model_uri": reg.model_uri, "version": reg.version})
            log.info("registered %s version %s (step %d)", tr.register_name, reg.version, step)
        return out

    def close(self) -> None:
        drain = getattr(self.ctx, "drain", None)
        if drain is not None:
            drain()  # asynchronous uploads in flight finish before the run ends
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.log_final({"step": self.state.step, **self.last_report, "registered": self.registered,
                              "resumed_from": self.state.resumes})
            logger.close()


def run_classifier_worker(config: dict, ctx: WorkerContext, device: torch.device | None = None) -> LoopState:
    """The per-worker entry (`ENTRY`) every launcher calls with its own context.

    config: {"spec": ClassifierRunSpec.to_dict(), "mlflow_run_id": str | None, "mlflow_uri": str | None}."""
    spec = ClassifierRunSpec.from_dict(config["spec"])
    set_rank(ctx.rank)
    torch.set_num_threads(max(1, spec.distributed.cpus_per_worker))
    if config.get("mlflow_uri"):  # resolved by the driver, so workers need no environment of their own
        os.environ["MLFLOW_TRACKING_URI"] = config["mlflow_uri"]
    return ClassifierWorker(spec, ctx, device=device, run_id=config.get("mlflow_run_id")).train()
