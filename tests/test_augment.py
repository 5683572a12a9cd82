"""Paired latent augmentation: distributions vs an independent reference of the official transform,
plus pairing, gradient flow, determinism and the draw count.

`_reference` is written from the description of the official code (kornia RandomTranslate +
3 RandomErasing, each op with its own coin p), one sample at a time with numpy, independently of
advflow's vectorised torch code. Distributions are compared over N samples with tolerances of a few
standard errors (two-sample where both sides are random; closed forms where they exist).
"""

import functools
import math

import numpy as np
import pytest
import torch

from advflow.trainers.augment import paired_augment, random_erase_masks, translate

N = 20000
Z = 4.5  # standard errors allowed per comparison


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _latents(n=16, c=4, h=16, w=16, seed=0):
    # Strictly positive so that zeros in the output can only come from the augmentation.
    return torch.rand(n, c, h, w, generator=_gen(seed)) + 0.5


def _reference(x, p, seed, max_translate=0.3, erase_count=3, area=(0.1, 0.5), ratio=(0.3, 3.3)):
    """The official transform applied to x: (N, H, W), one sample at a time."""
    rng = np.random.default_rng(seed)
    n, h, w = x.shape
    out = x.copy()
    for img in out:  # views into out
        if rng.random() < p:
            sx = int(np.rint(rng.uniform(0, max_translate * w)))  # nearest sampling of a continuous shift
            sy = int(np.rint(rng.uniform(0, max_translate * h)))
            moved = np.zeros_like(img)
            moved[sy:, sx:] = img[: h - sy, : w - sx]
            img[:] = moved
        for _ in range(erase_count):
            if rng.random() >= p:
                continue
            a = rng.uniform(*area) * h * w
            r = rng.uniform(ratio[0], 1.0) if rng.random() < 0.5 else rng.uniform(1.0, ratio[1])
            eh = min(max(round(math.sqrt(a * r)), 1), h)
            ew = min(max(round(math.sqrt(a / r)), 1), w)
            x0 = math.floor(rng.random() * (w - ew + 1))
            y0 = math.floor(rng.random() * (h - eh + 1))
            img[y0 : y0 + eh, x0 : x0 + ew] = 0
    return out


def _image(kind, h, w):
    if kind == "ones":
        return np.ones((h, w), np.float32)
    return (np.arange(h)[:, None] * w + np.arange(w)[None, :] + 1).astype(np.float32)  # "coords"


@functools.lru_cache(maxsize=None)
def _outputs(source, kind, h, w, p, max_translate=0.3, erase_count=3):
    """(N, H, W) augmented copies of one image, from the reference or from paired_augment."""
    x = np.broadcast_to(_image(kind, h, w), (N, h, w)).copy()
    if source == "ref":
        return _reference(x, p, 1, max_translate, erase_count)
    t = torch.from_numpy(x)[:, None]  # (N, 1, H, W)
    ra, _ = paired_augment(t, t, p, _gen(2), max_translate=max_translate, erase_count=erase_count)
    return ra[:, 0].numpy()


