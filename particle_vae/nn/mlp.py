"""Plain multilayer perceptrons."""

from __future__ import annotations

from torch import nn

#: negative slope of the LeakyReLUs of this project's networks unless a model config sets another
DEFAULT_LEAKY_RELU_SLOPE = 0.2


def mlp(n_in: int, hidden: int, layers: int, n_out: int, slope: float = DEFAULT_LEAKY_RELU_SLOPE) -> nn.Sequential:
    """``layers`` hidden Linear + LeakyReLU blocks of width ``hidden``, then a linear output.

    Shapes: ``(..., n_in) -> (..., n_out)``.
    """
    modules: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.LeakyReLU(slope)]
        width = hidden
    modules.append(nn.Linear(width, n_out))
    return nn.Sequential(*modules)
