"""Image preprocessing for particle stacks (cropping, Fourier cropping, normalisation, masks).

All functions work on batches of square images, ``(..., H, W)`` torch tensors
(typically ``(B, 1, box, box)`` or ``(B, box, box)``), vectorised over the batch
and on any device. Pixel coordinates follow :mod:`particle_vae.conventions`:
the centre of a box of ``N`` pixels is pixel ``N // 2`` on both axes.

:class:`Preprocessing` chains the steps in a fixed order

1. centre crop to ``crop_box`` (pixel size unchanged),
2. Fourier crop to ``target_box`` (pixel size times ``box / target_box``;
   :func:`particle_vae.fourier.fourier_crop`),
3. contrast inversion,
4. per-image normalisation (``background``, ``zscore``, ``minmax`` or ``none``),
5. a circular mask with a raised-cosine soft edge,

and :meth:`Preprocessing.describe` lists exactly what it does, with numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from particle_vae.conventions import box_centre
from particle_vae.fourier import fourier_crop

__all__ = [
    "NORMALIZATIONS",
    "centre_crop",
    "radial_distance",
    "circular_mask",
    "normalize_background",
    "normalize_zscore",
    "normalize_minmax",
    "Preprocessing",
]

#: Normalisation modes understood by :class:`Preprocessing`.
NORMALIZATIONS = ("background", "zscore", "minmax", "none")

#: Default background radius as a fraction of half the (final) box.
DEFAULT_BACKGROUND_FRACTION = 0.85


def centre_crop(images: torch.Tensor, new_box: int) -> torch.Tensor:
    """Cut the central ``new_box x new_box`` pixels out of square images.

    The centre pixel ``box // 2`` becomes the new centre pixel ``new_box // 2``
    (rows/columns ``box // 2 - new_box // 2`` onwards are kept); the pixel size
    is unchanged.

    Args:
        images: ``(..., box, box)`` tensor.
        new_box: edge length in pixels, ``1 <= new_box <= box``.
    Returns:
        ``(..., new_box, new_box)`` view of ``images``.
    """
    box = images.shape[-1]
    if images.shape[-2] != box:
        raise ValueError(f"centre_crop needs square images, got {tuple(images.shape[-2:])}")
    if not 1 <= new_box <= box:
        raise ValueError(f"centre_crop: new box {new_box} must be between 1 and {box}")
    start = box_centre(box) - box_centre(new_box)
    return images[..., start:start + new_box, start:start + new_box]


def radial_distance(box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Distance of every pixel from the centre pixel ``box // 2``.

    Returns:
        ``(box, box)`` tensor, in pixels.
    """
    axis = torch.arange(box, device=device, dtype=dtype) - box_centre(box)
    return torch.sqrt(axis[:, None] ** 2 + axis[None, :] ** 2)


def circular_mask(box: int, radius: float, soft_edge: float = 0.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """A circular mask about the centre pixel with an optional raised-cosine edge.

    ``m(r) = 1`` for ``r <= radius``, ``0.5 * (1 + cos(pi * (r - radius) / soft_edge))``
    for ``radius < r < radius + soft_edge`` and ``0`` beyond (``r`` in pixels).

    Args:
        box: edge length in pixels.
        radius: radius of the fully kept disc, pixels.
        soft_edge: width of the cosine fall-off, pixels (0 = hard edge).
    Returns:
        ``(box, box)`` tensor with values in ``[0, 1]``.
    """
    if radius < 0 or soft_edge < 0:
        raise ValueError(f"mask radius and soft edge must be >= 0 (got {radius}, {soft_edge})")
    r = radial_distance(box, device=device, dtype=torch.float64)
    if soft_edge > 0:
        ramp = 0.5 * (1 + torch.cos(math.pi * torch.clamp((r - radius) / soft_edge, 0.0, 1.0)))
        mask = torch.where(r <= radius, torch.ones_like(r), ramp)
    else:
        mask = (r <= radius).to(torch.float64)
    return mask.to(dtype)


def _safe_scale(std: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(std > eps, std, torch.ones_like(std))


def normalize_background(images: torch.Tensor, radius: float, eps: float = 1e-8) -> torch.Tensor:
    """Per-image zero mean, unit standard deviation of the background (RELION style).

    Mean and (population) standard deviation are estimated from the pixels
    farther than ``radius`` pixels from the centre pixel; every pixel of the
    image is then ``(x - mean) / std``. An image whose background is constant
    (``std <= eps``) is only shifted.

    Args:
        images: ``(..., box, box)`` float tensor.
        radius: background radius in pixels; at least 2 pixels must lie outside it.
    Returns:
        Tensor shaped like ``images``.
    """
    box = images.shape[-1]
    outside = radial_distance(box, device=images.device, dtype=torch.float64) > radius
    count = int(outside.sum())
    if count < 2:
        raise ValueError(f"background radius {radius:g} px leaves {count} pixel(s) outside it in a {box} px box")
    background = images[..., outside].to(torch.float64)  # (..., count)
    mean = background.mean(dim=-1)
    std = background.std(dim=-1, correction=0)
    out = (images.to(torch.float64) - mean[..., None, None]) / _safe_scale(std, eps)[..., None, None]
    return out.to(images.dtype)


def normalize_zscore(images: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image zero mean, unit (population) standard deviation over all pixels.

    Args:
        images: ``(..., box, box)`` float tensor.
    Returns:
        Tensor shaped like ``images``; constant images become 0.
    """
    work = images.to(torch.float64)
    mean = work.mean(dim=(-2, -1), keepdim=True)
    std = work.std(dim=(-2, -1), correction=0, keepdim=True)
    return ((work - mean) / _safe_scale(std, eps)).to(images.dtype)


def normalize_minmax(images: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image affine rescaling to ``[0, 1]``: ``(x - min) / (max - min)``.

    For models with a Bernoulli (BCE) likelihood. Constant images become 0.

    Args:
        images: ``(..., box, box)`` float tensor.
    Returns:
        Tensor shaped like ``images`` with values in ``[0, 1]``.
    """
    work = images.to(torch.float64)
    low = work.amin(dim=(-2, -1), keepdim=True)
    span = work.amax(dim=(-2, -1), keepdim=True) - low
    out = (work - low) / _safe_scale(span, eps)
    return out.clamp_(0.0, 1.0).to(images.dtype)


@dataclass
class Preprocessing:
    """Batch preprocessing for particle images, applied as ``prep(images)``.

    Steps, in this order (each optional): centre crop to ``crop_box``; Fourier
    crop to ``target_box``; contrast inversion; per-image normalisation; a
    circular mask. Radii are in pixels of the *output* box.

    Attributes:
        box: edge length of the input images, pixels.
        pixel_size: Angstrom per pixel of the input, or ``None`` if unknown.
        crop_box: centre-crop the input to this box first (pixels), or ``None``.
        target_box: Fourier-crop (downsample) to this box, or ``None``.
        invert: multiply by -1 (e.g. to make protein bright).
        normalize: ``"background"`` (mean 0 / std 1 of the pixels outside
            ``background_radius``, per image, as RELION does), ``"zscore"``
            (whole image), ``"minmax"`` (``[0, 1]`` per image) or ``"none"``.
        background_radius: pixels; default ``0.85 * output_box / 2``.
        mask_radius: radius of a circular mask applied after normalisation
            (pixels), or ``None`` for no mask.
        mask_soft_edge: width of the mask's raised-cosine edge, pixels.
    """

    box: int
    pixel_size: float | None = None
    crop_box: int | None = None
    target_box: int | None = None
    invert: bool = False
    normalize: str = "background"
    background_radius: float | None = None
    mask_radius: float | None = None
    mask_soft_edge: float = 0.0

    def __post_init__(self) -> None:
        self.box = int(self.box)
        if self.box < 1:
            raise ValueError(f"box must be positive, got {self.box}")
        if self.crop_box is not None and not 1 <= int(self.crop_box) <= self.box:
            raise ValueError(f"crop box {self.crop_box} must be between 1 and the input box {self.box}")
        if self.target_box is not None and not 1 <= int(self.target_box) <= self.cropped_box:
            raise ValueError(f"target box {self.target_box} must be between 1 and {self.cropped_box} (downsampling only)")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.normalize == "background":
            radius = self.effective_background_radius
            outside = int((radial_distance(self.output_box, dtype=torch.float64) > radius).sum())
            if radius <= 0 or outside < 2:
                raise ValueError(f"background radius {radius:g} px leaves {outside} pixel(s) outside it in a {self.output_box} px box")
        if self.mask_radius is not None and (self.mask_radius <= 0 or self.mask_soft_edge < 0):
            raise ValueError(f"mask radius must be > 0 and soft edge >= 0 (got {self.mask_radius}, {self.mask_soft_edge})")

    # -- geometry ---------------------------------------------------------------
    @property
    def cropped_box(self) -> int:
        """Box after the centre crop, pixels."""
        return self.box if self.crop_box is None else int(self.crop_box)

    @property
    def output_box(self) -> int:
        """Box of the images this produces, pixels."""
        return self.cropped_box if self.target_box is None else int(self.target_box)

    @property
    def scale(self) -> float:
        """Pixel-size factor of the Fourier crop, ``cropped_box / output_box`` (>= 1)."""
        return self.cropped_box / self.output_box

    @property
    def output_pixel_size(self) -> float | None:
        """Angstrom per output pixel (``pixel_size * scale``), or ``None``."""
        return None if self.pixel_size is None else float(self.pixel_size) * self.scale

    @property
    def effective_background_radius(self) -> float:
        """Background radius actually used, pixels of the output box."""
        if self.background_radius is not None:
            return float(self.background_radius)
        return DEFAULT_BACKGROUND_FRACTION * self.output_box / 2

    # -- application --------------------------------------------------------------
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the steps to a batch.

        Args:
            images: ``(B, 1, box, box)`` or ``(B, box, box)`` float tensor.
        Returns:
            ``(B, 1, out, out)`` or ``(B, out, out)`` float tensor
            (``out = output_box``), same dtype and device.
        """
        if images.dim() not in (3, 4) or (images.dim() == 4 and images.shape[1] != 1):
            raise ValueError(f"expected images of shape (B, 1, H, W) or (B, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.box, self.box):
            raise ValueError(f"Preprocessing was set up for {self.box}x{self.box} images, got {tuple(images.shape[-2:])}")
        if not images.is_floating_point():
            images = images.to(torch.float32)
        out = images
        if self.crop_box is not None and self.cropped_box != self.box:
            out = centre_crop(out, self.cropped_box)
        if self.output_box != self.cropped_box:
            out = fourier_crop(out, self.output_box)
        if self.invert:
            out = -out
        if self.normalize == "background":
            out = normalize_background(out, self.effective_background_radius)
        elif self.normalize == "zscore":
            out = normalize_zscore(out)
        elif self.normalize == "minmax":
            out = normalize_minmax(out)
        if self.mask_radius is not None:
            out = out * circular_mask(self.output_box, self.mask_radius, self.mask_soft_edge, device=out.device, dtype=out.dtype)
        return out.contiguous()

    # -- reporting ------------------------------------------------------------------
    def _apix(self, value: float | None) -> str:
        return "unknown pixel size" if value is None else f"{value:.4g} A/px"

    def _length(self, pixels: float, apix: float | None) -> str:
        return f"{pixels:.4g} px" if apix is None else f"{pixels:.4g} px = {pixels * apix:.4g} A"

    def describe(self) -> list[str]:
        """The steps applied, in order, as human-readable lines with their numbers.

        Returns:
            e.g. ``["input: 256x256 px, 2.806 A/px", "Fourier crop 256 -> 64 px:
            pixel size 2.806 -> 11.22 A/px (x4)", ...,
            "output: 64x64 px, 11.22 A/px"]``.
        """
        apix_in, apix_out = self.pixel_size, self.output_pixel_size
        lines = [f"input: {self.box}x{self.box} px, {self._apix(apix_in)}"]
        if self.cropped_box != self.box:
            lines.append(f"centre crop {self.box} -> {self.cropped_box} px (centre pixel {box_centre(self.box)} -> "
                         f"{box_centre(self.cropped_box)}), pixel size unchanged")
        if self.output_box != self.cropped_box:
            change = "unknown" if apix_in is None else f"{apix_in:.4g} -> {apix_out:.4g} A/px"
            lines.append(f"Fourier crop {self.cropped_box} -> {self.output_box} px: pixel size {change} (x{self.scale:.4g})")
        if self.invert:
            lines.append("invert contrast (multiply by -1)")
        c = box_centre(self.output_box)
        if self.normalize == "background":
            r = self.effective_background_radius
            lines.append(f"normalise each image to mean 0, std 1 of the background: pixels farther than "
                         f"{self._length(r, apix_out)} from pixel ({c}, {c})")
        elif self.normalize == "zscore":
            lines.append("normalise each image to mean 0, std 1 over all pixels")
        elif self.normalize == "minmax":
            lines.append("rescale each image to [0, 1]: (x - min) / (max - min)")
        else:
            lines.append("no intensity normalisation")
        if self.mask_radius is not None:
            edge = f", raised-cosine edge {self.mask_soft_edge:.4g} px" if self.mask_soft_edge > 0 else ", hard edge"
            lines.append(f"circular mask about pixel ({c}, {c}): radius {self._length(self.mask_radius, apix_out)}{edge}")
        lines.append(f"output: {self.output_box}x{self.output_box} px, {self._apix(apix_out)}")
        return lines
