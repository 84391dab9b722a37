"""Metrics used by the papers' benchmarks, each tested on hand-made cases.

* :func:`clustering_accuracy`: best one-to-one matching of clusters to labels
  (Hungarian algorithm), as in the TARGET-VAE paper's Table 2.
* :func:`circular_correlation`: Jammalamadaka & SenGupta's circular
  correlation coefficient of two angle samples (TARGET-VAE Table 1).
* :func:`pearson`: Pearson correlation of (flattened) translations.
* :func:`cluster_latents`: k-means or Gaussian-mixture labels of latent means.
* :func:`rotation_sweep_rmse`: spread of the rotation error when one image is
  turned through many known angles (TARGET-VAE appendix, per-digit table), and
  :func:`mean_per_label` to average it per class.
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


def wrap_to_pi(angles):
    """Angles (radians) wrapped to ``[-pi, pi)``."""
    return np.mod(np.asarray(angles, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi


def rotation_sweep_rmse(predicted, alpha) -> np.ndarray:
    """Root-mean-square rotation error of images turned through known angles.

    Image ``i`` is shown to a model turned counter-clockwise by each angle
    ``alpha_j`` (radians); a model that recovers rotation predicts the generator
    angle ``theta_ij = c_i - alpha_j`` (:mod:`particle_vae.conventions`: the
    generator angle of an object turned by ``alpha`` is ``-alpha``), where the
    constant ``c_i`` is the image's own canonical orientation, which the model
    is free to choose. The error of each prediction is therefore measured
    around its circular mean over the sweep:

        e_ij  = wrap(theta_ij + alpha_j),     c_i = circular mean_j e_ij
        RMSE_i = sqrt(mean_j wrap(e_ij - c_i)^2)

    Args:
        predicted: ``(N, J)`` predicted generator angles (radians).
        alpha: ``(J,)`` applied object rotations (radians).
    Returns:
        ``(N,)`` RMSE per image in radians, in ``[0, pi]``; 0 for perfect
        equivariance, about ``pi / sqrt(3)`` (1.81 rad, 104 degrees) for
        predictions unrelated to the rotation.
    """
    theta = np.asarray(predicted, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if theta.ndim != 2 or theta.shape[1] != alpha.size or alpha.size == 0:
        raise ValueError(f"predicted must be (N, J) with J = len(alpha) = {alpha.size}, got {theta.shape}")
    error = wrap_to_pi(theta + alpha[None, :])
    centre = np.arctan2(np.sin(error).mean(1), np.cos(error).mean(1))
    return np.sqrt((wrap_to_pi(error - centre[:, None]) ** 2).mean(1))


def mean_per_label(values, labels) -> dict[int, float]:
    """Mean of ``values (N,)`` for each distinct label of ``labels (N,)``, keyed by label (sorted)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if values.shape != labels.shape:
        raise ValueError("values and labels must have the same length")
    return {int(label): float(values[labels == label].mean()) for label in np.unique(labels)}


def image_centre_of_mass(image, radius: float | None = None) -> np.ndarray:
    """Centre of mass of an image's positive part, relative to the box centre.

    The background (median of the pixels outside ``radius``, default 0.4 of the
    box) is subtracted first and negative values are set to zero, so noise and
    CTF fringes of either sign do not pull the centre towards the box edge.

    Args:
        image: ``(N, N)`` array, ``[row = y, col = x]``.
        radius: pixels; the background is measured outside it.
    Returns:
        ``(2,)`` ``(x, y)`` in pixels from pixel ``N // 2`` (see docs/conventions.md).
    """
    image = np.asarray(image, dtype=np.float64)
    n = image.shape[-1]
    coords = np.arange(n) - n // 2
    y, x = np.meshgrid(coords, coords, indexing="ij")
    radius = 0.4 * n if radius is None else radius
    outside = np.hypot(x, y) > radius
    weights = np.clip(image - (np.median(image[outside]) if outside.any() else 0.0), 0.0, None)
    total = weights.sum()
    if total <= 0:
        return np.array([np.nan, np.nan])
    return np.array([(weights * x).sum() / total, (weights * y).sum() / total])


def rotational_correlation(image, reference, angles_deg=None, radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of ``reference`` with ``image`` turned by each angle.

    Args:
        image, reference: ``(N, N)`` arrays centred on pixel ``N // 2``.
        angles_deg: rotations tried (default 0, 1, ..., 359 degrees); the
            image content is turned counter-clockwise in ``(x, y)`` by each.
        radius: correlate inside this radius only (default ``N // 2``).
    Returns:
        ``(angles (A,), correlations (A,))``.
    """
    import torch

    from particle_vae.conventions import move_objects

    angles = np.arange(360.0) if angles_deg is None else np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    image = np.asarray(image, dtype=np.float64)
    n = image.shape[-1]
    coords = np.arange(n) - n // 2
    y, x = np.meshgrid(coords, coords, indexing="ij")
    inside = np.hypot(x, y) <= (n // 2 if radius is None else radius)
    stack = torch.as_tensor(np.repeat(image[None], len(angles), 0))
    turned = move_objects(stack, np.radians(angles), np.zeros((len(angles), 2)), mode="bilinear").numpy()
    ref = np.asarray(reference, dtype=np.float64)[inside]
    return angles, np.array([pearson(t[inside], ref) for t in turned])


def anisotropic_part(image) -> np.ndarray:
    """An image minus its rotational average (mean over rings of width 1 px about pixel ``N // 2``).

    What is left is the part of the image that changes with rotation: zero for a
    rotationally symmetric image, such as the blurred mean of randomly turned
    copies of a shape. Correlating these parts (see :func:`rotational_correlation`)
    tests whether an average is upright and sharp, not merely a blob of the right size.

    Args:
        image: ``(N, N)``.
    Returns:
        ``(N, N)`` float64.
    """
    image = np.asarray(image, dtype=np.float64)
    n = image.shape[-1]
    coords = np.arange(n) - n // 2
    y, x = np.meshgrid(coords, coords, indexing="ij")
    ring = np.rint(np.hypot(x, y)).astype(np.int64)
    profile = np.bincount(ring.ravel(), weights=image.ravel()) / np.maximum(np.bincount(ring.ravel()), 1)
    return image - profile[ring]


def anisotropy(image) -> float:
    """Share of an image's contrast that changes with rotation: ``||a|| / ||image - median||``
    with ``a`` the :func:`anisotropic_part` of ``image - median`` (0 for a round image).

    An average of copies of a shape turned by random angles tends to 0, however
    many copies; an average of correctly aligned copies keeps the shape's value.
    """
    image = np.asarray(image, dtype=np.float64)
    image = image - np.median(image)
    norm = np.linalg.norm(image)
    return float(np.linalg.norm(anisotropic_part(image)) / norm) if norm > 0 else 0.0
