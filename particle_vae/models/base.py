"""The interface every model implements, so the trainer, inference and
analysis never need to know which model they run.

A model is an ``nn.Module`` with a JSON-serialisable config that rebuilds it,
and four operations on a batch of images ``(B, 1, N, N)``:

* :meth:`PoseVAE.loss` -> :class:`LossTerms` (what training minimises, with
  every term for logging);
* :meth:`PoseVAE.readout` -> :class:`Readout` (deterministic pose and latent
  per image: MAP pose, latent mean and std, confidence values);
* :meth:`PoseVAE.decode` -> images drawn from latents at a given pose;
* :meth:`PoseVAE.reconstruct` -> images redrawn from their readout.

Poses are in the generator convention of :mod:`particle_vae.conventions`:
``theta`` in radians and ``t`` in pixels, ``g(x) = f(R(theta) x + t)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossTerms:
    """Per-batch objective.

    Attributes:
        loss: scalar to minimise (negative ELBO per image, averaged over the batch).
        elbo: scalar ELBO per image (nats), averaged over the batch.
        terms: named scalars for the log (e.g. ``recon``, ``kl_pose``, ``kl_z``).
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Readout:
    """Deterministic per-image outputs for inference and analysis.

    Attributes:
        theta: ``(B,)`` radians (generator convention).
        t: ``(B, 2)`` pixels (generator convention), in the model's box.
        z_mean, z_std: ``(B, k)`` latent posterior mean and standard deviation.
        extra: named ``(B,)`` tensors (e.g. pose confidence) written as columns.
    """

    theta: torch.Tensor
    t: torch.Tensor
    z_mean: torch.Tensor
    z_std: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def concatenate_readouts(parts: list[Readout]) -> Readout:
    """The readouts of consecutive batches as one (all fields joined along the batch)."""
    return Readout(**{name: torch.cat([getattr(part, name) for part in parts]) for name in ("theta", "t", "z_mean", "z_std")},
                   extra={key: torch.cat([part.extra[key] for part in parts]) for key in parts[0].extra})


class PoseVAE(nn.Module):
    """Base class: subclasses set ``name`` and ``config_class`` and implement the methods."""

    name: str = ""
    config_class: type = object
    #: False for models without a pose (their readout pose is zero and is not written)
    has_pose: bool = True

    def __init__(self, config):
        super().__init__()
        if hasattr(config, "validate"):
            config.validate()  # ValueError with a readable message for impossible settings
        self.config = config

    @property
    def box(self) -> int:
        return int(self.config.box)

    @property
    def zdim(self) -> int:
        return int(self.config.zdim)

    def config_dict(self) -> dict:
        """JSON-serialisable config that rebuilds this model with :func:`build_model`."""
        return {"model": self.name, **dataclasses.asdict(self.config)}

    def _init_likelihood(self) -> None:
        """Create the learned noise level when the config asks for a Gaussian
        likelihood without a fixed ``gaussian_sigma``; no mask by default."""
        learn = self.config.likelihood == "gaussian" and self.config.gaussian_sigma is None
        self.log_sigma = nn.Parameter(torch.zeros(())) if learn else None
        self.likelihood_mask = None

    def log_likelihood(self, images: torch.Tensor, raw: torch.Tensor, ctf: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(y | generated)`` per image, summed over (masked) pixels.

        Args:
            images, raw: ``(B, N, N)`` data and generator output (Bernoulli
                logits or Gaussian means, by ``config.likelihood``).
            ctf: optional ``(B, N, N//2 + 1)`` CTF (``rfft2`` layout) applied to
                the Gaussian mean before comparison.
        Returns:
            ``(B,)`` nats.
        """
        if self.config.likelihood == "bernoulli":
            if ctf is not None:
                raise ValueError("a CTF-aware likelihood needs likelihood='gaussian'")
            per_pixel = -F.binary_cross_entropy_with_logits(raw, images, reduction="none")
        else:
            mean = raw if ctf is None else torch.fft.irfft2(torch.fft.rfft2(raw) * ctf, s=raw.shape[-2:])
            sigma = self.log_sigma.exp() if self.log_sigma is not None else raw.new_tensor(float(self.config.gaussian_sigma))
            per_pixel = -0.5 * ((images - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
        if self.likelihood_mask is not None:
            per_pixel = per_pixel * self.likelihood_mask
        return per_pixel.flatten(1).sum(-1)

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None) -> LossTerms:  # pragma: no cover - interface
        raise NotImplementedError

    def readout(self, images: torch.Tensor) -> Readout:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, z: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Images ``(B, N, N)`` in data units from ``z (B, k)``, ``theta (B,)`` rad, ``t (B, 2)`` px."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Redraw images from their readout: ``(B, 1, N, N)`` -> ``(B, N, N)``."""
        out = self.readout(images)
        return self.decode(out.z_mean, out.theta, out.t)


def _learnable_items(model: nn.Module):
    """Parameters and persistent buffers, except buffers of e2cnn modules."""
    parameters = dict(model.named_parameters())
    e2cnn_prefixes = tuple(name + "." for name, module in model.named_modules() if type(module).__module__.startswith("e2cnn"))
    for name, value in model.state_dict(keep_vars=True).items():
        if name in parameters or not name.startswith(e2cnn_prefixes):
            yield name, value


def learnable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters plus the model's own small buffers, without e2cnn's sampled
    filter bases (hundreds of MB, rebuilt from the config on load)."""
    return {name: value.detach().cpu().clone() for name, value in _learnable_items(model)}


def load_learnable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`learnable_state` dict; every saved tensor must match a model tensor.

    e2cnn layers cache their expanded filters in eval mode, so the model is
    cycled through train mode to rebuild them from the loaded weights.
    """
    names = {name for name, _ in _learnable_items(model)}
    derived = {name for name, _ in model.named_buffers()} - names  # rebuilt from the config (older files saved them)
    state = {name: value for name, value in state.items() if name not in derived}
    missing, unexpected = names - set(state), set(state) - names
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    mode = model.training
    model.load_state_dict(state, strict=False)
    model.train(True)
    model.train(mode)
