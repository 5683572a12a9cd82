"""The prepare job: digits and ImageFolder sources, pixel and sd-vae encoders, idempotent re-runs."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

import advflow.platform.data.prepare as prep
from advflow.platform.data.encoders import center_crop_resize, decode_latents
from advflow.platform.data.prepare import PrepareConfig, prepare
from advflow.platform.data.shards import MANIFEST_NAME, PARTS_DIR, read_manifest, verify_dataset
from advflow.platform.data.storage import Storage


def _cli():
    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "prepare_latents.py")
    spec = importlib.util.spec_from_file_location("prepare_latents_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _all_records(prefix: str):
    """Every record of the dataset, read straight from the shard bytes: (x (N, C, H, W), y (N,))."""
    m = read_manifest(prefix)
    st = Storage(prefix)
    xs, ys = zip(*(m.record.decode(st.read(s.name)) for s in m.shards))
    return m, np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def _sorted_pairs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Order-free view of a set of (image, label) records, for multiset comparison."""
    rows = np.concatenate([x.reshape(len(x), -1), y[:, None].astype(np.float32)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def _digits_reference():
    """The digits prepare writes by default: the train split only (the held-out split is the eval reference)."""
    from sklearn.datasets import load_digits

    from advflow.platform.data.digits import digits_split

    d = load_digits()
    train_idx, _ = digits_split(seed=0, holdout_fraction=0.2)
    return (d.images[train_idx] / 8.0 - 1.0)[:, None].astype(np.float32), d.target[train_idx]  # [0, 16] -> [-1, 1]


N_DIGITS = len(_digits_reference()[1])  # records of a default digits dataset


def test_digits_pixel_cli(storage_root):
    rc = _cli().main(["--source", "digits", "--encoder", "pixel", "--out", storage_root, "--no-progress",
                      "--shard-records", "500", "--chunk-records", "128"])
    assert rc == 0
    m, x, y = _all_records(storage_root)
    assert (m.num_records, m.shape, m.num_classes, len(m.shards)) == (N_DIGITS, (1, 8, 8), 10, -(-N_DIGITS // 500))
    holdout = {"fraction": 0.2, "seed": 0, "count": 1797 - N_DIGITS}
    assert m.encoder == {"name": "pixel", "scaling_factor": 1.0, "holdout": holdout} and m.record.dtype == "float16"
    assert m.params["digits_holdout"] == holdout
    ref_x, ref_y = _digits_reference()
    np.testing.assert_array_equal(_sorted_pairs(x, y), _sorted_pairs(ref_x, ref_y))
    assert y[:20].tolist() != ref_y[:20].tolist(), "records should be shuffled before sharding"
    np.testing.assert_allclose(m.channel_mean, [ref_x.mean()], atol=1e-6)
    np.testing.assert_allclose(m.channel_std, [ref_x.std()], atol=1e-6)
    assert m.params["source"] == "digits" and m.params["shard_records"] == 500
    assert verify_dataset(storage_root) == []
    assert _cli().main(["--verify", storage_root]) == 0


def test_digits_flips_and_resolution(tmp_path):
    out = str(tmp_path / "d")
    prepare(PrepareConfig(source="digits", out=out, flips=True, progress=False, dtype="float32"))
    m, x, y = _all_records(out)
    ref_x, ref_y = _digits_reference()
    both_x = np.concatenate([ref_x, ref_x[..., ::-1]])
    np.testing.assert_array_equal(_sorted_pairs(x, y), _sorted_pairs(both_x, np.concatenate([ref_y, ref_y])))
    out16 = str(tmp_path / "d16")
    m16 = prepare(PrepareConfig(source="digits", out=out16, resolution=16, limit=50, progress=False))
    assert m16.shape == (1, 16, 16) and m16.num_records == 50


def test_interrupted_run_leaves_no_manifest_and_resumes(storage_root, monkeypatch):
    cfg = PrepareConfig(source="digits", out=storage_root, shard_records=400, progress=False)
    real = prep.run_shard
    calls: list[int] = []

    def crash_on_3(job, on_batch=None):
        if job.index == 3:
            raise RuntimeError("worker lost")
        calls.append(job.index)
        return real(job, on_batch)

    monkeypatch.setattr(prep, "run_shard", crash_on_3)
    with pytest.raises(RuntimeError, match="worker lost"):
        prepare(cfg)
    st = Storage(storage_root)
    assert not st.exists(MANIFEST_NAME), "a failed run must not leave a manifest"
    assert sorted(st.list_sizes(PARTS_DIR)) == [f"shard-0000{i}.bin.json" for i in range(3)]

    calls.clear()

    def counting(job, on_batch=None):
        calls.append(job.index)
        return real(job, on_batch)

    monkeypatch.setattr(prep, "run_shard", counting)
    m = prepare(cfg)
    assert calls == list(range(3, -(-N_DIGITS // 400))), "only the unfinished shards are encoded again"
    assert m.num_records == N_DIGITS and verify_dataset(storage_root) == []

    calls.clear()
    again = prepare(cfg)
    assert calls == [] and again.created == m.created  # idempotent: nothing rewritten


def test_other_parameters_need_overwrite(tmp_path):
    out = str(tmp_path / "d")
    prepare(PrepareConfig(source="digits", out=out, progress=False))
    with pytest.raises(ValueError, match=r"different parameters \(seed\).*--overwrite"):
        prepare(PrepareConfig(source="digits", out=out, seed=1, progress=False))
    m = prepare(PrepareConfig(source="digits", out=out, seed=1, overwrite=True, progress=False))
    assert read_manifest(out).params["seed"] == 1 == m.params["seed"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ADVFLOW_TEST_RAY"),
                    reason="starts a local Ray instance (~45 s on a 2-core box); set ADVFLOW_TEST_RAY=1")
def test_ray_tasks_write_the_same_dataset(tmp_path):
    import ray

    a, b = str(tmp_path / "ray"), str(tmp_path / "inproc")
    try:
        ma = prepare(PrepareConfig(source="digits", out=a, shard_records=500, ray_address="local", progress=False))
    finally:
        ray.shutdown()
    mb = prepare(PrepareConfig(source="digits", out=b, shard_records=500, progress=False))
    assert [s.sha256 for s in ma.shards] == [s.sha256 for s in mb.shards]
    assert verify_dataset(a) == []


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="--source .*not 'digits' and not a directory"):
        PrepareConfig(source=str(tmp_path / "nope"), out="x")
    with pytest.raises(ValueError, match="vae_path"):
        PrepareConfig(source="digits", out="x", encoder="sd-vae")
    with pytest.raises(ValueError, match="shard_records must be >= 1"):
        PrepareConfig(source="digits", out="x", shard_records=0)


def test_encoder_table():
    from advflow.platform.data.encoders import (
        ENCODERS, SD_VAE_SCALE, EncoderSpec, PixelEncoder, SDVAEEncoder, encoder_record, resolve_device,
    )

    assert sorted(ENCODERS) == ["pixel", "sd-vae"]
    with pytest.raises(ValueError, match=r"^encoder 'nope' unknown; use 'pixel' or 'sd-vae'$"):
        EncoderSpec("nope")
    with pytest.raises(ValueError, match="encoder 'sd-vae' needs vae_path"):
        EncoderSpec("sd-vae")
    # The manifest's encoder record, key for key (what readers and registered models see).
    assert list(encoder_record(EncoderSpec("pixel")).items()) == [("name", "pixel"), ("scaling_factor", 1.0)]
    sd = encoder_record(EncoderSpec("sd-vae", "/m/vae", "cpu", "mean"))
    assert list(sd.items()) == [("name", "sd-vae"), ("scaling_factor", 0.18215), ("vae_path", "/m/vae"),
                                ("sample", "mean")]
    assert SD_VAE_SCALE == 0.18215
    assert not hasattr(PixelEncoder, "describe") and not hasattr(SDVAEEncoder, "describe")
    z = torch.tensor([[[[-3.0, 0.5]]]])
    assert torch.equal(decode_latents(z, {"name": "pixel", "scaling_factor": 1.0}), torch.tensor([[[[-1.0, 0.5]]]]))
    with pytest.raises(ValueError, match=r"manifest encoder name 'nope' unknown; expected 'pixel' or 'sd-vae'"):
        decode_latents(z, {"name": "nope"})
    with pytest.raises(ValueError, match=r"manifest encoder name None unknown"):
        decode_latents(z, {})
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") == auto and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.integration
def test_prepare_does_not_import_evaluation():
    import subprocess
    import sys

    code = ("import sys, advflow.platform.data.prepare; "
            "bad = sorted(m for m in sys.modules if m.startswith('advflow.platform.eval')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_center_crop_resize_reference():
    # 64x32 (W x H) image whose value is its column index: halved once by box filter (min side 32
    # >= 2 * 16), no further resize (short side is 16), centre columns 8..23 kept.
    cols = np.tile(np.arange(64, dtype=np.uint8), (32, 1))
    out = center_crop_resize(Image.fromarray(cols), 16)
    expected = np.tile((np.arange(0, 64, 2) + 0.5).astype(np.float32)[8:24], (16, 1))  # mean of column pairs
    assert out.shape == (16, 16)
    assert np.abs(out.astype(np.float32) - expected).max() <= 0.5


def _image_folder(root, size_by_class: dict[str, list[tuple[int, int]]], color_of=None) -> str:
    for c, sizes in size_by_class.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            color = color_of(c, i) if color_of else (40 * i, 100, 200)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.new("RGB", (w, h), color).save(os.path.join(root, c, f"img{i}.{ext}"))
    return str(root)


def test_image_folder_pixel(tmp_path):
    src = _image_folder(tmp_path / "train", {"cat": [(40, 30), (16, 16), (33, 60)], "dog": [(20, 50), (64, 64)]},
                        color_of=lambda c, i: (255, 0, 0) if c == "cat" else (0, 0, 255))
    out = str(tmp_path / "out")
    m = prepare(PrepareConfig(source=src, out=out, resolution=16, progress=False, dtype="float32"))
    assert (m.shape, m.num_classes, m.class_names, m.num_records) == ((3, 16, 16), 2, ["cat", "dog"], 5)
    _, x, y = _all_records(out)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1]
    # Solid red cats / blue dogs: exact channel values after [0, 255] -> [-1, 1] (PNG lossless).
    red = np.array([1.0, -1.0, -1.0])[:, None, None]
    blue = np.array([-1.0, -1.0, 1.0])[:, None, None]
    for xi, yi in zip(x, y):
        np.testing.assert_allclose(xi, np.broadcast_to(red if yi == 0 else blue, xi.shape), atol=0.03)


@pytest.fixture(scope="session")
def sd_vae_dir(tmp_path_factory):
    """A randomly initialised AutoencoderKL with Stable Diffusion's VAE architecture, saved locally
    (no weights can be downloaded here)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215,
    )
    path = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.mark.integration  # end-to-end: builds an SD-VAE in the real layout (seconds)
def test_sd_vae_encoder(tmp_path, sd_vae_dir):
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(0)
    src = tmp_path / "train"
    arrays = {}
    for c in ("a", "b"):
        os.makedirs(src / c)
        for i in range(2):  # already 16x16: the ADM crop is the identity, so the reference is exact
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(src / c / f"{i}.png")
            arrays[(c, i)] = arr
    out = str(tmp_path / "lat")
    m = prepare(PrepareConfig(source=str(src), out=out, encoder="sd-vae", vae_path=sd_vae_dir, vae_sample="mean",
                              resolution=16, dtype="float32", progress=False))
    assert m.shape == (4, 2, 2) and m.scaling_factor == 0.18215 and m.encoder["name"] == "sd-vae"
    assert list(m.encoder.items()) == [("name", "sd-vae"), ("scaling_factor", 0.18215),
                                       ("vae_path", os.path.abspath(sd_vae_dir)), ("sample", "mean")]
    assert read_manifest(out).encoder == m.encoder
    _, x, y = _all_records(out)

    # Reference: diffusers directly, posterior mean * 0.18215.
    vae = AutoencoderKL.from_pretrained(sd_vae_dir).eval()
    imgs = torch.from_numpy(np.stack(list(arrays.values()))).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = (vae.encode(imgs).latent_dist.mean * 0.18215).numpy()
    ref_y = np.array([0 if c == "a" else 1 for c, _ in arrays])
    np.testing.assert_allclose(_sorted_pairs(x, y), _sorted_pairs(ref, ref_y), rtol=1e-4, atol=1e-4)
    # Decoding (for sample grids) goes back to image space.
    img = decode_latents(torch.from_numpy(x[:1]), m.encoder)
    assert img.shape == (1, 3, 16, 16) and img.abs().max() <= 1


def test_overwrite_with_fewer_shards_removes_orphans(tmp_path):
    out = str(tmp_path / "d")
    prepare(PrepareConfig(source="digits", out=out, shard_records=400, progress=False))  # 4 shards
    m = prepare(PrepareConfig(source="digits", out=out, shard_records=1000, overwrite=True, progress=False))
    names = sorted(n for n in Storage(out).list_sizes() if n.endswith(".bin"))
    assert names == [s.name for s in m.shards] == ["shard-00000.bin", "shard-00001.bin"]
    assert verify_dataset(out) == []
