"""Gradient normalization for the generator's adversarial branch (AFM, section 3).

Forward is the identity. Backward divides the incoming gradient g by sqrt(EMA(n * ||g||^2)), n =
g.numel(). Because the scale is computed from g itself, multiplying the adversarial loss by any
constant leaves the gradient reaching G unchanged; only the OT term sets the balance, which is why
lambda_ot transfers across model sizes.

EMA, as the official code has it (github ByteDance-Seed/Adversarial-Flow-Models, grad_norm.py): the
buffer starts at 0 and is NOT bias-corrected,
    ema_k = m * ema_{k-1} + (1 - m) * v_k,   scale_k = sqrt(ema_k) + eps,   eps = 1e-8.
So the first updates divide by less than the gradient's norm (sqrt(0.1 v_1) at k = 1 for m = 0.9):
the adversarial gradient is up to ~3x larger for the first ~20 G updates. An earlier advflow release
bias-corrected the EMA (Adam style); that differs by 0.32x at update 1, 0.81x at 10 and 0.98x at 30,
and was dropped so that a run reproduces the official early dynamics.

Where it sits (the caller's business, afm.g_loss): at D's input, after the discriminator
augmentation, as in the official G step, so augmentation changes the measured norm.

Distributed: with torch.distributed initialised, v = n * ||g||^2 is averaged over ranks (all-reduce)
before the EMA update, so every rank applies the same scale and the ranks stay in lockstep. This is a
collective: every rank must backprop through the normalizer the same number of times per step.
Each backward pass is one EMA update (so with gradient accumulation, one per micro-batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradNormalizer"]

EPS = 1e-8  # added to sqrt(ema): keeps the division finite while the EMA is 0 (official value)


class _NormalizeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, owner: "GradNormalizer") -> torch.Tensor:
        ctx.owner = owner
        # A view, not a copy: identity forward costs no memory.
        return x.view_as(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        scale = ctx.owner._update(g)  # 0-dim float32 tensor on g's device
        return g / scale.to(g.dtype), None


class GradNormalizer(nn.Module):
    """Identity in forward; normalises the gradient in backward by sqrt(EMA(n * ||g||^2)).

    Buffers (all in state_dict, so checkpoints resume the same scale):
      ema:   float32 scalar, the EMA of n * ||g||^2 (starts at 0, no bias correction).
      count: int64 scalar, number of EMA updates so far (observability; not used in the maths).
      scale: float32 scalar, the divisor sqrt(ema) + eps applied in the latest backward (1.0 before any).
    `last_scale` returns `scale` as a Python float for logging (this syncs a GPU; call it when logging).

    Args:
      momentum: EMA decay m in [0, 1); 0 means "use the current batch only". Paper: 0.9.
      process_group: all-reduce group when torch.distributed is initialised (None = default group).
      eps: added to sqrt(ema), 1e-8.
    """

    def __init__(self, momentum: float = 0.9, process_group=None, eps: float = EPS) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) (got {momentum}); the paper uses 0.9")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (got {eps}); the official value is 1e-8")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.process_group = process_group
        self.register_buffer("ema", torch.zeros((), dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return _NormalizeGrad.apply(x, self)

    @property
    def last_scale(self) -> float:
        return float(self.scale)

    @torch.no_grad()
    def _update(self, g: torch.Tensor) -> torch.Tensor:
        # float32 accumulation even for bf16 grads: the sum over ~1e6 elements needs the mantissa.
        v = g.detach().float().square().sum() * g.numel()  # 0-dim
        if dist.is_available() and dist.is_initialized():
            # gloo has no AVG op: sum, then divide by the world size.
            dist.all_reduce(v, op=dist.ReduceOp.SUM, group=self.process_group)
            v = v / dist.get_world_size(group=self.process_group)
        m = self.momentum
        # Keep the buffers on g's device (the module may not have been moved with the model).
        ema = self.ema.to(v.device) * m + (1.0 - m) * v
        count = self.count.to(v.device) + 1
        scale = ema.sqrt() + self.eps
        self.ema.copy_(ema)
        self.count.copy_(count)
        self.scale.copy_(scale)
        return scale

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"
