"""`model.method: meanflow` on the platform (issue 23, item 1).

- The run config's `meanflow` section and the pure loss's `MeanFlowConfig` have the same fields and
  defaults; config errors name the field and the fix.
- 2 gloo workers at ZeRO 0 and 2 give the per-step MeanFlow losses of a hand-written single-process
  reference (plain AdamW on the global batch, the same data and draws, the target's JVP taken by
  double backward with `torch.autograd.functional.jvp`, not the forward-mode `torch.func.jvp` the
  platform uses), and the loss falls.
- A run stopped at step 8 resumes exactly, on the same 2 workers and on 1 (elastic).
- The registered format is the any-step generator's: `flow.generate` samples it, one step being
  z - u(z, 1, 0)."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from advflow.platform.config import ConfigError, RunSpec

STEPS, WORKERS, BATCH, RESUME_AT = 16, 2, 32, 8


def test_the_config_section_and_the_pure_loss_agree_on_fields_and_defaults():
    from advflow.trainers.meanflow import MeanFlowConfig

    spec = RunSpec.from_dict({"data": {"prefix": "/x"}, "model": {"method": "meanflow"}})
    assert spec.model.kind == "anystep" and spec.model.nfe == 1  # MeanFlow's defaults: u(z, r, t), one step
    loss_defaults = {f.name: f.default for f in dataclasses.fields(MeanFlowConfig)}
    assert spec.meanflow.model_dump() == loss_defaults
    assert spec.meanflow.loss_config() == MeanFlowConfig()
    changed = RunSpec.from_dict({"data": {"prefix": "/x"}, "model": {"method": "meanflow"},
                                 "meanflow": {"power": 0.5, "cfg_omega": 2.0, "class_drop": 0.1}})
    assert changed.meanflow.loss_config() == MeanFlowConfig(power=0.5, cfg_omega=2.0, class_drop=0.1)


@pytest.mark.parametrize("raw, field", [
    ({"model": {"method": "meanflow", "kind": "multistep", "nfe": 2}}, "model.kind: 'multistep' with method meanflow"),
    ({"model": {"method": "meanflow", "kind": "1nfe"}}, "model.kind: '1nfe' with method meanflow"),
    ({"model": {"method": "meanflow"}, "meanflow": {"cfg_omega": 2.0}}, "meanflow.class_drop: is 0"),
    ({"model": {"method": "meanflow"}, "meanflow": {"ratio_r_neq_t": 1.5}}, "meanflow.ratio_r_neq_t"),
    ({"model": {"method": "meanflow"}, "meanflow": {"time_std": 0.0}}, "meanflow.time_std"),
    ({"model": {"method": "meanflow"}, "meanflow": {"variant": "shortcut"}}, "meanflow.variant"),
    ({"model": {"method": "meanflow"}, "phases": "auto"}, "phases: auto is for method afm"),
    ({"model": {"method": "meanflow"}, "phases": [{"name": "a", "start": 0, "guidance": True}]}, "phases: phase"),
])
def test_meanflow_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunSpec.from_dict({"data": {"prefix": "/x"}, **raw})


def test_meanflow_samples_k_steps_by_the_anystep_sampler_at_any_k():
    """What eval.nfe and the registered model use: `generate` on the any-step network; one step is
    z - u(z, 1, 0) (MeanFlow's z_0 = z_1 - u(z_1, 0, 1))."""
    from advflow.platform.train.callbacks import Samples
    from advflow.trainers.models import build_generator

    torch.manual_seed(0)
    G = build_generator("tiny", kind="anystep", nfe=1, in_channels=1, input_size=8, num_classes=10).eval()
    for p in G.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    s = Samples((1, 8, 8), 10, torch.device("cpu"), {"name": "pixel"}, method="meanflow")
    with torch.no_grad():
        one = z - G.velocity(z, y, torch.ones(4), torch.zeros(4))
        torch.testing.assert_close(s.sample(G, z, y), one)
        half = z - 0.5 * G.velocity(z, y, torch.ones(4), torch.full((4,), 0.5))
        two = half - 0.5 * G.velocity(half, y, torch.full((4,), 0.5), torch.zeros(4))
        torch.testing.assert_close(s.sample(G, z, y, nfe=2), two)


def spec_for(prefix: str, stage: int, workers: int = WORKERS, **sections) -> RunSpec:
    raw = {"run": {"keep_checkpoints": 4},
           "data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
           "model": {"method": "meanflow", "size": "tiny"},
           "meanflow": {"class_drop": 0.1, "cfg_omega": 2.0, "cfg_kappa": 0.25},  # every draw and branch
           "optim": {"lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.9},
           "train": {"steps": STEPS, "global_batch": BATCH, "log_every": 4, "checkpoint_every": RESUME_AT},
           "distributed": {"workers": workers, "zero_stage_g": stage}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return RunSpec.from_dict(raw)


def reference_losses(spec: RunSpec) -> list[dict[str, float]]:
    """The whole global batch in one process: the global stream, each sample's draws for the whole
    batch in the platform's order (noise, times, label drop), the loss written out, one AdamW."""
    from advflow.platform.data.reader import LatentStream
    from advflow.platform.train.methods import step_seed
    from advflow.trainers import meanflow
    from advflow.trainers.models import build_generator
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mf = spec.meanflow
    torch.manual_seed(spec.train.seed)
    stream = LatentStream(spec.data.prefix, spec.train.global_batch, partitions=spec.partitions, seed=spec.train.seed,
                          stream="g", shuffle_buffer=spec.data.shuffle_buffer, prefetch=spec.data.prefetch)
    it = iter(stream)
    m = stream.manifest
    G = build_generator("tiny", kind="anystep", nfe=1, in_channels=m.shape[0], input_size=m.shape[1],
                        num_classes=m.num_classes, null_label=True)
    o = spec.optim
    opt = torch.optim.AdamW(G.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    out = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x, y = next(it)
        n = len(x)
        gen = torch.Generator().manual_seed(step_seed(spec.train.seed, step, 0, 2))
        z = torch.randn(x.shape, generator=gen)
        s, t = meanflow.sample_times(n, spec.meanflow.loss_config(), generator=gen)  # tested in test_meanflow.py
        drop = torch.rand((n,), generator=gen) < mf.class_drop
        null = torch.full_like(y, m.num_classes)
        y_in = torch.where(drop, null, y)
        sb, tb = s.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
        zs = (1 - sb) * x + sb * z
        v = z - x
        with torch.no_grad():  # the guided velocity: omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | 0)
            v_g = (mf.cfg_omega * v + mf.cfg_kappa * G.velocity(zs, y, s, s)
                   + (1 - mf.cfg_omega - mf.cfg_kappa) * G.velocity(zs, null, s, s))
            v_g = torch.where(drop.view(-1, 1, 1, 1), v, v_g)
        # du/ds along (v_g, 1, 0) in (z, s, t), by double backward (an independent implementation; SDPA's
        # math kernel, since the fused CPU kernel has no double backward).
        with sdpa_kernel(SDPBackend.MATH):
            _, du_ds = torch.autograd.functional.jvp(lambda a, b: G.velocity(a, y_in, b, t), (zs, s),
                                                     (v_g, torch.ones_like(s)))
        u = G.velocity(zs, y_in, s, t)
        delta = u - (v_g - (sb - tb) * du_ds).detach()
        err = (delta ** 2).flatten(1).sum(1)  # (N,)
        loss = (err / (err.detach() + mf.eps) ** mf.power).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(G.parameters(), o.grad_clip)
        opt.step()
        # With power 1 the weighted loss is err / (err + eps), about 1 whatever the model: the squared
        # error is what shows the training, and what is compared.
        out.append({"mf_loss": loss.item(), "mf_mse": (delta ** 2).mean().item()})
    stream.close()
    return out


@pytest.mark.integration  # worker processes: 2 workers x 2 stages, two resumes
@pytest.mark.timeout(1200)
def test_meanflow_on_two_workers_matches_a_reference_and_resumes_exactly_and_elastically(digits, tmp_path):
    from advflow.platform.train.checkpoint import read_meta
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    ref = reference_losses(spec_for(digits, 2))
    mse = [r["mf_mse"] for r in ref]
    assert sum(mse[-4:]) < 0.9 * sum(mse[:4]), mse  # it learns: a frozen model would match trivially
    histories = {}
    for stage in (0, 2):
        history = histories[stage] = run_local(spec_for(digits, stage), tmp_path / f"zero{stage}")
        assert [r["step"] for r in history] == list(range(1, STEPS + 1))
        assert "d_loss" not in history[0] and "mf_mse" in history[0]
        for step, (row, want) in enumerate(zip(history, ref), start=1):
            for key in ("mf_mse", "mf_loss"):
                assert math.isclose(row[key], want[key], rel_tol=1e-5, abs_tol=1e-7), (
                    f"ZeRO-{stage} step {step}: {key} {row[key]:.8f} vs reference {want[key]:.8f}")
        last = latest_checkpoint(tmp_path / f"zero{stage}")
        meta = read_meta(last)
        assert meta["config"]["model"]["method"] == "meanflow" and not (last / "d").exists()

    # Stopped after step 8 (its last checkpoint removed), resumed on 2 workers and on 1.
    reference = [r["mf_mse"] for r in histories[2]]
    for workers in (2, 1):
        resumed = tmp_path / f"resumed{workers}"
        shutil.copytree(tmp_path / "zero2", resumed)
        shutil.rmtree(resumed / f"checkpoint_{STEPS:06d}")
        rows = run_local(spec_for(digits, 2, workers=workers), resumed)
        assert read_meta(resumed / f"checkpoint_{STEPS:06d}")["resumes"] == [RESUME_AT]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        for row, want in zip(rows[RESUME_AT:], reference[RESUME_AT:]):
            # Exact on 2 workers; on 1 only the order of the gradients' reduction differs.
            assert math.isclose(row["mf_mse"], want, rel_tol=1e-9 if workers == 2 else 1e-4), (
                f"resumed on {workers} worker(s), step {row['step']}: {row['mf_mse']:.8f} vs {want:.8f}")


def test_a_guided_meanflow_generator_round_trips_through_the_registered_format(tmp_path):
    """Trained with CFG, the generator has a null-label row: its registered data rebuilds it (the row
    included), samples exactly what the trained module samples, and refuses the null label as input
    (guidance is in MeanFlow's training target; sampling is unguided, one step)."""
    from advflow.platform.tracking.model_format import GeneratorSpec, load_model_data, write_model_data
    from advflow.trainers.flow import generate
    from advflow.trainers.models import build_generator

    torch.manual_seed(0)
    G = build_generator("tiny", kind="anystep", nfe=1, in_channels=1, input_size=8, num_classes=10,
                        null_label=True).eval()
    for p in G.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    assert G.y_embedder.embedding_table.num_embeddings == 11
    spec = GeneratorSpec(generator=G.config, decoder={"name": "pixel"}, data_shape=(1, 8, 8), num_classes=10)
    loaded = load_model_data(write_model_data(G, spec, tmp_path / "data"), device="cpu")
    assert loaded.generator.null_label and loaded.generator.y_embedder.embedding_table.num_embeddings == 11
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(generate(loaded.generator, z, y), generate(G, z, y))
    with pytest.raises(ValueError, match="outside the model's classes"):
        loaded.generate([10], [0])
