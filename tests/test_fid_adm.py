"""FID as ADM's evaluation suite computes it (issue 14, item 4), with random Inception weights.

Checked against computations written here from their definitions, never against advflow's own code:
- the network's input is the TF graph's: TF1's legacy bilinear resize (an interpolation matrix built
  from the definition) and (x - 128) / 128, read at the first convolution;
- generated images are quantised exactly as a saved PNG is;
- on the same images and weights, advflow's FID equals torchmetrics' FrechetInceptionDistance (its
  own statistics and Fréchet distance, fed the network's features) within 1e-3 relative, with the
  reference given as ADM's `arr_0` batch and as `mu`/`sigma` made by jobs/fid_reference.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from advflow.platform.eval.fid import FIDEvaluator, inception_features
from advflow.platform.eval.frechet import feature_stats, load_stats
from advflow.platform.eval.inception import load_inception, tf1_resize_bilinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import fid_reference  # noqa: E402  (jobs/ is a folder of scripts, not a package)
from test_inception import _random_inception  # noqa: E402


def _tf1_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False):
    output o reads the input at o * (n_in / n_out), between floor() and the next pixel (clamped)."""
    m = np.zeros((n_out, n_in))
    scale = np.float32(n_in / n_out)  # TF computes the scale and the source coordinates in float32
    for o in range(n_out):
        src = float(np.float32(o) * scale)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        m[o, lo] += 1 - (src - lo)
        m[o, hi] += src - lo
    return m


def _png_uint8(images: torch.Tensor, folder: Path | None = None) -> torch.Tensor:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, 3, H, W) as a saved image holds it: round((x + 1) * 127.5) in
    [0, 255]; with `folder`, each is also written there as a PNG and read back (PNG is lossless)."""
    arr = np.clip(np.rint((images.double().numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if folder is not None:
        for i, a in enumerate(arr):
            Image.fromarray(a).save(folder / f"img{i:03d}.png")
        arr = np.stack([np.asarray(Image.open(folder / f"img{i:03d}.png")) for i in range(len(arr))])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _images(n: int, seed: int, sharp: float, side: int = 32) -> torch.Tensor:
    """Smooth random colour images in [-1, 1]; `sharp` sets the contrast (two distributions)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return torch.tanh(sharp * x + 0.3 * torch.randn(n, 3, side, side, generator=g))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_inception(seed=3).state_dict(), path)
    return str(path)


def test_tf1_resize_by_hand():
    x = torch.tensor([[[[0.0, 100.0], [200.0, 40.0]]]])  # (1, 1, 2, 2)
    # TF1 samples the input at 0, 0.5, 1, 1.5 (clamped): the last column repeats the edge.
    np.testing.assert_allclose(tf1_resize_bilinear(x, 4)[0, 0, 0].numpy(), [0, 50, 100, 100])
    np.testing.assert_allclose(tf1_resize_bilinear(x, 4)[0, 0, :, 0].numpy(), [0, 100, 200, 200])
    np.testing.assert_allclose(_tf1_matrix(2, 4) @ np.array([0.0, 100.0]), [0, 50, 100, 100])


@pytest.mark.parametrize("h, w", [(32, 32), (299, 299), (400, 310)])
def test_network_input_is_the_tf_graphs(weights, h, w):
    model = load_inception(weights, "cpu")
    seen = []

    class Seen(Exception):
        pass

    def grab(module, inputs):
        seen.append(inputs[0])
        raise Seen  # the input of the first convolution is all this test reads

    model.Conv2d_1a_3x3.register_forward_pre_hook(grab)
    x = torch.randint(0, 256, (2, 3, h, w), generator=torch.Generator().manual_seed(h), dtype=torch.uint8)
    with torch.no_grad(), pytest.raises(Seen):
        model.features(x)
    rh, rw = _tf1_matrix(h, 299), _tf1_matrix(w, 299)
    want = (rh @ x.double().numpy() @ rw.T - 128.0) / 128.0  # (N, 3, 299, 299)
    np.testing.assert_allclose(seen[0].double().numpy(), want, rtol=0, atol=2e-6)


@pytest.mark.integration  # end-to-end: an Inception pass over generated images (seconds)
def test_generated_images_are_quantised_as_a_saved_png(weights, tmp_path):
    ev_model = load_inception(weights, "cpu")
    levels = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(0)).double()
    x = (levels / 127.5 - 1.0).float()  # exactly on the uint8 levels
    jitter = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * (0.8 / 127.5)
    x = torch.cat([x, (x + jitter).clamp(-1, 1), torch.full((1, 3, 16, 16), 1.7)])  # out of range: clamped
    png = _png_uint8(x.clamp(-1, 1), tmp_path)
    got = inception_features(ev_model, x)
    np.testing.assert_array_equal(got, inception_features(ev_model, png))
    np.testing.assert_array_equal(got[:3], got[3:6])  # below half a level: the same saved image


