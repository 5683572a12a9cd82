"""Importing the official SiT / CAFM-SiT generator layout (advflow.trainers.dit_checkpoint.convert_cafm_sit,
build_from_cafm_sit; jobs/register_checkpoint.py --layout cafm-sit).

Fake official state dicts: SiT's key names and shapes (learn_sigma: 2C output channels; the class table
with its null row) at the "tiny" size, random weights, saved with torch.save as CAFM's trainer does. The
reference is a functional SiT forward written here from the architecture (sinusoids of t itself, [cos |
sin]; unpatchify (p, q, c); keep channels [0, C)) wrapped as CAFM's Generator: -SiT(x, 1 - t, y).
"""

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advflow.trainers.dit_checkpoint import (
    SIT_TIME_SCALE,
    CheckpointError,
    _fold_time_flip,
    build_from_cafm_sit,
    convert_cafm_sit,
)
from advflow.trainers.models import build_generator

C, HW, CLASSES = 4, 8, 10  # latents; the table has CLASSES + 1 rows (null row last)
DEPTH, WIDTH, HEADS, PATCH = 2, 64, 4, 2  # "tiny"
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 model vs float32 reference
EXACT = dict(rtol=1e-10, atol=1e-10)  # float64: the conversion is an identity, up to rounding


def sit_shapes(learn_sigma=True):
    d, tokens, out = WIDTH, (HW // PATCH) ** 2, (2 if learn_sigma else 1) * C
    shapes = {
        "x_embedder.proj.weight": (d, C, PATCH, PATCH), "x_embedder.proj.bias": (d,),
        "pos_embed": (1, tokens, d),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, d),
        "final_layer.linear.weight": (PATCH * PATCH * out, d), "final_layer.linear.bias": (PATCH * PATCH * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def fake_sit(seed=0, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v, generator=g, dtype=torch.float64) * 0.2).to(dtype) for k, v in sit_shapes(**kw).items()}


# ---------------------------------------------------------------------------------------------------
# Functional reference (written from SiT's architecture, not from advflow's modules)
# ---------------------------------------------------------------------------------------------------


def lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def ln(x):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6)


def sinusoids(t):  # SiT's timestep_embedding of t itself: [cos | sin], frequencies 10000^(-k/128)
    k = torch.arange(128, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-math.log(10000.0) * k / 128)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1).to(t.dtype)


def dit_net(sd, x, y, tau):
    """The adaLN transformer on state dict sd; tau: the time whose sinusoids t_embedder sees. Returns
    all output channels (N, out, H, W)."""
    n = x.shape[0]
    grid = HW // PATCH
    w = sd["x_embedder.proj.weight"].reshape(WIDTH, -1)
    toks = [x[:, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH].reshape(n, -1) @ w.T
            for r in range(grid) for c in range(grid)]
    h = torch.stack(toks, 1) + sd["x_embedder.proj.bias"] + sd["pos_embed"].reshape(1, -1, WIDTH)
    c = sd["y_embedder.embedding_table.weight"][y]
    c = c + lin(sd, "t_embedder.mlp.2", F.silu(lin(sd, "t_embedder.mlp.0", sinusoids(tau))))
    d = WIDTH
    for i in range(DEPTH):
        p = f"blocks.{i}."
        m = lin(sd, p + "adaLN_modulation.1", F.silu(c))
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None, j * d:(j + 1) * d] for j in range(6))
        a = ln(h) * (1 + sc1) + sh1
        qkv = lin(sd, p + "attn.qkv", a)
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(n, -1, HEADS, d // HEADS).transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS), -1) @ v
        h = h + g1 * lin(sd, p + "attn.proj", att.transpose(1, 2).reshape(n, -1, d))
        a = ln(h) * (1 + sc2) + sh2
        h = h + g2 * lin(sd, p + "mlp.fc2", F.gelu(lin(sd, p + "mlp.fc1", a), approximate="tanh"))
    m = lin(sd, "final_layer.adaLN_modulation.1", F.silu(c))
    out = lin(sd, "final_layer.linear", ln(h) * (1 + m[:, None, d:]) + m[:, None, :d])  # (N, T, p*p*out)
    ch = out.shape[-1] // (PATCH * PATCH)
    img = torch.zeros(n, ch, HW, HW, dtype=x.dtype)
    for tok in range(grid * grid):
        r, col = divmod(tok, grid)
        img[:, :, r * PATCH:(r + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = \
            out[:, tok].reshape(n, PATCH, PATCH, ch).permute(0, 3, 1, 2)  # (p, q, c) per token
    return img


def official_cafm_velocity(sd, x, y, t):
    """CAFM's Generator: -SiT(x, 1 - t, y), SiT keeping the first C of its 2C output channels."""
    return -dit_net(sd, x, y, 1.0 - t)[:, :C]


def _inputs(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)  # float32
    x = torch.randn(n, C, HW, HW, generator=g)
    y = torch.tensor([0, 3, CLASSES, 7, CLASSES])[:n]  # the null label too
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])[:n]
    return x, y, t


def _save(path, sd):
    torch.save(sd, path)  # as CAFM's trainer (common/persistence: torch.save(state_dict)); plain keys
    return str(path)


# ---------------------------------------------------------------------------------------------------
# Conversion: names, shapes, convention (no model option needed)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_converted_state_dict_fits_a_multistep_generator_strictly(learn_sigma):
    sd, opts = convert_cafm_sit(fake_sit(learn_sigma=learn_sigma))
    assert opts == dict(name="tiny", in_channels=C, input_size=HW, num_classes=CLASSES, kind="multistep",
                        repeats=1, null_label=True, time_scale=SIT_TIME_SCALE)
    want = build_generator("tiny", in_channels=C, input_size=HW, num_classes=CLASSES, kind="multistep", nfe=2,
                           null_label=True).state_dict()
    assert set(sd) == set(want)  # no missing, no unexpected key
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in want.items()}


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_converted_weights_compute_cafm_velocity_at_our_time(learn_sigma):
    """The converted weights, read with OUR convention (sinusoids of t, no flip, no sign, C channels),
    give exactly CAFM's Generator on the official weights."""
    off = fake_sit(learn_sigma=learn_sigma, dtype=torch.float64)
    sd, _ = convert_cafm_sit(off)
    x, y, t = _inputs()
    x, t = x.double(), t.double()
    torch.testing.assert_close(dit_net(sd, x, y, t), official_cafm_velocity(off, x, y, t), **EXACT)


