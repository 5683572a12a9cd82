"""`model.method: fm` on the platform (issue 12, item 1).

- A multistep generator's own sampler is K Euler steps of its velocity, so a registered FM model
  (kind multistep, K = model.nfe) generates exactly what the training-time evaluation sampled.
- 2 gloo workers at ZeRO 0 and 2 give the per-step FM losses of a hand-written single-process
  reference (plain AdamW on the global batch, same data and noise), and the loss falls.
- `eval.nfe` reports `eval/fd@K` per K with the same noise; at the model's own K it equals `eval/fd`.
- Config errors name the field and the fix."""

from __future__ import annotations

import math

import pytest
import torch

from advflow.platform.config import ConfigError, RunSpec
from advflow.trainers import fm
from advflow.trainers.flow import euler_sample, generate
from advflow.trainers.models import build_generator
from fakes import OneRankContext

STEPS, WORKERS, BATCH = 16, 2, 32


def test_a_multistep_generators_own_sampler_is_euler_on_its_velocity():
    torch.manual_seed(0)
    G = build_generator("tiny", kind="multistep", nfe=4, in_channels=1, input_size=8, num_classes=10).eval()
    for p in G.parameters():  # away from the zero-initialised head, so the velocity is not 0
        p.data.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    out = generate(G, z, y)
    assert out.abs().sum() > 0 and not torch.allclose(out, z)
    torch.testing.assert_close(out, euler_sample(G, z, y, 4), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(euler_sample(G, z, y, 2), out, atol=1e-4)  # K matters


def spec_for(prefix: str, stage: int, **sections) -> RunSpec:
    raw = {"data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
           "model": {"method": "fm", "size": "tiny", "nfe": 4},
           "optim": {"lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.9},
           "train": {"steps": STEPS, "global_batch": BATCH, "log_every": 4, "checkpoint_every": STEPS},
           "distributed": {"workers": WORKERS, "zero_stage_g": stage, "zero_stage_d": stage}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return RunSpec.from_dict(raw)


def reference_losses(spec: RunSpec) -> list[float]:
    """The whole global batch in one process: the global stream, each sample's noise and time drawn
    for the whole batch, one loss, one AdamW (what the workers' halves must add up to)."""
    from advflow.platform.data.reader import LatentStream
    from advflow.platform.train.methods import step_seed

    torch.manual_seed(spec.train.seed)
    stream = LatentStream(spec.data.prefix, spec.train.global_batch, partitions=spec.partitions, seed=spec.train.seed, stream="g",
                          shuffle_buffer=spec.data.shuffle_buffer, prefetch=spec.data.prefetch)
    it = iter(stream)
    m = stream.manifest
    G = build_generator("tiny", kind="multistep", nfe=4, in_channels=m.shape[0], input_size=m.shape[1],
                        num_classes=m.num_classes)
    o = spec.optim
    opt = torch.optim.AdamW(G.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    out = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x, y = next(it)
        gen = torch.Generator().manual_seed(step_seed(spec.train.seed, step, 0, 2))
        z = torch.randn(x.shape, generator=gen)
        t = fm.sample_fm_times(len(x), "uniform", generator=gen, device="cpu")
        # The loss written out (not fm.fm_loss): || v(x_t, y, t) - (z - x) ||^2, x_t on the straight path.
        xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * z
        loss = ((G.velocity(xt, y, t) - (z - x)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(G.parameters(), o.grad_clip)
        opt.step()
        out.append(loss.item())
    stream.close()
    return out


@pytest.mark.integration  # 2 worker processes per stage
@pytest.mark.timeout(900)
def test_fm_on_two_workers_matches_a_single_process_reference_at_zero_0_and_2(digits, tmp_path):
    from advflow.platform.train.checkpoint import read_meta
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    ref = reference_losses(spec_for(digits, 2))
    assert ref[-1] < 0.8 * ref[0]  # it learns: a frozen model would match trivially
    for stage in (0, 2):
        history = run_local(spec_for(digits, stage), tmp_path / f"zero{stage}")
        assert [r["step"] for r in history] == list(range(1, STEPS + 1))
        assert "d_loss" not in history[0] and "lambda_ot" not in history[0]
        for step, (row, want) in enumerate(zip(history, ref), start=1):
            assert math.isclose(row["fm_loss"], want, rel_tol=1e-5, abs_tol=1e-7), (
                f"ZeRO-{stage} step {step}: {row['fm_loss']:.8f} vs reference {want:.8f}")
        meta = read_meta(latest_checkpoint(tmp_path / f"zero{stage}"))
        assert meta["config"]["model"]["method"] == "fm" and not (latest_checkpoint(tmp_path / f"zero{stage}")
                                                                  / "d").exists()




class _FakeStream:
    """A record stream with a digits-like manifest and no records (no step runs)."""

    def __init__(self, prefix, batch_size, **kw):
        self.manifest = type("Manifest", (), {"shape": (1, 8, 8), "num_classes": 10,
                                              "encoder": {"name": "pixel", "scaling_factor": 1.0}})()

    def __iter__(self):
        return iter(())

    def close(self):
        pass


def test_eval_at_several_k_uses_the_same_noise_and_names_each_k(tmp_path, monkeypatch):
    """eval/fd@K per K of eval.nfe; at the model's own K it is eval/fd (one sampling, same seed)."""
    from advflow.platform.tracking.logger import NullRunLogger
    from advflow.platform.train import callbacks as cb
    from advflow.platform.train.loop import TrainLoop

    # The FM loop's own callbacks, built as at its start (fake streams and engine: no step runs).
    spec = RunSpec.from_dict({"data": {"prefix": "/x"}, "model": {"method": "fm", "kind": "multistep", "nfe": 4},
                              "train": {"steps": 30, "global_batch": 16, "checkpoint_every": 6},
                              "eval": {"kind": "digits", "every": 10, "num_samples": 4, "batch_size": 4,
                                       "nfe": [1, 2, 4]}})
    monkeypatch.setattr("advflow.platform.train.methods.fm.build_engine", lambda model, engine_spec: object())
    w = TrainLoop(spec, OneRankContext(), stream_factory=_FakeStream)
    w.logger = NullRunLogger()
    w.build()
    w.build_callbacks()
    seen = []

    class ByK:
        def features(self, images):
            return images.flatten(1).double().numpy()

        def metrics_from_features(self, rows, labels):
            return {"eval/fd": float(rows.mean()), "eval/fd_floor": 3.0}

    class Samples(cb.Samples):
        def images(self, model, labels, gen, batch_size=None, nfe=None):
            seen.append((nfe, float(torch.rand((), generator=gen))))  # the first draw of this sampling
            return torch.full((len(labels), 1, 8, 8), float(nfe or model.nfe))

    ev = next(c for c in w.callbacks if isinstance(c, cb.Evaluation))
    ev._evaluator, ev.samples = ByK(), Samples((1, 8, 8), 10, torch.device("cpu"), {"name": "pixel"}, method="fm")
    w.ema_model = lambda: type("G", (), {"nfe": 4})()
    m = cb.Moment.at(12, False, w.ema_model, since=6, checkpoint_dir=tmp_path)
    ev(m)
    assert {k: v for k, v in m.metrics.items() if k.startswith("eval/fd")} == {
        "eval/fd": 4.0, "eval/fd_floor": 3.0, "eval/fd@1": 1.0, "eval/fd@2": 2.0, "eval/fd@4": 4.0}
    assert [k for k, _ in seen] == [None, 1, 2] and len({draw for _, draw in seen}) == 1


@pytest.mark.parametrize("model, ev, field", [
    ({"method": "fm", "kind": "1nfe"}, {}, "model.kind: '1nfe' with method fm"),
    ({"method": "fm", "kind": "multistep"}, {}, "model.nfe: is not set for method fm"),
    ({"method": "gan"}, {}, "model.method: 'gan' is unknown"),
    ({"method": "fm", "nfe": 4, "fm_times": "beta"}, {}, "model.fm_times"),
    ({}, {"nfe": [1, 2]}, "eval.nfe: [1, 2] for a 1nfe AFM generator"),
    ({"kind": "anystep"}, {"nfe": [2, 2]}, "eval.nfe: [2, 2] is not a list of distinct K"),
])
def test_fm_and_eval_nfe_errors_name_the_field(model, ev, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        RunSpec.from_dict({"data": {"prefix": "/x"}, "model": model, "eval": ev})


def test_anystep_afm_and_fm_accept_several_k():
    for model in ({"kind": "anystep"}, {"method": "fm", "nfe": 8}):
        spec = RunSpec.from_dict({"data": {"prefix": "/x"}, "model": model, "eval": {"nfe": [1, 2, 8]}})
        assert spec.eval.nfe == [1, 2, 8]
    assert RunSpec.from_dict({"data": {"prefix": "/x"}, "model": {"method": "fm", "nfe": 8}}).model.kind == "multistep"


@pytest.mark.integration  # MLflow server, worker processes
@pytest.mark.timeout(900)
def test_a_registered_fm_model_carries_its_k_and_per_k_metrics(digits, tmp_path, mlflow_env):
    import secrets

    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from advflow.platform.tracking import registry
    from advflow.platform.tracking.registry import load_generator
    from advflow.platform.tracking.runs import tracked_run
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    name = "fm-" + secrets.token_hex(3)
    spec = spec_for(digits, 2, train={"steps": 8, "checkpoint_every": 8},
                    eval={"kind": "digits", "num_samples": 100, "batch_size": 100, "nfe": [2, 4]},
                    tracking={"register_name": name, "system_metrics": False})
    with tracked_run(spec) as run:
        run_local(spec, tmp_path / "fm", run_id=run.run_id)
        run.ok = True
    client = MlflowClient()
    version = client.get_model_version(name, "1")
    assert version.tags["method"] == "fm"
    metrics = registry.model_metrics(client, version)  # the LoggedModel's metrics ('@' is logged as '_at_')
    assert metrics["eval/fd_at_4"] == metrics["eval/fd"] and "eval/fd_at_2" in metrics
    assert "FM 4-step generator (DiT tiny, K=4, R=1)" in version.description
    model = load_generator(f"models:/{name}/1")
    G = model.generator
    assert (G.kind, G.nfe) == ("multistep", 4)  # its sampler: 4 Euler steps (first test of this file)
    ema = load_file(str(latest_checkpoint(tmp_path / "fm") / "ema.safetensors"))
    for key, value in G.state_dict().items():
        torch.testing.assert_close(value.cpu(), ema[key], rtol=0, atol=0)
