"""AFM step functions against hand-assembled references (separate D calls, softplus by hand)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advflow.trainers.afm import AFMConfig, d_loss, g_loss, gp_size, make_gradnorm, step_kind
from advflow.trainers.ema import EMA
from advflow.trainers.models import build_classifier, build_discriminator, build_generator
from advflow.trainers.schedules import PhasePlan

N, C, H = 8, 1, 8
OPTS = dict(in_channels=C, input_size=H, num_classes=10)


def _jitter(m: nn.Module, seed: int) -> nn.Module:
    """adaLN-Zero makes fresh DiTs ignore their input; random offsets make every path matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _gen(kind, nfe=1, seed=0):
    torch.manual_seed(seed)
    return _jitter(build_generator("tiny", kind=kind, nfe=nfe, **OPTS), seed + 100)


def _disc(time_cond, seed=1):
    torch.manual_seed(seed)
    return _jitter(build_discriminator("tiny", time_cond=time_cond, **OPTS), seed + 100)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, H, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    z = torch.randn(N, C, H, H, generator=g)
    x_src = torch.randn(N, C, H, H, generator=g)
    y_src = torch.randint(0, 10, (N,), generator=g)
    noise = torch.randn(N, C, H, H, generator=g)
    return x, y, z, x_src, y_src, noise


def _hand_interp(x, z, t):
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x + tt * z


def _softplus_neg(d):  # softplus(-d) = log(1 + exp(-d))
    return torch.log1p(torch.exp(-d))


def _official_gp_size(fraction, n):
    """The official R1/R2 subset: max(round(fraction * n), 1) with Python's round (halves to even)."""
    r = fraction * n
    lo = math.floor(r)
    k = lo + 1 if r - lo > 0.5 or (r - lo == 0.5 and lo % 2 == 1) else lo
    return max(k, 1)


def test_gp_subset_size_is_the_official_one():
    sizes = {n: gp_size(0.25, n) for n in range(1, 65)}
    assert all(sizes[n] == _official_gp_size(0.25, n) for n in sizes)
    # The official rule is not ceil: 0.25 * 6 = 1.5 -> 2, 0.25 * 10 = 2.5 -> 2, 0.25 * 2 = 0.5 -> 1.
    assert (sizes[6], sizes[10], sizes[2], sizes[5]) == (2, 2, 1, 1)
    differ = [n for n in sizes if sizes[n] != math.ceil(0.25 * n)]
    assert len(differ) == 22, differ  # the count of batch sizes where ceil disagreed
    assert gp_size(0.01, 3) == 1  # never empty


