"""Ground-truth pose sampling: RELION Euler angles (SO(3) Haar measure or a view set) and
particle-centre shifts."""

from __future__ import annotations

import numpy as np

from particle_vae.data.simulation.config import SHIFT_DISTRIBUTIONS, VIEWS


def sample_rotations(n: int, rng: np.random.Generator, views: str = "uniform") -> np.ndarray:
    """Draw RELION Euler angles.

    ``uniform`` is the Haar measure on SO(3): for ``A = Rz(psi) Ry(tilt) Rz(rot)``
    the invariant volume element is ``sin(tilt) d rot d tilt d psi``, so ``rot``
    and ``psi`` are uniform and ``cos(tilt)`` is uniform in ``[-1, 1]``.
    ``top``: ``rot = tilt = 0``; ``side``: ``tilt = 90``, ``rot`` uniform;
    ``top-side``: each particle top or side with probability 1/2. ``psi`` is
    always uniform.

    Args:
        n: number of poses; rng: numpy generator; views: one of :data:`VIEWS`.
    Returns:
        ``(n, 3)`` float64 ``(rot, tilt, psi)`` in degrees, ``rot, psi`` in
        ``[-180, 180)``, ``tilt`` in ``[0, 180]``.
    """
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    rot = rng.uniform(-180.0, 180.0, size=n)
    cos_tilt = rng.uniform(-1.0, 1.0, size=n)
    psi = rng.uniform(-180.0, 180.0, size=n)
    side = rng.uniform(size=n) < 0.5
    tilt = np.degrees(np.arccos(cos_tilt))
    if views == "top":
        rot, tilt = np.zeros(n), np.zeros(n)
    elif views == "side":
        tilt = np.full(n, 90.0)
    elif views == "top-side":
        rot = np.where(side, rot, 0.0)
        tilt = np.where(side, 90.0, 0.0)
    return np.stack([rot, tilt, psi], axis=1)


def sample_shifts(n: int, rng: np.random.Generator, max_shift: float, distribution: str = "uniform") -> np.ndarray:
    """Draw particle-centre displacements.

    Args:
        n: number; rng: numpy generator; max_shift: pixels (>= 0).
        distribution: ``uniform`` (each axis in ``[-max_shift, max_shift]``) or
            ``gaussian`` (standard deviation ``max_shift / 2``, truncated at
            ``+-max_shift`` by redrawing).
    Returns:
        ``(n, 2)`` float64 ``(dx, dy)`` in pixels.
    """
    if distribution not in SHIFT_DISTRIBUTIONS:
        raise ValueError(f"shift distribution must be one of {SHIFT_DISTRIBUTIONS}, got {distribution!r}")
    if max_shift <= 0:
        return np.zeros((n, 2))
    if distribution == "uniform":
        return rng.uniform(-max_shift, max_shift, size=(n, 2))
    out = rng.normal(0.0, max_shift / 2.0, size=(n, 2))
    bad = np.abs(out) > max_shift
    while bad.any():
        out[bad] = rng.normal(0.0, max_shift / 2.0, size=int(bad.sum()))
        bad = np.abs(out) > max_shift
    return out
