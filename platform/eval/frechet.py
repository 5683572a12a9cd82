"""The shared maths of the Fréchet metrics: feature statistics, the Fréchet distance, .npz stats files.

A leaf: both evaluators (`digits.DigitsEvaluator`, `fid.FIDEvaluator`) import it, it imports
neither; building an evaluator from the run config is the `EVALUATORS` table in `eval/__init__.py`.

The Fréchet distance between N(mu1, S1) and N(mu2, S2) is
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
S1 S2 is not symmetric, so its square root is computed through the symmetric PSD matrix
A = S1^{1/2} S2 S1^{1/2}, which has the same eigenvalues as S1 S2: tr((S1 S2)^{1/2}) = sum sqrt(eig(A)).
Both steps use `eigh`, which is stable for rank-deficient covariances (fewer samples than feature
dimensions, the usual case for 2048-d Inception features) and never produces imaginary parts;
eigenvalues below eigh's resolution are treated as 0. `FrechetReference` keeps the reference's square
root, so each evaluation costs one eigvalsh (an (N, N) one when N < D generated samples).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from advflow.platform.atomic import write_bytes

# Eigenvalues below -tol * max|eig| mean the matrix is not a covariance (not a rounding error).
_PSD_TOL = 1e-6


# -- statistics ----------------------------------------------------------------------------------------
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma is the unbiased covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 samples, got shape {f.shape}; "
                         "evaluate more images")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN/Inf: the images fed to the feature network are not finite")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)  # (D, D)
    return mu, sigma


def _psd_sqrt(s: np.ndarray, name: str) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; tiny negative eigenvalues (rounding) -> 0."""
    w, v = np.linalg.eigh(s)
    scale = max(float(np.abs(w).max(initial=0.0)), 1e-300)
    if w.min(initial=0.0) < -_PSD_TOL * scale:
        raise ValueError(f"{name} is not positive semi-definite (smallest eigenvalue {w.min():.3g}, "
                         f"largest {scale:.3g}): pass a covariance matrix, e.g. from feature_stats")
    return (v * np.sqrt(_resolvable(w))) @ v.T


def _resolvable(w: np.ndarray) -> np.ndarray:
    """Eigenvalues below eigh's resolution (~ D * eps * max) are rounding noise: set them to 0.
    Their square roots (~1e-8 each) would otherwise add up to a visible error on rank-deficient
    covariances."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    d = mu.shape[0]
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"{name}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN/Inf")
    asym = float(np.abs(sigma - sigma.T).max(initial=0.0))
    if asym > 1e-6 * max(float(np.abs(sigma).max(initial=0.0)), 1e-300):
        raise ValueError(f"{name}: sigma is not symmetric (max |S - S^T| = {asym:.3g}); pass a covariance matrix")
    return mu, (sigma + sigma.T) / 2  # exact symmetry for eigh


class FrechetReference:
    """Fixed reference statistics (mu, sigma) whose square root is computed once, so each
    distance to it costs one (D, D) product chain and one `eigvalsh` (for D = 2048 the eigh of the
    reference would otherwise dominate every evaluation)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, name: str = "reference stats") -> None:
        self.mu, self.sigma = _check_stats(mu, sigma, name)
        self.root = _psd_sqrt(self.sigma, f"{name} sigma")
        self.trace = float(np.trace(self.sigma))

    def distance(self, mu: np.ndarray, sigma: np.ndarray, name: str = "stats") -> float:
        mu, sigma = _check_stats(mu, sigma, name)
        if mu.shape != self.mu.shape:
            raise ValueError(f"feature dimensions differ: {mu.shape[0]} vs {self.mu.shape[0]} (stats from "
                             "different feature networks?)")
        a = self.root @ sigma @ self.root
        w = np.linalg.eigvalsh((a + a.T) / 2)
        # a has the inertia of sigma when the reference is full rank: negative eigenvalues beyond
        # rounding mean sigma is not a covariance.
        if w.min(initial=0.0) < -_PSD_TOL * max(float(np.abs(w).max(initial=0.0)), 1e-300):
            raise ValueError(f"{name}: sigma is not positive semi-definite; pass a covariance matrix, "
                             "e.g. from feature_stats")
        tr_covmean = float(np.sqrt(_resolvable(w)).sum())
        diff = mu - self.mu
        fd = float(diff @ diff + self.trace + np.trace(sigma) - 2.0 * tr_covmean)
        # Rounding can leave a tiny negative number for identical statistics; a distance is >= 0.
        return max(fd, 0.0)

    def distance_to_features(self, features: np.ndarray, name: str = "features") -> float:
        """Distance from the Gaussian fitted to `features` (N, D) (as feature_stats fits it).

        With fewer samples than dimensions (N - 1 < D, e.g. a few thousand 2048-d Inception features)
        sigma = X^T X with X = centred / sqrt(N - 1), and root sigma root = B^T B with B = X root, whose
        nonzero eigenvalues are those of the small (N, N) matrix B B^T: exact, and no (D, D) eigh."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2 or f.shape[0] - 1 >= f.shape[1] or not np.isfinite(f).all():
            return self.distance(*feature_stats(f), name)  # (feature_stats raises on bad input)
        mu = f.mean(axis=0)
        if mu.shape != self.mu.shape:
            raise ValueError(f"feature dimensions differ: {mu.shape[0]} vs {self.mu.shape[0]} (stats from "
                             "different feature networks?)")
        x = (f - mu) / np.sqrt(f.shape[0] - 1)  # (N, D)
        b = x @ self.root  # (N, D)
        w = np.linalg.eigvalsh(b @ b.T)  # (N,) the nonzero spectrum of root sigma root
        tr_covmean = float(np.sqrt(_resolvable(w)).sum())
        diff = mu - self.mu
        return max(float(diff @ diff + self.trace + (x * x).sum() - 2.0 * tr_covmean), 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (see module doc)."""
    return FrechetReference(mu1, sigma1, "stats 1").distance(mu2, sigma2, "stats 2")


# -- .npz statistics files (ADM / pytorch-fid convention: arrays `mu` and `sigma`) ---------------------
def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **extra: Any) -> None:
    """Write `mu`, `sigma` (and any `extra` arrays) to an .npz atomically (temp file + os.replace)."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             **{k: np.asarray(v) for k, v in extra.items()})
    write_bytes(path, buf.getvalue())


def load_stats(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from an .npz; clear errors for a missing, unreadable or malformed file."""
    fix = ("create it with jobs/fid_reference.py or advflow.platform.eval.fid.write_reference_stats (arrays `mu` "
           "(D,) and `sigma` (D, D))")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference stats {path}: no such file; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ("mu", "sigma")}
            names = sorted(z.files)
    except Exception as exc:
        raise ValueError(f"reference stats {path}: not a readable .npz ({type(exc).__name__}: {exc}); {fix}") from exc
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ValueError(f"reference stats {path}: missing array(s) {missing} (has {names}); {fix}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    try:
        mu, sigma = _check_stats(mu, sigma, f"reference stats {path}")
    except ValueError as exc:
        raise ValueError(f"{exc}; {fix}") from exc
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"reference stats {path}: {mu.shape[0]}-d, expected {dim}-d features; {fix}")
    return mu, sigma
