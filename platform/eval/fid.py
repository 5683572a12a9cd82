"""FID as ADM's evaluation suite computes it: Inception pool3 statistics of uint8 images against
reference statistics from an .npz.

The pipeline, step by step as ADM's `evaluations/evaluator.py` runs it:
1. generated pixels in [-1, 1] become the uint8 image a saved sample would be (`images.to_uint8`,
   the mapping of grids, the registry model and generate.py's --npz);
2. the FID Inception-v3 (`inception.py`) takes them as float [0, 255], resizes to 299x299 as the TF
   graph does and scales to [-1, 1];
3. mean and unbiased covariance of the 2048-d features; the Fréchet distance (`frechet.py`).

Next to eval/fid, the same features give the mode coverage (`coverage.py`): eval/precision and
eval/recall against reference features, and eval/diversity / eval/diversity_min (within-class spread
against the reference's, per class) when the reference features come with labels.

Reference files: ADM's batches are accepted as they are. Arrays `mu` (2048,) and `sigma`
(2048, 2048) are used when present (ADM's reference batches, pytorch-fid, `jobs/fid_reference.py`);
a file holding only `arr_0`, uint8 images (N, H, W, 3) (ADM's sample-batch layout), has its
statistics computed here. FID is biased upwards at small sample counts: 50_000 samples for numbers
comparable with papers, and within a sweep always the same count.

Reference features (precision, recall, diversity need them, not only mu/sigma): `features`
(M, 2048) float32, a seeded subset of at most `MAX_REFERENCE_FEATURES` of the reference images'
features, and `labels` (M,) int64, their classes when known (a prepared dataset), as
`write_reference_stats` and `jobs/fid_reference.py` store them. A file without `features` but with
`arr_0` images (ADM's batches) has the features of (at most `MAX_REFERENCE_FEATURES` of) its images
computed here once, as ADM's evaluator does for its precision and recall, with `arr_1` as their labels
when it holds one per image. A file with neither (statistics only: older files, pytorch-fid's) gives
eval/fid alone, with a one-line warning that says how to regenerate it.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from advflow.platform.eval.coverage import K_NEIGHBOURS, knn_radii, precision_recall, within_class_diversity
from advflow.platform.eval.frechet import FrechetReference, feature_stats, load_stats, save_stats
from advflow.platform.eval.inception import FEATURE_DIM, FIDInceptionV3, load_inception
from advflow.platform.images import to_uint8

ADM_IMAGES = "arr_0"  # ADM's batch .npz: uint8 images (N, H, W, 3)
ADM_LABELS = "arr_1"  # ADM's batch .npz of a class-conditional model: the images' labels (N,)
FEATURES = "features"  # reference .npz: a subset of the reference images' features (M, 2048) float32
LABELS = "labels"  # reference .npz: their classes (M,) int64, when known
MAX_REFERENCE_FEATURES = 10_000
"""Reference features kept for precision/recall/diversity (ADM's reference batches hold 10k images):
80 MB in float32 at 2048-d."""
_REGENERATE = ("regenerate it with jobs/fid_reference.py (--data PREFIX stores the dataset's labels too) or "
               "advflow.platform.eval.fid.write_reference_stats")


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


def adm_image_batches(path: str, batch_size: int, rows: np.ndarray | None = None) -> Iterable[torch.Tensor]:
    """The uint8 images of an ADM batch .npz (`arr_0`, (N, H, W, 3)) as (n, 3, H, W) batches; `rows`:
    only those images (indices), in that order."""
    with np.load(path, allow_pickle=False) as z:
        if ADM_IMAGES not in z.files:
            raise ValueError(f"reference stats {path}: neither `mu`/`sigma` nor `{ADM_IMAGES}` images (has "
                             f"{sorted(z.files)}); make one with jobs/fid_reference.py")
        arr = z[ADM_IMAGES]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{path}: `{ADM_IMAGES}` must be uint8 images (N, H, W, 3) as ADM's batches hold, got "
                         f"{arr.dtype} {arr.shape}")
    if rows is not None:
        arr = arr[rows]
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


def feature_subset(total: int, limit: int = MAX_REFERENCE_FEATURES, seed: int = 0) -> np.ndarray:
    """Sorted indices of the reference rows whose features are kept: all of them when total <= limit,
    else a seeded random `limit` of them."""
    if total <= limit:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def save_reference(path: str, features: np.ndarray, labels: np.ndarray | None = None, *,
                   max_features: int = MAX_REFERENCE_FEATURES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write the reference file of real images' `features` (N, 2048) to `path` (atomic): `mu`, `sigma`,
    `num_images`, and (max_features > 0) `features`, float32 rows of a seeded subset of at most
    `max_features` images, with `labels` (int64) of the same rows when `labels` (N,) is given.
    Returns (mu, sigma)."""
    mu, sigma = feature_stats(features)
    extra: dict[str, np.ndarray] = {"num_images": np.int64(len(features))}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(features):
            raise ValueError(f"{len(features)} reference images but {len(labels)} labels")
    if max_features > 0:
        keep = feature_subset(len(features), max_features, seed)
        extra[FEATURES] = np.asarray(features)[keep].astype(np.float32)
        if labels is not None:
            extra[LABELS] = labels[keep].astype(np.int64)
    save_stats(path, mu, sigma, **extra)
    return mu, sigma


def write_reference_stats(path: str, images: torch.Tensor | Iterable[torch.Tensor], inception_path: str,
                          batch_size: int = 64, device: str | None = None, *, labels: np.ndarray | None = None,
                          max_features: int = MAX_REFERENCE_FEATURES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Compute Inception (mu, sigma) of real `images` (tensor or iterable of batches, float in [-1, 1]
    or uint8) and write them to `path` (`save_reference`: `mu`, `sigma`, `num_images`, and the
    features of at most `max_features` images with their `labels` (N,) when given; atomic). Returns
    (mu, sigma). jobs/fid_reference.py does this for a prepared dataset or an image folder."""
    model = load_inception(inception_path, device)
    feats = inception_features(model, images, batch_size)
    return save_reference(path, feats, labels, max_features=max_features, seed=seed)


def read_reference_features(path: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(`features` (M, 2048) float32, `labels` (M,) int64 or None) of a reference .npz, or (None, None)
    when it stores no features. ValueError for malformed arrays."""
    with np.load(path, allow_pickle=False) as z:
        if FEATURES not in z.files:
            return None, None
        feats = z[FEATURES]
        labels = z[LABELS] if LABELS in z.files else None
    if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM or not np.issubdtype(feats.dtype, np.floating):
        raise ValueError(f"reference stats {path}: `{FEATURES}` must be float (M, {FEATURE_DIM}) Inception "
                         f"features, got {feats.dtype} {feats.shape}; {_REGENERATE}")
    if labels is not None and (labels.shape != (len(feats),) or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"reference stats {path}: `{LABELS}` must be integer ({len(feats)},), one class per "
                         f"feature row, got {labels.dtype} {labels.shape}; {_REGENERATE}")
    return feats.astype(np.float32, copy=False), None if labels is None else labels.astype(np.int64)


@dataclass(frozen=True)
class CoverageReference:
    """What precision/recall and diversity compare against: reference `features` (M, 2048) on the
    evaluator's device, their k-NN `radii` (M,), and their `labels` (M,) (numpy) or None."""

    features: torch.Tensor
    radii: torch.Tensor
    labels: np.ndarray | None


class FIDEvaluator:
    """eval/fid (primary) of generated images against `reference_stats_path` (.npz, see module doc).

    inception_path: FID Inception weights (see inception.load_inception). batch_size: images per
    Inception call. device: None = CUDA when available. pr_k: the k of precision and recall. FID is
    unconditional; the labels the images were generated with are used by eval/diversity only.

    Returns eval/fid, eval/num_samples, and with reference features (see the module doc)
    eval/precision, eval/recall (more than pr_k images) and, with labels on both sides,
    eval/diversity and eval/diversity_min.

    Split for evaluation on many ranks: each rank calls `features` on its share of the images, and
    one rank calls `metrics_from_features` on all of them; `evaluate` is both in one process.
    """

    primary = "eval/fid"
    required_samples = 50_000

    def __init__(self, inception_path: str, reference_stats_path: str, batch_size: int = 64, *,
                 device: str | None = None, pr_k: int = K_NEIGHBOURS) -> None:
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
        self._images_only = has_images  # ADM's sample-batch layout: statistics computed from `arr_0`
        self.pr_k = int(pr_k)
        self._reference: FrechetReference | None = None  # its square root is built where the distance is taken
        self._coverage: CoverageReference | None = None
        self._coverage_read = False  # the coverage reference is read once, where the metrics are computed
        self._image_features: np.ndarray | None = None  # an `arr_0`-only file's kept features, from its stats pass
        self._warned_labels = False

    @property
    def reference(self) -> FrechetReference:
        if self._reference is None:
            path = self.reference_path
            if self._images_only:  # every image's features: the coverage reference keeps a subset of them
                feats = inception_features(self.model, adm_image_batches(path, self.batch_size), self.batch_size)
                mu, sigma = feature_stats(feats)
                self._image_features = feats[feature_subset(len(feats))]
            else:
                mu, sigma = load_stats(path, dim=FEATURE_DIM)
            self._reference = FrechetReference(mu, sigma, f"reference stats {path}")
        return self._reference

    @property
    def coverage(self) -> CoverageReference | None:
        """The reference of precision/recall and diversity (see the module doc), read (or computed from
        `arr_0` images) on first use; None, after a one-line warning, when the file has neither."""
        if not self._coverage_read:
            self._coverage = self._read_coverage()
            self._coverage_read = True
        return self._coverage

    def _read_coverage(self) -> CoverageReference | None:
        path = self.reference_path
        feats, labels = read_reference_features(path)
        if feats is None:
            with np.load(path, allow_pickle=False) as z:
                has_images = ADM_IMAGES in z.files
                adm_labels = z[ADM_LABELS] if ADM_LABELS in z.files else None
            if not has_images:
                warnings.warn(f"reference stats {path} holds no reference features (`{FEATURES}`) nor images "
                              f"(`{ADM_IMAGES}`): eval/precision, eval/recall and eval/diversity are skipped; "
                              f"{_REGENERATE}", stacklevel=3)
                return None
            total = _npz_rows(path, ADM_IMAGES)
            keep = feature_subset(total)
            self.reference  # noqa: B018 - an `arr_0`-only file: its stats pass has the features already
            if self._image_features is not None:
                feats, self._image_features = self._image_features, None
            else:  # ADM's reference batches: mu/sigma stored, the images' features computed here (as ADM does)
                feats = inception_features(self.model, adm_image_batches(path, self.batch_size, keep), self.batch_size)
            if (adm_labels is not None and adm_labels.shape == (total,)
                    and np.issubdtype(adm_labels.dtype, np.integer)):
                labels = adm_labels[keep].astype(np.int64)
        if len(feats) <= self.pr_k:
            warnings.warn(f"reference stats {path}: {len(feats)} reference feature rows, precision and recall need "
                          f"more than k={self.pr_k}: eval/precision, eval/recall and eval/diversity are skipped; "
                          f"{_REGENERATE} from more images", stacklevel=3)
            return None
        device = next(self.model.parameters()).device
        x = torch.as_tensor(np.asarray(feats, dtype=np.float32), device=device)
        return CoverageReference(features=x, radii=knn_radii(x, self.pr_k), labels=labels)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) generated pixels in [-1, 1] -> (N, 2048) float64 Inception features."""
        return inception_features(self.model, images, self.batch_size)

    def metrics_from_features(self, features: np.ndarray, labels: torch.Tensor | None = None) -> dict[str, float]:
        """All generated images' features (N, 2048), with the (N,) labels they were generated with (or
        None) -> eval/fid, eval/num_samples, and the coverage metrics the reference allows (class doc)."""
        out = {"eval/fid": self.reference.distance_to_features(features, "generated images"),
               "eval/num_samples": float(len(features))}
        ref = self.coverage
        if ref is None:
            return out
        if len(features) > self.pr_k:
            out["eval/precision"], out["eval/recall"] = precision_recall(
                ref.features, features, self.pr_k, real_radii=ref.radii, device=ref.features.device)
        if labels is None:
            return out
        y = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
        if len(y) != len(features):
            raise ValueError(f"{len(features)} images but {len(y)} labels: pass the label each image was "
                             "generated with")
        if ref.labels is None:
            if not self._warned_labels:
                self._warned_labels = True
                warnings.warn(f"reference stats {self.reference_path} stores no labels of its features: "
                              f"eval/diversity is skipped; {_REGENERATE}", stacklevel=2)
            return out
        div = within_class_diversity(ref.features.cpu().numpy(), ref.labels, features, y.numpy())
        if div["classes"]:
            out["eval/diversity"], out["eval/diversity_min"] = div["diversity"], div["diversity_min"]
        return out

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        return self.metrics_from_features(self.features(images), labels)


def _npz_rows(path: str, name: str) -> int:
    """Rows of array `name` of an .npz, read from its header (the array itself is not loaded)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return int(shape[0])
