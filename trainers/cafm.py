"""Continuous Adversarial Flow Models (CAFM, arXiv 2604.11521): the pure algorithm pieces (no Ray, no optimizer).

CAFM post-trains a pretrained flow-matching velocity model G adversarially. A discriminator D (the same
backbone, a [CLS] token and a scalar head, initialised from G's weights) is read through its
Jacobian-vector product along (velocity, dt = 1): the time derivative of D along a flow path. Real paths
move with the data velocity z - x, fake paths with G's predicted velocity; least squares pushes the real
derivative to +1 and the fake one to -1, and G pushes its own to +1.

Sources: official code ByteDance-Seed/Adversarial-Flow-Models at 519601d. "trainer:L" is
train_continuous_adversarial_flow_imagenet.py line L; "sit.yaml:L" is configs/train/cafm/train_cafm_sit.yaml,
"jit.yaml:L" configs/train/cafm/train_cafm_jit.yaml, "D_sit:L" models/cafm/sit/discriminator.py,
"sit_mod:L" models/cafm/sit/sit_mod.py, "jvp:L" models/cafm/jvp/discriminator.py.

Time convention. The official trainer already uses this project's convention: x_t = (1 - t) x + t z
(trainer:403-405), v = z - x (trainer:407-408), t = 1 noise, t = 0 data. Its SiT/JiT networks were
trained with t = 0 noise, so its Generator and Discriminator flip t -> 1 - t (and G's output sign)
INSIDE forward (models/cafm/sit/generator.py:6-10, D_sit:18-21) so that the pretrained time embedder
sees SiT's time. Here G.velocity(x_t, y, t) takes our t directly, and D copies G's t_embedder, so D
takes our t directly too: no flip anywhere. The JVP is along (dx, dt) = (velocity, +1) in (x_t, t)
(trainer:435-436, 467-469; jvp:21-22 is torch.func.jvp on (x, t)), i.e. d/dt D(x_t, t) along a path
moving TOWARD NOISE (dx_t/dt = z - x = v). Along the real path it is the total derivative
grad_x D . (z - x) + dD/dt; the fake replaces z - x by G's velocity at the same x_t.

Defaults (CAFMConfig; the SiT-XL/2 ImageNet-256 config, whose data, size and VAE latents match this
project; the JiT config's different values are quoted):
- warmup = 10000 optimizer steps of D only (sit.yaml:14, 59; jit.yaml:14 has 5000). Unit: iterations of
  the training loop, each of which is ONE optimizer step of either D or G (accumulation 1, trainer:390-397;
  "for bsz256, 5k is 1 epoch"). The rule (trainer:391-397, is_dis_step): iteration k (0-based) is a D step
  if k <= warmup (so warmup + 1 D-only steps), else a D step if k % (N + 1) < N, else a G step. The cycle
  is aligned to k = 0, not to the end of the warm-up (see `step_kind`).
- d_steps = N = 16 D steps per G step (sit.yaml:12, 56; jit.yaml:12).
- cp_scale = 0.001: weight of the centering term mean(D(x_t, t)^2) (sit.yaml:57; trainer:432 default).
- ot_scale = 0.0: weight of G's mean(velocity^2) term (sit.yaml:13, 58; trainer:462, 473).
- g_lr = d_lr = 1e-5 (sit.yaml:10-11, 72-73), AdamW betas (0.0, 0.95) (sit.yaml:75; trainer:175),
  weight_decay 0.0 (sit.yaml:74), both optimizers AdamW (trainer:179-180), constant learning rate.
- ema_decay = 0.99 per G step; the EMA is not updated on D steps (sit.yaml:45; trainer:517-526).
- g_grad_clip = d_grad_clip = 10000.0 (max global grad norm; sit.yaml:68-69; trainer:496-508).
- class_drop = 0.1: labels replaced by the null label (index num_classes, 1000 in the official code) with
  probability 0.1, the SAME dropped labels fed to G and D (sit.yaml:32 gen.dropout; trainer:368-369).
  G and D both use a table with the null row (num_classes: 1001, configs/models/cafm/sit/xl2.yaml:12).
- time_dist = "uniform": t ~ U(0, 1) (sit.yaml:67; trainer:373-374). "logit_normal_jit" (jit.yaml:60):
  t = sigmoid(0.8 * N(0, 1) + 0.8) (trainer:377-379; JiT's table-9 logit-normal (-0.8, 0.8) with the mean
  sign flipped into this t = 1 noise convention by the official code itself, so used here as written).
- Not losses, for the record: global batch 256 (sit.yaml:9; JiT 1024), pretrained SiT-XL/2 checkpoint.

The discriminator (D_sit:8-38, configured by sit.yaml:34-42): SiT's own class, so the same modules as G's
trunk -- x_embedder, pos_embed, t_embedder (D is time-conditioned: D_sit:25-26), y_embedder (the class
table with its null row, no dropout in D: xl2.yaml:11), blocks -- loaded from the SAME pretrained
checkpoint as G with strict=False (trainer:96-105), so G's final_layer is dropped. New: dis_embed, a
token of width D initialised randn * 0.02 (D_sit:11), prepended to the patch tokens WITHOUT a position
embedding (D_sit:29-32) and conditioned like every token through adaLN on c = y_emb + t_emb; its final
state goes through a no-affine RMSNorm (eps 1e-6) and a bias-free Linear(D, 1) with PyTorch's default
(kaiming-uniform) init -- not zero, so D's logits at init are not zero (D_sit:12-15, 36-38). The SiT
config builds D with norm_type "rms" (sit.yaml:40): the blocks' two parameter-free pre-norms are RMSNorm
instead of G's LayerNorm (sit_mod:14-18), with the copied weights unchanged. `build_cafm_discriminator`
does all of that on this project's `models.Discriminator` (same state-dict layout: the norms have no
parameters).

Losses (trainer:410-480), with x_t = (1 - t) x + t z, v_real = z - x, v_fake = G.velocity(x_t, y, t),
(o, o_real') = JVP of D at (x_t, t) along (v_real, 1), o_fake' along (v_fake, 1) (o = D(x_t, y, t)):
  D: mean((o_real' - 1)^2) + mean((o_fake' + 1)^2) + cp_scale * mean(o^2),  G under no_grad.
  G: mean((o_fake' - 1)^2) + ot_scale * mean(v_fake^2),  D's parameters receive no gradient.
Means are over the batch (and over (C, H, W) for v_fake^2).

Where this differs from the official code, and why:
- The two JVPs of the D step share one primal in the official code (torch.func.vmap over the stacked
  tangents, jvp:24-30); here D runs once on the batch duplicated [x_t; x_t] with tangents
  [v_real; v_fake] (Attention's primitive softmax path detects tangents through forward_ad, which vmap
  would hide). Same numbers, one extra primal forward of N rows.
- D is frozen in G's loss by a functional call with detached parameters (D's requires_grad flags and
  .grad are never touched) instead of toggling requires_grad (trainer:428-429). Same gradients.
- Randomness (the label drop) goes through `advflow.trainers.draws` (per-sample, independent of the
  worker split); the official code draws torch.rand per device batch.
- D's dtype: everything runs in the network's dtype; the official trainer runs math-SDPA attention
  (trainer:36-38) under its own precision settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from advflow.trainers import draws
from advflow.trainers.flow import interp
from advflow.trainers.models import Discriminator, DiscriminatorOptions, Generator

__all__ = [
    "TIME_DISTS",
    "CAFMConfig",
    "RMSNorm",
    "build_cafm_discriminator",
    "sample_cafm_times",
    "drop_labels",
    "jvp_logits",
    "d_loss",
    "g_loss",
    "step_kind",
]

TIME_DISTS = ("uniform", "logit_normal_jit")
RMS_EPS = 1e-6  # sit_mod:17-18 and D_sit:13 (eps 1e-6)


def _real(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    return float(value)


def _int(field: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class CAFMConfig:
    """CAFM's schedule, loss weights and optimizer settings; defaults = the official SiT config (see the
    module docstring for every source).

    warmup: D-only warm-up, in optimizer steps (training-loop iterations, each one D or one G update):
        iterations k = 0..warmup are D steps. Official 10000 (sit.yaml:14; JiT 5000, jit.yaml:14).
    d_steps: N, D steps per G step after the warm-up (cycle of N + 1 iterations, first N are D).
        Official 16 (sit.yaml:12).
    cp_scale: weight of D's centering term mean(D(x_t, t)^2). Official 0.001 (sit.yaml:57).
    ot_scale: weight of G's mean(v_fake^2) term. Official 0.0 (sit.yaml:13).
    g_lr, d_lr: AdamW learning rates of G and D, constant. Official 1e-5 each (sit.yaml:10-11).
    betas: AdamW betas of both optimizers. Official (0.0, 0.95) (sit.yaml:75).
    weight_decay: AdamW weight decay of both. Official 0.0 (sit.yaml:74).
    ema_decay: EMA of G, updated after each G step only. Official 0.99 (sit.yaml:45; trainer:517-526).
    g_grad_clip, d_grad_clip: max global gradient norm. Official 10000.0 each (sit.yaml:68-69).
    class_drop: probability of replacing a label by the null label (num_classes) for G and D alike.
        Official 0.1 (sit.yaml:32). Needs a generator built with null_label=True when > 0.
    time_dist: law of t: "uniform" U(0, 1) (official SiT, sit.yaml:67) or "logit_normal_jit"
        sigmoid(0.8 N(0, 1) + 0.8) (official JiT, jit.yaml:60; trainer:377-379).
    """

    warmup: int = 10000
    d_steps: int = 16
    cp_scale: float = 0.001
    ot_scale: float = 0.0
    g_lr: float = 1e-5
    d_lr: float = 1e-5
    betas: tuple[float, float] = (0.0, 0.95)
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    g_grad_clip: float = 10000.0
    d_grad_clip: float = 10000.0
    class_drop: float = 0.1
    time_dist: str = "uniform"

    def __post_init__(self) -> None:
        _int("warmup", self.warmup, 0)
        _int("d_steps", self.d_steps, 1)
        for name in ("cp_scale", "ot_scale", "weight_decay"):
            if _real(name, getattr(self, name)) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("g_lr", "d_lr", "g_grad_clip", "d_grad_clip"):
            if _real(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)} (official: "
                                 f"{getattr(CAFMConfig, name)})")
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r} (official: (0.0, 0.95))")
        for b in betas:
            if not 0.0 <= _real("betas", b) < 1.0:
                raise ValueError(f"betas: each beta must lie in [0, 1), got {betas!r} (official: (0.0, 0.95))")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if not 0.0 <= _real("ema_decay", self.ema_decay) < 1.0:
            raise ValueError(f"ema_decay: must lie in [0, 1), got {self.ema_decay} (official: 0.99)")
        if not 0.0 <= _real("class_drop", self.class_drop) <= 1.0:
            raise ValueError(f"class_drop: is a probability and must lie in [0, 1], got {self.class_drop} "
                             "(official: 0.1)")
        if self.time_dist not in TIME_DISTS:
            raise ValueError(f"time_dist: unknown time distribution {self.time_dist!r}; choose one of "
                             f"{list(TIME_DISTS)}")


# ----------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------


def step_kind(k: int, cfg: CAFMConfig) -> str:
    """"d" or "g" for optimizer step k = 0, 1, 2, ... (trainer:391-397 with accumulation 1).

    D only while k <= cfg.warmup; afterwards D when k % (d_steps + 1) < d_steps, else G. The cycle is
    counted from k = 0 (as the official code), so the first G step is the first k > warmup with
    k % (d_steps + 1) == d_steps.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: the optimizer-step index must be an int >= 0, got {k!r}")
    if k <= cfg.warmup:
        return "d"
    return "d" if k % (cfg.d_steps + 1) < cfg.d_steps else "g"


