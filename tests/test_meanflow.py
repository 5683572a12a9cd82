"""MeanFlow's loss and time sampling (advflow.trainers.meanflow) on a tiny any-step generator.

References are written out here independently of the module: finite differences for the total
derivative, the adaptive weight by hand, flow matching inline, the samplers' steps by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advflow.trainers import draws, flow
from advflow.trainers import meanflow as mf
from advflow.trainers.models import build_generator

N, C, H, CLASSES = 4, 2, 8, 5
STEP = 1e-6  # central-difference step in time (and along the tangent in z), float64


def _generator(null_label: bool = False, seed: int = 0):
    """Tiny any-step G in float64 with every trainable weight random (a fresh G is the zero map)."""
    G = build_generator("tiny", in_channels=C, input_size=H, num_classes=CLASSES, kind="anystep",
                        null_label=null_label).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in G.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return G


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, H, generator=g, dtype=torch.float64)
    z = torch.randn(N, C, H, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    s = torch.tensor([0.9, 0.55, 0.4, 0.7], dtype=torch.float64)
    t = torch.tensor([0.2, 0.55, 0.05, 0.35], dtype=torch.float64)  # row 1: r = t
    return x, y, z, s, t


def _b(a):  # (N,) -> (N, 1, 1, 1)
    return a.view(-1, 1, 1, 1)


def _fd_total_derivative(G, zs, y, s, t, tangent):
    """(u(z + h w, s + h, t) - u(z - h w, s - h, t)) / 2h: the derivative along (w, 1, 0) in (z, s, t)."""
    with torch.no_grad():
        up = G.velocity(zs + STEP * tangent, y, s + STEP, t)
        down = G.velocity(zs - STEP * tangent, y, s - STEP, t)
    return (up - down) / (2 * STEP)


def _reference_loss(G, x, y_in, z, s, t, v_tgt, tangent, power, eps):
    """MeanFlow's loss written out: FD total derivative, target, per-sample sum, explicit weight."""
    zs = (1 - _b(s)) * x + _b(s) * z
    u = G.velocity(zs, y_in, s, t)
    u_tgt = v_tgt - _b(s - t) * _fd_total_derivative(G, zs, y_in, s, t, tangent)
    per = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    weight = 1.0 / (per.detach() + eps) ** power
    return (weight * per).mean(), ((u - u_tgt) ** 2).mean()


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# -- 1. the JVP term -------------------------------------------------------------------------------


def test_the_jvp_total_derivative_matches_finite_differences():
    G = _generator()
    x, y, z, s, t = _batch()
    zs = (1 - _b(s)) * x + _b(s) * z
    v = z - x
    u, du = mf.average_velocity_jvp(G, zs, y, s, t, v)
    fd = _fd_total_derivative(G, zs, y, s, t, v)
    assert fd.norm() > 1.0  # a real derivative, not the zero map's
    assert _rel(du, fd) < 1e-6
    # the primal is the plain forward (the fused attention there, the math path under the JVP)
    torch.testing.assert_close(u, G.velocity(zs, y, s, t), rtol=1e-12, atol=1e-12)
    # the tangent of t (MeanFlow's r) is zero: moving t changes u, and the JVP must not see it
    assert _rel(_fd_total_derivative(G, zs, y, s, t + 1e-2, v), fd) > 1e-4


# -- 2. the loss against a hand-written reference ------------------------------------------------


@pytest.mark.parametrize("power,eps", [(1.0, 0.01), (0.75, 1e-3), (0.0, 0.01)])
def test_loss_matches_a_reference_with_finite_differences_and_explicit_weight(power, eps):
    G = _generator()
    x, y, z, s, t = _batch()
    cfg = mf.MeanFlowConfig(power=power, eps=eps)
    loss, stats = mf.meanflow_loss(G, x, y, z, s, t, cfg)
    ref, ref_mse = _reference_loss(G, x, y, z, s, t, z - x, z - x, power, eps)
    assert math.isclose(float(loss), float(ref), rel_tol=1e-6)
    assert math.isclose(float(stats["mf_mse"]), float(ref_mse), rel_tol=1e-6)


