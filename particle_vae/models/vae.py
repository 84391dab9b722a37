"""Plain VAE and beta-VAE baselines (Kingma & Welling; Higgins et al.).

An MLP encoder maps the whole image to a Gaussian q(z | y); an MLP decoder maps
z back to all pixels. There is no pose: the readout reports theta = 0 and t = 0,
so pose metrics treat it as a model that explains transformations with z.
``beta`` weights the KL term (beta = 1: VAE; the TARGET-VAE paper compares
with beta = 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from particle_vae.models.base import LossTerms, ModelConfig, ModelOption, PoseVAE, Readout
from particle_vae.nn.mlp import mlp


@dataclass
class VAEConfig(ModelConfig):
    """Settings that rebuild a (beta-)VAE.

    Attributes:
        box: image size in pixels.
        zdim: latent size.
        hidden: width of the hidden layers; layers: hidden layers per network.
        beta: KL weight.
        likelihood: ``"bernoulli"`` or ``"gaussian"``; gaussian_sigma: fixed
            std or ``None`` to learn it.
    """

    hidden: int = 512
    layers: int = 2
    beta: float = 1.0

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for impossible settings."""
        super().validate()
        if self.zdim < 1 or self.layers < 1 or self.hidden < 1:
            raise ValueError("zdim, layers and hidden must be positive")
        if self.beta <= 0:
            raise ValueError("beta must be positive")


class VAE(PoseVAE):
    """(beta-)VAE on ``(B, 1, N, N)`` images."""

    name = "vae"
    preset_fields = {"hidden": "gen_hidden", "layers": "gen_layers"}
    config_class = VAEConfig
    has_pose = False
    options = (
        *PoseVAE.options,
        ModelOption("--hidden", "hidden", "width of the encoder's and decoder's hidden layers", type=int,
                    old_flags=("--gen-hidden",)),
        ModelOption("--layers", "layers", "hidden layers of the encoder and of the decoder", type=int,
                    old_flags=("--gen-layers",)),
        ModelOption("--beta", "beta", "KL weight (1: VAE; the TARGET-VAE paper's beta-VAE: 4)", type=float),
    )

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        pixels = config.box * config.box
        self.encoder = mlp(pixels, config.hidden, config.layers, 2 * config.zdim)
        self.decoder = mlp(config.zdim, config.hidden, config.layers, pixels)
        self._init_likelihood()

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logstd = self.encoder(images.flatten(1)).chunk(2, dim=-1)
        return mu, logstd.clamp(-8.0, 4.0)

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None) -> LossTerms:
        """Negative beta-ELBO; ``elbo`` is the true ELBO (beta = 1) for comparison."""
        mu, logstd = self._encode(images)
        z = mu + logstd.exp() * torch.randn_like(mu)
        raw = self.decoder(z).view(-1, self.box, self.box)
        log_lik = self.log_likelihood(images[:, 0], raw, ctf)
        kl = 0.5 * (mu ** 2 + torch.exp(2 * logstd) - 1.0 - 2 * logstd).sum(-1)
        objective = log_lik - self.config.beta * kl
        elbo = log_lik - kl
        return LossTerms(loss=-objective.mean(), elbo=elbo.mean().detach(),
                         terms={"recon": -log_lik.mean().detach(), "kl_z": kl.mean().detach()})

    @torch.no_grad()
    def readout(self, images: torch.Tensor) -> Readout:
        mu, logstd = self._encode(images)
        batch = images.shape[0]
        zeros = torch.zeros(batch, device=images.device)
        return Readout(theta=zeros, t=torch.zeros(batch, 2, device=images.device), z_mean=mu, z_std=logstd.exp())

    def decode(self, z: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Images ``(B, N, N)``; the pose is ignored (this model has none)."""
        raw = self.decoder(z).view(-1, self.box, self.box)
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw


@dataclass
class BetaVAEConfig(VAEConfig):
    """:class:`VAEConfig` with the TARGET-VAE paper's comparison setting, beta = 4."""

    beta: float = 4.0


class BetaVAE(VAE):
    """beta-VAE (Higgins et al.): the VAE with the KL term weighted by beta (default 4)."""

    name = "beta-vae"
    config_class = BetaVAEConfig
