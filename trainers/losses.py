"""AFM loss terms as pure functions (arXiv 2511.22475, section 3).

Every function returns an unweighted term: the lambdas (lambda_gp, lambda_cp, lambda_ot, lambda_cg)
are applied by the caller, so one schedule object owns every coefficient.

Conventions (shared across advflow):
  x, z, noise: (N, C, H, W) float; y: (N,) long; s, t: (N,) float in [0, 1].
  Flow time: x_t = (1 - t) * x + t * z, t = 1 noise, t = 0 data.
  Discriminator logits: (N,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advflow.trainers import draws
# flow.py owns the interpolation (one definition package-wide); re-exported here for loss callers.
from advflow.trainers.flow import interp

__all__ = [
    "interp",
    "st_weight",
    "relativistic_loss",
    "perturb",
    "fd_penalty",
    "logit_centering",
    "ot_loss",
    "classifier_loss",
    "guidance_loss",
]


def _check_logits(name: str, v: torch.Tensor) -> None:
    if v.dim() != 1:
        raise ValueError(f"{name} must be (N,) logits, got shape {tuple(v.shape)}; squeeze the head output")


def st_weight(s: torch.Tensor, t: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """w(s, t) = max(|s - t|, floor), shape (N,).

    The floor keeps 1 / w finite in the OT loss when s == t (any-step sampling can draw t ~ s).
    For 1NFE (s = 1, t = 0) w = 1.
    """
    if floor <= 0:
        raise ValueError(f"floor must be > 0 (got {floor}); it bounds 1 / w in ot_loss")
    return (s - t).abs().clamp_min(floor)


def relativistic_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing loss mean_i softplus(-(pos_i - neg_i)), a scalar.

    pos, neg: (N,) logits; pair i compares pos_i with neg_i.
    D step: relativistic_loss(d_real, d_fake); G step: relativistic_loss(d_fake, d_real).
    softplus(-d) == -log(sigmoid(d)), computed stably by F.softplus.
    """
    _check_logits("pos", pos)
    _check_logits("neg", neg)
    if pos.shape != neg.shape:
        raise ValueError(f"pos {tuple(pos.shape)} and neg {tuple(neg.shape)} must pair one-to-one")
    return F.softplus(-(pos - neg)).mean()


def perturb(
    x: torch.Tensor, eps: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + eps * n, n) with n ~ N(0, I) of x's shape, dtype and device.

    `generator` must live on x's device (torch.randn requirement).
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (got {eps}); the paper uses 0.01")
    n = draws.randn(x.shape, generator, dtype=x.dtype, device=x.device)
    return x + eps * n, n


def fd_penalty(
    logits: torch.Tensor,
    logits_perturbed: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Finite-difference R1/R2 penalty mean_i w_i * (lp_i - l_i)^2 / eps^2, a scalar.

    logits = D(x), logits_perturbed = D(x + eps * n) with n from `perturb`; both (N,).
    weight: (N,) w(s, t) per sample, or None for 1. Since D(x + eps n) - D(x) ~ eps <grad D, n>,
    E_n[...] -> ||grad_x D(x)||^2 as eps -> 0, without a double backward.
    Gradients flow through both logits (the penalty smooths D around x).
    """
    _check_logits("logits", logits)
    _check_logits("logits_perturbed", logits_perturbed)
    if logits.shape != logits_perturbed.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and logits_perturbed {tuple(logits_perturbed.shape)} differ; "
            "evaluate D on the same samples"
        )
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (got {eps})")
    sq = (logits_perturbed - logits).square() / (eps * eps)  # (N,)
    if weight is not None:
        if weight.shape != sq.shape:
            raise ValueError(f"weight must be ({sq.shape[0]},), got {tuple(weight.shape)}")
        sq = sq * weight.to(sq.dtype)
    return sq.mean()


def logit_centering(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean_i (r_i + f_i)^2, a scalar.

    The relativistic loss only sees differences, so the logits can drift together; this pins their
    mean near zero.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    if real_logits.shape != fake_logits.shape:
        raise ValueError("real_logits and fake_logits must have the same shape (N,)")
    return (real_logits + fake_logits).square().mean()


def ot_loss(out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Optimal-transport penalty mean_i [ mean_dims (out_i - inp_i)^2 / w_i ], a scalar.

    out = G(x_s) (N, ...), inp = x_s (N, ...), weight = st_weight(s, t) (N,).
    Dividing by w = |s - t| keeps the term comparable across step sizes (the displacement grows
    with the step). Gradients flow into both arguments as given (x_s normally carries none).
    """
    if out.shape != inp.shape:
        raise ValueError(f"out {tuple(out.shape)} and inp {tuple(inp.shape)} must match")
    if weight.dim() != 1 or weight.shape[0] != out.shape[0]:
        raise ValueError(f"weight must be ({out.shape[0]},), got {tuple(weight.shape)}; use st_weight(s, t)")
    per_sample = (out - inp).square().flatten(1).mean(dim=1)  # (N,)
    return (per_sample / weight.to(per_sample.dtype)).mean()


def classifier_loss(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of the time-conditioned classifier on flow-noised inputs; trains C.

    x: (N, C, H, W) clean latents, noise: same shape, t: (N,), y: (N,) long.
    x and noise are detached: this loss must update only C, never whatever produced x.
    """
    return classifier_loss_and_logits(classifier, x, y, t, noise)[0]


def classifier_loss_and_logits(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`classifier_loss` and the logits it was computed from ((N, num_classes); the training
    accuracy needs them). The noised input is cast to the classifier's parameter dtype (bf16 under
    DeepSpeed's bf16), and half-precision logits back to float32, so the loss is never computed in
    half precision."""
    xt = interp(x.detach(), noise.detach(), t)  # (N, C, H, W)
    logits = classifier(xt.to(next(classifier.parameters()).dtype), t)  # (N, K)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits, y), logits


def guidance_loss(
    classifier: torch.nn.Module,
    x_gen: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-guidance term mean_i m_i * CE(C(x_i, t_i), y_i), a scalar; gradients flow into x_gen.

    x_gen: (N, C, H, W) generator output, y: (N,) long (the class G was asked for), t: (N,) the
    classifier's time t'.
    noise: (N, C, H, W) to re-noise x_gen to t' first (x = interp(x_gen, noise, t'): 1NFE guidance,
           where G(z) is clean data), or None to feed x_gen as it is (multi-step guidance at t' = t,
           where G's output already is a sample at time t).
    mask:  (N,) bool, samples that get guidance; the others contribute 0 and the mean is still over
           all N (the official reduction), so lambda_cg means the same at any share of selected
           samples. None = all.

    The classifier's parameters DO receive gradients from this call if they require grad. The caller
    must keep C fixed during the G step: either `classifier.requires_grad_(False)` around the G step
    (cheapest: no param grads are computed) or keep C's params out of G's optimizer and zero C's
    grads before its own step.
    """
    x = x_gen if noise is None else interp(x_gen, noise.detach(), t)  # (N, C, H, W)
    ce = F.cross_entropy(classifier(x, t), y, reduction="none")  # (N,)
    if mask is not None:
        if mask.shape != ce.shape:
            raise ValueError(f"mask must be ({ce.shape[0]},) bool, got {tuple(mask.shape)}")
        ce = torch.where(mask, ce, torch.zeros_like(ce))
    return ce.mean()
