"""Pose and coordinate conventions: the one place that defines them.

Every other module imports from here; see ``docs/conventions.md`` for the
derivations. In short:

Image axes
    An image is an array ``image[..., row, col]``. ``x`` runs along columns and
    ``y`` along rows (the MRC/RELION convention: X is the fast axis). The centre
    of a box of ``N`` pixels is the pixel with index ``N // 2`` on both axes
    (RELION, SPIDER and XMIPP: 32 for both N=64 and N=65). Pixel coordinates are
    ``x = col - N // 2``, ``y = row - N // 2``.

Generator (model) pose ``(theta, t)``
    A spatial generator evaluates its canonical object ``f`` at transformed
    coordinates: ``g(x) = f(R(theta) x + t)`` with
    ``R(theta) = [[cos, -sin], [sin, cos]]`` acting on column vectors ``(x, y)``
    (TARGET-VAE eq. 2, spatial-VAE). ``theta`` is in radians, ``t`` in pixels
    unless a function says "normalised" (pixels divided by :func:`grid_half_width`).

RELION pose ``(psi, origin)``
    ``rlnAnglePsi`` (degrees) rotates the reference into the observation,
    ``rlnOriginXAngst/YAngst`` is the shift that centres the particle, applied
    before the rotation when aligning. The forward model is
    ``obs(x) = ref(R(psi) (x + o))`` with ``o = origin / pixel_size`` in pixels,
    so the particle's centre sits at ``-o`` in the box. The mapping to the
    generator pose is exact: ``psi = theta`` and ``o = R(theta)^T t``.

Object pose ``(alpha, d)`` (used to describe benchmark ground truth)
    "The object was rotated counter-clockwise (in x, y coordinates) by alpha and
    its centre moved to d": ``obs(x) = f(R(-alpha) (x - d))``; hence
    ``theta = -alpha``, ``t = -R(theta) d``, ``psi = -alpha`` and ``o = -d``.

RELION Euler angles (rot, tilt, psi), degrees, ZYZ (Heymann et al. 2005): the
projection along z of the volume rotated by ``A = euler_to_matrix(...)`` is
``P(x, y) = integral V(A^T (x, y, z)) dz``. With rot = tilt = 0 this reduces to
the 2D rule above.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "box_centre",
    "grid_half_width",
    "pixel_grid",
    "normalized_grid",
    "rotation_matrix",
    "wrap_angle",
    "transform_coordinates",
    "warp_images",
    "fourier_shift",
    "fourier_shift_phase",
    "mirror_images",
    "model_pose_to_relion",
    "relion_to_model_pose",
    "object_pose_to_model",
    "object_pose_to_relion",
    "apply_relion_pose",
    "undo_relion_pose",
    "move_objects",
    "euler_to_matrix",
    "matrix_to_euler",
]


def box_centre(box: int) -> int:
    """Index of the centre pixel of a box of ``box`` pixels (``box // 2``)."""
    return int(box) // 2


def grid_half_width(box: int) -> float:
    """Pixels per normalised unit: normalised coordinates are pixels / this value."""
    return float(max(int(box) // 2, 1))


def pixel_grid(box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Coordinates of every pixel relative to the box centre.

    Returns:
        ``(box, box, 2)`` tensor, ``grid[row, col] = (x, y) = (col - c, row - c)``
        in pixels, with ``c = box // 2``.
    """
    axis = torch.arange(box, device=device, dtype=dtype) - box_centre(box)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y], dim=-1)


def normalized_grid(box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """:func:`pixel_grid` divided by :func:`grid_half_width`; ``(box, box, 2)``."""
    return pixel_grid(box, device, dtype) / grid_half_width(box)


def _as_tensor(value, like: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        out = value
    else:
        out = torch.as_tensor(np.asarray(value, dtype=np.float64))
    if like is not None:
        out = out.to(device=like.device, dtype=dtype or like.dtype)
    elif dtype is not None:
        out = out.to(dtype=dtype)
    return out


def rotation_matrix(theta) -> torch.Tensor:
    """Counter-clockwise rotation matrices in (x, y) coordinates.

    Args:
        theta: angles in radians, any shape ``S``.
    Returns:
        ``S + (2, 2)`` tensor ``[[cos, -sin], [sin, cos]]``.
    """
    theta = _as_tensor(theta)
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def wrap_angle(theta):
    """Wrap radians to ``(-pi, pi]``; works on floats, arrays and tensors."""
    if isinstance(theta, torch.Tensor):
        wrapped = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi
        return torch.where(wrapped <= -math.pi, wrapped + 2 * math.pi, wrapped)
    arr = np.remainder(np.asarray(theta, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi
    arr = np.where(arr <= -np.pi, arr + 2 * np.pi, arr)
    return float(arr) if np.ndim(arr) == 0 else arr


def transform_coordinates(grid: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Generator coordinate transform ``x' = R(theta) x + t``.

    Args:
        grid: ``(P, 2)`` or ``(H, W, 2)`` coordinates ``(x, y)``.
        theta: ``(B,)`` radians.
        t: ``(B, 2)`` translations in the units of ``grid``.
    Returns:
        ``(B,) + grid.shape`` transformed coordinates.
    """
    rot = rotation_matrix(theta).to(grid)  # (B, 2, 2)
    flat = grid.reshape(-1, 2)
    out = torch.einsum("bij,pj->bpi", rot, flat) + t.to(grid)[:, None, :]
    return out.reshape((theta.shape[0],) + tuple(grid.shape))


def warp_images(
    images: torch.Tensor,
    theta,
    t,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample images at transformed coordinates: ``out(x) = img(R(theta) x + t)``.

    This is exactly what a spatial generator with pose ``(theta, t)`` does to its
    canonical object. Outside the box the image is taken as zero.

    Args:
        images: ``(B, H, W)`` or ``(B, C, H, W)`` with ``H == W``.
        theta: ``(B,)`` radians (or a scalar).
        t: ``(B, 2)`` pixels (or a length-2 sequence).
        mode: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
    Returns:
        Tensor of the same shape and dtype as ``images``.
    """
    squeeze = images.dim() == 3
    x = images[:, None] if squeeze else images
    batch, _, height, width = x.shape
    if height != width:
        raise ValueError(f"warp_images needs square images, got {height}x{width}")
    work_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    theta = _as_tensor(theta, x, work_dtype).reshape(-1).expand(batch)
    t = _as_tensor(t, x, work_dtype).reshape(-1, 2).expand(batch, 2)
    grid = pixel_grid(height, x.device, work_dtype)
    coords = transform_coordinates(grid, theta, t)  # (B, H, W, 2) pixels from centre
    # grid_sample with align_corners=True maps -1 -> index 0 and +1 -> index N-1.
    index = coords + box_centre(height)
    sample = index * (2.0 / max(height - 1, 1)) - 1.0
    out = F.grid_sample(x.to(work_dtype), sample, mode=mode, padding_mode="zeros", align_corners=True)
    out = out.to(images.dtype)
    return out[:, 0] if squeeze else out


def fourier_shift(images: torch.Tensor, shift) -> torch.Tensor:
    """Move image content by ``shift`` pixels with a Fourier phase ramp (exact, periodic).

    ``out(x) = img(x - shift)``: content at the centre ends up at ``+shift``.

    Args:
        images: ``(..., H, W)`` real tensor.
        shift: ``(..., 2)`` ``(dx, dy)`` in pixels, broadcastable to the batch shape.
    Returns:
        Real tensor shaped like ``images``.
    """
    height, width = images.shape[-2:]
    work = images.to(torch.float64) if images.dtype != torch.float64 else images
    spectrum = torch.fft.rfft2(work) * fourier_shift_phase(height, width, _as_tensor(shift, work, torch.float64))
    return torch.fft.irfft2(spectrum, s=(height, width)).to(images.dtype)


def fourier_shift_phase(height: int, width: int, shift: torch.Tensor) -> torch.Tensor:
    """The rfft2-layout factor ``exp(-2 pi i (kx dx + ky dy))`` that moves image content by ``shift``
    (:func:`fourier_shift` applies it; multiplying a spectrum by it does the same in Fourier space).

    Args:
        height, width: image size in pixels.
        shift: ``(..., 2)`` float64 ``(dx, dy)`` pixels.
    Returns:
        ``(..., height, width // 2 + 1)`` complex128, on ``shift``'s device.
    """
    ky = torch.fft.fftfreq(height, device=shift.device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(width, device=shift.device, dtype=torch.float64)
    phase = -2 * math.pi * (shift[..., 0, None, None] * kx[None, :] + shift[..., 1, None, None] * ky[:, None])
    return torch.polar(torch.ones_like(phase), phase)


def mirror_images(images: torch.Tensor) -> torch.Tensor:
    """Mirror images about the vertical axis through the box centre: ``out(x, y) = img(-x, y)``.

    A projection seen from the opposite side of the object is this mirror image of the one seen from the
    front (turning the object by 180 degrees about the y axis maps ``(x, y, z)`` to ``(-x, y, -z)``), so the
    mirror of a 2D class average is another view of the same 3D structure. Pixel coordinates follow
    :func:`pixel_grid` (centre at ``box // 2``); on even boxes the column at ``x = -box / 2`` has no partner
    and maps onto itself (periodic, as in Fourier space).

    Args:
        images: ``(..., H, W)`` tensor.
    Returns:
        Tensor shaped like ``images``.
    """
    width = images.shape[-1]
    return torch.roll(images.flip(-1), shifts=1 - width % 2, dims=-1)


def model_pose_to_relion(theta, t_px, pixel_size: float):
    """Generator pose to RELION columns.

    Args:
        theta: ``(B,)`` radians.
        t_px: ``(B, 2)`` generator translation in pixels.
        pixel_size: Angstrom per pixel.
    Returns:
        ``(psi_deg, origin_x_angst, origin_y_angst)`` as float64 numpy arrays
        ``(B,)``; ``psi`` wrapped to ``(-180, 180]``.
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    t_px = np.asarray(t_px, dtype=np.float64).reshape(-1, 2)
    c, s = np.cos(theta), np.sin(theta)
    # o = R(theta)^T t
    ox = c * t_px[:, 0] + s * t_px[:, 1]
    oy = -s * t_px[:, 0] + c * t_px[:, 1]
    psi = np.degrees(wrap_angle(theta))
    return np.atleast_1d(psi), ox * pixel_size, oy * pixel_size


def relion_to_model_pose(psi_deg, origin_x_angst, origin_y_angst, pixel_size: float):
    """RELION columns to generator pose: ``theta = psi``, ``t = R(theta) o``.

    Returns:
        ``(theta_rad (B,), t_px (B, 2))`` float64 numpy arrays.
    """
    theta = np.radians(np.asarray(psi_deg, dtype=np.float64).reshape(-1))
    ox = np.asarray(origin_x_angst, dtype=np.float64).reshape(-1) / pixel_size
    oy = np.asarray(origin_y_angst, dtype=np.float64).reshape(-1) / pixel_size
    c, s = np.cos(theta), np.sin(theta)
    t = np.stack([c * ox - s * oy, s * ox + c * oy], axis=-1)
    return theta, t


def object_pose_to_model(alpha, displacement_px):
    """Object rotation ``alpha`` (rad, CCW in x,y) and centre displacement ``d`` (px)
    to the generator pose: ``theta = -alpha``, ``t = -R(theta) d``.

    Returns:
        ``(theta (B,), t (B, 2))`` float64 numpy arrays.
    """
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    d = np.asarray(displacement_px, dtype=np.float64).reshape(-1, 2)
    theta = -alpha
    c, s = np.cos(theta), np.sin(theta)
    t = -np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=-1)
    return theta, t


def object_pose_to_relion(alpha, displacement_px, pixel_size: float):
    """Object pose to RELION columns: ``psi = -alpha`` (deg), ``origin = -d`` (Angstrom)."""
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    d = np.asarray(displacement_px, dtype=np.float64).reshape(-1, 2)
    psi = np.atleast_1d(np.degrees(wrap_angle(-alpha)))
    return psi, -d[:, 0] * pixel_size, -d[:, 1] * pixel_size


def move_objects(images: torch.Tensor, alpha, displacement_px, mode: str = "bilinear") -> torch.Tensor:
    """Rotate each centred object by ``alpha`` (rad, CCW in x,y) about the box
    centre, then move it by ``displacement_px`` ``(B, 2)``: ``out(x) = img(R(-alpha)(x - d))``."""
    theta, t = object_pose_to_model(_np(alpha), _np(displacement_px))
    return warp_images(images, theta, t, mode=mode)


def apply_relion_pose(images: torch.Tensor, psi_deg, origin_angst, pixel_size: float, mode: str = "bilinear"):
    """Reference images to observations: ``obs(x) = ref(R(psi)(x + o))``.

    Args:
        images: ``(B, H, W)`` centred references.
        psi_deg: ``(B,)`` ``rlnAnglePsi`` in degrees.
        origin_angst: ``(B, 2)`` ``(rlnOriginXAngst, rlnOriginYAngst)``.
        pixel_size: Angstrom per pixel.
    """
    origin = np.asarray(_np(origin_angst), dtype=np.float64).reshape(-1, 2)
    theta, t = relion_to_model_pose(_np(psi_deg), origin[:, 0], origin[:, 1], pixel_size)
    return warp_images(images, theta, t, mode=mode)


def undo_relion_pose(images: torch.Tensor, psi_deg, origin_angst, pixel_size: float, mode: str = "bilinear"):
    """Observations to centred, unrotated particles: ``c(y) = obs(R(-psi) y - o)``.

    The shift is applied first with an exact Fourier phase ramp, then the
    rotation by interpolation, as RELION does when aligning.

    Args:
        images: ``(B, H, W)`` particle images.
        psi_deg: ``(B,)`` degrees; origin_angst: ``(B, 2)`` Angstrom.
    Returns:
        ``(B, H, W)`` aligned images.
    """
    origin_px = torch.as_tensor(np.asarray(_np(origin_angst), dtype=np.float64).reshape(-1, 2) / pixel_size)
    centred = fourier_shift(images, origin_px.to(images.device))
    theta = -np.radians(np.asarray(_np(psi_deg), dtype=np.float64).reshape(-1))
    return warp_images(centred, theta, np.zeros((len(theta), 2)), mode=mode)


def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION/XMIPP ZYZ Euler angles (degrees) to rotation matrices ``A``.

    ``A = Rz(psi) Ry(tilt) Rz(rot)`` with the Heymann et al. (2005) passive
    convention used by RELION's ``Euler_angles2matrix``; the projection of a
    volume ``V`` for this pose is ``P(x, y) = integral V(A^T (x, y, z)) dz``.

    Returns:
        ``(B, 3, 3)`` float64 array.
    """
    a = np.radians(np.asarray(rot_deg, dtype=np.float64).reshape(-1))
    b = np.radians(np.asarray(tilt_deg, dtype=np.float64).reshape(-1))
    g = np.radians(np.asarray(psi_deg, dtype=np.float64).reshape(-1))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    mat = np.empty((a.shape[0], 3, 3))
    mat[:, 0, 0] = cg * cc - sg * sa
    mat[:, 0, 1] = cg * cs + sg * ca
    mat[:, 0, 2] = -cg * sb
    mat[:, 1, 0] = -sg * cc - cg * sa
    mat[:, 1, 1] = -sg * cs + cg * ca
    mat[:, 1, 2] = sg * sb
    mat[:, 2, 0] = sc
    mat[:, 2, 1] = ss
    mat[:, 2, 2] = cb
    return mat


def matrix_to_euler(matrices) -> np.ndarray:
    """RELION Euler angles ``(rot, tilt, psi)`` in degrees of rotation matrices ``A``;
    the inverse of :func:`euler_to_matrix`.

    ``tilt`` lies in ``[0, 180]``, ``rot`` and ``psi`` in ``(-180, 180]``; for
    ``tilt`` 0 or 180 (``rot`` and ``psi`` then turn about the same axis) the
    whole in-plane turn is put in ``psi`` and ``rot`` is 0, as RELION does.

    Args:
        matrices: ``(3, 3)`` or ``(B, 3, 3)`` rotation matrices.
    Returns:
        ``(B, 3)`` float64 array of degrees.
    """
    mat = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    sin_tilt = np.hypot(mat[:, 2, 0], mat[:, 2, 1])
    tilt = np.arctan2(sin_tilt, mat[:, 2, 2])
    rot = np.arctan2(mat[:, 2, 1], mat[:, 2, 0])
    psi = np.arctan2(mat[:, 1, 2], -mat[:, 0, 2])
    pole = sin_tilt < 1e-9
    upright = pole & (mat[:, 2, 2] > 0)
    rot[pole] = 0.0
    psi[upright] = np.arctan2(mat[upright, 0, 1], mat[upright, 0, 0])
    flipped = pole & ~upright
    psi[flipped] = np.arctan2(mat[flipped, 0, 1], -mat[flipped, 0, 0])
    angles = np.degrees(np.stack([rot, tilt, psi], axis=1))
    for column in (0, 2):  # (-180, 180], as wrap_angle
        angles[:, column] = 180.0 - np.mod(180.0 - angles[:, column], 360.0)
    return angles


def _np(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return value
