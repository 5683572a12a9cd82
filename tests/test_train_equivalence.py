"""Data-parallel correctness of the training loop (loop.py, AFM) (issue 4, section 4).

Two gloo workers with DeepSpeed ZeRO 0, 1 and 2 must give the same per-step D and G losses, and those
must equal a single-process reference written here by hand: plain torch modules and AdamW, the whole
global batch in one call (the same data and per-sample noise as the two workers' halves), the same
clipping, no DeepSpeed and no torch.distributed. That the reference is one process on the whole batch
is also what elastic resume needs: the numbers must not depend on the number of workers. DeepSpeed has had CPU all-reduce and two-engine GAN
bugs (issues 4923, 399, 5639); this test is what catches a regression when versions move.
"""

from __future__ import annotations

import math

import pytest
import torch

from advflow.platform.config import RunSpec
from advflow.platform.data.reader import LatentStream
from advflow.platform.train.local_launch import run_local
from advflow.platform.train.methods import step_seed
from advflow.platform.train.phases import plan_of
from advflow.trainers import afm
from advflow.trainers.ema import EMA
from advflow.trainers.models import build_discriminator, build_generator
from fakes import OneRankContext

STEPS = 20
WORKERS = 2
GLOBAL_BATCH = 32


def spec_for(prefix: str, stage: int, workers: int = WORKERS) -> RunSpec:
    return RunSpec.from_dict({
        "data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"size": "tiny"},
        "optim": {"lr": 1e-4, "grad_clip": 1.0, "ema_decay": 0.9},
        "adversarial": {"ot_scale": {"kind": "cosine", "start": 0.2, "end": 0.01, "steps": STEPS}},
        "train": {"steps": STEPS, "global_batch": GLOBAL_BATCH, "log_every": 5, "checkpoint_every": STEPS},
        "distributed": {"workers": workers, "zero_stage_g": stage, "zero_stage_d": stage},
    })


