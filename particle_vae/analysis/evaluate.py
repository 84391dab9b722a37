"""Pose and clustering evaluation on benchmarks with ground truth.

Follows the TARGET-VAE paper: predicted rotations and translations of each
transformed image are taken *relative to the prediction on its untransformed
(centred, upright) image*, then compared with the true transformation by
circular correlation (angles) and Pearson correlation (translations, both axes
pooled). Clustering accuracy uses k-means on the latent means of the
transformed images, matched to the labels by the Hungarian algorithm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from particle_vae.analysis.metrics import (
    circular_correlation,
    cluster_latents,
    clustering_accuracy,
    mean_per_label,
    pearson,
    rotation_sweep_rmse,
)
from particle_vae.conventions import move_objects
from particle_vae.models.base import PoseVAE, Readout


@torch.no_grad()
def readout_all(model: PoseVAE, images: np.ndarray, batch_size: int = 256, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Readout for ``(N, H, W)`` images: ``theta (N,)``, ``t (N, 2)`` px, ``z_mean (N, k)``."""
    model.eval().to(device)
    parts: dict[str, list] = {"theta": [], "t": [], "z_mean": []}
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
        out: Readout = model.readout(batch)
        for key in parts:
            parts[key].append(getattr(out, key).float().cpu().numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def object_centre(theta: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Where a generator pose puts the object's centre: ``-R(theta)^T t`` (pixels), ``(N, 2)``."""
    c, s = np.cos(theta), np.sin(theta)
    return -np.stack([c * t[:, 0] + s * t[:, 1], -s * t[:, 0] + c * t[:, 1]], axis=-1)


@dataclass
class BenchmarkScores:
    """Scores of one model on one benchmark split.

    Attributes:
        rotation_correlation: circular correlation of relative predicted angles
            with the true ones (``nan`` for models without pose).
        translation_correlation: Pearson correlation of relative predicted
            object displacements with the true ones.
        clustering_accuracy: k-means (k = number of labels) on latent means.
        n: images evaluated.
    """

    rotation_correlation: float
    translation_correlation: float
    clustering_accuracy: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_transformed_set(model: PoseVAE, images: np.ndarray, canonical: np.ndarray, alpha: np.ndarray,
                             displacement: np.ndarray, labels: np.ndarray, device="cpu", seed: int = 0) -> BenchmarkScores:
    """Score a model on images made by rotating (``alpha``, rad, CCW) and moving
    (``displacement``, px) the ``canonical`` images.

    Args:
        images, canonical: ``(N, H, W)``; alpha: ``(N,)``; displacement: ``(N, 2)``; labels: ``(N,)``.
    """
    moved = readout_all(model, images, device=device)
    still = readout_all(model, canonical, device=device)
    # generator angle of a rotated object is -alpha (see conventions)
    relative_theta = moved["theta"] - still["theta"]
    rotation = circular_correlation(relative_theta, -np.asarray(alpha))
    shift = object_centre(moved["theta"], moved["t"]) - object_centre(still["theta"], still["t"])
    translation = pearson(shift, displacement)
    k = len(np.unique(labels))
    accuracy = clustering_accuracy(labels, cluster_latents(moved["z_mean"], k, seed=seed))
    return BenchmarkScores(rotation, translation, accuracy, int(len(images)))


def rotation_sweep(model: PoseVAE, canonical: np.ndarray, n_rotations: int = 160, device="cpu",
                   batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Readout angles of every image turned through ``n_rotations`` evenly spaced angles.

    Args:
        canonical: ``(N, H, W)`` centred, upright images.
        n_rotations: angles ``alpha_j = 2 pi j / J``, ``j = 0..J-1`` (objects turned
            counter-clockwise about the box centre, bilinear, no shift).
    Returns:
        ``theta (N, J)`` predicted generator angles (radians) and ``alpha (J,)``.
    """
    images = torch.as_tensor(np.asarray(canonical, dtype=np.float32))
    alpha = 2 * np.pi * np.arange(n_rotations) / n_rotations
    theta = np.empty((len(images), n_rotations))
    for j, angle in enumerate(alpha):
        turned = move_objects(images, np.full(len(images), angle), np.zeros((len(images), 2))).clamp(0, 1)
        theta[:, j] = readout_all(model, turned.numpy(), batch_size=batch_size, device=device)["theta"]
    return theta, alpha


def rotation_rmse_per_label(model: PoseVAE, canonical: np.ndarray, labels: np.ndarray, n_rotations: int = 160,
                            device="cpu") -> dict:
    """Per-label mean of :func:`~particle_vae.analysis.metrics.rotation_sweep_rmse` (TARGET-VAE appendix).

    Returns ``{"per_label_deg": {label: mean RMSE in degrees}, "mean_deg": over all images,
    "n_rotations": J, "n": N}``.
    """
    theta, alpha = rotation_sweep(model, canonical, n_rotations, device=device)
    rmse = np.degrees(rotation_sweep_rmse(theta, alpha))
    return {"per_label_deg": {str(k): v for k, v in mean_per_label(rmse, labels).items()},
            "mean_deg": float(rmse.mean()), "n_rotations": int(n_rotations), "n": int(len(rmse))}
