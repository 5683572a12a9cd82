"""AFM step functions: the discriminator and generator losses of one training step.

No optimizer, DeepSpeed or distributed code lives here: the platform calls backward/step on the
returned loss. Conventions: x_t = (1 - t) x + t z (advflow.trainers.flow); G maps x_s to x_t, t < s.

Source samples (multistep / anystep). The generator's input is x_s = interp(x_src, z, s):
  - cfg.source = "same" (default, as the official code): x_src = x_real with label y. The source
    x_s and the real target x_t = interp(x_real, noise, t) come from the SAME image and label, with
    independent noises z and noise, so D compares G's x_t with a real x_t of the same image.
  - cfg.source = "permute" (explicit option): x_src = x_real[perm], y_src = y[perm], one random
    permutation; the fake is generated AND judged with y_src, so pair i compares a real of class
    y_i with a fake of class y_src_i (relativistic pairing on the joint (image, class) law).
  - or pass x_src (and y_src) explicitly: an independent data batch.
For "1nfe" the source is the noise itself (x_s = z, s = 1, t = 0) and the fake uses y.
D always receives t (a D without time conditioning ignores it).

Gradient isolation:
  - d_loss generates the fake under torch.no_grad: G receives no gradient from D steps.
  - g_loss evaluates D(real) under no_grad and D(fake) with D's parameters temporarily set to
    requires_grad=False (cfg.freeze_d_in_g, default on): gradients reach the fake only, D's
    parameter .grad stays untouched (None if it was None) and no weight-gradient work is spent on D.
    The classifier used for guidance is frozen the same way.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from advflow.trainers import draws
from advflow.trainers.augment import paired_augment
from advflow.trainers.flow import interp, sample_times
from advflow.trainers.gradnorm import GradNormalizer
from advflow.trainers.losses import (
    fd_penalty,
    guidance_loss,
    logit_centering,
    ot_loss,
    perturb,
    relativistic_loss,
    st_weight,
)

SOURCES = ("same", "permute")
CG_T_MODES = ("uniform", "target")


@dataclass
class AFMConfig:
    """Loss weights and switches of one AFM step (the paper's defaults).

    lambda_gp:     weight of R1 + R2 (finite-difference gradient penalties), 0.25.
    gp_fraction:   share of the batch that gets R1/R2: max(round(fraction * N), 1) evenly spaced samples
                   (the official size; Python's round, so halves go to the even neighbour), 0.25.
    gp_eps:        finite-difference step, 0.01.
    lambda_cp:     logit-centering weight, 0.01.
    lambda_ot:     OT-loss weight; resolved per step by the caller (PhasePlan.at(step).lambda_ot).
    lambda_cg:     classifier-guidance weight; 0 disables guidance.
    cg_t_range:    (lo, hi) for the guidance time t'.
    cg_t_mode:     "uniform": t' ~ U(lo, hi) per sample and the classifier sees the fake re-noised,
                   interp(fake, z', t') (paper, 1NFE: (0, 0.1), "G(z) noised");
                   "target": t' = t and the classifier sees G's output x_t itself (it already is a
                   sample at time t); samples outside lo <= t <= hi contribute 0 and the mean is
                   over the WHOLE batch, as in the official code (paper, multi-step: t <= 0.49).
    use_gradnorm:  normalise the adversarial gradient reaching the fake (GradNormalizer), at D's
                   input, i.e. after the augmentation (official placement).
    gradnorm_momentum: its EMA momentum, 0.9 (used by make_gradnorm).
    augment_p:     paired discriminator-augmentation probability (guided runs: 0.4).
    source:        how to pick the multi-step source batch when x_src is not given (module doc).
    fused_d:       evaluate D once on [real, fake, real+eps n, fake+eps n] in d_loss (fast) instead
                   of four calls; both give the same loss.
    freeze_d_in_g: set D's (and the classifier's) requires_grad False while g_loss runs them.
    st_floor:      floor of w(s, t) = max(|s - t|, floor).
    """

    lambda_gp: float = 0.25
    gp_fraction: float = 0.25
    gp_eps: float = 0.01
    lambda_cp: float = 0.01
    lambda_ot: float = 0.2
    lambda_cg: float = 0.0
    cg_t_range: tuple[float, float] = (0.0, 0.1)
    cg_t_mode: str = "uniform"
    use_gradnorm: bool = True
    gradnorm_momentum: float = 0.9
    augment_p: float = 0.0
    source: str = "same"
    fused_d: bool = True
    freeze_d_in_g: bool = True
    st_floor: float = 1e-3

    def __post_init__(self) -> None:
        for f in ("lambda_gp", "lambda_cp", "lambda_ot", "lambda_cg"):
            v = getattr(self, f)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"AFMConfig.{f} must be a finite number >= 0, got {v}")
        if not 0 < self.gp_fraction <= 1:
            raise ValueError(f"AFMConfig.gp_fraction must be in (0, 1], got {self.gp_fraction}; use lambda_gp=0 to disable")
        if not self.gp_eps > 0:
            raise ValueError(f"AFMConfig.gp_eps must be > 0, got {self.gp_eps}")
        lo, hi = self.cg_t_range
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"AFMConfig.cg_t_range must satisfy 0 <= lo <= hi <= 1, got {self.cg_t_range}")
        self.cg_t_range = (float(lo), float(hi))
        if self.cg_t_mode not in CG_T_MODES:
            raise ValueError(f"AFMConfig.cg_t_mode={self.cg_t_mode!r} is not one of {CG_T_MODES}")
        if not 0 <= self.gradnorm_momentum < 1:
            raise ValueError(f"AFMConfig.gradnorm_momentum must be in [0, 1), got {self.gradnorm_momentum}")
        if not 0 <= self.augment_p <= 1:
            raise ValueError(f"AFMConfig.augment_p is a probability in [0, 1], got {self.augment_p}")
        if self.source not in SOURCES:
            raise ValueError(f"AFMConfig.source={self.source!r} is not one of {SOURCES}")
        if not self.st_floor > 0:
            raise ValueError(f"AFMConfig.st_floor must be > 0, got {self.st_floor}")

    def with_phase(self, params) -> "AFMConfig":
        """Copy with the per-step values of a schedules.PhaseParams applied."""
        return dataclasses.replace(
            self,
            lambda_ot=params.lambda_ot,
            lambda_gp=params.lambda_gp,
            lambda_cp=params.lambda_cp,
            lambda_cg=params.lambda_cg,
            cg_t_range=tuple(params.cg_t_range),
            augment_p=params.augment_p,
        )


def gp_size(fraction: float, n: int) -> int:
    """Samples of a batch of n that get R1/R2: max(round(fraction * n), 1), the official rule.
    (An earlier advflow used ceil; the two differ for 22 of the batch sizes 1..64 at 0.25.)"""
    return max(round(fraction * n), 1)


def gp_indices(n: int, m: int, device=None) -> torch.Tensor:
    """Which m of a batch of n samples get R1/R2: evenly spaced, floor(i * n / m) for i < m.

    The official code takes the first m. In a shuffled batch any fixed choice of positions is the
    same in distribution; evenly spaced positions are also the same samples whatever the number of
    workers the global batch is split over (worker r's positions, offset by r * n, are exactly the
    global batch's when m / n is the same on every worker), which elastic resume needs."""
    return torch.arange(m, device=device) * n // m  # (m,)


def make_gradnorm(cfg: AFMConfig) -> GradNormalizer:
    """The GradNormalizer g_loss expects (keep it alive and checkpoint its state_dict)."""
    return GradNormalizer(momentum=cfg.gradnorm_momentum)


def step_kind(k: int, d_steps: int = 1, g_steps: int = 1) -> str:
    """Alternation rule: in each cycle of d_steps + g_steps iterations the first d_steps are D
    steps, the rest G steps. k = 0, 1, 2, ... (default: d, g, d, g, ...)."""
    for name, v in (("d_steps", d_steps), ("g_steps", g_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if k < 0:
        raise ValueError(f"step index k must be >= 0, got {k}")
    return "d" if k % (d_steps + g_steps) < d_steps else "g"


@contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter (restored afterwards): inputs still
    get gradients, the parameters get none and their weight-gradient kernels are skipped."""
    if module is None:
        yield
        return
    saved = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass
class _Inputs:
    x_s: torch.Tensor  # (N, C, H, W) generator input
    y_src: torch.Tensor  # (N,) labels the fake is generated and judged with
    s: torch.Tensor  # (N,)
    t: torch.Tensor  # (N,)
    real_t: torch.Tensor  # (N, C, H, W) real data at time t


def _prepare(G, x_real, y, z, cfg, x_src, y_src, s, t, noise, generator) -> _Inputs:
    if x_real.shape != z.shape:
        raise ValueError(f"x_real {tuple(x_real.shape)} and z {tuple(z.shape)} must have the same shape")
    n = x_real.shape[0]
    kind = getattr(G, "kind", None)
    if (s is None) != (t is None):
        raise ValueError("pass both s and t, or neither (they are then sampled for G.kind)")
    if s is None:
        s, t = sample_times(kind, n, getattr(G, "nfe", 1), generator, device=z.device, dtype=z.dtype)
    if kind == "1nfe":
        # s = 1: the source is pure noise; t = 0: the real target is clean data.
        return _Inputs(z, y, s, t, x_real)
    if x_src is None:
        if y_src is not None:
            raise ValueError("y_src was given without x_src; pass both or neither")
        if cfg.source == "permute":
            gdev = generator.device if generator is not None else x_real.device
            # A permutation pairs samples of one worker's batch; it is not per-sample randomness,
            # so under a BatchSlice every worker permutes alike (elastic resume is exact for `same` only).
            gen = generator.generator if isinstance(generator, draws.BatchSlice) else generator
            perm = torch.randperm(n, generator=gen, device=gdev).to(x_real.device)
            x_src, y_src = x_real[perm], y[perm]
        else:
            x_src, y_src = x_real, y
    else:
        if x_src.shape != x_real.shape:
            raise ValueError(f"x_src {tuple(x_src.shape)} must have the shape of x_real {tuple(x_real.shape)}")
        y_src = y if y_src is None else y_src
    if noise is None:
        noise = draws.randn(z.shape, generator, device=z.device, dtype=z.dtype)
    return _Inputs(interp(x_src, z, s), y_src, s, t, interp(x_real, noise, t))


def _generate(G, b: _Inputs) -> torch.Tensor:
    if G.kind == "1nfe":
        return G(b.x_s, b.y_src)
    return G(b.x_s, b.y_src, b.s, b.t)


def d_loss(
    G: nn.Module,
    D: nn.Module,
    x_real: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    cfg: AFMConfig,
    *,
    x_src: torch.Tensor | None = None,
    y_src: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Discriminator loss adv + lambda_gp (R1 + R2) + lambda_cp cp and its metrics.

    x_real: (N, C, H, W) data, y: (N,) labels, z: (N, C, H, W) noise. Optional: x_src/y_src (source
    batch), s/t (N,) times, noise (N, C, H, W) for the real target, generator for every draw.
    adv = softplus(-(D(real_t) - D(fake))) averaged; R1/R2 = finite-difference penalties on the
    gp_size(gp_fraction, N) evenly spaced real/fake samples (gp_indices), weighted by w(s, t);
    cp = mean (D(real) + D(fake))^2.
    Metrics are detached 0-dim tensors (no host sync).
    """
    b = _prepare(G, x_real, y, z, cfg, x_src, y_src, s, t, noise, generator)
    n = x_real.shape[0]
    with torch.no_grad():
        fake = _generate(G, b)  # (N, C, H, W), no graph: G gets no gradient from D steps
    real = b.real_t
    if cfg.augment_p > 0:
        real, fake = paired_augment(real, fake, cfg.augment_p, generator)
    w = st_weight(b.s, b.t, cfg.st_floor)  # (N,)
    m = gp_size(cfg.gp_fraction, n) if cfg.lambda_gp > 0 else 0
    if m:
        idx = gp_indices(n, m, device=real.device)  # (m,)
        real_p, _ = perturb(real[idx], cfg.gp_eps, generator)  # (m, C, H, W)
        fake_p, _ = perturb(fake[idx], cfg.gp_eps, generator)
    if cfg.fused_d:
        # One D call on the whole stack: one launch sequence, better utilisation than four.
        xs = [real, fake] + ([real_p, fake_p] if m else [])
        ys = [y, b.y_src] + ([y[idx], b.y_src[idx]] if m else [])
        ts = [b.t, b.t] + ([b.t[idx], b.t[idx]] if m else [])
        logits = D(torch.cat(xs), torch.cat(ys), torch.cat(ts))  # (2N + 2m,)
        d_real, d_fake = logits[:n], logits[n : 2 * n]
        if m:
            d_real_p, d_fake_p = logits[2 * n : 2 * n + m], logits[2 * n + m :]
    else:
        d_real = D(real, y, b.t)
        d_fake = D(fake, b.y_src, b.t)
        if m:
            d_real_p = D(real_p, y[idx], b.t[idx])
            d_fake_p = D(fake_p, b.y_src[idx], b.t[idx])
    adv = relativistic_loss(d_real, d_fake)
    if m:
        r1 = fd_penalty(d_real[idx], d_real_p, cfg.gp_eps, weight=w[idx])
        r2 = fd_penalty(d_fake[idx], d_fake_p, cfg.gp_eps, weight=w[idx])
    else:
        r1 = r2 = adv.new_zeros(())
    cp = logit_centering(d_real, d_fake)
    loss = adv + cfg.lambda_gp * (r1 + r2) + cfg.lambda_cp * cp
    metrics = {
        "d_loss": loss.detach(),
        "d_adv": adv.detach(),
        "r1": r1.detach(),
        "r2": r2.detach(),
        "cp": cp.detach(),
        "d_logit_real": d_real.detach().mean(),
        "d_logit_fake": d_fake.detach().mean(),
    }
    return loss, metrics


def _guidance_times(cfg: AFMConfig, t: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(t', mask) for guidance; mask is None when every sample is used."""
    lo, hi = cfg.cg_t_range
    if cfg.cg_t_mode == "uniform":
        gdev = generator.device if generator is not None else t.device
        u = draws.rand(t.shape, generator, device=gdev).to(device=t.device, dtype=t.dtype)
        return lo + (hi - lo) * u, None
    return t, (t >= lo) & (t <= hi)


def g_loss(
    G: nn.Module,
    D: nn.Module,
    gradnorm: GradNormalizer | None,
    x_real: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    cfg: AFMConfig,
    classifier: nn.Module | None = None,
    *,
    x_src: torch.Tensor | None = None,
    y_src: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    cg_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Generator loss adv + lambda_ot ot (+ lambda_cg cg) and its metrics.

    Shapes as in d_loss. adv = softplus(-(D(gradnorm(fake)) - D(real_t))) averaged, gradients only
    into the fake; ot = mean_i mean_dims (fake_i - x_s_i)^2 / w_i on the un-normalised fake; cg =
    CE of the frozen classifier on interp(fake, cg_noise, t') (needs `classifier` when lambda_cg > 0).
    Metric gn_scale is the GradNormalizer's divisor from its latest backward (the previous step).
    """
    if cfg.use_gradnorm and gradnorm is None:
        raise ValueError("g_loss: cfg.use_gradnorm is on but gradnorm is None; pass make_gradnorm(cfg) or set use_gradnorm=False")
    if cfg.lambda_cg > 0 and classifier is None:
        raise ValueError("g_loss: cfg.lambda_cg > 0 needs a classifier; pass classifier= or set lambda_cg=0")
    b = _prepare(G, x_real, y, z, cfg, x_src, y_src, s, t, noise, generator)
    fake = _generate(G, b)  # (N, C, H, W), with graph into G
    real, fake_adv = b.real_t, fake
    if cfg.augment_p > 0:
        real, fake_adv = paired_augment(real, fake_adv, cfg.augment_p, generator)
    # Normalise the gradient where D receives the fake (after the augmentation), as the official
    # G step does: erased pixels then carry no gradient and do not count in the norm.
    if cfg.use_gradnorm:
        fake_adv = gradnorm(fake_adv)
    with torch.no_grad():
        d_real = D(real, y, b.t)  # (N,), a constant for G
    with frozen(D if cfg.freeze_d_in_g else None):
        d_fake = D(fake_adv, b.y_src, b.t)  # (N,)
    adv = relativistic_loss(d_fake, d_real)
    ot = ot_loss(fake, b.x_s, st_weight(b.s, b.t, cfg.st_floor))
    loss = adv + cfg.lambda_ot * ot
    cg = adv.new_zeros(())
    if cfg.lambda_cg > 0:
        tp, mask = _guidance_times(cfg, b.t, generator)
        if mask is None:  # "uniform": the fake is re-noised to t' (paper, 1NFE)
            if cg_noise is None:
                cg_noise = draws.randn(fake.shape, generator, device=fake.device, dtype=fake.dtype)
        else:  # "target": G's output is a sample at t' = t already; it is fed as it is
            cg_noise = None
        with frozen(classifier if cfg.freeze_d_in_g else None):
            cg = guidance_loss(classifier, fake, b.y_src, tp, cg_noise, mask=mask)
        loss = loss + cfg.lambda_cg * cg
    metrics = {
        "g_loss": loss.detach(),
        "g_adv": adv.detach(),
        "ot": ot.detach(),
        "cg": cg.detach(),
        "g_logit_real": d_real.mean(),
        "g_logit_fake": d_fake.detach().mean(),
    }
    if gradnorm is not None:
        metrics["gn_scale"] = gradnorm.scale.detach().clone()
    return loss, metrics
