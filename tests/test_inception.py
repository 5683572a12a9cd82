"""FID Inception-v3: architecture, strict weight loading with clear errors, FIDEvaluator end to end.

No real weights can be downloaded here: a randomly initialised network is saved by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from advflow.platform.eval.fid import FIDEvaluator, inception_features, write_reference_stats
from advflow.platform.eval.inception import FIDInceptionV3, load_inception, random_inception
from advflow.platform.eval.frechet import load_stats


def _random_inception(seed: int = 0) -> FIDInceptionV3:
    return random_inception(seed)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    model = _random_inception()
    torch.save(model.state_dict(), path)
    return str(path), model


def test_architecture_matches_inception_v3():
    model = FIDInceptionV3()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 94 and all(b.eps == 1e-3 for b in bns) and all(c.bias is None for c in convs)
    # torchvision documents 27,161,264 parameters for Inception-v3 with its aux classifier; the aux head
    # is conv 768->128 1x1 (98,304 + BN 256), conv 128->768 5x5 (2,457,600 + BN 1,536) and fc 768->1000
    # (769,000). The FID graph has no aux head and 1008 instead of 1000 classes (+8 * 2049).
    expected = 27_161_264 - (98_304 + 256 + 2_457_600 + 1_536 + 769_000) + 8 * 2049
    assert sum(p.numel() for p in model.parameters()) == expected
    keys = model.state_dict()
    for name, shape in [("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)), ("Mixed_5b.branch_pool.conv.weight", (32, 192, 1, 1)),
                        ("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7)),
                        ("Mixed_7c.branch3x3dbl_3b.bn.running_var", (384,)), ("fc.weight", (1008, 2048))]:
        assert tuple(keys[name].shape) == shape


def test_pools_follow_the_tf_graph():
    """Average pools exclude padding (TF SAME pooling); Mixed_7c's pool branch is a max-pool."""
    model = FIDInceptionV3().eval()
    seen = []
    model.Mixed_7b.branch_pool.register_forward_hook(lambda m, i, o: seen.append(("7b", i[0])))
    model.Mixed_7c.branch_pool.register_forward_hook(lambda m, i, o: seen.append(("7c", i[0])))
    x7b = torch.randn(1, 1280, 8, 8)
    with torch.no_grad():
        model.Mixed_7b(x7b)
        x7c = torch.randn(1, 2048, 8, 8)
        model.Mixed_7c(x7c)
    # Corner of a 3x3 same-padded mean: 4 valid inputs, divided by 4 (not 9).
    assert torch.allclose(seen[0][1][0, :, 0, 0], x7b[0, :, :2, :2].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(seen[1][1][0, :, 4, 4], x7c[0, :, 3:6, 3:6].amax(dim=(1, 2)))


@pytest.mark.integration  # end-to-end: a full Inception-v3 at 299 px on CPU (seconds)
def test_strict_reload_and_feature_shape(weights):
    path, model = weights
    loaded = load_inception(path, device="cpu")
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    g = torch.Generator().manual_seed(0)
    for size in (64, 299):
        x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
        with torch.no_grad():
            f = loaded.features(x)
        assert f.shape == (2, 2048) and torch.isfinite(f).all() and f.std() > 1e-3


@pytest.mark.integration  # end-to-end: a full Inception-v3 at 299 px on CPU (seconds)
def test_bad_state_dicts_give_one_clear_error(weights, tmp_path):
    _, model = weights
    state = model.state_dict()
    broken = {k: v for k, v in state.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}
    broken["fc.weight"] = torch.zeros(1000, 2048)
    broken["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    bad = tmp_path / "bad.pth"
    torch.save(broken, bad)
    with pytest.raises(ValueError) as exc:
        load_inception(str(bad), device="cpu")
    msg = str(exc.value)
    for part in (str(bad), "missing (1): Mixed_6c.branch7x7_2.conv.weight", "unexpected (1): AuxLogits.fc.weight",
                 "fc.weight (1000, 2048) (expected (1008, 2048))", "pt_inception-2015-12-05"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="nope.pth.*no such file.*pt_inception"):
        load_inception(str(tmp_path / "nope.pth"))
    # Old-format files without BatchNorm's num_batches_tracked counters still load.
    lean = tmp_path / "lean.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, lean)
    load_inception(str(lean), device="cpu")


def _fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent low-rank closed form (N < D): with X_i = centred features / sqrt(N_i - 1),
    sigma_i = X_i^T X_i and the nonzero eigenvalues of sigma_1 sigma_2 are the squared singular values
    of M = X_1 X_2^T, so tr sqrt(sigma_1 sigma_2) is the nuclear norm of M."""
    x1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    x2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()
    d = f1.mean(0) - f2.mean(0)
    return float(d @ d + (x1 ** 2).sum() + (x2 ** 2).sum() - 2 * nuclear)


@pytest.mark.integration  # end-to-end: a full Inception-v3 at 299 px on CPU (seconds)
def test_fid_evaluator(weights, tmp_path):
    path, _ = weights
    g = torch.Generator().manual_seed(1)
    real = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    other = torch.tanh(3 * torch.randn(4, 3, 32, 32, generator=g))
    ref_path = str(tmp_path / "ref.npz")
    mu, sigma = write_reference_stats(ref_path, [real[:3], real[3:]], path, batch_size=2, device="cpu")
    model = load_inception(path, "cpu")
    f_real, f_other = inception_features(model, real), inception_features(model, other)
    np.testing.assert_allclose(mu, f_real.mean(0), rtol=1e-6, atol=1e-9)  # batching does not change features
    got_mu, _ = load_stats(ref_path, dim=2048)
    np.testing.assert_array_equal(got_mu, mu)

    ev = FIDEvaluator(path, ref_path, batch_size=4, device="cpu")
    assert ev.primary == "eval/fid"
    labels = torch.zeros(4, dtype=torch.long)
    same = ev.evaluate(real, labels)["eval/fid"]
    assert same == pytest.approx(0.0, abs=1e-6 * np.trace(sigma))
    fid = ev.evaluate(other, labels)["eval/fid"]
    expected = _fid_from_features(f_real, f_other)
    assert np.isfinite(fid) and expected > 1e-3 * np.trace(sigma) and fid == pytest.approx(expected, rel=1e-4)
    # Malformed reference files fail before the weights load, naming the file.
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="small.npz: 3-d, expected 2048-d"):
        FIDEvaluator(path, str(tmp_path / "small.npz"), 4, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
        FIDEvaluator(path, str(tmp_path / "missing.npz"), 4, device="cpu")
