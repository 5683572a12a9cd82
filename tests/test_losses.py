"""AFM loss terms against hand-written references (plain Python / numpy loops, closed forms)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from advflow.trainers import losses as L


def test_interp_explicit_numbers():
    x = torch.tensor([[[[2.0, -1.0]]], [[[4.0, 0.0]]]])  # (2, 1, 1, 2)
    z = torch.tensor([[[[0.0, 1.0]]], [[[8.0, 2.0]]]])
    t = torch.tensor([0.25, 1.0])
    out = L.interp(x, z, t)
    # sample 0: 0.75 * x + 0.25 * z; sample 1: pure noise
    expected = torch.tensor([[[[1.5, -0.5]]], [[[8.0, 2.0]]]])
    torch.testing.assert_close(out, expected)


def test_st_weight_explicit_numbers():
    s = torch.tensor([1.0, 0.5, 0.3, 0.2])
    t = torch.tensor([0.0, 0.5, 0.8, 0.1995])
    w = L.st_weight(s, t)
    torch.testing.assert_close(w, torch.tensor([1.0, 1e-3, 0.5, 1e-3]))
    torch.testing.assert_close(L.st_weight(s, t, floor=0.6), torch.tensor([1.0, 0.6, 0.6, 0.6]))
    with pytest.raises(ValueError, match="floor"):
        L.st_weight(s, t, floor=0.0)


def test_relativistic_loss_hand_reference():
    pos = [1.0, 0.0, -3.0]
    neg = [0.0, 2.0, 0.5]
    ref = sum(math.log1p(math.exp(-(p - n))) for p, n in zip(pos, neg)) / 3
    out = L.relativistic_loss(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64))
    assert out.dim() == 0
    assert out.item() == pytest.approx(ref, rel=1e-12)
    # The D step and G step swap roles: f(a, b) != f(b, a) unless a == b.
    swapped = L.relativistic_loss(torch.tensor(neg), torch.tensor(pos)).item()
    ref_swapped = sum(math.log1p(math.exp(-(n - p))) for p, n in zip(pos, neg)) / 3
    assert swapped == pytest.approx(ref_swapped, rel=1e-6)


def test_relativistic_loss_is_stable_for_large_margins():
    out = L.relativistic_loss(torch.tensor([-1000.0, 1000.0]), torch.tensor([0.0, 0.0]))
    # softplus(1000) = 1000, softplus(-1000) = 0
    assert math.isfinite(out.item())
    assert out.item() == pytest.approx(500.0)


def test_relativistic_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        L.relativistic_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError):
        L.relativistic_loss(torch.zeros(3), torch.zeros(4))


def test_perturb_returns_shifted_input_and_its_noise():
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    xp, n = L.perturb(x, 0.01, generator=torch.Generator().manual_seed(0))
    assert n.shape == x.shape and n.dtype == x.dtype
    torch.testing.assert_close(xp - x, 0.01 * n)
    # n is standard normal
    assert abs(n.mean().item()) < 0.05
    assert n.std().item() == pytest.approx(1.0, abs=0.05)
    # deterministic given the generator
    _, n2 = L.perturb(x, 0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(n, n2)
    with pytest.raises(ValueError, match="eps"):
        L.perturb(x, 0.0)


def test_fd_penalty_hand_reference():
    logits = [0.5, -1.0, 2.0]
    pert = [0.51, -1.03, 2.0]
    weight = [1.0, 0.25, 3.0]
    eps = 0.01
    ref_w = sum(w * (lp - l) ** 2 / eps**2 for l, lp, w in zip(logits, pert, weight)) / 3
    ref_plain = sum((lp - l) ** 2 / eps**2 for l, lp in zip(logits, pert)) / 3
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert L.fd_penalty(t(logits), t(pert), eps, t(weight)).item() == pytest.approx(ref_w, rel=1e-10)
    assert L.fd_penalty(t(logits), t(pert), eps).item() == pytest.approx(ref_plain, rel=1e-10)
    with pytest.raises(ValueError):
        L.fd_penalty(t(logits), t(pert), eps, t([1.0, 2.0]))


def _tanh_mlp(dim: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def test_fd_penalty_converges_to_gradient_norm_squared():
    """E_n[(D(x + eps n) - D(x))^2 / eps^2] -> ||grad_x D(x)||^2 as eps -> 0.

    Monte Carlo noise in E_n does not shrink with eps, so to expose the O(eps^2) finite-difference
    bias the Gaussian draws are moment-matched: whitened so their second moment is exactly I and
    paired with their negatives so odd moments vanish. Then the only error left is the FD bias.
    """
    dim, points, draws = 4, 3, 256
    d = _tanh_mlp(dim)
    x = torch.randn(points, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(xg).sum(), xg)  # (P, dim), rows independent
    exact = grad.square().sum(dim=1).mean().item()  # mean_i ||grad D(x_i)||^2

    g = torch.randn(draws, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    chol = torch.linalg.cholesky(g.T @ g / draws)
    n = torch.linalg.solve_triangular(chol, g.T, upper=False).T  # second moment exactly I
    n = torch.cat([n, -n])  # (2M, dim): odd moments exactly 0
    torch.testing.assert_close(n.T @ n / n.shape[0], torch.eye(dim, dtype=torch.float64))

    xr = x.repeat_interleave(n.shape[0], dim=0)  # (P * 2M, dim)
    nr = n.repeat(points, 1)
    with torch.no_grad():
        base = d(xr).squeeze(1)
        errors = []
        for eps in (1e-1, 1e-2, 1e-3):
            pen = L.fd_penalty(base, d(xr + eps * nr).squeeze(1), eps).item()
            errors.append(abs(pen - exact))
    assert errors[0] > errors[1] > errors[2], errors
    # O(eps^2) bias: each decade should cut the error by far more than 10x
    assert errors[1] < errors[0] / 30 and errors[2] < errors[1] / 30, errors
    assert errors[2] / exact < 1e-5


def test_fd_penalty_with_plain_gaussian_noise_is_unbiased():
    """With perturb()'s i.i.d. Gaussian noise the estimate matches within Monte Carlo error."""
    dim, draws = 4, 20000
    d = _tanh_mlp(dim)
    x = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(xg).sum(), xg)
    exact = grad.square().sum().item()
    xr = x.expand(draws, dim)
    with torch.no_grad():
        xp, _ = L.perturb(xr, 1e-3, generator=torch.Generator().manual_seed(4))
        pen = L.fd_penalty(d(xr).squeeze(1), d(xp).squeeze(1), 1e-3).item()
    # (g.n)^2 = ||g||^2 chi2_1: std ||g||^2 sqrt(2); standard error over `draws`
    se = exact * math.sqrt(2.0 / draws)
    assert abs(pen - exact) < 4 * se


