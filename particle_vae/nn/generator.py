"""Coordinate-MLP ("spatial") generator with random Fourier features.

The generator draws an image by evaluating an MLP at every pixel coordinate,
after moving the coordinates by the pose (TARGET-VAE eq. 2, spatial-VAE):
``x' = R(theta) x + t`` (see :mod:`particle_vae.conventions`). Coordinates are
in normalised units (pixels / ``grid_half_width(box)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from particle_vae.conventions import grid_half_width, normalized_grid, transform_coordinates


class RandomFourierFeatures(nn.Module):
    """Fixed random Fourier features ``[cos(2 pi B x), sin(2 pi B x)]``.

    Args:
        n_features: number of frequencies ``F`` (output has ``2F`` channels).
        sigma: standard deviation of the Gaussian frequencies, in cycles per
            unit of the input coordinates.
        seed: generator seed, so a model can be rebuilt from its config.
    Shapes:
        input ``(..., 2)`` -> output ``(..., 2F)``.
    """

    def __init__(self, n_features: int, sigma: float, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("frequencies", torch.randn(n_features, 2, generator=generator) * float(sigma))

    @property
    def out_features(self) -> int:
        return 2 * self.frequencies.shape[0]

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        phase = (2 * math.pi) * (coords @ self.frequencies.T.to(coords.dtype))
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class SpatialGenerator(nn.Module):
    """Coordinate MLP: ``pixel value = MLP(fourier(R(theta) x + t) , z)``.

    The coordinate branch (Fourier features -> hidden) and the latent branch
    (z -> hidden) are summed, then ``n_layers - 1`` shared hidden layers and a
    linear output follow, with LeakyReLU in between.

    Args:
        box: output image size in pixels.
        zdim: latent size ``k`` (0 for a pose-only generator).
        hidden: hidden width (paper: 512).
        n_layers: hidden layers including the first summed one (paper: 2 for
            MNIST, 6 for particles).
        n_features: random Fourier frequencies (``0``: use raw coordinates).
        bandwidth: std of the Fourier frequencies in cycles per *pixel*; it is
            converted to normalised units with the box, so the same value means
            the same resolution for any box.
        seed: seed of the fixed Fourier frequencies.
    """

    def __init__(self, box: int, zdim: int, hidden: int = 512, n_layers: int = 2, n_features: int = 256,
                 bandwidth: float = 0.1, seed: int = 0):
        super().__init__()
        self.box, self.zdim = int(box), int(zdim)
        self.register_buffer("grid", normalized_grid(box).reshape(-1, 2), persistent=False)
        if n_features > 0:
            self.features = RandomFourierFeatures(n_features, bandwidth * grid_half_width(box), seed)
            coord_in = self.features.out_features
        else:
            self.features = None
            coord_in = 2
        self.coord_branch = nn.Linear(coord_in, hidden)
        self.latent_branch = nn.Linear(zdim, hidden, bias=False) if zdim > 0 else None
        layers: list[nn.Module] = []
        for _ in range(max(n_layers - 1, 0)):
            layers += [nn.LeakyReLU(0.2), nn.Linear(hidden, hidden)]
        layers += [nn.LeakyReLU(0.2), nn.Linear(hidden, 1)]
        self.trunk = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor | None, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Draw images.

        Args:
            z: ``(B, k)`` latents (or ``None`` when ``zdim == 0``).
            theta: ``(B,)`` rotation in radians.
            t: ``(B, 2)`` translation in normalised units.
        Returns:
            ``(B, box, box)`` raw outputs (logits or means).
        """
        coords = transform_coordinates(self.grid.to(t.dtype), theta, t)  # (B, P, 2)
        if self.features is not None:
            coords = self.features(coords)
        hidden = self.coord_branch(coords)
        if self.latent_branch is not None:
            hidden = hidden + self.latent_branch(z)[:, None, :]
        out = self.trunk(hidden)
        return out.reshape(-1, self.box, self.box)
