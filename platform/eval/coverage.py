"""Mode coverage in a feature space: improved precision and recall, and within-class diversity.

A leaf (numpy and torch only): the evaluators (`digits`, `fid`) call it next to the Fréchet distance.

Improved precision and recall (Kynkäänniemi et al., "Improved Precision and Recall Metric for
Assessing Generative Models", NeurIPS 2019). Each feature of a set gets a radius, the distance to
its k-th nearest neighbour in the same set (itself excluded); the union of those balls estimates the
set's manifold. Then
- precision = share of generated features inside at least one real ball (the samples look real);
- recall = share of real features inside at least one generated ball (the real data is covered).
A point on a ball's surface counts as inside (distance <= radius). k = `K_NEIGHBOURS` (3, the paper's
default). Both are in [0, 1], higher is better; a generator that collapses onto a few modes keeps a
high precision and loses recall. Their values depend on the sample counts (more samples, smaller
radii): compare runs evaluated with the same numbers of samples.

Within-class diversity: for each class c, the mean pairwise L2 distance between the generated features
of class c, divided by the same mean over the real features of class c. 1 means the generator's
samples of that class are as spread out as the real ones, ~0 means it draws (nearly) one image per
class (within-class mode collapse, which an unconditional metric can hide: ten perfect digits, one
per class, cover every class mean). `diversity` is the mean of the ratios over the classes,
`diversity_min` the worst class's. A ratio above 1 means more spread than the real data (noise).

Memory: nothing here holds an N x N matrix. Distances are taken a block of rows at a time
(`torch.cdist` on `chunk` rows against all columns), so 50k x 2048 features against 50k need
`chunk` x 50k distances at once (by default about 2^25 values: 128 MB in float32).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

K_NEIGHBOURS = 3
"""k of the k-th nearest neighbour that sets each ball's radius (the paper's default)."""
MAX_PER_CLASS = 2_000
"""Within-class diversity uses at most this many samples of a class (the first ones): the mean pairwise
distance of 2000 samples is already a precise estimate, and the cost grows with the square."""
_BLOCK_VALUES = 1 << 25  # distances computed at once: chunk rows x all columns


def _as_tensor(x: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D) feature rows, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=dtype)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN/Inf: the images fed to the feature network are not finite")
    return t


def _device(device: str | torch.device | None, *xs: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _rows_per_block(chunk: int | None, columns: int) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 rows, got {chunk}")
        return int(chunk)
    return max(1, _BLOCK_VALUES // max(columns, 1))


def knn_radii(features: Any, k: int = K_NEIGHBOURS, *, chunk: int | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> torch.Tensor:
    """(N, D) features -> (N,) distance of each row to its k-th nearest other row (itself excluded;
    a duplicate row is another row, at distance 0). Needs N > k."""
    if k < 1:
        raise ValueError(f"k must be >= 1 neighbours, got {k}")
    dev = _device(device, features)
    x = _as_tensor(features, "features", dtype, dev)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"{n} feature rows: the k-th nearest neighbour (k={k}) needs more than {k}; "
                         "evaluate more images")
    rows = _rows_per_block(chunk, n)
    out = torch.empty(n, dtype=dtype, device=dev)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        d = torch.cdist(x[a:b], x)  # (b - a, N)
        idx = torch.arange(b - a, device=dev)
        d[idx, idx + a] = math.inf  # not its own neighbour
        out[a:b] = torch.topk(d, k, dim=1, largest=False).values[:, -1]
    return out


def precision_recall(real: Any, fake: Any, k: int = K_NEIGHBOURS, *, chunk: int | None = None,
                     real_radii: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (see the module doc) of generated features `fake` (M, D) against
    real features `real` (N, D) (numpy arrays or tensors), both with more than k rows.

    chunk: rows per block of distances (None: about 2^25 distances at once). real_radii: `knn_radii(real,
    k)` when the caller keeps them (a fixed reference: computed once). dtype / device: where and in
    which precision distances are taken (None: the inputs' device, else the CPU). Returns (precision,
    recall) as floats in [0, 1]."""
    dev = _device(device, real, fake)
    r = _as_tensor(real, "real features", dtype, dev)
    f = _as_tensor(fake, "generated features", dtype, dev)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {r.shape[1]}, generated {f.shape[1]} "
                         "(features from different networks?)")
    if real_radii is None:
        real_radii = knn_radii(r, k, chunk=chunk, dtype=dtype, device=dev)
    real_radii = torch.as_tensor(real_radii).to(device=dev, dtype=dtype).reshape(-1)
    if real_radii.shape[0] != r.shape[0]:
        raise ValueError(f"real_radii has {real_radii.shape[0]} values for {r.shape[0]} real rows")
    fake_radii = knn_radii(f, k, chunk=chunk, dtype=dtype, device=dev)
    # One pass over the (fake, real) distances serves both: a block of fake rows against every real row.
    rows = _rows_per_block(chunk, r.shape[0])
    inside = 0  # generated rows inside the real manifold
    covered = torch.zeros(r.shape[0], dtype=torch.bool, device=dev)  # real rows inside the generated one
    for a in range(0, f.shape[0], rows):
        d = torch.cdist(f[a:a + rows], r)  # (rows, N)
        inside += int((d <= real_radii[None, :]).any(dim=1).sum())
        covered |= (d <= fake_radii[a:a + rows, None]).any(dim=0)
    return inside / f.shape[0], int(covered.sum()) / r.shape[0]


