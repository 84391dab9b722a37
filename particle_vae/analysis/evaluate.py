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

from particle_vae.analysis.metrics import circular_correlation, cluster_latents, clustering_accuracy, pearson
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
