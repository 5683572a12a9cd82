"""Quality metrics: Fréchet distance, the digits split/classifier/evaluator, prepare's hold-out, the EVALUATORS table."""

from __future__ import annotations

import os
import types
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import advflow.platform.eval.digits as de
from advflow.platform.data.digits import digits_pixels, digits_split
from advflow.platform.eval import EVALUATORS, Evaluator
from advflow.platform.eval.digits import DigitsEvalConfig, DigitsEvaluator
from advflow.platform.eval.frechet import FrechetReference, feature_stats, frechet_distance, load_stats, save_stats


# -- Fréchet distance -------------------------------------------------------------------------------------
def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d + 3))
    return a @ a.T / a.shape[1] + 0.05 * np.eye(d)


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general (non-symmetric) matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 3, 17, 64])
def test_frechet_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    ref = _scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-7, abs=1e-9)  # symmetric


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(1)
    v1, v2 = rng.uniform(0.1, 3, 9), rng.uniform(0.1, 3, 9)
    mu1, mu2 = rng.standard_normal(9), rng.standard_normal(9)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_and_rank_deficient():
    rng = np.random.default_rng(2)
    mu, s = rng.standard_normal(12), _random_spd(rng, 12)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # 5 samples in 40 dimensions: rank-4 covariance, the usual FID situation at small N.
    f = rng.standard_normal((5, 40))
    m, c = feature_stats(f)
    assert frechet_distance(m, c, m, c) == pytest.approx(0.0, abs=1e-9 * np.trace(c))
    shift = np.full(40, 0.5)
    assert frechet_distance(m, c, m + shift, c) == pytest.approx(shift @ shift, rel=1e-8)
    g = rng.standard_normal((5, 40)) * 2
    fd = frechet_distance(m, c, *feature_stats(g))
    assert np.isfinite(fd) and fd > 0


def test_distance_to_features_low_rank_closed_form():
    """N < D on both sides: tr sqrt(S1 S2) is the nuclear norm of X1 X2^T (X = centred / sqrt(N - 1)),
    a route independent of the eigen-decompositions in the code."""
    rng = np.random.default_rng(5)
    r, g = rng.standard_normal((7, 50)), rng.standard_normal((6, 50)) * 1.5 + 0.3
    x1 = (r - r.mean(0)) / np.sqrt(len(r) - 1)
    x2 = (g - g.mean(0)) / np.sqrt(len(g) - 1)
    d = r.mean(0) - g.mean(0)
    expected = d @ d + (x1 ** 2).sum() + (x2 ** 2).sum() - 2 * np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()
    ref = FrechetReference(*feature_stats(r))
    assert ref.distance_to_features(g) == pytest.approx(expected, rel=1e-9)
    assert ref.distance(*feature_stats(g)) == pytest.approx(expected, rel=1e-9)
    # N > D goes through the covariance route; both agree with the plain function.
    many = rng.standard_normal((80, 50))
    assert ref.distance_to_features(many) == pytest.approx(frechet_distance(*feature_stats(r), *feature_stats(many)),
                                                            rel=1e-9)


def test_frechet_rejects_bad_input():
    s = np.eye(3)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), np.diag([1.0, -1.0, 1.0]), np.zeros(3), s)
    with pytest.raises(ValueError, match="stats 2: sigma is not positive semi-definite"):
        frechet_distance(np.zeros(3), 2 * s, np.zeros(3), np.diag([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), s, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


def test_feature_stats_against_numpy():
    f = np.random.default_rng(3).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False, ddof=1), rtol=1e-10)
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(f[:1])