def _ref_d_loss(G, D, x, y, z, x_src, y_src, s, t, noise, cfg, seed, one_step):
    """Independent assembly with four separate D calls; perturbation noise drawn in d_loss's order
    (real first, then fake) from a generator with the same seed."""
    with torch.no_grad():
        if one_step:
            fake, real, y_f = G(z, y), x, y
        else:
            fake, real, y_f = G(_hand_interp(x_src, z, s), y_src, s, t), _hand_interp(x, noise, t), y_src
    m = _official_gp_size(cfg.gp_fraction, N)
    sel = [i * N // m for i in range(m)]  # evenly spaced (the official code takes the first m: same law)
    g = torch.Generator().manual_seed(seed)
    n_real = torch.randn((m, C, H, H), generator=g)
    n_fake = torch.randn((m, C, H, H), generator=g)
    eps = cfg.gp_eps
    w = torch.maximum((s - t).abs(), torch.tensor(1e-3))
    dr, df = D(real, y, t), D(fake, y_f, t)
    drp = D(real[sel] + eps * n_real, y[sel], t[sel])
    dfp = D(fake[sel] + eps * n_fake, y_f[sel], t[sel])
    adv = _softplus_neg(dr - df).mean()
    r1 = (w[sel] * (drp - dr[sel]) ** 2).mean() / eps**2
    r2 = (w[sel] * (dfp - df[sel]) ** 2).mean() / eps**2
    cp = ((dr + df) ** 2).mean()
    return adv + cfg.lambda_gp * (r1 + r2) + cfg.lambda_cp * cp, (adv, r1, r2, cp)


@pytest.mark.parametrize("fused", [True, False])
def test_d_loss_multistep_matches_reference(fused):
    G, D = _gen("multistep", nfe=4), _disc(True)
    x, y, z, x_src, y_src, noise = _batch()
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25])
    t = s - 0.25
    cfg = AFMConfig(fused_d=fused)
    loss, met = d_loss(G, D, x, y, z, cfg, x_src=x_src, y_src=y_src, s=s, t=t, noise=noise,
                       generator=torch.Generator().manual_seed(7))
    ref, (adv, r1, r2, cp) = _ref_d_loss(G, D, x, y, z, x_src, y_src, s, t, noise, cfg, 7, one_step=False)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(met["d_adv"], adv.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(met["r1"], r1.detach(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(met["r2"], r2.detach(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(met["cp"], cp.detach(), rtol=1e-4, atol=1e-6)
    assert met["r1"] > 0 and met["r2"] > 0  # the penalties are live, not trivially zero


def test_d_loss_fused_equals_separate_calls_anystep_with_sampled_times():
    G, D = _gen("anystep", nfe=2), _disc(True)
    x, y, z, *_ = _batch(1)
    out = {}
    for fused in (True, False):
        out[fused] = d_loss(G, D, x, y, z, AFMConfig(fused_d=fused), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    for k in out[True][1]:
        torch.testing.assert_close(out[True][1][k], out[False][1][k], rtol=1e-3, atol=1e-5)


def test_d_loss_1nfe_matches_reference_and_gives_g_no_grad():
    G, D = _gen("1nfe"), _disc(False)
    x, y, z, *_ = _batch(2)
    cfg = AFMConfig(lambda_gp=0.5, lambda_cp=0.1)
    loss, _ = d_loss(G, D, x, y, z, cfg, generator=torch.Generator().manual_seed(5))
    ref, _ = _ref_d_loss(G, D, x, y, z, None, None, torch.ones(N), torch.zeros(N), None, cfg, 5, one_step=True)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in G.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())


def test_d_loss_without_gradient_penalty():
    G, D = _gen("1nfe"), _disc(False)
    x, y, z, *_ = _batch(3)
    loss, met = d_loss(G, D, x, y, z, AFMConfig(lambda_gp=0.0))
    assert met["r1"] == 0 and met["r2"] == 0
    torch.testing.assert_close(loss, met["d_adv"] + 0.01 * met["cp"])


def _ref_g_loss(G, D, x, y, z, x_src, y_src, s, t, noise, lambda_ot):
    fake = G(_hand_interp(x_src, z, s), y_src, s, t)
    real = _hand_interp(x, noise, t)
    dr, df = D(real, y, t), D(fake, y_src, t)
    adv = _softplus_neg(df - dr).mean()
    w = torch.maximum((s - t).abs(), torch.tensor(1e-3))
    x_s = _hand_interp(x_src, z, s)
    ot = torch.stack([((fake[i] - x_s[i]) ** 2).mean() / w[i] for i in range(N)]).mean()
    return adv + lambda_ot * ot, fake, adv, ot


@pytest.mark.parametrize("use_gradnorm", [False, True])
def test_g_loss_matches_reference_and_leaves_d_untouched(use_gradnorm):
    G, D = _gen("multistep", nfe=4), _disc(True)
    x, y, z, x_src, y_src, noise = _batch(4)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25] * 2)
    t = s - 0.25
    cfg = AFMConfig(lambda_ot=0.3, use_gradnorm=use_gradnorm)
    gn = make_gradnorm(cfg) if use_gradnorm else None
    loss, met = g_loss(G, D, gn, x, y, z, cfg, x_src=x_src, y_src=y_src, s=s, t=t, noise=noise)
    G_ref, D_ref = _gen("multistep", nfe=4), _disc(True)  # same seeds: identical copies
    ref, _, adv, ot = _ref_g_loss(G_ref, D_ref, x, y, z, x_src, y_src, s, t, noise, 0.3)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(met["g_adv"], adv.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(met["ot"], ot.detach(), rtol=1e-4, atol=1e-6)
    assert met["ot"] > 0
    loss.backward()
    # guarantee: D's parameters get no gradient from the G step and are trainable again afterwards
    assert all(p.grad is None for p in D.parameters())
    assert [n for n, p in D.named_parameters() if not p.requires_grad] == ["pos_embed"]  # as built
    if not use_gradnorm:
        ref.backward()
        for (name, p), q in zip(G.named_parameters(), G_ref.parameters()):
            if not p.requires_grad:  # the frozen sin-cos pos_embed
                continue
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6)
    else:
        assert gn.count.item() == 1 and met["gn_scale"] == 1.0  # scale logged from the previous backward


class _Scaled(nn.Module):
    """D with its logits multiplied by a constant."""

    def __init__(self, D, scale):
        super().__init__()
        self.D, self.scale = D, scale

    def forward(self, x, y, t=None):
        return self.D(x, y, t) * self.scale


@pytest.mark.parametrize("use_gradnorm", [True, False])
def test_gradnorm_makes_g_gradient_invariant_to_logit_scale(use_gradnorm):
    # lambda_ot = 0: only the adversarial branch drives G. With tiny logits softplus is ~linear, so
    # D scaled by 1e-3 or 1e-1 gives adversarial gradients that differ by ~100x; the normaliser
    # must cancel that (and without it the gradients must differ, or the test proves nothing).
    x, y, z, *_ = _batch(5)
    grads = []
    for scale in (1e-3, 1e-1):
        G, D = _gen("1nfe"), _disc(False)
        cfg = AFMConfig(lambda_ot=0.0, use_gradnorm=use_gradnorm)
        loss, _ = g_loss(G, _Scaled(D, scale), make_gradnorm(cfg), x, y, z, cfg)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in G.parameters() if p.grad is not None]))
    ratio = (grads[1].norm() / grads[0].norm()).item()
    if use_gradnorm:
        assert ratio == pytest.approx(1.0, rel=0.02)
        assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
    else:
        assert ratio == pytest.approx(100.0, rel=0.05)


