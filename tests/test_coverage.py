"""Mode coverage (platform/eval/coverage.py): improved precision and recall, within-class diversity,
and the evaluators that report them (digits, FID) next to eval/fd and eval/fid.

precision_recall is checked against a brute-force reference written here from the paper's
definition (every distance by hand, Python loops over small sets), never against the module's own
helpers. The evaluators run with stand-in networks (a seeded untrained digit classifier, a random
projection in place of Inception), so no classifier is trained and no 299 px Inception pass runs."""

from __future__ import annotations

import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import advflow.platform.eval.coverage as cov
from advflow.platform.eval.coverage import (K_NEIGHBOURS, knn_radii, mean_pairwise_distance, precision_recall,
                                            within_class_diversity)


# -- brute-force references ------------------------------------------------------------------------------
def brute_radii(x: np.ndarray, k: int) -> list[float]:
    """Distance of each row to its k-th nearest other row."""
    out = []
    for i in range(len(x)):
        d = sorted(math.dist(x[i], x[j]) for j in range(len(x)) if j != i)
        out.append(d[k - 1])
    return out


def brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = share of fake rows in some real k-NN ball; recall = share
    of real rows in some fake k-NN ball (on the surface counts as inside)."""
    rr, fr = brute_radii(real, k), brute_radii(fake, k)
    precision = sum(any(math.dist(f, r) <= rr[j] for j, r in enumerate(real)) for f in fake) / len(fake)
    recall = sum(any(math.dist(r, f) <= fr[j] for j, f in enumerate(fake)) for r in real) / len(real)
    return precision, recall


def brute_mean_pairwise(x: np.ndarray) -> float:
    d = [math.dist(x[i], x[j]) for i in range(len(x)) for j in range(i + 1, len(x))]
    return sum(d) / len(d)


def clouds(n_real: int, n_fake: int, d: int, shift: float, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((n_real, d))
    fake = rng.standard_normal((n_fake, d)) * scale + shift
    return real, fake


# -- precision and recall ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_precision_recall_match_brute_force(k, chunk):
    real, fake = clouds(70, 55, 4, shift=0.8, seed=k, scale=0.7)
    want = brute_pr(real, fake, k)
    got = precision_recall(real, fake, k, chunk=chunk, dtype=torch.float64)
    assert got == want
    assert 0 < min(want) < 1 and want[0] != want[1]  # a case that tells the two apart from trivial answers
    # float32 (the default) agrees on these sets as well
    assert precision_recall(real.astype(np.float32), fake.astype(np.float32), k, chunk=chunk) == pytest.approx(want)


def test_radii_match_brute_force_and_exclude_the_point_itself():
    x, _ = clouds(40, 1, 6, 0.0, seed=4)
    for k in (1, 2, 3):
        np.testing.assert_allclose(knn_radii(x, k, dtype=torch.float64).numpy(), brute_radii(x, k), rtol=1e-10)
    dup = np.concatenate([x, x[:1]])  # a duplicate is a neighbour at distance 0, itself is not
    assert float(knn_radii(dup, 1, dtype=torch.float64)[0]) == 0.0
    assert float(knn_radii(x, 1, dtype=torch.float64)[0]) > 0.0


def test_identical_sets_give_one_and_one():
    real, _ = clouds(200, 1, 32, 0.0, seed=1)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    t = torch.as_tensor(real, dtype=torch.float32)
    assert precision_recall(t, t.clone(), chunk=13) == (1.0, 1.0)


def test_a_collapsed_generator_keeps_precision_and_loses_recall():
    real, _ = clouds(300, 1, 16, 0.0, seed=2)
    rng = np.random.default_rng(3)
    mode = real[17]
    collapsed = mode + 1e-4 * rng.standard_normal((300, 16))  # every sample near one real point
    p, r = precision_recall(real, collapsed, dtype=torch.float64)
    assert p == 1.0  # each sample lies in that real point's ball
    assert r <= 5 / 300  # only real points (about) at the mode are covered
    assert (p, r) == brute_pr(real, collapsed, K_NEIGHBOURS)


def test_shifted_distributions_lose_precision_and_recall():
    real, _ = clouds(400, 1, 8, 0.0, seed=5)
    rng = np.random.default_rng(6)
    results = {}
    for shift in (0.0, 1.0, 2.5):
        fake = rng.standard_normal((400, 8)) + shift
        results[shift] = precision_recall(real, fake)
    p0, r0 = results[0.0]
    assert p0 > 0.85 and r0 > 0.85
    assert results[1.0][0] < p0 and results[2.5][0] < results[1.0][0] < 1.0
    assert results[2.5][1] < results[1.0][1] < r0
    # Too narrow a generator: precise, with poor recall; too wide: the other way round.
    narrow = precision_recall(real, 0.3 * rng.standard_normal((400, 8)))
    wide = precision_recall(real, 3.0 * rng.standard_normal((400, 8)))
    assert narrow[0] > 0.95 and narrow[1] < 0.5
    assert wide[0] < 0.5 and wide[1] > 0.95


def test_chunked_equals_unchunked_and_never_holds_n_by_n(monkeypatch):
    real, fake = clouds(600, 450, 24, 0.4, seed=7, scale=1.2)
    whole = precision_recall(real, fake, chunk=10_000)
    seen = []
    cdist = torch.cdist

    def recording(a, b, *args, **kw):
        seen.append((a.shape[0], b.shape[0]))
        return cdist(a, b, *args, **kw)

    monkeypatch.setattr(cov.torch, "cdist", recording)
    for chunk in (1, 37, 450):
        seen.clear()
        assert precision_recall(real, fake, chunk=chunk) == whole
        assert max(rows for rows, _ in seen) <= chunk
    np.testing.assert_array_equal(knn_radii(real, chunk=37).numpy(), knn_radii(real, chunk=600).numpy())
    # The default block: about 2^25 distances at once, so rows shrink as the other side grows.
    monkeypatch.setattr(cov, "_BLOCK_VALUES", 1000)
    seen.clear()
    assert precision_recall(real, fake) == whole
    assert all(rows * cols <= 1000 for rows, cols in seen)


def test_given_real_radii_are_used():
    real, fake = clouds(80, 60, 5, 0.5, seed=8)
    radii = knn_radii(real, 3)
    assert precision_recall(real, fake, real_radii=radii) == precision_recall(real, fake)
    assert precision_recall(real, fake, real_radii=torch.zeros(80)) [0] == 0.0  # no real ball holds a sample
    with pytest.raises(ValueError, match="real_radii has 3 values for 80 real rows"):
        precision_recall(real, fake, real_radii=radii[:3])


def test_input_errors_say_what_is_wrong():
    real, fake = clouds(10, 10, 3, 0.0, seed=9)
    with pytest.raises(ValueError, match=r"3 feature rows: the k-th nearest neighbour \(k=3\) needs more than 3"):
        precision_recall(real, fake[:3])
    with pytest.raises(ValueError, match="feature dimensions differ: real 3, generated 2"):
        precision_recall(real, fake[:, :2])
    bad = fake.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="generated features contain NaN"):
        precision_recall(real, bad)
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        precision_recall(real, fake[0])
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_radii(real, 0)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        precision_recall(real, fake, chunk=0)


# -- within-class diversity --------------------------------------------------------------------------------
def test_mean_pairwise_distance_matches_brute_force():
    x, _ = clouds(37, 1, 9, 0.0, seed=10)
    for chunk in (None, 1, 5):
        assert mean_pairwise_distance(x, chunk=chunk) == pytest.approx(brute_mean_pairwise(x), rel=1e-12)
    assert mean_pairwise_distance(np.ones((4, 3))) == 0.0
    with pytest.raises(ValueError, match="at least 2 rows"):
        mean_pairwise_distance(x[:1])


def _labelled(n_per: int, classes: int, d: int, seed: int):
    """Classes as Gaussian clusters with different spreads; rows in label order i % classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_per * classes) % classes
    centres = 10 * rng.standard_normal((classes, d))
    spread = 0.5 + np.arange(classes)[:, None]
    return centres[y] + spread[y] * rng.standard_normal((len(y), d)), y, centres