def test_logit_centering_hand_reference():
    r, f = [1.0, -2.0, 0.5], [0.5, 2.5, -0.5]
    ref = sum((a + b) ** 2 for a, b in zip(r, f)) / 3
    assert L.logit_centering(torch.tensor(r), torch.tensor(f)).item() == pytest.approx(ref, rel=1e-6)


def test_ot_loss_numpy_loop_reference():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(3, 2, 4, 4))
    inp = rng.normal(size=(3, 2, 4, 4))
    s = np.array([1.0, 0.75, 0.4])
    t = np.array([0.0, 0.5, 0.4])  # last pair hits the floor
    ref = 0.0
    for i in range(3):
        w = max(abs(s[i] - t[i]), 1e-3)
        sq = 0.0
        for v in (out[i] - inp[i]).ravel():
            sq += v * v
        ref += sq / out[i].size / w
    ref /= 3
    w = L.st_weight(torch.tensor(s), torch.tensor(t))
    got = L.ot_loss(torch.tensor(out), torch.tensor(inp), w).item()
    assert got == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="weight"):
        L.ot_loss(torch.tensor(out), torch.tensor(inp), torch.ones(2, dtype=torch.float64))


class _LinearClassifier(nn.Module):
    """logits = A flatten(x) + t * b: simple enough to differentiate by hand."""

    def __init__(self, in_dim: int, classes: int):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = nn.Parameter(torch.randn(classes, in_dim, dtype=torch.float64, generator=g))
        self.b = nn.Parameter(torch.randn(classes, dtype=torch.float64, generator=g))

    def forward(self, x, t):
        return x.flatten(1) @ self.a.T + t[:, None] * self.b


def _np_ce_and_grad(a, b, x, z, t, y):
    """Cross entropy of the linear classifier on interp(x, z, t) and d CE / d x, numpy loops."""
    n = x.shape[0]
    total, grad = 0.0, np.zeros_like(x)
    for i in range(n):
        xt = ((1 - t[i]) * x[i] + t[i] * z[i]).ravel()
        logits = a @ xt + t[i] * b
        m = logits.max()
        p = np.exp(logits - m) / np.exp(logits - m).sum()
        total += -np.log(p[y[i]])
        onehot = np.zeros_like(p)
        onehot[y[i]] = 1.0
        grad[i] = ((1 - t[i]) * (a.T @ (p - onehot))).reshape(x[i].shape) / n
    return total / n, grad


def _cls_inputs():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)
    t = torch.tensor([0.0, 0.05, 0.5, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    return x, z, t, y


def test_classifier_loss_matches_reference_and_trains_only_the_classifier():
    x, z, t, y = _cls_inputs()
    c = _LinearClassifier(18, 3)
    ref, _ = _np_ce_and_grad(c.a.detach().numpy(), c.b.detach().numpy(), x.numpy(), z.numpy(), t.numpy(), y.numpy())
    x.requires_grad_(True)
    loss = L.classifier_loss(c, x, y, t, z)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    loss.backward()
    assert c.a.grad is not None and c.a.grad.abs().sum() > 0
    assert x.grad is None  # the generator side must not be trained by the classifier loss


def test_guidance_loss_gradient_reaches_x_gen_with_hand_gradient():
    x, z, t, y = _cls_inputs()
    c = _LinearClassifier(18, 3)
    ref, ref_grad = _np_ce_and_grad(
        c.a.detach().numpy(), c.b.detach().numpy(), x.numpy(), z.numpy(), t.numpy(), y.numpy()
    )
    c.requires_grad_(False)  # what the caller does during the G step
    x.requires_grad_(True)
    loss = L.guidance_loss(c, x, y, t, z)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)
    assert c.a.grad is None and c.b.grad is None
