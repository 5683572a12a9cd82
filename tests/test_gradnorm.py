"""GradNormalizer: identity forward, EMA-normalised backward, scale invariance, distributed sync."""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from advflow.trainers.gradnorm import GradNormalizer
from advflow.trainers.losses import relativistic_loss


def _backprop(gn: GradNormalizer, c: torch.Tensor) -> torch.Tensor:
    """Send incoming gradient c through gn; return what reaches its input."""
    x = torch.zeros_like(c, requires_grad=True)
    (gn(x) * c).sum().backward()
    return x.grad


def test_forward_is_identity_and_no_grad_passthrough():
    gn = GradNormalizer()
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    torch.testing.assert_close(gn(x), x)
    with torch.no_grad():
        assert gn(x) is x
    assert int(gn.count) == 0


def test_backward_matches_the_official_uncorrected_ema():
    """Official grad_norm.py: ema <- lerp(ema, v, 1 - m) from 0, divisor sqrt(ema) + 1e-8, no bias correction."""
    gn = GradNormalizer(momentum=0.9)
    c1 = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    c2 = torch.tensor([[0.1, 0.2], [-0.3, 0.0]])
    n = 4
    v1 = n * (1 + 4 + 0.25 + 9)
    v2 = n * (0.01 + 0.04 + 0.09)

    g1 = _backprop(gn, c1)
    scale1 = math.sqrt(0.1 * v1) + 1e-8  # step 1 divides by sqrt(0.1 v1): 3.16x less than ||g|| sqrt(n)
    torch.testing.assert_close(g1, c1 / scale1)
    assert gn.last_scale == pytest.approx(scale1, rel=1e-6)
    assert gn.ema.item() == pytest.approx(0.1 * v1, rel=1e-6)

    g2 = _backprop(gn, c2)
    ema2 = 0.9 * 0.1 * v1 + 0.1 * v2
    scale2 = math.sqrt(ema2) + 1e-8
    torch.testing.assert_close(g2, c2 / scale2)
    assert int(gn.count) == 2
    assert gn.last_scale == pytest.approx(scale2, rel=1e-6)


def test_momentum_zero_uses_current_batch_only_and_validation():
    gn = GradNormalizer(momentum=0.0)
    _backprop(gn, torch.full((5,), 100.0))
    g = _backprop(gn, torch.full((5,), 2.0))
    torch.testing.assert_close(g, torch.full((5,), 2.0) / (math.sqrt(5 * 5 * 4.0) + 1e-8))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="momentum"):
            GradNormalizer(momentum=bad)


def test_state_dict_roundtrip_resumes_same_scale():
    a = GradNormalizer()
    for k in range(3):
        _backprop(a, torch.randn(6, generator=torch.Generator().manual_seed(k)))
    sd = a.state_dict()
    assert set(sd) == {"ema", "count", "scale"}
    b = GradNormalizer()
    b.load_state_dict(sd)
    c = torch.randn(6, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(_backprop(a, c), _backprop(b, c))
    assert a.last_scale == b.last_scale


def test_adversarial_loss_scale_does_not_change_generator_gradient():
    torch.manual_seed(0)
    g_net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    d_net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    d_net.requires_grad_(False)

    def grads(factor: float, use_gn: bool):
        g = copy.deepcopy(g_net)
        gn = GradNormalizer(0.9)
        out = []
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            z = torch.randn(16, 3, dtype=torch.float64, generator=gen)
            real = torch.randn(16, 3, dtype=torch.float64, generator=gen)
            fake = g(z)
            if use_gn:
                fake = gn(fake)
            loss = factor * relativistic_loss(d_net(fake).squeeze(1), d_net(real).squeeze(1))
            g.zero_grad()
            loss.backward()
            out.append([p.grad.clone() for p in g.parameters()])
        return out

    base, scaled = grads(1.0, True), grads(1000.0, True)
    for step_a, step_b in zip(base, scaled):
        for ga, gb in zip(step_a, step_b):
            # float32 EMA buffer: the scales agree to float32 rounding (~1e-7), not float64.
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=0)
    # Sanity: without the normalizer the factor does show up.
    raw, raw_scaled = grads(1.0, False), grads(1000.0, False)
    torch.testing.assert_close(raw[0][0] * 1000.0, raw_scaled[0][0])
    assert not torch.allclose(raw[0][0], raw_scaled[0][0])


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gn = GradNormalizer(0.9)
        # Ranks see different gradients (and rank 1's are 3x larger).
        c1 = torch.full((2, 3), float(rank + 1) ** 2)
        c2 = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (rank + 1)
        g1 = _backprop(gn, c1)
        g2 = _backprop(gn, c2)
        torch.save(
            {"ema": gn.ema.clone(), "count": gn.count.clone(), "scale": gn.scale.clone(), "g1": g1, "g2": g2},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_distributed_ranks_share_one_ema(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    r = [torch.load(tmp_path / f"rank{k}.pt") for k in range(world)]
    torch.testing.assert_close(r[0]["ema"], r[1]["ema"], rtol=0, atol=0)
    torch.testing.assert_close(r[0]["scale"], r[1]["scale"], rtol=0, atol=0)
    assert int(r[0]["count"]) == int(r[1]["count"]) == 2

    # Hand reference: v is the rank-mean of n * ||g||^2, then the official un-corrected EMA.
    n = 6
    v1 = (n * n * 1.0**2 + n * n * 4.0**2) / 2  # c1 entries: 1 on rank 0, 4 on rank 1
    sq = sum(k * k for k in range(6))
    v2 = (n * sq * 1 + n * sq * 4) / 2
    ema2 = 0.9 * 0.1 * v1 + 0.1 * v2
    scale2 = math.sqrt(ema2) + 1e-8
    assert r[0]["ema"].item() == pytest.approx(ema2, rel=1e-6)
    assert r[0]["scale"].item() == pytest.approx(scale2, rel=1e-6)
    for rank in range(world):
        c1 = torch.full((2, 3), float(rank + 1) ** 2)
        torch.testing.assert_close(r[rank]["g1"], c1 / (math.sqrt(0.1 * v1) + 1e-8))