def test_within_class_diversity_matches_brute_force():
    real, ry, _ = _labelled(12, 4, 6, seed=11)
    fake, fy, _ = _labelled(9, 4, 6, seed=12)
    fake[fy == 2] *= 0.25  # class 2 a quarter as spread out
    ratios = {c: brute_mean_pairwise(fake[fy == c]) / brute_mean_pairwise(real[ry == c]) for c in range(4)}
    got = within_class_diversity(real, ry, fake, fy)
    assert got["classes"] == 4 and got["worst_class"] == 2
    assert got["diversity"] == pytest.approx(np.mean(list(ratios.values())), rel=1e-10)
    assert got["diversity_min"] == pytest.approx(ratios[2], rel=1e-10)
    assert got["diversity_min"] < 0.5 < got["diversity"]


def test_diversity_is_one_for_the_real_data_and_zero_for_one_image_per_class():
    real, ry, centres = _labelled(20, 5, 8, seed=13)
    same = within_class_diversity(real, ry, real.copy(), ry.copy())
    assert same["diversity"] == pytest.approx(1.0, rel=1e-12) and same["diversity_min"] == pytest.approx(1.0, rel=1e-12)
    # Within-class collapse: one (near-)identical image per class, each a perfect class mean.
    fy = np.arange(100) % 5
    collapsed = centres[fy] + 1e-6 * np.random.default_rng(14).standard_normal((100, 8))
    col = within_class_diversity(real, ry, collapsed, fy)
    assert col["classes"] == 5 and col["diversity"] < 1e-5 and col["diversity_min"] < 1e-5
    # Only one class collapsed: the mean hides it less than the minimum does.
    one = real.copy()
    one[ry == 3] = real[ry == 3][0]
    part = within_class_diversity(real, ry, one, ry)
    assert part["worst_class"] == 3 and part["diversity_min"] == 0.0 and part["diversity"] == pytest.approx(0.8)