def reference_losses(spec: RunSpec) -> list[tuple[float, float]]:
    """The whole global batch in one process: plain torch modules and AdamW, one loss per step.

    What the workers must add up to: each worker's rows of the global batch (the data order's canonical partitions)
    with each sample's noise drawn from the step's generator as if the whole batch were one
    (trainers/draws.py), per-worker mean losses whose averaged gradients are the global mean's."""
    torch.manual_seed(spec.train.seed)
    streams = {name: LatentStream(spec.data.prefix, spec.train.global_batch, partitions=spec.partitions, seed=spec.train.seed, stream=name,
                                  shuffle_buffer=spec.data.shuffle_buffer, prefetch=spec.data.prefetch)
               for name in ("d", "g")}
    iters = {k: iter(s) for k, s in streams.items()}
    m = streams["d"].manifest
    c, h, w = m.shape
    common = dict(in_channels=c, input_size=h, num_classes=m.num_classes)
    G = build_generator("tiny", kind="1nfe", **common)
    D = build_discriminator("tiny", time_cond=False, **common)
    o = spec.optim
    opt_g = torch.optim.AdamW([p for p in G.parameters() if p.requires_grad], lr=o.lr, betas=o.betas,
                              weight_decay=o.weight_decay, eps=o.eps)
    opt_d = torch.optim.AdamW([p for p in D.parameters() if p.requires_grad], lr=o.lr, betas=o.betas,
                              weight_decay=o.weight_decay, eps=o.eps)
    ema = EMA(G, decay=o.ema_decay)
    plan = plan_of(spec)
    base = afm.AFMConfig(gp_fraction=spec.adversarial.gp_fraction, gp_eps=spec.adversarial.gp_eps)
    gradnorm = afm.make_gradnorm(base)
    out = []
    for step in range(STEPS):
        cfg = base.with_phase(plan.at(step))
        losses = []
        for purpose, name, opt, net in ((1, "d", opt_d, D), (2, "g", opt_g, G)):
            opt.zero_grad(set_to_none=True)
            x, y = next(iters[name])
            gen = torch.Generator().manual_seed(step_seed(spec.train.seed, step, 0, purpose))
            z = torch.randn(x.shape, generator=gen)
            if name == "d":
                loss, _ = afm.d_loss(G, D, x, y, z, cfg, generator=gen)
            else:
                loss, _ = afm.g_loss(G, D, gradnorm, x, y, z, cfg, generator=gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
            opt.step()
            losses.append(loss.item())
        ema.update(G)
        out.append(tuple(losses))
    for s in streams.values():
        s.close()
    return out


def close(a: float, b: float, rtol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-7)


@pytest.mark.integration  # 2 worker processes per stage
@pytest.mark.timeout(900)
def test_zero_stages_match_each_other_and_a_single_process_reference(digits, tmp_path):
    runs = {}
    for stage in (0, 1, 2):
        history = run_local(spec_for(digits, stage), tmp_path / f"zero{stage}")
        assert [row["step"] for row in history] == list(range(1, STEPS + 1))
        runs[stage] = [(row["d_loss"], row["g_loss"]) for row in history]
    ref = reference_losses(spec_for(digits, 2))
    # The losses move: a test on a frozen model would pass trivially.
    assert abs(ref[-1][0] - ref[0][0]) > 1e-3 and abs(ref[-1][1] - ref[0][1]) > 1e-3
    for stage, losses in runs.items():
        for step, ((d, g), (rd, rg)) in enumerate(zip(losses, ref), start=1):
            assert close(d, rd) and close(g, rg), (
                f"ZeRO-{stage} step {step}: D {d:.8f} vs reference {rd:.8f}, G {g:.8f} vs {rg:.8f}")




def apply_phase(trainer, step: int):
    """What the loop does before step `step`'s updates (its events, the learning rates); returns
    the AFM config of that step."""
    phase = trainer.phases.at(step)
    trainer.method.set_lr(phase, trainer.recovery.lr_factor())
    return trainer.method.cfg.with_phase(phase)


@pytest.fixture(scope="module")
def single_process_group():
    """One gloo group for the whole module: DeepSpeed caches the group it first saw, so the group
    must outlive every engine built here."""
    import os

    import torch.distributed as dist

    from advflow.platform.net import free_port

    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.integration  # DeepSpeed builds engines (its op checks run the compiler)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_steps_touch_only_their_own_network(digits, stage, single_process_group):
    """A G step leaves D's weights, gradients and optimizer state alone, and vice versa."""
    from advflow.platform.train.loop import TrainLoop

    trainer = TrainLoop(spec_for(digits, stage, workers=1), OneRankContext())
    trainer.setup()
    m = trainer.method
    try:
        def snapshot(module):
            return [p.detach().clone() for p in module.parameters()]

        def same(a, b):
            return all(torch.equal(x, y) for x, y in zip(a, b))

        flags = [p.requires_grad for p in m.D.parameters()]
        cfg = apply_phase(trainer, 0)
        for step in range(2):  # the second round runs with non-zero Adam state
            g_before, d_before = snapshot(m.G), snapshot(m.D)
            m.d_step(step, cfg)
            assert same(g_before, snapshot(m.G)), "a D step changed G"
            assert not same(d_before, snapshot(m.D)), "a D step did not change D"
            assert all(p.grad is None or not p.grad.any() for p in m.G.parameters())
            d_after_d = snapshot(m.D)
            d_opt_steps = [s.get("step") for s in m.engines["d"].optimizer.state_dict().get("state", {}).values()] \
                if stage == 0 else None
            m.g_step(step, cfg)
            assert same(d_after_d, snapshot(m.D)), "a G step changed D"
            assert all(p.grad is None or not p.grad.any() for p in m.D.parameters()), \
                "a G step left gradients on D"
            assert [p.requires_grad for p in m.D.parameters()] == flags, \
                "D's parameters stayed frozen after the G step"
            if d_opt_steps is not None:
                after = [s.get("step") for s in m.engines["d"].optimizer.state_dict().get("state", {}).values()]
                assert after == d_opt_steps, "a G step advanced D's optimizer"
    finally:
        trainer.close()


@pytest.mark.integration  # DeepSpeed builds engines (its op checks run the compiler)
def test_phase_events_reload_d_and_ema(digits, single_process_group, tmp_path):
    """Table 11's D reload restores the snapshot taken at a phase end; EMA reload copies EMA into G."""
    from advflow.platform.train.loop import TrainLoop
    from advflow.trainers.schedules import Event

    trainer = TrainLoop(spec_for(digits, 2, workers=1), OneRankContext())
    trainer.setup()
    m = trainer.method
    try:
        cfg = apply_phase(trainer, 0)
        trainer.on_event(Event("save_tag", 0, tag="decay_end"))
        snapshot = [p.detach().clone() for p in m.D.parameters()]
        m.d_step(0, cfg)
        m.g_step(0, cfg)
        assert not all(torch.equal(a, b) for a, b in zip(snapshot, m.D.parameters()))
        # The snapshot survives a checkpoint round trip (a restarted run can still reload).
        trainer.checkpointer.save(str(tmp_path), 1)
        m.d_tags.clear()
        trainer.checkpointer.load(str(tmp_path))
        trainer.on_event(Event("d_reload", 1, source="decay_end"))
        assert all(torch.equal(a, b) for a, b in zip(snapshot, m.D.parameters()))
        with pytest.raises(ValueError, match="available: \\['decay_end'\\]"):
            trainer.on_event(Event("d_reload", 1, source="nope_end"))
        trainer.on_event(Event("ema_reload", 1))
        for name, p in m.G.named_parameters():
            if name in m.ema.shadow:
                assert torch.equal(p.detach(), m.ema.shadow[name].to(p.dtype))
    finally:
        trainer.close()