def test_g_loss_classifier_guidance_target_mode():
    """Official multi-step guidance: the classifier sees G's output x_t itself at t' = t, samples with
    t outside [lo, hi] count 0, and the mean is over the WHOLE batch."""
    G, D = _gen("multistep", nfe=4), _disc(True)
    torch.manual_seed(9)
    clf = _jitter(build_classifier("tiny", **OPTS), 9)
    x, y, z, x_src, y_src, noise = _batch(6)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25] * 2)
    t = s - 0.25  # 0.75, 0.5, 0.25, 0.0: guidance applies where t <= 0.49
    cfg = AFMConfig(lambda_ot=0.1, lambda_cg=0.02, cg_t_mode="target", cg_t_range=(0.0, 0.49), use_gradnorm=False)
    loss, met = g_loss(G, D, None, x, y, z, cfg, classifier=clf, x_src=x_src, y_src=y_src, s=s, t=t,
                       noise=noise, generator=torch.Generator().manual_seed(1))
    base, fake, _, _ = _ref_g_loss(G, D, x, y, z, x_src, y_src, s, t, noise, 0.1)
    mask = t <= 0.49
    assert mask.sum() == 4
    logp = torch.log_softmax(clf(fake, t), dim=1)  # un-noised x_t at its own time
    per = -logp[torch.arange(N), y_src]
    ce = torch.stack([per[i] if mask[i] else per[i] * 0 for i in range(N)]).sum() / N
    torch.testing.assert_close(met["cg"], ce.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, (base + 0.02 * ce).detach(), rtol=1e-4, atol=1e-6)
    # Not the selected-only mean (which would make lambda_cg 2x here) and not a re-noised input.
    assert not torch.isclose(met["cg"], per[mask].mean().detach(), rtol=1e-3)
    for p in list(D.parameters()) + list(clf.parameters()):
        p.grad = None
    loss.backward()
    assert all(p.grad is None for p in clf.parameters())
    assert [n for n, p in clf.named_parameters() if not p.requires_grad] == ["pos_embed"]  # restored
    assert all(p.grad is None for p in D.parameters())


