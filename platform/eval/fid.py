"""FID as ADM's evaluation suite computes it: Inception pool3 statistics of uint8 images against
reference statistics from an .npz.

The pipeline, step by step as ADM's `evaluations/evaluator.py` runs it:
1. generated pixels in [-1, 1] become the uint8 image a saved sample would be (`images.to_uint8`,
   the mapping of grids, the registry model and generate.py's --npz);
2. the FID Inception-v3 (`inception.py`) takes them as float [0, 255], resizes to 299x299 as the TF
   graph does and scales to [-1, 1];
3. mean and unbiased covariance of the 2048-d features; the Fréchet distance (`frechet.py`).

Reference files: ADM's batches are accepted as they are. Arrays `mu` (2048,) and `sigma`
(2048, 2048) are used when present (ADM's reference batches, pytorch-fid, `jobs/fid_reference.py`);
a file holding only `arr_0`, uint8 images (N, H, W, 3) (ADM's sample-batch layout), has its
statistics computed here. FID is biased upwards at small sample counts: 50_000 samples for numbers
comparable with papers, and within a sweep always the same count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from advflow.platform.eval.frechet import FrechetReference, feature_stats, load_stats, save_stats
from advflow.platform.eval.inception import FEATURE_DIM, FIDInceptionV3, load_inception
from advflow.platform.images import to_uint8

ADM_IMAGES = "arr_0"  # ADM's batch .npz: uint8 images (N, H, W, 3)


def as_uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) -> uint8 (N, 3, H, W). Float images are generated pixels in [-1, 1], quantised
    as a saved image would be; uint8 images are taken as they are; grey is repeated to RGB."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) (float in [-1, 1] or uint8), got shape "
                         f"{tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN/Inf: the generator diverged")
        images = torch.from_numpy(to_uint8(images.detach().float().cpu())).permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: torch.Tensor | Iterable[torch.Tensor],
                       batch_size: int = 64) -> np.ndarray:
    """Images (N, C, H, W), float in [-1, 1] or uint8 (see as_uint8_pixels), or an iterable of such
    batches -> (N, 2048) float64 features."""
    device = next(model.parameters()).device
    batches = [images] if isinstance(images, torch.Tensor) else images
    out = []
    for batch in batches:
        pixels = as_uint8_pixels(batch)
        for a in range(0, len(pixels), batch_size):
            out.append(model.features(pixels[a:a + batch_size].to(device)).double().cpu())
    if not out:
        raise ValueError("no images given")
    return torch.cat(out).numpy()  # (N, 2048)


def adm_image_batches(path: str, batch_size: int) -> Iterable[torch.Tensor]:
    """The uint8 images of an ADM batch .npz (`arr_0`, (N, H, W, 3)) as (n, 3, H, W) batches."""
    with np.load(path, allow_pickle=False) as z:
        if ADM_IMAGES not in z.files:
            raise ValueError(f"reference stats {path}: neither `mu`/`sigma` nor `{ADM_IMAGES}` images (has "
                             f"{sorted(z.files)}); make one with jobs/fid_reference.py")
        arr = z[ADM_IMAGES]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: `{ADM_IMAGES}` must be uint8 images (N, H, W, 3) as ADM's batches hold, got "
                         f"{arr.dtype} {arr.shape}")
    for a in range(0, len(arr), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(arr[a:a + batch_size])).permute(0, 3, 1, 2)


def load_reference(path: str, model: FIDInceptionV3, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an .npz: its `mu`/`sigma` when it has them, else the statistics of its `arr_0`
    images (ADM's evaluator reads reference batches the same way)."""
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            has_stats = "mu" in z.files and "sigma" in z.files
        if not has_stats:
            return feature_stats(inception_features(model, adm_image_batches(path, batch_size), batch_size))
    return load_stats(path, dim=FEATURE_DIM)


def write_reference_stats(path: str, images: torch.Tensor | Iterable[torch.Tensor], inception_path: str,
                          batch_size: int = 64, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Compute Inception (mu, sigma) of real `images` (tensor or iterable of batches, float in [-1, 1]
    or uint8) and write them to `path` (.npz with `mu`, `sigma`, `num_images`; atomic). Returns (mu, sigma).
    jobs/fid_reference.py does this for a prepared dataset or an image folder."""
    model = load_inception(inception_path, device)
    feats = inception_features(model, images, batch_size)
    mu, sigma = feature_stats(feats)
    save_stats(path, mu, sigma, num_images=np.int64(len(feats)))
    return mu, sigma


class FIDEvaluator:
    """eval/fid (primary) of generated images against `reference_stats_path` (.npz, see module doc).

    inception_path: FID Inception weights (see inception.load_inception). batch_size: images per
    Inception call. device: None = CUDA when available. Labels are ignored (unconditional FID).

    Split for evaluation on many ranks: each rank calls `features` on its share of the images, and
    one rank calls `metrics_from_features` on all of them; `evaluate` is both in one process.
    """

    primary = "eval/fid"
    required_samples = 50_000

    def __init__(self, inception_path: str, reference_stats_path: str, batch_size: int = 64, *,
                 device: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
        # Stats first: a bad .npz fails before the 100 MB of weights are loaded.
        has_images = False
        if os.path.isfile(reference_stats_path):
            with np.load(reference_stats_path, allow_pickle=False) as z:
                has_images = ADM_IMAGES in z.files and not ("mu" in z.files and "sigma" in z.files)
        if not has_images:
            load_stats(reference_stats_path, dim=FEATURE_DIM)
        self.model = load_inception(inception_path, device)
        self.batch_size = batch_size
        self.reference_path = reference_stats_path
        self._reference: FrechetReference | None = None  # its square root is built where the distance is taken

    @property
    def reference(self) -> FrechetReference:
        if self._reference is None:
            mu, sigma = load_reference(self.reference_path, self.model, self.batch_size)
            self._reference = FrechetReference(mu, sigma, f"reference stats {self.reference_path}")
        return self._reference

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) generated pixels in [-1, 1] -> (N, 2048) float64 Inception features."""
        return inception_features(self.model, images, self.batch_size)

    def metrics_from_features(self, features: np.ndarray, labels: torch.Tensor | None = None) -> dict[str, float]:
        """All generated images' features (N, 2048) -> eval/fid, eval/num_samples."""
        return {"eval/fid": self.reference.distance_to_features(features, "generated images"),
                "eval/num_samples": float(len(features))}

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        return self.metrics_from_features(self.features(images), labels)
