"""The worker's wiring of its callbacks and checkpointer, with fakes (no engines, no data, no MLflow):
which steps get grids, evaluations, registrations and samples.png, and that they share one EMA copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advflow.platform.config import RunSpec
from advflow.platform.train import callbacks as cb
from advflow.platform.train.checkpoint import Checkpointer
from advflow.platform.train.metrics import MetricWindow
from advflow.platform.train.worker import Worker


class FakeLogger:
    run_id = "run-1"
    data_tags = {"data.manifest_sha256": "abc"}

    def __init__(self):
        self.grids, self.metrics, self.rows = [], [], []

    def log_rows(self, rows, extra=None):
        self.rows += [r["step"] for r in rows]

    def log_metrics(self, metrics, step):
        self.metrics.append(step)

    def log_grid(self, path, step):
        assert path.is_file()
        self.grids.append(step)

    def log_final(self, metrics):
        pass

    def close(self):
        pass


class Ctx:
    rank, world_size = 0, 1

    def __init__(self):
        self.reports = []

    def report(self, metrics, checkpoint_dir, name=None):
        files = sorted(p.name for p in __import__("pathlib").Path(checkpoint_dir).iterdir())
        self.reports.append((metrics["step"], files, metrics))

    def restore_dir(self):
        return None


class FakeManifest:
    encoder = {"name": "pixel", "scaling_factor": 1.0}


class FakeStream:
    manifest = FakeManifest()


class FakeEvaluator:
    """The split API of evaluators: one row per image, a metric counting the rows."""

    def features(self, images):
        return np.zeros((len(images), 1))

    def metrics_from_features(self, rows, labels):
        return {"eval/fd": float(len(rows))}


class FakeSamples:
    """Draws nothing: blank images, and a file where the grid would go."""

    def __init__(self, real: cb.Samples):
        self.data_shape, self.num_classes, self.device, self.encoder = (real.data_shape, real.num_classes,
                                                                        real.device, real.encoder)

    def images(self, model, labels, gen, batch_size=None, nfe=None):
        return torch.zeros(len(labels), *self.data_shape)

    def grid(self, model, path):
        path.write_bytes(b"png")


def worker_for(tmp_path, monkeypatch, **sections) -> tuple[Worker, Ctx, FakeLogger, list]:
    raw = {"data": {"prefix": "/x"}, "train": {"steps": 30, "global_batch": 16, "checkpoint_every": 6,
                                               "log_every": 5, "sample_every": 10},
           "eval": {"kind": "digits", "every": 10, "num_samples": 4, "batch_size": 4},
           "tracking": {"image_every": 4, "register_name": "m", "register_every": 15}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    spec = RunSpec.from_dict(raw)
    ctx, logger = Ctx(), FakeLogger()
    w = Worker(spec, ctx)
    w.logger, w.data_shape, w.num_classes, w.streams = logger, (1, 8, 8), 10, {"d": FakeStream()}
    w.manifest = FakeStream.manifest
    w.G = torch.nn.Linear(1, 1)
    w.ema_model = lambda: torch.nn.Identity()
    w.window = MetricWindow(torch.device("cpu"), 1, 16)
    w.checkpointer = Checkpointer({}, rank=0, world_size=1, every=6, last_step=30, config={})
    w.build_callbacks()
    registered: list = []

    class Reg:
        model_uri, version = "models:/m/1", "1"

    def fake_log_generator(model, **kw):
        registered.append((kw["step"], kw["metrics"], kw["tags"]))
        return Reg()

    import advflow.platform.tracking.registry as registry

    monkeypatch.setattr(registry, "log_generator", fake_log_generator)
    for c in w.callbacks:
        if isinstance(c, cb.Evaluation):
            c._evaluator = FakeEvaluator()
        if hasattr(c, "samples"):
            c.samples = FakeSamples(c.samples)
    return w, ctx, logger, registered


def drive(w: Worker) -> None:
    """The loop's schedule of callback moments, without the D/G steps."""
    t = w.spec.train
    for step in range(1, t.steps + 1):
        if w.checkpointer.due(step):
            w.save_checkpoint(step, [{"step": step, "d_loss": 0.0, "g_loss": 0.0}], {})
        else:
            rows = [{"step": step, "d_loss": 0.0, "g_loss": 0.0}] if step % t.log_every == 0 else []
            w.run_callbacks(cb.Moment.at(step, False, w.ema_model, since=step - 1, rows=rows))


def test_each_callback_follows_its_own_cadence(tmp_path, monkeypatch):
    w, ctx, logger, registered = worker_for(tmp_path, monkeypatch)
    drive(w)
    checkpoints = [step for step, _, _ in ctx.reports]
    assert checkpoints == [6, 12, 18, 24, 30]
    # MLflow grids every image_every=4 steps (not only at log or checkpoint steps) and at the end.
    assert logger.grids == [4, 8, 12, 16, 20, 24, 28, 30]
    # Evaluation: the first checkpoint at or after 10, 20, 30; registration: after 15, 30.
    assert logger.metrics == [12, 24, 30]
    assert [s for s, _, _ in registered] == [18, 30]
    # samples.png in the checkpoint: sample_every=10 (checkpoint-bound), image-due checkpoints, the end.
    with_grid = [step for step, files, _ in ctx.reports if "samples.png" in files]
    assert with_grid == [12, 24, 30]
    assert all("trainer.json" in files for _, files, _ in ctx.reports)
    # The registered version carries this checkpoint's evaluation and the run's data tags.
    assert registered[-1][1] == {"eval/fd": 4.0} and registered[-1][2]["data.manifest_sha256"] == "abc"
    assert ctx.reports[-1][2]["eval/fd"] == 4.0


def test_checkpoint_shares_one_ema_copy(tmp_path, monkeypatch):
    """Grid, evaluation and registration at a checkpoint use one EMA copy of G, not one each."""
    w, ctx, logger, _ = worker_for(tmp_path, monkeypatch)
    copies: list[object] = []
    w.ema_model = lambda: copies.append(torch.nn.Identity()) or copies[-1]
    used: list[object] = []
    w.callbacks = [lambda m: used.append(m.ema()) for _ in range(3)]
    w.save_checkpoint(30, [], {})
    assert len(used) == 3 and len(copies) == 1 and all(u is copies[0] for u in used)
    assert ctx.reports and ctx.reports[-1][0] == 30


def test_untracked_worker_draws_no_mlflow_grids(tmp_path, monkeypatch):
    from advflow.platform.tracking.logger import NullRunLogger

    w, ctx, _, _ = worker_for(tmp_path, monkeypatch)
    w.logger = NullRunLogger()
    w.build_callbacks()
    assert not any(isinstance(c, cb.Registration) for c in w.callbacks)
    grid = next(c for c in w.callbacks if isinstance(c, cb.SampleGrid))
    assert grid.image is None


@pytest.mark.parametrize("image_every, want", [
    (0, [6, 12, 16]),             # 0: every checkpoint (6, 12) and the end (16)
    (4, [4, 8, 12, 16]),          # its own cadence; checkpoint 6 is not a multiple of 4
    (5, [5, 10, 15, 16]),         # the end always gets one
])
def test_mlflow_grid_cadence(tmp_path, monkeypatch, image_every, want):
    w, ctx, logger, _ = worker_for(tmp_path, monkeypatch, tracking={"image_every": image_every},
                                   train={"steps": 16, "checkpoint_every": 6})
    w.checkpointer = Checkpointer({}, rank=0, world_size=1, every=6, last_step=16, config={})
    drive(w)
    assert [s for s, _, _ in ctx.reports] == [6, 12, 16]
    assert logger.grids == want
