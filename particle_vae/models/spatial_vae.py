"""spatial-VAE (Bepler, Zhong, Kelley, Brignole & Berger, NeurIPS 2019).

Re-derived from the paper. An inference network maps the whole image to a
single (unimodal) diagonal Gaussian over the semantic latent ``z``, the
rotation ``theta`` and the translation ``t``:

    q(z | y)     = N(mu_z, sigma_z^2)          p(z)     = N(0, I)
    q(theta | y) = N(mu_theta, sigma_theta^2)  p(theta) = N(0, s_theta^2)
    q(t | y)     = N(mu_t, sigma_t^2)          p(t)     = N(0, s_t^2 I)

The generator is the coordinate MLP of :class:`particle_vae.nn.generator.SpatialGenerator`:
pixel ``x`` of the image is drawn from ``f(R(theta) x + t, z)``, so the pose
acts on the coordinates and ``z`` only describes content. The ELBO is

    E_q[log p(y | z, theta, t)] - KL(q(z) || p(z)) - KL(q(theta) || p(theta)) - KL(q(t) || p(t))

with one reparameterised sample of ``(z, theta, t)`` per image and every KL in
closed form. ``theta_prior="uniform"`` uses a wide normal, ``s_theta = pi``
(the paper's choice for fully rotated data, see :data:`UNIFORM_THETA_STD`).

Poses follow :mod:`particle_vae.conventions`: ``theta`` in radians, ``t`` in
pixels (divided by ``grid_half_width(box)`` before entering the generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from particle_vae.conventions import grid_half_width, pixel_grid, wrap_angle
from particle_vae.models.base import (
    GENERATOR_OPTIONS,
    LIKELIHOOD_MASK_OPTION,
    POSE_PRIOR_OPTIONS,
    LossTerms,
    ModelConfig,
    ModelOption,
    PoseVAE,
    Readout,
)
from particle_vae.nn.generator import SpatialGenerator

LOGSTD_MIN, LOGSTD_MAX = -8.0, 4.0

#: prior std of theta (radians) for ``theta_prior="uniform"``. The posterior is a
#: Gaussian on the real line, so a truly uniform prior on the circle has no
#: closed-form KL; a normal with std pi is nearly flat over (-pi, pi] (its density
#: at +-pi is 61% of that at 0), keeps the KL exact and is the prior the paper
#: uses for fully rotated data.
UNIFORM_THETA_STD = math.pi

#: the options of the conv/MLP inference network's size (spatial-VAE, MCE-VAE)
ENCODER_SIZE_OPTIONS = (
    ModelOption("--enc-hidden", "enc_hidden", "inference MLP width", type=int),
    ModelOption("--enc-layers", "enc_layers", "inference layers", type=int),
    ModelOption("--enc-channels", "enc_channels", "first conv layer channels", type=int),
)


@dataclass
class SpatialVAEConfig(ModelConfig):
    """Settings that fully rebuild a spatial-VAE (pixels, radians).

    Attributes:
        box: image size in pixels.
        zdim: semantic latent size (0: pose-only model).
        encoder: ``"mlp"`` (tanh MLP on the flattened image, as in the paper)
            or ``"conv"`` (stride-2 3x3 convolutions down to at most 4 x 4
            pixels, then an MLP head; see :class:`ConvEncoder`).
        enc_hidden, enc_layers: width and number of hidden layers of the
            inference MLP (or of the conv net's head).
        enc_channels: channels of the first conv block (doubled twice, then kept).
        infer_rotation, infer_translation: infer theta / t; when off the
            pose is fixed at 0 and has no KL (the paper's ablations).
        translation_prior_std: std of p(t) per axis, pixels.
        theta_prior: ``"normal"`` (N(0, theta_prior_std^2)) or ``"uniform"``
            (N(0, pi^2), see :data:`UNIFORM_THETA_STD`).
        theta_prior_std: radians, used with ``theta_prior="normal"``.
        likelihood: ``"bernoulli"`` (images in [0, 1]) or ``"gaussian"``.
        gaussian_sigma: fixed noise std of the Gaussian likelihood, or ``None``
            to learn it.
        gen_hidden, gen_layers, n_fourier, fourier_bandwidth: generator
            (bandwidth in cycles per pixel; ``n_fourier=0`` feeds raw
            coordinates, as in the paper).
        mask_radius: evaluate the likelihood only inside this radius (pixels).
        seed: seed of the generator's fixed Fourier frequencies.
    """

    encoder: str = "mlp"
    enc_hidden: int = 512
    enc_layers: int = 2
    enc_channels: int = 32
    infer_rotation: bool = True
    infer_translation: bool = True
    translation_prior_std: float = 5.0
    theta_prior: str = "uniform"
    theta_prior_std: float = math.pi / 4
    gen_hidden: int = 512
    gen_layers: int = 2
    n_fourier: int = 256
    fourier_bandwidth: float = 0.1
    mask_radius: float | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for impossible settings."""
        super().validate()
        if self.box < 2:
            raise ValueError(f"box must be at least 2 pixels, not {self.box}")
        if self.encoder not in ("mlp", "conv"):
            raise ValueError(f"encoder must be 'mlp' or 'conv' for spatial-vae, not {self.encoder!r}")
        if self.theta_prior not in ("uniform", "normal"):
            raise ValueError(f"theta_prior must be 'uniform' or 'normal', not {self.theta_prior!r}")
        if self.zdim < 0:
            raise ValueError("zdim must be >= 0")
        if self.enc_hidden < 1 or self.enc_layers < 1 or self.enc_channels < 1:
            raise ValueError("enc_hidden, enc_layers and enc_channels must be positive")
        if self.gen_hidden < 1 or self.gen_layers < 1 or self.n_fourier < 0:
            raise ValueError("gen_hidden and gen_layers must be positive and n_fourier >= 0")
        if not self.translation_prior_std > 0 or not self.theta_prior_std > 0:
            raise ValueError("translation_prior_std and theta_prior_std must be positive")
        if self.mask_radius is not None and not self.mask_radius > 0:
            raise ValueError("mask_radius must be positive")
        if self.encoder == "conv" and self.box < 8:
            raise ValueError(f"the conv encoder needs a box of at least 8 pixels, not {self.box}")

    @property
    def theta_std(self) -> float:
        """Std of the theta prior in radians."""
        return UNIFORM_THETA_STD if self.theta_prior == "uniform" else float(self.theta_prior_std)


def _mlp(n_in: int, hidden: int, layers: int, n_out: int, activation=nn.Tanh) -> nn.Sequential:
    modules: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), activation()]
        width = hidden
    modules.append(nn.Linear(width, n_out))
    return nn.Sequential(*modules)


