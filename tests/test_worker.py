"""The loop's wiring of its callbacks, checkpointer and controllers, with fakes (a fake method, fake
streams, a fake MLflow logger; no engines, no data files, no MLflow): `TrainLoop.train()` itself
runs, so these tests see the real schedule — which steps get grids, evaluations, registrations
and samples.png, that they share one EMA copy, and that a window's rows reach the logger."""

from __future__ import annotations

from pathlib import Path

import pytest

from advflow.platform.config import RunSpec
from advflow.platform.train import callbacks as cb
from advflow.platform.train import loop as loop_module
from advflow.platform.train.loop import TrainLoop
from fakes import FakeLogger, FakeMethod, FakeStream, OneRankContext


class Ctx(OneRankContext):
    """One rank that keeps what it was reported."""

    def __init__(self):
        self.reports = []

    def report(self, metrics, checkpoint_dir, name=None):
        files = sorted(p.name for p in Path(checkpoint_dir).iterdir())
        self.reports.append((metrics["step"], files, metrics))


def run(monkeypatch, logger=None, **sections) -> tuple[TrainLoop, Ctx, FakeLogger]:
    raw = {"data": {"prefix": "/x"}, "train": {"steps": 30, "global_batch": 16, "checkpoint_every": 6,
                                               "log_every": 5, "sample_every": 10},
           "eval": {"kind": "digits", "every": 10, "num_samples": 4, "batch_size": 4},
           "tracking": {"image_every": 4, "register_name": "m", "register_every": 15}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    spec = RunSpec.from_dict(raw)
    logger = logger or FakeLogger()
    monkeypatch.setattr(loop_module, "run_logger", lambda *a, **kw: logger)
    ctx = Ctx()
    loop = TrainLoop(spec, ctx, stream_factory=FakeStream, method=FakeMethod)
    loop.train()
    return loop, ctx, logger


def test_each_callback_follows_its_own_cadence(monkeypatch):
    loop, ctx, logger = run(monkeypatch)
    checkpoints = [step for step, _, _ in ctx.reports]
    assert checkpoints == [6, 12, 18, 24, 30]
    # MLflow grids every image_every=4 steps (not only at log or checkpoint steps) and at the end.
    assert logger.grids == [4, 8, 12, 16, 20, 24, 28, 30]
    # Evaluation: the first checkpoint at or after 10, 20, 30; registration: after 15, 30.
    assert logger.metrics == [12, 24, 30]
    registered = loop.method.registered
    assert [s for s, _, _ in registered] == [18, 30]
    # samples.png in the checkpoint: sample_every=10 (checkpoint-bound), image-due checkpoints, the end.
    with_grid = [step for step, files, _ in ctx.reports if "samples.png" in files]
    assert with_grid == [12, 24, 30]
    assert all("trainer.json" in files for _, files, _ in ctx.reports)
    # The registered version carries this checkpoint's evaluation and the run's data tags.
    assert registered[-1][1] == {"eval/fd": 4.0} and registered[-1][2]["data.manifest_sha256"] == "abc"
    assert registered[-1][2]["data.prefix"] == "/x"
    assert ctx.reports[-1][2]["eval/fd"] == 4.0
    # Every step's row reached MLflow once, in order; the final metrics name the registrations.
    assert logger.rows == list(range(1, 31))
    assert [r["step"] for r in logger.final["registered"]] == [18, 30]


def test_one_ema_copy_per_step_that_needs_one(monkeypatch):
    """Grid, evaluation and registration at a checkpoint share one EMA copy (a copy of an XL/2 G is
    2.7 GB); steps where nothing is due make none."""
    loop, _, logger = run(monkeypatch)
    copies = loop.method.copies
    assert len(copies) == len(set(copies)), f"a step made more than one EMA copy: {copies}"
    # Grids (4, 8, ..., 28, 30), evaluations (12, 24, 30), registrations (18, 30): one copy each step.
    assert copies == sorted(set(logger.grids) | set(logger.metrics) | {18, 30})


def test_untracked_loop_draws_no_mlflow_grids(monkeypatch):
    from advflow.platform.tracking.logger import NullRunLogger

    loop, ctx, _ = run(monkeypatch, logger=NullRunLogger())
    assert loop.registration is None and not loop.method.registered
    grid = next(c for c in loop.callbacks if isinstance(c, cb.SampleGrid))
    assert grid.image is None
    # samples.png still lands in checkpoints (sample_every=10 and the end), never an MLflow grid.
    assert [step for step, files, _ in ctx.reports if "samples.png" in files] == [12, 24, 30]


@pytest.mark.parametrize("image_every, want", [
    (0, [6, 12, 16]),             # 0: every checkpoint (6, 12) and the end (16)
    (4, [4, 8, 12, 16]),          # its own cadence; checkpoint 6 is not a multiple of 4
    (5, [5, 10, 15, 16]),         # the end always gets one
])
def test_mlflow_grid_cadence(monkeypatch, image_every, want):
    _, ctx, logger = run(monkeypatch, tracking={"image_every": image_every}, train={"steps": 16, "checkpoint_every": 6})
    assert [s for s, _, _ in ctx.reports] == [6, 12, 16]
    assert logger.grids == want


def test_a_method_without_samples_gets_no_grid(monkeypatch):
    """The classifier draws no samples: no SampleGrid callback, no samples.png."""
    monkeypatch.setattr(FakeMethod, "samples", None)
    loop, ctx, logger = run(monkeypatch, train={"sample_every": 0}, tracking={"image_every": 0},
                            eval={"kind": "none"})
    assert not any(isinstance(c, cb.SampleGrid) for c in loop.callbacks)
    assert logger.grids == [] and not any("samples.png" in files for _, files, _ in ctx.reports)


def test_checkpoint_holds_the_loop_and_stream_state(monkeypatch, tmp_path):
    """The loop's own parts are in every checkpoint: the stream's state, which a restart resumes."""
    import json

    saved = {}

    class Keeping(Ctx):
        def report(self, metrics, checkpoint_dir, name=None):
            super().report(metrics, checkpoint_dir, name)
            saved[metrics["step"]] = json.loads((Path(checkpoint_dir) / "readers.json").read_text())

    monkeypatch.setattr(loop_module, "run_logger", lambda *a, **kw: FakeLogger())
    spec = RunSpec.from_dict({"data": {"prefix": "/x"}, "train": {"steps": 12, "global_batch": 16,
                                                                  "checkpoint_every": 6, "log_every": 3}})
    TrainLoop(spec, Keeping(), stream_factory=FakeStream, method=FakeMethod).train()
    assert saved == {6: {"g": {"served": 6}}, 12: {"g": {"served": 12}}}


def test_every_method_the_config_accepts_has_a_step_class():
    """`model.method`'s values (config.py, torch-free) and the METHODS table name the same methods."""
    import typing

    from advflow.platform.config import ModelConfig
    from advflow.platform.train.methods import METHODS

    assert set(typing.get_args(ModelConfig.model_fields["method"].annotation)) == set(METHODS)
    for cls in METHODS.values():
        assert cls.streams and cls.names.losses, cls  # what the loop builds streams and checks from
