"""Lie-algebra parameterisation of in-plane transformations (MCE-VAE).

A transformation is written as the exponential of an element of the Lie
algebra of SO(2), SE(2) or the similarity group Sim(2):

    m = sum_i tau_i G_i,        M = exp(m)

with ``G_i`` the generators below, acting on homogeneous *pixel* coordinates
``(x, y, 1)`` measured from the box centre (:mod:`particle_vae.conventions`:
``x`` along columns, ``y`` along rows, centre pixel ``box // 2``). ``M`` is a
``3 x 3`` matrix ``[[A, b], [0, 0, 1]]`` with ``A = s R(theta)`` and it acts
as the generator pose of the conventions: an image ``f`` transformed by ``M``
is ``(M f)(x) = f(A x + b)``, i.e. ``f(s R(theta) x + t)`` with ``t = b``.

Coefficient units (order in ``tau``: rotation, then ``x``/``y`` translation
for SE(2), then scale when enabled):

* rotation ``tau_r``: radians (``G_r = [[0, -1, 0], [1, 0, 0], [0, 0, 0]]``,
  so ``exp(tau_r G_r)`` is ``R(tau_r)`` of the conventions);
* translation ``tau_x, tau_y``: pixels (``G_x`` and ``G_y`` have a single 1 in
  the last column). They are *algebra* coordinates: the group translation is
  ``t = V tau_xy`` with ``V = (exp(w) - 1) / w`` (complex notation, below),
  which equals ``tau_xy`` only when the rotation and scale are zero;
* scale ``tau_s``: natural log of the scale factor (``G_s = diag(1, 1, 0)``,
  ``s = exp(tau_s)``), so the scale is always positive.

The closed form uses the identification of ``a I + theta J`` (``J`` the
rotation generator) with the complex number ``w = a + i theta``:
``A = exp(w)`` and ``b = ((exp(w) - 1) / w) tau_xy``, with a Taylor series
near ``w = 0``. :func:`exp_map_matrix` computes the same with
``torch.linalg.matrix_exp`` (reference and tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "GROUPS",
    "n_generators",
    "generators",
    "algebra_element",
    "exp_map",
    "exp_map_matrix",
    "matrix_to_pose",
    "pose_to_tau",
    "pose_matrix",
    "affine_grid_theta",
    "spatial_transform",
]

#: supported groups (the similarity group is ``"so2"``/``"se2"`` with ``scale=True``)
GROUPS = ("so2", "se2")

# |w|^2 below which (exp(w) - 1) / w is evaluated with its Taylor series
_SERIES_THRESHOLD = 1e-2
_SERIES_TERMS = 7  # w^n / (n + 1)! for n < 7: error ~|w|^7 / 8! < 1e-11 at |w| = 0.1


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, not {group!r}")


def n_generators(group: str, scale: bool = False) -> int:
    """Number of algebra coefficients: 1 (SO(2)) or 3 (SE(2)), plus 1 with scale."""
    _check_group(group)
    return (1 if group == "so2" else 3) + int(bool(scale))


def generators(group: str, scale: bool = False, dtype=torch.float32, device=None) -> torch.Tensor:
    """Basis of the Lie algebra in homogeneous pixel coordinates.

    Returns:
        ``(G, 3, 3)`` tensor, in the order rotation (radians), ``x`` and ``y``
        translation (pixels, SE(2) only), scale (log factor, when ``scale``).
    """
    mats = [[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    if n_generators(group) == 3:
        mats += [[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                 [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]
    if scale:
        mats.append([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    return torch.tensor(mats, dtype=dtype, device=device)


def algebra_element(tau: torch.Tensor, group: str, scale: bool = False) -> torch.Tensor:
    """``m = sum_i tau_i G_i``: ``tau (B, G)`` -> ``(B, 3, 3)``."""
    gens = generators(group, scale, dtype=tau.dtype, device=tau.device)
    if tau.shape[-1] != gens.shape[0]:
        raise ValueError(f"{group}{' + scale' if scale else ''} has {gens.shape[0]} coefficients, got {tau.shape[-1]}")
    return torch.einsum("bg,gij->bij", tau, gens)


def _split(tau: torch.Tensor, group: str, scale: bool):
    """``(theta, tau_xy (B, 2), log_scale)`` from ``tau (B, G)`` (zeros where absent)."""
    expected = n_generators(group, scale)
    if tau.dim() != 2 or tau.shape[-1] != expected:
        raise ValueError(f"tau must be (B, {expected}) for {group}{' + scale' if scale else ''}, got {tuple(tau.shape)}")
    theta = tau[:, 0]
    v = tau[:, 1:3] if group == "se2" else tau.new_zeros(tau.shape[0], 2)
    log_scale = tau[:, -1] if scale else torch.zeros_like(theta)
    return theta, v, log_scale


def _expm1_over_w(a: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of ``(exp(w) - 1) / w`` for ``w = a + i theta`` (1 at ``w = 0``)."""
    d = a * a + theta * theta
    small = d < _SERIES_THRESHOLD
    # direct formula, with a safe denominator so that gradients stay finite at w = 0
    d_safe = torch.where(small, torch.ones_like(d), d)
    e = torch.exp(a)
    p, q = e * torch.cos(theta) - 1.0, e * torch.sin(theta)
    direct_re, direct_im = (p * a + q * theta) / d_safe, (q * a - p * theta) / d_safe
    # Taylor series sum_n w^n / (n + 1)!
    a_s, t_s = torch.where(small, a, torch.zeros_like(a)), torch.where(small, theta, torch.zeros_like(theta))
    term_re, term_im = torch.ones_like(a), torch.zeros_like(a)
    series_re, series_im = torch.ones_like(a), torch.zeros_like(a)
    for n in range(1, _SERIES_TERMS):
        term_re, term_im = (term_re * a_s - term_im * t_s) / (n + 1), (term_re * t_s + term_im * a_s) / (n + 1)
        series_re, series_im = series_re + term_re, series_im + term_im
    return torch.where(small, series_re, direct_re), torch.where(small, series_im, direct_im)