def mean_pairwise_distance(features: Any, *, chunk: int | None = None, dtype: torch.dtype = torch.float64,
                           device: str | torch.device | None = None) -> float:
    """Mean L2 distance over the N (N - 1) / 2 pairs of distinct rows of (N, D) features; N >= 2."""
    dev = _device(device, features)
    x = _as_tensor(features, "features", dtype, dev)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"a mean pairwise distance needs at least 2 rows, got {n}")
    rows = _rows_per_block(chunk, n)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for a in range(0, n, rows):
        d = torch.cdist(x[a:a + rows], x)  # (rows, N)
        idx = torch.arange(d.shape[0], device=dev)
        d[idx, idx + a] = 0.0  # exactly (cdist's matrix-product route leaves rounding there)
        total += d.sum(dtype=torch.float64)
    return float(total) / (n * (n - 1))  # every pair was counted twice


def within_class_diversity(real: Any, real_labels: Any, fake: Any, fake_labels: Any, *,
                           max_per_class: int = MAX_PER_CLASS, chunk: int | None = None,
                           dtype: torch.dtype = torch.float64,
                           device: str | torch.device | None = None) -> dict[str, float]:
    """Within-class diversity (see the module doc) of generated features `fake` (M, D) with their (M,)
    integer class labels, against real features `real` (N, D) with their (N,) labels.

    A class counts when both sides have at least 2 samples of it and its real samples are not all one
    point; each side uses its first `max_per_class` samples of the class. Returns {"diversity": mean
    ratio over the counted classes, "diversity_min": the smallest ratio, "worst_class": its label,
    "classes": how many classes counted}; with no class counted, diversity and diversity_min are NaN and
    classes is 0."""
    ry = np.asarray(torch.as_tensor(real_labels).detach().cpu()).reshape(-1).astype(np.int64)
    fy = np.asarray(torch.as_tensor(fake_labels).detach().cpu()).reshape(-1).astype(np.int64)
    if len(ry) != len(real):
        raise ValueError(f"{len(real)} real feature rows but {len(ry)} real labels")
    if len(fy) != len(fake):
        raise ValueError(f"{len(fake)} generated feature rows but {len(fy)} generated labels")
    if max_per_class < 2:
        raise ValueError(f"max_per_class must be >= 2, got {max_per_class}")
    ratios: dict[int, float] = {}
    for c in np.intersect1d(ry, fy):
        r_rows = np.flatnonzero(ry == c)[:max_per_class]
        f_rows = np.flatnonzero(fy == c)[:max_per_class]
        if len(r_rows) < 2 or len(f_rows) < 2:
            continue
        spread = mean_pairwise_distance(_take(real, r_rows), chunk=chunk, dtype=dtype, device=device)
        if spread <= 0:
            continue
        ratios[int(c)] = mean_pairwise_distance(_take(fake, f_rows), chunk=chunk, dtype=dtype, device=device) / spread
    if not ratios:
        return {"diversity": math.nan, "diversity_min": math.nan, "worst_class": -1, "classes": 0}
    worst = min(ratios, key=lambda c: (ratios[c], c))
    return {"diversity": float(np.mean(list(ratios.values()))), "diversity_min": ratios[worst],
            "worst_class": worst, "classes": len(ratios)}


def _take(x: Any, rows: np.ndarray) -> Any:
    return x[torch.as_tensor(rows, device=x.device)] if isinstance(x, torch.Tensor) else np.asarray(x)[rows]
