"""Mixed precision helpers shared by the layers."""

from __future__ import annotations

import torch


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """``(enabled, dtype)`` of autocast on ``device_type`` in this thread (``dtype`` ``None`` where
    this torch cannot tell)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no per-device autocast queries
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        if device_type == "cuda":
            return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        return False, None


def matmul_dtype(reference: torch.Tensor) -> torch.dtype:
    """dtype that matrix products on ``reference``'s device run in: the autocast dtype
    when autocast is enabled there, else ``reference.dtype``.

    Layers that build a large operand themselves (patches, Fourier features) create it
    directly in this dtype instead of letting autocast copy it once more.
    """
    enabled, dtype = autocast_state(reference.device.type)
    return dtype if enabled else reference.dtype
