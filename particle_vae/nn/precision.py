"""Mixed precision helpers shared by the layers."""

from __future__ import annotations

import torch


def matmul_dtype(reference: torch.Tensor) -> torch.dtype:
    """dtype that matrix products on ``reference``'s device run in: the autocast dtype
    when autocast is enabled there, else ``reference.dtype``.

    Layers that build a large operand themselves (patches, Fourier features) create it
    directly in this dtype instead of letting autocast copy it once more.
    """
    device_type = reference.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no per-device autocast queries
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return reference.dtype
