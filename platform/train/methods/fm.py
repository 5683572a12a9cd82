"""Flow matching (`model.method: fm`), the baseline: the same DiT trained as a velocity field, one
update of one engine per iteration (stream "g"): G.velocity(x_t, y, t) regressed onto z - x
(`trainers.fm.fm_loss`), then the EMA update. Sampled with K Euler steps (`model.nfe`)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from advflow.platform.train.engines import build_engine
from advflow.platform.train.methods.base import MetricNames, StepEnv, grad_norm
from advflow.platform.train.methods.generator import OneEngineGenerator
from advflow.trainers import draws, fm
from advflow.trainers.ema import EMA
from advflow.trainers.models import build_generator

DRAWS = 2  # the draw purpose (G's, as in AFM's G step)


class FMStep(OneEngineGenerator):
    streams: ClassVar[tuple[str, ...]] = ("g",)
    names: ClassVar[MetricNames] = MetricNames(progress=(("FM", "fm_loss"),), losses=("fm_loss",),
                                               grads=("g_grad_norm",))

    def __init__(self, env: StepEnv, G: torch.nn.Module):
        self.env, self.G = env, G
        self.ema = EMA(G, decay=env.spec.optim.ema_decay, warmup=env.spec.optim.ema_warmup)
        self.engines: dict[str, Any] = {"g": build_engine(G, env.engine_spec(env.spec.distributed.zero_stage_g))}

    @classmethod
    def build(cls, env: StepEnv) -> FMStep:
        m = env.spec.model
        torch.manual_seed(env.spec.train.seed)  # identical initial weights on every rank
        G = build_generator(m.size, in_channels=env.data_shape[0], input_size=env.data_shape[1],
                            num_classes=env.num_classes, kind=m.kind, nfe=m.nfe, repeats=m.repeats)
        return cls(env, G.to(env.device))

    def step(self, k: int, phase) -> dict[str, torch.Tensor]:
        """The velocity is the module's own method, called through the engine's attribute access
        (DeepSpeed's forward adds nothing at ZeRO 0-2; its gradient hooks sit on the parameters)."""
        env, engine = self.env, self.engines["g"]
        loss = None
        with env.timed("g"):
            for micro in range(env.spec.train.grad_accum):
                x, y = env.streams.next("g")
                gen = env.generator(k, micro, DRAWS)
                z = draws.randn(x.shape, gen, device=env.device)
                t = fm.sample_fm_times(len(x), env.spec.model.fm_times, generator=gen, device=env.device)
                loss = fm.fm_loss(engine.module, x, y, z, t)
                if env.inject_nan(k):
                    loss = loss + float("nan")
                engine.backward(loss)
                engine.step()
            metrics = {"fm_loss": loss.detach()}
            grad_norm(metrics, "g_grad_norm", engine, env.device)
            self.ema.update(self.G)
        return metrics
