"""Metrics used by the papers' benchmarks, each tested on hand-made cases.

* :func:`clustering_accuracy`: best one-to-one matching of clusters to labels
  (Hungarian algorithm), as in the TARGET-VAE paper's Table 2.
* :func:`circular_correlation`: Jammalamadaka & SenGupta's circular
  correlation coefficient of two angle samples (TARGET-VAE Table 1).
* :func:`pearson`: Pearson correlation of (flattened) translations.
* :func:`cluster_latents`: k-means or Gaussian-mixture labels of latent means.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def clustering_accuracy(labels_true, labels_pred) -> float:
    """Fraction of items whose cluster maps to their label under the best
    one-to-one assignment of clusters to labels.

    Args:
        labels_true, labels_pred: ``(N,)`` integer labels (any values; the
            number of clusters may differ from the number of labels).
    Returns:
        Accuracy in ``[0, 1]``.
    """
    true = np.asarray(labels_true).reshape(-1)
    pred = np.asarray(labels_pred).reshape(-1)
    if true.shape != pred.shape or true.size == 0:
        raise ValueError("labels_true and labels_pred must be non-empty and of equal length")
    true_values, true_idx = np.unique(true, return_inverse=True)
    pred_values, pred_idx = np.unique(pred, return_inverse=True)
    counts = np.zeros((len(pred_values), len(true_values)), dtype=np.int64)
    np.add.at(counts, (pred_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / true.size)


def circular_mean(angles) -> float:
    """Mean direction of angles in radians."""
    angles = np.asarray(angles, dtype=np.float64)
    return float(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean()))


def circular_correlation(a, b) -> float:
    """Jammalamadaka-SenGupta circular correlation of two ``(N,)`` angle samples (radians).

    ``sum sin(a - mean a) sin(b - mean b) / sqrt(sum sin^2(a - mean a) sum sin^2(b - mean b))``;
    in ``[-1, 1]``, 1 when ``b = a + const``. Returns ``nan`` when either
    sample has no spread (e.g. a model that always predicts 0).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    sa, sb = np.sin(a - circular_mean(a)), np.sin(b - circular_mean(b))
    denominator = np.sqrt((sa ** 2).sum() * (sb ** 2).sum())
    if denominator < 1e-12:
        return float("nan")
    return float((sa * sb).sum() / denominator)


def pearson(x, y) -> float:
    """Pearson correlation of two equally shaped arrays (flattened); ``nan`` without spread."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x ** 2).sum() * (y ** 2).sum())
    return float("nan") if denominator < 1e-12 else float((x * y).sum() / denominator)


def cluster_latents(z, k: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Cluster latent means.

    Args:
        z: ``(N, d)`` latent means.
        k: number of clusters.
        method: ``"kmeans"`` or ``"gmm"`` (full-covariance Gaussian mixture).
    Returns:
        ``(N,)`` int64 cluster ids in ``0..k-1``.
    """
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    z = np.asarray(z, dtype=np.float64)
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z).astype(np.int64)
    if method == "gmm":
        return GaussianMixture(n_components=k, covariance_type="full", random_state=seed, n_init=3).fit(z).predict(z).astype(np.int64)
    raise ValueError(f"unknown clustering method {method!r}")
