"""The Frechet distance between two Gaussians, and streaming mean/covariance of feature sets.

``d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Dowson & Landau 1982; FID: Heusel et al.
2017; FVD: Unterthiner et al. 2018), written here in an eigen-decomposition form that stays finite
for rank-deficient covariances; the tests check it against ``scipy.linalg.sqrtm``.
"""

from __future__ import annotations

import numpy as np
import torch


class RunningGaussian:
    """Mean and covariance of a stream of feature batches ``[B, D]`` (float64 sums; memory O(D^2))."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        x = feats.detach().double().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        x = x.reshape(len(x), -1).astype(np.float64)
        if self.sum is None:
            self.sum = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` with the unbiased covariance (as ``np.cov``); needs at least two samples."""
        if self.n < 2 or self.sum is None or self.outer is None:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2).

    ``Tr((S1 S2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), which stays real and
    finite for the rank-deficient covariances of small sample sets, where ``sqrtm(S1 S2)`` does not.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape} {mu2.shape} {s1.shape} {s2.shape}")
    r = _psd_sqrt(s1)
    w = np.linalg.eigvalsh((r @ s2 @ r + (r @ s2 @ r).T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d, 0.0)


def frechet_of(a: RunningGaussian, b: RunningGaussian) -> float:
    """Frechet distance of two feature streams (NaN when either has fewer than two samples)."""
    if a.n < 2 or b.n < 2:
        return float("nan")
    return frechet_distance(*a.stats(), *b.stats())
