"""MCE-VAE (Bajaj, Roy & Zhang, "Invariance-based Multi-Clustering of Latent
Space Embeddings for Equivariant Learning", 2021).

Re-derived from the paper. An *augmented encoder* (the conv net of
:class:`particle_vae.models.spatial_vae.ConvEncoder`, He-initialised, then
LeakyReLU) maps the image ``x`` to a feature vector ``z_aug``; three linear
extractor heads read it:

* the cluster latent ``z_c`` (``cluster_dim`` dimensions) with a
  Gaussian-mixture prior and a mixture posterior with the same number of
  components ``K = n_clusters``::

      p(z_c)     = sum_k pi_k   N(m_k, s_k^2 I)
      q(z_c | x) = sum_k w_k(x) N(mu_k(x), diag sigma_k(x)^2)

  The prior weights ``pi`` are fixed (equal unless ``cluster_weights`` is
  given). The prior means are fixed, well separated points
  ``m_k = cluster_spread * (+-e_j)`` (``e_1, ..., e_d`` first, then
  ``-e_1, ..., -e_d``; so ``n_clusters <= 2 cluster_dim``) with
  ``s_k = cluster_prior_std``; ``learn_prior=True`` makes the means and
  log-stds learnable parameters initialised there. With
  ``posterior_weights="learned"`` (default) the encoder predicts ``w(x)``
  (a softmax); with ``"shared"``, ``w = pi`` as in the paper.
* the variational latent ``z ~ N(mu, sigma^2)`` (``zdim``), prior ``N(0, I)``;
* the transformation latent ``tau ~ N(mu_tau, sigma_tau^2)``: coefficients of
  the Lie algebra of SO(2) or SE(2) (optionally with the similarity scale
  generator), mapped to a matrix ``M = exp(sum_i tau_i G_i)`` in closed form
  (:mod:`particle_vae.nn.lie`; rotation in radians, translation in pixels,
  scale as a log factor). Its prior is ``N(0, diag s^2)`` with ``s`` =
  ``theta_prior_std`` (``pi`` with ``theta_prior="uniform"``, as spatial-VAE),
  ``translation_prior_std`` (pixels) and ``scale_prior_std``. The head's last
  layer starts at zero weights (mean ``tau = 0``, so ``M = I``) with a small
  posterior std (``exp(TAU_INIT_LOGSTD)``).

An *invariance decoder* of gated dense layers maps ``(z_c, z)`` to a canonical
image ``x~``; a spatial transformer (``affine_grid`` + bilinear
``grid_sample``) moves it by ``M``: ``x^(p) = x~(A p + b)`` in pixel
coordinates, which is :func:`particle_vae.conventions.warp_images` with the
generator pose ``theta = atan2(A_10, A_00)``, ``t = b`` (pixels). Outside the
box the sampler repeats the border pixels of ``x~`` (its background).

Objective (minimised)::

    loss = -ELBO + invariance_weight * L_inv
    ELBO = sum_k w_k E_{q_k q(z) q(tau)}[log p(x | z_c, z, tau)]
           - KL(q(z) || p(z)) - KLbound(q(z_c) || p(z_c)) - KL(q(tau) || p(tau))

The mixture KL has no closed form; it is replaced by the upper bound
(convexity of the KL, paper eq. 13-14)::

    KL(q(z_c) || p(z_c)) <= KL(w || pi) + sum_k w_k KL(q_k || p_k)

which is ``sum_k pi_k KL(q_k || p_k)`` with shared weights, so the reported
ELBO is still a lower bound of ``log p(x)``. The reconstruction expectation
is summed exactly over the ``K`` components (one reparameterised sample of
``z_c`` per component, one shared sample of ``z`` and ``tau``), so the
decoder runs ``K`` times per image.

Invariance term (paper eq. 8): for each image a group element ``g`` is drawn
uniformly from a finite set (rotations by ``2 pi j / invariance_rotations``
times integer shifts in ``[-invariance_translation, invariance_translation]``
pixels per axis) and ``g x = warp_images(x, theta_g, t_g)``. With the
posterior means ``zbar_c = sum_k w_k mu_k``, ``mu_z`` and the canonical images
``x~`` decoded from them (data units)::

    L_inv = |zbar_c(x) - zbar_c(gx)|^2 + |mu_z(x) - mu_z(gx)|^2 + |x~(x) - x~(gx)|^2

(squared Euclidean distances, summed over dimensions and pixels). It is not
part of the ELBO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from particle_vae.conventions import pixel_grid, warp_images, wrap_angle
from particle_vae.models.base import (
    LIKELIHOOD_MASK_OPTION,
    POSE_PRIOR_OPTIONS,
    LossTerms,
    ModelConfig,
    ModelOption,
    PoseVAE,
    Readout,
)
from particle_vae.models.spatial_vae import ENCODER_SIZE_OPTIONS, UNIFORM_THETA_STD, ConvEncoder
from particle_vae.nn import lie

LOGSTD_MIN, LOGSTD_MAX = -8.0, 4.0
#: initial posterior log-std of every ``tau`` coefficient (the mean starts at 0)
TAU_INIT_LOGSTD = math.log(0.1)


@dataclass
class MCEVAEConfig(ModelConfig):
    """Settings that fully rebuild an MCE-VAE (pixels, radians).

    Attributes:
        box: image size in pixels (at least 8, for the conv encoder).
        zdim: variational latent size (0 allowed).
        n_clusters: mixture components ``K`` (at most ``2 * cluster_dim``).
        cluster_dim: size of the cluster latent ``z_c``.
        cluster_spread: distance of the prior means from the origin.
        cluster_prior_std: std of each prior component (isotropic).
        cluster_weights: prior mixture weights (normalised), ``None``: equal.
        learn_prior: learn the prior means and log-stds (the weights stay fixed).
        posterior_weights: ``"learned"`` (encoder predicts ``w(x)``) or
            ``"shared"`` (``w = pi``, paper eq. 13-14).
        group: ``"so2"`` (rotation) or ``"se2"`` (rotation + translation).
        scale: add the similarity (log-scale) generator.
        theta_prior: ``"uniform"`` (N(0, pi^2)) or ``"normal"`` (N(0, theta_prior_std^2)).
        theta_prior_std: radians, with ``theta_prior="normal"``.
        translation_prior_std: std of the translation coefficients, pixels.
        scale_prior_std: std of the log-scale coefficient.
        invariance_weight: weight of the invariance term (0: off).
        invariance_rotations: ``n``: ``g`` rotates by multiples of ``2 pi / n``.
        invariance_translation: ``g`` shifts by integers in ``[-r, r]`` pixels per axis.
        aug_dim: size of ``z_aug``, the augmented encoder's output.
        enc_channels, enc_layers, enc_hidden: conv encoder (see
            :class:`particle_vae.models.spatial_vae.ConvEncoder`).
        dec_hidden, dec_layers: gated dense decoder width and layers.
        likelihood: ``"bernoulli"`` or ``"gaussian"``; gaussian_sigma: fixed
            noise std or ``None`` to learn it.
        mask_radius: evaluate the likelihood only inside this radius (pixels).
    """

    n_clusters: int = 10
    cluster_dim: int = 5
    cluster_spread: float = 3.0
    cluster_prior_std: float = 1.0
    cluster_weights: list[float] | None = None
    learn_prior: bool = False
    posterior_weights: str = "learned"
    group: str = "se2"
    scale: bool = False
    theta_prior: str = "uniform"
    theta_prior_std: float = math.pi / 4
    translation_prior_std: float = 5.0
    scale_prior_std: float = 0.1
    invariance_weight: float = 1.0
    invariance_rotations: int = 8
    invariance_translation: int = 2
    aug_dim: int = 256
    enc_channels: int = 32
    enc_layers: int = 1
    enc_hidden: int = 512
    dec_hidden: int = 512
    dec_layers: int = 2
    mask_radius: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for impossible settings."""
        super().validate()
        if self.box < 8:
            raise ValueError(f"mce-vae's conv encoder needs a box of at least 8 pixels, not {self.box}")
        if self.zdim < 0:
            raise ValueError("zdim must be >= 0")
        if self.cluster_dim < 1 or self.n_clusters < 1:
            raise ValueError("n_clusters and cluster_dim must be positive")
        if self.n_clusters > 2 * self.cluster_dim:
            raise ValueError(f"n_clusters ({self.n_clusters}) must be at most 2 * cluster_dim ({2 * self.cluster_dim}): "
                             "the prior means are +-cluster_spread along the cluster_dim axes")
        if not self.cluster_spread > 0 or not self.cluster_prior_std > 0:
            raise ValueError("cluster_spread and cluster_prior_std must be positive")
        if self.cluster_weights is not None:
            weights = list(self.cluster_weights)
            if len(weights) != self.n_clusters or not all(w > 0 for w in weights):
                raise ValueError(f"cluster_weights must be {self.n_clusters} positive numbers")
        if self.posterior_weights not in ("learned", "shared"):
            raise ValueError(f"posterior_weights must be 'learned' or 'shared', not {self.posterior_weights!r}")
        if self.group not in lie.GROUPS:
            raise ValueError(f"group must be one of {lie.GROUPS}, not {self.group!r}")
        if self.theta_prior not in ("uniform", "normal"):
            raise ValueError(f"theta_prior must be 'uniform' or 'normal', not {self.theta_prior!r}")
        if not self.theta_prior_std > 0 or not self.translation_prior_std > 0 or not self.scale_prior_std > 0:
            raise ValueError("theta_prior_std, translation_prior_std and scale_prior_std must be positive")
        if self.invariance_weight < 0:
            raise ValueError("invariance_weight must be >= 0")
        if self.invariance_rotations < 1 or self.invariance_translation < 0:
            raise ValueError("invariance_rotations must be >= 1 and invariance_translation >= 0")
        if self.aug_dim < 1 or self.enc_channels < 1 or self.enc_layers < 1 or self.enc_hidden < 1:
            raise ValueError("aug_dim, enc_channels, enc_layers and enc_hidden must be positive")
        if self.dec_hidden < 1 or self.dec_layers < 1:
            raise ValueError("dec_hidden and dec_layers must be positive")
        if self.mask_radius is not None and not self.mask_radius > 0:
            raise ValueError("mask_radius must be positive")

    @property
    def theta_std(self) -> float:
        """Std of the prior of the rotation coefficient, radians."""
        return UNIFORM_THETA_STD if self.theta_prior == "uniform" else float(self.theta_prior_std)

    def tau_prior_std(self) -> list[float]:
        """Prior std of every ``tau`` coefficient, in :func:`particle_vae.nn.lie.generators` order."""
        stds = [self.theta_std]
        if self.group == "se2":
            stds += [float(self.translation_prior_std)] * 2
        if self.scale:
            stds.append(float(self.scale_prior_std))
        return stds


