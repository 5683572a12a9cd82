"""DiT generator, discriminator and classifier for Adversarial Flow Models (arXiv 2511.22475).

One transformer family (DiT with adaLN-Zero, Peebles & Xie 2023) in three roles:

- Generator (`build_generator`): kind "1nfe" (x-prediction, no timestep embedding), "multistep"
  (fixed K steps, embeds the source time s) or "anystep" (embeds s and the target time t).
  Optional depth repetition (R > 1, 1NFE only): the same blocks run R times.
- Discriminator (`build_discriminator`): DiT trunk with a learnable [CLS] token; one logit per sample.
- Classifier (`build_classifier`): time-conditioned DiT with a [CLS] head, no label input; used for
  classifier guidance on flow-noised latents.

Module and parameter names mirror the original DiT state-dict layout (x_embedder.proj,
t_embedder.mlp.0/.2, y_embedder.embedding_table, blocks.N.attn.qkv, ..., final_layer.linear, pos_embed;
D: dis_embed and final_layer.1; anystep: t_tgt_embedder; classifier: cls_embed) so the released AFM
checkpoints load by name (see advflow.trainers.dit_checkpoint).

Fresh weights follow the official code: DiT's initialize_weights(), then PyTorch's default init for
the modules the official models add after it (see `_DiTTrunk.init_weights`). Sampling steps nfe
default to 1 ("1nfe") and 8 ("anystep"); a "multistep" generator needs nfe=K.

Conventions: images/latents (N, C, H, W); labels y (N,) long; flow times s, t (N,) float in [0, 1]
with t = 1 noise and t = 0 data. Timesteps are embedded as sinusoids of 1000 * t (DiT scaling).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from advflow.trainers.sizes import SIZES, DiTSize

__all__ = [
    "DiTSize",
    "SIZES",
    "GeneratorOptions",
    "DiscriminatorOptions",
    "ClassifierOptions",
    "Generator",
    "Discriminator",
    "Classifier",
    "build_generator",
    "build_discriminator",
    "build_classifier",
    "parameter_count",
    "timestep_features",
    "sincos_pos_embed_2d",
]

KINDS = ("1nfe", "multistep", "anystep")
ANYSTEP_DEFAULT_NFE = 8  # the official inference samples any-step generators with 8 steps
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the embedder MLP (DiT value)
LN_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------
# Size table
# ----------------------------------------------------------------------------------------------------


# DiTSize and SIZES live in the torch-free `advflow.trainers.sizes` (the run config reads them);
# re-exported here unchanged.


def _size(name: str) -> DiTSize:
    if not isinstance(name, str) or name not in SIZES:
        raise ValueError(f"name: unknown model size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


# ----------------------------------------------------------------------------------------------------
# Options (typed, validated; `.config` of every model is `dataclasses.asdict(options)`, less a
# generator's null_label when it is False and its time_scale when it is DiT's 1000)
# ----------------------------------------------------------------------------------------------------


def _check_int(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {value}")


def _check_common(opts) -> DiTSize:
    size = _size(opts.name)
    _check_int("in_channels", opts.in_channels, 1)
    _check_int("input_size", opts.input_size, 1)
    _check_int("num_classes", opts.num_classes, 1)
    if opts.input_size % size.patch != 0:
        raise ValueError(
            f"input_size: {opts.input_size} is not divisible by the patch size {size.patch} of "
            f"{opts.name!r}; use a multiple of {size.patch}"
        )
    return size


@dataclass(frozen=True)
class GeneratorOptions:
    """Options of `build_generator` (defaults: ImageNet-256 SD-VAE latents, 4x32x32, 1000 classes).

    name: size key of SIZES, e.g. "XL/2".
    in_channels, input_size: latent channels C and side H = W; output has the same shape.
    num_classes: rows of the class-embedding table (labels y in [0, num_classes)).
    kind: "1nfe" (G(z, y) predicts data), "multistep" (fixed K steps; velocity embeds s) or
        "anystep" (velocity embeds s and t).
    nfe: K, the number of network evaluations used to sample. Default (None): 1 for "1nfe", 8 for
        "anystep" (the official inference uses 8 steps; `generate(..., nfe=...)` may pick another
        count); "multistep" has no default, its K is part of the model (pass nfe=K). The resolved
        value is stored, so `.config` always holds an int and `build_generator(**G.config)` rebuilds.
    repeats: R, depth repetition: the same blocks run R times (1NFE only; R > 1 adds a timestep
        embedder for the per-pass times 1 - i/R). The trainer scales G's learning rate by 1/R.
    time_scale: the time embedder's sinusoids are of time_scale * t; 1000 (DiT's) for every network trained
        here, 1 for a generator imported from SiT/CAFM (which embed t itself). Recorded in `.config` only
        when it is not 1000.
    null_label: give the class table one extra row, index num_classes, the "no class" label that
        classifier-free guidance trains by dropping labels (MeanFlow's CFG; DiT's `use_cfg_embedding`).
        y may then also be num_classes. Off by default: AFM uses no CFG, and the table (and so the state
        dict) of a generator without it keeps exactly num_classes rows.
    """

    name: str
    in_channels: int = 4
    input_size: int = 32
    num_classes: int = 1000
    kind: str = "1nfe"
    nfe: int | None = None
    repeats: int = 1
    null_label: bool = False
    time_scale: float = 1000.0

    def __post_init__(self):
        _check_common(self)
        if isinstance(self.time_scale, bool) or not isinstance(self.time_scale, (int, float)) or not self.time_scale > 0:
            raise ValueError(f"time_scale: expected a positive number, got {self.time_scale!r}")
        object.__setattr__(self, "time_scale", float(self.time_scale))
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown generator kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.nfe is None:
            if self.kind == "multistep":
                raise ValueError(
                    "nfe: a 'multistep' generator is trained for a fixed number of steps K and has no default; "
                    "pass nfe=K (e.g. nfe=2 or nfe=4)"
                )
            object.__setattr__(self, "nfe", 1 if self.kind == "1nfe" else ANYSTEP_DEFAULT_NFE)
        _check_int("nfe", self.nfe, 1)
        _check_int("repeats", self.repeats, 1)
        if not isinstance(self.null_label, bool):
            raise ValueError(f"null_label: expected True or False, got {self.null_label!r}")
        if self.kind == "1nfe" and self.nfe != 1:
            raise ValueError(
                f"nfe: a '1nfe' generator takes exactly one step (got nfe={self.nfe}); "
                "use kind='multistep' for K > 1 steps"
            )
        if self.repeats > 1 and self.kind != "1nfe":
            # The paper's deep (weight-tied) generators are 1NFE only; a per-pass time would collide
            # with the s/t embeddings of the step-conditioned kinds.
            raise ValueError(
                f"repeats: depth repetition (repeats={self.repeats}) is only supported for kind='1nfe' "
                f"(got kind={self.kind!r}); use repeats=1 or kind='1nfe'"
            )


@dataclass(frozen=True)
class DiscriminatorOptions:
    """Options of `build_discriminator`.

    name, in_channels, input_size, num_classes: as for the generator.
    time_cond: condition D on the flow time t of its input (multi-step AFM); a 1NFE D sees only data
        (t = 0) and has no timestep embedder.
    """

    name: str
    in_channels: int = 4
    input_size: int = 32
    num_classes: int = 1000
    time_cond: bool = False

    def __post_init__(self):
        _check_common(self)
        if not isinstance(self.time_cond, bool):
            raise ValueError(f"time_cond: expected True or False, got {self.time_cond!r}")


@dataclass(frozen=True)
class ClassifierOptions:
    """Options of `build_classifier`: a time-conditioned DiT predicting num_classes logits from x_t."""

    name: str
    in_channels: int = 4
    input_size: int = 32
    num_classes: int = 1000

    def __post_init__(self):
        _check_common(self)


def _make_options(cls, role: str, name: str, options: dict):
    valid = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{role} options: unknown option(s) {unknown}; valid options are {valid}")
    return cls(name=name, **options)


# ----------------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------------


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of scalar times, (N,) -> (N, dim) float32 (float64 for float64 t), [cos | sin].

    The caller passes the already-scaled time (1000 * flow time). Frequencies decay geometrically from
    1 to 1/max_period; the [cos | sin] order matches DiT so released embedder weights apply. float64
    times give float64 features (float32 would round 1000 * t to ~1e-4 and blur the time derivatives
    that float64 checks, e.g. MeanFlow's finite-difference tests, measure); every other dtype is
    computed in float32 as before.
    """
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]  # (N, half)
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd widths: pad so the output is exactly `dim` wide
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats


def _sincos_1d(width: int, pos: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, width) as [sin | cos] with frequencies 1 / 10000^(k / (width/2))."""
    half = width // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    args = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2D position table for a grid x grid token map, (grid * grid, width) float32.

    Tokens are row-major (index = row * grid + col). The first half of the channels encodes the column,
    the second half the row (DiT's layout). width must be divisible by 4.
    """
    if width % 4:
        raise ValueError(f"width: 2D sin-cos position embedding needs width divisible by 4, got {width}")
    coords = torch.arange(grid, dtype=torch.float64)
    rows = coords.repeat_interleave(grid)  # (T,) row index of each token
    cols = coords.repeat(grid)  # (T,) column index of each token
    return torch.cat([_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)], dim=1).float()


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (N, T, D), shift/scale (N, D) -> x * (1 + scale) + shift per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H / p) * (W / p), row-major over the patch grid."""

    def __init__(self, in_channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Flow time t (N,) in [0, 1] -> (N, D): sinusoids of scale * t, then Linear-SiLU-Linear. The scale is
    1000 (DiT's) for every network trained here; SiT embeds t itself (scale 1), which an imported SiT/CAFM
    generator keeps (`GeneratorOptions.time_scale`, trainers/dit_checkpoint.py)."""

    def __init__(self, width: int, scale: float = 1000.0):
        super().__init__()
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # 1000 * t keeps the frequency range DiT was designed for (its timesteps run 0..999).
        feats = timestep_features(self.scale * t)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) long -> (N, D) from a learned table of `rows` rows: num_classes, plus one
    null (CFG) row at index num_classes for a generator built with null_label=True (AFM uses no CFG)."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def _has_forward_tangent(x: torch.Tensor) -> bool:
    """Whether x carries a forward-mode tangent (inside torch.func.jvp or a forward_ad.dual_level)."""
    return fwAD._current_level >= 0 and fwAD.unpack_dual(x).tangent is not None


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v from differentiable primitives; (N, heads, T, d) each -> (N, heads, T, d).

    Scores and softmax run in at least float32, so a bf16 network keeps a float32 softmax here.
    """
    work = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(work) @ k.to(work).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (N, heads, T, T)
    return (torch.softmax(scores, dim=-1) @ v.to(work)).to(q.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over (N, T, D) tokens using fused scaled-dot-product attention.

    Forward-mode AD (MeanFlow's Jacobian-vector product, torch.func.jvp) is not implemented for the
    fused kernel SDPA picks (torch 2.13 on CPU raises NotImplementedError for
    _scaled_dot_product_flash_attention_for_cpu), so when the input carries a tangent the same attention
    is computed from matmul and softmax instead, whose tangents autograd knows, on every device (so no
    fused kernel's forward-AD support is relied on). The ordinary forward (no tangent) always takes the
    fused kernel, so its numerics are unchanged.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads: width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, width = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, T, head_dim)
        if _has_forward_tangent(q):
            out = _math_attention(q, k, v)  # (N, heads, T, head_dim), forward-AD capable
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, head_dim)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, width))


class Mlp(nn.Module):
    """Token-wise MLP D -> 4D -> D with tanh-approximated GELU (DiT)."""

    def __init__(self, width: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the condition c (adaLN-Zero).

    The condition produces (shift, scale, gate) for attention and for the MLP; gates start at zero
    (zero-initialised modulation), so a freshly built block is the identity map.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (N, T, D), c (N, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(_modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m[:, None] * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm then Linear to p*p*C values per token, (N, T, D) -> (N, T, p*p*C)."""

    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------------