class ConvEncoder(nn.Module):
    """Small conv net: blocks of (3x3 conv, stride 2, padding 1, LeakyReLU) until
    the map is at most 4 x 4 pixels, with ``channels * 2**min(i, 2)`` channels in
    block ``i``; then flatten and an MLP head (``layers`` hidden layers of ``hidden``).

    Shapes: ``(B, 1, N, N)`` -> ``(B, n_out)``. Flattening (rather than global
    pooling) keeps where the object is, which the translation needs; the fixed
    final map size keeps the parameter count nearly independent of the box.
    """

    def __init__(self, box: int, channels: int, layers: int, hidden: int, n_out: int):
        super().__init__()
        modules: list[nn.Module] = []
        width, size, i = 1, box, 0
        while size > 4:
            out = channels * 2 ** min(i, 2)
            modules += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width, size, i = out, (size + 1) // 2, i + 1
        self.features = nn.Sequential(*modules)
        self.head = _mlp(width * size * size, hidden, layers, n_out, activation=lambda: nn.LeakyReLU(0.2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


class SpatialVAE(PoseVAE):
    """spatial-VAE on ``(B, 1, N, N)`` images; see the module docstring."""

    name = "spatial-vae"
    config_class = SpatialVAEConfig
    options = (
        *PoseVAE.options,
        ModelOption("--encoder", "encoder", "inference network: an MLP on the flattened image (the paper's) or stride-2 "
                    "convolutions and an MLP head", choices=("mlp", "conv")),
        *ENCODER_SIZE_OPTIONS,
        *POSE_PRIOR_OPTIONS,
        *GENERATOR_OPTIONS,
        LIKELIHOOD_MASK_OPTION,
    )

    def __init__(self, config: SpatialVAEConfig):
        super().__init__(config)
        c = config
        # output layout: [z_mu (k), z_logstd (k), theta_mu, theta_logstd, t_mu (2), t_logstd (2)]
        self.n_out = 2 * c.zdim + (2 if c.infer_rotation else 0) + (4 if c.infer_translation else 0)
        if self.n_out == 0:  # zdim = 0 and a fixed pose: nothing to infer
            self.encoder = None
        elif c.encoder == "mlp":
            self.encoder = _mlp(c.box * c.box, c.enc_hidden, c.enc_layers, self.n_out)
        else:
            self.encoder = ConvEncoder(c.box, c.enc_channels, c.enc_layers, c.enc_hidden, self.n_out)
        self.generator = SpatialGenerator(c.box, c.zdim, hidden=c.gen_hidden, n_layers=c.gen_layers,
                                          n_features=c.n_fourier, bandwidth=c.fourier_bandwidth, seed=c.seed)
        self._init_likelihood()
        if c.mask_radius is not None:
            radius = pixel_grid(c.box).norm(dim=-1)
            del self.likelihood_mask
            self.register_buffer("likelihood_mask", (radius <= c.mask_radius).float(), persistent=False)

    # -- encoder -> posterior ---------------------------------------------
    def posterior(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gaussian posterior parameters.

        Args:
            images: ``(B, 1, N, N)``.
        Returns:
            dict of ``z_mu, z_logstd (B, k)``; with rotation inference
            ``theta_mu, theta_logstd (B,)`` (radians); with translation
            inference ``t_mu, t_logstd (B, 2)`` (pixels, generator convention).
        """
        c = self.config
        if self.encoder is None:
            out = images.new_zeros(images.shape[0], 0)
        else:
            out = self.encoder(images.reshape(images.shape[0], -1) if c.encoder == "mlp" else images)
        k = c.zdim
        post = {"z_mu": out[:, :k], "z_logstd": out[:, k:2 * k].clamp(LOGSTD_MIN, LOGSTD_MAX)}
        ch = 2 * k
        if c.infer_rotation:
            post["theta_mu"] = out[:, ch]
            post["theta_logstd"] = out[:, ch + 1].clamp(LOGSTD_MIN, LOGSTD_MAX)
            ch += 2
        if c.infer_translation:
            post["t_mu"] = out[:, ch:ch + 2]
            post["t_logstd"] = out[:, ch + 2:ch + 4].clamp(LOGSTD_MIN, LOGSTD_MAX)
        return post

    def kl_divergence(self, post: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Closed-form KL terms per image, each ``(B,)``: ``kl_z``, ``kl_theta``, ``kl_t``
        (only those the model infers)."""
        terms = {}
        if self.zdim > 0:
            terms["kl_z"] = _kl_normal(post["z_mu"], post["z_logstd"], 1.0).sum(-1)
        if self.config.infer_rotation:
            terms["kl_theta"] = _kl_normal(post["theta_mu"], post["theta_logstd"], self.config.theta_std)
        if self.config.infer_translation:
            terms["kl_t"] = _kl_normal(post["t_mu"], post["t_logstd"], float(self.config.translation_prior_std)).sum(-1)
        return terms

    def _pose(self, post: dict[str, torch.Tensor], sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta (B,) rad, t (B, 2) px)``: a reparameterised sample or the mean."""
        ref = post["z_mu"]
        batch = ref.shape[0]
        if self.config.infer_rotation:
            theta = post["theta_mu"]
            if sample:
                theta = theta + post["theta_logstd"].exp() * torch.randn_like(theta)
        else:
            theta = ref.new_zeros(batch)
        if self.config.infer_translation:
            t = post["t_mu"]
            if sample:
                t = t + post["t_logstd"].exp() * torch.randn_like(t)
        else:
            t = ref.new_zeros(batch, 2)
        return theta, t

    # -- training objective --------------------------------------------------
    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None) -> LossTerms:
        """Negative ELBO with one reparameterised sample of ``(z, theta, t)`` per image.

        Args:
            images: ``(B, 1, N, N)``.
            ctf: optional ``(B, N, N//2 + 1)`` CTF (``rfft2`` layout) for the
                Gaussian likelihood.
        """
        post = self.posterior(images)
        kl = self.kl_divergence(post)
        theta, t = self._pose(post, sample=True)
        z = None
        if self.zdim > 0:
            z = post["z_mu"] + post["z_logstd"].exp() * torch.randn_like(post["z_mu"])
        raw = self.generator(z, theta, t / grid_half_width(self.box))
        log_lik = self.log_likelihood(images[:, 0], raw, ctf)
        kl_total = sum(kl.values()) if kl else torch.zeros_like(log_lik)
        elbo = log_lik - kl_total
        terms = {"recon": -log_lik.mean().detach(), **{name: value.mean().detach() for name, value in kl.items()}}
        if self.log_sigma is not None:
            terms["sigma"] = self.log_sigma.exp().detach()
        return LossTerms(loss=-elbo.mean(), elbo=elbo.mean().detach(), terms=terms)

    # -- inference -----------------------------------------------------------
    @torch.no_grad()
    def readout(self, images: torch.Tensor) -> Readout:
        """Posterior means: ``theta`` wrapped to (-pi, pi], ``t`` in pixels, z mean/std.

        ``extra`` holds ``theta_std`` (posterior std of theta, radians) and
        ``translation_std`` (root mean square of the two per-axis posterior
        stds of t, pixels); both are 0 for a pose component the model does not infer.
        """
        post = self.posterior(images)
        theta, t = self._pose(post, sample=False)
        batch = theta.shape[0]
        zeros = theta.new_zeros(batch)
        theta_std = post["theta_logstd"].exp() if self.config.infer_rotation else zeros
        t_std = (post["t_logstd"].exp() ** 2).mean(-1).sqrt() if self.config.infer_translation else zeros
        return Readout(theta=wrap_angle(theta), t=t, z_mean=post["z_mu"], z_std=post["z_logstd"].exp(),
                       extra={"theta_std": theta_std, "translation_std": t_std})

    def decode(self, z: torch.Tensor | None, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Images ``(B, N, N)`` in data units (probabilities or means) at pose ``(theta rad, t px)``."""
        raw = self.generator(z if self.zdim > 0 else None, theta, t / grid_half_width(self.box))
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw


def _kl_normal(mu: torch.Tensor, logstd: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mu, exp(logstd)^2) || N(0, prior_std^2)), elementwise."""
    var_ratio = torch.exp(2 * logstd) / prior_std ** 2
    return 0.5 * (var_ratio + mu ** 2 / prior_std ** 2 - 1.0 - torch.log(var_ratio))
