"""Exponential moving average of a generator's parameters (paper: decay 0.9999).

Works on a plain nn.Module (the platform hands in the unwrapped module, not a DeepSpeed engine).
The shadow copy is kept in float32 whatever the model's dtype: with decay 0.9999 each update moves
the average by 1e-4 of the difference, which bf16 (8 mantissa bits) would round away.
Buffers are not averaged; copy_to leaves the model's buffers as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- d * shadow + (1 - d) * param after each optimizer step.

    decay:  d in [0, 1).
    warmup: if True, the k-th update (k = 1, 2, ...) uses d_k = min(decay, (1 + k) / (10 + k)),
            so early averages are not dominated by the random initialisation; else d_k = decay.
    The shadow starts as a copy of `model`'s parameters.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}; the paper uses 0.9999")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
        }

    def current_decay(self) -> float:
        """Decay the NEXT update will use."""
        if not self.warmup:
            return self.decay
        k = self.num_updates + 1
        return min(self.decay, (1 + k) / (10 + k))

    def _params(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self.shadow.keys())[:5]
            raise ValueError(
                f"EMA: model parameters differ from the tracked ones (missing {missing}, unexpected "
                f"{extra}); pass the same unwrapped module the EMA was built from"
            )
        return [(self.shadow[n], params[n]) for n in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average (call after each G step)."""
        d = self.current_decay()
        pairs = self._params(model)
        if pairs and pairs[0][0].device != pairs[0][1].device:
            # The model moved (e.g. to the GPU) after the EMA was built: follow it once.
            self.to(pairs[0][1].device)
            pairs = self._params(model)
        shadows = [s for s, _ in pairs]
        currents = [p.detach().to(s.dtype) for s, p in pairs]
        # lerp(s, p, 1 - d) == d * s + (1 - d) * p, fused over all tensors.
        torch._foreach_lerp_(shadows, currents, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (sampling, or the paper's "EMA reload")."""
        for s, p in self._params(model):
            p.copy_(s.to(device=p.device, dtype=p.dtype))

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {n: s.to(device) for n, s in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: s.clone() for n, s in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("decay", "warmup", "num_updates", "shadow"):
            if k not in state:
                raise ValueError(f"EMA state_dict is missing {k!r}; was it saved by EMA.state_dict()?")
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise ValueError(
                "EMA state_dict tracks different parameters than this model "
                f"({len(shadow)} vs {len(self.shadow)} tensors); load it into an EMA of the same model"
            )
        for n, s in shadow.items():
            if s.shape != self.shadow[n].shape:
                raise ValueError(f"EMA state_dict: {n} has shape {tuple(s.shape)}, expected {tuple(self.shadow[n].shape)}")
        device = next(iter(self.shadow.values())).device if self.shadow else "cpu"
        self.shadow = {n: s.detach().float().to(device).clone() for n, s in shadow.items()}
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
