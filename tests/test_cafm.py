"""CAFM (advflow.trainers.cafm) on tiny float64 models.

References are written out here independently of the module: central finite differences for the JVP,
torch.autograd.functional.jvp (double-backward trick, run with the MATH SDPA kernel since the fused CPU
kernel has no double backward) for the losses and their gradients, a hand-written D forward for the
discriminator built from G, and the official config numbers copied from the config files.

Sign convention: t = 1 noise, t = 0 data, x_t = (1 - t) x + t z, so d x_t / dt = z - x; the JVP is
along (velocity, +1) in (x_t, t), i.e. d/dh D(x_t + h v, t + h) at h = 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from advflow.trainers import cafm
from advflow.trainers.models import build_discriminator, build_generator

N, C, H, CLASSES = 4, 2, 8, 5
STEP = 1e-6  # central-difference step along (v, 1), float64


def _randomise(model, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _pair(seed: int = 0, null_label: bool = True, kind: str = "multistep"):
    """Tiny float64 velocity G with random weights (a fresh G is the zero map) and D built from it,
    then D's weights moved off G's so the two are different networks."""
    opts = dict(in_channels=C, input_size=H, num_classes=CLASSES, kind=kind, null_label=null_label)
    if kind == "multistep":
        opts["nfe"] = 4
    G = build_generator("tiny", **opts).double()
    _randomise(G, seed)
    D = cafm.build_cafm_discriminator(G)
    _randomise(D, seed + 100)
    return G, D


def _batch(seed: int = 1, n: int = N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, H, H, generator=g, dtype=torch.float64)
    z = torch.randn(n, C, H, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x, y, z, t


# ------------------------------------------------------------------------------------------------
# JVP read-out
# ------------------------------------------------------------------------------------------------


def test_jvp_logits_matches_central_difference():
    G, D = _pair()
    x, y, z, t = _batch()
    x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * z
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, dout = cafm.jvp_logits(D, x_t, y, t, v)
    assert out.shape == (N,) and dout.shape == (N,)
    with torch.no_grad():
        ref_out = D(x_t, y, t)
        plus = D(x_t + STEP * v, y, t + STEP)
        minus = D(x_t - STEP * v, y, t - STEP)
    fd = (plus - minus) / (2 * STEP)
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-12, atol=1e-12)
    assert fd.abs().min() > 1e-3  # a non-trivial derivative
    torch.testing.assert_close(dout.detach(), fd, rtol=1e-6, atol=1e-8)
    # The time tangent is +1: the opposite sign in t gives a different number.
    with torch.no_grad():
        fd_wrong = (D(x_t + STEP * v, y, t - STEP) - D(x_t - STEP * v, y, t + STEP)) / (2 * STEP)
    assert not torch.allclose(dout.detach(), fd_wrong, rtol=1e-3, atol=1e-6)


def test_real_jvp_is_time_derivative_along_the_data_path():
    """Along v_real = z - x the JVP is d/dt D((1 - t) x + t z, t)."""
    G, D = _pair()
    x, y, z, t = _batch()

    def path(tt):
        return D((1 - tt)[:, None, None, None] * x + tt[:, None, None, None] * z, y, tt)

    x_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * z
    _, dout = cafm.jvp_logits(D, x_t, y, t, z - x)
    with torch.no_grad():
        fd = (path(t + STEP) - path(t - STEP)) / (2 * STEP)
    torch.testing.assert_close(dout.detach(), fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Losses against hand-written references
# ------------------------------------------------------------------------------------------------


def _ref_jvp(D, x_t, y, t, v):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.jvp(lambda a, b: D(a, y, b), (x_t, t), (v, torch.ones_like(t)),
                                             create_graph=True)


def _ref_labels(y, drop, seed):
    if drop == 0:
        return y
    keep = torch.rand(y.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float32) >= drop
    return torch.where(keep, y, torch.full_like(y, CLASSES))


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_d_loss_matches_reference(drop):
    G, D = _pair()
    n = 8
    x, y, z, t = _batch(n=n)
    cfg = cafm.CAFMConfig(class_drop=drop, cp_scale=0.25)  # a large cp weight so the term shows
    seed = 3
    yd = _ref_labels(y, drop, seed)
    if drop:
        assert (yd == CLASSES).any() and (yd != CLASSES).any()

    loss, stats = cafm.d_loss(G, D, x, y, z, t, cfg, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    got = _grads(D.parameters())
    D.zero_grad(set_to_none=True)

    x_t = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * z
    with torch.no_grad():
        v_fake = G.velocity(x_t, yd, t)
    o, d_real = _ref_jvp(D, x_t, yd, t, z - x)
    _, d_fake = _ref_jvp(D, x_t, yd, t, v_fake)
    ref = ((d_real - 1) ** 2).mean() + ((d_fake + 1) ** 2).mean() + 0.25 * (o ** 2).mean()
    ref.backward()
    want = _grads(D.parameters())
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats["cp"], (o ** 2).mean().detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert sum(a is not None for a in got) > 0


@pytest.mark.parametrize("drop,ot", [(0.0, 0.0), (0.3, 0.5)])
def test_g_loss_matches_reference(drop, ot):
    G, D = _pair()
    n = 8
    x, y, z, t = _batch(n=n)
    cfg = cafm.CAFMConfig(class_drop=drop, ot_scale=ot)
    seed = 3
    yd = _ref_labels(y, drop, seed)

    loss, stats = cafm.g_loss(G, D, x, y, z, t, cfg, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    got = _grads(G.parameters())
    G.zero_grad(set_to_none=True)

    x_t = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * z
    v_fake = G.velocity(x_t, yd, t)
    _, d_fake = _ref_jvp(D, x_t, yd, t, v_fake)
    ref = ((d_fake - 1) ** 2).mean() + ot * (v_fake ** 2).mean()
    ref.backward()
    want = _grads(G.parameters())
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert sum(a is not None for a in got) > 0


def test_gradient_isolation():
    G, D = _pair()
    x, y, z, t = _batch()
    cfg = cafm.CAFMConfig(ot_scale=0.1)
    flags = [p.requires_grad for p in D.parameters()]
    loss, _ = cafm.g_loss(G, D, x, y, z, t, cfg, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in D.parameters())
    assert [p.requires_grad for p in D.parameters()] == flags
    assert any(p.grad is not None for p in G.parameters())
    G.zero_grad(set_to_none=True)
    loss, _ = cafm.d_loss(G, D, x, y, z, t, cfg, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in G.parameters())
    assert any(p.grad is not None for p in D.parameters())


# ------------------------------------------------------------------------------------------------
# Discriminator built from G
# ------------------------------------------------------------------------------------------------


def _rms(h):
    return h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + 1e-6)


def _reference_d(G, D, x, y, t):
    """The official SiT discriminator's forward written with G's modules (D_sit:17-38, norm_type rms)."""
    h = G.x_embedder(x) + G.pos_embed  # (N, T, W)
    c = G.y_embedder(y) + G.t_embedder(t)  # (N, W)
    tok = D.dis_embed.view(1, 1, -1).expand(x.shape[0], 1, -1)
    h = torch.cat([tok, h], dim=1)  # token without position embedding
    for blk in G.blocks:
        sa, ca, ga, sm, cm, gm = blk.adaLN_modulation(c).chunk(6, dim=1)
        h = h + ga[:, None] * blk.attn(_rms(h) * (1 + ca[:, None]) + sa[:, None])
        h = h + gm[:, None] * blk.mlp(_rms(h) * (1 + cm[:, None]) + sm[:, None])
    return _rms(h[:, 0]) @ D.final_layer[1].weight[0]  # (N,)


def test_discriminator_copies_g_trunk_and_adds_official_head():
    G = build_generator("tiny", in_channels=C, input_size=H, num_classes=CLASSES, kind="multistep", nfe=4,
                        null_label=True).double()
    _randomise(G, 0)
    torch.manual_seed(7)
    D = cafm.build_cafm_discriminator(G)
    gs, ds = G.state_dict(), D.state_dict()
    new = {"dis_embed", "final_layer.1.weight"}
    copied = set(ds) - new
    assert copied and all(k.startswith(("x_embedder", "pos_embed", "t_embedder", "y_embedder", "blocks"))
                          for k in copied)
    for k in copied:
        assert torch.equal(ds[k], gs[k]), k
        assert ds[k].data_ptr() != gs[k].data_ptr()  # a copy, not shared storage
    assert D.y_embedder.embedding_table.weight.shape[0] == CLASSES + 1  # with the null row
    assert D.time_cond and next(D.parameters()).dtype == torch.float64
    # Same state-dict layout as models.Discriminator (time-conditioned, label rows of G).
    plain = build_discriminator("tiny", in_channels=C, input_size=H, num_classes=CLASSES + 1, time_cond=True)
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == {k: tuple(v.shape) for k, v in ds.items()}
    # New token: randn * 0.02 (D_sit:11); head: RMSNorm + Linear(W, 1, bias=False), PyTorch default init.
    width = D.dis_embed.numel()
    assert 0.01 < D.dis_embed.std().item() < 0.03
    w = D.final_layer[1].weight
    assert w.shape == (1, width) and D.final_layer[1].bias is None
    bound = 1 / math.sqrt(width)
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound  # kaiming-uniform(a=sqrt 5), not zero
    assert isinstance(D.final_layer[0], cafm.RMSNorm)
    assert all(isinstance(b.norm1, cafm.RMSNorm) and isinstance(b.norm2, cafm.RMSNorm) for b in D.blocks)
    # The output at init: the official forward with G's weights; non-zero since the head is not zero.
    x, y, z, t = _batch()
    y = y.clone()
    y[0] = CLASSES  # the null label is valid for D
    with torch.no_grad():
        got = D(x, y, t)
        ref = _reference_d(G, D, x, y, t)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert ref.abs().min() > 0
    # norm="ln" keeps LayerNorm (the plain models.Discriminator forward) and gives another output.
    D_ln = cafm.build_cafm_discriminator(G, norm="ln")
    D_ln.load_state_dict(D.state_dict())
    with torch.no_grad():
        assert not torch.allclose(D_ln(x, y, t), got)


def test_discriminator_from_anystep_generator_ignores_target_embedder():
    G = build_generator("tiny", in_channels=C, input_size=H, num_classes=CLASSES, kind="anystep").double()
    _randomise(G, 1)
    D = cafm.build_cafm_discriminator(G)
    assert not any(k.startswith("t_tgt_embedder") for k in D.state_dict())
    assert torch.equal(D.t_embedder.mlp[0].weight, G.t_embedder.mlp[0].weight)
    assert D.y_embedder.embedding_table.weight.shape[0] == CLASSES


# ------------------------------------------------------------------------------------------------
# Config, schedule, inputs
# ------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_official_sit_values():
    cfg = cafm.CAFMConfig()
    # ByteDance-Seed/Adversarial-Flow-Models@519601d configs/train/cafm/train_cafm_sit.yaml
    assert cfg.warmup == 10000  # :14 exp.warmup, :59 adversarial.warmup
    assert cfg.d_steps == 16  # :12 exp.N, :56 adversarial.N
    assert cfg.cp_scale == 0.001  # :57 adversarial.cp_scale
    assert cfg.ot_scale == 0.0  # :13 exp.ot, :58 adversarial.ot_scale
    assert cfg.g_lr == 1e-5 and cfg.d_lr == 1e-5  # :10-11 exp.gen_lr/dis_lr, :72-73
    assert cfg.betas == (0.0, 0.95)  # :75 optimizer.betas
    assert cfg.weight_decay == 0.0  # :74 optimizer.weight_decay
    assert cfg.ema_decay == 0.99  # :45 ema.decay
    assert cfg.g_grad_clip == 10000.0 and cfg.d_grad_clip == 10000.0  # :68-69
    assert cfg.class_drop == 0.1  # :32 gen.dropout
    assert cfg.time_dist == "uniform"  # :67 training.timesteps


def test_step_kind_official_sequence():
    cfg = cafm.CAFMConfig(warmup=3, d_steps=2)
    seq = "".join(cafm.step_kind(k, cfg) for k in range(12))
    # is_dis_step (trainer:391-397): k <= 3 -> d; then k % 3 < 2 -> d else g.
    assert seq == "ddddd" "g" "dd" "g" "dd" "g"
    cfg0 = cafm.CAFMConfig(warmup=0, d_steps=1)
    assert "".join(cafm.step_kind(k, cfg0) for k in range(6)) == "dgdgdg"
    official = cafm.CAFMConfig()
    kinds = [cafm.step_kind(k, official) for k in range(10001 + 34)]
    assert set(kinds[:10001]) == {"d"}
    g_steps = [k for k, s in enumerate(kinds) if s == "g"]
    assert g_steps == [k for k in range(10001, 10001 + 34) if k % 17 == 16]
    with pytest.raises(ValueError, match="k:"):
        cafm.step_kind(-1, cfg)


def test_times_and_label_drop():
    cfg = cafm.CAFMConfig()
    t = cafm.sample_cafm_times(1000, cfg, torch.Generator().manual_seed(0))
    assert t.shape == (1000,) and t.min() >= 0 and t.max() <= 1
    torch.testing.assert_close(t, torch.rand(1000, generator=torch.Generator().manual_seed(0)))
    jit = cafm.CAFMConfig(time_dist="logit_normal_jit")
    t = cafm.sample_cafm_times(1000, jit, torch.Generator().manual_seed(0))
    e = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, torch.sigmoid(0.8 * e + 0.8))
    y = torch.arange(1000) % CLASSES
    yd = cafm.drop_labels(y, cfg, CLASSES, torch.Generator().manual_seed(1))
    dropped = yd == CLASSES
    assert 0.05 < dropped.float().mean() < 0.15 and torch.equal(yd[~dropped], y[~dropped])


@pytest.mark.parametrize("field,value", [
    ("warmup", -1), ("d_steps", 0), ("cp_scale", -0.1), ("ot_scale", float("nan")), ("g_lr", 0.0),
    ("d_lr", -1e-5), ("betas", (1.0, 0.9)), ("betas", (0.9,)), ("weight_decay", -1.0), ("ema_decay", 1.0),
    ("g_grad_clip", 0.0), ("class_drop", 1.5), ("time_dist", "logit_normal"), ("warmup", 1.5),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        cafm.CAFMConfig(**{field: value})


def test_loss_input_errors_name_the_field():
    G, D = _pair(null_label=False)
    x, y, z, t = _batch()
    with pytest.raises(ValueError, match="^class_drop:"):
        cafm.d_loss(G, D, x, y, z, t, cafm.CAFMConfig())
    cfg = cafm.CAFMConfig(class_drop=0.0)
    with pytest.raises(ValueError, match="^z:"):
        cafm.g_loss(G, D, x, y, z[:, :1], t, cfg)
    with pytest.raises(ValueError, match="^t:"):
        cafm.d_loss(G, D, x, y, z, t[:2], cfg)
    one = build_generator("tiny", in_channels=C, input_size=H, num_classes=CLASSES)
    with pytest.raises(ValueError, match="^G:"):
        cafm.build_cafm_discriminator(one)
    with pytest.raises(ValueError, match="^norm:"):
        cafm.build_cafm_discriminator(G, norm="bn")