# Shared trunk
# ----------------------------------------------------------------------------------------------------


class _DiTTrunk(nn.Module):
    """Patch embedding + fixed position table + blocks; subclasses add conditioning and heads."""

    def __init__(self, size: DiTSize, in_channels: int, input_size: int):
        super().__init__()
        self.size = size
        self.in_channels = in_channels
        self.input_size = input_size
        self.grid = input_size // size.patch
        self.x_embedder = PatchEmbed(in_channels, size.width, size.patch)
        # Fixed table kept as a frozen parameter (as DiT does) so it travels in state dicts and is part
        # of the paper's parameter counts; optimizers should take only requires_grad parameters.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, size.width), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(size.width, size.heads) for _ in range(size.depth))

    # -- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every weight as the official AFM code does.

        First DiT's `initialize_weights()`: xavier-uniform Linear weights and zero biases, the patch
        conv as a flat xavier linear, the fixed sin-cos pos_embed, normal(0.02) timestep-MLP weights
        and label table, zeroed adaLN modulation. Then `_init_head` handles what the official models
        create only after that call (see the subclasses): those layers keep PyTorch's default init
        (reset here with `reset_parameters()`) except where the official code sets them explicitly.

        Also usable after `to_empty()` on a model built on the meta device.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # treat the conv as a linear on flat patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.size.width, self.grid)[None])
        for m in self.modules():
            if isinstance(m, TimestepEmbedder):
                nn.init.normal_(m.mlp[0].weight, std=0.02)
                nn.init.normal_(m.mlp[2].weight, std=0.02)
            elif isinstance(m, LabelEmbedder):
                nn.init.normal_(m.embedding_table.weight, std=0.02)
            elif isinstance(m, (DiTBlock, FinalLayer)):
                # adaLN-Zero: zero gates make every block the identity at init.
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
        self._init_head()

    def _init_head(self) -> None:  # overridden per role: modules the official code adds after DiT's init
        pass

    # -- input checks ----------------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor, arg: str = "x") -> int:
        want = (self.in_channels, self.input_size, self.input_size)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(
                f"{arg}: expected a float tensor of shape (N, {want[0]}, {want[1]}, {want[2]}), got {got}; "
                "check in_channels/input_size of the model against the data"
            )
        if not x.is_floating_point():
            raise ValueError(f"{arg}: expected a floating-point tensor, got dtype {x.dtype}")
        return x.shape[0]

    def _check_y(self, y: torch.Tensor, n: int, num_classes: int) -> None:
        if not torch.is_tensor(y) or y.shape != (n,):
            got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"y: expected class labels of shape ({n},), got {got}")
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"y: expected an integer (long) tensor, got dtype {y.dtype}")
        # Range check only on CPU: on an accelerator it would force a device sync every forward.
        if y.device.type == "cpu" and n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"y: labels must lie in [0, {num_classes}), got min {int(y.min())} max {int(y.max())}"
            )

    @staticmethod
    def _check_time(v, n: int, arg: str, why: str) -> torch.Tensor:
        if v is None:
            raise ValueError(f"{arg}: required {why}; pass a float tensor of shape ({n},)")
        if not torch.is_tensor(v) or not v.is_floating_point():
            raise ValueError(f"{arg}: expected a float tensor of shape ({n},), got {v!r:.80}")
        if v.dim() == 0:
            return v.expand(n)  # a single time for the whole batch
        if v.shape != (n,):
            raise ValueError(f"{arg}: expected shape ({n},) or a scalar tensor, got {tuple(v.shape)}")
        return v

    # -- tokens ----------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the network computes in: its weights' (bf16 under DeepSpeed's bf16 mode)."""
        return self.x_embedder.proj.weight.dtype

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs arrive in the caller's dtype (fp32 latents, noise, interpolations) and are cast to
        # the weights' dtype here, the one place every image input enters; outputs are cast back by
        # the heads (see `forward`), so losses, R1/R2 differences and gradients w.r.t. the inputs
        # stay in the caller's fp32 while the network runs in bf16.
        x = x.to(self.compute_dtype)
        return self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D)

    def _unpatchify(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        # (N, T, p*p*C) with per-token layout (p_row, p_col, C) -> (N, C, H, W)
        n, p, g = x.shape[0], self.size.patch, self.grid
        x = x.reshape(n, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, channels, g * p, g * p)


# ----------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------


class Generator(_DiTTrunk):
    """DiT generator; see GeneratorOptions. Attributes: kind, nfe, repeats, lr_scale, null_label, config.

    forward(x, y, s=None, t=None) -> (N, C, H, W):
      "1nfe": G(z, y) is the predicted data sample (s/t ignored).
      "multistep"/"anystep": G(x_s, y, s, t) = x_s - (s - t) * velocity(x_s, y, s, t).
    velocity(x, y, s, t=None): the raw network output (flow matching regresses it onto z - x).
    """

    def __init__(self, opts: GeneratorOptions):
        size = _size(opts.name)
        super().__init__(size, opts.in_channels, opts.input_size)
        self.kind = opts.kind
        self.nfe = opts.nfe
        self.repeats = opts.repeats
        self.lr_scale = 1.0 / opts.repeats  # the paper divides G's learning rate by R
        self.num_classes = opts.num_classes
        self.null_label = opts.null_label
        self.config = dataclasses.asdict(opts)
        if not opts.null_label:
            # Recorded only when set, so the configs (generator.json, registry records) of generators
            # without it stay exactly as before; build_generator(**config) rebuilds either way.
            del self.config["null_label"]
        if opts.time_scale == 1000.0:  # likewise recorded only when it is not DiT's
            del self.config["time_scale"]
        # With null_label the table has a last row, index num_classes, for the dropped (CFG) label.
        self.y_embedder = LabelEmbedder(opts.num_classes + int(opts.null_label), size.width)
        # t_embedder embeds s (multistep/anystep) or the per-pass time (depth-repeated 1NFE).
        if opts.kind != "1nfe" or opts.repeats > 1:
            self.t_embedder = TimestepEmbedder(size.width, opts.time_scale)
        if opts.kind == "anystep":
            self.t_tgt_embedder = TimestepEmbedder(size.width, opts.time_scale)
        self.final_layer = FinalLayer(size.width, size.patch, opts.in_channels)
        self.init_weights()

    @property
    def label_rows(self) -> int:
        """Valid labels are [0, label_rows): the classes, plus the null label num_classes with null_label."""
        return self.num_classes + int(self.null_label)

    def _init_head(self) -> None:
        # Zero output layer: the generator starts as the zero map (adaLN-Zero; DiT's init).
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.kind == "anystep":
            # As the official any-step model: t_tgt_embedder is created after DiT's init, its two MLP
            # weights are then set to normal(0.02) and its biases keep PyTorch's default Linear init
            # (uniform in +-1/sqrt(fan_in)).
            for linear in (self.t_tgt_embedder.mlp[0], self.t_tgt_embedder.mlp[2]):
                linear.reset_parameters()
                nn.init.normal_(linear.weight, std=0.02)

    def _network(self, x, y, s, t) -> torch.Tensor:
        h = self._tokens(x)  # (N, T, D)
        c = self.y_embedder(y)  # (N, D)
        if self.kind == "1nfe":
            for i in range(self.repeats):
                c_i = c
                if self.repeats > 1:
                    # Pass i sees the class condition plus the embedding of t_i = 1 - i/R.
                    t_i = torch.full((1,), 1.0 - i / self.repeats, device=x.device)
                    c_i = c + self.t_embedder(t_i)  # (N, D) by broadcast of (1, D)
                for block in self.blocks:
                    h = block(h, c_i)
        else:
            c = c + self.t_embedder(s)
            if self.kind == "anystep":
                c = c + self.t_tgt_embedder(t)
            for block in self.blocks:
                h = block(h, c)
        # The final layer sees the class condition only (also for depth-repeated generators).
        return self._unpatchify(self.final_layer(h, c), self.in_channels)

    def velocity(self, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None):
        """Raw network output g(x, y, s[, t]) -> (N, C, H, W).

        multistep: t is ignored. anystep: t=None means t = s (the instantaneous velocity, what flow
        matching trains). Not defined for "1nfe" generators, which have no time input.
        """
        if self.kind == "1nfe":
            raise ValueError(
                "kind: a '1nfe' generator predicts data directly and has no velocity; "
                "build it with kind='multistep' or 'anystep' to use velocity()"
            )
        n = self._check_x(x)
        self._check_y(y, n, self.label_rows)
        s = self._check_time(s, n, "s", f"for a {self.kind!r} generator")
        if self.kind == "anystep":
            t = s if t is None else self._check_time(t, n, "t", "")
        return self._network(x, y, s, t).to(x.dtype)  # (N, C, H, W) in the input's dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor | None = None, t: torch.Tensor | None = None):
        if self.kind == "1nfe":
            n = self._check_x(x, "z")
            self._check_y(y, n, self.label_rows)
            return self._network(x, y, None, None).to(x.dtype)  # (N, C, H, W) in the input's dtype
        n = self._check_x(x)
        why = f"for a {self.kind!r} generator (G maps x_s at time s to time t)"
        s = self._check_time(s, n, "s", why)
        t = self._check_time(t, n, "t", why)
        step = (s - t).to(x.dtype)[:, None, None, None]
        return x - step * self.velocity(x, y, s, t)


# ----------------------------------------------------------------------------------------------------
# Discriminator and classifier: [CLS]-token heads on the same trunk
# ----------------------------------------------------------------------------------------------------


def _run_with_token(trunk: _DiTTrunk, token: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Prepend a learned token (no position embedding) and return its final state, (N, D)."""
    h = trunk._tokens(x)  # (N, T, D)
    tok = token.to(h.dtype).view(1, 1, -1).expand(h.shape[0], 1, -1)  # (N, 1, D)
    h = torch.cat([tok, h], dim=1)  # (N, T + 1, D)
    for block in trunk.blocks:
        h = block(h, c)
    return h[:, 0]


class Discriminator(_DiTTrunk):
    """DiT discriminator D(x, y, t=None) -> (N,) logits; see DiscriminatorOptions.

    Class (and with time_cond the time t) condition the blocks through adaLN; a learned [CLS] token
    (dis_embed) is read out via LayerNorm (no affine) and a bias-free Linear(D, 1), which keeps PyTorch's
    default init as in the official code (see init_weights).
    """

    def __init__(self, opts: DiscriminatorOptions):
        size = _size(opts.name)
        super().__init__(size, opts.in_channels, opts.input_size)
        self.time_cond = opts.time_cond
        self.num_classes = opts.num_classes
        self.config = dataclasses.asdict(opts)
        self.y_embedder = LabelEmbedder(opts.num_classes, size.width)
        if opts.time_cond:
            self.t_embedder = TimestepEmbedder(size.width)
        self.dis_embed = nn.Parameter(torch.zeros(size.width))
        self.final_layer = nn.Sequential(
            nn.LayerNorm(size.width, elementwise_affine=False, eps=LN_EPS),
            nn.Linear(size.width, 1, bias=False),
        )
        self.init_weights()

    def _init_head(self) -> None:
        # As the official discriminator: dis_embed = randn * 0.02; the logit Linear(D, 1, bias=False) is
        # created after DiT's init, so it keeps PyTorch's default (kaiming-uniform) weight.
        nn.init.normal_(self.dis_embed, std=0.02)
        self.final_layer[1].reset_parameters()

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        n = self._check_x(x)
        self._check_y(y, n, self.num_classes)
        c = self.y_embedder(y)  # (N, D)
        if self.time_cond:
            c = c + self.t_embedder(self._check_time(t, n, "t", "for a time_cond discriminator"))
        return self.final_layer(_run_with_token(self, self.dis_embed, x, c)).squeeze(1).to(x.dtype)  # (N,)


class Classifier(_DiTTrunk):
    """Time-conditioned DiT classifier C(x_t, t) -> (N, num_classes) logits; no label input.

    The [CLS] token (cls_embed) is read out via LayerNorm (no affine) and Linear(D, num_classes), which
    keeps PyTorch's default weight and bias init as in the official code (see init_weights).
    """

    def __init__(self, opts: ClassifierOptions):
        size = _size(opts.name)
        super().__init__(size, opts.in_channels, opts.input_size)
        self.num_classes = opts.num_classes
        self.config = dataclasses.asdict(opts)
        self.t_embedder = TimestepEmbedder(size.width)
        self.cls_embed = nn.Parameter(torch.zeros(size.width))
        self.final_layer = nn.Sequential(
            nn.LayerNorm(size.width, elementwise_affine=False, eps=LN_EPS),
            nn.Linear(size.width, opts.num_classes),
        )
        self.init_weights()

    def _init_head(self) -> None:
        # As the official classifier: cls_embed = randn * 0.02; the head Linear(D, num_classes) is
        # created after DiT's init, so weight and bias keep PyTorch's default init.
        nn.init.normal_(self.cls_embed, std=0.02)
        self.final_layer[1].reset_parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = self._check_x(x)
        c = self.t_embedder(self._check_time(t, n, "t", "for the classifier (time of the noised input)"))
        return self.final_layer(_run_with_token(self, self.cls_embed, x, c)).to(x.dtype)  # (N, num_classes)


# ----------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------


def build_generator(name: str, **options) -> Generator:
    """Build a generator by size name (SIZES) and GeneratorOptions; `build_generator(**G.config)` rebuilds."""
    return Generator(_make_options(GeneratorOptions, "generator", name, options))


def build_discriminator(name: str, **options) -> Discriminator:
    """Build a discriminator by size name and DiscriminatorOptions (in_channels, input_size, num_classes, time_cond)."""
    return Discriminator(_make_options(DiscriminatorOptions, "discriminator", name, options))


def build_classifier(name: str, **options) -> Classifier:
    """Build a time-conditioned classifier by size name and ClassifierOptions."""
    return Classifier(_make_options(ClassifierOptions, "classifier", name, options))


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; by default includes the frozen pos_embed, as the paper's Table 10 does."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