# ----------------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) (torch.nn.RMSNorm with
    elementwise_affine=False), written from primitives so forward-mode AD and its backward work."""

    def __init__(self, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        return (work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


_NEW_KEYS = ("dis_embed", "final_layer.1.weight")  # what D_sit:11-15 adds; everything else comes from G


def build_cafm_discriminator(G: Generator, norm: str = "rms") -> Discriminator:
    """D for CAFM from a velocity generator G (kind "multistep" or "anystep").

    A time-conditioned `models.Discriminator` of G's size, channels, input size and label rows (with the
    null row when G has one), on G's device and dtype, with x_embedder, pos_embed, t_embedder, y_embedder
    and blocks copied from G (strict name match; G's final_layer and t_tgt_embedder are not used). New:
    dis_embed ~ randn * 0.02, final_layer = [RMSNorm, Linear(D, 1, bias=False) default init].
    norm="rms" (official SiT config, sit.yaml:40) swaps the blocks' and the head's parameter-free norms
    to RMSNorm; norm="ln" keeps LayerNorm (models.Discriminator as is). The state dict is the same.
    """
    if not isinstance(G, Generator) or not hasattr(G, "t_embedder") or G.kind == "1nfe":
        raise ValueError("G: CAFM needs a velocity generator with a time embedder (build_generator(..., "
                         "kind='multistep' or 'anystep')); D copies its t_embedder")
    if norm not in ("rms", "ln"):
        raise ValueError(f"norm: expected 'rms' (official SiT D) or 'ln', got {norm!r}")
    opts = DiscriminatorOptions(name=_size_name(G), in_channels=G.in_channels, input_size=G.input_size,
                                num_classes=G.label_rows, time_cond=True)
    ref = next(G.parameters())
    D = Discriminator(opts).to(device=ref.device, dtype=ref.dtype)
    if norm == "rms":
        for block in D.blocks:
            block.norm1 = RMSNorm()
            block.norm2 = RMSNorm()
        D.final_layer[0] = RMSNorm()
    g_state = G.state_dict()
    d_state = D.state_dict()
    missing = [k for k in d_state if k not in _NEW_KEYS and k not in g_state]
    if missing:  # cannot happen for the models.py layout; guards a future change of it
        raise ValueError(f"G: has no weights for D's {missing[:5]}; D is built from G's trunk")
    with torch.no_grad():
        for k, v in d_state.items():
            if k not in _NEW_KEYS:
                v.copy_(g_state[k])
    D.t_embedder.scale = G.t_embedder.scale  # an imported SiT embeds t itself (time_scale 1): D reads time as G
    return D


def _size_name(G: Generator) -> str:
    return G.config["name"]


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def sample_cafm_times(n: int, cfg: CAFMConfig, generator=None, device=None) -> torch.Tensor:
    """t (n,) float32 by cfg.time_dist (trainer:372-379), drawn per sample through `draws`."""
    if n < 1:
        raise ValueError(f"n: must be >= 1 (the number of samples), got {n}")
    gdev = generator.device if generator is not None else device
    if cfg.time_dist == "uniform":
        return draws.rand((n,), generator, device=gdev).to(device)
    e = draws.randn((n,), generator, device=gdev).to(device)
    return torch.sigmoid(0.8 * e + 0.8)


def drop_labels(y: torch.Tensor, cfg: CAFMConfig, null_label: int, generator=None) -> torch.Tensor:
    """y with each label replaced by `null_label` with probability cfg.class_drop (trainer:368-369:
    kept where rand >= class_drop). No draw is made when class_drop == 0."""
    if cfg.class_drop == 0:
        return y
    gdev = generator.device if generator is not None else y.device
    keep = draws.rand((y.shape[0],), generator, device=gdev).to(y.device) >= cfg.class_drop  # (N,)
    return torch.where(keep, y, torch.full_like(y, null_label))


def _labels(G: Generator, y: torch.Tensor, cfg: CAFMConfig, generator) -> torch.Tensor:
    if cfg.class_drop == 0:
        return y
    if not getattr(G, "null_label", False):
        raise ValueError(f"class_drop: {cfg.class_drop} drops labels to the null label, but G has no null row; "
                         "build G with null_label=True (as the official 1001-row table) or set class_drop=0")
    return drop_labels(y, cfg, G.num_classes, generator)


def _check_batch(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> None:
    if x.shape != z.shape:
        raise ValueError(f"z: must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if not torch.is_tensor(t) or t.shape != (x.shape[0],) or not t.is_floating_point():
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"t: expected a float tensor of shape ({x.shape[0]},), got {got}")


# ----------------------------------------------------------------------------------------------------
# JVP read-out and losses
# ----------------------------------------------------------------------------------------------------


def jvp_logits(
    D: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    velocity: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x_t, y, t), d/dh D(x_t + h velocity, y, t + h) at h = 0), each (N,).

    torch.func.jvp on D (a module or any callable D(x, y, t)) in (x_t, t) along (velocity, +1), as the
    official DiscriminatorJVP (jvp:18-22, tangents trainer:435-436). x_t, velocity: (N, C, H, W);
    y: (N,) long; t: (N,). Both outputs keep their autograd graphs (to D's parameters and to velocity).
    """
    if velocity.shape != x_t.shape:
        raise ValueError(f"velocity: must have the shape of x_t {tuple(x_t.shape)}, got {tuple(velocity.shape)}")

    def f(x, tt):
        return D(x, y, tt)  # (N,)

    return torch.func.jvp(f, (x_t, t), (velocity, torch.ones_like(t)))


def d_loss(G: Generator, D: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
           cfg: CAFMConfig, generator=None) -> tuple[torch.Tensor, dict]:
    """D's loss (trainer:432-451): mean((o_real' - 1)^2) + mean((o_fake' + 1)^2) + cp_scale * mean(o^2).

    x: data (N, C, H, W); z: noise (N, C, H, W); y: labels (N,) (dropped to the null label with
    probability cfg.class_drop, through `generator`); t: (N,) flow times. x_t = (1 - t) x + t z;
    the real tangent is z - x, the fake G.velocity(x_t, y, t) computed under no_grad (G gets nothing).
    """
    _check_batch(x, z, t)
    y = _labels(G, y, cfg, generator)
    x_t = interp(x, z, t)  # (N, C, H, W)
    with torch.no_grad():
        v_fake = G.velocity(x_t, y, t)  # (N, C, H, W)
    v_real = z - x  # (N, C, H, W)
    n = x.shape[0]
    # One JVP over the duplicated batch: rows [:N] along v_real, rows [N:] along v_fake (same primal).
    out, dout = jvp_logits(D, torch.cat([x_t, x_t]), torch.cat([y, y]), torch.cat([t, t]),
                           torch.cat([v_real, v_fake]))  # (2N,), (2N,)
    o, d_real, d_fake = out[:n], dout[:n], dout[n:]
    adv_real = (d_real - 1).square().mean()
    adv_fake = (d_fake + 1).square().mean()
    cp = o.square().mean()
    loss = adv_real + adv_fake + cfg.cp_scale * cp
    stats = {
        "d_loss": loss.detach(),
        "d_adv": (adv_real + adv_fake).detach(),
        "d_adv_real": adv_real.detach(),
        "d_adv_fake": adv_fake.detach(),
        "cp": cp.detach(),
        "d_jvp_real": d_real.detach().mean(),
        "d_jvp_fake": d_fake.detach().mean(),
        "d_logit": o.detach().mean(),
    }
    return loss, stats


def g_loss(G: Generator, D: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
           cfg: CAFMConfig, generator=None) -> tuple[torch.Tensor, dict]:
    """G's loss (trainer:462-473): mean((o_fake' - 1)^2) + ot_scale * mean(v_fake^2).

    Shapes and the label drop as `d_loss`. v_fake = G.velocity(x_t, y, t) with its graph; D is called
    functionally with detached parameters, so gradients reach G through the tangent only and D's
    parameters' .grad (and requires_grad flags) are untouched.
    """
    _check_batch(x, z, t)
    y = _labels(G, y, cfg, generator)
    x_t = interp(x, z, t)  # (N, C, H, W)
    v_fake = G.velocity(x_t, y, t)  # (N, C, H, W)
    frozen = {k: v.detach() for k, v in D.named_parameters()}
    frozen.update({k: v for k, v in D.named_buffers()})

    def d_frozen(xx, yy, tt):
        return torch.func.functional_call(D, frozen, (xx, yy, tt))

    o, d_fake = jvp_logits(d_frozen, x_t, y, t, v_fake)  # (N,), (N,)
    adv = (d_fake - 1).square().mean()
    ot = v_fake.square().mean()
    loss = adv + cfg.ot_scale * ot
    stats = {
        "g_loss": loss.detach(),
        "g_adv": adv.detach(),
        "ot": ot.detach(),
        "g_jvp_fake": d_fake.detach().mean(),
        "g_logit": o.detach().mean(),
    }
    return loss, stats
