"""Coordinate-MLP ("spatial") generator with random Fourier features.

The generator draws an image by evaluating an MLP at every pixel coordinate,
after moving the coordinates by the pose (TARGET-VAE eq. 2, spatial-VAE):
``x' = R(theta) x + t`` (see :mod:`particle_vae.conventions`). Coordinates are
in normalised units (pixels / ``grid_half_width(box)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from particle_vae.conventions import grid_half_width, normalized_grid, rotation_matrix, transform_coordinates
from particle_vae.nn.mlp import DEFAULT_LEAKY_RELU_SLOPE
from particle_vae.nn.precision import matmul_dtype


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

    def on_grid(self, axis: torch.Tensor, theta: torch.Tensor, t: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Features of the posed square grid, ``forward(R(theta) x + t)`` for every pixel ``x``,
        with the channels interleaved (``cos_0, sin_0, cos_1, sin_1, ...``).

        Same values as ``forward(transform_coordinates(grid, theta, t))`` (up to the
        channel order, see :func:`interleave_weight`) but with ``2F`` fewer sines
        and cosines per pixel: on a Cartesian grid ``x = (a_col, a_row)`` the phase
        ``2 pi b.(R x + t)`` splits into a column part and a row part, so
        ``exp(i phase)`` is the product of a ``(B, N, F)`` column factor and a row
        factor (angle addition), one complex multiplication per pixel and frequency.

        Args:
            axis: ``(N,)`` coordinates of the columns (= rows), same units as ``t``.
            theta: ``(B,)`` radians.
            t: ``(B, 2)`` translations.
            out_dtype: dtype of the result (e.g. bfloat16 for a bf16 product);
                the phases are always computed in ``t``'s dtype.
        Returns:
            ``(B, N*N, 2F)``, pixels in row-major order, interleaved channels.
        """
        dtype = t.dtype
        # phases of up to ~100 radians need full precision: never under autocast
        with torch.autocast(t.device.type, enabled=False):
            rot = rotation_matrix(theta.to(dtype)).to(dtype)  # (B, 2, 2)
            rotated = torch.einsum("bij,fi->bfj", rot, self.frequencies.to(dtype))  # rows of B R: (B, F, 2)
            column_phase = (2 * math.pi) * axis[None, :, None] * rotated[:, None, :, 0]  # (B, N, F)
            row_phase = (2 * math.pi) * (axis[None, :, None] * rotated[:, None, :, 1]
                                         + (t @ self.frequencies.T.to(dtype))[:, None, :])  # (B, N, F)
            return _GridFourierFeatures.apply(column_phase, row_phase, out_dtype or dtype)


def interleave_weight(weight: torch.Tensor) -> torch.Tensor:
    """Reorder a ``(H, 2F)`` weight from ``[cos | sin]`` input channels to interleaved ones,
    so that ``linear(on_grid(...), interleave_weight(W)) == linear(forward(...), W)``."""
    hidden, channels = weight.shape
    return weight.view(hidden, 2, channels // 2).transpose(1, 2).reshape(hidden, channels)


class _GridFourierFeatures(torch.autograd.Function):
    """``(cos(c + r), sin(c + r))`` for every (row, column) pair, with a hand-written backward.

    Forward: ``column_phase (B, N, F)``, ``row_phase (B, M, F)`` -> ``(B, M*N, 2F)``
    (interleaved). The backward needs only the output:
    ``dL/dp = g_sin cos p - g_cos sin p``, summed over rows (columns) for the column (row) phase.
    """

    @staticmethod
    def forward(ctx, column_phase: torch.Tensor, row_phase: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        batch, n_cols, n_freq = column_phase.shape
        n_rows = row_phase.shape[1]
        column = torch.polar(torch.ones_like(column_phase), column_phase)
        row = torch.polar(torch.ones_like(row_phase), row_phase)
        product = row[:, :, None] * column[:, None]  # (B, M, N, F) complex
        out = torch.view_as_real(product).to(out_dtype).view(batch, n_rows * n_cols, 2 * n_freq)
        ctx.save_for_backward(out)
        ctx.shape = (batch, n_rows, n_cols, n_freq)
        ctx.phase_dtype = column_phase.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        batch, n_rows, n_cols, n_freq = ctx.shape
        shape = (batch, n_rows, n_cols, n_freq, 2)
        value = out.view(shape)
        grad = grad.reshape(shape).to(out.dtype)
        # in the features' dtype (a float32 copy of bf16 features would cost more than the products);
        # real arithmetic, as complex products are not vectorised on CPU
        dphase = grad[..., 1] * value[..., 0]
        dphase.addcmul_(grad[..., 0], value[..., 1], value=-1.0)  # (B, M, N, F)
        phase_dtype = ctx.phase_dtype
        return dphase.sum(1).to(phase_dtype), dphase.sum(2).to(phase_dtype), None


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
        leaky_relu_slope: negative slope of the LeakyReLUs between the layers.
    """

    def __init__(self, box: int, zdim: int, hidden: int = 512, n_layers: int = 2, n_features: int = 256,
                 bandwidth: float = 0.1, seed: int = 0, leaky_relu_slope: float = DEFAULT_LEAKY_RELU_SLOPE):
        super().__init__()
        self.box, self.zdim = int(box), int(zdim)
        self.register_buffer("grid", normalized_grid(box).reshape(-1, 2), persistent=False)
        # x (= y) coordinates of the columns (rows), normalised units: the grid is their Cartesian product
        self.register_buffer("axis", normalized_grid(box)[0, :, 0].clone(), persistent=False)
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
            layers += [nn.LeakyReLU(leaky_relu_slope, inplace=True), nn.Linear(hidden, hidden)]
        layers += [nn.LeakyReLU(leaky_relu_slope, inplace=True), nn.Linear(hidden, 1)]
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
        if self.features is not None:
            features = self.features.on_grid(self.axis.to(t.dtype), theta, t, out_dtype=matmul_dtype(t))
            hidden = F.linear(features, interleave_weight(self.coord_branch.weight), self.coord_branch.bias)
        else:
            hidden = self.coord_branch(transform_coordinates(self.grid.to(t.dtype), theta, t))  # from (B, P, 2)
        if self.latent_branch is not None:
            # out of place: an in-place add on the product's view costs a full gradient copy in backward
            hidden = hidden + self.latent_branch(z)[:, None, :].to(hidden.dtype)
        out = self.trunk(hidden)
        return out.reshape(-1, self.box, self.box)
