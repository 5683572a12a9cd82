"""Tests for advflow.trainers.models: sizes, interfaces, adaLN-Zero init, depth repetition, validation."""

import pytest
import torch

from advflow.trainers.models import (
    SIZES,
    build_classifier,
    build_discriminator,
    build_generator,
    parameter_count,
    sincos_pos_embed_2d,
    timestep_features,
)

SMALL = dict(in_channels=3, input_size=8, num_classes=10)  # tiny: 4x4 = 16 tokens


def _inputs(n=3, c=3, hw=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    s = torch.rand(n, generator=g) * 0.5 + 0.5
    t = s - torch.rand(n, generator=g) * 0.5
    return x, y, s, t


@torch.no_grad()
def _randomize(model, seed=1, std=0.05):
    """Give every trainable weight non-zero values so no path is masked by the zero init."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ---------------------------------------------------------------------------------------------------
# Parameter counts (Table 10 of the paper)
# ---------------------------------------------------------------------------------------------------


def _hand_count(depth, width, patch, role, t_embedders, in_ch=4, grid=16, classes=1000):
    """Closed-form DiT parameter count, written from the architecture description."""
    d = width
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    n = depth * block
    n += in_ch * patch * patch * d + d  # patch embedding conv
    n += grid * grid * d  # frozen pos_embed (counted, as DiT does)
    n += t_embedders * (256 * d + d + d * d + d)
    n += classes * d  # class table
    if role == "G":
        n += d * patch * patch * in_ch + patch * patch * in_ch + 2 * d * d + 2 * d  # final adaLN layer
    else:
        n += d + d  # [CLS] token + bias-free logit linear
    return n


# (role, size, kind) -> paper Table 10 (millions)
PAPER = {
    ("G", "B/2", "1nfe"): 130, ("G", "M/2", "1nfe"): 306, ("G", "L/2", "1nfe"): 457, ("G", "XL/2", "1nfe"): 673,
    ("D", "B/2", None): 129, ("D", "M/2", None): 304, ("D", "L/2", None): 455, ("D", "XL/2", None): 671,
    ("G", "XL/2", "multistep"): 675,
}


@pytest.mark.parametrize("role,name,kind", list(PAPER))
def test_parameter_counts_match_paper(role, name, kind):
    with torch.device("meta"):
        model = build_generator(name, kind=kind, nfe=2 if kind == "multistep" else None) if role == "G" \
            else build_discriminator(name)
    count = parameter_count(model)
    size = SIZES[name]
    assert count == _hand_count(size.depth, size.width, size.patch, role, int(kind == "multistep"))
    paper = PAPER[(role, name, kind)] * 1e6
    assert abs(count - paper) / paper < 0.01, f"{role} {name}: {count / 1e6:.2f}M vs paper {paper / 1e6:.0f}M"


@pytest.mark.parametrize("name", ["XXS/2", "XS/2"])
def test_the_cpu_ladder_sizes_count_and_order_as_dit_sizes(name):
    """The ladder between tiny and S/2: DiT-shaped (the closed-form count), 64-channel heads as S..XL,
    and strictly between its neighbours in parameters."""
    size = SIZES[name]
    with torch.device("meta"):
        g = build_generator(name)
    assert parameter_count(g) == _hand_count(size.depth, size.width, size.patch, "G", 0)
    assert size.width // size.heads == 64 and size.patch == 2
    names = ["tiny", "XXS/2", "XS/2", "S/2"]
    with torch.device("meta"):
        counts = [parameter_count(build_generator(n)) for n in names]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_deep_generator_count_matches_paper_675m():
    with torch.device("meta"):
        deep = build_generator("XL/2", repeats=4)
    assert abs(parameter_count(deep) - 675e6) / 675e6 < 0.01


def test_trainable_count_excludes_frozen_pos_embed():
    g = build_generator("tiny", **SMALL)
    assert not g.pos_embed.requires_grad
    assert parameter_count(g) - parameter_count(g, trainable_only=True) == g.pos_embed.numel()


# ---------------------------------------------------------------------------------------------------
# Interfaces and shapes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,nfe,repeats", [("1nfe", 1, 1), ("1nfe", 1, 2), ("multistep", 4, 1), ("anystep", 2, 1)])
def test_generator_shapes_and_attributes(kind, nfe, repeats):
    g = build_generator("tiny", kind=kind, nfe=nfe, repeats=repeats, **SMALL)
    assert (g.kind, g.nfe, g.repeats, g.lr_scale) == (kind, nfe, repeats, 1.0 / repeats)
    x, y, s, t = _inputs()
    out = g(x, y, s, t) if kind != "1nfe" else g(x, y)
    assert out.shape == x.shape
    if kind != "1nfe":
        assert g.velocity(x, y, s, t).shape == x.shape


def test_discriminator_and_classifier_shapes():
    x, y, s, t = _inputs()
    assert build_discriminator("tiny", **SMALL)(x, y).shape == (3,)
    assert build_discriminator("tiny", time_cond=True, **SMALL)(x, y, t).shape == (3,)
    assert build_classifier("tiny", **SMALL)(x, t).shape == (3, 10)


def test_config_round_trips():
    g = build_generator("tiny", kind="multistep", nfe=4, **SMALL)
    g2 = build_generator(**g.config)
    assert g2.config == g.config == dict(name="tiny", kind="multistep", nfe=4, repeats=1, **SMALL)
    d = build_discriminator("tiny", time_cond=True, **SMALL)
    assert build_discriminator(**d.config).config == d.config
    c = build_classifier("tiny", **SMALL)
    assert build_classifier(**c.config).config == c.config
    assert {k: v.shape for k, v in g2.state_dict().items()} == {k: v.shape for k, v in g.state_dict().items()}


def test_defaults_are_imagenet_latents():
    with torch.device("meta"):
        g = build_generator("B/2")
    assert g.config == dict(name="B/2", in_channels=4, input_size=32, num_classes=1000, kind="1nfe", nfe=1, repeats=1)


def test_determinism():
    torch.manual_seed(0)
    a = _randomize(build_generator("tiny", kind="anystep", **SMALL))
    torch.manual_seed(0)
    b = build_generator("tiny", kind="anystep", **SMALL)
    _randomize(b)
    x, y, s, t = _inputs()
    torch.testing.assert_close(a(x, y, s, t), b(x, y, s, t), rtol=0, atol=0)
    torch.testing.assert_close(a(x, y, s, t), a(x, y, s, t), rtol=0, atol=0)


def test_velocity_form_of_step_generators():
    x, y, s, t = _inputs()
    for kind, nfe in (("multistep", 4), ("anystep", None)):
        g = _randomize(build_generator("tiny", kind=kind, nfe=nfe, **SMALL))
        v = g.velocity(x, y, s, t)
        torch.testing.assert_close(g(x, y, s, t), x - (s - t)[:, None, None, None] * v)
    # multistep embeds s only; anystep also embeds t (t=None means t=s).
    ms = _randomize(build_generator("tiny", kind="multistep", nfe=4, **SMALL))
    torch.testing.assert_close(ms.velocity(x, y, s, t), ms.velocity(x, y, s, t * 0.5))
    anys = _randomize(build_generator("tiny", kind="anystep", **SMALL))
    assert not torch.allclose(anys.velocity(x, y, s, t), anys.velocity(x, y, s, t * 0.5))
    torch.testing.assert_close(anys.velocity(x, y, s), anys.velocity(x, y, s, s))


def test_scalar_time_broadcasts():
    g = _randomize(build_generator("tiny", kind="multistep", nfe=2, **SMALL))
    x, y, _, _ = _inputs()
    torch.testing.assert_close(g(x, y, torch.tensor(1.0), torch.tensor(0.5)), g(x, y, torch.ones(3), torch.full((3,), 0.5)))


def test_gradients_reach_trainable_weights_only():
    g = build_generator("tiny", **SMALL)
    x, y, _, _ = _inputs()
    g(x, y).square().sum().backward()
    assert g.pos_embed.grad is None
    assert g.final_layer.linear.weight.grad is not None


# ---------------------------------------------------------------------------------------------------
# adaLN-Zero init
# ---------------------------------------------------------------------------------------------------


def test_blocks_are_identity_at_init():
    g = build_generator("tiny", kind="multistep", nfe=2, **SMALL)
    h = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    for block in g.blocks:
        torch.testing.assert_close(block(h, c), h, rtol=0, atol=0)


def test_generator_output_at_init():
    x, y, s, t = _inputs()
    assert torch.count_nonzero(build_generator("tiny", **SMALL)(x, y)) == 0  # zero final layer
    assert torch.count_nonzero(build_generator("tiny", repeats=2, **SMALL)(x, y)) == 0
    ms = build_generator("tiny", kind="multistep", nfe=2, **SMALL)
    torch.testing.assert_close(ms(x, y, s, t), x)  # zero velocity: the step is the identity


def test_embeddings_are_initialised_nonzero():
    g = build_generator("tiny", kind="anystep", **SMALL)
    for p in (g.y_embedder.embedding_table.weight, g.t_embedder.mlp[0].weight, g.t_tgt_embedder.mlp[2].weight, g.pos_embed):
        assert p.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Depth repetition
# ---------------------------------------------------------------------------------------------------


def test_depth_repetition_reuses_weights():
    r2 = build_generator("tiny", repeats=2, **SMALL)
    r4 = build_generator("tiny", repeats=4, **SMALL)
    r1 = build_generator("tiny", **SMALL)
    assert parameter_count(r2) == parameter_count(r4)
    t_emb = sum(p.numel() for p in r2.t_embedder.parameters())
    assert parameter_count(r2) == parameter_count(r1) + t_emb  # only the pass-time embedder is added
    assert len(r4.blocks) == SIZES["tiny"].depth

    _randomize(r2)
    r4.load_state_dict(r2.state_dict())
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in r4.blocks]
    x, y, _, _ = _inputs()
    out4 = r4(x, y)
    for h in hooks:
        h.remove()
    assert len(calls) == 4 * len(r4.blocks)  # the same blocks run R times
    assert not torch.allclose(out4, r2(x, y))  # output depends on R


def test_depth_repetition_pass_times():
    """Pass i adds the embedding of t_i = 1 - i/R: replacing it by a constant changes the output."""
    g = _randomize(build_generator("tiny", repeats=2, **SMALL))
    x, y, _, _ = _inputs()
    seen = []
    g.t_embedder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].tolist()))
    g(x, y)
    assert seen == [[1.0], [0.5]]


# ---------------------------------------------------------------------------------------------------
# Discriminator / classifier use their inputs
# ---------------------------------------------------------------------------------------------------


def test_discriminator_depends_on_x_y_and_t():
    x, y, s, t = _inputs()
    d = _randomize(build_discriminator("tiny", time_cond=True, **SMALL))
    base = d(x, y, t)
    assert not torch.allclose(base, d(x, (y + 1) % 10, t))
    assert not torch.allclose(base, d(x + 0.5 * torch.randn_like(x), y, t))
    assert not torch.allclose(base, d(x, y, t * 0.3))
    d0 = _randomize(build_discriminator("tiny", **SMALL))
    torch.testing.assert_close(d0(x, y), d0(x, y, t))  # no time conditioning: t is ignored
    assert not hasattr(d0, "t_embedder")


@pytest.mark.parametrize("role,kind", [("g", "1nfe"), ("g", "multistep"), ("g", "anystep"), ("g", "deep"),
                                       ("d", None), ("d", "time"), ("c", None)])
def test_bf16_weights_take_fp32_inputs_and_return_fp32(role, kind):
    """DeepSpeed's bf16 mode casts the module to bf16 but passes the caller's fp32 tensors through:
    every network must run in its weights' dtype and hand back the caller's dtype, with gradients
    w.r.t. its fp32 inputs (gradnorm and R1/R2 read them) in fp32."""
    x, y, s, t = _inputs()
    if role == "g":
        opts = dict(kind="1nfe" if kind == "deep" else kind, repeats=2 if kind == "deep" else 1)
        opts["nfe"] = 2 if kind == "multistep" else None
        net = _randomize(build_generator("tiny", **opts, **SMALL))
        call = (lambda m, xi: m(xi, y)) if opts["kind"] == "1nfe" else (lambda m, xi: m(xi, y, s, t))
    elif role == "d":
        net = _randomize(build_discriminator("tiny", time_cond=kind == "time", **SMALL))
        call = lambda m, xi: m(xi, y, t)  # noqa: E731
    else:
        net = _randomize(build_classifier("tiny", **SMALL))
        call = lambda m, xi: m(xi, t)  # noqa: E731
    want = call(net, x).detach()
    low = net.to(torch.bfloat16)
    xi = x.clone().requires_grad_(True)
    out = call(low, xi)
    assert out.dtype == torch.float32 and out.shape == want.shape
    err = (out.detach() - want).norm() / want.norm()
    assert err < 5e-2, f"bf16 output far from fp32: rel {err:.3g}"
    assert err > 0  # it really computed in bf16
    out.square().sum().backward()
    assert xi.grad.dtype == torch.float32 and torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0


def test_discriminator_is_constant_in_x_at_init():
    """adaLN-Zero blocks are identities, so the [CLS] readout ignores the image until trained."""
    d = build_discriminator("tiny", **SMALL)
    x, y, _, _ = _inputs()
    out = d(x, y)
    torch.testing.assert_close(out, out[:1].expand(3))
    assert out.abs().sum() > 0


def test_classifier_depends_on_x_and_t():
    x, _, _, t = _inputs()
    c = _randomize(build_classifier("tiny", **SMALL))
    base = c(x, t)
    assert not torch.allclose(base, c(x, t * 0.3))
    assert not torch.allclose(base, c(x * 0.5, t))


# ---------------------------------------------------------------------------------------------------
# Fixed embeddings vs hand formulas
# ---------------------------------------------------------------------------------------------------


def test_timestep_features_formula():
    t = torch.tensor([0.0, 3.0, 250.0])
    f = timestep_features(t, dim=8)
    for i, tv in enumerate(t.tolist()):
        for k in range(4):
            freq = 10000.0 ** (-k / 4)
            assert f[i, k].item() == pytest.approx(torch.cos(torch.tensor(tv * freq, dtype=torch.float64)).item(), abs=1e-5)
            assert f[i, 4 + k].item() == pytest.approx(torch.sin(torch.tensor(tv * freq, dtype=torch.float64)).item(), abs=1e-5)


def test_sincos_pos_embed_formula():
    grid, width = 3, 8
    table = sincos_pos_embed_2d(width, grid)
    assert table.shape == (9, 8)
    import math

    for row in range(grid):
        for col in range(grid):
            tok = table[row * grid + col]
            for half, pos in ((0, col), (4, row)):
                for k in range(2):
                    omega = 1.0 / 10000 ** (k / 2)
                    assert tok[half + k].item() == pytest.approx(math.sin(pos * omega), abs=1e-6)
                    assert tok[half + 2 + k].item() == pytest.approx(math.cos(pos * omega), abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(name="XXL/2"), "XL/2"),  # the error lists valid names
        (dict(name="tiny", repeats=0), "repeats"),
        (dict(name="tiny", kind="multistep", nfe=0), "nfe"),
        (dict(name="tiny", input_size=7), "input_size"),
        (dict(name="tiny", kind="diffusion"), "kind"),
        (dict(name="tiny", nfe=2), "nfe"),
        (dict(name="tiny", kind="multistep", nfe=2, repeats=2), "repeats"),
        (dict(name="tiny", kind="multistep"), "nfe=K"),  # multistep has no default K
        (dict(name="tiny", in_channels=0), "in_channels"),
        (dict(name="tiny", num_classes=2.5), "num_classes"),
        (dict(name="tiny", nfe=True), "nfe"),
        (dict(name="tiny", time_cond=True), "time_cond"),  # a discriminator option, not a generator one
    ],
)
def test_generator_option_errors(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("/", ".")):
        build_generator(**kwargs)


def test_discriminator_and_classifier_option_errors():
    with pytest.raises(ValueError, match="repeats"):
        build_discriminator("tiny", repeats=2)
    with pytest.raises(ValueError, match="time_cond"):
        build_discriminator("tiny", time_cond=1)
    with pytest.raises(ValueError, match="input_size"):
        build_classifier("tiny", input_size=9)


def test_forward_input_errors():
    x, y, s, t = _inputs()
    g = build_generator("tiny", **SMALL)
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 8\)"):
        g(x[:, :2], y)
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 8\)"):
        g(x[..., :4], y)
    with pytest.raises(ValueError, match="y"):
        g(x, y[:2])
    with pytest.raises(ValueError, match="integer"):
        g(x, y.float())
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        g(x, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="velocity"):
        g.velocity(x, y, s)
    ms = build_generator("tiny", kind="multistep", nfe=2, **SMALL)
    with pytest.raises(ValueError, match="s: required"):
        ms(x, y)
    with pytest.raises(ValueError, match="t: required"):
        ms(x, y, s)
    with pytest.raises(ValueError, match="shape"):
        ms(x, y, s[:2], t)
    with pytest.raises(ValueError, match="t: required"):
        build_discriminator("tiny", time_cond=True, **SMALL)(x, y)
    with pytest.raises(ValueError, match="t: required"):
        build_classifier("tiny", **SMALL)(x, None)


# ---------------------------------------------------------------------------------------------------
# Fresh init follows the official code (layers created after DiT's initialize_weights keep PyTorch's
# default init) and the step-count defaults
# ---------------------------------------------------------------------------------------------------


def _assert_default_linear_init(t, fan_in, tol=0.25):
    """nn.Linear's default: kaiming-uniform weight and bias both uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / fan_in**0.5
    assert t.abs().max().item() <= bound + 1e-7
    assert torch.count_nonzero(t) == t.numel()
    expected_std = bound / 3**0.5  # std of U(-b, b)
    assert abs(t.std().item() / expected_std - 1) < tol, (t.std().item(), expected_std)


def _assert_normal_002(t, tol=0.25):
    assert abs(t.std().item() / 0.02 - 1) < tol, t.std().item()


def _assert_dit_init(model):
    """What DiT's initialize_weights leaves: zero adaLN modulation, zero trunk / t_embedder biases."""
    for block in model.blocks:
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert torch.count_nonzero(lin.bias) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0
    if hasattr(model, "t_embedder"):
        _assert_normal_002(model.t_embedder.mlp[2].weight)
        assert torch.count_nonzero(model.t_embedder.mlp[0].bias) == 0
        assert torch.count_nonzero(model.t_embedder.mlp[2].bias) == 0
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0


def _fresh(builder, meta, **kw):
    """A freshly built model, or one built on the meta device, materialised and re-initialised."""
    torch.manual_seed(0)
    if not meta:
        return builder("tiny", **kw)
    with torch.device("meta"):
        model = builder("tiny", **kw)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # to_empty leaves garbage; make any layer init_weights misses visible
    model.init_weights()
    return model


@pytest.mark.parametrize("meta", [False, True], ids=["fresh", "meta+to_empty"])
def test_anystep_target_time_embedder_init_follows_official(meta):
    g = _fresh(build_generator, meta, kind="anystep", **SMALL)
    width = SIZES["tiny"].width
    mlp = g.t_tgt_embedder.mlp
    _assert_normal_002(mlp[0].weight)
    _assert_normal_002(mlp[2].weight)
    _assert_default_linear_init(mlp[0].bias, fan_in=256)  # PyTorch default bias, not zero
    _assert_default_linear_init(mlp[2].bias, fan_in=width)
    _assert_dit_init(g)
    assert torch.count_nonzero(g.final_layer.linear.weight) == 0 and torch.count_nonzero(g.final_layer.linear.bias) == 0
    assert not any(torch.isnan(p).any() for p in g.parameters())


@pytest.mark.parametrize("meta", [False, True], ids=["fresh", "meta+to_empty"])
def test_classifier_head_init_follows_official(meta):
    c = _fresh(build_classifier, meta, in_channels=3, input_size=8, num_classes=1000)
    width = SIZES["tiny"].width
    _assert_default_linear_init(c.final_layer[1].weight, fan_in=width)
    _assert_default_linear_init(c.final_layer[1].bias, fan_in=width)
    _assert_normal_002(c.cls_embed)
    _assert_dit_init(c)
    assert not any(torch.isnan(p).any() for p in c.parameters())


@pytest.mark.parametrize("meta", [False, True], ids=["fresh", "meta+to_empty"])
def test_discriminator_head_init_follows_official(meta):
    d = _fresh(build_discriminator, meta, time_cond=True, **SMALL)
    width = SIZES["tiny"].width
    assert d.final_layer[1].bias is None
    _assert_default_linear_init(d.final_layer[1].weight, fan_in=width)
    _assert_normal_002(d.dis_embed)
    _assert_dit_init(d)
    assert not any(torch.isnan(p).any() for p in d.parameters())


def test_other_generator_kinds_keep_dit_init():
    for kw in (dict(), dict(repeats=2), dict(kind="multistep", nfe=2)):
        g = build_generator("tiny", **kw, **SMALL)
        _assert_dit_init(g)
        assert torch.count_nonzero(g.final_layer.linear.weight) == 0


def test_nfe_defaults_by_kind():
    anys = build_generator("tiny", kind="anystep", **SMALL)
    assert anys.nfe == 8 and anys.config["nfe"] == 8  # the official any-step inference uses 8 steps
    assert build_generator(**anys.config).config == anys.config
    assert build_generator("tiny", kind="anystep", nfe=3, **SMALL).nfe == 3
    assert build_generator("tiny", **SMALL).nfe == 1
    assert build_generator("tiny", repeats=2, **SMALL).nfe == 1
    ms = build_generator("tiny", kind="multistep", nfe=4, **SMALL)
    assert build_generator(**ms.config).config == ms.config
    with pytest.raises(ValueError, match="nfe: a 'multistep' generator .* pass nfe=K"):
        build_generator("tiny", kind="multistep", **SMALL)
