"""P_r group-convolutional encoder (e2cnn) with per-(rotation, position) outputs.

The first layer is a large-kernel group convolution from one scalar (trivial)
channel to ``n_fields`` regular fields of the cyclic group C_r; three 1x1 group
convolutions follow (the last one maps to ``n_out`` regular fields), with
LeakyReLU in between (pointwise non-linearities commute with the permutation
action on regular fields, so every layer stays equivariant).

Output layout: ``(B, n_out, R, H', W')`` with ``R = r`` rotation channels. The
group acts on the input by rotating it; the output then rotates spatially and
its rotation channels shift cyclically. With ``torch.rot90(x, 1, (-2, -1))``
(an object rotated by -90 degrees in the x=col, y=row frame) the channels
shift by ``+r/4``; hence channel ``j`` stands for generator angle
``theta = 2 pi j / r`` (see :mod:`particle_vae.conventions`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

LEAK = 0.2


def _e2cnn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from e2cnn import gspaces
        from e2cnn import nn as enn
    return gspaces, enn


class GroupConvEncoder(nn.Module):
    """Encoder mapping images to a grid of per-cell outputs.

    Args:
        group_order: ``r`` of the cyclic group C_r (1 = translation only).
        n_out: output channels per cell (regular fields for group convs).
        n_fields: hidden fields (paper: 128).
        kernel, padding: of the first convolution, pixels (paper MNIST: 28, 8).
        plain: use ordinary convolutions (``n_fields`` channels), no rotation channels.
    Shapes:
        input ``(B, 1, N, N)`` -> output ``(B, n_out, R, M, M)`` with
        ``M = N + 2 padding - kernel + 1`` and ``R = 1`` when ``plain``, else
        ``group_order``.
    """

    def __init__(self, group_order: int, n_out: int, n_fields: int = 128, kernel: int = 28, padding: int = 8,
                 plain: bool = False):
        super().__init__()
        self.group_order = int(group_order)
        self.n_out = int(n_out)
        self.kernel, self.padding = int(kernel), int(padding)
        self.plain = plain or self.group_order == 1
        if self.plain:
            self.layers = nn.ModuleList([
                nn.Conv2d(1, n_fields, kernel, padding=padding),
                nn.Conv2d(n_fields, n_fields, 1),
                nn.Conv2d(n_fields, n_fields, 1),
                nn.Conv2d(n_fields, n_out, 1),
            ])
        else:
            gspaces, enn = _e2cnn()
            space = gspaces.Rot2dOnR2(N=self.group_order)
            self.in_type = enn.FieldType(space, [space.trivial_repr])
            self.hidden_type = enn.FieldType(space, n_fields * [space.regular_repr])
            self.out_type = enn.FieldType(space, n_out * [space.regular_repr])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.layers = nn.ModuleList([
                    enn.R2Conv(self.in_type, self.hidden_type, kernel, padding=padding),
                    enn.R2Conv(self.hidden_type, self.hidden_type, 1),
                    enn.R2Conv(self.hidden_type, self.hidden_type, 1),
                    enn.R2Conv(self.hidden_type, self.out_type, 1),
                ])

    @property
    def rotations(self) -> int:
        """Number of rotation channels ``R`` in the output."""
        return 1 if self.plain else self.group_order

    def output_size(self, box: int) -> int:
        """Spatial size ``M`` of the output grid for an input of ``box`` pixels."""
        return box + 2 * self.padding - self.kernel + 1

    def cell_offset(self, box: int) -> float:
        """Pixel coordinate (x or y, relative to the box centre ``box // 2``) of output cell 0.

        Output cell ``i`` sits at ``cell_offset + i`` pixels: the centre of the
        first kernel window.
        """
        return (self.kernel - 1) / 2 - self.padding - box // 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.plain:
            x = images
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = F.leaky_relu(x, LEAK)
            return x[:, :, None]
        _, enn = _e2cnn()
        x = enn.GeometricTensor(images, self.in_type)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = enn.GeometricTensor(F.leaky_relu(x.tensor, LEAK), x.type)
        out = x.tensor
        batch, _, height, width = out.shape
        return out.view(batch, self.n_out, self.group_order, height, width)
