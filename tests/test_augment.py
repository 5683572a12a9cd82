"""Paired latent augmentation: one transform per pair, bounds, determinism, gradient flow."""

import math

import pytest
import torch

from advflow.trainers.augment import paired_augment, random_erase_masks, translate


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _latents(n=16, c=4, h=16, w=16, seed=0):
    # Strictly positive so that zeros in the output can only come from the augmentation.
    return torch.rand(n, c, h, w, generator=_gen(seed)) + 0.5


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


def test_p_zero_is_identity():
    real, fake = _latents(seed=0), _latents(seed=1)
    ra, fa = paired_augment(real, fake, 0.0, generator=_gen(2))
    assert torch.equal(ra, real) and torch.equal(fa, fake)


def test_same_transform_on_real_and_fake():
    real = _latents(seed=0)
    ra, fa = paired_augment(real, real.clone(), 1.0, generator=_gen(3))
    assert torch.equal(ra, fa)
    # The transform is linear, so fake = 2 * real must give fake_aug = 2 * real_aug exactly.
    ra, fa = paired_augment(real, 2 * real, 1.0, generator=_gen(3))
    torch.testing.assert_close(fa, 2 * ra, rtol=0, atol=0)
    # Independent contents: the zeroed (translated-in or erased) pixels coincide.
    fake = _latents(seed=7)
    ra, fa = paired_augment(real, fake, 1.0, generator=_gen(4))
    assert (ra == 0).any()
    assert torch.equal(ra == 0, fa == 0)


def test_p_one_changes_every_sample_and_p_selects_fraction():
    real, fake = _latents(n=64, seed=0), _latents(n=64, seed=1)
    ra, fa = paired_augment(real, fake, 1.0, generator=_gen(5))
    assert ((ra != real).flatten(1).any(dim=1)).all()
    assert ((fa != fake).flatten(1).any(dim=1)).all()
    real, fake = _latents(n=2000, c=1, h=8, w=8, seed=0), _latents(n=2000, c=1, h=8, w=8, seed=1)
    ra, _ = paired_augment(real, fake, 0.4, generator=_gen(6))
    frac = (ra != real).flatten(1).any(dim=1).float().mean().item()
    assert abs(frac - 0.4) < 4 * math.sqrt(0.4 * 0.6 / 2000)


@pytest.mark.parametrize("h,w", [(32, 32), (16, 24), (8, 8), (5, 7)])
def test_each_erased_rectangle_covers_area_within_bounds(h, w):
    masks = random_erase_masks(400, h, w, count=3, generator=_gen(8))
    assert masks.shape == (400, 3, h, w)
    area = masks.flatten(2).sum(-1)  # (N, 3) pixels per rectangle
    lo, hi = math.ceil(0.1 * h * w), math.floor(0.5 * h * w)
    assert int(area.min()) >= lo and int(area.max()) <= hi
    # Every mask is one axis-aligned rectangle: area = (rows touched) * (cols touched).
    rows = masks.any(dim=3).sum(-1)
    cols = masks.any(dim=2).sum(-1)
    assert torch.equal(rows * cols, area)
    # Shapes and positions vary (not a degenerate sampler).
    assert len(set(area.flatten().tolist())) > 5


def test_erased_fraction_in_paired_augment_without_translation():
    real = _latents(n=200, c=3, h=16, w=16, seed=0)
    ra, _ = paired_augment(real, real, 1.0, generator=_gen(9), max_translate=0.0)
    zero = ra == 0
    assert torch.equal(zero[:, :1].expand_as(zero), zero)  # all channels erased together
    frac = zero[:, 0].flatten(1).float().mean(dim=1)  # union of 3 rectangles
    assert frac.min().item() >= math.ceil(0.1 * 256) / 256
    assert frac.max().item() <= 1.0


def test_translation_is_bounded_by_max_fraction():
    ones = torch.ones(300, 1, 20, 10)
    ra, _ = paired_augment(ones, ones, 1.0, generator=_gen(10), erase_count=0)
    # With only a shift, the zero-filled border is |dy| full rows and |dx| full columns.
    empty_rows = (ra[:, 0] == 0).all(dim=2).sum(-1)
    empty_cols = (ra[:, 0] == 0).all(dim=1).sum(-1)
    assert int(empty_rows.max()) <= int(0.3 * 20) and int(empty_cols.max()) <= int(0.3 * 10)
    assert int(empty_rows.max()) > 0 and int(empty_cols.max()) > 0


def test_deterministic_given_generator():
    real, fake = _latents(seed=0), _latents(seed=1)
    a = paired_augment(real, fake, 0.5, generator=_gen(11))
    b = paired_augment(real, fake, 0.5, generator=_gen(11))
    c = paired_augment(real, fake, 0.5, generator=_gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_gradients_flow_through_fake():
    real = _latents(seed=0)
    fake = _latents(seed=1).requires_grad_(True)
    _, fa = paired_augment(real, fake, 1.0, generator=_gen(13))
    fa.sum().backward()
    g = fake.grad
    # Integer shift + masking: each input pixel reaches the output at most once.
    assert torch.all((g == 0) | (g == 1))
    assert g.sum() > 0
    # Unselected pairs get the identity gradient.
    fake.grad = None
    paired_augment(real, fake, 0.0, generator=_gen(13))[1].sum().backward()
    assert torch.equal(fake.grad, torch.ones_like(fake))


def test_validation_errors():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        paired_augment(x, torch.zeros(3, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match="p must be"):
        paired_augment(x, x, 1.5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        paired_augment(torch.zeros(2, 4), torch.zeros(2, 4), 0.5)