def test_stats_npz_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5), _random_spd(rng, 5)
    path = str(tmp_path / "ref.npz")
    save_stats(path, mu, sigma)
    got = load_stats(path, dim=5)
    np.testing.assert_array_equal(got[0], mu)
    np.testing.assert_array_equal(got[1], sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="no such file.*write_reference_stats"):
        load_stats(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "mu_only.npz", mu=mu)
    with pytest.raises(ValueError, match=r"missing array\(s\) \['sigma'\]"):
        load_stats(str(tmp_path / "mu_only.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        load_stats(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="5-d, expected 2048-d"):
        load_stats(path, dim=2048)


# -- digits split -------------------------------------------------------------------------------------------
def test_digits_split_disjoint_stratified_deterministic():
    from sklearn.datasets import load_digits

    y = load_digits().target
    tr, ho = digits_split(seed=0, holdout_fraction=0.2)
    assert len(np.intersect1d(tr, ho)) == 0 and len(tr) + len(ho) == len(y) == 1797
    assert sorted(np.concatenate([tr, ho]).tolist()) == list(range(1797))
    for c in range(10):
        n_c = int((y == c).sum())
        assert int((y[ho] == c).sum()) == int(round(0.2 * n_c))  # every class held out in proportion
    tr2, ho2 = digits_split(seed=0, holdout_fraction=0.2)
    np.testing.assert_array_equal(ho, ho2)
    np.testing.assert_array_equal(tr, tr2)
    _, ho_other = digits_split(seed=1, holdout_fraction=0.2)
    assert not np.array_equal(ho, ho_other)
    with pytest.raises(ValueError, match="holdout_fraction"):
        digits_split(holdout_fraction=1.0)


# -- digits classifier and evaluator ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("advflow-cache"))


@pytest.fixture(scope="module")
def evaluator(cache):
    return DigitsEvaluator(cache_dir=cache)  # trains the classifier once (~6 s on one core)


@pytest.mark.integration  # end-to-end: trains the digit classifier the evaluator uses (seconds)
def test_classifier_accuracy_and_cache(evaluator, cache, monkeypatch):
    assert evaluator.heldout_acc > 0.9
    cfg = DigitsEvalConfig()
    assert os.path.isfile(os.path.join(cache, f"digits_classifier-{cfg.key()}.safetensors"))
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp")]

    def no_training(_cfg):
        raise AssertionError("the cached weights should have been used")

    monkeypatch.setattr(de, "train_classifier", no_training)
    again = DigitsEvaluator(cache_dir=cache)
    assert again.fd_floor == evaluator.fd_floor and again.heldout_acc == evaluator.heldout_acc
    # A different setting is a different cache entry (here: not cached, so it would train).
    with pytest.raises(AssertionError, match="cached weights"):
        DigitsEvaluator(DigitsEvalConfig(epochs=1), cache_dir=cache)


def test_training_is_deterministic_and_keeps_global_rng():
    cfg = DigitsEvalConfig(epochs=1)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = de.train_classifier(cfg).state_dict()
    after = torch.rand(3)
    b = de.train_classifier(cfg).state_dict()
    assert torch.equal(before, after), "training must not consume the caller's global RNG"
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train_images(n: int | None = None, seed: int = 0):
    tr, _ = digits_split()
    x, y = digits_pixels(tr)
    if n is not None:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[keep], y[keep]
    return x, y


@pytest.mark.integration  # end-to-end: trains the digit classifier the evaluator uses (seconds)
def test_fd_real_is_near_floor_noise_is_far(evaluator):
    floor = evaluator.fd_floor
    assert floor > 0
    _, ho = digits_split()
    held = evaluator.evaluate(*digits_pixels(ho))
    assert held["eval/fd"] == pytest.approx(0.0, abs=1e-6 * floor)  # the reference itself
    x, y = _train_images(1000)
    real = evaluator.evaluate(x, y)
    assert set(real) >= {"eval/fd", "eval/fd_floor", "eval/cls_acc", "eval/classifier_heldout_acc"}
    assert real["eval/fd_floor"] == floor
    assert 0.8 * floor < real["eval/fd"] < 1.5 * floor  # a perfect generator, up to sample size
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert evaluator.evaluate(noise, y)["eval/fd"] > 20 * floor
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # a visibly worse generator
    assert evaluator.evaluate(blurred, y)["eval/fd"] > 5 * real["eval/fd"]


@pytest.mark.integration  # end-to-end: trains the digit classifier the evaluator uses (seconds)
def test_cls_acc_true_vs_shuffled_labels(evaluator):
    x, y = _train_images()
    assert evaluator.evaluate(x, y)["eval/cls_acc"] > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    acc = evaluator.evaluate(x, shuffled)["eval/cls_acc"]
    assert 0.05 < acc < 0.15  # chance is ~0.1 for balanced classes
    rgb = evaluator.evaluate(x.expand(-1, 3, -1, -1), y)  # 3 channels are averaged to grey
    assert rgb["eval/fd"] == pytest.approx(evaluator.evaluate(x, y)["eval/fd"], rel=1e-9)


@pytest.mark.integration  # end-to-end: trains the digit classifier the evaluator uses (seconds)
def test_other_resolution_uses_the_same_resize_as_prepare(evaluator, cache):
    ev16 = DigitsEvaluator(data_side=16, cache_dir=cache)
    x, y = _train_images(1000)
    up = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    out = ev16.evaluate(up, y)
    assert 0.8 * ev16.fd_floor < out["eval/fd"] < 1.5 * ev16.fd_floor
    assert out["eval/classifier_heldout_acc"] > 0.9 and out["eval/cls_acc"] > 0.9


@pytest.mark.integration  # end-to-end: trains the digit classifier the evaluator uses (seconds)
def test_evaluate_input_errors(evaluator):
    x, y = _train_images(10)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        evaluator.evaluate(x, y[:9])
    with pytest.raises(ValueError, match=r"labels must be digit classes in \[0, 10\)"):
        evaluator.evaluate(x, y + 10)
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 10 generated images contain NaN"):
        evaluator.evaluate(bad, y)
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        evaluator.evaluate(x[:, 0], y)


# -- the EVALUATORS table ---------------------------------------------------------------------------------
def _run_eval_cfg(**eval_section):
    """The `eval` section of a validated run config (what the worker hands to EVALUATORS[kind].build)."""
    from advflow.platform.config import RunSpec

    return RunSpec.from_dict({"data": {"prefix": "/data/x"}, "eval": eval_section}).eval


def _eval_cfg(kind: str, **fields):
    """An eval section with exactly the attributes the builders may read."""
    base = {"kind": kind, "every": 0, "num_samples": 1000, "batch_size": 250, "inception_path": None,
            "reference_stats": None, "pr_k": 3}
    return types.SimpleNamespace(**{**base, **fields})


HOLDOUT_ENC = {"name": "pixel", "scaling_factor": 1.0, "holdout": {"fraction": 0.2, "seed": 0, "count": 359}}


@pytest.mark.integration  # end-to-end: trains the digit classifier the evaluator uses (seconds)
def test_evaluator_table(evaluator, cache, monkeypatch):
    monkeypatch.setenv("ADVFLOW_CACHE", cache)  # the module's classifier cache (eval has no cache_dir field)
    enc = HOLDOUT_ENC
    build_digits = EVALUATORS["digits"].build
    ev = build_digits(_run_eval_cfg(kind="digits", batch_size=2048), encoder=enc, data_shape=(1, 8, 8),
                      num_classes=10)
    assert isinstance(ev, Evaluator) and ev.primary == "eval/fd" and ev.required_samples == 1797 - 359
    assert ev.fd_floor == evaluator.fd_floor
    assert sorted(EVALUATORS) == ["digits", "fid"]
    assert EVALUATORS["digits"].required == () and EVALUATORS["fid"].required == ("inception_path", "reference_stats")
    from advflow.platform.config import ConfigError

    # An unknown kind is refused where it is chosen: the config, which reads the table.
    with pytest.raises(ConfigError, match=r"eval\.kind: 'nope' is unknown"):
        _run_eval_cfg(kind="nope")
    with pytest.raises(ValueError, match="10-class digits dataset"):
        build_digits(_eval_cfg("digits"), encoder=enc, data_shape=(1, 8, 8), num_classes=7)
    # There is no eval.options (nor eval.seed): the config refuses such keys, so the split can only come
    # from the manifest (test_digits_split_comes_from_the_manifest).
    with pytest.raises(ConfigError, match=r"eval: unknown key\(s\) \['options'\]"):
        _run_eval_cfg(kind="digits", options={"seed": 3})
    with pytest.raises(ConfigError, match=r"eval: unknown key\(s\) \['bogus'\]"):
        _run_eval_cfg(kind="digits", bogus=1)
    with pytest.raises(ValueError, match="eval.inception_path is required"):
        EVALUATORS["fid"].build(_eval_cfg("fid"), encoder=enc, data_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="eval.reference_stats is required"):
        EVALUATORS["fid"].build(_eval_cfg("fid", inception_path="w.pth"), encoder=enc, data_shape=(1, 8, 8),
                                num_classes=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_digits(_eval_cfg("digits"), encoder={"name": "pixel"}, data_shape=(1, 8, 8), num_classes=10)
    assert any("no digits hold-out" in str(w.message) for w in caught)


class _Recorder:
    """Stands in for DigitsEvaluator: records what the builder passes (no classifier)."""

    def __init__(self, config, *, data_side, device, batch_size, **rest):
        self.config, self.data_side, self.device, self.batch_size, self.rest = config, data_side, device, batch_size, rest


def test_digits_split_comes_from_the_manifest(monkeypatch):
    monkeypatch.setattr(de, "DigitsEvaluator", _Recorder)
    build = EVALUATORS["digits"].build
    enc = {"name": "pixel", "scaling_factor": 1.0, "holdout": {"fraction": 0.3, "seed": 3, "count": 539}}
    got = build(_eval_cfg("digits", batch_size=77, pr_k=5), encoder=enc, data_shape=(1, 8, 8), num_classes=10)
    assert got.config == DigitsEvalConfig(split_seed=3, holdout_fraction=0.3)
    assert (got.data_side, got.device, got.batch_size, got.rest) == (8, "cpu", 77, {"pr_k": 5})
    with warnings.catch_warnings(record=True) as caught:  # no record: the default split, with a warning
        warnings.simplefilter("always")
        got = build(_eval_cfg("digits"), encoder={"name": "pixel"}, data_shape=(1, 16, 16), num_classes=10)
    assert got.config == DigitsEvalConfig(split_seed=0, holdout_fraction=0.2) and got.data_side == 16
    assert any("no digits hold-out" in str(w.message) for w in caught)
    # sd-vae latents are 8x smaller than the images they decode to.
    sd = {**HOLDOUT_ENC, "name": "sd-vae", "scaling_factor": 0.18215}
    assert build(_eval_cfg("digits"), encoder=sd, data_shape=(4, 2, 2), num_classes=10).data_side == 16
    with pytest.raises(ValueError, match="digits data must be square"):
        build(_eval_cfg("digits"), encoder=HOLDOUT_ENC, data_shape=(1, 8, 16), num_classes=10)
    with pytest.raises(ValueError, match=r"data_shape must be \(C, H, W\)"):
        build(_eval_cfg("digits"), encoder=HOLDOUT_ENC, data_shape=(8, 8), num_classes=10)


def test_fid_builder_passes_the_eval_fields(monkeypatch):
    import advflow.platform.eval.fid as fid

    seen = {}
    monkeypatch.setattr(fid, "FIDEvaluator", lambda *a, **k: seen.update(args=a, kwargs=k) or "built")
    ev = _eval_cfg("fid", inception_path="w.pth", reference_stats="r.npz", batch_size=32, pr_k=4)
    assert EVALUATORS["fid"].build(ev, encoder=HOLDOUT_ENC, data_shape=(4, 32, 32), num_classes=1000) == "built"
    assert seen == {"args": ("w.pth", "r.npz", 32), "kwargs": {"device": None, "pr_k": 4}}


# -- prepare writes the train split only ------------------------------------------------------------------
def _records(prefix: str):
    from advflow.platform.data.shards import read_manifest
    from advflow.platform.data.storage import Storage

    m = read_manifest(prefix)
    st = Storage(prefix)
    xs, ys = zip(*(m.record.decode(st.read(s.name)) for s in m.shards))
    return m, np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def test_prepare_digits_writes_only_the_train_split(tmp_path):
    from sklearn.datasets import load_digits

    from advflow.platform.data.prepare import PrepareConfig, prepare

    out = str(tmp_path / "d")
    prepare(PrepareConfig(source="digits", out=out, progress=False, dtype="float32"))
    m, x, y = _records(out)
    tr, ho = digits_split(seed=0, holdout_fraction=0.2)
    assert m.num_records == len(tr) == len(x)
    assert m.encoder["holdout"] == {"fraction": 0.2, "seed": 0, "count": len(ho)}
    d = load_digits()
    pixels = (d.images / 8.0 - 1.0).reshape(len(d.images), -1).astype(np.float32)
    stored = {row.tobytes() for row in x.reshape(len(x), -1)}
    assert not any(pixels[i].tobytes() in stored for i in ho), "a held-out digit was written to the shards"
    assert all(pixels[i].tobytes() in stored for i in tr)
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.bincount(d.target[tr], minlength=10))

    everything = str(tmp_path / "all")
    m_all = prepare(PrepareConfig(source="digits", out=everything, progress=False, digits_holdout=0.0))
    assert m_all.num_records == 1797 and "holdout" not in m_all.encoder
    with pytest.raises(ValueError, match="digits_holdout must be in"):
        PrepareConfig(source="digits", out=out, digits_holdout=1.0)
