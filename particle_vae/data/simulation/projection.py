"""The real-space projector: trilinear line integrals of a ``[z, y, x]`` density for RELION poses."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from particle_vae.conventions import euler_to_matrix

#: Per-particle angles: a ``(B,)`` sequence, array or tensor (degrees).
Angles = Sequence[float] | np.ndarray | torch.Tensor


class Projector:
    """Real-space projector of one density (trilinear line integrals).

    For each output pixel ``(x, y)`` (relative to ``box // 2``) the volume is
    sampled at ``A^T (x, y, z)`` for integer ``z``; only points inside the
    density's support sphere (radius from ``support_threshold``, at most
    ``box / 2``: density outside the sphere inscribed in the box is ignored)
    are evaluated, which halves the work compared with the full cube.

    Args:
        volume: ``(box, box, box)`` density indexed ``[z, y, x]``, centred on voxel ``box // 2``.
        support_threshold: voxels with ``|V| > threshold * max|V|`` define the support.
        max_samples: largest number of sample points evaluated in one
            ``grid_sample`` call (bounds memory to about ``40 * max_samples`` bytes).
    """

    def __init__(self, volume: np.ndarray | torch.Tensor, support_threshold: float = 1e-4, max_samples: int = 1 << 23):
        vol = torch.as_tensor(np.asarray(volume, dtype=np.float32) if not isinstance(volume, torch.Tensor) else volume)
        vol = vol.to(torch.float32).contiguous()
        if vol.dim() != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"Projector needs a cubic (box, box, box) volume, got {tuple(vol.shape)}")
        self.volume = vol
        self.box = box = int(vol.shape[0])
        c = box // 2
        magnitude = vol.abs()
        peak = float(magnitude.max())
        if peak == 0:
            raise ValueError("the volume is empty (all zeros)")
        support = torch.nonzero(magnitude > support_threshold * peak).to(torch.float32) - c
        radius = float(support.norm(dim=1).max()) + 1.0
        self.radius = min(radius, box / 2.0)
        h = int(math.ceil(self.radius))
        axis = torch.arange(-h, h + 1, dtype=torch.float32)
        zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
        points = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
        inside = (points.square().sum(dim=1) <= self.radius ** 2)
        inside &= (points[:, 0] >= -c) & (points[:, 0] <= box - 1 - c) & (points[:, 1] >= -c) & (points[:, 1] <= box - 1 - c)
        self.points = points[inside].contiguous()  # (M, 3) (x, y, z) voxels from the centre
        self.pixel_index = ((self.points[:, 1] + c) * box + (self.points[:, 0] + c)).to(torch.int64)
        self.max_samples = int(max_samples)

    @property
    def n_points(self) -> int:
        """Sample points per projection."""
        return int(self.points.shape[0])

    def project(self, rot: Angles, tilt: Angles, psi: Angles) -> torch.Tensor:
        """Project for a batch of poses.

        Args:
            rot, tilt, psi: ``(B,)`` RELION Euler angles in degrees.
        Returns:
            ``(B, box, box)`` float32 projections, ``P(x, y) = sum_z V(A^T (x, y, z))``.
        """
        mats = torch.as_tensor(euler_to_matrix(rot, tilt, psi), dtype=torch.float32)
        batch = mats.shape[0]
        box, c = self.box, self.box // 2
        out = torch.zeros(batch, box * box, dtype=torch.float32)
        chunk = max(1, self.max_samples // max(self.n_points, 1))
        scale = 2.0 / max(box - 1, 1)
        volume = self.volume[None, None]
        for start in range(0, batch, chunk):
            mat = mats[start:start + chunk]
            # row vectors: (A^T p)^T = p^T A
            coords = torch.matmul(self.points[None], mat)  # (b, M, 3) = (x, y, z) voxel offsets
            coords.add_(c).mul_(scale).sub_(1.0)
            samples = F.grid_sample(volume, coords[None, :, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=True)
            out[start:start + chunk].index_add_(1, self.pixel_index, samples.reshape(mat.shape[0], -1))
        return out.reshape(batch, box, box)


def project_volume(volume: np.ndarray | torch.Tensor, rot: Angles, tilt: Angles, psi: Angles) -> torch.Tensor:
    """Project a ``[z, y, x]`` volume for RELION poses (degrees); see :class:`Projector`.

    Returns:
        ``(B, box, box)`` float32 tensor.
    """
    return Projector(volume).project(rot, tilt, psi)
