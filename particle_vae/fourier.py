"""General helpers on discrete Fourier grids: frequency grids, shells, Fourier cropping and resampling.

What lives here: the Fourier-space helpers that know nothing about poses, CTFs
or models, shared by the data pipeline, the simulator and pose refinement:

* 2D, on the ``torch.fft.rfft2`` grid of a square ``box x box`` image:
  :func:`hermitian_weights`, :func:`frequency_radius`, :func:`shell_index`,
  :func:`shell_means` (Fourier pixels, integer shells) and
  :func:`ctf_frequencies` (the same grid in 1/Angstrom);
* 2D images: :func:`fourier_crop` (downsampling by cropping the centred spectrum);
* 3D volumes (numpy, ``[z, y, x]``): :func:`fourier_resize` (resampling by
  cropping or zero-padding the centred spectrum, with :func:`centred_crop_pad`)
  and :func:`gaussian_filter_fourier` (Gaussian blur by Fourier multiplication).

What does not: :func:`particle_vae.conventions.fourier_shift` and
:func:`particle_vae.conventions.fourier_shift_phase` implement the pose
convention of shifts (which way content moves), and pose conventions live in
:mod:`particle_vae.conventions` only; the CTF itself is in
:mod:`particle_vae.data.ctf`.

Grid conventions:

* **rfft2 layout, unshifted.** A ``box x box`` image has a ``(box, box // 2 + 1)``
  spectrum (``torch.fft.rfft2``), zero frequency at ``[0, 0]``. The row index is
  ``ky`` in ``torch.fft.fftfreq`` order (``0, 1, ..., -1``), the column index
  ``kx >= 0`` (``torch.fft.rfftfreq``). Each column other than ``0`` (and
  ``box / 2`` for even boxes) stands for itself and its Hermitian mirror, so sums
  over the full Fourier plane weight it twice (:func:`hermitian_weights`).
* **Units.** Frequencies in *Fourier pixels* are rfft2 indices: one Fourier
  pixel is ``1 / (box * pixel size)``; Nyquist is ``box / 2``.
  :func:`ctf_frequencies` gives them in 1/Angstrom.
* **Shells.** Shell ``s`` holds the coefficients with ``round(|f|) == s``
  (``|f|`` in Fourier pixels), ``s = 0 .. box // 2``; the corners beyond
  Nyquist are folded into the last shell ``box // 2``.
* **Centred spectra** (:func:`fourier_crop`, :func:`fourier_resize`) are
  ``fftshift``-ed full transforms: zero frequency at index ``n // 2``, the same
  index as the centre pixel of the image (:mod:`particle_vae.conventions`), so
  cropping or padding them about ``n // 2`` keeps the centre pixel at the centre.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "hermitian_weights",
    "frequency_radius",
    "shell_index",
    "shell_means",
    "ctf_frequencies",
    "fourier_crop",
    "centred_crop_pad",
    "fourier_resize",
    "gaussian_filter_fourier",
]


# ---------------------------------------------------------------------------------------------
# The rfft2 grid of a square image

def hermitian_weights(box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """How often each rfft2 coefficient appears in the full Fourier plane.

    Returns:
        ``(box, box // 2 + 1)``: 1 for the columns ``0`` (and ``box / 2`` for even
        boxes), 2 for the others.
    """
    width = box // 2 + 1
    weights = torch.full((box, width), 2.0, device=device, dtype=dtype)
    weights[:, 0] = 1.0
    if box % 2 == 0:
        weights[:, -1] = 1.0
    return weights


def frequency_radius(box: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``|f|`` of every rfft2 coefficient of a ``box x box`` image, in Fourier pixels
    (``1 / (box * pixel size)`` each); ``(box, box // 2 + 1)``."""
    fy = torch.fft.fftfreq(box, device=device, dtype=dtype) * box
    fx = torch.fft.rfftfreq(box, device=device, dtype=dtype) * box
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def shell_index(box: int, device=None) -> torch.Tensor:
    """Integer frequency shell of every rfft2 coefficient, ``(box, box // 2 + 1)`` int64 in
    ``0 .. box // 2`` (shells beyond Nyquist are folded into the last)."""
    return frequency_radius(box, device=device).round().long().clamp(max=box // 2)


def shell_means(values: torch.Tensor, box: int) -> torch.Tensor:
    """Mean of ``values (..., box, box // 2 + 1)`` over each integer frequency shell (:func:`shell_index`),
    each coefficient counted as often as it appears in the full Fourier plane.

    Returns:
        ``(..., box // 2 + 1)``.
    """
    shells = shell_index(box, device=values.device)
    weights = hermitian_weights(box, device=values.device, dtype=values.dtype)
    flat = (values * weights).reshape(values.shape[:-2] + (-1,))
    n_shells = box // 2 + 1
    total = torch.zeros(values.shape[:-2] + (n_shells,), device=values.device, dtype=values.dtype)
    total.index_add_(-1, shells.reshape(-1), flat)
    count = torch.zeros(n_shells, device=values.device, dtype=values.dtype).index_add_(0, shells.reshape(-1), weights.reshape(-1))
    return total / count.clamp_min(1e-12)


def ctf_frequencies(
    box: int,
    pixel_size: float,
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies of the discrete Fourier transform of a ``box x box`` image.

    The layout is that of ``torch.fft.rfft2`` (``rfft=True``: ``(box, box//2 + 1)``)
    or ``torch.fft.fft2`` (``(box, box)``), unshifted (zero frequency at ``[0, 0]``).
    The row index gives ``ky`` and the column index ``kx``.

    Args:
        box: image edge in pixels.
        pixel_size: Angstrom per pixel.
    Returns:
        ``(kx, ky)`` tensors of the layout's shape, in 1/Angstrom.
    """
    ky = torch.fft.fftfreq(box, d=float(pixel_size), device=device, dtype=dtype)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(box, d=float(pixel_size), device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    return grid_x, grid_y


# ---------------------------------------------------------------------------------------------
# 2D images

def fourier_crop(images: torch.Tensor, new_box: int) -> torch.Tensor:
    """Downsample square images by cropping their centred Fourier transform.

    The pixel size grows by ``box / new_box``; the centre pixel (``box // 2``)
    maps to the new centre pixel (``new_box // 2``). Intensity scale is kept
    (a constant image stays the same constant).

    Args:
        images: ``(..., box, box)`` real tensor.
        new_box: target edge length in pixels, ``<= box``.
    Returns:
        ``(..., new_box, new_box)`` tensor, same dtype.
    """
    box = images.shape[-1]
    if new_box > box:
        raise ValueError(f"fourier_crop cannot enlarge images ({box} -> {new_box})")
    if new_box == box:
        return images
    # float32 input is transformed in single precision (relative error ~1e-6, 4 times faster than
    # double precision, which keeps the lazy reader well ahead of GPU training); anything else in double
    work = images if images.dtype == torch.float32 else images.to(torch.float64)
    spectrum = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(work, dim=(-2, -1))), dim=(-2, -1))
    start = box // 2 - new_box // 2
    cropped = spectrum[..., start:start + new_box, start:start + new_box]
    out = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(cropped, dim=(-2, -1))), dim=(-2, -1)).real
    return (out * (new_box * new_box) / (box * box)).to(images.dtype)


# ---------------------------------------------------------------------------------------------
# 3D volumes (numpy, indexed [z, y, x])

def centred_crop_pad(volume: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad a cube so that voxel ``n // 2`` becomes voxel ``size // 2``.

    Works alike on a real-space map (its centre voxel) and on a centred spectrum
    (its zero frequency).

    Args:
        volume: ``(n, n, n)`` array, any dtype.
        size: new edge in voxels.
    Returns:
        ``(size, size, size)`` array of ``volume``'s dtype, zero where ``volume`` has no voxel.
    """
    n = volume.shape[0]
    out = np.zeros((size, size, size), dtype=volume.dtype)
    offset = size // 2 - n // 2  # new index = old index + offset
    lo_old, hi_old = max(0, -offset), min(n, size - offset)
    if hi_old <= lo_old:
        return out
    sl_old = slice(lo_old, hi_old)
    sl_new = slice(lo_old + offset, hi_old + offset)
    out[sl_new, sl_new, sl_new] = volume[sl_old, sl_old, sl_old]
    return out


def fourier_resize(volume: np.ndarray, size: int) -> np.ndarray:
    """Resample a cube of ``n`` voxels to ``size`` voxels over the same extent by
    cropping or zero-padding its centred spectrum.

    The voxel size is multiplied by ``n / size`` (``size < n`` downsamples, keeping
    the frequencies up to the new Nyquist; ``size > n`` interpolates). Voxel
    ``n // 2`` maps to ``size // 2`` and a constant volume stays the same constant
    (the result is scaled by ``(size / n)^3``).

    Args:
        volume: ``(n, n, n)`` real array indexed ``[z, y, x]``.
        size: new edge in voxels.
    Returns:
        ``(size, size, size)`` float64 array (``volume`` itself when ``size == n``).
    """
    n = volume.shape[0]
    if size == n:
        return volume
    axes = (0, 1, 2)
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume, axes=axes)), axes=axes)
    spectrum = centred_crop_pad(spectrum, size)
    out = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(spectrum, axes=axes)), axes=axes).real
    return out * (size / n) ** 3


def gaussian_filter_fourier(volume: np.ndarray, sigma_px: float) -> np.ndarray:
    """Isotropic Gaussian blur by Fourier multiplication (periodic boundaries).

    Multiplies the ``rfftn`` spectrum by ``exp(-2 pi^2 sigma_px^2 |k|^2)``, ``k`` in
    cycles per voxel: the transform of a normalised Gaussian of standard deviation
    ``sigma_px`` voxels, so the sum (and the centre of mass) of the volume is kept.

    Args:
        volume: ``(nz, ny, nx)`` real array.
        sigma_px: standard deviation in voxels; ``<= 0`` returns ``volume`` unchanged.
    Returns:
        ``(nz, ny, nx)`` float64 array (``volume`` itself when ``sigma_px <= 0``).
    """
    if sigma_px <= 0:
        return volume
    shape = volume.shape
    kz = np.fft.fftfreq(shape[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2])[None, None, :]
    transfer = np.exp(-2.0 * math.pi ** 2 * sigma_px ** 2 * (kz ** 2 + ky ** 2 + kx ** 2))
    return np.fft.irfftn(np.fft.rfftn(volume) * transfer, s=shape, axes=(0, 1, 2))
