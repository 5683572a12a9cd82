"""Flow-matching baseline for the same network family (sampling: flow.euler_sample).

The network is a "multistep"-kind generator used through G.velocity(x_t, y, t): it embeds one
time, the current one, which is what both fm_loss (training) and euler_sample (sampling, where the
current time is the step's s) feed it. "1nfe" generators have no time input and "anystep" ones
expect a second (target) time, so both are rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advflow.trainers import draws
from advflow.trainers.flow import interp

FM_TIME_DISTS = ("uniform", "logit_normal")


def sample_fm_times(
    n: int,
    dist: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Training times t (n,): "uniform" t ~ U(0, 1), or "logit_normal" t = sigmoid(mean + std * e),
    e ~ N(0, 1), which concentrates training on mid times (SD3-style); uniform is the default."""
    if dist not in FM_TIME_DISTS:
        raise ValueError(f"dist={dist!r} is not one of {FM_TIME_DISTS}")
    gdev = generator.device if generator is not None else device
    if dist == "uniform":
        return draws.rand((n,), generator, device=gdev).to(device)
    if std <= 0:
        raise ValueError(f"std={std} must be > 0 for the logit-normal time distribution")
    e = draws.randn((n,), generator, device=gdev).to(device)
    return torch.sigmoid(mean + std * e)


def fm_loss(G: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE: mean ||G.velocity(x_t, y, t) - (z - x)||^2 over all elements, a scalar.

    x: (N, C, H, W) data, z: same-shape noise, y: (N,) labels, t: (N,) times in [0, 1].
    """
    kind = getattr(G, "kind", None)
    if kind != "multistep":
        raise ValueError(
            f"fm_loss: G.kind={kind!r}; flow matching needs a 'multistep' generator (one timestep "
            "embedding); build it with kind='multistep'"
        )
    xt = interp(x, z, t)  # (N, C, H, W)
    v = G.velocity(xt, y, t)  # (N, C, H, W)
    return F.mse_loss(v, z - x)
