"""Choosing the compute device."""

from __future__ import annotations

import torch

from particle_vae.errors import ParticleVAEError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ParticleVAEError: CUDA requested but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParticleVAEError(f"--device {name} was requested but this PyTorch sees no CUDA GPU; use --device cpu or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParticleVAEError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ParticleVAEError(f"--device {name} is not supported; use auto, cpu or cuda[:N]")
    return device