class GatedDense(nn.Module):
    """Gated dense layer ``(W x + b) * sigmoid(V x + c)``: ``(..., n_in) -> (..., n_out)``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.value = nn.Linear(n_in, n_out)
        self.gate = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


def _head(n_in: int, n_out: int) -> nn.Sequential:
    """Extractor head: one linear map from ``z_aug`` (a Sequential so that ``head[-1]`` is the output layer)."""
    return nn.Sequential(nn.Linear(n_in, n_out))


def _init_leaky(module: nn.Module, slope: float = 0.2) -> None:
    """He initialisation for LeakyReLU nets (keeps the input dependence of the
    features from fading with depth); zero biases."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, a=slope, nonlinearity="leaky_relu")
            nn.init.zeros_(layer.bias)


def prior_means(n_clusters: int, cluster_dim: int, spread: float) -> torch.Tensor:
    """``(K, d)`` prior means ``spread * e_1, ..., spread * e_d, -spread * e_1, ...``."""
    eye = torch.eye(cluster_dim)
    return spread * torch.cat([eye, -eye])[:n_clusters]


def kl_diag_normal(mu: torch.Tensor, logstd: torch.Tensor, prior_mu, prior_std) -> torch.Tensor:
    """KL(N(mu, exp(logstd)^2) || N(prior_mu, prior_std^2)), elementwise (broadcasting)."""
    prior_std = torch.as_tensor(prior_std, dtype=mu.dtype, device=mu.device)
    var_ratio = torch.exp(2 * logstd) / prior_std ** 2
    return 0.5 * (var_ratio + ((mu - prior_mu) / prior_std) ** 2 - 1.0 - torch.log(var_ratio))


