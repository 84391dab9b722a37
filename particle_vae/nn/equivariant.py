"""P_r group-convolutional encoder (e2cnn) with per-(rotation, position) outputs.

The first layer is a large-kernel group convolution from one scalar (trivial)
channel to ``n_fields`` regular fields of the cyclic group C_r; three 1x1 group
convolutions follow (the last one maps to ``n_out`` regular fields), with
LeakyReLU in between (pointwise non-linearities commute with the permutation
action on regular fields, so every layer stays equivariant).

The 1x1 layers come in two flavours (``mixing``):

- ``"full"``: e2cnn's general 1x1 regular-to-regular convolution, whose kernel
  mixes all ``r`` rotation channels of every input field (``r`` weights per
  field pair, a ``(C r) x (C r)`` product per pixel);
- ``"shared"``: one ``C x C`` channel mixing applied to each rotation channel
  separately (the identity component of that kernel only), as in the TARGET-VAE
  authors' encoder: ``r`` times cheaper, and still equivariant because the same
  map acts on every rotation channel, so it commutes with their cyclic shift.

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

from particle_vae.nn.mlp import DEFAULT_LEAKY_RELU_SLOPE
from particle_vae.nn.precision import matmul_dtype
from particle_vae.nn.rot90_harmonics import filters_are_quarter_turn_symmetric, harmonic_filters, quarter_turn_group_conv


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
        mixing: ``"full"`` or ``"shared"`` 1x1 group convolutions (see the module docstring).
        leaky_relu_slope: negative slope of the LeakyReLU between the layers (0.2 here;
            the TARGET-VAE authors' code uses PyTorch's default, 0.01).
    Shapes:
        input ``(B, 1, N, N)`` -> output ``(B, n_out, R, M, M)`` with
        ``M = N + 2 padding - kernel + 1`` and ``R = 1`` when ``plain``, else
        ``group_order``.
    """

    def __init__(self, group_order: int, n_out: int, n_fields: int = 128, kernel: int = 28, padding: int = 8,
                 plain: bool = False, mixing: str = "full", leaky_relu_slope: float = DEFAULT_LEAKY_RELU_SLOPE):
        super().__init__()
        self.leaky_relu_slope = float(leaky_relu_slope)
        if mixing not in ("full", "shared"):
            raise ValueError(f"mixing must be 'full' or 'shared', not {mixing!r}")
        self.group_order = int(group_order)
        self.n_out = int(n_out)
        self.kernel, self.padding = int(kernel), int(padding)
        self.plain = plain or self.group_order == 1
        self.shared_mixing = mixing == "shared" and not self.plain
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
                first = enn.R2Conv(self.in_type, self.hidden_type, kernel, padding=padding)
                if self.shared_mixing:
                    rest = [nn.Conv2d(n_fields, n_fields, 1), nn.Conv2d(n_fields, n_fields, 1), nn.Conv2d(n_fields, n_out, 1)]
                else:
                    rest = [enn.R2Conv(self.hidden_type, self.hidden_type, 1), enn.R2Conv(self.hidden_type, self.hidden_type, 1),
                            enn.R2Conv(self.hidden_type, self.out_type, 1)]
                self.layers = nn.ModuleList([first, *rest])

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
                    x = F.leaky_relu(x, self.leaky_relu_slope)
            return x[:, :, None]
        _, enn = _e2cnn()
        if self.shared_mixing:
            return self._forward_shared(images)
        x = enn.GeometricTensor(images, self.in_type)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = enn.GeometricTensor(F.leaky_relu(x.tensor, self.leaky_relu_slope), x.type)
        out = x.tensor
        batch, _, height, width = out.shape
        return out.view(batch, self.n_out, self.group_order, height, width)

    def _forward_shared(self, images: torch.Tensor) -> torch.Tensor:
        first = self.layers[0]
        r = self.group_order
        dtype = matmul_dtype(images)
        if images.device.type == "cpu" and not torch.is_grad_enabled():
            filters = self._quarter_turn_filters(dtype)
            if filters is not None:
                # inference: 6/16 of the first layer's products (see rot90_harmonics); rows (m, B, H, W, j)
                padded = F.pad(images[:, 0].to(dtype), (self.padding,) * 4)
                x = quarter_turn_group_conv(padded, filters, self.kernel)
                quarters, batch, height, width, _ = x.shape
                x = F.leaky_relu_(x.view(quarters, batch, height, width, r // 4, -1), self.leaky_relu_slope)
                x = self._mix_channels(x, filters["mixing"])
                return x.permute(1, 5, 0, 4, 2, 3).reshape(batch, self.n_out, r, height, width)
        # the e2cnn layer keeps its expanded filter cached in eval mode; in training it is rebuilt each step
        weight, bias = (first.filter, first.expanded_bias) if not first.training else first.expand_parameters()
        # Output channels reordered from field-major (f r + j) to rotation-major (j C + f) and computed
        # channels-last, (B H W) x (r C): the 1x1 layers are then single products over (B H W r) rows.
        n_fields = weight.shape[0] // r
        weight = weight.view(n_fields, r, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)
        bias = bias.view(n_fields, r).t().reshape(-1)
        if images.device.type == "cpu" and dtype == torch.bfloat16:
            # bf16 matrix products are several times faster than oneDNN's bf16 convolution on CPUs
            # with AVX512-BF16: compute the first layer as one product over image patches (im2col)
            patches = image_patches(images, self.kernel, self.padding, dtype=dtype)  # (B, H, W, K*K)
            x = F.linear(patches, weight.flatten(1), bias)
        else:
            x = F.conv2d(images.contiguous(memory_format=torch.channels_last), weight.to(images.dtype),
                         bias.to(images.dtype), padding=self.padding).permute(0, 2, 3, 1)
        batch, height, width, _ = x.shape
        # not in place: in place on this view of the product would cost a full gradient copy in backward
        x = self._mix_channels(F.leaky_relu(x.reshape(batch, height, width, r, n_fields), self.leaky_relu_slope))
        return x.permute(0, 4, 3, 1, 2).contiguous()  # (B, n_out, r, H, W)

    def _mix_channels(self, x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The rotation-shared 1x1 layers on the last dimension of ``(..., n_fields)`` -> ``(..., n_out)``
        (``weights``: their ``(weight, bias)`` already in the products' dtype)."""
        if weights is None:
            weights = [(layer.weight.view(layer.weight.shape[0], -1), layer.bias) for layer in self.layers[1:]]
        for i, (weight, bias) in enumerate(weights):
            x = F.linear(x, weight, bias)
            if i < len(weights) - 1:
                x = F.leaky_relu(x, self.leaky_relu_slope, inplace=True)  # the product's backward does not need its output
        return x

    def _quarter_turn_filters(self, dtype: torch.dtype) -> dict | None:
        """The weights of the inference path in ``dtype`` (cast once instead of by autocast at every
        product): the first layer's quarter-turn
        harmonics and ``"mixing"``, the 1x1 layers' ``(weight, bias)``; ``None`` where the
        harmonics do not apply (``r`` not divisible by 4). Cached while the layers are in eval
        mode (e2cnn's filter is then fixed)."""
        if self.group_order % 4:
            return None
        first = self.layers[0]
        if first.training:
            return self._inference_weights(*first.expand_parameters(), dtype)
        # keyed by the tensors themselves (the cache keeps them alive): e2cnn replaces its filter when it
        # re-expands, and an in-place update of any weight bumps its version
        tensors = (first.filter, first.expanded_bias, *(p for layer in self.layers[1:] for p in (layer.weight, layer.bias)))
        key = (dtype, *tensors, *(t._version for t in tensors))
        cached = getattr(self, "_harmonics_cache", None)
        if cached is None or len(cached[0]) != len(key) or not all(a is b if torch.is_tensor(a) else a == b for a, b in zip(cached[0], key)):
            cached = self._harmonics_cache = (key, self._inference_weights(first.filter, first.expanded_bias, dtype))
        return cached[1]

    def _inference_weights(self, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> dict | None:
        if not filters_are_quarter_turn_symmetric(weight, self.group_order):
            return None
        weights = {name: value.detach().to(dtype).contiguous() for name, value in harmonic_filters(weight, bias, self.group_order).items()}
        weights["mixing"] = [(layer.weight.detach().view(layer.weight.shape[0], -1).to(dtype), layer.bias.detach().to(dtype))
                             for layer in self.layers[1:]]
        return weights


def image_patches(images: torch.Tensor, kernel: int, padding: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every ``kernel x kernel`` window of zero-padded one-channel images (im2col).

    Args:
        images: ``(B, 1, N, N)``.
        kernel, padding: pixels.
        dtype: dtype of the result (cast before the copy, so a bf16 result costs half).
    Returns:
        ``(B, M, M, kernel**2)`` with ``M = N + 2 padding - kernel + 1``; window
        ``[b, i, j]`` starts at padded pixel ``(i, j)``, row-major inside.
    """
    padded = F.pad(images[:, 0].to(dtype or images.dtype), (padding,) * 4).contiguous()
    batch, size, _ = padded.shape
    out = size - kernel + 1
    windows = padded.as_strided((batch, out, out, kernel, kernel), (size * size, size, 1, size, 1))
    return windows.reshape(batch, out, out, kernel * kernel)
