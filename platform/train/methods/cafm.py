"""CAFM (`model.method: cafm`; continuous adversarial flow models, arXiv 2604.11521): a registered
flow-matching velocity model (`model.init`) post-trained against a discriminator built from its own
trunk. Two DeepSpeed engines, g and d (ZeRO stages `distributed.zero_stage_g` / `zero_stage_d`), and
EMA(G); each iteration k is ONE optimizer update, of D or of G as `trainers.cafm.step_kind(k, cfg)`
says (D only while k <= cafm.warmup, then cafm.d_steps D updates per G update), each on its own stream
("d", "g") and its own draws (`StepEnv.generator(k, micro, purpose)`: noise, times, then the label drop
inside the loss). The EMA is updated after each G update only. Losses: `trainers.cafm.d_loss` / `g_loss`,
both read D through a Jacobian-vector product, so they run on the plain modules (`engine.module`, as
MeanFlow's step; the engines' gradient hooks sit on the parameters, so ZeRO 0-2 alike).

The start (`load_init`): `model.init` is inspected (`tracking.init_source`: the registry version's
tags), loaded (`tracking.registry.load_generator`, pickle-free) and refused in one line unless it is a
flow-matching model (method fm, kind multistep) of the run's size, data shape and classes; the same
check the driver's preflight made before launch. G is rebuilt at the run's K (`model.nfe`) with the
loaded weights; when cafm.class_drop > 0 it gets the null-label row the dropped labels need (the
official 1001-row table): the loaded rows are copied and the new row keeps the initialisation DiT gives
its whole class table (normal, std 0.02), drawn from train.seed so every rank has the same. D is
`trainers.cafm.build_cafm_discriminator(G)` (G's trunk, a new token and head).

Metrics: `d_loss` and D's terms on D steps, `g_loss` and G's on G steps (a key a step does not record is
absent from its row: `metrics.MetricWindow.flush`), `g_update` (1 on G steps, 0 on D steps) at every
step. The registered version names its start: tags `source_model` (models:/NAME/VERSION, or the path)
and `source_run_id`, and a "Post-trained from" line in its description."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from advflow.platform.train.checkpoint import EMAState
from advflow.platform.train.engines import EngineState, build_engine, set_lr, write_weights
from advflow.platform.train.methods.base import MetricNames, StepEnv, grad_norm
from advflow.platform.train.methods.generator import GeneratorMethod
from advflow.trainers import cafm, draws
from advflow.trainers.ema import EMA
from advflow.trainers.models import Generator, build_generator

D_DRAWS, G_DRAWS = 1, 2  # draw purposes (StepEnv.generator), as AFM's
TABLE = "y_embedder.embedding_table.weight"


def load_init(env: StepEnv) -> tuple[Generator, dict[str, str]]:
    """(G on the device, the lineage tags {source_model, source_run_id}) from `model.init`; raises
    ValueError with the one-line refusal of `tracking.init_source.init_problem`."""
    from advflow.platform.tracking import registry
    from advflow.platform.tracking.init_source import init_problem, inspect_init

    spec = env.spec
    m, drop = spec.model, spec.cafm.class_drop
    source = inspect_init(m.init)
    loaded = registry.load_generator(source.resolved, device="cpu")
    source.generator, source.num_classes = dict(loaded.spec.generator), int(loaded.spec.num_classes)
    source.run_id = source.run_id or loaded.source.get("run_id")
    problem = init_problem(source, size=m.size, data_shape=env.data_shape, num_classes=env.num_classes)
    if problem:
        raise ValueError(problem)
    options = dict(loaded.spec.generator)
    name = options.pop("name")
    options.update(nfe=m.nfe, null_label=bool(options.get("null_label", False) or drop > 0))
    torch.manual_seed(spec.train.seed)  # the new null row (and D's new token and head): the same on every rank
    G = build_generator(name, **options)
    state = loaded.generator.state_dict()
    with torch.no_grad():
        for key, value in G.state_dict().items():
            if key == TABLE and value.shape[0] == state[key].shape[0] + 1:
                value[:-1].copy_(state[key])  # the classes' rows; the null row keeps DiT's init
            else:
                value.copy_(state[key])
    tags = {"source_model": source.resolved}
    if source.run_id:
        tags["source_run_id"] = str(source.run_id)
    return G.to(env.device), tags


class CAFMStep(GeneratorMethod):
    streams: ClassVar[tuple[str, ...]] = ("d", "g")
    names: ClassVar[MetricNames] = MetricNames(
        progress=(("D", "d_loss"), ("G", "g_loss")), losses=("d_loss", "g_loss"),
        grads=("d_grad_norm", "g_grad_norm"), logits=("d_logit", "g_logit"),
        terms=("d_adv", "d_adv_real", "d_adv_fake", "cp", "g_adv", "ot"), every_step="g_update")

    def __init__(self, env: StepEnv, G: Generator, D: torch.nn.Module, source_tags: dict[str, str]):
        spec = env.spec
        self.env, self.G, self.D, self.source_tags = env, G, D, source_tags
        self.cfg = spec.cafm.loss_config()
        self.ema = EMA(G, decay=spec.optim.ema_decay, warmup=spec.optim.ema_warmup)
        d = spec.distributed
        self.engines: dict[str, Any] = {"g": build_engine(G, env.engine_spec(d.zero_stage_g)),
                                        "d": build_engine(D, env.engine_spec(d.zero_stage_d))}

    @classmethod
    def build(cls, env: StepEnv) -> CAFMStep:
        G, tags = load_init(env)
        D = cafm.build_cafm_discriminator(G)  # after G: its new token and head continue the seeded draws
        return cls(env, G, D, tags)

    def parts(self) -> dict[str, Any]:
        return {"g": EngineState(self.engines["g"], "g"), "ema": EMAState(self.ema),
                "d": EngineState(self.engines["d"], "d")}

    # ------------------------------------------------------------------ the step

    def step(self, k: int, phase) -> dict[str, torch.Tensor]:
        g_update = cafm.step_kind(k, self.cfg) == "g"
        metrics = self.g_step(k) if g_update else self.d_step(k)
        metrics["g_update"] = torch.tensor(float(g_update), device=self.env.device)
        return metrics

    def _batch(self, stream: str, k: int, micro: int, purpose: int):
        """x, y of the stream; the draws' generator; z and t drawn from it (the label drop comes next,
        inside the loss)."""
        env = self.env
        x, y = env.streams.next(stream)
        gen = env.generator(k, micro, purpose)
        z = draws.randn(x.shape, gen, device=env.device)
        t = cafm.sample_cafm_times(len(x), self.cfg, generator=gen, device=env.device)
        return x, y, z, t, gen

    def d_step(self, k: int) -> dict[str, torch.Tensor]:
        env, engine = self.env, self.engines["d"]
        metrics: dict[str, torch.Tensor] = {}
        with env.timed("d"):
            for micro in range(env.spec.train.grad_accum):
                x, y, z, t, gen = self._batch("d", k, micro, D_DRAWS)
                # G's plain module under no_grad inside d_loss: G's engine never sees this graph.
                loss, metrics = cafm.d_loss(self.G, engine.module, x, y, z, t, self.cfg, generator=gen)
                if env.inject_nan(k):
                    loss = loss + float("nan")
                    metrics["d_loss"] = loss.detach()
                engine.backward(loss)
                engine.step()
            grad_norm(metrics, "d_grad_norm", engine, env.device)
        return metrics

    def g_step(self, k: int) -> dict[str, torch.Tensor]:
        env, engine = self.env, self.engines["g"]
        metrics: dict[str, torch.Tensor] = {}
        with env.timed("g"):
            for micro in range(env.spec.train.grad_accum):
                x, y, z, t, gen = self._batch("g", k, micro, G_DRAWS)
                # D's plain module with detached parameters: D's engine hooks stay silent.
                loss, metrics = cafm.g_loss(engine.module, self.D, x, y, z, t, self.cfg, generator=gen)
                if env.inject_nan(k):
                    loss = loss + float("nan")
                    metrics["g_loss"] = loss.detach()
                engine.backward(loss)
                engine.step()
            grad_norm(metrics, "g_grad_norm", engine, env.device)
            self.ema.update(self.G)
        return metrics

    # ------------------------------------------------------------------ phases and registration

    def set_lr(self, phase, factor: float) -> dict[str, float]:
        set_lr(self.engines["g"], phase.lr * self.G.lr_scale * factor)
        set_lr(self.engines["d"], phase.lr_d * factor)
        return {"lr": phase.lr * factor, "lr_g": phase.lr * self.G.lr_scale * factor, "lr_d": phase.lr_d * factor,
                "phase": float(phase.phase_index)}

    def on_event(self, event) -> None:
        if event.kind == "ema_reload":
            write_weights(self.engines["g"], self.ema.shadow)
        # No D snapshots or reloads, no guidance (the config refuses those phase keys for cafm).

    def on_new_best(self) -> None:
        pass

    def register(self, model, *, name: str, step: int, tags: dict, metrics: dict, run_id: str):
        """The generator format of every generator method, with the start's lineage as version tags."""
        return super().register(model, name=name, step=step, tags={**tags, **self.source_tags}, metrics=metrics,
                                run_id=run_id)
