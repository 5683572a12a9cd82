"""The classifier (`model.method: classifier`): the time-conditioned DiT classifier of classifier
guidance (the paper's phase 4), trained on flow-noised latents. One step = one update of one
engine (stream "c"): per sample t ~ U(classifier.t_range), z ~ N(0, I), x_t = (1 - t) x + t z,
loss = CE(C(x_t, t), y) (`trainers.losses.classifier_loss_and_logits`), then the EMA update.

Its draws are keyed by the sample's row in the global batch like every method's (StepEnv.generator),
so it resumes exactly on another number of workers. At checkpoints, rank 0 evaluates the EMA
classifier (`eval.kind: accuracy`) at the fixed times `eval.times` with fixed noise, on the dataset's
held-out split if it has one (the digits hold-out recorded in the manifest) or on a fixed batch of
training records, and registers it (`tracking.register_name`) as a pickle-free MLflow model
(`tracking.registry.log_classifier`); `classifier.json` in each checkpoint lets
`registry.load_classifier(checkpoint_dir)` rebuild it from the checkpoint alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from advflow.platform.config import time_key
from advflow.platform.data.reader import LatentStream
from advflow.platform.log import get_logger
from advflow.platform.tracking.model_format import (CLASSIFIER_SPEC_FILE, ClassifierSpec, read_classifier_spec,
                                                    write_classifier_spec)
from advflow.platform.train.checkpoint import EMAState, ResumeError
from advflow.platform.train.engines import EngineState, build_engine, set_lr, write_weights
from advflow.platform.train.methods.base import MetricNames, StepEnv, grad_norm
from advflow.trainers import draws
from advflow.trainers.ema import EMA
from advflow.trainers.flow import interp
from advflow.trainers.losses import classifier_loss_and_logits
from advflow.trainers.models import build_classifier

log = get_logger(__name__)

EVAL_SEED = 4321  # the evaluation's noise (and fixed batch): the same at every checkpoint
DRAWS = 1  # the draw purpose of the training noise (t, then z)


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


def no_heldout(prefix: str) -> ValueError:
    return ValueError(f"eval.split: heldout, but the dataset at {prefix} records no held-out split (only digits "
                      "datasets do); use eval.split=auto or train")


def eval_set(prefix: str, manifest, cfg) -> EvalSet:
    """The held-out split (eval.split auto/heldout) or a fixed batch of training records."""
    held = heldout_split(manifest) if cfg.split != "train" else None
    if held is None and cfg.split == "heldout":
        raise no_heldout(prefix)
    if held is not None:
        x, y = held
        what = f"held-out split, {len(y)} records"
    else:
        n = min(cfg.num_samples, manifest.num_records)
        fixed = LatentStream(prefix, n, seed=EVAL_SEED, stream="eval", shuffle_buffer=max(n, 256), prefetch=1)
        try:
            x, y = next(iter(fixed))
        finally:
            fixed.close()
        what = f"fixed batch of {n} training records (the dataset has no held-out split)"
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    return EvalSet(x.float(), y.long(), z, held is not None, what)


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


class AccuracyEvaluation:
    """Rank 0's callback: the EMA classifier's accuracy at `eval.times` on its EvalSet, at
    checkpoints on the eval cadence (not a collective: the classifier is small)."""

    def __init__(self, env: StepEnv, logger, cadence):
        self.env, self.logger, self.cadence = env, logger, cadence
        self.data: EvalSet | None = None

    def __call__(self, m) -> None:
        if m.checkpoint_dir is None or self.env.rank != 0 or not self.cadence.due(m.step, m.since):
            return
        ev = self.env.spec.eval
        if self.data is None:
            self.data = eval_set(self.env.spec.data.prefix, self.env.manifest, ev)
        t0 = time.perf_counter()
        out = evaluate(m.ema(), self.data, ev.times, ev.batch_size, self.env.device)
        out["eval/seconds"] = time.perf_counter() - t0
        self.logger.log_metrics(out, m.step)
        accs = " ".join(f"{time_key(t)} {out[f'eval/acc_{time_key(t)}']:.3f}" for t in ev.times)
        log.info(f"step {m.step}: EMA accuracy {accs} ({self.data.description})")
        m.metrics.update(out)


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


# ----------------------------------------------------------------------------------------- the method


class ClassifierStep:
    streams: ClassVar[tuple[str, ...]] = ("c",)
    names: ClassVar[MetricNames] = MetricNames(progress=(("loss", "loss"), ("acc", "acc")), losses=("loss",),
                                               grads=("grad_norm",))
    samples = None  # draws no samples: no grids

    def __init__(self, env: StepEnv, C: torch.nn.Module):
        spec = env.spec
        self.env, self.C = env, C
        self.ema = EMA(C, decay=spec.optim.ema_decay, warmup=spec.optim.ema_warmup)  # fp32 shadow, before bf16
        self.model_spec = ClassifierSpec(classifier=dict(C.config), data_shape=env.data_shape,
                                         num_classes=env.num_classes, encoder=dict(env.manifest.encoder),
                                         t_range=tuple(spec.classifier.t_range))
        self.engines: dict[str, Any] = {"c": build_engine(C, env.engine_spec(spec.distributed.zero_stage_g))}

    @classmethod
    def build(cls, env: StepEnv) -> ClassifierStep:
        if env.spec.eval.kind == "accuracy" and env.spec.eval.split == "heldout" and heldout_split(env.manifest) is None:
            raise no_heldout(env.spec.data.prefix)  # on every rank: all fail together, before training
        torch.manual_seed(env.spec.train.seed)  # identical initial weights on every rank
        C = build_classifier(env.spec.model.size, in_channels=env.data_shape[0], input_size=env.data_shape[1],
                             num_classes=env.num_classes)
        return cls(env, C.to(env.device))

    def parts(self) -> dict[str, Any]:
        return {"c": EngineState(self.engines["c"], "c"), "ema": EMAState(self.ema), "spec": SpecFile(self.model_spec)}

    def step(self, k: int, phase) -> dict[str, torch.Tensor]:
        env, engine = self.env, self.engines["c"]
        accum, (lo, hi) = env.spec.train.grad_accum, env.spec.classifier.t_range
        loss_sum = acc_sum = 0.0
        with env.timed("c"):
            for micro in range(accum):
                x, y = env.streams.next("c")
                gen = env.generator(k, micro, DRAWS)
                t = lo + (hi - lo) * draws.rand((len(x),), gen, device=env.device)
                z = draws.randn(x.shape, gen, device=env.device)
                loss, logits = classifier_loss_and_logits(engine, x, y, t, z)
                if env.inject_nan(k):
                    loss = loss + float("nan")
                engine.backward(loss)
                engine.step()
                loss_sum = loss_sum + loss.detach()
                acc_sum = acc_sum + (logits.detach().argmax(1) == y).float().mean()
            self.ema.update(self.C)
            metrics = {"loss": loss_sum / accum, "acc": acc_sum / accum}
            grad_norm(metrics, "grad_norm", engine, env.device)
        return metrics

    def set_lr(self, phase, factor: float) -> dict[str, float]:
        set_lr(self.engines["c"], phase.lr * factor)
        return {"lr": phase.lr * factor}

    def on_event(self, event) -> None:
        if event.kind == "ema_reload":
            write_weights(self.engines["c"], self.ema.shadow)

    def on_new_best(self) -> None:
        pass

    def ema_model(self) -> torch.nn.Module:
        """A float32 classifier holding the EMA weights (what is evaluated and registered)."""
        with torch.random.fork_rng(devices=[]):  # building initialises weights: keep the global RNG as it was
            model = build_classifier(**self.C.config)
        self.ema.copy_to(model)
        return model.to(self.env.device).eval().requires_grad_(False)

    def sizes(self) -> dict[str, float]:
        return {"model/c_params": float(sum(p.numel() for p in self.C.parameters()))}

    def evaluation(self, logger, cadence):
        return AccuracyEvaluation(self.env, logger, cadence) if self.env.spec.eval.kind == "accuracy" else None

    def register(self, model, *, name: str, step: int, tags: dict, metrics: dict, run_id: str):
        from advflow.platform.tracking import registry  # MLflow: only where a model is logged

        s = self.model_spec
        return registry.log_classifier(model, data_shape=s.data_shape, num_classes=s.num_classes, registered_name=name,
                                       encoder=s.encoder, t_range=s.t_range, step=step, run_id=run_id,
                                       tags={**tags, "advflow.kind": "classifier"}, metrics=metrics)