def _close_means(a, b, z=Z):
    """Two-sample check of E[a] == E[b]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-12
    assert abs(a.mean() - b.mean()) < z * se, (a.mean(), b.mean(), se)


def _close_dists(a, b):
    """Two-sample Kolmogorov-Smirnov check (conservative for discrete values), alpha ~ 1e-4."""
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    d = np.abs(fa - fb).max()
    assert d < 2.3 * math.sqrt((len(a) + len(b)) / (len(a) * len(b))), d


def _shifts(out, h, w):
    """Per-sample (dy, dx) from a translated "coords" image: the bottom-right pixel is never shifted out."""
    v = out[:, -1, -1].astype(np.int64) - 1
    return h - 1 - v // w, w - 1 - v % w


def _shift_pmf(m, p, k):
    """P(round(U(0, m) if coin p else 0) == k)."""
    inside = max(0.0, min(k + 0.5, m) - max(k - 0.5, 0.0))
    return p * inside / m + (1 - p) * (k == 0)


def test_translate_matches_python_loop():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5) + 1
    dy, dx = torch.tensor([1, -2]), torch.tensor([-1, 3])
    out = translate(x, dy, dx)
    ref = torch.zeros_like(x)
    for i in range(2):
        for r in range(4):
            for c in range(5):
                sr, sc = r - int(dy[i]), c - int(dx[i])
                if 0 <= sr < 4 and 0 <= sc < 5:
                    ref[i, 0, r, c] = x[i, 0, sr, sc]
    torch.testing.assert_close(out, ref)


@pytest.mark.integration  # end-to-end: statistical tests over many draws at 32x32 (seconds)
@pytest.mark.parametrize("h,w", [(32, 32), (8, 8)])
def test_untouched_fraction(h, w):
    p = 0.4
    impl = (_outputs("impl", "ones", h, w, p) == 1).all(axis=(1, 2))
    ref = (_outputs("ref", "ones", h, w, p) == 1).all(axis=(1, 2))
    # No op drawn: (1-p)^4 = 0.1296; a drawn translate that rounds to (0, 0) also leaves ones intact.
    q0 = (0.5 / (0.3 * h)) * (0.5 / (0.3 * w))
    exact = (1 - p) ** 3 * (1 - p + p * q0)  # 0.1298 for 32x32, 0.1356 for 8x8
    assert abs(impl.mean() - exact) < Z * math.sqrt(exact * (1 - exact) / N)
    _close_means(impl, ref)


@pytest.mark.integration  # end-to-end: statistical tests over many draws at 32x32 (seconds)
@pytest.mark.parametrize("h,w,p", [(32, 32, 0.4), (8, 8, 1.0), (16, 32, 1.0)])
def test_translate_shift_distribution(h, w, p):
    outs = {s: _outputs(s, "coords", h, w, p, erase_count=0) for s in ("impl", "ref")}
    dy, dx = _shifts(outs["impl"], h, w)
    # A pure shift towards +y/+x with zero fill, by the recovered integer amounts.
    r, c = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    sr, sc = r - dy[:, None, None], c - dx[:, None, None]
    expected = np.where((sr >= 0) & (sc >= 0), sr * w + sc + 1, 0)
    assert np.array_equal(outs["impl"], expected)
    rdy, rdx = _shifts(outs["ref"], h, w)
    for got, ref, size in ((dy, rdy, h), (dx, rdx, w)):
        m = 0.3 * size
        assert got.min() == 0 and got.max() == round(m)  # one direction only
        for k in range(round(m) + 1):
            pk = _shift_pmf(m, p, k)
            assert abs((got == k).mean() - pk) < Z * math.sqrt(pk * (1 - pk) / N) + 1e-9, (k, pk)
        _close_means(got, ref)
        _close_means(got == 0, ref == 0)
    # dy and dx are independent given the coin.
    both0 = (1 - p) + p * (0.5 / (0.3 * h)) * (0.5 / (0.3 * w))
    assert abs(((dy == 0) & (dx == 0)).mean() - both0) < Z * math.sqrt(both0 * (1 - both0) / N) + 1e-9
    _close_means((dy == 0) & (dx == 0), (rdy == 0) & (rdx == 0))


@pytest.mark.integration  # end-to-end: statistical tests over many draws at 32x32 (seconds)
@pytest.mark.parametrize("h,w,p", [(32, 32, 0.4), (32, 32, 1.0), (8, 8, 0.4)])
def test_zeroed_fraction_distribution(h, w, p):
    frac = {s: (_outputs(s, "ones", h, w, p) == 0).mean(axis=(1, 2)) for s in ("impl", "ref")}
    _close_means(frac["impl"], frac["ref"])
    touched = {s: f[f > 0] for s, f in frac.items()}
    _close_means(touched["impl"], touched["ref"])
    _close_dists(touched["impl"], touched["ref"])
    n1, n2 = len(touched["impl"]), len(touched["ref"])
    for q in (0.25, 0.5, 0.9):
        t = np.quantile(touched["ref"], q)
        f1, f2 = (touched["impl"] <= t).mean(), (touched["ref"] <= t).mean()
        se = math.sqrt(f2 * (1 - f2) * (1 / n1 + 1 / n2)) + 1e-12
        assert abs(f1 - f2) < Z * se, (q, f1, f2)


@pytest.mark.integration  # end-to-end: statistical tests over many draws at 32x32 (seconds)
@pytest.mark.parametrize("h,w", [(32, 32), (8, 8), (16, 24)])
def test_single_erasing_rectangles(h, w):
    outs = {s: _outputs(s, "ones", h, w, 1.0, max_translate=0.0, erase_count=1) for s in ("impl", "ref")}
    zero = outs["impl"] == 0
    area = zero.sum(axis=(1, 2))
    assert np.array_equal(zero.any(axis=2).sum(-1) * zero.any(axis=1).sum(-1), area)  # one rectangle
    # Bounds from h = round(sqrt(A r)), w = round(sqrt(A / r)) (each within 0.5 of its target):
    # (sqrt(Ar) -+ 0.5)(sqrt(A/r) -+ 0.5) = A -+ (sqrt(Ar) + sqrt(A/r)) / 2 + 1/4, the sum largest at
    # an end of the ratio range; a side clamped to H (or W) keeps the other side >= its target - 0.5.
    lo_a, hi_a = 0.1 * h * w, 0.5 * h * w
    s = max(math.sqrt(r) + 1 / math.sqrt(r) for r in (0.3, 3.3))
    clamped = min(h * (math.sqrt(lo_a / 3.3) - 0.5), w * (math.sqrt(lo_a * 0.3) - 0.5))
    lo = min(lo_a - s * math.sqrt(lo_a) / 2 + 0.25, clamped)
    hi = min(h * w, hi_a + s * math.sqrt(hi_a) / 2 + 0.25)
    assert area.min() >= math.ceil(lo) and area.max() <= math.floor(hi), (area.min(), area.max(), lo, hi)
    ref_zero = outs["ref"] == 0
    ref_area = ref_zero.sum(axis=(1, 2))
    _close_means(area / (h * w), ref_area / (h * w))
    _close_dists(area, ref_area)
    # Placement: how often a corner, an edge and the centre pixel are covered.
    for r, c in ((0, 0), (h - 1, w - 1), (0, w // 2), (h // 2, w // 2)):
        _close_means(zero[:, r, c], ref_zero[:, r, c])


def test_random_erase_masks_are_rectangles():
    masks = random_erase_masks(300, 16, 24, count=3, generator=_gen(8))
    assert masks.shape == (300, 3, 16, 24)
    area = masks.flatten(2).sum(-1)  # (N, 3)
    assert torch.equal(masks.any(dim=3).sum(-1) * masks.any(dim=2).sum(-1), area)
    assert int(area.min()) >= 1 and len(set(area.flatten().tolist())) > 5


@pytest.mark.parametrize("p", [0.4, 1.0])
def test_same_transform_on_real_and_fake(p):
    real = _latents(n=64, seed=0)
    ra, fa = paired_augment(real, real.clone(), p, generator=_gen(3))
    assert torch.equal(ra, fa)
    fake = _latents(n=64, seed=7)
    ra, fa = paired_augment(real, fake, p, generator=_gen(4))
    assert (ra == 0).any()
    assert torch.equal(ra == 0, fa == 0)
    zero = ra == 0
    assert torch.equal(zero[:, :1].expand_as(zero), zero)  # every channel shifted and erased together


def test_gradients_flow_through_fake():
    real = _latents(n=64, seed=0)
    fake = _latents(n=64, seed=1).requires_grad_(True)
    # Without translation, the gradient is exactly the keep mask: 1 on kept pixels, 0 on erased ones.
    _, fa = paired_augment(real, fake, 0.4, generator=_gen(13), max_translate=0.0)
    fa.sum().backward()
    assert torch.equal(fake.grad, (fa != 0).to(fake.dtype))
    untouched = (fa == fake).flatten(1).all(dim=1)
    assert untouched.any() and torch.equal(fake.grad[untouched], torch.ones_like(fake[untouched]))
    # With translation every kept output pixel comes from exactly one input pixel.
    fake.grad = None
    _, fa = paired_augment(real, fake, 0.4, generator=_gen(14))
    fa.sum().backward()
    g = fake.grad
    assert torch.all((g == 0) | (g == 1))
    torch.testing.assert_close(g.flatten(1).sum(1), (fa != 0).flatten(1).sum(1).to(g.dtype))


def test_p_zero_is_identity():
    real, fake = _latents(seed=0), _latents(seed=1)
    ra, fa = paired_augment(real, fake, 0.0, generator=_gen(2))
    assert torch.equal(ra, real) and torch.equal(fa, fake)


def test_deterministic_given_generator():
    real, fake = _latents(seed=0), _latents(seed=1)
    a = paired_augment(real, fake, 0.5, generator=_gen(11))
    b = paired_augment(real, fake, 0.5, generator=_gen(11))
    c = paired_augment(real, fake, 0.5, generator=_gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_number_of_draws_does_not_depend_on_p():
    states = []
    for p, seed in ((0.0, 0), (0.2, 1), (0.7, 2), (1.0, 3)):
        g = _gen(5)
        paired_augment(_latents(seed=seed), _latents(seed=seed + 10), p, generator=g)
        states.append(g.get_state())
    assert all(torch.equal(s, states[0]) for s in states)
    assert not torch.equal(states[0], _gen(5).get_state())


def test_validation_errors():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        paired_augment(x, torch.zeros(3, 1, 4, 4), 0.5)
    for p in (1.5, -0.1):
        with pytest.raises(ValueError, match="p must be"):
            paired_augment(x, x, p)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        paired_augment(torch.zeros(2, 4), torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match="max_translate"):
        paired_augment(x, x, 0.5, max_translate=-0.1)
    with pytest.raises(ValueError, match="erase_count"):
        paired_augment(x, x, 0.5, erase_count=-1)
    with pytest.raises(ValueError, match="erase area"):
        paired_augment(x, x, 0.5, erase_area=(0.6, 0.5))
    with pytest.raises(ValueError, match="erase ratio"):
        paired_augment(x, x, 0.5, erase_ratio=(0.0, 3.3))
