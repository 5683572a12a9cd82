"""A method is one file: a toy method defined here, and nowhere else, trains on the real loop
(`TrainLoop` with real data streams over shards on disk, the real checkpointer and metrics log),
checkpoints, and resumes exactly after a crash. Nothing outside this file knows about it.

The toy: a linear map G regressed onto a fixed target image, with per-sample noise
drawn from the loop's generator (keyed by the row in the global batch), trained with plain SGD
(no optimizer state, so its one checkpoint part is G's weights in a safetensors file)."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch

from advflow.platform.config import RunSpec
from advflow.platform.train.checkpoint import TensorFile
from advflow.platform.train.local_launch import LocalContext, latest_checkpoint
from advflow.platform.train.loop import TrainLoop
from advflow.platform.train.methods.base import MetricNames
from advflow.platform.train.metrics_log import MetricsLog
from advflow.trainers import draws
from helpers_data import make_dataset


def regression_loss(G: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The toy's pure loss: mean squared error of G(x + noise) (N, D) against target (N, D)."""
    return ((G(x + noise) - target) ** 2).mean()


class ToyRegression:
    """One method on the loop: what it reads, its state, its step."""

    streams: ClassVar[tuple[str, ...]] = ("toy",)
    names: ClassVar[MetricNames] = MetricNames(progress=(("MSE", "toy_loss"),), losses=("toy_loss",))
    samples = None  # draws no pictures

    def __init__(self, env, G: torch.nn.Module, targets: torch.Tensor):
        self.env, self.G, self.targets = env, G, targets
        self.opt = torch.optim.SGD(G.parameters(), lr=env.spec.optim.lr)
        self.engines: dict = {}

    @classmethod
    def build(cls, env):
        torch.manual_seed(env.spec.train.seed)
        d = math.prod(env.data_shape)
        targets = torch.randn(1, d, generator=torch.Generator().manual_seed(99))  # (1, D)
        return cls(env, torch.nn.Linear(d, d), targets)

    def parts(self):
        return {"toy": TensorFile(self.G, "toy.safetensors")}

    def step(self, k, phase):
        x, y = self.env.streams.next("toy")
        x = torch.tanh(x.flatten(1).float())  # the records' first value is their id (up to 120): squash it
        noise = 0.1 * draws.randn(x.shape, self.env.generator(k, 0, 1), device=self.env.device)
        loss = regression_loss(self.G, x, self.targets.expand_as(x), noise)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"toy_loss": loss.detach()}

    def set_lr(self, phase, factor):
        for group in self.opt.param_groups:
            group["lr"] = phase.lr * factor
        return {"lr": phase.lr * factor}

    def on_event(self, event):
        pass

    def on_new_best(self):
        pass

    def ema_model(self):
        return self.G

    def sizes(self):
        return {"model/toy_params": float(sum(p.numel() for p in self.G.parameters()))}

    def evaluation(self, logger, cadence):
        return None

    def register(self, model, **kw):
        raise AssertionError("the toy is never registered (tracking is off)")


class Crash(RuntimeError):
    pass


class CrashAfter(LocalContext):
    """The local launcher's context, failing right after it stored the checkpoint of `step`."""

    def __init__(self, *args, step: int):
        super().__init__(*args)
        self.crash_step = step

    def report(self, metrics, checkpoint_dir, name=None):
        super().report(metrics, checkpoint_dir, name)
        if metrics["step"] == self.crash_step:
            raise Crash(f"killed after step {self.crash_step}")


def spec_for(prefix: str) -> RunSpec:
    return RunSpec.from_dict({
        "data": {"prefix": prefix, "shuffle_buffer": 64, "prefetch": 1},
        "model": {"method": "fm", "nfe": 1},  # any valid config; the loop is given the toy method
        "optim": {"lr": 0.2},
        "train": {"steps": 24, "global_batch": 8, "checkpoint_every": 6, "log_every": 3, "seed": 3},
        "tracking": {"enabled": False}, "run": {"keep_checkpoints": 10}})


def rows_of(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "samples_per_s"}
            for r in MetricsLog(str(run_dir)).read()]


def test_a_method_defined_in_a_test_trains_checkpoints_and_resumes_exactly(tmp_path):
    prefix = str(tmp_path / "data")
    make_dataset(prefix, n=120, shape=(1, 4, 4), num_classes=3, shard_records=40, chunk_records=8)
    spec = spec_for(prefix)

    # Uninterrupted.
    full_dir = tmp_path / "full"
    TrainLoop(spec, LocalContext(0, 1, full_dir, 10), method=ToyRegression).train()
    full = rows_of(full_dir)
    assert [r["step"] for r in full] == list(range(1, 25))
    assert full[-1]["toy_loss"] < 0.5 * full[0]["toy_loss"], "the toy did not learn"
    assert sorted(p.name for p in full_dir.glob("checkpoint_*")) == [f"checkpoint_{s:06d}" for s in (6, 12, 18, 24)]
    assert (latest_checkpoint(full_dir) / "toy.safetensors").is_file()

    # Killed after the checkpoint of step 12, then restarted from it.
    run_dir = tmp_path / "resumed"
    with pytest.raises(Crash):
        TrainLoop(spec, CrashAfter(0, 1, run_dir, 10, step=12), method=ToyRegression).train()
    assert latest_checkpoint(run_dir).name == "checkpoint_000012"
    loop = TrainLoop(spec, LocalContext(0, 1, run_dir, 10), method=ToyRegression)
    state = loop.train()
    assert state.resumes == [12] and state.step == 24
    assert rows_of(run_dir) == full, "the resumed run's per-step losses differ from the uninterrupted run's"
    want = TrainLoop(spec, LocalContext(0, 1, full_dir, 10), method=ToyRegression)
    want.build()
    want.checkpointer.load(str(latest_checkpoint(full_dir)))
    assert all(torch.equal(a, b) for a, b in zip(loop.method.G.parameters(), want.method.G.parameters()))
    want.streams.close()
