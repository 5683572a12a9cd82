"""Tests for advflow.trainers.dit_checkpoint.

Also: the multistep / depth-repeated 1NFE ambiguity (refused unless an argument or a record beside
the weights says which) and jobs/register_checkpoint.py's one-line error for it.

State dicts are synthesised from a hand-written list of DiT names and shapes (not from the models'
own state_dict), loaded, and the models' outputs compared with a plain functional DiT forward pass
written here from the architecture description (explicit softmax attention, explicit patch loops).
"""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from advflow.trainers.dit_checkpoint import (
    SPEC_SIDECAR,
    AmbiguousCheckpointError,
    CheckpointError,
    build_from_checkpoint,
    infer_options,
    infer_role,
    load_dit_state_dict,
    read_recorded,
    read_state_dict,
    record_metadata,
)
from advflow.trainers.models import build_classifier, build_discriminator, build_generator

C, HW, CLASSES = 3, 8, 10
DEPTH, WIDTH, HEADS, PATCH = 2, 64, 4, 2  # the "tiny" size
SMALL = dict(in_channels=C, input_size=HW, num_classes=CLASSES)


# ---------------------------------------------------------------------------------------------------
# Synthetic DiT-layout state dicts
# ---------------------------------------------------------------------------------------------------


def dit_shapes(role="generator", t_src=False, t_tgt=False, depth=DEPTH, width=WIDTH, patch=PATCH, ch=C, hw=HW, classes=CLASSES):
    d, tokens = width, (hw // patch) ** 2
    shapes = {
        "x_embedder.proj.weight": (d, ch, patch, patch),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, tokens, d),
    }
    if role != "classifier":
        shapes["y_embedder.embedding_table.weight"] = (classes, d)
    for prefix, on in (("t_embedder", t_src or role == "classifier"), ("t_tgt_embedder", t_tgt)):
        if on:
            shapes.update({f"{prefix}.mlp.0.weight": (d, 256), f"{prefix}.mlp.0.bias": (d,),
                           f"{prefix}.mlp.2.weight": (d, d), f"{prefix}.mlp.2.bias": (d,)})
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    if role == "generator":
        shapes.update({
            "final_layer.linear.weight": (patch * patch * ch, d), "final_layer.linear.bias": (patch * patch * ch,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
        })
    elif role == "discriminator":
        shapes.update({"dis_embed": (d,), "final_layer.1.weight": (1, d)})
    else:
        shapes.update({"cls_embed": (d,), "final_layer.1.weight": (classes, d), "final_layer.1.bias": (classes,)})
    return shapes


def synth(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g) * 0.1 for k, v in dit_shapes(**kw).items()}


# ---------------------------------------------------------------------------------------------------
# Independent functional reference
# ---------------------------------------------------------------------------------------------------


def lin(sd, name, x):
    out = x @ sd[name + ".weight"].T
    return out + sd[name + ".bias"] if name + ".bias" in sd else out


def ln(x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def t_embed(sd, prefix, t):
    k = torch.arange(128, dtype=torch.float64)
    args = (1000.0 * t.double())[:, None] * torch.exp(-math.log(10000.0) * k / 128)[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], -1).float()
    return lin(sd, prefix + ".mlp.2", F.silu(lin(sd, prefix + ".mlp.0", feats)))