def exp_map(tau: torch.Tensor, group: str, scale: bool = False) -> torch.Tensor:
    """Closed-form ``exp(sum_i tau_i G_i)``.

    Args:
        tau: ``(B, G)`` algebra coefficients (radians, pixels, log scale; see
            the module docstring for the order).
        group: ``"so2"`` or ``"se2"``; scale: add the similarity generator.
    Returns:
        ``(B, 3, 3)`` matrices ``[[s R(theta), t], [0, 0, 1]]`` acting on
        homogeneous pixel coordinates; ``t`` in pixels.
    """
    theta, v, log_scale = _split(tau, group, scale)
    e = torch.exp(log_scale)
    c, s = e * torch.cos(theta), e * torch.sin(theta)
    v_re, v_im = _expm1_over_w(log_scale, theta)
    tx = v_re * v[:, 0] - v_im * v[:, 1]
    ty = v_im * v[:, 0] + v_re * v[:, 1]
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    rows = [torch.stack([c, -s, tx], -1), torch.stack([s, c, ty], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def exp_map_matrix(tau: torch.Tensor, group: str, scale: bool = False) -> torch.Tensor:
    """``exp(sum_i tau_i G_i)`` with ``torch.linalg.matrix_exp``; same output as :func:`exp_map`."""
    return torch.linalg.matrix_exp(algebra_element(tau, group, scale))


def matrix_to_pose(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generator pose of a similarity matrix ``[[s R(theta), t], [0, 0, 1]]``.

    Args:
        matrix: ``(B, 3, 3)`` (or ``(B, 2, 3)``) in homogeneous pixel coordinates.
    Returns:
        ``theta (B,)`` radians in (-pi, pi], ``t (B, 2)`` pixels and the scale
        ``s (B,)`` (1 for SO(2)/SE(2)); the matrix acts as ``f(s R(theta) x + t)``.
    """
    a, b = matrix[:, 0, 0], matrix[:, 1, 0]
    theta = torch.atan2(b, a)
    scale = torch.sqrt(a * a + b * b)
    return theta, matrix[:, :2, 2], scale


def pose_to_tau(theta: torch.Tensor, t: torch.Tensor | None, group: str, scale: torch.Tensor | None = None,
                with_scale: bool = False) -> torch.Tensor:
    """Logarithm: algebra coefficients whose :func:`exp_map` is the pose ``(theta, t, scale)``.

    Args:
        theta: ``(B,)`` radians (wrapped to (-pi, pi] first, the principal logarithm).
        t: ``(B, 2)`` pixels (``None`` or ignored for SO(2)).
        scale: ``(B,)`` positive factors (``None``: 1), used with ``with_scale``.
    Returns:
        ``(B, G)`` coefficients.
    """
    _check_group(group)
    theta = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi
    theta = torch.where(theta <= -math.pi, theta + 2 * math.pi, theta)
    log_scale = torch.log(scale) if (with_scale and scale is not None) else torch.zeros_like(theta)
    parts = [theta[:, None]]
    if group == "se2":
        v_re, v_im = _expm1_over_w(log_scale, theta)
        norm = v_re ** 2 + v_im ** 2
        # tau_xy = t / V (complex division)
        parts.append(torch.stack([(v_re * t[:, 0] + v_im * t[:, 1]) / norm, (v_re * t[:, 1] - v_im * t[:, 0]) / norm], -1))
    if with_scale:
        parts.append(log_scale[:, None])
    return torch.cat(parts, -1)


def pose_matrix(theta: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 3, 3)`` matrix ``[[s R(theta), t], [0, 0, 1]]`` from a generator pose (radians, pixels)."""
    factor = torch.ones_like(theta) if scale is None else scale
    c, s = factor * torch.cos(theta), factor * torch.sin(theta)
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    rows = [torch.stack([c, -s, t[:, 0]], -1), torch.stack([s, c, t[:, 1]], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def affine_grid_theta(matrix: torch.Tensor, box: int) -> torch.Tensor:
    """Pixel-coordinate affine map to the ``(B, 2, 3)`` ``theta`` of
    ``F.affine_grid(..., align_corners=True)``.

    ``affine_grid`` works in normalised coordinates ``u = 2 index / (N - 1) - 1``
    while ``matrix`` works in pixels from the centre ``p = index - N // 2``:
    ``p = s u + (s - c)`` with ``s = (N - 1) / 2``, ``c = N // 2``. Then
    ``q = A p + b`` becomes ``u_q = A u_p + (b + (s - c)(A 1 - 1)) / s`` (the
    offset vanishes for odd boxes).
    """
    a = matrix[:, :2, :2]
    b = matrix[:, :2, 2]
    half = (box - 1) / 2.0
    centre = float(box // 2)
    offset = (half - centre) * (a.sum(-1) - 1.0)
    return torch.cat([a, ((b + offset) / max(half, 0.5))[..., None]], -1)


def spatial_transform(images: torch.Tensor, matrix: torch.Tensor, mode: str = "bilinear",
                      padding_mode: str = "border") -> torch.Tensor:
    """Spatial transformer: ``out(x) = img(A x + b)`` for ``matrix = [[A, b], [0, 0, 1]]``.

    With ``A = R(theta)`` and ``b = t`` this is
    :func:`particle_vae.conventions.warp_images` ``(images, theta, t)`` (the same
    sampling points; ``padding_mode="zeros"`` also gives the same values outside
    the box, the default ``"border"`` repeats the edge pixels there).

    Args:
        images: ``(B, N, N)`` or ``(B, C, N, N)``.
        matrix: ``(B, 3, 3)`` or ``(B, 2, 3)``, pixel coordinates.
    Returns:
        Tensor shaped like ``images``.
    """
    squeeze = images.dim() == 3
    x = images[:, None] if squeeze else images
    box = x.shape[-1]
    if x.shape[-2] != box:
        raise ValueError(f"spatial_transform needs square images, got {tuple(x.shape[-2:])}")
    theta = affine_grid_theta(matrix.to(x.dtype), box)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    out = F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out[:, 0] if squeeze else out
