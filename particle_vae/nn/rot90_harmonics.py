"""The first group convolution of a C_r encoder (r divisible by 4) computed through its 90-degree symmetry.

A scalar-to-regular group convolution has ``r`` filters per field, and the one
of rotation channel ``j + r/4`` is the one of channel ``j`` turned by 90
degrees (exactly, on the square pixel grid of the kernel). Group the kernel's
taps into orbits of four under that quarter turn ``rho``,
``(o, rho o, rho^2 o, rho^3 o)``, write ``a_k = x(n + rho^k o)`` for the image
values under the orbit at window ``n`` and ``w_k = W_j(rho^k o)`` for the
filter values; then the four outputs ``j + (r/4) m`` at that window are a
cyclic correlation over ``k``,

    y_m = sum_o sum_k a_k w_{k+m},

which the 4-point Fourier transform over ``k`` diagonalises. In real form, with

    A0 = a0 + a1 + a2 + a3       U0 = (w0 + w1 + w2 + w3) / 4
    A2 = a0 - a1 + a2 - a3       U2 = (w0 - w1 + w2 - w3) / 4
    c  = a0 - a2                 Uc = (w0 - w2) / 2
    s  = a1 - a3                 Us = (w1 - w3) / 2

and sums over the orbits ``Z0 = A0 U0``, ``Z2 = A2 U2``,
``P = c Uc + s Us``, ``Q = s Uc - c Us``:

    y_0 = Z0 + Z2 + P,   y_1 = Z0 - Z2 - Q,   y_2 = Z0 + Z2 - P,   y_3 = Z0 - Z2 + Q.

The products then take ``6 / 16`` of the multiply-adds of the direct
convolution (``O x F`` for ``Z0`` and ``Z2`` each, ``2 O x 2 F`` for ``P, Q``,
against ``4 O x 4 F``, with ``O`` orbits and ``F = (r/4) x fields`` filters),
which is most of an encoder's inference cost at the paper's MNIST setting
(kernel 28, 1,024 output channels). An odd kernel also has a centre tap, the
same in every rotation channel, which adds to ``Z0``.

Orbit representatives are the kernel's top-left block: rows ``0 .. h-1`` and
columns ``0 .. h-1`` (even kernel ``2h``) or ``0 .. h`` (odd kernel ``2h + 1``).
With ``rho(i, j) = (j, K-1-i)`` (that is ``torch.rot90(w, 1, (-2, -1))``,
the relation e2cnn's filters satisfy; see :func:`filters_are_quarter_turn_symmetric`),
the images under an orbit are strided views of the padded image with negative
strides, which NumPy (not torch) allows: one copy gathers all four.
"""

from __future__ import annotations

import numpy as np
import torch

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def representative_shape(kernel: int) -> tuple[int, int]:
    """Rows and columns of the top-left block of orbit representatives of a ``kernel`` x ``kernel`` grid."""
    half = kernel // 2
    return half, half + kernel % 2


