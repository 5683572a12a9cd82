"""1D OT toy: exact-map maths, metrics, --data validation, the CLI, and a short AFM-vs-GAN run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from advflow.trainers.toy import (
    EmpiricalTarget,
    MixtureTarget,
    ToyConfig,
    ToyGenerator,
    evaluate,
    load_samples,
    map_difference,
    ot_map,
    train,
    w1_distance,
)

REPO = Path(__file__).resolve().parents[1]


def _load_job():
    spec = importlib.util.spec_from_file_location("toy_job", REPO / "jobs" / "toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny MLPs: a second intra-op thread only adds spin-wait on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------- exact OT map


def test_single_gaussian_ot_map_is_affine():
    # For data N(mu, sigma^2) the monotone map from N(0, 1) is T(z) = mu + sigma z.
    z = np.linspace(-4, 4, 41)
    target = MixtureTarget(modes=(0.7,), std=0.3)
    np.testing.assert_allclose(ot_map(target, z), 0.7 + 0.3 * z, atol=1e-9)


def test_mixture_ot_map_pushes_phi_to_mixture_cdf():
    # CDF_data(T(z)) == Phi(z), with the CDF written out independently here (math.erf loop).
    modes, std = (-1.5, -0.5, 0.5, 1.5), 0.05
    z = np.array([-3.0, -1.1, -0.674, -0.3, 0.0, 0.2, 0.674, 1.5, 2.9])
    tz = ot_map(MixtureTarget(modes, std), z)
    for zi, xi in zip(z, tz):
        cdf = sum(_phi((xi - m) / std) for m in modes) / len(modes)
        assert abs(cdf - _phi(zi)) < 1e-9
    # The map is monotone and jumps across the empty gap at the median: a little below z = 0 it is
    # in the upper tail of the mode at -0.5, a little above in the lower tail of the mode at 0.5.
    assert np.all(np.diff(tz) > 0)
    lo, hi = ot_map(MixtureTarget(modes, std), np.array([-0.01, 0.01]))
    assert -0.5 < lo < -0.35 and 0.35 < hi < 0.5


def test_empirical_quantile_by_hand():
    target = EmpiricalTarget(np.array([3.0, 1.0, 4.0, 2.0]))
    # inverse empirical CDF: F(x) = #{samples <= x} / 4; the smallest x with F(x) >= u.
    u = np.array([0.0, 0.1, 0.25, 0.26, 0.5, 0.74, 0.75, 0.99, 1.0])
    np.testing.assert_array_equal(target.quantile(u), [1, 1, 1, 2, 2, 3, 3, 4, 4])


def test_empirical_ot_map_of_gaussian_samples_is_close_to_affine():
    rng = np.random.default_rng(0)
    target = EmpiricalTarget(2.0 - 0.5 * rng.standard_normal(200_000) * -1)
    z = np.linspace(-2, 2, 9)
    np.testing.assert_allclose(ot_map(target, z), 2.0 + 0.5 * z, atol=0.02)


def test_w1_matches_sorted_sample_formula():
    # For equal-size sets W1 is the mean absolute difference of the sorted samples.
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(3000), 0.3 + 2.0 * rng.standard_normal(3000)
    assert w1_distance(a, b) == pytest.approx(np.abs(np.sort(a) - np.sort(b)).mean(), rel=1e-9)
    # A pure shift moves every quantile by the shift.
    assert w1_distance(a, a + 0.25) == pytest.approx(0.25, rel=1e-9)


def test_between_modes_fraction():
    target = MixtureTarget()
    x = np.array([-1.5, -1.0, 0.52, 0.0, 1.5 + 0.25])  # 0.25 > 4 * 0.05
    assert target.between_modes(x) == pytest.approx(3 / 5)


# ---------------------------------------------------------------- config and networks


def test_config_defaults_and_validation():
    assert ToyConfig().ot_scale == 0.05
    assert ToyConfig(method="gan").ot_scale == 0.0
    with pytest.raises(ValueError, match="ot_scale must be 0 for method 'gan'"):
        ToyConfig(method="gan", ot_scale=0.05)
    with pytest.raises(ValueError, match="ToyConfig.nfe"):
        ToyConfig(nfe=0)
    with pytest.raises(ValueError, match="method must be one of"):
        ToyConfig(method="vae")
    with pytest.raises(ValueError, match="ToyConfig.ot_schedule"):
        ToyConfig(ot_schedule="linear")


def test_lambda_ot_schedule_values():
    cfg = ToyConfig(steps=101, ot_scale=0.2, ot_end=0.01, ot_schedule="cosine")
    assert cfg.lambda_ot(0) == pytest.approx(0.2)
    assert cfg.lambda_ot(50) == pytest.approx((0.2 + 0.01) / 2)  # cosine midpoint
    assert cfg.lambda_ot(100) == pytest.approx(0.01)
    assert ToyConfig(ot_schedule="constant").lambda_ot(7000) == 0.05


def test_multistep_sampler_walks_k_equal_steps():
    torch.manual_seed(0)
    G = ToyGenerator(nfe=3, width=16, depth=1, n_freqs=2)
    z = torch.randn(5, 1)
    x = z
    for s in (1.0, 2 / 3, 1 / 3):
        sv = torch.full((5,), s)
        x = x - (1 / 3) * G.velocity(x, sv)  # velocity form: x_t = x_s - (s - t) g(x_s, s)
    torch.testing.assert_close(G.sample(z), x)


# ---------------------------------------------------------------- --data validation


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((10, 2), np.float32), r"shape \(10, 2\), dtype float32; a 1D array"),
        (np.arange(10), r"dtype int64; a float array is required"),
        (np.array([1.0]), "at least 2 samples"),
        (np.array([1.0, np.nan, 2.0]), "1 NaN/inf"),
    ],
)
def test_load_samples_rejects_bad_arrays(tmp_path, arr, match):
    path = tmp_path / "bad.npy"
    np.save(path, arr)
    with pytest.raises(ValueError, match=match) as info:
        load_samples(str(path))
    assert str(path) in str(info.value)


def test_load_samples_rejects_missing_and_non_npy(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_samples(str(tmp_path / "nope.npy"))
    (tmp_path / "text.npy").write_text("1 2 3")
    with pytest.raises(ValueError, match="cannot read as a .npy array"):
        load_samples(str(tmp_path / "text.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npy"):
        load_samples(str(tmp_path / "obj.npy"))


# ---------------------------------------------------------------- CLI


@pytest.mark.integration  # end-to-end: trains the 1D toy through its CLI (seconds)
def test_cli_writes_outputs_on_data_file(tmp_path):
    job = _load_job()
    data = tmp_path / "samples.npy"
    np.save(data, np.random.default_rng(0).normal(1.0, 0.2, 500).astype(np.float32))
    out = tmp_path / "run"
    rc = job.main(
        ["--data", str(data), "--steps", "20", "--width", "16", "--batch", "64", "--map-samples", "10000",
         "--eval-samples", "2000", "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["data"] == str(data) and metrics["settings"]["steps"] == 20
    assert np.isfinite(metrics["w1"]) and np.isfinite(metrics["ot_map_mae"])
    arrays = np.load(out / "map.npz")
    assert arrays["z"].shape == arrays["gz"].shape == (10000,)
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_map_difference(tmp_path):
    z = np.linspace(-1, 1, 5)
    np.savez(tmp_path / "a.npz", z=z, gz=np.zeros(5))
    np.savez(tmp_path / "b.npz", z=z, gz=np.array([0.1, -0.1, 0.2, 0.0, 0.1]))
    np.savez(tmp_path / "c.npz", z=z + 1, gz=np.zeros(5))
    assert map_difference(str(tmp_path / "a.npz"), str(tmp_path / "b.npz")) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="different z draws"):
        map_difference(str(tmp_path / "a.npz"), str(tmp_path / "c.npz"))


@pytest.mark.integration  # end-to-end: trains the 1D toy through its CLI (seconds)
def test_cli_fm_and_multistep_afm_run(tmp_path):
    job = _load_job()
    for args in (["--method", "fm", "--nfe", "4"], ["--method", "afm", "--nfe", "2"]):
        out = tmp_path / args[1]
        small = ["--steps", "10", "--width", "16", "--batch", "32", "--eval-samples", "500",
                 "--map-samples", "500", "--no-progress"]
        assert job.main(args + small + ["--out", str(out)]) == 0
        assert json.loads((out / "metrics.json").read_text())["settings"]["nfe"] == int(args[3])


def test_cli_bad_data_exits_with_message(tmp_path, capsys):
    job = _load_job()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 3)))
    assert job.main(["--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "(3, 3)" in err and "numpy.save" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the claim, small


@pytest.mark.integration  # end to end: trains AFM and a GAN 1000 steps each (~35 s)
def test_afm_learns_the_ot_map_and_gan_does_not():
    """Short runs: the OT term pins G to the monotone map; without it G learns some other map."""
    # Measured with these settings (seeds 0/1/3): AFM ot_map_mae 0.11-0.12, GAN 1.65-1.93.
    small = dict(steps=1000, width=128, batch=256, eval_samples=5000, map_samples=5000, log_every=500)
    afm, _, _ = evaluate(train(ToyConfig(method="afm", **small), progress=False))
    gan, _, _ = evaluate(train(ToyConfig(method="gan", **small), progress=False))
    # Both fit the marginal roughly ...
    assert afm["w1"] < 0.2 and gan["w1"] < 0.4
    # ... but only AFM is near the exact map, and clearly nearer than the GAN.
    assert afm["ot_map_mae"] < 0.2
    assert gan["ot_map_mae"] > 2.5 * afm["ot_map_mae"]
