"""MeanFlow (`model.method: meanflow`; Geng et al., arXiv 2505.13447), the consistency-family one-step
baseline: the any-step DiT trained on the average velocity, one update of one engine per iteration
(stream "g"), then the EMA update.

The network's `velocity(z_t, y, s, t)` is MeanFlow's u(z_t, r, t) with s = its t (the noisier time)
and t = its r (`trainers/meanflow.py`), so the registered model samples with the any-step sampler
`trainers.flow.generate` at `model.nfe` steps (1 by default: z_0 = z_1 - u(z_1, 0, 1)) and `eval.nfe`
may ask for any K. The loss's target needs a Jacobian-vector product through the network: it runs on
the plain module (`engine.module`), as AFM's G step runs D; the engine's gradient hooks sit on the
parameters, so the backward through the prediction reaches them at ZeRO 0-2 alike."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from advflow.platform.train.engines import build_engine
from advflow.platform.train.methods.base import MetricNames, StepEnv, grad_norm
from advflow.platform.train.methods.generator import OneEngineGenerator
from advflow.trainers import draws, meanflow
from advflow.trainers.ema import EMA
from advflow.trainers.models import build_generator

DRAWS = 2  # the draw purpose (G's, as FM's and AFM's G step)


class MeanFlowStep(OneEngineGenerator):
    streams: ClassVar[tuple[str, ...]] = ("g",)
    # The progress line shows the squared error: the adaptively weighted loss (power 1) is
    # err / (err + eps), about 1 whatever the model.
    names: ClassVar[MetricNames] = MetricNames(progress=(("MF mse", "mf_mse"),), losses=("mf_loss", "mf_mse"),
                                               grads=("g_grad_norm",))

    def __init__(self, env: StepEnv, G: torch.nn.Module):
        self.env, self.G = env, G
        self.loss_cfg = env.spec.meanflow.loss_config()
        self.ema = EMA(G, decay=env.spec.optim.ema_decay, warmup=env.spec.optim.ema_warmup)
        self.engines: dict[str, Any] = {"g": build_engine(G, env.engine_spec(env.spec.distributed.zero_stage_g))}

    @classmethod
    def build(cls, env: StepEnv) -> MeanFlowStep:
        m, mf = env.spec.model, env.spec.meanflow
        torch.manual_seed(env.spec.train.seed)  # identical initial weights on every rank
        G = build_generator(m.size, in_channels=env.data_shape[0], input_size=env.data_shape[1],
                            num_classes=env.num_classes, kind="anystep", nfe=m.nfe,
                            null_label=mf.class_drop > 0)  # the dropped labels' row (CFG's unconditional u)
        return cls(env, G.to(env.device))

    def step(self, k: int, phase) -> dict[str, torch.Tensor]:
        """Draws per micro-batch, in this order from one generator keyed by the sample's global row:
        the noise z, the times (s, t) = (MeanFlow's t, r), then the dropped labels (inside the loss)."""
        env, engine = self.env, self.engines["g"]
        loss = stats = None
        with env.timed("g"):
            for micro in range(env.spec.train.grad_accum):
                x, y = env.streams.next("g")
                gen = env.generator(k, micro, DRAWS)
                z = draws.randn(x.shape, gen, device=env.device)
                s, t = meanflow.sample_times(len(x), self.loss_cfg, generator=gen, device=env.device)
                loss, stats = meanflow.meanflow_loss(engine.module, x, y, z, s, t, self.loss_cfg, generator=gen)
                if env.inject_nan(k):
                    loss = loss + float("nan")
                engine.backward(loss)
                engine.step()
            metrics = {"mf_loss": loss.detach(), **{k_: v.detach() for k_, v in stats.items()}}
            grad_norm(metrics, "g_grad_norm", engine, env.device)
            self.ema.update(self.G)
        return metrics