class _Features(nn.Module):
    """torchmetrics' custom feature extractor: uint8 (N, 3, H, W) -> the network's (N, 2048) in float64."""

    num_features = 2048

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.features(x).double()


@pytest.mark.integration  # end to end: jobs/fid_reference.py, FIDEvaluator and torchmetrics over Inception at 299 px (~85 s)
def test_fid_equals_torchmetrics(weights, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = _images(24, seed=0, sharp=1.0)
    fake = _images(24, seed=1, sharp=2.5)
    folder = tmp_path / "real"
    folder.mkdir()
    real_u8 = _png_uint8(real, folder)
    # ADM's layout: a batch .npz with only `arr_0`, uint8 (N, H, W, 3); and jobs/fid_reference.py's stats.
    adm = tmp_path / "ref_batch.npz"
    np.savez(adm, arr_0=real_u8.permute(0, 2, 3, 1).numpy())
    stats = tmp_path / "ref_stats.npz"
    assert fid_reference.main(["--images", str(folder), "--inception", weights, "--out", str(stats),
                               "--batch-size", "10", "--device", "cpu", "--no-progress"]) == 0
    assert int(np.load(stats)["num_images"]) == 24

    ours = {name: FIDEvaluator(weights, str(path), batch_size=10, device="cpu").evaluate(fake)["eval/fid"]
            for name, path in (("adm_batch", adm), ("job_stats", stats))}

    metric = FrechetInceptionDistance(feature=_Features(load_inception(weights, "cpu")), normalize=False)
    metric.update(real_u8, real=True)
    metric.update(_png_uint8(fake), real=False)
    theirs = float(metric.compute())
    print(f"FID advflow (ADM arr_0 reference) {ours['adm_batch']:.6f}, advflow (jobs/fid_reference.py stats) "
          f"{ours['job_stats']:.6f}, torchmetrics {theirs:.6f}")
    assert theirs > 1.0
    for value in ours.values():
        assert value == pytest.approx(theirs, rel=1e-3)


@pytest.mark.integration  # end to end: jobs/fid_reference.py over a prepared dataset, Inception at 299 px (~15 s)
def test_reference_job_reads_a_prepared_dataset(digits, weights, tmp_path):
    out = tmp_path / "digits_ref.npz"
    assert fid_reference.main(["--data", digits, "--inception", weights, "--out", str(out), "--limit", "12",
                               "--seed", "5", "--batch-size", "5", "--device", "cpu", "--no-progress",
                               "--adm-batch", str(tmp_path / "batch.npz")]) == 0
    mu, sigma = load_stats(str(out), dim=2048)
    # The same 12 records read here through the data reader's own path: shards in manifest order.
    from advflow.platform.data.shards import read_manifest
    from advflow.platform.data.storage import Storage

    storage = Storage(digits)
    m = read_manifest(storage)
    x = np.concatenate([m.record.decode(storage.read(s.name))[0] for s in m.shards]).astype(np.float32)
    keep = np.sort(np.random.default_rng(5).choice(len(x), size=12, replace=False))
    images = torch.from_numpy(x[keep]).clamp(-1, 1)  # pixel encoder: the latents are the images
    batch = np.load(tmp_path / "batch.npz")["arr_0"]
    assert batch.shape == (12, 8, 8, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[..., 0], _png_uint8(images.expand(-1, 3, -1, -1))[:, 0].numpy())
    want_mu, want_sigma = feature_stats(inception_features(load_inception(weights, "cpu"), images))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-6, atol=1e-9)


def test_reference_job_errors_name_the_flag_and_the_fix(weights, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fid_reference.main(["--images", str(tmp_path), "--inception", str(tmp_path / "nope.pth"), "--out", "r.npz"])
    assert "--inception" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fid_reference.main(["--images", str(tmp_path), "--inception", weights, "--out", "ref.txt"])
    assert "--out ref.txt: name an .npz file" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "b.png")
    assert fid_reference.main(["--images", str(tmp_path), "--inception", weights, "--out",
                               str(tmp_path / "r.npz"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "b.png: 9x8 pixels, the first image is 8x8; resize or crop" in err
    assert not (tmp_path / "r.npz").exists()
