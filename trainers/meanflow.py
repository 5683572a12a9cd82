"""MeanFlow (Geng et al., arXiv 2505.13447): the loss on the average velocity and its time sampling.

MeanFlow trains a network u(z_t, r, t) on the AVERAGE velocity over [r, t] (r <= t), so that one step
z_r = z_t - (t - r) * u(z_t, r, t) moves along the flow; one step from noise is z_0 = z_1 - u(z_1, 0, 1).
Its identity u = v - (t - r) * du/dt, with the total derivative du/dt = v . d_z u + d_t u (the
Jacobian-vector product of u along (v, 0, 1) in (z, r, t)), gives the regression target, held with
stop-gradient: u_tgt = sg(v - (t - r) * du/dt), v = e - x.

Mapping onto this project. Flow time is the same (x_t = (1 - t) x + t z, t = 1 noise, t = 0 data;
MeanFlow's z_t = (1 - t) x + t e, v = e - x), so no time is flipped. The network is the "anystep"
generator (`build_generator(size, kind="anystep")`): `G.velocity(x, y, s, t)` embeds the SOURCE time s
(`t_embedder`) and the TARGET time t (`t_tgt_embedder`), and `G(x, y, s, t) = x - (s - t) * velocity`.
So MeanFlow's u(z_t, r, t) is `G.velocity(z_t, y, s=t_mf, t=r_mf)`: our s is MeanFlow's t (the noisier
time) and our t is MeanFlow's r. The JVP is then along (v, 1, 0) in (z, s, t). Sampling is the existing
any-step sampler `flow.generate(G, z, y, nfe=K)` (K = 1: z_0 = z_1 - u(z_1, 0, 1)), unchanged.

Which times are embedded. The official code embeds (t, t - r): the JAX ImageNet DiT sums
t_embedder(t) + h_embedder(t - r) (Gsunshine/meanflow models/models_dit.py:218-221, meanflow.py:226-227);
py-meanflow feeds its U-Net (t, t - r) (Gsunshine/py-meanflow meanflow/models/meanflow.py:47-49). We
embed (t, r) directly (s and t above), so the any-step generator, its sampler, checkpoints and registry
stay as they are; (t, r) and (t, t - r) carry the same information.

Defaults (the official ImageNet code, Gsunshine/meanflow configs/default.py; the CIFAR-10 py-meanflow
defaults, meanflow/train_arg_parser.py, differ and are quoted beside):
- time_mean = -0.4, time_std = 1.0: t and r each sigmoid(mean + std * N(0, 1)) (default.py:53-54,
  meanflow.py:138-150). py-meanflow: v1 sampler t ~ (-0.6, 1.6), r ~ (-4.0, 1.6) (train_arg_parser.py:57-62);
  its v0 "used in paper" sampler, the rule here, runs with (-2.0, 2.0) in scripts/cifar10_v0.sh.
- ratio_r_neq_t = 0.25: default.py:57 `data_proportion = 0.75` is the share with r = t.
  py-meanflow: ratio = 0.75 (train_arg_parser.py:55).
- power p = 1.0, eps c = 0.01: default.py:70-71. py-meanflow: 0.75 and 1e-3 (train_arg_parser.py:64-65).
- CFG off (cfg_omega = 1, cfg_kappa = 0, class_drop = 0): AFM and the comparison are guidance-free and a
  default generator has no null label. The official ImageNet setting is cfg_omega = 1.0, cfg_kappa = 0.5,
  class_drop = 0.1 (default.py:58, 62-63; effective scale omega / (1 - kappa) = 2), applied for all t
  (t_start 0, t_end 1, default.py:66-67; no interval option here).

The loss, as the official code (JAX meanflow.py:206-246, py-meanflow meanflow.py:36-68): per sample
the SUM over (C, H, W) of (u - u_tgt)^2, weighted by w = 1 / (that + c)^p with w held with stop-gradient
(adaptive weighting; p = 0 is the plain summed MSE), then the batch mean.

CFG (the paper's class-conditional setting; JAX meanflow.py:171-200): the velocity in the target (and
in the JVP tangent) becomes v~ = omega * v + kappa * u(z_t, t, t | y) + (1 - omega - kappa) *
u(z_t, t, t | null) (guidance is off exactly when omega = 1 and kappa = 0); the two u's are network
evaluations at r = t held without gradient (the official code stops the gradient of the whole target);
labels are dropped to the null label (index num_classes, `build_generator(..., null_label=True)`) with
probability class_drop, and dropped rows keep the plain v as their velocity.

Where this differs from the official code, and why:
- Which rows get r = t and which labels are dropped: the JAX code takes the FIRST int(0.75 * B) rows of
  each device batch for r = t and drops the first Binomial(B, 0.1) rows' labels (meanflow.py:152-155,
  194-198; so its dropped labels fall on r = t rows); py-meanflow draws r = t per row (time_sampler.py:
  35-37). Here both are independent per-row draws through `advflow.trainers.draws`, so a sample's
  numbers do not depend on the batch split over workers; the expected shares are the official ones.
- (t, r) embedded instead of (t, t - r): see above.
- One JVP call gives both u (with its gradient) and du/dt, as the official code: `torch.func.jvp` on the
  plain module keeps the ordinary autograd graph of its primal output (tests/test_meanflow.py checks the
  gradients against a plain forward), so no second forward is needed. Cost per step: one forward with
  tangents (several plain forwards' worth: about 7x on the CPU "tiny" model; unmeasured on GPUs)
  and one backward; CFG adds one no-grad forward (of 2N rows with kappa != 0); "imf" adds one more.
- Attention: SDPA's fused kernel has no forward-mode AD (torch 2.13 CPU raises NotImplementedError), so
  `models.Attention` computes softmax attention from primitives whenever its input carries a tangent
  (normal forwards are unchanged).
- Precision: the official code runs the JVP and loss in float32 with autocast off (py-meanflow
  meanflow.py:54); here everything runs in the network's dtype (bf16 under DeepSpeed's bf16 mode).

Variant "imf" (Improved MeanFlow, Geng, Lu et al., arXiv 2512.02012; official JAX code Lyy-iiis/imeanflow
imf.py:331-401). iMF's loss change is the JVP TANGENT: "we use predicted v in the jvp" (imf.py:372-373),
the network's own instantaneous velocity instead of the noisy (guided) conditional velocity e - x that
MeanFlow puts there (the target velocity v~ is unchanged). iMF writes the loss as a v-loss
||u + (t - r) sg(du/dt) - v~||^2 (imf.py:376, 385), which for a given tangent has the same value and the
same gradient as MeanFlow's ||u - sg(v~ - (t - r) du/dt)||^2; its adaptive weight is the same (p = 1,
c = 0.01, imf.py:71-72, 380-383). So variant "imf" here changes ONLY the tangent: it is
sg(u(z_t, t, t | y_in)), the network at r = t (MeanFlow's boundary u(z, t, t) = v(z, t)) with the labels
the loss uses (null for dropped rows; the official code takes its tangent with the original labels,
imf.py:358-363), computed in one extra no-grad forward. Not included (architecture
or training-recipe changes, not the loss): iMF's auxiliary v-head that supplies that tangent in the
official code and its own loss (imf.py:388-393), the guidance scale and CFG interval as network inputs
sampled per row (imf.py:141-179), in-context conditioning tokens, and its r = t share of 0.5
(imf.py:66; set ratio_r_neq_t = 0.5 to match).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from advflow.trainers import draws
from advflow.trainers.flow import _as_time, interp

MEANFLOW_VARIANTS = ("meanflow", "imf")

__all__ = ["MEANFLOW_VARIANTS", "MeanFlowConfig", "sample_times", "average_velocity_jvp", "meanflow_loss"]


def _real(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MeanFlowConfig:
    """MeanFlow's loss and time-sampling settings; the defaults are the official ImageNet code's (see the
    module docstring for each source), except that classifier-free guidance is off.

    time_mean, time_std: logit-normal of both times, sigmoid(time_mean + time_std * N(0, 1)).
    ratio_r_neq_t: share of samples with r != t (the rest train plain flow matching at r = t), in [0, 1].
    power: adaptive weight power p, w = 1 / (||u - u_tgt||^2 + eps)^p; 0 = the plain (summed) MSE.
    eps: adaptive weight constant c > 0.
    cfg_omega, cfg_kappa: the CFG mix of the target velocity, omega * v + kappa * u(.|y) +
        (1 - omega - kappa) * u(.|null); omega = 1 and kappa = 0 is no guidance. Effective scale
        omega / (1 - kappa). Official ImageNet: omega = 1.0, kappa = 0.5 with class_drop = 0.1.
    class_drop: probability of replacing a label with the null label (needs a generator built with
        null_label=True); guidance needs class_drop > 0 so that the null label's u is trained.
    variant: "meanflow" (tangent = the target velocity) or "imf" (tangent = the network's own u(z_t, t, t)).
    """

    time_mean: float = -0.4
    time_std: float = 1.0
    ratio_r_neq_t: float = 0.25
    power: float = 1.0
    eps: float = 0.01
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0
    class_drop: float = 0.0
    variant: str = "meanflow"

    def __post_init__(self):
        _real("time_mean", self.time_mean)
        if _real("time_std", self.time_std) <= 0:
            raise ValueError(f"time_std: must be > 0 for the logit-normal time distribution, got {self.time_std} "
                             "(official: 1.0)")
        if not 0.0 <= _real("ratio_r_neq_t", self.ratio_r_neq_t) <= 1.0:
            raise ValueError(f"ratio_r_neq_t: is a share of samples and must lie in [0, 1], got "
                             f"{self.ratio_r_neq_t} (official: 0.25; 0 = flow matching only)")
        if _real("power", self.power) < 0:
            raise ValueError(f"power: the adaptive weight power p must be >= 0 (0 = plain MSE), got {self.power} "
                             "(official: 1.0)")
        if _real("eps", self.eps) <= 0:
            raise ValueError(f"eps: the adaptive weight constant c must be > 0, got {self.eps} (official: 0.01)")
        _real("cfg_omega", self.cfg_omega)
        if not 0.0 <= _real("cfg_kappa", self.cfg_kappa) < 1.0:
            raise ValueError(f"cfg_kappa: must lie in [0, 1) (effective scale omega / (1 - kappa)), got "
                             f"{self.cfg_kappa}; use 0 for the plain CFG mix")
        if not 0.0 <= _real("class_drop", self.class_drop) <= 1.0:
            raise ValueError(f"class_drop: is a probability and must lie in [0, 1], got {self.class_drop} "
                             "(the paper uses 0.1 with CFG)")
        if self.variant not in MEANFLOW_VARIANTS:
            raise ValueError(f"variant: unknown MeanFlow variant {self.variant!r}; "
                             f"choose one of {list(MEANFLOW_VARIANTS)}")
        if self.guided and self.class_drop == 0:
            raise ValueError(
                f"cfg_omega/cfg_kappa: guidance (cfg_omega={self.cfg_omega}, cfg_kappa={self.cfg_kappa}) mixes in the "
                "null label's u, which only label dropping trains; set class_drop > 0 (the paper uses 0.1), or "
                "cfg_omega=1 and cfg_kappa=0 for no guidance"
            )

    @property
    def guided(self) -> bool:
        """Whether the target velocity is the CFG mix (omega != 1 or kappa != 0)."""
        return self.cfg_omega != 1.0 or self.cfg_kappa != 0.0

    @property
    def effective_cfg_scale(self) -> float:
        """The paper's omega' = omega / (1 - kappa), the guidance scale the trained 1-step model realises."""
        return self.cfg_omega / (1.0 - self.cfg_kappa)


def sample_times(
    n: int,
    cfg: MeanFlowConfig,
    generator: torch.Generator | draws.BatchSlice | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training times (s, t), each (n,) float32 with s >= t, in this project's convention (s = MeanFlow's
    t, the noisier time; t = MeanFlow's r).

    The paper's sampler (py-meanflow time_sampler.py:22-39, "v0: used in paper"; JAX meanflow.py:147-157):
    two independent logit-normal times, sorted so s >= t; then a row gets t := s (r = t, a flow-matching
    row) when its uniform draw is < 1 - ratio_r_neq_t. Draws, in order, through `draws` (per sample, see
    its module doc): the normals (2, n), then the uniforms (n,).
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1 (the number of samples), got {n}")
    gdev = generator.device if generator is not None else device
    e = draws.randn((2, n), generator, device=gdev, batch_dim=1).to(device)  # (2, n)
    times = torch.sigmoid(cfg.time_mean + cfg.time_std * e)  # (2, n), each logit-normal
    s, t = torch.maximum(times[0], times[1]), torch.minimum(times[0], times[1])
    same = draws.rand((n,), generator, device=gdev).to(device) < 1.0 - cfg.ratio_r_neq_t  # (n,) r = t rows
    return s, torch.where(same, s, t)


def average_velocity_jvp(
    G: nn.Module, zs: torch.Tensor, y: torch.Tensor, s: torch.Tensor, t: torch.Tensor, tangent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/ds): u = G.velocity(zs, y, s, t) (N, C, H, W) and its total derivative along (tangent, 1, 0)
    in (z, s, t), i.e. MeanFlow's du/dt along (v, 0, 1) in (z, r, t), from one torch.func.jvp call on the
    plain module. u keeps the ordinary autograd graph to G's parameters; du/ds is for a stop-gradient
    target (detach it)."""

    def u_of(z_in: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        return G.velocity(z_in, y, s_in, t)  # (N, C, H, W), MeanFlow's u(z, r, t) with r = our t

    return torch.func.jvp(u_of, (zs, s), (tangent, torch.ones_like(s)))


def meanflow_loss(
    G: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    cfg: MeanFlowConfig,
    generator: torch.Generator | draws.BatchSlice | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MeanFlow loss of an any-step generator: (scalar loss, {"mf_mse": detached mean of (u - u_tgt)^2}).

    x: (N, C, H, W) data, y: (N,) labels, z: noise like x, s >= t: (N,) times (MeanFlow's t and r, see
    `sample_times`). u = G.velocity(z_s, y, s, t) at z_s = (1 - s) x + s z; u_tgt = sg(v~ - (s - t) du/ds)
    with du/ds the JVP of (z, s) -> G.velocity(z, y, s, t) along (tangent, 1) (t held: its tangent is 0),
    computed together with u by one torch.func.jvp on the plain module G; the loss is the batch mean of
    w * sum_{C,H,W} (u - u_tgt)^2 with w = sg(1 / (sum + eps)^power). `generator` feeds the label drop
    (class_drop > 0), drawn after whatever the caller drew.
    """
    if getattr(G, "kind", None) != "anystep":
        raise ValueError(
            f"meanflow_loss: G.kind={getattr(G, 'kind', None)!r}; MeanFlow needs an 'anystep' generator (it embeds "
            "both times of u(z, r, t)); build it with build_generator(size, kind='anystep') and pass the plain "
            "module, not a DDP/DeepSpeed wrapper"
        )
    if x.shape != z.shape:
        raise ValueError(f"z: noise {tuple(z.shape)} must have the shape of the data x {tuple(x.shape)}")
    null_label = bool(getattr(G, "null_label", False))
    if cfg.guided and not null_label:
        raise ValueError(
            f"cfg_omega/cfg_kappa: guidance (cfg_omega={cfg.cfg_omega}, cfg_kappa={cfg.cfg_kappa}) needs the "
            "generator's null label; build it with build_generator(..., null_label=True), or set cfg_omega=1 and "
            "cfg_kappa=0"
        )
    if cfg.class_drop > 0 and not null_label:
        raise ValueError(
            f"class_drop: dropping labels (class_drop={cfg.class_drop}) needs the generator's null label; build it "
            "with build_generator(..., null_label=True), or set class_drop=0"
        )
    n = x.shape[0]
    zs = interp(x, z, s)  # (N, C, H, W), the point at MeanFlow's time t (our s)
    v = z - x  # (N, C, H, W), the conditional velocity
    y_in, drop = y, None
    if cfg.class_drop > 0:
        gdev = generator.device if generator is not None else x.device
        drop = draws.rand((n,), generator, device=gdev).to(x.device) < cfg.class_drop  # (N,)
        y_in = torch.where(drop, torch.full_like(y, G.num_classes), y)
    v_tgt = v
    if cfg.guided:
        null = torch.full_like(y, G.num_classes)
        with torch.no_grad():  # u at r = t (our t = s); the official code stops the whole target's gradient
            if cfg.cfg_kappa != 0:
                both = G.velocity(torch.cat([zs, zs]), torch.cat([y, null]), torch.cat([s, s]), torch.cat([s, s]))
                u_cond, u_null = both.chunk(2)  # (N, C, H, W) each
                v_tgt = cfg.cfg_omega * v + cfg.cfg_kappa * u_cond + (1.0 - cfg.cfg_omega - cfg.cfg_kappa) * u_null
            else:
                u_null = G.velocity(zs, null, s, s)  # (N, C, H, W)
                v_tgt = cfg.cfg_omega * v + (1.0 - cfg.cfg_omega) * u_null
        if drop is not None:
            v_tgt = torch.where(drop.view(-1, 1, 1, 1), v, v_tgt)  # dropped rows: the plain (unguided) velocity
    if cfg.variant == "imf":
        with torch.no_grad():
            tangent = G.velocity(zs, y_in, s, s)  # (N, C, H, W), the network's instantaneous velocity
    else:
        tangent = v_tgt

    u, du_ds = average_velocity_jvp(G, zs, y_in, s, t, tangent)  # u keeps its autograd graph
    u_tgt = (v_tgt - _as_time(s - t, v) * du_ds).detach()  # (N, C, H, W)
    delta = u - u_tgt
    per_sample = delta.pow(2).flatten(1).sum(1)  # (N,), summed over C, H, W as the official code
    weight = (per_sample.detach() + cfg.eps).pow(-cfg.power)  # (N,), stop-gradient adaptive weight
    loss = (weight * per_sample).mean()
    return loss, {"mf_mse": delta.detach().pow(2).mean()}