def test_imf_variant_differs_only_in_the_tangent_the_network_velocity_at_r_equal_t():
    G = _generator()
    x, y, z, s, t = _batch()
    cfg = mf.MeanFlowConfig(variant="imf", power=0.5)
    loss, stats = mf.meanflow_loss(G, x, y, z, s, t, cfg)
    zs = (1 - _b(s)) * x + _b(s) * z
    with torch.no_grad():
        own = G.velocity(zs, y, s, s)
    ref, ref_mse = _reference_loss(G, x, y, z, s, t, z - x, own, cfg.power, cfg.eps)
    assert math.isclose(float(loss), float(ref), rel_tol=1e-6)
    assert math.isclose(float(stats["mf_mse"]), float(ref_mse), rel_tol=1e-6)
    # the tangent matters: the plain (summed) MSE differs from MeanFlow's with the same weights
    imf0, _ = mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(variant="imf", power=0.0))
    plain0, _ = mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(power=0.0))
    assert not math.isclose(float(imf0), float(plain0), rel_tol=1e-3)


# -- 3. r = t everywhere is flow matching ------------------------------------------------------


def test_r_equal_t_everywhere_with_power_0_is_flow_matching():
    G = _generator()
    x, y, z, _, _ = _batch()
    cfg = mf.MeanFlowConfig(ratio_r_neq_t=0.0, power=0.0)
    s, t = mf.sample_times(N, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s, t)
    s, t = s.double(), t.double()
    loss, stats = mf.meanflow_loss(G, x, y, z, s, t, cfg)
    # flow matching, inline (fm.fm_loss itself refuses any-step generators): MSE of the velocity at t = s
    xt = (1 - _b(s)) * x + _b(s) * z
    fm = F.mse_loss(G.velocity(xt, y, s, s), z - x)
    assert math.isclose(float(stats["mf_mse"]), float(fm), rel_tol=1e-10)
    assert math.isclose(float(loss), float(fm) * C * H * H, rel_tol=1e-10)  # summed over (C, H, W)


# -- 4. sampling is the any-step sampler --------------------------------------------------------


def test_one_and_two_step_sampling_use_the_average_velocity():
    G = _generator()
    _, y, z, _, _ = _batch()
    one, zero, half = (torch.full((N,), v, dtype=torch.float64) for v in (1.0, 0.0, 0.5))
    with torch.no_grad():
        want1 = z - G.velocity(z, y, one, zero)  # z_0 = z_1 - u(z_1, r=0, t=1)
        mid = z - 0.5 * G.velocity(z, y, one, half)
        want2 = mid - 0.5 * G.velocity(mid, y, half, zero)
    torch.testing.assert_close(flow.generate(G, z, y, nfe=1), want1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow.generate(G, z, y, nfe=2), want2, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(want1, want2)


# -- 5. time sampling ----------------------------------------------------------------------------


def test_sample_times_order_share_and_logit_normal_marginals():
    cfg = mf.MeanFlowConfig(time_mean=-0.4, time_std=1.3, ratio_r_neq_t=0.3)
    n = 40000
    s, t = mf.sample_times(n, cfg, generator=torch.Generator().manual_seed(0))
    assert s.shape == t.shape == (n,) and bool((s >= t).all()) and bool((s > 0).all() and (s < 1).all())
    differ = s != t
    share = float(differ.double().mean())
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    logit = lambda a: torch.log(a.double()) - torch.log1p(-a.double())  # noqa: E731
    # On r != t rows (s, t) are the sorted pair of two logit-normals: pooled, their logits are N(mean, std).
    pooled = torch.cat([logit(s[differ]), logit(t[differ])])
    se = cfg.time_std / math.sqrt(pooled.numel())
    assert abs(float(pooled.mean()) - cfg.time_mean) < 4 * se * math.sqrt(2)  # the pairs are dependent
    assert abs(float(pooled.std()) - cfg.time_std) < 0.03
    # s is the max of the two: E[logit s] = mean + std * E[max(N1, N2)] = mean + std / sqrt(pi), on every row.
    assert abs(float(logit(s).mean()) - (cfg.time_mean + cfg.time_std / math.sqrt(math.pi))) < 0.03


def test_sample_times_do_not_depend_on_the_batch_split():
    cfg = mf.MeanFlowConfig(ratio_r_neq_t=0.5)
    whole = mf.sample_times(8, cfg, generator=torch.Generator().manual_seed(7))
    halves = [mf.sample_times(4, cfg, generator=draws.BatchSlice(torch.Generator().manual_seed(7), start, 4, 8))
              for start in (0, 4)]
    for i in range(2):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i])
    assert bool((whole[0] != whole[1]).any()) and bool((whole[0] == whole[1]).any())


