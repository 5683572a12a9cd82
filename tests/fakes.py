"""Fakes shared by the loop's tests."""

from __future__ import annotations

import numpy as np
import torch

from advflow.platform.train import callbacks as cb
from advflow.platform.train.methods.base import MetricNames


class OneRankContext:
    """The loop's WorkerContext (platform/train/loop.py) for one in-process rank that keeps nothing:
    reports are dropped, there is nothing to restore or roll back to, and no metrics log."""

    rank, world_size = 0, 1
    takes_staging_dir = False
    restore_uri = None

    def report(self, metrics, checkpoint_dir, name=None):
        pass

    def restore_dir(self):
        return None

    def fetch_checkpoint(self, name):
        raise FileNotFoundError(name)

    def run_storage(self):
        return None  # no metrics log

    def drain(self):
        pass


class FakeLogger:
    run_id = "run-1"
    data_tags = {"data.manifest_sha256": "abc"}

    def __init__(self):
        self.grids, self.metrics, self.rows, self.events = [], [], [], []

    def log_rows(self, rows, extra=None):
        self.rows += [r["step"] for r in rows]

    def log_metrics(self, metrics, step):
        self.metrics.append(step)

    def log_grid(self, path, step):
        assert path.is_file()
        self.grids.append(step)

    def log_event(self, tags, metrics, step):
        self.events.append((tags, metrics, step))

    def rewind(self, step):
        pass

    def log_final(self, metrics):
        self.final = metrics

    def close(self):
        pass


class FakeManifest:
    shape, num_classes = (1, 8, 8), 10
    encoder = {"name": "pixel", "scaling_factor": 1.0}


class FakeStream:
    """Endless zero batches; a JSON state that counts them."""

    manifest = FakeManifest()

    def __init__(self, prefix, batch, **kw):
        self.batch, self.served = batch, 0

    def __iter__(self):
        while True:
            self.served += 1
            yield torch.zeros(self.batch, 1, 8, 8), torch.zeros(self.batch, dtype=torch.long)

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]

    def close(self):
        pass


class FakeEvaluator:
    """The split API of evaluators: one row per image, a metric counting the rows."""

    def features(self, images):
        return np.zeros((len(images), 1))

    def metrics_from_features(self, rows, labels):
        return {"eval/fd": float(len(rows))}


class FakeSamples:
    """Draws nothing: blank images, and a file where the grid would go."""

    data_shape, num_classes, device, encoder = (1, 8, 8), 10, torch.device("cpu"), FakeManifest.encoder

    def images(self, model, labels, gen, batch_size=None, nfe=None):
        return torch.zeros(len(labels), *self.data_shape)

    def grid(self, model, path):
        path.write_bytes(b"png")


class FakeMethod:
    """A method that trains nothing: it reads its stream, reports constant losses, and records
    every EMA copy, registration and new-best snapshot the loop asks of it (by the step, i.e. the
    batches read so far). Its evaluation is `evaluator` (a class attribute tests may replace)."""

    evaluator = FakeEvaluator

    streams = ("g",)
    names = MetricNames(progress=(("D", "d_loss"), ("G", "g_loss")), losses=("d_loss", "g_loss"))
    samples = FakeSamples()

    def __init__(self, env):
        self.env, self.engines, self.copies, self.registered, self.bests = env, {}, [], [], []

    @classmethod
    def build(cls, env):
        return cls(env)

    def parts(self):
        return {}

    def step(self, k, phase):
        self.env.streams.next("g")
        return {"d_loss": torch.tensor(0.0), "g_loss": torch.tensor(0.0)}

    def set_lr(self, phase, factor):
        return {"lr": phase.lr * factor}

    def on_event(self, event):
        pass

    def on_new_best(self):
        self.bests.append(self.env.streams.by_name["g"].served)

    def ema_model(self):
        self.copies.append(self.env.streams.by_name["g"].served)  # which step asked for a copy
        return torch.nn.Identity()

    def sizes(self):
        return {"model/g_params": 1.0}

    def evaluation(self, logger, cadence):
        if self.env.spec.eval.kind == "none":
            return None
        e = cb.Evaluation(self.samples, self.env.spec.eval, logger, cadence)
        e._evaluator = self.evaluator()
        return e

    def register(self, model, *, name, step, tags, metrics, run_id):
        self.registered.append((step, metrics, tags))

        class Reg:
            model_uri, version = f"models:/{name}/{len(self.registered)}", str(len(self.registered))

        return Reg()
