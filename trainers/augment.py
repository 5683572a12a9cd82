"""Paired discriminator augmentation in latent space (AFM guided runs).

Each selected pair (real_i, fake_i) gets ONE random transform, applied identically to both, so D
cannot tell real from fake by the augmentation itself:
  1. integer translation by (dy, dx), |dy| <= floor(translate * H), |dx| <= floor(translate * W),
     uniform integers ("nearest": no resampling blur). Pixels shifted in from outside are 0 (zero
     fill, the same value erasing uses; for standardised latents 0 is the mean).
  2. `erase_count` rectangles (after the shift) set to 0, each covering an area fraction in
     [erase_area[0], erase_area[1]] of H*W (exact, in integer pixels; see `random_erase_masks`).
Pairs are selected independently with probability p; unselected pairs pass through unchanged.
All randomness comes from `generator` (on the inputs' device), so results are reproducible.
Every op is a gather or a multiply by a 0/1 mask, so gradients flow through `fake`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["paired_augment", "random_erase_masks", "translate"]


def _randint(low: torch.Tensor, high: torch.Tensor, generator, device) -> torch.Tensor:
    """Uniform integer in [low, high] (inclusive), elementwise over same-shape int64 tensors."""
    u = torch.rand(low.shape, generator=generator, device=device, dtype=torch.float64)
    span = (high - low + 1).to(torch.float64)
    return low + torch.minimum((u * span).floor().long(), (high - low))


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each sample by integer (dy_i, dx_i) with zero fill: out[i, :, r, c] = x[i, :, r - dy, c - dx].

    x: (N, C, H, W); dy, dx: (N,) int64. Returns (N, C, H, W).
    """
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (N, H) source row
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]  # (N, W) source col
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (N, H, W)
    rows = rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w)
    cols = cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w)
    out = x.gather(2, rows).gather(3, cols)  # (N, C, H, W)
    return out * valid[:, None].to(x.dtype)


def _sides(first: int, second: int, lo: int, hi: int, n: int, generator, device):
    """Rectangle sides (a, b) with a <= first, b <= second and lo <= a * b <= hi, shape (N,) each.

    a is uniform over the sides that admit a valid b; b is uniform over the valid range given a.
    """
    a_min = max(1, math.ceil(lo / second))
    a = _randint(torch.full((n,), a_min, device=device), torch.full((n,), first, device=device), generator, device)
    b_lo = (lo + a - 1) // a  # ceil(lo / a) <= second since a >= lo / second
    b_hi = torch.clamp(hi // a, max=second)
    b_hi = torch.maximum(b_hi, b_lo)  # only binds for degenerate (1-pixel) sizes
    b = _randint(b_lo, b_hi, generator, device)
    return a, b


def random_erase_masks(
    n: int,
    height: int,
    width: int,
    count: int = 3,
    area: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean masks (N, count, H, W): True inside each random rectangle.

    Each rectangle covers k pixels with ceil(area[0] * H * W) <= k <= floor(area[1] * H * W) (for
    images too small to satisfy that, the lower bound wins). To avoid a bias towards tall or wide
    shapes, half of the rectangles pick their height first and half their width first.
    """
    if not 0.0 < area[0] <= area[1] <= 1.0:
        raise ValueError(f"erase area must satisfy 0 < lo <= hi <= 1 (got {area})")
    device = torch.device(device) if device is not None else torch.device("cpu")
    total = height * width
    lo = max(1, math.ceil(area[0] * total))
    hi = max(lo, math.floor(area[1] * total))
    m = n * count
    h1, w1 = _sides(height, width, lo, hi, m, generator, device)  # height first
    w2, h2 = _sides(width, height, lo, hi, m, generator, device)  # width first
    coin = torch.rand(m, generator=generator, device=device) < 0.5
    rh = torch.where(coin, h1, h2)  # (M,)
    rw = torch.where(coin, w1, w2)
    zero = torch.zeros(m, dtype=torch.long, device=device)
    top = _randint(zero, height - rh, generator, device)
    left = _randint(zero, width - rw, generator, device)
    r = torch.arange(height, device=device)[None, :]
    c = torch.arange(width, device=device)[None, :]
    in_r = (r >= top[:, None]) & (r < (top + rh)[:, None])  # (M, H)
    in_c = (c >= left[:, None]) & (c < (left + rw)[:, None])  # (M, W)
    return (in_r[:, :, None] & in_c[:, None, :]).reshape(n, count, height, width)


def paired_augment(
    real: torch.Tensor,
    fake: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    *,
    max_translate: float = 0.3,
    erase_count: int = 3,
    erase_area: tuple[float, float] = (0.1, 0.5),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random transform per pair i to real[i] and fake[i]; see the module docstring.

    real, fake: (N, C, H, W) with equal shapes. p: probability that a pair is augmented (paper 0.4).
    Returns (real_aug, fake_aug), same shapes. The same number of random draws is made whatever p
    is, so the generator's stream does not depend on which pairs were selected.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} must have the same shape")
    if real.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) latents, got shape {tuple(real.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augment p must be in [0, 1] (got {p})")
    if not 0.0 <= max_translate < 1.0:
        raise ValueError(f"max_translate must be in [0, 1) (got {max_translate})")
    if erase_count < 0:
        raise ValueError(f"erase_count must be >= 0 (got {erase_count})")
    n, _, h, w = real.shape
    dev = real.device

    selected = torch.rand(n, generator=generator, device=dev) < p  # (N,)
    my, mx = int(max_translate * h), int(max_translate * w)
    dy = _randint(torch.full((n,), -my, device=dev), torch.full((n,), my, device=dev), generator, dev)
    dx = _randint(torch.full((n,), -mx, device=dev), torch.full((n,), mx, device=dev), generator, dev)
    if erase_count:
        erased = random_erase_masks(n, h, w, erase_count, erase_area, generator, dev).any(dim=1)  # (N, H, W)
    else:
        erased = torch.zeros(n, h, w, dtype=torch.bool, device=dev)
    keep = (~erased)[:, None]  # (N, 1, H, W)

    def apply(x: torch.Tensor) -> torch.Tensor:
        aug = translate(x, dy, dx) * keep.to(x.dtype)
        return torch.where(selected[:, None, None, None], aug, x)

    return apply(real), apply(fake)