# -- 6. gradients through the JVP's primal ------------------------------------------------------


@pytest.mark.parametrize("variant", mf.MEANFLOW_VARIANTS)
def test_gradient_equals_plain_forward_with_a_detached_target(variant):
    G = _generator()
    x, y, z, s, t = _batch()
    cfg = mf.MeanFlowConfig(variant=variant)  # power 1: the weight must be held too
    loss, _ = mf.meanflow_loss(G, x, y, z, s, t, cfg)
    params = [p for p in G.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    zs = (1 - _b(s)) * x + _b(s) * z
    with torch.no_grad():
        tangent = (z - x) if variant == "meanflow" else G.velocity(zs, y, s, s)
    ref, _ = _reference_loss(G, x, y, z, s, t, z - x, tangent, cfg.power, cfg.eps)
    want = torch.autograd.grad(ref, params)
    flat_got = torch.cat([g.flatten() for g in got])
    flat_want = torch.cat([g.flatten() for g in want])
    assert flat_want.norm() > 0
    assert _rel(flat_got, flat_want) < 1e-5


# -- 7. classifier-free guidance and the null label ---------------------------------------------


def test_guidance_and_label_drop_need_the_null_label():
    G = _generator(null_label=False)
    x, y, z, s, t = _batch()
    with pytest.raises(ValueError, match="cfg_omega"):
        mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(cfg_omega=1.5, class_drop=0.1))
    with pytest.raises(ValueError, match="class_drop"):
        mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(class_drop=0.1))
    with pytest.raises(ValueError, match="y: labels"):  # no null row: y = num_classes is out of range
        G.velocity(z, torch.full((N,), CLASSES), s, t)


def test_null_label_adds_one_table_row_and_keeps_the_default_layout():
    plain = build_generator("tiny", in_channels=C, input_size=H, num_classes=CLASSES, kind="anystep")
    nulled = build_generator("tiny", in_channels=C, input_size=H, num_classes=CLASSES, kind="anystep",
                             null_label=True)
    sd, sd_null = plain.state_dict(), nulled.state_dict()
    assert sd.keys() == sd_null.keys()
    assert {k for k in sd if sd[k].shape != sd_null[k].shape} == {"y_embedder.embedding_table.weight"}
    assert sd["y_embedder.embedding_table.weight"].shape[0] == CLASSES
    assert sd_null["y_embedder.embedding_table.weight"].shape[0] == CLASSES + 1
    assert "null_label" not in plain.config  # configs of generators without it are as before
    assert nulled.config["null_label"] and build_generator(**nulled.config).null_label
    with pytest.raises(ValueError, match="null_label"):
        build_generator("tiny", kind="anystep", null_label=1)


def test_class_drop_1_replaces_every_label_and_keeps_the_plain_velocity():
    G = _generator(null_label=True)
    x, y, z, s, t = _batch()
    guided_all_dropped, _ = mf.meanflow_loss(G, x, y, z, s, t,
                                             mf.MeanFlowConfig(power=0.0, cfg_kappa=0.5, class_drop=1.0),
                                             generator=torch.Generator().manual_seed(0))
    null_labels, _ = mf.meanflow_loss(G, x, torch.full_like(y, CLASSES), z, s, t, mf.MeanFlowConfig(power=0.0))
    with_labels, _ = mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(power=0.0))
    assert math.isclose(float(guided_all_dropped), float(null_labels), rel_tol=1e-12)
    assert not math.isclose(float(guided_all_dropped), float(with_labels), rel_tol=1e-3)


def test_omega_1_kappa_0_is_the_unguided_loss():
    G = _generator(null_label=True)
    x, y, z, s, t = _batch()
    unguided, _ = mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(power=0.0))
    neutral, _ = mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(power=0.0, cfg_omega=1.0, cfg_kappa=0.0))
    # the same with guidance on and a label drop that drops nothing: the target changes
    guided, _ = mf.meanflow_loss(G, x, y, z, s, t, mf.MeanFlowConfig(power=0.0, cfg_omega=1.5, class_drop=1e-9),
                                 generator=torch.Generator().manual_seed(0))
    assert float(neutral) == float(unguided)
    assert not math.isclose(float(guided), float(unguided), rel_tol=1e-5)


