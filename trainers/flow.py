"""Flow-time conventions, training-time sampling of (s, t) and the samplers.

Convention (fixed for the whole project): x_t = (1 - t) * x + t * z with z ~ N(0, I);
t = 1 is pure noise, t = 0 is data. A generator step moves a sample from time s to an
earlier time t < s. The velocity g = dx_t/dt = z - x points from data towards noise, so
a step towards the data is x_t = x_s - (s - t) * g.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from advflow.trainers import draws

KINDS = ("1nfe", "multistep", "anystep")


def _as_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Return t as a (N, 1, 1, ...) tensor broadcastable against `like` (N, ...)."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), device=like.device, dtype=like.dtype)
    t = t.to(device=like.device, dtype=like.dtype)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"time tensor must be a scalar or shape (N,) = ({like.shape[0]},), got {tuple(t.shape)}; "
            "pass one time per sample"
        )
    return t.view(-1, *([1] * (like.dim() - 1)))


def interp(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Point on the straight data-noise path: (1 - t) * x + t * z.

    x, z: (N, ...) data and noise of the same shape; t: (N,) or scalar. Returns (N, ...).
    """
    if x.shape != z.shape:
        raise ValueError(f"interp: x {tuple(x.shape)} and z {tuple(z.shape)} must have the same shape")
    tb = _as_time(t, x)
    return (1 - tb) * x + tb * z


def sample_times(
    kind: str,
    n: int,
    nfe: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the (source s, target t) time pair for each of n training samples.

    - "1nfe":      s = 1, t = 0 (noise straight to data).
    - "multistep": s uniform on the K-point grid {1, 1 - 1/K, ..., 1/K}, t = s - 1/K
                   (K = nfe). t is computed as k/K so the last step lands on exactly 0.
    - "anystep":   s ~ U(0, 1), t ~ U(0, s) (i.e. t = s * u, u ~ U(0, 1)).
    Returns s, t: (n,) tensors with t < s (t <= s for anystep in float rounding).
    """
    if kind not in KINDS:
        raise ValueError(f"sample_times: kind={kind!r} is not one of {KINDS}")
    if n < 1:
        raise ValueError(f"sample_times: n={n} must be >= 1")
    if kind == "1nfe":
        return (torch.ones(n, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=dtype))
    if kind == "multistep":
        if nfe < 1:
            raise ValueError(f"sample_times: nfe={nfe} must be >= 1 for kind='multistep'")
        # Draw on the generator's device so seeded runs are reproducible, then move.
        gdev = generator.device if generator is not None else device
        k = draws.randint(0, nfe, (n,), generator, device=gdev).to(device=device, dtype=dtype)
        return (k + 1) / nfe, k / nfe
    gdev = generator.device if generator is not None else device
    u = draws.rand((2, n), generator, device=gdev, batch_dim=1).to(device=device, dtype=dtype)
    s = u[0]
    return s, s * u[1]


def time_grid(nfe: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """K + 1 equally spaced times 1 = tau_0 > tau_1 > ... > tau_K = 0, (K + 1,)."""
    if nfe < 1:
        raise ValueError(f"nfe={nfe} must be >= 1 (number of generator / Euler steps)")
    return torch.arange(nfe, -1, -1, device=device, dtype=torch.float64).div(nfe).to(dtype)


def _check_grid(times: torch.Tensor) -> None:
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError("times must be a 1-D sequence of at least two times, e.g. [1.0, 0.5, 0.0]")
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"times must be strictly decreasing (noise -> data), got {times.tolist()}")
    if float(times[0]) > 1 or float(times[-1]) < 0:
        raise ValueError(f"times must lie in [0, 1], got {times.tolist()}")


@torch.no_grad()
def generate(
    G: nn.Module,
    z: torch.Tensor,
    y: torch.Tensor,
    nfe: int | None = None,
    times: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample data from noise z (N, C, H, W) with labels y (N,); returns (N, C, H, W).

    Dispatches on G.kind:
    - "1nfe": one call G(z, y) (a depth-repeated generator is still one call).
    - "multistep": K = G.nfe equal steps 1 -> 0, x <- G(x, y, s, t). `nfe`, if given, must equal
      G.nfe because the network only ever saw s on its own K-point grid.
    - "anystep": steps on `times` (decreasing, e.g. [1, 0.6, 0]) or on the equal grid of `nfe`
      steps (default G.nfe).
    The module's train/eval mode is left alone (callers pass an eval-mode / EMA module).
    """
    kind = getattr(G, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"generate: G.kind={kind!r} must be one of {KINDS}")
    if kind == "1nfe":
        if nfe not in (None, 1) or times is not None:
            raise ValueError("generate: a '1nfe' generator takes exactly one step; drop nfe/times")
        return G(z, y)
    if kind == "multistep":
        if times is not None:
            raise ValueError("generate: a 'multistep' generator runs on its own grid; drop `times`")
        if nfe is not None and nfe != G.nfe:
            raise ValueError(
                f"generate: nfe={nfe} but this multistep generator was trained for G.nfe={G.nfe} steps; "
                "pass nfe=None or use an 'anystep' generator"
            )
        grid = time_grid(G.nfe, device=z.device, dtype=z.dtype)
    else:
        if times is not None:
            if nfe is not None:
                raise ValueError("generate: pass either nfe or times, not both")
            grid = torch.as_tensor(times, device=z.device, dtype=z.dtype)
            _check_grid(grid)
        else:
            grid = time_grid(nfe if nfe is not None else G.nfe, device=z.device, dtype=z.dtype)
    n = z.shape[0]
    x = z
    for i in range(grid.numel() - 1):
        s = grid[i].repeat(n)
        t = grid[i + 1].repeat(n)
        x = G(x, y, s, t)
    return x


@torch.no_grad()
def euler_sample(G: nn.Module, z: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Flow-matching sampler: `steps` Euler steps of the velocity field from t = 1 to t = 0.

    x <- x - (s - t) * G.velocity(x, y, s, t) on the equal grid; z: (N, C, H, W) noise,
    y: (N,) labels; returns (N, C, H, W).
    """
    grid = time_grid(steps, device=z.device, dtype=z.dtype)
    n = z.shape[0]
    x = z
    for i in range(steps):
        s = grid[i].repeat(n)
        t = grid[i + 1].repeat(n)
        x = x - _as_time(s - t, x) * G.velocity(x, y, s, t)
    return x