def test_diversity_skips_classes_it_cannot_compare():
    real, ry, _ = _labelled(6, 3, 4, seed=15)
    fake, fy = real[:4], ry[:4]  # classes 0 and 1 twice, class 2 and 3 (not in real) once
    fy = np.array([0, 1, 0, 3])
    got = within_class_diversity(real, ry, fake, fy)
    assert got["classes"] == 1  # only class 0 has >= 2 samples on both sides
    flat = real.copy()
    flat[ry == 0] = 1.0  # a real class that is one point: no spread to divide by
    assert within_class_diversity(flat, ry, real, ry)["classes"] == 2
    none = within_class_diversity(real, ry, fake[:1], fy[:1])
    assert none["classes"] == 0 and math.isnan(none["diversity"]) and math.isnan(none["diversity_min"])
    # At most max_per_class samples of a class are used: the first ones.
    capped = within_class_diversity(real, ry, real, ry, max_per_class=2)
    first_two = {c: np.flatnonzero(ry == c)[:2] for c in range(3)}
    assert capped["diversity"] == pytest.approx(1.0) and capped["classes"] == 3
    assert first_two[0].tolist() == [0, 3]
    with pytest.raises(ValueError, match="18 real feature rows but 17 real labels"):
        within_class_diversity(real, ry[:-1], fake, fy)
    with pytest.raises(ValueError, match="4 generated feature rows but 3 generated labels"):
        within_class_diversity(real, ry, fake, fy[:3])