class MCEVAE(PoseVAE):
    """MCE-VAE on ``(B, 1, N, N)`` images; see the module docstring.

    The readout latent (``z_mean``, the input of :meth:`decode`, and
    :attr:`zdim`) is the concatenation ``[z_c, z]`` of ``cluster_dim + zdim``
    values.
    """

    name = "mce-vae"
    preset_fields = {"dec_hidden": "gen_hidden", "dec_layers": "gen_layers"}
    config_class = MCEVAEConfig
    options = (
        ModelOption("--zdim", "zdim", "dimensions of the variational latent z (the readout latent is [z_c, z])", type=int),
        *PoseVAE.options[1:],
        ModelOption("--clusters", "n_clusters", "mixture components of the cluster latent", type=int),
        ModelOption("--cluster-dim", "cluster_dim", "cluster latent dimensions", type=int),
        ModelOption("--lie-group", "group", "transformation group", choices=("so2", "se2")),
        ModelOption("--invariance-weight", "invariance_weight", "weight of the invariance term", type=float),
        ModelOption("--invariance-rotations", "invariance_rotations",
                    "the invariance term's group elements rotate by multiples of 360/N degrees", type=int,
                    old_flags=("--group",)),
        ModelOption("--invariance-translation", "invariance_translation",
                    "largest shift of the invariance term's group elements, pixels", type=int),
        *ENCODER_SIZE_OPTIONS,
        ModelOption("--dec-hidden", "dec_hidden", "decoder width", type=int, old_flags=("--gen-hidden",)),
        ModelOption("--dec-layers", "dec_layers", "decoder layers", type=int, old_flags=("--gen-layers",)),
        *POSE_PRIOR_OPTIONS,
        LIKELIHOOD_MASK_OPTION,
    )

    def __init__(self, config: MCEVAEConfig):
        super().__init__(config)
        c = config
        k, d = c.n_clusters, c.cluster_dim
        self.n_tau = lie.n_generators(c.group, c.scale)
        self.encoder = nn.Sequential(ConvEncoder(c.box, c.enc_channels, c.enc_layers, c.enc_hidden, c.aug_dim),
                                     nn.LeakyReLU(0.2))
        _init_leaky(self.encoder)
        learned = c.posterior_weights == "learned"
        self.cluster_head = _head(c.aug_dim, (k if learned else 0) + 2 * k * d)
        self.z_head = _head(c.aug_dim, 2 * c.zdim) if c.zdim > 0 else None
        self.tau_head = _head(c.aug_dim, 2 * self.n_tau)
        with torch.no_grad():  # identity initialisation: tau = 0, M = I
            last = self.tau_head[-1]
            last.weight.zero_()
            last.bias.zero_()
            last.bias[self.n_tau:] = TAU_INIT_LOGSTD
        layers: list[nn.Module] = []
        width = d + c.zdim
        for _ in range(c.dec_layers):
            layers.append(GatedDense(width, c.dec_hidden))
            width = c.dec_hidden
        layers.append(nn.Linear(width, c.box * c.box))
        self.decoder = nn.Sequential(*layers)

        means = prior_means(k, d, float(c.cluster_spread))
        log_std = torch.full((k,), math.log(c.cluster_prior_std))
        if c.learn_prior:
            self.prior_mean = nn.Parameter(means)
            self.prior_log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("prior_mean", means)
            self.register_buffer("prior_log_std", log_std)
        weights = torch.ones(k) if c.cluster_weights is None else torch.tensor([float(w) for w in c.cluster_weights])
        self.register_buffer("prior_log_weights", torch.log(weights / weights.sum()), persistent=False)
        self.register_buffer("tau_prior_std", torch.tensor(c.tau_prior_std()), persistent=False)
        self._init_likelihood()
        if c.mask_radius is not None:
            radius = pixel_grid(c.box).norm(dim=-1)
            del self.likelihood_mask
            self.register_buffer("likelihood_mask", (radius <= c.mask_radius).float(), persistent=False)

    @property
    def zdim(self) -> int:
        """Width of the readout latent ``[z_c, z]``: ``cluster_dim + zdim``."""
        return int(self.config.cluster_dim + self.config.zdim)

    # -- encoder -> posterior ------------------------------------------------
    def posterior(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Posterior parameters.

        Args:
            images: ``(B, 1, N, N)``.
        Returns:
            dict of ``log_w (B, K)`` (log mixture weights), ``c_mu, c_logstd
            (B, K, cluster_dim)``, ``z_mu, z_logstd (B, zdim)`` and ``tau_mu,
            tau_logstd (B, G)`` (Lie-algebra coefficients: radians, pixels, log scale).
        """
        c = self.config
        k, d = c.n_clusters, c.cluster_dim
        feats = self.encoder(images)
        batch = feats.shape[0]
        out = self.cluster_head(feats).float()  # posterior parameters in float32 (also under autocast)
        if c.posterior_weights == "learned":
            log_w, out = F.log_softmax(out[:, :k], dim=-1), out[:, k:]
        else:
            log_w = self.prior_log_weights.to(out.dtype).expand(batch, k)
        post = {"log_w": log_w, "c_mu": out[:, :k * d].reshape(batch, k, d),
                "c_logstd": out[:, k * d:].reshape(batch, k, d).clamp(LOGSTD_MIN, LOGSTD_MAX)}
        if self.z_head is not None:
            z = self.z_head(feats).float()
            post["z_mu"], post["z_logstd"] = z[:, :c.zdim], z[:, c.zdim:].clamp(LOGSTD_MIN, LOGSTD_MAX)
        else:
            post["z_mu"] = post["z_logstd"] = out.new_zeros(batch, 0)
        tau = self.tau_head(feats).float()
        post["tau_mu"], post["tau_logstd"] = tau[:, :self.n_tau], tau[:, self.n_tau:].clamp(LOGSTD_MIN, LOGSTD_MAX)
        return post

    def mixture_kl(self, post: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upper bound of KL(q(z_c) || p(z_c)) (paper eq. 13-14), per image.

        Returns:
            dict of ``components (B, K)`` = KL(q_k || p_k), ``weights (B,)`` =
            KL(w || pi) (0 with shared weights) and ``bound (B,)`` =
            ``weights + sum_k w_k components``.
        """
        comp = kl_diag_normal(post["c_mu"], post["c_logstd"], self.prior_mean,
                              self.prior_log_std.exp()[:, None]).sum(-1)
        w = post["log_w"].exp()
        if self.config.posterior_weights == "learned":
            weights = (w * (post["log_w"] - self.prior_log_weights)).sum(-1)
        else:
            weights = torch.zeros_like(comp[:, 0])
        return {"components": comp, "weights": weights, "bound": weights + (w * comp).sum(-1)}

    def kl_divergence(self, post: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-image KL terms ``(B,)``: ``kl_cluster`` (the mixture bound),
        ``kl_z`` (when ``zdim > 0``) and ``kl_tau``."""
        terms = {"kl_cluster": self.mixture_kl(post)["bound"]}
        if self.config.zdim > 0:
            terms["kl_z"] = kl_diag_normal(post["z_mu"], post["z_logstd"], 0.0, 1.0).sum(-1)
        terms["kl_tau"] = kl_diag_normal(post["tau_mu"], post["tau_logstd"], 0.0, self.tau_prior_std).sum(-1)
        return terms

    def latent_mean(self, post: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of ``[z_c, z]`` (``z_c``: mixture mean and std): ``(B, cluster_dim + zdim)`` each."""
        w = post["log_w"].exp()[..., None]
        c_mean = (w * post["c_mu"]).sum(1)
        second = (w * (post["c_logstd"].exp() ** 2 + post["c_mu"] ** 2)).sum(1)
        c_std = (second - c_mean ** 2).clamp_min(0.0).sqrt()
        return torch.cat([c_mean, post["z_mu"]], -1), torch.cat([c_std, post["z_logstd"].exp()], -1)

    def cluster_probabilities(self, post: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K)`` probability of each mixture component for each image.

        Learned weights: ``w(x)``. Shared weights (``w = pi`` carries no
        information): the prior's responsibilities at the posterior mean of
        ``z_c``, ``pi_k N(zbar_c; m_k, s_k^2 I)`` normalised.
        """
        if self.config.posterior_weights == "learned":
            return post["log_w"].exp()
        c_mean = self.latent_mean(post)[0][:, :self.config.cluster_dim]
        std = self.prior_log_std.exp()
        log_r = (self.prior_log_weights - self.config.cluster_dim * self.prior_log_std
                 - 0.5 * ((c_mean[:, None, :] - self.prior_mean) ** 2).sum(-1) / std ** 2)
        return torch.softmax(log_r, dim=-1)

    # -- decoder and spatial transformer ----------------------------------------
    def canonical_raw(self, latent: torch.Tensor) -> torch.Tensor:
        """Canonical image ``x~`` (logits or means) from ``[z_c, z]``: ``(..., d) -> (..., N, N)``."""
        out = self.decoder(latent)
        return out.reshape(out.shape[:-1] + (self.box, self.box))

    def _data_units(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw

    def canonical(self, latent: torch.Tensor) -> torch.Tensor:
        """Canonical image in data units (probabilities or means): ``(B, d) -> (B, N, N)``."""
        return self._data_units(self.canonical_raw(latent))

    def transform(self, canonical: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Spatial transformer: ``x^(p) = x~(A p + b)`` for ``matrix (B, 3, 3)`` in pixel coordinates."""
        return lie.spatial_transform(canonical.float(), matrix.float())

    def tau_matrix(self, tau: torch.Tensor) -> torch.Tensor:
        """``M = exp(sum_i tau_i G_i)``: ``(B, G) -> (B, 3, 3)``."""
        return lie.exp_map(tau.float(), self.config.group, self.config.scale)

    # -- training objective ------------------------------------------------------
    def sample_group_elements(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``g`` uniformly from the finite set: ``theta_g (B,)`` radians in
        multiples of ``2 pi / invariance_rotations``, ``t_g (B, 2)`` integer pixels."""
        c = self.config
        j = torch.randint(c.invariance_rotations, (batch,), device=device)
        theta = j.float() * (2 * math.pi / c.invariance_rotations)
        r = int(c.invariance_translation)
        shift = torch.randint(-r, r + 1, (batch, 2), device=device).float()
        return theta, shift

    def invariance_distance(self, images: torch.Tensor, theta_g: torch.Tensor, t_g: torch.Tensor,
                            post: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Paper eq. 8 for one ``g`` per image: ``(B,)`` squared distances between the
        latent means ``[zbar_c, mu_z]`` of ``x`` and of ``g x = warp_images(x, theta_g, t_g)``
        plus between their canonical images (data units, summed over pixels)."""
        if post is None:
            post = self.posterior(images)
        moved = warp_images(images, theta_g, t_g)
        latent_x, latent_g = self.latent_mean(post)[0], self.latent_mean(self.posterior(moved))[0]
        canon_x, canon_g = self.canonical(latent_x), self.canonical(latent_g)
        return ((latent_x - latent_g) ** 2).sum(-1) + ((canon_x - canon_g) ** 2).flatten(1).sum(-1)

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None) -> LossTerms:
        """Negative ELBO plus the weighted invariance term.

        Args:
            images: ``(B, 1, N, N)``.
            ctf: optional ``(B, N, N//2 + 1)`` CTF for the Gaussian likelihood.
        """
        c = self.config
        k = c.n_clusters
        post = self.posterior(images)
        kl = self.kl_divergence(post)
        batch = post["c_mu"].shape[0]
        c_sample = post["c_mu"] + post["c_logstd"].exp() * torch.randn_like(post["c_mu"])  # (B, K, d)
        z = post["z_mu"] + post["z_logstd"].exp() * torch.randn_like(post["z_mu"])
        tau = post["tau_mu"] + post["tau_logstd"].exp() * torch.randn_like(post["tau_mu"])
        latent = torch.cat([c_sample, z[:, None, :].expand(batch, k, z.shape[-1])], -1).reshape(batch * k, -1)
        raw = self.transform(self.canonical_raw(latent), self.tau_matrix(tau).repeat_interleave(k, 0))
        target = images[:, 0].repeat_interleave(k, 0)
        ctf_k = None if ctf is None else ctf.repeat_interleave(k, 0)
        log_lik = self.log_likelihood(target, raw, ctf_k).view(batch, k)
        expected = (post["log_w"].exp() * log_lik).sum(-1)
        elbo = expected - sum(kl.values())
        loss = -elbo.mean()
        terms = {"recon": -expected.mean().detach(), **{name: value.mean().detach() for name, value in kl.items()}}
        if c.invariance_weight > 0:
            theta_g, t_g = self.sample_group_elements(batch, images.device)
            invariance = self.invariance_distance(images, theta_g, t_g, post).mean()
            loss = loss + c.invariance_weight * invariance
            terms["invariance"] = invariance.detach()
        if self.log_sigma is not None:
            terms["sigma"] = self.log_sigma.exp().detach()
        return LossTerms(loss=loss, elbo=elbo.mean().detach(), terms=terms)

    # -- inference ------------------------------------------------------------------
    @torch.no_grad()
    def readout(self, images: torch.Tensor) -> Readout:
        """Pose from ``M = exp(mean tau)`` (``theta`` in (-pi, pi], ``t`` pixels),
        ``z_mean``/``z_std`` of ``[z_c, z]``.

        ``extra``: ``cluster`` (most probable component, 1-based, as float),
        ``cluster_probability`` (its probability, see :meth:`cluster_probabilities`)
        and, with ``scale``, ``scale`` (the factor ``s`` of ``f(s R x + t)``).
        """
        post = self.posterior(images)
        theta, t, scale = lie.matrix_to_pose(self.tau_matrix(post["tau_mu"]))
        z_mean, z_std = self.latent_mean(post)
        prob, index = self.cluster_probabilities(post).max(-1)
        extra = {"cluster": (index + 1).to(theta.dtype), "cluster_probability": prob}
        if self.config.scale:
            extra["scale"] = scale
        return Readout(theta=wrap_angle(theta), t=t, z_mean=z_mean, z_std=z_std, extra=extra)

    def decode(self, z: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Images ``(B, N, N)`` in data units from ``[z_c, z] (B, cluster_dim + zdim)``
        at the generator pose ``(theta rad, t px)`` (scale 1)."""
        matrix = lie.pose_matrix(theta.float(), t.float())
        return self._data_units(self.transform(self.canonical_raw(z), matrix))
