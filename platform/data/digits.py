"""scikit-learn's 8x8 handwritten digits: the arrays, their pixel mapping, the held-out split, the resize.

One home for the facts the prepare job (which writes the train split into shards) and the digits
evaluator (whose reference is the held-out split, `advflow.platform.eval.digits`) must agree on:
- `digits_arrays`: the 1797 images in [0, 16] and their labels, in scikit-learn's order;
- `digits_pixels`: [0, 16] -> [-1, 1], (N, 1, 8, 8), as the pixel encoder stores them;
- `digits_split` / `stratified_split`: the deterministic, class-stratified hold-out;
- `resize_digits`: how digits are written at a resolution other than 8 (the evaluator replays it).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """-> (images (1797, 8, 8) float32 in [0, 16], labels (1797,) int64), scikit-learn's order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_pixels(idx: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as the pixel encoder stores them: ((N, 1, 8, 8) float32 in [-1, 1], (N,) int64)."""
    images, labels = digits_arrays()
    if idx is not None:
        images, labels = images[idx], labels[idx]
    return torch.from_numpy(images)[:, None] / 8.0 - 1.0, torch.from_numpy(labels)  # [0, 16] -> [-1, 1]


def stratified_split(labels: np.ndarray, seed: int, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out round(fraction * n_c) random items of every class c -> (train_idx, heldout_idx), sorted."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD161]))
    held = []
    for c in np.unique(labels):  # classes in sorted order: the draw sequence is fixed
        members = np.flatnonzero(labels == c)
        n_hold = int(round(holdout_fraction * len(members)))
        held.append(rng.permutation(members)[:n_hold])
    heldout = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), dtype=bool)
    mask[heldout] = False
    return np.flatnonzero(mask), heldout


def digits_split(seed: int = 0, holdout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of the 1797 digits -> (train_idx, heldout_idx) (sorted int64)."""
    return stratified_split(digits_arrays()[1], seed, holdout_fraction)


def resize_digits(x: torch.Tensor, side: int) -> torch.Tensor:
    """How prepare writes digits at `side` != 8: (N, 1, 8, 8) -> (N, 1, side, side), bilinear with
    anti-aliasing, clamped to [-1, 1]. The evaluator sends its reference digits through the same path."""
    if side == x.shape[-1]:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
