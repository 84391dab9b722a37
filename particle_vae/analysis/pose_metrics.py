"""Scores of in-plane poses and classes against a simulation's ground truth.

* :func:`same_view_psi_errors`: for pairs of particles of one structure whose
  true viewing directions are close, the error of the predicted relative
  in-plane angle ``psi_j - psi_i`` against the true one (symmetry-aware).
* :func:`origin_errors`: distance between the predicted and the true particle
  centre, after removing one constant offset per true class (in the frame of
  the class average).
* :func:`purity`: fraction of particles in the majority structure of their class.
* :func:`cyclic_symmetry_operators`: the rotations of a C_n density about its
  symmetry axis, found from the density itself (maps need not be aligned to z).

Angles follow :mod:`particle_vae.conventions` (RELION ZYZ Euler angles in
degrees, ``A = euler_to_matrix(rot, tilt, psi)``; a volume point ``X`` projects
to the image point ``(A X)[:2]``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from particle_vae.conventions import euler_to_matrix

__all__ = ["same_view_psi_errors", "origin_errors", "purity", "cyclic_symmetry_operators", "projected_centres",
           "symmetry_operators"]


def _wrap_deg(angle):
    return (np.asarray(angle, dtype=np.float64) + 180.0) % 360.0 - 180.0


def same_view_psi_errors(angles_true: np.ndarray, psi_pred_deg: np.ndarray, classes_true: np.ndarray,
                         max_view_angle_deg: float = 10.0, symmetry: dict | None = None,
                         max_pairs_per_class: int = 200_000, seed: int = 0) -> dict[int, np.ndarray]:
    """Errors of predicted relative in-plane angles over pairs of particles seen from nearly the same direction.

    Two particles ``i, j`` of one structure with poses ``A_i, A_j`` whose viewing
    directions (``A^T e_z``) are within ``max_view_angle_deg`` differ by (nearly) an
    in-plane rotation ``A_j A_i^T ~ Rz(phi)``; a consistent 2D alignment has
    ``psi_j - psi_i = phi``. For a symmetric structure the pose of ``j`` is only
    defined up to ``A_j S`` for the symmetry operators ``S``: a pair counts when
    some operator brings the views within the limit, and its error is the
    smallest over those operators (a C7 top view turned by 360/7 degrees has
    error 0).

    Args:
        angles_true: ``(M, 3)`` true (rot, tilt, psi), degrees.
        psi_pred_deg: ``(M,)`` predicted rlnAnglePsi, degrees.
        classes_true: ``(M,)`` structure of each particle.
        symmetry: structure -> ``(G, 3, 3)`` operators in the structure's frame (identity included);
            default none.
        max_pairs_per_class: pairs drawn at random beyond this many (keeps memory bounded).
    Returns:
        structure -> ``(P,)`` absolute errors in degrees, ``[0, 180]``.
    """
    angles_true = np.asarray(angles_true, dtype=np.float64)
    psi_pred = np.asarray(psi_pred_deg, dtype=np.float64)
    classes_true = np.asarray(classes_true)
    matrices = euler_to_matrix(angles_true[:, 0], angles_true[:, 1], angles_true[:, 2])
    cos_limit = math.cos(math.radians(max_view_angle_deg))
    rng = np.random.default_rng(seed)
    out = {}
    for structure in np.unique(classes_true):
        rows = np.flatnonzero(classes_true == structure)
        ops = np.eye(3)[None] if symmetry is None or structure not in symmetry else np.asarray(symmetry[structure], dtype=np.float64)
        a = matrices[rows]
        views = a[:, 2, :]  # A^T e_z
        # (A_j S)^T e_z = S^T A_j^T e_z, as a row: v_j S
        close = np.stack([views @ (views @ op).T >= cos_limit for op in ops])  # (G, n, n)
        i_idx, j_idx = np.nonzero(np.triu(close.any(axis=0), k=1))
        if len(i_idx) > max_pairs_per_class:
            keep = rng.choice(len(i_idx), max_pairs_per_class, replace=False)
            i_idx, j_idx = i_idx[keep], j_idx[keep]
        if not len(i_idx):
            out[structure] = np.zeros(0)
            continue
        predicted = psi_pred[rows[j_idx]] - psi_pred[rows[i_idx]]
        errors = np.full(len(i_idx), np.inf)
        for g, op in enumerate(ops):
            relative = np.einsum("pab,bc,pdc->pad", a[j_idx], op, a[i_idx])  # A_j S A_i^T
            # RELION's Rz(phi) = [[cos, sin], [-sin, cos]]: phi from the in-plane block
            phi = np.degrees(np.arctan2(relative[:, 0, 1] - relative[:, 1, 0], relative[:, 0, 0] + relative[:, 1, 1]))
            # every operator that brings the views together is an equally true relative pose: the closest counts
            errors = np.where(close[g, i_idx, j_idx], np.minimum(errors, np.abs(_wrap_deg(predicted - phi))), errors)
        out[structure] = errors
    return out


def projected_centres(angles_true: np.ndarray, centres_xyz: np.ndarray) -> np.ndarray:
    """Image positions ``(A c)[:2]`` (pixels) of 3D points ``c`` under the poses ``A``.

    Args:
        angles_true: ``(M, 3)`` degrees; centres_xyz: ``(M, 3)`` ``(x, y, z)`` in pixels from the box centre.
    Returns:
        ``(M, 2)``.
    """
    angles_true = np.asarray(angles_true, dtype=np.float64)
    a = euler_to_matrix(angles_true[:, 0], angles_true[:, 1], angles_true[:, 2])
    return np.einsum("mab,mb->ma", a, np.asarray(centres_xyz, dtype=np.float64))[:, :2]


def origin_errors(origin_pred_px: np.ndarray, psi_pred_deg: np.ndarray, centre_true_px: np.ndarray,
                  classes_true: np.ndarray) -> np.ndarray:
    """Distance (pixels) between predicted and true particle centres, one constant offset per true class removed.

    A pose ``(psi, o)`` maps the point ``y`` of the class average to the image point
    ``R(psi)^T y - o`` (RELION's ``obs(x) = ref(R(psi)(x + o))``). Where a class
    average puts the particle's centre is a convention, so the true centre ``q``
    is taken back into the average's frame, ``c = R(psi)(q + o)``, and the spread
    of ``c`` about its mean over each true class is the error (a constant offset
    in the image frame would be wrong: it turns with each particle's psi).

    Args:
        origin_pred_px: ``(M, 2)`` predicted RELION origins in pixels; psi_pred_deg: ``(M,)`` predicted psi, degrees.
        centre_true_px: ``(M, 2)`` true particle centres in pixels from the box centre.
        classes_true: ``(M,)``.
    Returns:
        ``(M,)`` distances.
    """
    psi = np.radians(np.asarray(psi_pred_deg, dtype=np.float64).reshape(-1))
    moved = np.asarray(centre_true_px, dtype=np.float64) + np.asarray(origin_pred_px, dtype=np.float64)
    c, s = np.cos(psi), np.sin(psi)
    in_average = np.stack([c * moved[:, 0] - s * moved[:, 1], s * moved[:, 0] + c * moved[:, 1]], axis=1)
    classes_true = np.asarray(classes_true)
    out = np.empty(len(in_average))
    for structure in np.unique(classes_true):
        rows = classes_true == structure
        out[rows] = np.hypot(*(in_average[rows] - in_average[rows].mean(0)).T)
    return out


def purity(classes_true, classes_pred) -> float:
    """Fraction of particles whose predicted class's majority structure is their own."""
    classes_true = np.asarray(classes_true)
    classes_pred = np.asarray(classes_pred)
    total = 0
    for c in np.unique(classes_pred):
        total += np.unique(classes_true[classes_pred == c], return_counts=True)[1].max()
    return float(total / len(classes_true))


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _rotate_volume(volume: torch.Tensor, rotation: np.ndarray, centre: np.ndarray) -> torch.Tensor:
    """``V'(X) = V(c + R^T (X - c))`` (trilinear), ``volume`` indexed ``[z, y, x]``, ``centre`` ``c`` = (x, y, z)
    in voxels from the centre voxel."""
    n = volume.shape[-1]
    axis = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    c = torch.as_tensor(centre, dtype=torch.float64)
    points = (torch.stack([x, y, z], -1).reshape(-1, 3) - c) @ torch.as_tensor(rotation, dtype=torch.float64) + c  # R^T (X - c)
    grid = ((points + n // 2) * (2.0 / (n - 1)) - 1.0).reshape(1, n, n, n, 3)
    return F.grid_sample(volume[None, None].to(torch.float64), grid, align_corners=True)[0, 0]


def cyclic_symmetry_operators(volume: np.ndarray, order: int) -> tuple[np.ndarray, float]:
    """The ``order`` rotations of a C_n density about its symmetry axis.

    The axis of a C_n object (n >= 2) passes through its centre of mass along
    one of the principal axes of its positive density; each is tried and the one
    whose 360/n-degree turn best reproduces the density (correlation) is kept.
    The operators turn about the origin: applied to poses they only need the
    direction of the axis.

    Args:
        volume: ``(n, n, n)`` density indexed ``[z, y, x]``, centred on voxel ``n // 2``.
    Returns:
        ``((order, 3, 3) operators in (x, y, z) coordinates, identity first; correlation of the turned density)``.
    """
    vol = torch.as_tensor(np.asarray(volume, dtype=np.float64))
    n = vol.shape[-1]
    weights = vol.clamp_min(0).numpy()
    axis = np.arange(n) - n // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    coords = np.stack([x, y, z], -1).reshape(-1, 3)
    w = weights.reshape(-1)
    centre = (coords * w[:, None]).sum(0) / w.sum()
    offsets = coords - centre
    inertia = (offsets * w[:, None]).T @ offsets
    _, vectors = np.linalg.eigh(inertia)
    best = (-2.0, None)
    flat = vol.reshape(-1) - vol.mean()
    for candidate in vectors.T:
        turned = _rotate_volume(vol, _axis_rotation(candidate, 2 * math.pi / order), centre).reshape(-1)
        turned = turned - turned.mean()
        corr = float((flat * turned).sum() / torch.sqrt((flat ** 2).sum() * (turned ** 2).sum()))
        if corr > best[0]:
            best = (corr, candidate)
    ops = np.stack([_axis_rotation(best[1], 2 * math.pi * g / order) for g in range(order)])
    return ops, best[0]


def symmetry_operators(volume: np.ndarray, name: str) -> tuple[np.ndarray, float]:
    """Operators for a point group written ``C1`` or ``Cn`` (see :func:`cyclic_symmetry_operators`)."""
    name = name.upper()
    if name == "C1":
        return np.eye(3)[None], 1.0
    if name.startswith("C") and name[1:].isdigit():
        return cyclic_symmetry_operators(volume, int(name[1:]))
    raise ValueError(f"symmetry {name!r}: only C1 and Cn are supported")