# -- the digits evaluator --------------------------------------------------------------------------------
@pytest.fixture
def digits_evaluator(monkeypatch, tmp_path):
    """A DigitsEvaluator whose classifier is a seeded, untrained DigitNet (no training, no cache)."""
    import advflow.platform.eval.digits as de

    def untrained(cfg, cache=None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return de.DigitNet(cfg.width, cfg.feature_dim).eval().requires_grad_(False)

    monkeypatch.setattr(de, "load_or_train_classifier", untrained)
    return de.DigitsEvaluator(cache_dir=str(tmp_path))


def test_digits_evaluator_reports_coverage_against_the_held_out_digits(digits_evaluator):
    from advflow.platform.data.digits import digits_pixels, digits_split

    ev = digits_evaluator
    _, ho = digits_split()
    x, y = digits_pixels(ho)
    held = ev.evaluate(x, y)
    assert held["eval/precision"] == 1.0 and held["eval/recall"] == 1.0
    assert held["eval/diversity"] == pytest.approx(1.0, rel=1e-9)
    assert held["eval/diversity_min"] == pytest.approx(1.0, rel=1e-9)
    # The held-out features and classes are the reference (the same set eval/fd's statistics come from).
    np.testing.assert_array_equal(ev.held_labels, y.numpy())
    assert ev.held_features.shape == (len(ho), ev.config.feature_dim)
    np.testing.assert_array_equal(ev.held_radii.numpy(), knn_radii(ev.held_features, 3, dtype=torch.float64).numpy())

    # Within-class collapse: each class drawn as one held-out image of that class.
    first = {int(c): int(np.flatnonzero(y.numpy() == c)[0]) for c in range(10)}
    idx = torch.tensor([first[int(c)] for c in y])
    col = ev.evaluate(x[idx], y)
    assert col["eval/diversity"] < 1e-6 and col["eval/diversity_min"] < 1e-6  # cdist's rounding, not 0
    assert col["eval/precision"] == 1.0 and col["eval/recall"] < 0.2
    assert held["eval/fd"] < col["eval/fd"]


def test_digits_evaluator_skips_what_too_few_images_cannot_give(digits_evaluator):
    from advflow.platform.data.digits import digits_pixels, digits_split

    _, ho = digits_split()
    x, y = digits_pixels(ho[:3])
    out = digits_evaluator.evaluate(x, y)  # 3 images: no 3rd neighbour, and each class at most once
    assert "eval/fd" in out and not {"eval/precision", "eval/recall", "eval/diversity"} & set(out)
    x, y = digits_pixels(ho[:40])
    out = digits_evaluator.evaluate(x, y)
    assert {"eval/precision", "eval/recall", "eval/diversity", "eval/diversity_min"} <= set(out)


def test_coverage_keys_are_reported_per_k(digits_evaluator, tmp_path):
    """train/callbacks.Evaluation: the new keys at the model's own K as eval/..., and at every K of
    eval.nfe as eval/...@K; the labels (sample i: i % num_classes) reach the diversity."""
    from advflow.platform.data.digits import digits_pixels, digits_split
    from advflow.platform.train import callbacks as cb
    from advflow.platform.train.cadence import Cadence

    tr, _ = digits_split()
    x, y = digits_pixels(tr)
    by_class = {c: x[y == c] for c in range(10)}

    class Samples(cb.Samples):
        def images(self, model, labels, gen, batch_size=None, nfe=None):
            k = nfe or model.nfe
            # K=1 collapses within each class (one image per class); other K draw distinct train digits.
            rows = [by_class[int(c)][0 if k == 1 else i // 10] for i, c in enumerate(labels.tolist())]
            return torch.stack(rows)

    class Logger:
        def log_metrics(self, metrics, step):
            self.logged = dict(metrics)

    cfg = types.SimpleNamespace(kind="digits", every=10, num_samples=60, batch_size=20, nfe=[1, 4])
    ev = cb.Evaluation(Samples((1, 8, 8), 10, torch.device("cpu"), {"name": "pixel"}), cfg, Logger(), Cadence(10, 10))
    ev._evaluator = digits_evaluator
    m = cb.Moment.at(10, False, lambda: types.SimpleNamespace(nfe=4), since=0, checkpoint_dir=tmp_path)
    ev(m)
    for key in ("eval/precision", "eval/recall", "eval/diversity", "eval/diversity_min"):
        assert key in m.metrics and f"{key}@1" in m.metrics and f"{key}@4" in m.metrics
        assert m.metrics[f"{key}@4"] == m.metrics[key]  # the model's own K is sampled once
    assert m.metrics["eval/diversity@1"] < 1e-6 and m.metrics["eval/diversity_min@1"] < 1e-6
    assert m.metrics["eval/diversity"] > 0.3
    assert "eval/fd_floor@1" not in m.metrics and "eval/num_samples@4" not in m.metrics
    assert ev.logger.logged == m.metrics


# -- the FID evaluator and its reference file ----------------------------------------------------------------
class Projection(nn.Module):
    """Stands in for the FID Inception: uint8 (N, 3, H, W) -> (N, 2048), a fixed random projection."""

    def __init__(self, side: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3 * side * side, 2048, generator=g) / side, requires_grad=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 127.5 - 1).flatten(1) @ self.w


@pytest.fixture
def fid(monkeypatch):
    import advflow.platform.eval.fid as fid

    monkeypatch.setattr(fid, "load_inception", lambda path, device=None: Projection())
    return fid


def _classes(n: int, classes: int = 4, seed: int = 0, spread: float = 0.5) -> tuple[torch.Tensor, np.ndarray]:
    """Images (n, 3, 8, 8) in [-1, 1] whose class (i % classes) sets their mean colour; labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = np.arange(n) % classes
    base = torch.linspace(-0.6, 0.6, classes)[torch.as_tensor(y)].view(n, 1, 1, 1)
    return (base + spread * torch.randn(n, 3, 8, 8, generator=g) / 3).clamp(-1, 1), y


def test_reference_file_stores_a_feature_subset_and_labels(fid, tmp_path):
    images, y = _classes(30)
    path = str(tmp_path / "ref.npz")
    mu, _ = fid.write_reference_stats(path, [images[:13], images[13:]], "w.pth", batch_size=7, labels=y,
                                      max_features=12, seed=3)
    z = np.load(path)
    assert set(z.files) == {"mu", "sigma", "num_images", "features", "labels"}
    keep = fid.feature_subset(30, 12, 3)
    assert list(keep) == sorted(keep) and len(set(keep.tolist())) == 12
    all_feats = fid.inception_features(Projection(), images)
    assert z["features"].dtype == np.float32 and z["features"].shape == (12, 2048)
    np.testing.assert_allclose(z["features"], all_feats[keep], rtol=1e-6)
    np.testing.assert_array_equal(z["labels"], y[keep])
    np.testing.assert_allclose(mu, all_feats.mean(0), rtol=1e-5, atol=1e-7)  # the statistics use every image
    got_f, got_y = fid.read_reference_features(path)
    np.testing.assert_array_equal(got_f, z["features"])
    np.testing.assert_array_equal(got_y, y[keep])
    # Without labels: features only; max_features=0: statistics only (as files were before).
    fid.write_reference_stats(str(tmp_path / "nolabels.npz"), images, "w.pth")
    assert set(np.load(tmp_path / "nolabels.npz").files) == {"mu", "sigma", "num_images", "features"}
    fid.write_reference_stats(str(tmp_path / "stats.npz"), images, "w.pth", max_features=0)
    assert set(np.load(tmp_path / "stats.npz").files) == {"mu", "sigma", "num_images"}
    with pytest.raises(ValueError, match="30 reference images but 29 labels"):
        fid.write_reference_stats(str(tmp_path / "x.npz"), images, "w.pth", labels=y[:-1])
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(2048), features=np.zeros((5, 7), np.float32))
    with pytest.raises(ValueError, match=r"`features` must be float \(M, 2048\).*jobs/fid_reference.py"):
        fid.read_reference_features(str(tmp_path / "bad.npz"))


def test_fid_evaluator_reports_coverage_with_a_featured_reference(fid, tmp_path):
    images, y = _classes(40)
    path = str(tmp_path / "ref.npz")
    fid.write_reference_stats(path, images, "w.pth", labels=y)
    ev = fid.FIDEvaluator("w.pth", path, batch_size=16, device="cpu")
    same = ev.evaluate(images, torch.as_tensor(y))
    assert same["eval/precision"] == 1.0 and same["eval/recall"] == 1.0
    assert same["eval/diversity"] == pytest.approx(1.0, rel=1e-5)
    assert same["eval/diversity_min"] == pytest.approx(1.0, rel=1e-5)
    collapsed = images[torch.as_tensor(y)]  # every image of class c is image c (a class-c image)
    col = ev.evaluate(collapsed, torch.as_tensor(y))
    assert col["eval/diversity"] < 1e-6 and col["eval/recall"] <= 0.25 and col["eval/precision"] == 1.0
    assert col["eval/fid"] > same["eval/fid"]
    no_labels = ev.evaluate(images)  # FID is unconditional: no labels, no diversity
    assert {"eval/fid", "eval/precision", "eval/recall"} <= set(no_labels) and "eval/diversity" not in no_labels


def test_fid_evaluator_without_reference_features_warns_once_and_reports_fid(fid, tmp_path):
    images, y = _classes(20)
    old = str(tmp_path / "old.npz")
    fid.write_reference_stats(old, images, "w.pth", max_features=0)  # mu/sigma only, as older files
    ev = fid.FIDEvaluator("w.pth", old, batch_size=16, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ev.evaluate(images, torch.as_tensor(y))
        second = ev.evaluate(images, torch.as_tensor(y))
    assert set(first) == set(second) == {"eval/fid", "eval/num_samples"}
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "holds no reference features" in msgs[0] and "jobs/fid_reference.py" in msgs[0]
    assert "\n" not in msgs[0]

    unlabelled = str(tmp_path / "folder.npz")
    fid.write_reference_stats(unlabelled, images, "w.pth")  # e.g. an image folder: no labels
    ev = fid.FIDEvaluator("w.pth", unlabelled, batch_size=16, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [ev.evaluate(images, torch.as_tensor(y)) for _ in range(2)]
    assert all({"eval/precision", "eval/recall"} <= set(o) and "eval/diversity" not in o for o in out)
    assert [("stores no labels" in str(w.message)) for w in caught] == [True]


def test_fid_evaluator_takes_coverage_features_from_adm_batches(fid, tmp_path, monkeypatch):
    images, y = _classes(24)
    u8 = fid.as_uint8_pixels(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) as ADM stores them
    only_images = tmp_path / "adm_samples.npz"
    np.savez(only_images, arr_0=u8, arr_1=y)  # ADM's batch of a conditional model: images and labels
    assert fid._npz_rows(str(only_images), "arr_0") == 24
    ev = fid.FIDEvaluator("w.pth", str(only_images), batch_size=10, device="cpu")
    out = ev.evaluate(images, torch.as_tensor(y))
    assert out["eval/fid"] == pytest.approx(0.0, abs=1e-6)
    assert out["eval/precision"] == 1.0 and out["eval/recall"] == 1.0 and out["eval/diversity"] == pytest.approx(1.0)

    # ADM's reference batches: mu/sigma and the images; the features of (at most 10k of) the images.
    mu, sigma = fid.feature_stats(fid.inception_features(Projection(), images))
    ref_batch = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref_batch, arr_0=u8, mu=mu, sigma=sigma)
    monkeypatch.setattr(fid, "MAX_REFERENCE_FEATURES", 24)
    ev = fid.FIDEvaluator("w.pth", str(ref_batch), batch_size=10, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ev.evaluate(images, torch.as_tensor(y))
    assert out["eval/precision"] == 1.0 and out["eval/recall"] == 1.0 and "eval/diversity" not in out
    assert ["stores no labels" in str(w.message) for w in caught] == [True]
    assert ev.coverage.features.shape == (24, 2048)


def test_fid_reference_job_stores_features_and_the_datasets_labels(fid, digits, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import fid_reference

    monkeypatch.setattr(fid_reference, "load_inception", lambda path, device=None: Projection())
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # the job checks the file exists; the stand-in network never reads it
    out = tmp_path / "ref.npz"
    assert fid_reference.main(["--data", digits, "--inception", str(weights), "--out", str(out), "--limit", "30",
                               "--seed", "2", "--max-features", "20", "--batch-size", "8", "--no-progress",
                               "--adm-batch", str(tmp_path / "batch.npz")]) == 0
    assert "the features of 20 of them with their labels" in capsys.readouterr().out
    from advflow.platform.data.shards import read_manifest
    from advflow.platform.data.storage import Storage

    storage = Storage(digits)
    m = read_manifest(storage)
    labels = np.concatenate([m.record.decode(storage.read(s.name))[1] for s in m.shards])
    keep = np.sort(np.random.default_rng(2).choice(len(labels), size=30, replace=False))
    z = np.load(out)
    assert z["features"].shape == (20, 2048) and int(z["num_images"]) == 30
    np.testing.assert_array_equal(z["labels"], labels[keep][fid.feature_subset(30, 20, 2)])
    batch = np.load(tmp_path / "batch.npz")  # ADM's layout of a class-conditional batch: images and labels
    assert batch["arr_0"].shape == (30, 8, 8, 3)
    np.testing.assert_array_equal(batch["arr_1"], labels[keep])

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    out2 = tmp_path / "folder.npz"
    assert fid_reference.main(["--images", str(folder), "--inception", str(weights), "--out", str(out2),
                               "--no-progress"]) == 0
    assert set(np.load(out2).files) == {"mu", "sigma", "num_images", "features"}  # a folder has no labels
    with pytest.raises(SystemExit):
        fid_reference.main(["--images", str(folder), "--inception", str(weights), "--out", str(out2),
                            "--max-features", "-1"])
    assert "--max-features -1: must be >= 0" in capsys.readouterr().err