def block(sd, i, h, c):
    n, tokens, d = h.shape
    p = f"blocks.{i}."
    m = lin(sd, p + "adaLN_modulation.1", F.silu(c))
    sh1, sc1, g1, sh2, sc2, g2 = (m[:, j * d:(j + 1) * d, None].transpose(1, 2) for j in range(6))
    a = ln(h) * (1 + sc1) + sh1
    qkv = lin(sd, p + "attn.qkv", a)
    q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(n, tokens, HEADS, d // HEADS).transpose(1, 2) for j in range(3))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), dim=-1) @ v  # (N, H, T, hd)
    h = h + g1 * lin(sd, p + "attn.proj", att.transpose(1, 2).reshape(n, tokens, d))
    a = ln(h) * (1 + sc2) + sh2
    return h + g2 * lin(sd, p + "mlp.fc2", F.gelu(lin(sd, p + "mlp.fc1", a), approximate="tanh"))


def patch_tokens(sd, x):
    n, ch, hw, _ = x.shape
    w = sd["x_embedder.proj.weight"].reshape(WIDTH, -1)  # (D, C*p*p), flattened like the patch below
    grid = hw // PATCH
    toks = [x[:, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].reshape(n, -1) @ w.T
            for r in range(grid) for c in range(grid)]  # row-major patch order
    return torch.stack(toks, 1) + sd["x_embedder.proj.bias"] + sd["pos_embed"].reshape(1, grid * grid, WIDTH)


def ref_generator(sd, x, y, s=None, t=None, repeats=1):
    n, ch, hw, _ = x.shape
    h = patch_tokens(sd, x)
    c = sd["y_embedder.embedding_table.weight"][y]
    if "t_tgt_embedder.mlp.0.weight" in sd:
        c = c + t_embed(sd, "t_embedder", s) + t_embed(sd, "t_tgt_embedder", t)
    elif s is not None:
        c = c + t_embed(sd, "t_embedder", s)
    for r in range(repeats):
        c_r = c + t_embed(sd, "t_embedder", torch.full((n,), 1 - r / repeats)) if repeats > 1 else c
        for i in range(DEPTH):
            h = block(sd, i, h, c_r)
    m = lin(sd, "final_layer.adaLN_modulation.1", F.silu(c))
    out = lin(sd, "final_layer.linear", ln(h) * (1 + m[:, None, WIDTH:]) + m[:, None, :WIDTH])  # (N, T, p*p*C)
    img = torch.zeros_like(x)
    grid = hw // PATCH
    for tok in range(grid * grid):
        r, col = divmod(tok, grid)
        img[:, :, r * PATCH:(r + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = \
            out[:, tok].reshape(n, PATCH, PATCH, ch).permute(0, 3, 1, 2)  # per-token layout (p, p, C)
    if s is None:
        return img
    return x - (s - t)[:, None, None, None] * img


def ref_token_head(sd, x, c, token):
    h = patch_tokens(sd, x)
    h = torch.cat([sd[token].reshape(1, 1, WIDTH).expand(len(x), 1, WIDTH), h], 1)
    for i in range(DEPTH):
        h = block(sd, i, h, c)
    return lin(sd, "final_layer.1", ln(h[:, 0]))


def _inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, HW, HW, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    s = torch.rand(n, generator=g) * 0.5 + 0.5
    return x, y, s, s - 0.25


# ---------------------------------------------------------------------------------------------------
# Loading synthesised DiT checkpoints matches the reference forward
# ---------------------------------------------------------------------------------------------------

TOL = dict(rtol=1e-3, atol=1e-4)  # float32 vs a differently-ordered float32 reference; layout bugs give O(0.1) errors


@pytest.mark.parametrize("kind", ["1nfe", "multistep", "anystep"])
def test_generator_matches_reference(kind):
    sd = synth(t_src=kind != "1nfe", t_tgt=kind == "anystep")
    g = load_dit_state_dict(build_generator("tiny", kind=kind, nfe=2 if kind == "multistep" else None, **SMALL), sd)
    x, y, s, t = _inputs()
    with torch.no_grad():
        if kind == "1nfe":
            torch.testing.assert_close(g(x, y), ref_generator(sd, x, y), **TOL)
        else:
            torch.testing.assert_close(g(x, y, s, t), ref_generator(sd, x, y, s, t), **TOL)


def test_depth_repeated_generator_matches_reference():
    sd = synth(t_src=True)
    g = load_dit_state_dict(build_generator("tiny", repeats=2, **SMALL), sd)
    x, y, _, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(g(x, y), ref_generator(sd, x, y, repeats=2), **TOL)


@pytest.mark.parametrize("time_cond", [False, True])
def test_discriminator_matches_reference(time_cond):
    sd = synth(role="discriminator", t_src=time_cond)
    d = load_dit_state_dict(build_discriminator("tiny", time_cond=time_cond, **SMALL), sd)
    x, y, _, t = _inputs()
    c = sd["y_embedder.embedding_table.weight"][y] + (t_embed(sd, "t_embedder", t) if time_cond else 0)
    with torch.no_grad():
        torch.testing.assert_close(d(x, y, t), ref_token_head(sd, x, c, "dis_embed")[:, 0], **TOL)


def test_classifier_matches_reference():
    sd = synth(role="classifier")
    clf = load_dit_state_dict(build_classifier("tiny", **SMALL), sd)
    x, _, _, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(clf(x, t), ref_token_head(sd, x, t_embed(sd, "t_embedder", t), "cls_embed"), **TOL)


# ---------------------------------------------------------------------------------------------------
# Files, wrappers, prefixes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_round_trip(tmp_path, suffix):
    src = load_dit_state_dict(build_generator("tiny", kind="anystep", **SMALL), synth(t_src=True, t_tgt=True))
    path = tmp_path / f"g{suffix}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    torch.save(sd, path) if suffix == ".pt" else save_file(sd, str(path))
    dst = load_dit_state_dict(build_generator("tiny", kind="anystep", **SMALL), str(path))
    x, y, s, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(dst(x, y, s, t), src(x, y, s, t), rtol=0, atol=0)
    assert not dst.pos_embed.requires_grad


def test_wrapper_prefers_ema_and_strips_module_prefix(tmp_path):
    ema, model = synth(seed=1), synth(seed=2)
    wrapped = {"model": {"module." + k: v for k, v in model.items()}, "ema": ema, "step": 7}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    g = build_generator("tiny", **SMALL)
    load_dit_state_dict(g, path)  # a PathLike works too
    torch.testing.assert_close(g.final_layer.linear.weight, ema["final_layer.linear.weight"], rtol=0, atol=0)
    load_dit_state_dict(g, wrapped, key="model")
    torch.testing.assert_close(g.final_layer.linear.weight, model["final_layer.linear.weight"], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="key='opt' not found"):
        read_state_dict(wrapped, key="opt")
    with pytest.raises(CheckpointError, match="pass key="):
        read_state_dict({"weights": ema, "step": 1})


def test_flat_fixed_tables_are_reshaped():
    sd = synth(role="discriminator")
    sd["pos_embed"] = sd["pos_embed"].reshape(16, WIDTH)
    sd["dis_embed"] = sd["dis_embed"].reshape(1, 1, WIDTH)
    d = load_dit_state_dict(build_discriminator("tiny", **SMALL), sd)
    torch.testing.assert_close(d.pos_embed[0], sd["pos_embed"], rtol=0, atol=0)


class Arbitrary:  # any non-allowlisted class makes the pickle unsafe to load
    def __init__(self):
        self.payload = "not a tensor"


@pytest.mark.parametrize("extra", [Arbitrary(), argparse.Namespace(lr=1e-4)])
def test_pickle_with_arbitrary_objects_is_refused(tmp_path, extra):
    path = tmp_path / "unsafe.pt"
    torch.save({"ema": synth(), "args": extra}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_dit_state_dict(build_generator("tiny", **SMALL), str(path))


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(str(tmp_path / "missing.pt"))
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(str(tmp_path / "w.npz"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(str(tmp_path / "junk.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Mismatches give one clear error
# ---------------------------------------------------------------------------------------------------


def test_other_size_gives_clear_error():
    # An S/2 checkpoint (12 x 384) into a tiny model; shapes only matter, so empty tensors suffice.
    sd = {k: torch.empty(v) for k, v in dit_shapes(depth=12, width=384).items()}
    with pytest.raises(CheckpointError) as err:
        load_dit_state_dict(build_generator("tiny", **SMALL), sd)
    msg = str(err.value)
    assert "unexpected in the checkpoint" in msg and "blocks.11.attn.qkv.weight" in msg
    assert "x_embedder.proj.weight: expected (64, 3, 2, 2), got (384, 3, 2, 2)" in msg
    assert "name='S/2'" in msg and "name='tiny'" in msg
    assert "more" in msg  # long lists are truncated


def test_other_kind_gives_clear_error():
    sd = synth(t_src=True)  # multistep weights
    with pytest.raises(CheckpointError) as err:
        load_dit_state_dict(build_generator("tiny", **SMALL), sd)
    msg = str(err.value)
    assert "unexpected" in msg and "t_embedder.mlp.0.weight" in msg
    assert "kind='multistep'" in msg and "kind='1nfe'" in msg
    assert "or kind='1nfe' with repeats>1" in msg  # the weight-tied alternative is named
    with pytest.raises(CheckpointError, match="(?s)missing from the checkpoint.*t_tgt_embedder.mlp.0.weight"):
        load_dit_state_dict(build_generator("tiny", kind="anystep", **SMALL), sd)


def test_discriminator_checkpoint_into_generator():
    with pytest.raises(CheckpointError, match="looks like: discriminator"):
        load_dit_state_dict(build_generator("tiny", **SMALL), synth(role="discriminator"))


# ---------------------------------------------------------------------------------------------------
# infer_options / build_from_checkpoint
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,role,expect",
    [
        (dict(), "generator", dict(kind="1nfe", repeats=1)),
        (dict(t_src=True, t_tgt=True), "generator", dict(kind="anystep", repeats=1)),
        (dict(role="discriminator"), "discriminator", dict(time_cond=False)),
        (dict(role="discriminator", t_src=True), "discriminator", dict(time_cond=True)),
        (dict(role="classifier"), "classifier", dict()),
    ],
)
def test_infer_options(kw, role, expect):
    sd = {k: torch.empty(v) for k, v in dit_shapes(**kw).items()}
    assert infer_role(sd) == role
    assert infer_options(sd) == dict(name="tiny", **SMALL, **expect)


def test_infer_options_xl_shapes():
    sd = {k: torch.empty(v) for k, v in dit_shapes(depth=28, width=1152, ch=4, hw=32, classes=1000).items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.") or k.startswith("blocks.27.")}  # depth from index
    assert infer_options(sd)["name"] == "XL/2"
    assert infer_options(sd)["input_size"] == 32 and infer_options(sd)["num_classes"] == 1000


def test_infer_options_depth_repetition_hints():
    sd = {k: torch.empty(v) for k, v in dit_shapes(t_src=True).items()}
    assert infer_options(sd, repeats=2)["kind"] == "1nfe"
    assert infer_options(sd, kind="1nfe", repeats=4)["repeats"] == 4
    with pytest.raises(CheckpointError, match="repeats>1"):
        infer_options(sd, kind="1nfe")  # 1NFE without repetition has no t_embedder


def test_infer_options_errors():
    sd = {k: torch.empty(v) for k, v in dit_shapes().items()}
    sigma = dict(sd, **{"final_layer.linear.weight": torch.empty(4 * 2 * C, WIDTH)})
    with pytest.raises(CheckpointError, match="learn_sigma"):
        infer_options(sigma)
    odd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match="depth=1"):
        infer_options(odd)


def test_build_from_checkpoint(tmp_path):
    sd = synth(t_src=True)
    path = tmp_path / "deep.safetensors"
    save_file(sd, str(path))
    g = build_from_checkpoint(str(path), kind="1nfe", repeats=2)
    assert (g.kind, g.repeats) == ("1nfe", 2)
    x, y, _, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(g(x, y), ref_generator(sd, x, y, repeats=2), **TOL)
    ms = build_from_checkpoint(sd, kind="multistep", nfe=4)
    assert (ms.kind, ms.nfe) == ("multistep", 4)
    d = build_from_checkpoint(synth(role="discriminator"))
    assert d.config == dict(name="tiny", time_cond=False, **SMALL)
    with pytest.raises(CheckpointError, match="only apply to generators"):
        build_from_checkpoint(synth(role="discriminator"), kind="1nfe")


# ---------------------------------------------------------------------------------------------------
# Ambiguous layout: multistep vs depth-repeated 1NFE (t_embedder, no t_tgt_embedder)
# ---------------------------------------------------------------------------------------------------

def _assert_names_both(msg):
    assert "multistep generator" in msg and "depth-repeated 1NFE generator" in msg
    assert "kind='multistep' with nfe=K" in msg and "repeats=R" in msg
    assert "--kind multistep --nfe K" in msg and "--repeats R" in msg  # the CLI flags too
    assert "advflow.kind" in msg and "generator.json" in msg  # how to record it


def _save(path, sd, metadata=None):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    else:
        torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_ambiguous_layout_is_refused(tmp_path, suffix):
    sd = synth(t_src=True)
    with pytest.raises(AmbiguousCheckpointError) as err:
        infer_options(sd)
    _assert_names_both(str(err.value))
    assert "\n" not in str(err.value)
    path = _save(tmp_path / f"g{suffix}", sd)
    for call in (lambda: build_from_checkpoint(path), lambda: build_from_checkpoint(sd), lambda: build_from_checkpoint(path, nfe=4)):
        with pytest.raises(AmbiguousCheckpointError) as err:
            call()
        _assert_names_both(str(err.value))
        cli = err.value.cli
        assert "\n" not in cli and "--kind multistep --nfe K" in cli and "--repeats R" in cli


def test_ambiguous_layout_accepted_with_kind_given():
    sd = synth(t_src=True)
    assert infer_options(sd, kind="multistep")["kind"] == "multistep"
    assert infer_options(sd, repeats=1)["kind"] == "multistep"  # R = 1: not depth-repeated
    assert (infer_options(sd, repeats=2)["kind"], infer_options(sd, repeats=2)["repeats"]) == ("1nfe", 2)
    ms = build_from_checkpoint(sd, kind="multistep", nfe=2)
    assert (ms.kind, ms.nfe, ms.repeats) == ("multistep", 2, 1)
    x, y, s, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ms(x, y, s, t), ref_generator(sd, x, y, s, t), **TOL)
    deep = build_from_checkpoint(sd, repeats=2)
    assert (deep.kind, deep.nfe, deep.repeats) == ("1nfe", 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(deep(x, y), ref_generator(sd, x, y, repeats=2), **TOL)
    with pytest.raises(CheckpointError) as err:  # the weights do not record K
        build_from_checkpoint(sd, kind="multistep")
    assert "nfe=K" in str(err.value) and err.value.cli.endswith("pass --nfe K")
    with pytest.raises(CheckpointError, match="repeats>1"):
        infer_options(sd, kind="1nfe")


def test_ambiguous_layout_accepted_with_kind_in_safetensors_metadata(tmp_path):
    sd = synth(t_src=True)
    deep = _save(tmp_path / "deep.safetensors", sd, {"advflow.kind": "1nfe", "advflow.repeats": "2"})
    assert read_recorded(deep) == {"kind": "1nfe", "repeats": 2}
    g = build_from_checkpoint(deep)
    assert (g.kind, g.repeats) == ("1nfe", 2)
    x, y, s, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(g(x, y), ref_generator(sd, x, y, repeats=2), **TOL)
    only_r = _save(tmp_path / "r4.safetensors", sd, {"advflow.repeats": "4"})  # R > 1 alone is 1NFE
    assert build_from_checkpoint(only_r).repeats == 4
    ms = build_from_checkpoint(_save(tmp_path / "ms.safetensors", sd, record_metadata(build_generator(
        "tiny", kind="multistep", nfe=4, **SMALL))))
    assert (ms.kind, ms.nfe) == ("multistep", 4)  # K comes from the record too
    assert infer_options(read_state_dict(deep), recorded=read_recorded(deep))["repeats"] == 2
    # the same tensors without the record are refused again
    with pytest.raises(AmbiguousCheckpointError):
        build_from_checkpoint(_save(tmp_path / "plain.safetensors", sd, {"format": "pt"}))


def test_ambiguous_layout_accepted_with_kind_in_stem_sidecar(tmp_path):
    sd = synth(t_src=True)
    path = _save(tmp_path / "afm_deep.pt", sd)
    (tmp_path / "afm_deep.json").write_text(json.dumps({"kind": "multistep", "nfe": 3}))
    g = build_from_checkpoint(path)
    assert (g.kind, g.nfe, g.repeats) == ("multistep", 3, 1)
    assert "afm_deep.json" in read_recorded(path).sources["kind"]


def test_ambiguous_layout_accepted_with_advflow_generator_json(tmp_path):
    """generator.json as advflow's model folders carry it (written by model_format.write_model_data)."""
    from advflow.platform.tracking import model_format

    assert SPEC_SIDECAR == model_format.SPEC_FILE
    src = load_dit_state_dict(build_generator("tiny", repeats=2, **SMALL), synth(t_src=True))
    spec = model_format.GeneratorSpec(generator=src.config, decoder={"name": "pixel"}, data_shape=(C, HW, HW),
                                      num_classes=CLASSES)
    out = model_format.write_model_data(src, spec, tmp_path / "data")
    weights = str(out / model_format.WEIGHTS_FILE)
    g = build_from_checkpoint(weights)
    assert g.config == src.config
    x, y, _, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(g(x, y), src(x, y), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="repeats=2"):  # a model of another kind does not load it
        load_dit_state_dict(build_generator("tiny", kind="multistep", nfe=2, **SMALL), weights)


def test_recorded_kind_contradicting_an_argument_is_refused(tmp_path):
    sd = synth(t_src=True)
    meta = _save(tmp_path / "ms.safetensors", sd, {"advflow.kind": "multistep", "advflow.nfe": "4"})
    with pytest.raises(CheckpointError) as err:
        build_from_checkpoint(meta, repeats=2)
    msg = str(err.value)
    assert "repeats=2" in msg and "kind='multistep'" in msg and "safetensors metadata" in msg
    assert err.value.cli.startswith("--repeats 2 contradicts kind='multistep'")
    with pytest.raises(CheckpointError, match="nfe=2.*contradict.*nfe=4"):
        build_from_checkpoint(meta, kind="multistep", nfe=2)  # K is part of a multistep model
    assert build_from_checkpoint(meta, kind="multistep").nfe == 4  # agreeing argument: fine
    side = _save(tmp_path / "deep.pt", sd)
    (tmp_path / "deep.json").write_text(json.dumps({"kind": "1nfe", "repeats": 2}))
    with pytest.raises(CheckpointError, match="kind='multistep'.*contradict.*kind='1nfe', repeats=2.*deep.json"):
        build_from_checkpoint(side, kind="multistep", nfe=2)
    # Two records that disagree (metadata vs the directory's generator.json)
    both = _save(tmp_path / "both.safetensors", sd, {"advflow.kind": "multistep"})
    (tmp_path / SPEC_SIDECAR).write_text(json.dumps({"format": "advflow-generator", "generator": {"kind": "1nfe", "repeats": 2}}))
    with pytest.raises(CheckpointError, match="(?s)kind='multistep' recorded in safetensors metadata.*contradicts.*generator.json"):
        read_recorded(both)


def test_record_that_does_not_fit_the_tensors_or_is_invalid(tmp_path):
    sd = synth(t_src=True)
    with pytest.raises(CheckpointError, match="t_tgt_embedder=True.*recorded"):
        build_from_checkpoint(_save(tmp_path / "a.safetensors", sd, {"advflow.kind": "anystep"}))
    with pytest.raises(CheckpointError, match="diffusion"):
        read_recorded(_save(tmp_path / "b.safetensors", sd, {"advflow.kind": "diffusion"}))
    with pytest.raises(CheckpointError, match="repeats='two'"):
        read_recorded(_save(tmp_path / "c.safetensors", sd, {"advflow.repeats": "two"}))
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        read_recorded(_save(tmp_path / "d.pt", sd))
    (tmp_path / "e.json").write_text(json.dumps({"fid": 2.1}))  # not a record: ignored
    assert read_recorded(_save(tmp_path / "e.pt", sd)) == {}


def test_unambiguous_layouts_unaffected(tmp_path):
    one = synth()  # 1NFE, no t_embedder
    assert infer_options(one)["kind"] == "1nfe"
    g = build_from_checkpoint(_save(tmp_path / "one.pt", one))
    assert (g.kind, g.nfe, g.repeats) == ("1nfe", 1, 1)
    anys = synth(t_src=True, t_tgt=True)
    assert infer_options(anys)["kind"] == "anystep"
    a = build_from_checkpoint(_save(tmp_path / "any.safetensors", anys))
    assert (a.kind, a.nfe) == ("anystep", 8)  # the any-step default step count
    assert build_from_checkpoint(anys, nfe=4).nfe == 4
    a4 = _save(tmp_path / "any4.safetensors", anys, {"advflow.kind": "anystep", "advflow.nfe": "4"})
    assert build_from_checkpoint(a4).nfe == 4
    assert build_from_checkpoint(a4, nfe=2).nfe == 2  # an any-step K is only a default: may be overridden
    # a directory-wide generator.json does not touch discriminators
    (tmp_path / SPEC_SIDECAR).write_text(json.dumps({"generator": {"kind": "1nfe", "repeats": 2}}))
    d = build_from_checkpoint(_save(tmp_path / "d.pt", synth(role="discriminator", t_src=True)))
    assert d.config["time_cond"] is True


def _register_job():
    path = Path(__file__).resolve().parents[1] / "jobs" / "register_checkpoint.py"
    spec = importlib.util.spec_from_file_location("register_checkpoint_job_loader", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.integration  # end-to-end: runs the register_checkpoint job's main over a real checkpoint (seconds)
def test_register_checkpoint_ambiguity_error_is_one_line_naming_the_flags(tmp_path, capsys):
    pytest.importorskip("mlflow")
    job = _register_job()
    path = _save(tmp_path / "g.safetensors", synth(t_src=True))
    assert job.main(["--checkpoint", path, "--name", "x", "--decoder", "pixel"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"[advflow] register_checkpoint: --checkpoint {path}: ambiguous")
    assert "--kind multistep --nfe K" in err and "--repeats R" in err
    assert job.main(["--checkpoint", path, "--name", "x", "--decoder", "pixel", "--kind", "multistep"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("pass --nfe K")
