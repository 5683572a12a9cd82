"""Sample grids: what people look at. Pixels in [-1, 1] (N, C, H, W) -> one PNG, written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from advflow.platform.atomic import write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C): the one pixel mapping of grids, the registry
    model's output and generate.py's --npz."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_array(x: torch.Tensor, nrow: int, pad: int = 1, upscale: int | None = None) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (rows*H', cols*W', 3) uint8. Small images (digits are 8x8) are
    upscaled with nearest neighbour so a grid is readable."""
    if x.ndim != 4:
        raise ValueError(f"grid_array: expected (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"grid_array: {c} channels; decode latents to images first "
                         "(advflow.platform.data.encoders.decode_latents)")
    img = to_uint8(x)  # (N, H, W, C)
    if c == 1:
        img = np.repeat(img, 3, axis=-1)
    up = upscale or max(1, 64 // max(h, w))
    if up > 1:
        img = img.repeat(up, axis=1).repeat(up, axis=2)
    h, w = img.shape[1:3]
    ncol = nrow
    rows = math.ceil(n / ncol)
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img[i]
    return out


def save_grid(x: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    buf = io.BytesIO()
    Image.fromarray(grid_array(x, nrow)).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())
