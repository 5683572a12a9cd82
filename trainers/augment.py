"""Paired discriminator augmentation in latent space (AFM guided runs).

The distribution follows the official AFM code, a `torch.nn.Sequential` of kornia's
`RandomTranslate(translate_x=(0, 0.3), translate_y=(0, 0.3))` and three `RandomErasing(scale=(0.1, 0.5))`
applied to the channel-concatenation of real and fake, so pair i of real and fake gets the same draw.
Each of the 1 + `erase_count` ops has its own per-sample coin with probability p, so a pair is left
untouched with probability (1 - p) ** 4 (0.1296 at p = 0.4). For an H x W latent:
  1. translate: dx ~ U(0, max_translate * W), dy ~ U(0, max_translate * H) pixels, independent and
     one-directional (never negative). kornia warps with nearest sampling and zero padding, which
     for a pure shift is the integer shift by the rounded amount:
     out[..., r, c] = in[..., r - round(dy), c - round(dx)], 0 where the source is outside.
  2. `erase_count` erasings in sequence (rectangles may overlap), each set to 0 on every channel:
     area A = U(erase_area) * H * W; ratio r ~ U(ratio_lo, 1) or U(1, ratio_hi) on a fair coin
     (U(erase_ratio) when the range does not straddle 1); h = clamp(round(sqrt(A r)), 1, H),
     w = clamp(round(sqrt(A / r)), 1, W); top-left x0 = floor(u1 (W - w + 1)), y0 = floor(u2 (H - h + 1)).
All coins and parameters are drawn for the whole batch whatever p is, so the generator's stream does
not depend on p or on which pairs were selected. Every op is a gather or a masked fill, so gradients
flow through `fake` (1 on kept pixels, 0 on erased or shifted-out ones).
"""

from __future__ import annotations

import torch

from advflow.trainers import draws

__all__ = ["paired_augment", "random_erase_masks", "translate"]


def _uniform(shape, lo: float, hi: float, generator, device) -> torch.Tensor:
    """U(lo, hi) in float64 (exact enough that rounding rules, not float error, decide sizes)."""
    return lo + (hi - lo) * draws.rand(shape, generator, device=device, dtype=torch.float64)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each sample by integer (dy_i, dx_i) with zero fill: out[i, :, r, c] = x[i, :, r - dy, c - dx].

    x: (N, C, H, W); dy, dx: (N,) int64. Returns (N, C, H, W).
    """
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]  # (N, H) source row
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]  # (N, W) source col
    outside = ~(((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])  # (N, H, W)
    rows = rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w)
    cols = cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w)
    out = x.gather(2, rows).gather(3, cols)  # (N, C, H, W)
    return out.masked_fill(outside[:, None], 0)


def random_erase_masks(
    n: int,
    height: int,
    width: int,
    count: int = 3,
    area: tuple[float, float] = (0.1, 0.5),
    ratio: tuple[float, float] = (0.3, 3.3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean masks (N, count, H, W): True inside each kornia-RandomErasing rectangle (module docstring).

    No coin is applied here; the caller selects which rectangles are used.
    """
    if not 0.0 < area[0] <= area[1] <= 1.0:
        raise ValueError(f"erase area must satisfy 0 < lo <= hi <= 1 (got {area})")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"erase ratio must satisfy 0 < lo <= hi (got {ratio})")
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = (n, count)
    target = _uniform(shape, area[0], area[1], generator, device) * (height * width)  # (N, count) pixels
    if ratio[0] < 1.0 < ratio[1]:
        # kornia's mixture: as likely tall as wide, whatever the asymmetry of the range around 1.
        narrow = _uniform(shape, ratio[0], 1.0, generator, device)
        wide = _uniform(shape, 1.0, ratio[1], generator, device)
        aspect = torch.where(draws.rand(shape, generator, device=device) < 0.5, narrow, wide)
    else:
        aspect = _uniform(shape, ratio[0], ratio[1], generator, device)
    rh = (target * aspect).sqrt().round().clamp(1, height).long()  # (N, count)
    rw = (target / aspect).sqrt().round().clamp(1, width).long()
    left = (_uniform(shape, 0.0, 1.0, generator, device) * (width - rw + 1)).floor().long()
    top = (_uniform(shape, 0.0, 1.0, generator, device) * (height - rh + 1)).floor().long()
    r = torch.arange(height, device=device)
    c = torch.arange(width, device=device)
    in_r = (r >= top[..., None]) & (r < (top + rh)[..., None])  # (N, count, H)
    in_c = (c >= left[..., None]) & (c < (left + rw)[..., None])  # (N, count, W)
    return in_r[..., :, None] & in_c[..., None, :]


def paired_augment(
    real: torch.Tensor,
    fake: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    *,
    max_translate: float = 0.3,
    erase_count: int = 3,
    erase_area: tuple[float, float] = (0.1, 0.5),
    erase_ratio: tuple[float, float] = (0.3, 3.3),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random transform per pair i to real[i] and fake[i]; see the module docstring.

    real, fake: (N, C, H, W) with equal shapes. p: per-op probability (paper 0.4). Returns
    (real_aug, fake_aug), same shapes.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} must have the same shape")
    if real.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) latents, got shape {tuple(real.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augment p must be in [0, 1] (got {p})")
    if not 0.0 <= max_translate <= 1.0:
        raise ValueError(f"max_translate must be in [0, 1] (got {max_translate})")
    if erase_count < 0:
        raise ValueError(f"erase_count must be >= 0 (got {erase_count})")
    n, _, h, w = real.shape
    dev = real.device
    gdev = generator.device if generator is not None else dev

    coins = draws.rand((n, 1 + erase_count), generator, device=gdev) < p  # (N, 1 + count)
    shift = _uniform((n, 2), 0.0, max_translate, generator, gdev)  # (N, 2) fractions of (H, W)
    shift = (shift * torch.tensor([h, w], device=gdev, dtype=torch.float64)).round().long()
    shift = torch.where(coins[:, :1], shift, 0)  # an unselected translate is the identity gather
    rects = random_erase_masks(n, h, w, erase_count, erase_area, erase_ratio, generator, gdev)  # (N, count, H, W)
    # Zero-filling in sequence is the same as zeroing the union of the selected rectangles.
    erased = (rects & coins[:, 1:, None, None]).any(dim=1).to(dev)  # (N, H, W)
    dy, dx = shift[:, 0].to(dev), shift[:, 1].to(dev)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return translate(x, dy, dx).masked_fill(erased[:, None], 0)

    return apply(real), apply(fake)
