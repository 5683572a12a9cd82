"""Flow-matching baseline and the generator EMA, against hand-written references."""

import pytest
import torch
from torch import nn

from advflow.trainers.ema import EMA
from advflow.trainers.flow import euler_sample
from advflow.trainers.fm import fm_loss, sample_fm_times


class LinearVelocity(nn.Module):
    """velocity(x, y, s) = a * x + b * s (per-sample s), a 'multistep' stand-in."""

    kind, nfe, repeats = "multistep", 1, 1

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(-0.25))

    def velocity(self, x, y, s, t=None):
        return self.a * x + self.b * s.view(-1, 1, 1, 1)


def test_fm_loss_matches_hand_computation():
    G = LinearVelocity()
    x = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 0.0]]]])  # (2, 1, 1, 2)
    z = torch.tensor([[[[0.0, 1.0]]], [[[2.0, -2.0]]]])
    t = torch.tensor([0.5, 0.25])
    # x_t: sample 0 = 0.5 x + 0.5 z = [0.5, 1.5]; sample 1 = 0.75 x + 0.25 z = [-0.25, -0.5]
    # v_pred = 0.5 x_t - 0.25 t: [0.125, 0.625], [-0.1875, -0.3125]
    # target z - x: [-1, -1], [3, -2]
    diffs = [0.125 + 1, 0.625 + 1, -0.1875 - 3, -0.3125 + 2]
    expected = sum(d * d for d in diffs) / 4
    loss = fm_loss(G, x, torch.zeros(2, dtype=torch.long), z, t)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert G.a.grad is not None and G.b.grad is not None


class PointMassVelocity(nn.Module):
    """The exact flow-matching field for data = c: v(x, t) = (x - c) / t (= z - x on every path)."""

    kind, nfe, repeats = "multistep", 1, 1

    def __init__(self, c):
        super().__init__()
        self.c = c

    def velocity(self, x, y, s, t=None):
        return (x - self.c) / s.view(-1, 1, 1, 1)


def test_fm_loss_zero_for_exact_field_and_sampler_recovers_data():
    c = 0.3
    z = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.full_like(z, c)
    t = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    G = PointMassVelocity(c)
    y = torch.zeros(8, dtype=torch.long)
    assert fm_loss(G, x, y, z, t).item() == pytest.approx(0.0, abs=1e-20)
    # an incorrect field is penalised
    assert fm_loss(PointMassVelocity(c + 0.1), x, y, z, t).item() > 1e-3
    torch.testing.assert_close(euler_sample(G, z, y, 3), x)


def test_fm_loss_rejects_other_kinds():
    G = LinearVelocity()
    G.kind = "1nfe"
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="multistep"):
        fm_loss(G, x, torch.zeros(1, dtype=torch.long), x, torch.tensor([0.5]))


def test_sample_fm_times():
    g = torch.Generator().manual_seed(0)
    u = sample_fm_times(40_000, "uniform", generator=g)
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = sample_fm_times(40_000, "logit_normal", generator=g)
    assert abs(ln.median().item() - 0.5) < 0.01  # sigmoid(0) is the median
    # logit-normal concentrates in the middle: fewer extreme times than uniform's 20%
    assert ((ln < 0.1) | (ln > 0.9)).float().mean() < 0.05
    shifted = sample_fm_times(40_000, "logit_normal", generator=g, mean=1.0)
    assert abs(torch.logit(shifted).mean().item() - 1.0) < 0.03
    with pytest.raises(ValueError, match="dist"):
        sample_fm_times(3, "beta")


def test_fm_training_reduces_loss_on_tiny_dit():
    models = pytest.importorskip("advflow.trainers.models")
    torch.manual_seed(0)
    G = models.build_generator("tiny", in_channels=1, input_size=8, num_classes=10, kind="multistep", nfe=1)
    opt = torch.optim.Adam(G.parameters(), lr=3e-3)
    x = torch.randn(16, 1, 8, 8) * 0.1 + 1.0  # near-constant data: an easy field to learn
    y = torch.randint(0, 10, (16,))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(12):
        z = torch.randn(x.shape, generator=g)
        loss = fm_loss(G, x, y, z, sample_fm_times(16, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    out = euler_sample(G, torch.randn(4, 1, 8, 8), y[:4], 2)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


# ---- EMA -----------------------------------------------------------------------------------------


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))


def _set(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_math_vs_hand_reference():
    m = _net()
    p0 = [p.detach().clone() for p in m.parameters()]
    ema = EMA(m, decay=0.9)
    _set(m, 1.0)
    ema.update(m)
    _set(m, -2.0)
    ema.update(m)
    # shadow = 0.9 * (0.9 * p0 + 0.1 * 1) + 0.1 * (-2)
    out = _net()
    ema.copy_to(out)
    for p, q in zip(out.parameters(), p0):
        torch.testing.assert_close(p, 0.81 * q + 0.09 - 0.2)
    assert ema.num_updates == 2


def test_ema_warmup_decay_sequence():
    m = _net()
    p0 = [p.detach().clone() for p in m.parameters()]
    ema = EMA(m, decay=0.5, warmup=True)
    # k = 1: min(0.5, 2/11) = 2/11; k = 2: min(0.5, 3/12) = 0.25; k = 3: min(0.5, 4/13) ~ 0.3077
    assert ema.current_decay() == pytest.approx(2 / 11)
    _set(m, 1.0)
    ema.update(m)
    assert ema.current_decay() == pytest.approx(0.25)
    ema.update(m)
    expected = [0.25 * (2 / 11 * q + 9 / 11) + 0.75 for q in p0]
    for (name, s), e in zip(ema.shadow.items(), expected):
        torch.testing.assert_close(s, e)
    for _ in range(30):
        ema.update(m)
    assert ema.current_decay() == 0.5  # capped by decay


def test_ema_copy_to_state_dict_round_trip_and_errors():
    m = _net()
    ema = EMA(m, decay=0.99)
    _set(m, 3.0)
    ema.update(m)
    state = ema.state_dict()
    other = EMA(_net(), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.99 and other.num_updates == 1
    a, b = _net(), _net()
    ema.copy_to(a)
    other.copy_to(b)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    # state_dict is a snapshot, not a live view
    ema.update(m)
    assert not torch.equal(state["shadow"]["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="different parameters"):
        EMA(nn.Linear(3, 2)).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"decay": 0.9})
    with pytest.raises(ValueError, match="model parameters differ"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="decay"):
        EMA(m, decay=1.0)


def test_ema_keeps_fp32_shadow_for_bf16_model():
    m = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    _set(m, 1.0)
    ema = EMA(m, decay=0.9999)
    _set(m, 2.0)
    for _ in range(10):
        ema.update(m)
    # fp32: 2 - 0.9999^10 ~ 1.0010; bf16 would have rounded every 1e-4 step away
    expected = 2.0 - 0.9999**10
    assert ema.shadow["weight"].dtype == torch.float32
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(expected, abs=1e-6)
