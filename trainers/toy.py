"""1D optimal-transport reproduction of the AFM paper's Fig. 1 claim (arXiv 2511.22475).

In 1D the W2-optimal map from N(0, 1) to a data law is known exactly: T(z) = F_data^-1(Phi(z)), the
monotone rearrangement. That makes the paper's claim measurable: an adversarial flow model (GAN loss
plus the OT penalty) should learn T from every seed, a plain GAN (lambda_ot = 0) some other map, and
flow matching with few Euler steps should misplace mass between the modes.

Contents: targets (the four-mode mixture and an empirical sample set, each with its exact quantile
function), the small MLPs, ToyConfig, `train` (AFM / GAN / FM) and `evaluate` (W1, OT-map error).
Writing metrics.json / map.npz / map.png is the job's part (jobs/toy.py).
Samples are (N, 1) float tensors so the shared loss functions (which flatten non-batch dims) apply
unchanged; flow time follows the shared convention x_t = (1 - t) x + t z, t = 1 noise, t = 0 data.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
from scipy.special import ndtr
from scipy.stats import wasserstein_distance
from tqdm.auto import tqdm

from advflow.trainers.losses import (
    fd_penalty,
    interp,
    logit_centering,
    ot_loss,
    perturb,
    relativistic_loss,
    st_weight,
)
from advflow.trainers.ema import EMA

__all__ = [
    "MixtureTarget",
    "EmpiricalTarget",
    "load_samples",
    "ot_map",
    "w1_distance",
    "ToyConfig",
    "make_target",
    "ToyGenerator",
    "ToyDiscriminator",
    "ToyVelocity",
    "train",
    "evaluate",
    "ToyResult",
    "map_difference",
]

METHODS = ("afm", "gan", "fm")
OT_SCHEDULES = ("constant", "cosine")


# ----------------------------------------------------------------------------------------------
# Targets: a sampler for training plus the exact quantile function that defines T.
# ----------------------------------------------------------------------------------------------


class MixtureTarget:
    """Equal-weight 1D Gaussian mixture (default: the paper's four modes, std 0.05)."""

    def __init__(self, modes: tuple[float, ...] = (-1.5, -0.5, 0.5, 1.5), std: float = 0.05):
        if len(modes) < 1 or std <= 0:
            raise ValueError(f"MixtureTarget needs >= 1 mode and std > 0 (got modes={modes}, std={std})")
        self.modes = np.asarray(modes, dtype=np.float64)  # (K,)
        self.std = float(std)
        self.name = "mixture"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n training samples, (n, 1) float32."""
        modes = torch.as_tensor(self.modes, dtype=torch.float32)
        idx = torch.randint(len(self.modes), (n,), generator=generator)
        return (modes[idx] + self.std * torch.randn(n, generator=generator)).unsqueeze(1)

    def reference(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n fresh data draws (n,) float64, the W1 reference."""
        idx = rng.integers(len(self.modes), size=n)
        return self.modes[idx] + self.std * rng.standard_normal(n)

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """Mixture CDF, elementwise on any shape."""
        x = np.asarray(x, dtype=np.float64)
        return ndtr((x[..., None] - self.modes) / self.std).mean(axis=-1)

    def quantile(self, u: np.ndarray, iters: int = 80) -> np.ndarray:
        """Inverse CDF by vectorised bisection (the CDF is strictly increasing, so it converges).

        The bracket spans 40 std beyond the outer modes; u so close to 0 or 1 that the root lies
        outside (|z| > ~8 in float64) is clipped to the bracket edge. 80 halvings of a width-~5
        bracket reach float64 resolution.
        """
        u = np.asarray(u, dtype=np.float64)
        lo = np.full(u.shape, self.modes.min() - 40 * self.std)
        hi = np.full(u.shape, self.modes.max() + 40 * self.std)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid) < u
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def between_modes(self, x: np.ndarray, k_std: float = 4.0) -> float:
        """Fraction of x farther than k_std * std from every mode (the data itself has ~6e-5 at 4)."""
        x = np.asarray(x, dtype=np.float64)
        dist = np.abs(x[:, None] - self.modes).min(axis=1)  # (N,)
        return float((dist > k_std * self.std).mean())


