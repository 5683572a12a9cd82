"""Sample grids: layout, value mapping, and a clear error for undecoded latents."""

import numpy as np
import pytest
import torch

from advflow.platform.images import grid_array, save_grid


def test_grid_layout_and_values(tmp_path):
    x = torch.full((3, 1, 8, 8), -1.0)
    x[1] = 1.0  # second tile white
    g = grid_array(x, nrow=2, pad=1, upscale=2)
    assert g.shape == (2 * 17 + 1, 2 * 17 + 1, 3) and g.dtype == np.uint8
    assert (g[1:17, 1:17] == 0).all() and (g[1:17, 18:34] == 255).all()
    assert (g[18:34, 18:34] == 255).all()  # empty slot keeps the white background
    path = save_grid(x, tmp_path / "grid.png", nrow=2)
    assert path.is_file() and not list(tmp_path.glob("*.tmp.png"))


def test_latents_must_be_decoded_first():
    with pytest.raises(ValueError, match="decode_latents"):
        grid_array(torch.zeros(2, 4, 8, 8), nrow=2)
