"""FID: Inception pool3 statistics of generated images against reference statistics from an .npz.

Reference files follow the ADM / pytorch-fid convention (arrays `mu` (2048,) and `sigma` (2048, 2048)),
so statistics made by those tools can be used as they are, and `write_reference_stats` makes them
from your own images. FID is biased upwards at small sample counts: 50_000 samples for numbers
comparable with papers, and within a sweep always the same count.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from advflow.platform.eval.inception import FEATURE_DIM, FIDInceptionV3, load_inception
from advflow.platform.eval.frechet import FrechetReference, feature_stats, load_stats, save_stats


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: torch.Tensor | Iterable[torch.Tensor],
                       batch_size: int = 64) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] (C = 1 is repeated to RGB), or an iterable of such batches
    -> (N, 2048) float64 features."""
    device = next(model.parameters()).device
    batches = [images] if isinstance(images, torch.Tensor) else images
    out = []
    for batch in batches:
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(batch.shape)}")
        if not torch.isfinite(batch).all():
            raise ValueError("images contain NaN/Inf: the generator diverged")
        for a in range(0, len(batch), batch_size):
            x = batch[a:a + batch_size].to(device, torch.float32).clamp(-1, 1)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(model.features(x).double().cpu())
    if not out:
        raise ValueError("no images given")
    return torch.cat(out).numpy()  # (N, 2048)


def write_reference_stats(path: str, images: torch.Tensor | Iterable[torch.Tensor], inception_path: str,
                          batch_size: int = 64, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Compute Inception (mu, sigma) of real `images` (tensor or iterable of batches, [-1, 1]) and
    write them to `path` (.npz with `mu`, `sigma`, `num_images`; atomic). Returns (mu, sigma)."""
    model = load_inception(inception_path, device)
    feats = inception_features(model, images, batch_size)
    mu, sigma = feature_stats(feats)
    save_stats(path, mu, sigma, num_images=np.int64(len(feats)))
    return mu, sigma


class FIDEvaluator:
    """eval/fid (primary) of generated images against `reference_stats_path` (.npz mu/sigma).

    inception_path: FID Inception weights (see inception.load_inception). batch_size: images per
    Inception call. device: None = CUDA when available. Labels are ignored (unconditional FID).
    """

    primary = "eval/fid"
    required_samples = 50_000

    def __init__(self, inception_path: str, reference_stats_path: str, batch_size: int = 64, *,
                 device: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
        # Stats first: a bad .npz fails before the 100 MB of weights are loaded.
        self.ref_mu, self.ref_sigma = load_stats(reference_stats_path, dim=FEATURE_DIM)
        self.reference = FrechetReference(self.ref_mu, self.ref_sigma, f"reference stats {reference_stats_path}")
        self.model = load_inception(inception_path, device)
        self.batch_size = batch_size

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        feats = inception_features(self.model, images, self.batch_size)
        return {"eval/fid": self.reference.distance_to_features(feats, "generated images"),
                "eval/num_samples": float(len(feats))}
