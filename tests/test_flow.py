"""Flow conventions, (s, t) sampling and the samplers, against closed-form flows."""

import math

import pytest
import torch
from torch import nn

from advflow.trainers.flow import euler_sample, generate, interp, sample_times, time_grid


def test_interp_numbers_and_broadcast():
    x = torch.tensor([[[[2.0, -1.0]]], [[[4.0, 0.0]]]])  # (2, 1, 1, 2)
    z = torch.tensor([[[[0.0, 1.0]]], [[[8.0, 2.0]]]])
    out = interp(x, z, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[[[1.5, -0.5]]], [[[8.0, 2.0]]]]))
    torch.testing.assert_close(interp(x, z, 0.5), (x + z) / 2)  # scalar t
    with pytest.raises(ValueError, match="shape"):
        interp(x, z, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="same shape"):
        interp(x, z[:1], 0.5)


def test_sample_times_1nfe():
    s, t = sample_times("1nfe", 5)
    assert torch.equal(s, torch.ones(5)) and torch.equal(t, torch.zeros(5))


def test_sample_times_multistep_grid_and_uniformity():
    k = 4
    g = torch.Generator().manual_seed(0)
    s, t = sample_times("multistep", 40_000, nfe=k, generator=g)
    grid = torch.tensor([0.25, 0.5, 0.75, 1.0])
    # every s is a grid point and t = s - 1/K exactly (the last step lands on 0.0)
    assert torch.isin(s, grid).all()
    torch.testing.assert_close(s - t, torch.full_like(s, 1 / k))
    assert (t == 0).any() and t.min() == 0
    freq = torch.stack([(s == v).float().mean() for v in grid])
    # 4 binomial frequencies with n = 40k: sd ~ 0.0022, so 0.01 is > 4 sd
    assert (freq - 0.25).abs().max() < 0.01
    # deterministic given the generator
    s2, _ = sample_times("multistep", 40_000, nfe=k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)


def test_sample_times_anystep_distribution():
    s, t = sample_times("anystep", 50_000, generator=torch.Generator().manual_seed(1))
    assert (s >= 0).all() and (s <= 1).all() and (t >= 0).all() and (t <= s).all()
    # s ~ U(0,1): mean 1/2, var 1/12; t = s u: E[t] = 1/4, E[t^2] = E[s^2] E[u^2] = 1/9
    assert abs(s.mean().item() - 0.5) < 0.01
    assert abs(s.var().item() - 1 / 12) < 0.005
    assert abs(t.mean().item() - 0.25) < 0.01
    assert abs(t.square().mean().item() - 1 / 9) < 0.005
    # t / s is U(0, 1) independent of s
    r = t / s
    assert abs(r.mean().item() - 0.5) < 0.01


def test_sample_times_errors():
    with pytest.raises(ValueError, match="kind"):
        sample_times("twostep", 3)
    with pytest.raises(ValueError, match="nfe"):
        sample_times("multistep", 3, nfe=0)
    with pytest.raises(ValueError, match="n=0"):
        sample_times("1nfe", 0)


class Recorder(nn.Module):
    """Stand-in generator following the COMMON.md interface; records every (s, t) call."""

    def __init__(self, kind, nfe=1, step=None):
        super().__init__()
        self.kind, self.nfe, self.repeats = kind, nfe, 1
        self.calls = []
        self.step = step or (lambda x, s, t: x)

    def forward(self, x, y, s=None, t=None):
        self.calls.append((None if s is None else s.clone(), None if t is None else t.clone()))
        return self.step(x, s, t)


def test_generate_1nfe_is_one_call():
    G = Recorder("1nfe", step=lambda x, s, t: x * 2)
    z = torch.randn(3, 1, 2, 2)
    out = generate(G, z, torch.zeros(3, dtype=torch.long))
    assert len(G.calls) == 1 and G.calls[0] == (None, None)
    torch.testing.assert_close(out, 2 * z)
    with pytest.raises(ValueError, match="one step"):
        generate(G, z, torch.zeros(3, dtype=torch.long), nfe=2)


def test_generate_multistep_walks_the_grid():
    G = Recorder("multistep", nfe=3)
    z = torch.randn(2, 1, 2, 2)
    generate(G, z, torch.zeros(2, dtype=torch.long))
    got = [(c[0][0].item(), c[1][0].item()) for c in G.calls]
    want = [(1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)]
    assert len(got) == 3
    for (gs, gt), (ws, wt) in zip(got, want):
        assert math.isclose(gs, ws, abs_tol=1e-6) and math.isclose(gt, wt, abs_tol=1e-7)
    assert all(c[0].shape == (2,) for c in G.calls)
    with pytest.raises(ValueError, match="G.nfe=3"):
        generate(G, z, torch.zeros(2, dtype=torch.long), nfe=2)