def test_time_flip_fold_by_hand():
    # One frequency pair k: features (cos f s, sin f s) at s = 1 - t equal the folded map on (cos f t, sin f t).
    w = torch.zeros(2, 256, dtype=torch.float64)
    w[0, 0], w[1, 128] = 1.0, 1.0  # row 0 reads cos(f_0 s), row 1 reads sin(f_0 s); f_0 = 1
    folded = _fold_time_flip(w)
    for t in (0.0, 0.3, 1.0):
        feats_t = sinusoids(torch.tensor([t])).double()[0]
        got = folded @ feats_t
        torch.testing.assert_close(got, torch.tensor([math.cos(1 - t), math.sin(1 - t)], dtype=torch.float64))


def test_sign_and_learn_sigma_by_hand():
    off = fake_sit()
    sd, _ = convert_cafm_sit(off)
    w = off["final_layer.linear.weight"]  # rows (p, q, c), c in [0, 2C)
    keep = [r for r in range(w.shape[0]) if r % (2 * C) < C]
    torch.testing.assert_close(sd["final_layer.linear.weight"], -w[keep], rtol=0, atol=0)
    torch.testing.assert_close(sd["final_layer.linear.bias"], -off["final_layer.linear.bias"][keep], rtol=0, atol=0)
    torch.testing.assert_close(sd["blocks.1.attn.qkv.weight"], off["blocks.1.attn.qkv.weight"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------


def test_bad_files_give_clear_errors(tmp_path):
    dis = dict(fake_sit(), dis_embed=torch.zeros(WIDTH), **{"final_layer.1.weight": torch.zeros(1, WIDTH)})
    path = _save(tmp_path / "dis.pth", dis)
    with pytest.raises(CheckpointError, match=r"dis\.pth.*discriminator.*ema\.pth"):
        convert_cafm_sit(path)
    one = {k: v for k, v in fake_sit().items() if not k.startswith("t_embedder.")}
    path = _save(tmp_path / "afm.pt", one)
    with pytest.raises(CheckpointError, match=r"afm\.pt.*t_embedder.*layout \(dit\)"):
        convert_cafm_sit(path)
    odd = dict(fake_sit(), **{"final_layer.linear.weight": torch.zeros(PATCH * PATCH * 3 * C, WIDTH)})
    with pytest.raises(CheckpointError, match="learn_sigma"):
        convert_cafm_sit(odd)
    with pytest.raises(CheckpointError, match="nfe=K"):
        build_from_cafm_sit(fake_sit())
    pickled = tmp_path / "sit_train.pt"  # SiT's train.py checkpoint: {"model", "ema", "opt", "args": Namespace}
    torch.save({"ema": fake_sit(), "args": argparse.Namespace(model="SiT-XL/2")}, pickled)
    with pytest.raises(CheckpointError, match=r"sit_train\.pt.*refused to unpickle.*ckpt\['ema'\]"):
        convert_cafm_sit(str(pickled))
    with pytest.raises(CheckpointError, match="no such file"):
        convert_cafm_sit(str(tmp_path / "missing.pth"))


def test_wrapped_ema_entry_is_used(tmp_path):
    off = fake_sit()
    path = _save(tmp_path / "ck.pt", {"ema": {"module." + k: v for k, v in off.items()}, "model": fake_sit(seed=5)})
    sd, _ = convert_cafm_sit(path)
    torch.testing.assert_close(sd["blocks.0.mlp.fc1.weight"], off["blocks.0.mlp.fc1.weight"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# The built model and the registered format
# ---------------------------------------------------------------------------------------------------


def test_imported_generator_velocity_equals_official(tmp_path):
    off = fake_sit()
    g = build_from_cafm_sit(_save(tmp_path / "ema.pth", off), nfe=4).eval()
    assert (g.kind, g.nfe, g.repeats, g.null_label, g.num_classes) == ("multistep", 4, 1, True, CLASSES)
    assert g.config["time_scale"] == SIT_TIME_SCALE
    x, y, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(g.velocity(x, y, t), official_cafm_velocity(off, x, y, t), **TOL)
        # one Euler step of the imported model = the official trainer's Euler step (x - (s - t) * v)
        s, t2 = torch.full((5,), 0.75), torch.full((5,), 0.5)
        torch.testing.assert_close(g(x, y, s, t2), x - 0.25 * official_cafm_velocity(off, x, y, s), **TOL)


def test_registered_import_round_trips_through_model_format(tmp_path):
    from advflow.platform.tracking import model_format

    g = build_from_cafm_sit(fake_sit(), nfe=4).eval()
    decoder = {"name": "sd-vae", "vae_path": str(tmp_path), "scaling_factor": 0.18215}  # never loaded here
    spec = model_format.GeneratorSpec(generator=dict(g.config), decoder=decoder, data_shape=(C, HW, HW),
                                      num_classes=CLASSES)
    out = model_format.write_model_data(g, spec, tmp_path / "data")
    loaded = model_format.load_model_data(out, device="cpu").generator
    assert loaded.config == g.config and loaded.config["time_scale"] == SIT_TIME_SCALE
    x, y, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, y, t), g.velocity(x, y, t), rtol=0, atol=0)


def test_default_generators_do_not_record_time_scale():
    g = build_generator("tiny", in_channels=C, input_size=HW, num_classes=CLASSES, kind="multistep", nfe=2)
    assert "time_scale" not in g.config  # existing configs (and registered models) unchanged


# ---------------------------------------------------------------------------------------------------
# jobs/register_checkpoint.py --layout cafm-sit
# ---------------------------------------------------------------------------------------------------


def _register_job():
    path = Path(__file__).resolve().parents[1] / "jobs" / "register_checkpoint.py"
    spec = importlib.util.spec_from_file_location("register_checkpoint_cafm_loader", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_register_job_layout_flag_and_tags():
    job = _register_job()
    a = job.parse_args(["--checkpoint", "x.pth", "--name", "n", "--layout", "cafm-sit", "--nfe", "4"])
    assert a.layout == "cafm-sit"
    assert job.parse_args(["--checkpoint", "x.pth", "--name", "n"]).layout == "dit"
    assert job.LAYOUT_TAGS["method"] == "fm"  # what model.init of a method cafm run accepts
    assert "official CAFM-SiT checkpoint layout" in job.CAFM_SIT_NOTE
    bad = job.parse_args(["--checkpoint", "x.pth", "--name", "n", "--layout", "cafm-sit", "--kind", "anystep"])
    with pytest.raises(CheckpointError, match="drop --kind anystep"):
        job.build_cafm_sit(bad, fake_sit(), build_from_cafm_sit, CheckpointError)
    no_k = job.parse_args(["--checkpoint", "x.pth", "--name", "n", "--layout", "cafm-sit"])
    with pytest.raises(CheckpointError) as err:
        job.build_cafm_sit(no_k, fake_sit(), build_from_cafm_sit, CheckpointError)
    assert err.value.cli.endswith("Euler steps it samples with") and "--nfe K" in err.value.cli


@pytest.mark.integration  # runs the job's main over a real file (imports mlflow; seconds)
def test_register_job_cafm_sit_without_nfe_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    job = _register_job()
    path = _save(tmp_path / "ema.pth", fake_sit())
    assert job.main(["--checkpoint", path, "--name", "x", "--decoder", "sd-vae", "--vae-path", str(tmp_path),
                     "--layout", "cafm-sit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--nfe K" in err and path in err
