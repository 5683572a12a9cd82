"""AFM (`model.method: afm`): G, D and EMA(G) in two DeepSpeed engines; each iteration one D
update then one G update, each on its own batch (streams "d" and "g"). The losses are
`trainers.afm.d_loss` / `g_loss`; classifier guidance loads the frozen classifier when a phase
turns it on. Phase events (Table 11) reload EMA(G) into G and snapshot or reload D, always through
the engines (`engines.write_weights`), so DeepSpeed's fp32 master takes the new weights too."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from advflow.platform.train.checkpoint import EMAState, SnapshotFiles, TensorFile
from advflow.platform.train.engines import EngineState, build_engine, read_weights, set_lr, write_weights
from advflow.platform.train.methods.base import MetricNames, StepEnv, grad_norm
from advflow.platform.train.methods.generator import GeneratorMethod
from advflow.trainers import afm, draws
from advflow.trainers.ema import EMA
from advflow.trainers.models import build_discriminator, build_generator

D_DRAWS, G_DRAWS = 1, 2  # draw purposes (StepEnv.generator)


class AFMStep(GeneratorMethod):
    streams: ClassVar[tuple[str, ...]] = ("d", "g")
    names: ClassVar[MetricNames] = MetricNames(
        progress=(("D", "d_loss"), ("G", "g_loss")), losses=("d_loss", "g_loss"),
        grads=("d_grad_norm", "g_grad_norm"), logits=("d_logit_real", "d_logit_fake", "g_logit_fake"),
        terms=("d_adv", "r1", "r2", "cp", "g_adv", "ot", "cg"))

    def __init__(self, env: StepEnv, G: torch.nn.Module, D: torch.nn.Module):
        spec = env.spec
        a = spec.adversarial
        self.env, self.G, self.D = env, G, D
        self.cfg = afm.AFMConfig(gp_fraction=a.gp_fraction, gp_eps=a.gp_eps, use_gradnorm=a.gradnorm,
                                 gradnorm_momentum=a.gradnorm_momentum, source=a.source, cg_t_mode=spec.cg_t_mode)
        self.ema = EMA(G, decay=spec.optim.ema_decay, warmup=spec.optim.ema_warmup)
        self.gradnorm = afm.make_gradnorm(self.cfg).to(env.device)
        self.classifier = self.load_classifier() if any(p.get("guidance") for p in spec.phase_dicts()) else None
        d = spec.distributed
        self.engines: dict[str, Any] = {"g": build_engine(G, env.engine_spec(d.zero_stage_g)),
                                        "d": build_engine(D, env.engine_spec(d.zero_stage_d))}
        self.d_tags: dict[str, dict[str, torch.Tensor]] = {}
        """D snapshots taken at phase ends (and at the best evaluation under `phases: auto`), for
        Table 11's D reload; they travel in every checkpoint so a restarted run can still reload."""

    @classmethod
    def build(cls, env: StepEnv) -> AFMStep:
        m = env.spec.model
        common = dict(in_channels=env.data_shape[0], input_size=env.data_shape[1], num_classes=env.num_classes)
        torch.manual_seed(env.spec.train.seed)  # identical initial weights on every rank
        G = build_generator(m.size, **common, kind=m.kind, nfe=m.nfe, repeats=m.repeats).to(env.device)
        D = build_discriminator(m.d_size or m.size, **common, time_cond=m.kind != "1nfe").to(env.device)
        return cls(env, G, D)

    def load_classifier(self) -> torch.nn.Module:
        """The guidance classifier, pickle-free, frozen, on this worker's device; its data shape and
        classes must be the run's."""
        from advflow.platform.tracking.registry import load_classifier

        env, ref = self.env, self.env.spec.guidance.classifier
        clf = load_classifier(ref, device=env.device)
        want = (env.data_shape, env.num_classes)
        got = ((clf.in_channels, clf.input_size, clf.input_size), clf.num_classes)
        if got != want:
            raise ValueError(f"guidance.classifier={ref}: it classifies {got[0]} inputs into {got[1]} classes, "
                             f"but this run's data is {want[0]} with {want[1]} classes; train a classifier on "
                             "this dataset (jobs/train.py --config jobs/configs/digits_classifier.yaml)")
        return clf.eval().requires_grad_(False)

    def parts(self) -> dict[str, Any]:
        return {"g": EngineState(self.engines["g"], "g"), "ema": EMAState(self.ema),
                "d": EngineState(self.engines["d"], "d"),
                "gradnorm": TensorFile(self.gradnorm, "gradnorm.safetensors"), "d_tags": SnapshotFiles(self.d_tags)}

    # ------------------------------------------------------------------ the step

    def step(self, k: int, phase) -> dict[str, torch.Tensor]:
        cfg = self.cfg.with_phase(phase)
        return {**self.d_step(k, cfg), **self.g_step(k, cfg)}

    def d_step(self, k: int, cfg: afm.AFMConfig) -> dict[str, torch.Tensor]:
        env, engine = self.env, self.engines["d"]
        metrics: dict[str, torch.Tensor] = {}
        with env.timed("d"):
            for micro in range(env.spec.train.grad_accum):
                x, y = env.streams.next("d")
                gen = env.generator(k, micro, D_DRAWS)
                z = draws.randn(x.shape, gen, device=env.device)
                # G's plain module under no_grad inside d_loss: G's engine never sees this graph.
                loss, metrics = afm.d_loss(self.G, engine, x, y, z, cfg, generator=gen)
                engine.backward(loss)
                engine.step()
            grad_norm(metrics, "d_grad_norm", engine, env.device)
        return metrics

    def g_step(self, k: int, cfg: afm.AFMConfig) -> dict[str, torch.Tensor]:
        env, engine = self.env, self.engines["g"]
        metrics: dict[str, torch.Tensor] = {}
        with env.timed("g"):
            for micro in range(env.spec.train.grad_accum):
                x, y = env.streams.next("g")
                gen = env.generator(k, micro, G_DRAWS)
                z = draws.randn(x.shape, gen, device=env.device)
                # D's plain module with frozen parameters: D's engine hooks stay silent (engines.py).
                loss, metrics = afm.g_loss(engine, self.D, self.gradnorm, x, y, z, cfg, self.classifier,
                                           generator=gen)
                if env.inject_nan(k):
                    loss = loss + float("nan")
                    metrics["g_loss"] = loss.detach()
                engine.backward(loss)
                engine.step()
            grad_norm(metrics, "g_grad_norm", engine, env.device)
            self.ema.update(self.G)
        return metrics

    # ------------------------------------------------------------------ phases

    def set_lr(self, phase, factor: float) -> dict[str, float]:
        set_lr(self.engines["g"], phase.lr * self.G.lr_scale * factor)
        set_lr(self.engines["d"], phase.lr_d * factor)
        return {"lr": phase.lr * factor, "lr_g": phase.lr * self.G.lr_scale * factor, "phase": float(phase.phase_index),
                "lambda_ot": phase.lambda_ot, "lambda_gp": phase.lambda_gp, "lambda_cp": phase.lambda_cp,
                "lambda_cg": phase.lambda_cg, "augment_p": phase.augment_p, "lr_d": phase.lr_d * factor}

    def on_event(self, event) -> None:
        """Table 11's events. D snapshots hold D's weights only (replicated under ZeRO 0-2, so every
        rank keeps its own copy, the fp32 master where there is one); a reload replaces the weights
        and keeps the optimizer's moments."""
        if event.kind == "ema_reload":
            write_weights(self.engines["g"], self.ema.shadow)
        elif event.kind == "save_tag":
            self.d_tags[event.tag] = read_weights(self.engines["d"])
        elif event.kind == "d_reload":
            source = event.source if isinstance(event.source, str) else None
            if source not in self.d_tags:
                raise ValueError(
                    f"phase {event.phase_index}: d_reload_from={event.source!r} is not a saved D snapshot; "
                    f"available: {sorted(self.d_tags)} (snapshots are taken at phase ends, named "
                    "'<phase>_end', and under phases: auto at the best evaluation, named 'best'; reloading "
                    "from a step number is not supported)")
            write_weights(self.engines["d"], self.d_tags[source])

    def on_new_best(self) -> None:
        self.d_tags["best"] = read_weights(self.engines["d"])