def orbit_taps(kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of ``rho^k`` of every orbit representative.

    Returns:
        ``rows, cols``, each ``(4, O)`` long, ``O = prod(representative_shape(kernel))``;
        representatives in row-major order of the top-left block.
    """
    height, width = representative_shape(kernel)
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    rows, cols = [], []
    for _ in range(4):
        rows.append(i)
        cols.append(j)
        i, j = j, kernel - 1 - i
    return torch.stack(rows), torch.stack(cols)


def filters_are_quarter_turn_symmetric(weight: torch.Tensor, group_order: int, tolerance: float = 1e-5) -> bool:
    """Whether the filter of rotation channel ``j + r/4`` is ``rot90`` of the one of channel ``j``.

    Args:
        weight: ``(C r, 1, K, K)`` first-layer filters, field-major (e2cnn's layout).
        group_order: ``r``.
    """
    if group_order % 4 or weight.shape[-1] != weight.shape[-2]:
        return False
    w = weight.detach().reshape(-1, group_order, *weight.shape[-2:])
    quarter = group_order // 4
    turned = torch.rot90(w[:, :-quarter], 1, (-2, -1))
    scale = w.abs().max().clamp_min(1e-30)
    return bool(((w[:, quarter:] - turned).abs().max() / scale) <= tolerance)


def harmonic_filters(weight: torch.Tensor, bias: torch.Tensor, group_order: int) -> dict[str, torch.Tensor]:
    """Quarter-turn Fourier components of first-layer filters (see the module docstring).

    Args:
        weight: ``(C r, 1, K, K)`` filters, field-major (channel ``f r + j``).
        bias: ``(C r,)``, the same for every rotation channel of a field.
        group_order: ``r``, divisible by 4.
    Returns:
        ``u0, u2`` ``(O, F)``, ``upq`` ``(2 O, 2 F)`` (rows ``c`` then ``s``,
        columns ``P`` then ``Q``), ``bias`` ``(F,)`` and ``centre`` ``(F,)`` (odd
        kernels; zeros otherwise), with ``F = (r/4) C`` filters ordered
        ``(j, f)``.
    """
    kernel = weight.shape[-1]
    quarter = group_order // 4
    fields = weight.shape[0] // group_order
    w = weight.reshape(fields, group_order, kernel, kernel)[:, :quarter].transpose(0, 1).reshape(-1, kernel, kernel)
    rows, cols = orbit_taps(kernel)
    w0, w1, w2, w3 = w[:, rows.to(w.device), cols.to(w.device)].unbind(1)  # each (F, O)
    uc, us = ((w0 - w2) / 2).t(), ((w1 - w3) / 2).t()
    upq = torch.cat([torch.cat([uc, -us], 1), torch.cat([us, uc], 1)], 0)
    half = kernel // 2
    centre = w[:, half, half] if kernel % 2 else torch.zeros_like(w[:, 0, 0])
    return {
        "u0": ((w0 + w1 + w2 + w3) / 4).t().contiguous(),
        "u2": ((w0 - w1 + w2 - w3) / 4).t().contiguous(),
        "upq": upq.contiguous(),
        "bias": bias.reshape(fields, group_order)[:, :quarter].t().reshape(-1),
        "centre": centre,
    }


def orbit_images(padded: torch.Tensor, kernel: int) -> torch.Tensor:
    """Image values under every orbit of every window (a rotation-aware im2col).

    Args:
        padded: ``(B, S, S)`` zero-padded images (CPU).
    Returns:
        ``(4, B, M, M, O)`` with ``M = S - kernel + 1``: entry ``[k, b, y, x, o]``
        is ``padded[b, y + rho^k(o)_row, x + rho^k(o)_col]``.
    """
    batch, size, _ = padded.shape
    out_size = size - kernel + 1
    height, width = representative_shape(kernel)
    bits = padded.contiguous().view(_INT_OF_SIZE[padded.element_size()]).numpy().reshape(-1)
    item = bits.itemsize
    last = kernel - 1
    # (offset of tap (0, 0), row stride of i, stride of j) for rho^k(i, j) = (i, j), (j, K-1-i), (K-1-i, K-1-j), (K-1-j, i)
    layouts = [(0, size, 1), (last, -1, size), (last * size + last, -size, -1), (last * size, 1, -size)]
    out = np.empty((4, batch, out_size, out_size, height, width), dtype=bits.dtype)
    for k, (offset, stride_i, stride_j) in enumerate(layouts):
        out[k] = np.lib.stride_tricks.as_strided(
            bits[offset:], (batch, out_size, out_size, height, width),
            (size * size * item, size * item, item, stride_i * item, stride_j * item), writeable=False)
    return torch.from_numpy(out).view(padded.dtype).view(4, batch, out_size, out_size, height * width)


@torch.no_grad()
def quarter_turn_group_conv(padded: torch.Tensor, filters: dict[str, torch.Tensor], kernel: int) -> torch.Tensor:
    """First group convolution through its quarter-turn harmonics (inference only, CPU).

    Args:
        padded: ``(B, S, S)`` zero-padded images in the dtype of the products.
        filters: :func:`harmonic_filters` in that dtype.
        kernel: ``K`` pixels.
    Returns:
        ``(4, B, M, M, F)``: entry ``[m, b, y, x, j C + f]`` is output channel
        ``(field f, rotation j + (r/4) m)`` of the window at ``(y, x)``, bias included.
    """
    orbits = orbit_images(padded, kernel)
    _, batch, out_size, _, n_orbits = orbits.shape
    rows = batch * out_size * out_size
    a = orbits.view(4, rows, n_orbits)
    even = torch.empty(2, rows, n_orbits, dtype=padded.dtype)
    odd = torch.empty(rows, 2, n_orbits, dtype=padded.dtype)  # (c, s) side by side: one product for P and Q
    pair02, pair13 = a[0] + a[2], a[1] + a[3]
    torch.add(pair02, pair13, out=even[0])
    torch.sub(pair02, pair13, out=even[1])
    torch.sub(a[0], a[2], out=odd[:, 0])
    torch.sub(a[1], a[3], out=odd[:, 1])
    n_filters = filters["u0"].shape[1]
    y = torch.empty(4, rows, n_filters, dtype=padded.dtype)
    torch.addmm(filters["bias"], even[0], filters["u0"], out=y[0])  # Z0
    if kernel % 2:
        half = kernel // 2
        centre = padded[:, half:half + out_size, half:half + out_size].reshape(rows, 1)
        y[0].addmm_(centre, filters["centre"][None])
    z2 = even[1] @ filters["u2"]
    torch.sub(y[0], z2, out=y[1])  # Z0 - Z2
    y[0] += z2  # Z0 + Z2
    pq = odd.view(rows, -1) @ filters["upq"]
    p, q = pq[:, :n_filters], pq[:, n_filters:]
    torch.sub(y[0], p, out=y[2])
    y[0] += p
    torch.add(y[1], q, out=y[3])
    y[1] -= q
    return y.view(4, batch, out_size, out_size, n_filters)