@pytest.mark.parametrize("variant", mf.MEANFLOW_VARIANTS)
def test_guided_loss_matches_the_papers_cfg_mix_by_hand(variant):
    G = _generator(null_label=True)
    x, y, z, s, t = _batch()
    omega, kappa, drop_p = 1.5, 0.3, 0.5
    cfg = mf.MeanFlowConfig(cfg_omega=omega, cfg_kappa=kappa, class_drop=drop_p, variant=variant, power=0.5)
    loss, stats = mf.meanflow_loss(G, x, y, z, s, t, cfg, generator=torch.Generator().manual_seed(11))
    # the drop draw, as documented: one uniform per row from the generator, dropped where < class_drop
    drop = torch.rand(N, generator=torch.Generator().manual_seed(11)) < drop_p
    assert bool(drop.any()) and not bool(drop.all())
    null = torch.full_like(y, CLASSES)
    y_in = torch.where(drop, null, y)
    zs = (1 - _b(s)) * x + _b(s) * z
    v = z - x
    with torch.no_grad():
        v_mix = omega * v + kappa * G.velocity(zs, y, s, s) + (1 - omega - kappa) * G.velocity(zs, null, s, s)
        v_tgt = torch.where(_b(drop), v, v_mix)
        tangent = v_tgt if variant == "meanflow" else G.velocity(zs, y_in, s, s)
    ref, ref_mse = _reference_loss(G, x, y_in, z, s, t, v_tgt, tangent, cfg.power, cfg.eps)
    assert math.isclose(float(loss), float(ref), rel_tol=1e-6)
    assert math.isclose(float(stats["mf_mse"]), float(ref_mse), rel_tol=1e-6)


def test_label_drop_does_not_depend_on_the_batch_split():
    G = _generator(null_label=True)
    x, y, z, s, t = _batch()
    cfg = mf.MeanFlowConfig(power=0.0, class_drop=0.5)
    whole, _ = mf.meanflow_loss(G, x, y, z, s, t, cfg, generator=torch.Generator().manual_seed(5))
    parts = [mf.meanflow_loss(G, x[a:a + 2], y[a:a + 2], z[a:a + 2], s[a:a + 2], t[a:a + 2], cfg,
                              generator=draws.BatchSlice(torch.Generator().manual_seed(5), a, 2, N))[0]
             for a in (0, 2)]
    assert math.isclose(float(whole), float(sum(parts)) / 2, rel_tol=1e-12)


# -- 8. config validation ------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("time_mean", float("nan")), ("time_std", 0.0), ("ratio_r_neq_t", 1.5), ("power", -1.0), ("eps", 0.0),
    ("cfg_omega", True), ("cfg_kappa", 1.0), ("class_drop", -0.1), ("variant", "shortcut"),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        mf.MeanFlowConfig(**{field: value})


def test_guidance_without_label_drop_is_refused():
    with pytest.raises(ValueError, match="cfg_omega/cfg_kappa.*class_drop"):
        mf.MeanFlowConfig(cfg_kappa=0.5)
    cfg = mf.MeanFlowConfig(cfg_kappa=0.5, class_drop=0.1)
    assert cfg.guided and cfg.effective_cfg_scale == 2.0
    assert not mf.MeanFlowConfig().guided


def test_a_float32_default_step_on_a_fresh_generator_trains_its_output_layer():
    G = build_generator("tiny", in_channels=C, input_size=H, num_classes=CLASSES, kind="anystep")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, H, generator=gen)
    z = draws.randn(x.shape, gen)
    s, t = mf.sample_times(N, mf.MeanFlowConfig(), generator=gen)
    loss, stats = mf.meanflow_loss(G, x, torch.arange(N), z, s, t, mf.MeanFlowConfig(), generator=gen)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(float(loss)) and stats["mf_mse"] > 0
    assert G.final_layer.linear.weight.grad.abs().sum() > 0  # adaLN-Zero: the only layer a zero map trains first