def test_g_loss_classifier_guidance_uniform_mode_1nfe():
    G, D = _gen("1nfe"), _disc(False)
    torch.manual_seed(9)
    clf = _jitter(build_classifier("tiny", **OPTS), 9)
    x, y, z, *_ = _batch(7)
    cg_noise = torch.randn(N, C, H, H, generator=torch.Generator().manual_seed(8))
    cfg = AFMConfig(lambda_ot=0.2, lambda_cg=0.003, cg_t_range=(0.0, 0.1), use_gradnorm=False)
    _, met = g_loss(G, D, None, x, y, z, cfg, classifier=clf, cg_noise=cg_noise,
                    generator=torch.Generator().manual_seed(11))
    # the only draw from the generator in this configuration is t' ~ U(0, 0.1)
    tp = 0.1 * torch.rand(N, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        fake = G(z, y)
        ce = F.cross_entropy(clf(_hand_interp(fake, cg_noise, tp), tp), y)
    torch.testing.assert_close(met["cg"], ce, rtol=1e-4, atol=1e-6)


def test_g_loss_argument_errors():
    G, D = _gen("1nfe"), _disc(False)
    x, y, z, *_ = _batch(8)
    with pytest.raises(ValueError, match="gradnorm"):
        g_loss(G, D, None, x, y, z, AFMConfig())
    with pytest.raises(ValueError, match="classifier"):
        g_loss(G, D, None, x, y, z, AFMConfig(use_gradnorm=False, lambda_cg=0.1))
    with pytest.raises(ValueError, match="both s and t"):
        d_loss(G, D, x, y, z, AFMConfig(), s=torch.ones(N))


class _Spy(nn.Module):
    """Wraps a generator and records what it is called with."""

    def __init__(self, G):
        super().__init__()
        self.G, self.kind, self.nfe, self.repeats = G, G.kind, G.nfe, G.repeats
        self.seen = []

    def forward(self, x, y, s=None, t=None):
        self.seen.append((x.detach().clone(), y.clone()))
        return self.G(x, y, s, t)


def test_default_source_is_the_same_image_with_independent_noises():
    """Official pairing: x_s = interp(x, z, s) and the real target interp(x, noise, t) come from the
    same image and label, with independent noises."""
    spy = _Spy(_gen("multistep", nfe=2))
    D = _disc(True)
    x, y, z, *_ = _batch(9)
    s, t = torch.full((N,), 1.0), torch.full((N,), 0.5)
    assert AFMConfig().source == "same"
    d_loss(spy, D, x, y, z, AFMConfig(), s=s, t=t, generator=torch.Generator().manual_seed(2))
    x_s, y_src = spy.seen[0]
    torch.testing.assert_close(x_s, _hand_interp(x, z, s))
    assert torch.equal(y_src, y)


def test_permute_source_pairs_images_with_their_labels():
    spy = _Spy(_gen("multistep", nfe=2))
    D = _disc(True)
    x, _, z, *_ = _batch(9)
    y = torch.arange(N) % 10  # distinct labels identify the images
    s = torch.full((N,), 1.0)
    t = torch.full((N,), 0.5)
    d_loss(spy, D, x, y, z, AFMConfig(source="permute"), s=s, t=t, generator=torch.Generator().manual_seed(2))
    x_s, y_src = spy.seen[0]
    perm = y_src  # labels are the indices here
    assert sorted(perm.tolist()) == list(range(N)) and perm.tolist() != list(range(N))
    torch.testing.assert_close(x_s, _hand_interp(x[perm], z, s))
    spy.seen.clear()
    d_loss(spy, D, x, y, z, AFMConfig(source="same"), s=s, t=t)
    torch.testing.assert_close(spy.seen[0][0], _hand_interp(x, z, s))
    assert torch.equal(spy.seen[0][1], y)


def test_step_kind():
    assert [step_kind(k) for k in range(4)] == ["d", "g", "d", "g"]
    assert "".join(step_kind(k, d_steps=2, g_steps=1) for k in range(6)) == "ddgddg"
    assert "".join(step_kind(k, d_steps=1, g_steps=3) for k in range(8)) == "dgggdggg"
    for bad in (dict(d_steps=0), dict(g_steps=1.5)):
        with pytest.raises(ValueError, match="steps"):
            step_kind(0, **bad)
    with pytest.raises(ValueError, match="k must be"):
        step_kind(-1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(lambda_gp=-1.0), "lambda_gp"),
        (dict(gp_fraction=0.0), "gp_fraction"),
        (dict(gp_eps=0.0), "gp_eps"),
        (dict(cg_t_range=(0.3, 0.1)), "cg_t_range"),
        (dict(cg_t_mode="late"), "cg_t_mode"),
        (dict(augment_p=2.0), "augment_p"),
        (dict(source="other"), "source"),
        (dict(lambda_ot=float("nan")), "lambda_ot"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AFMConfig(**kwargs)


def test_mini_training_loop_with_phases_ema_and_augmentation():
    """Wiring check: alternate D/G steps under a phase plan with augmentation and EMA reload."""
    torch.manual_seed(0)
    G = build_generator("tiny", kind="anystep", nfe=2, **OPTS)
    D = build_discriminator("tiny", time_cond=True, **OPTS)
    plan = PhasePlan.from_dict([
        {"start": 0, "lr": 1e-3, "lambda_ot": {"kind": "cosine", "start": 0.2, "end": 0.01, "steps": 4}},
        {"start": 4, "lr": 5e-4, "ema_reload_every": 2, "augment_p": 0.5},
    ])
    opt_g = torch.optim.AdamW(G.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.AdamW(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
    ema, base = EMA(G, decay=0.9), AFMConfig()
    gn = make_gradnorm(base)
    gen = torch.Generator().manual_seed(0)
    reloads = 0
    for k in range(8):
        for ev in plan.events(k):
            if ev.kind == "ema_reload":
                ema.copy_to(G)
                reloads += 1
        hp = plan.at(k)
        cfg = base.with_phase(hp)
        x = torch.randn(N, C, H, H, generator=gen)
        y = torch.randint(0, 10, (N,), generator=gen)
        z = torch.randn(N, C, H, H, generator=gen)
        if step_kind(k) == "d":
            loss, met = d_loss(G, D, x, y, z, cfg, generator=gen)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()
        else:
            loss, met = g_loss(G, D, gn, x, y, z, cfg, generator=gen)
            opt_g.zero_grad(set_to_none=True)
            d_grads = [None if p.grad is None else p.grad.clone() for p in D.parameters()]
            loss.backward()
            for p, before in zip(D.parameters(), d_grads):  # the G step leaves D's grads as they were
                assert (p.grad is None and before is None) or torch.equal(p.grad, before)
            opt_g.step()
            ema.update(G)
        assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in met.values())
    assert reloads == 1 and ema.num_updates == 4 and gn.count.item() == 4


def test_gradnorm_sits_at_ds_augmented_input():
    """Official placement: the divisor is measured on the gradient D sends to its (augmented) input,
    so erased pixels count in the norm; measured before the augmentation it would differ."""
    from advflow.trainers.augment import paired_augment
    from advflow.trainers.losses import relativistic_loss

    G, D = _gen("1nfe"), _disc(False)
    x, y, z, *_ = _batch(12)
    cfg = AFMConfig(lambda_ot=0.0, augment_p=1.0)
    gn = make_gradnorm(cfg)
    g_loss(G, D, gn, x, y, z, cfg, generator=torch.Generator().manual_seed(4))[0].backward()
    # Hand reference: the same augmentation draw (1NFE draws nothing before it), gradient at D's input.
    with torch.no_grad():
        fake = G(z, y)
    real_aug, fake_aug = paired_augment(x, fake, 1.0, torch.Generator().manual_seed(4))
    at_input = fake_aug.detach().requires_grad_(True)
    relativistic_loss(D(at_input, y, None), D(real_aug, y, None).detach()).backward()
    g = at_input.grad
    want = math.sqrt(0.1 * g.numel() * g.square().sum().item()) + 1e-8
    assert gn.scale.item() == pytest.approx(want, rel=1e-5)
    # The gradient that reaches the un-augmented fake has a different norm (erased pixels drop out).
    before = fake.clone().requires_grad_(True)
    r2, f2 = paired_augment(x, before, 1.0, torch.Generator().manual_seed(4))
    relativistic_loss(D(f2, y, None), D(r2, y, None).detach()).backward()
    other = math.sqrt(0.1 * before.grad.numel() * before.grad.square().sum().item())
    assert abs(other - want) / want > 0.05
