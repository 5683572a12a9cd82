"""What the generator methods (AFM, FM) share: their sampler, their evaluation (`eval.kind`
digits/fid through `platform.eval.EVALUATORS`) and their registered-model format (the EMA
generator as a pickle-free MLflow pyfunc)."""

from __future__ import annotations

import copy
import functools

import torch

from advflow.platform.train import callbacks as cb
from advflow.platform.train.checkpoint import EMAState
from advflow.platform.train.engines import EngineState, set_lr, write_weights


class GeneratorMethod:
    """Mixin: needs `self.env` (StepEnv), `self.G` and `self.ema`."""

    def ema_model(self) -> torch.nn.Module:
        """A detached copy of G holding the EMA weights (the model that is sampled and shipped)."""
        model = copy.deepcopy(self.G).eval()
        with torch.no_grad():
            self.ema.copy_to(model)
        return model

    def sizes(self) -> dict[str, float]:
        out = {"model/g_params": float(sum(p.numel() for p in self.G.parameters()))}
        D = getattr(self, "D", None)
        if D is not None:
            out["model/d_params"] = float(sum(p.numel() for p in D.parameters()))
        return out

    @functools.cached_property
    def samples(self) -> cb.Samples:
        env = self.env
        return cb.Samples(env.data_shape, env.num_classes, env.device, env.manifest.encoder,
                          method=env.spec.model.method)

    def evaluation(self, logger, cadence):
        ev = self.env.spec.eval
        if ev.kind == "none":
            return None
        return cb.Evaluation(self.samples, ev, logger, cadence, rank=self.env.rank, world_size=self.env.world_size)

    def register(self, model, *, name: str, step: int, tags: dict, metrics: dict, run_id: str):
        from advflow.platform.tracking import registry  # MLflow: only where a model is logged

        s = self.samples
        # log_generator tags the version (run_id, step, the data tags, method), logs the evaluation results
        # as the LoggedModel's metrics (linked to the run and the data) and describes the version.
        return registry.log_generator(model, decoder=s.encoder, data_shape=s.data_shape, num_classes=s.num_classes,
                                      registered_name=name, tags={**tags, "method": self.env.spec.model.method},
                                      step=step, run_id=run_id, metrics=metrics)


class OneEngineGenerator(GeneratorMethod):
    """Mixin for the methods that train one generator engine "g" and no D (fm, meanflow): their
    checkpoint parts, learning rate and phase events. Needs `self.engines["g"]` besides the above."""

    def parts(self) -> dict:
        return {"g": EngineState(self.engines["g"], "g"), "ema": EMAState(self.ema)}

    def set_lr(self, phase, factor: float) -> dict[str, float]:
        set_lr(self.engines["g"], phase.lr * self.G.lr_scale * factor)
        return {"lr": phase.lr * factor, "lr_g": phase.lr * self.G.lr_scale * factor, "phase": float(phase.phase_index)}

    def on_event(self, event) -> None:
        if event.kind == "ema_reload":
            write_weights(self.engines["g"], self.ema.shadow)
        # No D: no snapshots, no D reloads (the config refuses d_reload_from for these methods).

    def on_new_best(self) -> None:
        pass