class EmpiricalTarget:
    """A fixed 1D sample set: training draws with replacement; T uses its empirical quantile."""

    def __init__(self, samples: np.ndarray, name: str = "data"):
        self.samples = np.sort(np.asarray(samples, dtype=np.float64))  # (M,)
        self._torch = torch.as_tensor(self.samples, dtype=torch.float32)
        self.name = name

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self.samples), (n,), generator=generator)
        return self._torch[idx].unsqueeze(1)  # (n, 1)

    def reference(self, n: int, rng: np.random.Generator) -> np.ndarray:
        # The sample set IS the target law; comparing against all of it is exact, not an estimate.
        del n, rng
        return self.samples

    def quantile(self, u: np.ndarray) -> np.ndarray:
        """Left-continuous inverse of the empirical CDF: the ceil(u M)-th smallest sample."""
        u = np.asarray(u, dtype=np.float64)
        m = len(self.samples)
        idx = np.clip(np.ceil(u * m).astype(np.int64) - 1, 0, m - 1)
        return self.samples[idx]

    def between_modes(self, x: np.ndarray, k_std: float = 4.0) -> float | None:
        del x, k_std
        return None  # modes are unknown for an arbitrary sample set


def load_samples(path: str) -> np.ndarray:
    """Load a 1D sample set from a .npy file: a finite float array of shape (N,), N >= 2."""
    fix = "save a float array of shape (N,) with numpy.save(path, samples.astype('float32').ravel())"
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"--data {path}: file not found; pass the path of a .npy file") from None
    except Exception as exc:  # not a .npy (or an object array, refused without pickle)
        raise ValueError(f"--data {path}: cannot read as a .npy array ({exc}); {fix}") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"--data {path}: holds {type(arr).__name__}, not a single array; {fix}")
    desc = f"shape {arr.shape}, dtype {arr.dtype}"
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"--data {path}: {desc}; a float array is required; {fix}")
    if arr.ndim != 1:
        raise ValueError(f"--data {path}: {desc}; a 1D array of shape (N,) is required; {fix}")
    if arr.shape[0] < 2:
        raise ValueError(f"--data {path}: {desc}; at least 2 samples are required; {fix}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"--data {path}: {desc} has {bad} NaN/inf values; drop them before saving")
    return arr.astype(np.float64)


def ot_map(target, z: np.ndarray) -> np.ndarray:
    """Exact monotone (W2-optimal) map from N(0, 1) to the target: T(z) = F^-1(Phi(z))."""
    return target.quantile(ndtr(np.asarray(z, dtype=np.float64)))


def w1_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between two 1D sample sets (scipy: integral of |F_a - F_b|)."""
    return float(wasserstein_distance(np.asarray(a, np.float64), np.asarray(b, np.float64)))


# ----------------------------------------------------------------------------------------------
# Networks. Every scalar input goes through a sinusoidal encoding (as in the paper's toy) so a
# small MLP can represent the near-discontinuous staircase map of a narrow-mode mixture.
# ----------------------------------------------------------------------------------------------


class SinusoidalEncoding(nn.Module):
    """x (N, 1) -> [x, sin(f_k x), cos(f_k x)] (N, 1 + 2F) with f_k = base * 2^k."""

    def __init__(self, n_freqs: int, base: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", base * 2.0 ** torch.arange(n_freqs, dtype=torch.float32))
        self.dim = 1 + 2 * n_freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x * self.freqs  # (N, F)
        return torch.cat([x, arg.sin(), arg.cos()], dim=1)


class _MLP(nn.Module):
    """Encodes each (N, 1) input, concatenates, then `depth` hidden SiLU layers -> (N, out)."""

    def __init__(self, n_inputs: int, width: int, depth: int, n_freqs: int, out: int = 1):
        super().__init__()
        self.enc = SinusoidalEncoding(n_freqs)
        layers: list[nn.Module] = []
        d = n_inputs * self.enc.dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        layers.append(nn.Linear(d, out))
        self.net = nn.Sequential(*layers)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([self.enc(v) for v in inputs], dim=1))


class ToyGenerator(nn.Module):
    """1D generator with the shared interface (minus the class label).

    nfe == 1 ("1nfe"): G(z) predicts the data sample directly, no time input.
    nfe == K > 1 ("multistep"): G(x_s, s, t) = x_s - (s - t) * g(x_s, s), g conditioned on s only.
    """

    def __init__(self, nfe: int = 1, width: int = 256, depth: int = 3, n_freqs: int = 6):
        super().__init__()
        self.nfe = nfe
        self.kind = "1nfe" if nfe == 1 else "multistep"
        self.net = _MLP(1 if nfe == 1 else 2, width, depth, n_freqs)

    def velocity(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x (N, 1), s (N,) -> g (N, 1)."""
        return self.net(x, s.unsqueeze(1))

    def forward(self, x: torch.Tensor, s: torch.Tensor | None = None, t: torch.Tensor | None = None):
        if self.kind == "1nfe":
            return self.net(x)  # (N, 1)
        if s is None or t is None:
            raise ValueError("a multistep ToyGenerator needs s and t")
        return x - (s - t).unsqueeze(1) * self.velocity(x, s)

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Map noise z (N, 1) to data: one call, or K equal steps from s = 1 down to 0."""
        if self.kind == "1nfe":
            return self(z)
        x = z
        for k in range(self.nfe, 0, -1):
            s = torch.full((z.shape[0],), k / self.nfe)
            x = self(x, s, s - 1.0 / self.nfe)
        return x


class ToyDiscriminator(nn.Module):
    """D(x) -> logits (N,); with time_cond it also sees the flow time t (multistep AFM)."""

    def __init__(self, time_cond: bool = False, width: int = 256, depth: int = 3, n_freqs: int = 6):
        super().__init__()
        self.time_cond = time_cond
        self.net = _MLP(2 if time_cond else 1, width, depth, n_freqs)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self.time_cond:
            return self.net(x, t.unsqueeze(1)).squeeze(1)
        return self.net(x).squeeze(1)


class ToyVelocity(nn.Module):
    """Flow-matching velocity v(x_t, t) (N, 1), trained against z - x."""

    def __init__(self, width: int = 256, depth: int = 3, n_freqs: int = 6):
        super().__init__()
        self.net = _MLP(2, width, depth, n_freqs)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t.unsqueeze(1))

    @torch.no_grad()
    def sample(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        """Euler from t = 1 to 0 in `steps` equal steps: x <- x - (1/steps) v(x, t)."""
        x = z
        for k in range(steps, 0, -1):
            t = torch.full((z.shape[0],), k / steps)
            x = x - (1.0 / steps) * self(x, t)
        return x


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class ToyConfig:
    """Settings for one toy run. Defaults are the acceptance defaults (see jobs/toy.py).

    The paper's toy uses lr 1e-4, batch 1024, constant lambda_ot 0.05. On a 2-core CPU budget
    lr 1e-3 with batch 512 reaches the same map from every seed tried (AFM seeds 0/1: ot_map_mae
    0.082/0.074 at 5000 steps, 0.071/0.068 at 8000), and a cosine decay of lambda_ot 0.05 -> 0.005
    (the paper's ImageNet recipe) beat a constant 0.05 (seed 0, 8000 steps: w1 0.054 vs 0.065).
    5000 steps keep a run near 2.5 min on an idle 2-core machine (--threads 2). Batch 256 is ~40%
    cheaper per step but not robust: seed 1 ended with a spurious mode between -0.5 and 0.5.
    """

    method: str = "afm"
    """afm (adversarial + OT), gan (adversarial only, lambda_ot = 0) or fm (flow matching)."""
    nfe: int = 1
    """AFM: K generator steps (1 = one-step x-prediction). FM: Euler steps used to sample."""
    steps: int = 5000
    """Training iterations (AFM/GAN: one D step and one G step each; FM: one velocity step)."""
    batch: int = 512
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.9)
    width: int = 256
    depth: int = 3
    """Hidden layers per MLP."""
    n_freqs: int = 6
    """Sinusoidal frequencies 2^0 .. 2^(n_freqs - 1) per scalar input."""
    ot_scale: float | None = None
    """lambda_ot at step 0; None -> 0.05 for afm, 0 for gan (gan is exactly afm with 0)."""
    ot_end: float = 0.005
    """lambda_ot at the last step when ot_schedule == "cosine"."""
    ot_schedule: str = "cosine"
    lambda_gp: float = 0.01
    gp_fraction: float = 0.25
    """Share of the batch that gets the finite-difference R1/R2 penalty."""
    gp_eps: float = 0.01
    lambda_cp: float = 0.01
    ema: float = 0.99
    seed: int = 0
    data: str | None = None
    """Path to a .npy (N,) float sample set; None -> the four-mode mixture."""
    eval_samples: int = 20000
    map_samples: int = 10000
    log_every: int = 100
    extra: dict = field(default_factory=dict)
    """Free-form notes copied into metrics.json (e.g. the command line)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.ot_scale is None:
            self.ot_scale = 0.05 if self.method == "afm" else 0.0
        if self.method == "gan" and self.ot_scale != 0:
            raise ValueError(
                f"ot_scale must be 0 for method 'gan' (got {self.ot_scale}); gan is afm without the "
                "OT term, so use --method afm to set --ot-scale"
            )
        checks = [
            ("nfe", self.nfe >= 1, "use 1 (one-step) or a K > 1"),
            ("steps", self.steps >= 1, "use >= 1"),
            ("batch", self.batch >= 4, "use >= 4"),
            ("lr", self.lr > 0, "use a positive learning rate"),
            ("width", self.width >= 1, "use >= 1"),
            ("depth", self.depth >= 1, "use >= 1"),
            ("n_freqs", self.n_freqs >= 0, "use >= 0"),
            ("ot_scale", self.ot_scale >= 0, "use >= 0"),
            ("ot_end", self.ot_end >= 0, "use >= 0"),
            ("ot_schedule", self.ot_schedule in OT_SCHEDULES, f"use one of {OT_SCHEDULES}"),
            ("lambda_gp", self.lambda_gp >= 0, "use >= 0"),
            ("gp_fraction", 0 < self.gp_fraction <= 1, "use a value in (0, 1]"),
            ("gp_eps", self.gp_eps > 0, "use > 0 (paper: 0.01)"),
            ("lambda_cp", self.lambda_cp >= 0, "use >= 0"),
            ("ema", 0 <= self.ema < 1, "use a decay in [0, 1)"),
            ("eval_samples", self.eval_samples >= 100, "use >= 100 (acceptance: 20000)"),
            ("map_samples", self.map_samples >= 100, "use >= 100 (acceptance: >= 10000)"),
            ("log_every", self.log_every >= 1, "use >= 1"),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise ValueError(f"ToyConfig.{name} = {getattr(self, name)!r} is invalid; {fix}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"ToyConfig.betas = {self.betas!r} is invalid; use two values in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)

    def lambda_ot(self, step: int) -> float:
        """OT weight at `step` (0-based): constant, or cosine from ot_scale to ot_end over `steps`."""
        if self.ot_schedule == "constant" or self.ot_scale == 0:
            return float(self.ot_scale)
        frac = step / max(self.steps - 1, 1)
        return self.ot_end + 0.5 * (self.ot_scale - self.ot_end) * (1 + math.cos(math.pi * frac))


def make_target(cfg: ToyConfig):
    """The mixture, or the sample set in cfg.data (ValueError naming the file if it is unusable)."""
    if cfg.data is None:
        return MixtureTarget()
    return EmpiricalTarget(load_samples(cfg.data), name=str(cfg.data))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class ToyResult:
    config: ToyConfig
    target: object
    model: nn.Module
    """EMA generator (afm/gan) or EMA velocity network (fm), in eval mode."""
    history: list[dict]
    train_seconds: float

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Noise (N, 1) -> samples (N, 1): K-step generator, or FM's Euler sampler with nfe steps."""
        if self.config.method == "fm":
            return self.model.sample(z, self.config.nfe)
        return self.model.sample(z)


def _afm_times(n: int, nfe: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1NFE: s = 1, t = 0. K steps: s uniform on {1, ..., 1/K}, t = s - 1/K. Both (n,)."""
    if nfe == 1:
        return torch.ones(n), torch.zeros(n)
    s = torch.randint(1, nfe + 1, (n,), generator=gen).float() / nfe
    return s, s - 1.0 / nfe


def _afm_batch(target, cfg: ToyConfig, gen: torch.Generator):
    """Real samples at time t and generator sources x_s, from independent data draws.

    Returns real_t (N, 1), x_s (N, 1), s (N,), t (N,). For 1NFE real_t is data and x_s = z.
    """
    n = cfg.batch
    s, t = _afm_times(n, cfg.nfe, gen)
    real = interp(target.sample(n, gen), torch.randn(n, 1, generator=gen), t)
    x_s = interp(target.sample(n, gen), torch.randn(n, 1, generator=gen), s)
    return real, x_s, s, t


def _d_step(G, D, target, cfg, gen) -> dict:
    real, x_s, s, t = _afm_batch(target, cfg, gen)
    with torch.no_grad():
        fake = G(x_s, s, t)  # (N, 1); D steps never train G
    m = max(1, int(round(cfg.gp_fraction * cfg.batch)))
    real_p, _ = perturb(real[:m], cfg.gp_eps, generator=gen)
    fake_p, _ = perturb(fake[:m], cfg.gp_eps, generator=gen)
    tt = torch.cat([t, t, t[:m], t[:m]])
    # One D call on [real, fake, real+eps n, fake+eps n]: D has no batch coupling, so this equals
    # four separate calls and is cheaper.
    logits = D(torch.cat([real, fake, real_p, fake_p]), tt)
    n = cfg.batch
    d_real, d_fake = logits[:n], logits[n : 2 * n]
    d_real_p, d_fake_p = logits[2 * n : 2 * n + m], logits[2 * n + m :]
    w = st_weight(s[:m], t[:m])
    adv = relativistic_loss(d_real, d_fake)
    r1 = fd_penalty(d_real[:m], d_real_p, cfg.gp_eps, weight=w)
    r2 = fd_penalty(d_fake[:m], d_fake_p, cfg.gp_eps, weight=w)
    cp = logit_centering(d_real, d_fake)
    loss = adv + cfg.lambda_gp * (r1 + r2) + cfg.lambda_cp * cp
    loss.backward()
    return {"d_adv": adv.item(), "r1": r1.item(), "r2": r2.item(), "cp": cp.item()}


def _g_step(G, D, target, cfg, gen, lam_ot: float) -> dict:
    real, x_s, s, t = _afm_batch(target, cfg, gen)
    fake = G(x_s, s, t)  # (N, 1)
    logits = D(torch.cat([real, fake]), torch.cat([t, t]))
    d_real, d_fake = logits[: cfg.batch].detach(), logits[cfg.batch :]
    adv = relativistic_loss(d_fake, d_real)
    ot = ot_loss(fake, x_s, st_weight(s, t))
    (adv + lam_ot * ot).backward()
    return {"g_adv": adv.item(), "ot": ot.item()}


def _fm_step(V, target, cfg, gen) -> dict:
    x = target.sample(cfg.batch, gen)
    z = torch.randn(cfg.batch, 1, generator=gen)
    t = torch.rand(cfg.batch, generator=gen)  # uniform t: the plain rectified-flow objective
    loss = (V(interp(x, z, t), t) - (z - x)).square().mean()
    loss.backward()
    return {"fm": loss.item()}


def train(cfg: ToyConfig, progress: bool = True, target=None) -> ToyResult:
    """Train one toy model on CPU and return its EMA network (target: default make_target(cfg))."""
    target = make_target(cfg) if target is None else target
    torch.manual_seed(cfg.seed)  # network init
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # data, noise and times
    arch = dict(width=cfg.width, depth=cfg.depth, n_freqs=cfg.n_freqs)
    history: list[dict] = []
    bar = tqdm(range(cfg.steps), desc=f"toy {cfg.method} nfe={cfg.nfe}", disable=not progress)
    start = time.perf_counter()

    if cfg.method == "fm":
        net = ToyVelocity(**arch)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas)
        ema = EMA(net, cfg.ema)
        for step in bar:
            opt.zero_grad(set_to_none=True)
            stats = _fm_step(net, target, cfg, gen)
            opt.step()
            ema.update(net)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                history.append({"step": step, **stats})
                bar.set_postfix(stats, refresh=False)
    else:
        net = ToyGenerator(nfe=cfg.nfe, **arch)
        D = ToyDiscriminator(time_cond=cfg.nfe > 1, **arch)
        opt_g = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas)
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
        ema = EMA(net, cfg.ema)
        for step in bar:
            lam_ot = cfg.lambda_ot(step)
            # D step: G's params are frozen so no G grads are built.
            net.requires_grad_(False)
            D.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            stats = _d_step(net, D, target, cfg, gen)
            opt_d.step()
            # G step on a fresh batch: D is frozen, gradients reach G through D's input only.
            net.requires_grad_(True)
            D.requires_grad_(False)
            opt_g.zero_grad(set_to_none=True)
            stats |= _g_step(net, D, target, cfg, gen, lam_ot)
            opt_g.step()
            ema.update(net)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                stats["lambda_ot"] = lam_ot
                history.append({"step": step, **stats})
                bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()}, refresh=False)
    bar.close()
    model = copy.deepcopy(net).requires_grad_(False)
    ema.copy_to(model)
    return ToyResult(cfg, target, model.eval(), history, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(result: ToyResult, seed: int = 12345) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics plus the map arrays (z, gz), each (map_samples,).

    The eval seed is fixed and independent of the training seed, so runs with different training
    seeds are scored on the SAME z (their maps can be compared pointwise).
    """
    cfg = result.config
    rng = np.random.default_rng(seed)
    z_map = rng.standard_normal(cfg.map_samples)
    z_w1 = rng.standard_normal(cfg.eval_samples)
    gz = _generate_np(result, z_map)
    samples = _generate_np(result, z_w1)
    ref = result.target.reference(cfg.eval_samples, rng)
    metrics = {
        "w1": w1_distance(samples, ref),
        "ot_map_mae": float(np.abs(gz - ot_map(result.target, z_map)).mean()),
        "between_modes_frac": result.target.between_modes(samples),
        "data_between_modes_frac": result.target.between_modes(ref),
        "between_modes_def": "share of samples farther than 4 std from every mixture mode",
        "train_seconds": result.train_seconds,
        "eval_samples": cfg.eval_samples,
        "map_samples": cfg.map_samples,
        "target": result.target.name,
        "final": result.history[-1] if result.history else {},
        "settings": asdict(cfg),
    }
    return metrics, z_map, gz


def _generate_np(result: ToyResult, z: np.ndarray) -> np.ndarray:
    zt = torch.as_tensor(z, dtype=torch.float32).unsqueeze(1)  # (N, 1)
    return result.generate(zt).squeeze(1).double().numpy()


def map_difference(npz_a: str, npz_b: str) -> float:
    """mean |gz_a - gz_b| of two runs' map.npz files, which must share the same z draws."""
    with np.load(npz_a) as a, np.load(npz_b) as b:
        if a["z"].shape != b["z"].shape or not np.array_equal(a["z"], b["z"]):
            raise ValueError(
                f"{npz_a} and {npz_b} hold different z draws; rerun both with the same --map-samples"
            )
        return float(np.abs(a["gz"] - b["gz"]).mean())