def test_generate_anystep_custom_times_and_errors():
    G = Recorder("anystep", nfe=2)
    z = torch.randn(2, 1, 2, 2)
    y = torch.zeros(2, dtype=torch.long)
    generate(G, z, y, times=[1.0, 0.6, 0.0])
    assert [(round(a[0].item(), 6), round(b[0].item(), 6)) for a, b in G.calls] == [(1.0, 0.6), (0.6, 0.0)]
    G.calls.clear()
    generate(G, z, y, nfe=5)
    assert len(G.calls) == 5
    G.calls.clear()
    generate(G, z, y)  # default: G.nfe steps
    assert len(G.calls) == 2
    with pytest.raises(ValueError, match="decreasing"):
        generate(G, z, y, times=[0.0, 1.0])
    with pytest.raises(ValueError, match="G.kind"):
        generate(Recorder("bogus"), z, y)


def test_time_grid():
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="nfe"):
        time_grid(0)


# ---- closed-form flows --------------------------------------------------------------------------
# Data N(mu, sigma^2) per dimension, independent of the Gaussian noise. The marginal at time t is
# N((1 - t) mu, a(t)^2) with a(t) = sqrt((1 - t)^2 sigma^2 + t^2), the probability-flow ODE moves each
# sample along x_t = (1 - t) mu + a(t) * e (e fixed), so its velocity dx/dt is
#   v(x, t) = -mu + a'(t) / a(t) * (x - (1 - t) mu),   a'(t) = (t - (1 - t) sigma^2) / a(t),
# and the noise z = x_1 ends at mu + sigma z. sigma = 0 is the point mass: v = (x - mu) / t = z - x.


def _a(t, sigma):
    return math.sqrt((1 - t) ** 2 * sigma**2 + t**2)


class GaussianFlow(nn.Module):
    """Exact velocity (and exact s -> t flow map) for data N(mu, sigma^2)."""

    def __init__(self, mu, sigma, kind="multistep", nfe=1, exact_map=False):
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.kind, self.nfe, self.repeats = kind, nfe, 1
        self.exact_map = exact_map
        self.velocity_calls = 0

    def velocity(self, x, y, s, t=None):
        self.velocity_calls += 1
        out = torch.empty_like(x)
        for i, si in enumerate(s.tolist()):  # per-sample times
            a = _a(si, self.sigma)
            da = (si - (1 - si) * self.sigma**2) / a
            out[i] = -self.mu + da / a * (x[i] - (1 - si) * self.mu)
        return out

    def forward(self, x, y, s=None, t=None):
        if not self.exact_map:
            return x - (s - t).view(-1, 1, 1, 1) * self.velocity(x, y, s, t)
        out = torch.empty_like(x)
        for i, (si, ti) in enumerate(zip(s.tolist(), t.tolist())):
            e = (x[i] - (1 - si) * self.mu) / _a(si, self.sigma)
            out[i] = (1 - ti) * self.mu + _a(ti, self.sigma) * e
        return out


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_point_mass_exact_velocity_reaches_target_with_any_step_count(steps):
    # velocity exactly z - x: straight paths, so Euler is exact for every step count
    G = GaussianFlow(mu=0.7, sigma=0.0)
    z = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    y = torch.zeros(6, dtype=torch.long)
    out = euler_sample(G, z, y, steps)
    torch.testing.assert_close(out, torch.full_like(z, 0.7))
    assert G.velocity_calls == steps
    # the same field through the multistep generator (velocity form) with K = steps
    G2 = GaussianFlow(mu=0.7, sigma=0.0, nfe=steps)
    torch.testing.assert_close(generate(G2, z, y), torch.full_like(z, 0.7))


def test_gaussian_euler_converges_and_one_step_collapses_to_mean():
    mu, sigma = 1.5, 0.5
    z = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(64, dtype=torch.long)
    target = mu + sigma * z  # the probability-flow (and 1D OT) map of z
    err200 = (euler_sample(GaussianFlow(mu, sigma), z, y, 200) - target).abs().max()
    err400 = (euler_sample(GaussianFlow(mu, sigma), z, y, 400) - target).abs().max()
    # Euler is first order: the error shrinks ~ 1/steps towards the exact map
    assert err400 < 0.01
    assert 1.7 < err200 / err400 < 2.3
    coarse = euler_sample(GaussianFlow(mu, sigma), z, y, 1)
    # one Euler step from t = 1 uses v = x - mu and lands every sample on the mean
    torch.testing.assert_close(coarse, torch.full_like(z, mu))
    err2 = (euler_sample(GaussianFlow(mu, sigma), z, y, 2) - target).abs().mean()
    err8 = (euler_sample(GaussianFlow(mu, sigma), z, y, 8) - target).abs().mean()
    assert err8 < err2 < (coarse - target).abs().mean()


def test_generate_with_exact_flow_map_is_exact_for_gaussian():
    mu, sigma = -1.0, 2.0
    z = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(16, dtype=torch.long)
    for kind, nfe in (("multistep", 3), ("anystep", 4)):
        out = generate(GaussianFlow(mu, sigma, kind=kind, nfe=nfe, exact_map=True), z, y)
        torch.testing.assert_close(out, mu + sigma * z)


def test_samplers_run_without_grad():
    G = GaussianFlow(0.0, 1.0)
    z = torch.randn(2, 1, 2, 2, requires_grad=True)
    out = euler_sample(G, z, torch.zeros(2, dtype=torch.long), 2)
    assert not out.requires_grad
