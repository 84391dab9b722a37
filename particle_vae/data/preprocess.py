"""Image preprocessing for particle stacks (Fourier cropping, normalisation, masks)."""

from __future__ import annotations

import numpy as np
import torch


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
    work = images.to(torch.float64)
    spectrum = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(work, dim=(-2, -1))), dim=(-2, -1))
    start = box // 2 - new_box // 2
    cropped = spectrum[..., start:start + new_box, start:start + new_box]
    out = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(cropped, dim=(-2, -1))), dim=(-2, -1)).real
    return (out * (new_box * new_box) / (box * box)).to(images.dtype)
