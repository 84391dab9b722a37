"""TARGET-VAE (Nasiri & Bepler): translation and rotation group-equivariant VAE.

Re-derived from the paper. The encoder is a P_r group convolution whose output
grid has one cell per (rotation channel r', translation t). For every cell it
predicts an attention logit, a Gaussian over a fine rotation offset and a
Gaussian over the semantic latent z. The approximate posterior is

    q(t, r' | y)          = softmax over all cells of the attention logits
    q(theta | t, r', y)   = N(mu_theta + 2 pi r'/r, sigma_theta^2)
    q(z | t, r', y)       = N(mu_z, sigma_z^2)

and the KL divergence to the prior splits exactly (paper eq. 3-5) into

    KL = KL(q(t, r') || p(t) p(r')) + sum_{t, r'} q(t, r') [KL_theta + KL_z]

with p(t) a Gaussian around the box centre, p(r') uniform (or induced by a
normal prior on theta), p(theta | r') = N(2 pi r'/r, (pi/r)^2) and p(z) = N(0, I).

Beyond the paper: an optional sub-pixel translation offset per cell (a Gaussian
like theta, expressed in the cell's rotated frame so that equivariance holds;
off by default since it made training depend on the seed, docs/models.md),
an optional CTF-aware Gaussian likelihood, and a circular likelihood mask.

Poses follow :mod:`particle_vae.conventions`: channel ``j`` stands for generator
angle ``2 pi j / r`` and a cell at pixel position ``c`` (object centre) gives
generator translation ``t = -R(theta) c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from particle_vae.conventions import grid_half_width, pixel_grid, rotation_matrix, wrap_angle
from particle_vae.engine.presets import resolve_kernel
from particle_vae.models.base import (
    GENERATOR_OPTIONS,
    LIKELIHOOD_MASK_OPTION,
    POSE_PRIOR_OPTIONS,
    LossTerms,
    ModelConfig,
    ModelOption,
    PoseVAE,
    Readout,
    concatenate_readouts,
)
from particle_vae.nn.cpu_threads import map_in_cpu_threads
from particle_vae.nn.equivariant import GroupConvEncoder
from particle_vae.nn.generator import SpatialGenerator
from particle_vae.nn.mlp import DEFAULT_LEAKY_RELU_SLOPE

LOGSTD_MIN, LOGSTD_MAX = -8.0, 4.0
SUBPIXEL_PRIOR_STD = 0.5  # pixels: the offset stays inside its cell
# encoder activations (cells x fields) per readout pass on the CPU, at least two images (measured on 2 cores)
READOUT_CHUNK_ACTIVATIONS = 1_600_000


@dataclass
class TargetVAEConfig(ModelConfig):
    """Settings that fully rebuild a TARGET-VAE (pixels, radians).

    Attributes:
        box: image size in pixels (input and generated).
        zdim: semantic latent size.
        likelihood: ``"bernoulli"`` (images in [0, 1]) or ``"gaussian"``.
        gaussian_sigma: fixed noise std for the Gaussian likelihood, or
            ``None`` to learn it.
        group_order: r of the rotation group C_r (paper: 4, 8 or 16).
        n_fields, kernel, padding: encoder's first layer (paper MNIST: 128, 28, 8).
        mixing: the encoder's 1x1 group convolutions, ``"full"`` (e2cnn's
            general regular-to-regular kernel) or ``"shared"`` (one channel
            mixing shared by all rotation channels, as the authors' encoder;
            ``r`` times cheaper). See :mod:`particle_vae.nn.equivariant`.
        encoder: ``"group"`` (P_r convolutions) or ``"plain"`` (ordinary
            convolutions, translation-only inference; ablation).
        rotation: ``"full"`` (rotation channel + continuous offset),
            ``"discrete"`` (channel only, no theta offsets; ablation) or
            ``"none"`` (group convolutions pooled over rotations; ablation).
        subpixel: infer a continuous translation offset inside each cell (default off).
        translation_prior_std: std of p(t) around the centre, pixels.
        theta_prior: ``"uniform"`` or ``"normal"`` (N(0, theta_prior_std^2)).
        gen_hidden, gen_layers, n_fourier, fourier_bandwidth: generator
            (bandwidth in cycles per pixel).
        gumbel_temperature: of the Gumbel-softmax over cells in training.
        mask_radius: evaluate the likelihood only inside this radius (pixels).
        seed: seed of the generator's fixed Fourier frequencies.
        leaky_relu_slope: negative slope of every LeakyReLU in the encoder and
            the generator (0.2; the authors' code uses PyTorch's default, 0.01,
            which gave a higher ELBO early in training on MNIST(U), see
            docs/benchmarks.md). Runs written before this field existed used 0.2.
    """

    group_order: int = 8
    n_fields: int = 128
    kernel: int = 28
    padding: int = 8
    mixing: str = "full"
    encoder: str = "group"
    rotation: str = "full"
    subpixel: bool = False
    translation_prior_std: float = 5.0
    theta_prior: str = "uniform"
    theta_prior_std: float = math.pi / 4
    gen_hidden: int = 512
    gen_layers: int = 2
    n_fourier: int = 256
    fourier_bandwidth: float = 0.1
    gumbel_temperature: float = 1.0
    mask_radius: float | None = None
    seed: int = 0
    leaky_relu_slope: float = DEFAULT_LEAKY_RELU_SLOPE

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for impossible settings."""
        super().validate()
        if self.mixing not in ("full", "shared"):
            raise ValueError(f"mixing must be 'full' or 'shared', not {self.mixing!r}")
        if self.encoder not in ("group", "plain"):
            raise ValueError(f"encoder must be 'group' or 'plain', not {self.encoder!r}")
        if self.rotation not in ("full", "discrete", "none"):
            raise ValueError(f"rotation must be 'full', 'discrete' or 'none', not {self.rotation!r}")
        if self.encoder == "plain" and self.rotation != "none":
            raise ValueError("the plain-convolution encoder infers translation only: use rotation='none'")
        if self.encoder == "group" and self.group_order < 2:
            raise ValueError("group_order must be at least 2 for the group-convolution encoder")
        if not (math.isfinite(self.leaky_relu_slope) and 0 <= self.leaky_relu_slope < 1):
            raise ValueError(f"the LeakyReLU slope must be in [0, 1), not {self.leaky_relu_slope}")
        if self.theta_prior not in ("uniform", "normal"):
            raise ValueError(f"theta_prior must be 'uniform' or 'normal', not {self.theta_prior!r}")
        if self.box + 2 * self.padding - self.kernel + 1 < 1:
            raise ValueError(
                f"the {self.box} px box is smaller than the encoder kernel ({self.kernel} px with padding {self.padding}); "
                "use a smaller --kernel or a larger box"
            )
        if self.zdim < 0:
            raise ValueError("zdim must be >= 0")


class TargetVAE(PoseVAE):
    """TARGET-VAE on ``(B, 1, N, N)`` images; see the module docstring."""

    name = "target-vae"
    config_class = TargetVAEConfig
    options = (
        *PoseVAE.options,
        ModelOption("--group", "group_order", "rotation group order r of P_r (4, 8, 16)", type=int),
        ModelOption("--fields", "n_fields", "encoder hidden fields", type=int),
        ModelOption("--kernel", "kernel", "encoder kernel, pixels", type=int, default=None,
                    none_text="about half the box, odd"),
        ModelOption("--padding", "padding", "encoder padding, pixels", type=int),
        ModelOption("--mixing", "mixing", "the encoder's 1x1 layers: shared across rotation channels (the authors') or full "
                    "e2cnn regular-to-regular kernels (8x the cost at P8)", choices=("full", "shared")),
        ModelOption("--encoder", "encoder", "group convolutions, or plain (ablation: translation-only inference with "
                    "ordinary convolutions; implies --rotation none)", choices=("group", "plain")),
        ModelOption("--rotation", "rotation", "ablations: discrete = no theta offsets; none = no rotation inference",
                    choices=("full", "discrete", "none")),
        ModelOption("--subpixel", "subpixel", "also infer a continuous translation offset inside each cell (beyond the "
                    "paper; off by default: with it, which seed trains well became a matter of luck, docs/models.md)",
                    flag_value=True),
        ModelOption("--no-subpixel", "subpixel", "no continuous translation offset inside a cell (the default)",
                    flag_value=False),
        *POSE_PRIOR_OPTIONS,
        *GENERATOR_OPTIONS,
        ModelOption("--leaky-relu-slope", "leaky_relu_slope", "negative slope of the LeakyReLUs of encoder and generator; "
                    "the authors' code uses 0.01", type=float),
        ModelOption("--gumbel-temperature", "gumbel_temperature", "temperature of the Gumbel-softmax sample of the pose cell",
                    type=float),
        LIKELIHOOD_MASK_OPTION,
    )

    @classmethod
    def complete_settings(cls, settings: dict, box: int) -> dict:
        """Adds ``box``; a kernel of ``None`` (or none given) becomes about half the box, odd, and the
        plain encoder infers no rotation unless ``rotation`` says otherwise."""
        settings = super().complete_settings(settings, box)
        settings["kernel"] = resolve_kernel(settings.get("kernel"), box)
        if settings.get("encoder") == "plain":
            settings.setdefault("rotation", "none")
        return settings

    def __init__(self, config: TargetVAEConfig):
        super().__init__(config)
        c = config
        self.infers_offset = c.rotation == "full"
        self.n_out = 1 + (2 if self.infers_offset else 0) + 2 * c.zdim + (4 if c.subpixel else 0)
        self.encoder = GroupConvEncoder(
            c.group_order if c.encoder == "group" else 1, self.n_out, n_fields=c.n_fields, kernel=c.kernel,
            padding=c.padding, plain=c.encoder == "plain", mixing=c.mixing, leaky_relu_slope=c.leaky_relu_slope,
        )
        # rotation="none" with group convolutions: pool the rotation channels (ablation)
        self.pool_rotations = c.encoder == "group" and c.rotation == "none"
        self.generator = SpatialGenerator(c.box, c.zdim, hidden=c.gen_hidden, n_layers=c.gen_layers,
                                          n_features=c.n_fourier, bandwidth=c.fourier_bandwidth, seed=c.seed,
                                          leaky_relu_slope=c.leaky_relu_slope)
        self._init_likelihood()
        self._register_cells()
        if c.mask_radius is not None:
            radius = pixel_grid(c.box).norm(dim=-1)
            del self.likelihood_mask
            self.register_buffer("likelihood_mask", (radius <= c.mask_radius).float(), persistent=False)

    # -- cells and priors ---------------------------------------------------
    def _register_cells(self) -> None:
        c = self.config
        size = self.encoder.output_size(c.box)
        rotations = 1 if self.pool_rotations else self.encoder.rotations
        self.grid_size, self.rotations = size, rotations
        axis = torch.arange(size, dtype=torch.float32) + self.encoder.cell_offset(c.box)
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        positions = torch.stack([x, y], -1).reshape(-1, 2)  # (M*M, 2) pixels
        offsets = torch.arange(rotations, dtype=torch.float32) * (2 * math.pi / rotations) if rotations > 1 else torch.zeros(1)
        # flattened cell order is (rotation, row, col)
        self.register_buffer("cell_position", positions.repeat(rotations, 1), persistent=False)  # (K, 2)
        self.register_buffer("cell_angle", offsets.repeat_interleave(size * size), persistent=False)  # (K,)
        log_p_t = torch.log_softmax(-(positions ** 2).sum(-1) / (2 * c.translation_prior_std ** 2), dim=0)
        if c.theta_prior == "normal" and rotations > 1:
            wrapped = torch.remainder(offsets + math.pi, 2 * math.pi) - math.pi
            log_p_r = torch.log_softmax(-wrapped ** 2 / (2 * c.theta_prior_std ** 2), dim=0)
        else:
            log_p_r = torch.full((rotations,), -math.log(rotations))
        self.register_buffer("log_prior", (log_p_r[:, None] + log_p_t[None, :]).reshape(-1), persistent=False)
        self.theta_prior_std_per_cell = math.pi / rotations

    # -- encoder -> posterior ---------------------------------------------
    def posterior(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-cell posterior parameters.

        Args:
            images: ``(B, 1, N, N)``.
        Returns:
            dict of ``log_q (B, K)`` (normalised over all K cells), and per cell
            ``theta_mu, theta_logstd (B, K)``, ``z_mu, z_logstd (B, K, k)``,
            ``delta_mu, delta_logstd (B, K, 2)`` (pixels, cell frame) when
            enabled.
        """
        out = self.encoder(images)  # (B, C, R, M, M)
        if self.pool_rotations:
            out = self._pool_rotations(out)
        out = out.flatten(2)  # (B, C, K)
        batch = out.shape[0]
        # in float32 even under bf16 autocast: bf16 log-probabilities near -7 step by 2^-5 and would tie
        post = {"log_q": torch.log_softmax(out[:, 0].float(), dim=-1)}
        ch = 1
        if self.infers_offset:
            post["theta_mu"] = out[:, ch]
            post["theta_logstd"] = out[:, ch + 1].clamp(LOGSTD_MIN, LOGSTD_MAX)
            ch += 2
        k = self.zdim
        post["z_mu"] = out[:, ch:ch + k].transpose(1, 2)
        post["z_logstd"] = out[:, ch + k:ch + 2 * k].transpose(1, 2).clamp(LOGSTD_MIN, LOGSTD_MAX)
        ch += 2 * k
        if self.config.subpixel:
            post["delta_mu"] = out[:, ch:ch + 2].transpose(1, 2)
            post["delta_logstd"] = out[:, ch + 2:ch + 4].transpose(1, 2).clamp(LOGSTD_MIN, LOGSTD_MAX)
        assert post["log_q"].shape == (batch, self.cell_angle.shape[0])
        return post

    def _pool_rotations(self, out: torch.Tensor) -> torch.Tensor:
        """Average over rotation channels, first turning each channel's sub-pixel
        offset (a vector in that channel's frame) into the common frame."""
        if self.config.subpixel:
            ch = out.shape[1] - 4
            angles = torch.arange(out.shape[2], device=out.device, dtype=out.dtype) * (2 * math.pi / out.shape[2])
            rot_t = rotation_matrix(angles).to(out).transpose(-1, -2)  # R(angle)^T, (R, 2, 2)
            delta = torch.einsum("rij,bjrhw->birhw", rot_t, out[:, ch:ch + 2])
            out = torch.cat([out[:, :ch], delta, out[:, ch + 2:]], dim=1)
        return out.mean(dim=2, keepdim=True)

    def kl_divergence(self, post: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """KL terms per image, each ``(B,)``: ``kl_pose`` (over cells), ``kl_theta``,
        ``kl_z`` and ``kl_offset`` (expectations over q(t, r') of per-cell KLs)."""
        log_q = post["log_q"]
        q = log_q.exp()  # underflowed cells give q = 0 and finite log q: no NaN

        def expect(per_cell: torch.Tensor) -> torch.Tensor:
            # cells with q = 0 contribute nothing, even if their KL overflowed to inf
            return torch.where(q > 0, q * per_cell, torch.zeros_like(per_cell)).sum(-1)

        terms = {"kl_pose": expect(log_q - self.log_prior)}
        if self.infers_offset:
            terms["kl_theta"] = expect(_kl_normal(post["theta_mu"], post["theta_logstd"], self.theta_prior_std_per_cell))
        if self.zdim > 0:
            terms["kl_z"] = expect(_kl_normal(post["z_mu"], post["z_logstd"], 1.0).sum(-1))
        if self.config.subpixel:
            terms["kl_offset"] = expect(_kl_normal(post["delta_mu"], post["delta_logstd"], SUBPIXEL_PRIOR_STD).sum(-1))
        return terms

    # -- pose of a chosen cell ---------------------------------------------
    def _cell_pose(self, angle: torch.Tensor, position: torch.Tensor, theta_offset, delta) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator pose (theta rad, t px) of objects centred at ``position`` + offset, in float32
        even under autocast (a bf16 pose would be off by up to a tenth of a pixel)."""
        with torch.autocast(angle.device.type, enabled=False):
            angle, position = angle.float(), position.float()
            theta = angle if theta_offset is None else angle + theta_offset.float()
            if delta is not None:
                # the offset is predicted in the rotated frame of its channel
                position = position + torch.einsum("bji,bj->bi", rotation_matrix(angle).to(position), delta.float())
            t = -torch.einsum("bij,bj->bi", rotation_matrix(theta).to(position), position)
        return theta, t

    # -- training objective --------------------------------------------------
    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None) -> LossTerms:
        """Negative ELBO with one Gumbel-softmax (straight-through) sample of the cell.

        Args:
            images: ``(B, 1, N, N)``.
            ctf: optional ``(B, N, N//2 + 1)`` CTF in ``torch.fft.rfft2`` layout
                (:func:`particle_vae.data.ctf.ctf_from_table`); with the Gaussian
                likelihood the generated image is filtered by it before comparison.
        """
        post = self.posterior(images)
        kl = self.kl_divergence(post)
        log_q = post["log_q"]
        uniform = torch.rand_like(log_q).clamp(1e-20, 1.0 - 1e-7)
        gumbel = -torch.log((-torch.log(uniform)).clamp_min(1e-20))
        soft = torch.softmax((log_q + gumbel) / self.config.gumbel_temperature, dim=-1)
        index = soft.argmax(-1)
        straight = soft - soft.detach()  # zero in value, carries the gradient to the logits

        def pick(values: torch.Tensor) -> torch.Tensor:
            """Straight-through selection of per-cell values ``(B, K, C)`` or ``(K, C)``."""
            if values.dim() == 2:
                values = values.unsqueeze(0).expand(log_q.shape[0], -1, -1)
            chosen = values.gather(1, index[:, None, None].expand(-1, 1, values.shape[-1]))[:, 0]
            return chosen + torch.einsum("bk,bkc->bc", straight, values)

        angle = pick(self.cell_angle[:, None])[:, 0]
        position = pick(self.cell_position)
        theta_offset = delta = None
        if self.infers_offset:
            mu, logstd = pick(torch.stack([post["theta_mu"], post["theta_logstd"]], -1)).unbind(-1)
            theta_offset = mu + logstd.exp() * torch.randn_like(mu)
        if self.config.subpixel:
            mu = pick(post["delta_mu"])
            delta = mu + pick(post["delta_logstd"]).exp() * torch.randn_like(mu)
        z = None
        if self.zdim > 0:
            mu = pick(post["z_mu"])
            z = mu + pick(post["z_logstd"]).exp() * torch.randn_like(mu)
        theta, t = self._cell_pose(angle, position, theta_offset, delta)
        raw = self.generator(z, theta, t / grid_half_width(self.box))
        log_lik = self.log_likelihood(images[:, 0], raw, ctf)
        kl_total = sum(kl.values())
        elbo = log_lik - kl_total
        terms = {"recon": -log_lik.mean().detach(), **{name: value.mean().detach() for name, value in kl.items()}}
        if self.log_sigma is not None:
            terms["sigma"] = self.log_sigma.exp().detach()
        return LossTerms(loss=-elbo.mean(), elbo=elbo.mean().detach(), terms=terms)

    # -- inference -----------------------------------------------------------
    @torch.no_grad()
    def readout(self, images: torch.Tensor) -> Readout:
        """MAP cell pose, latent mean/std there, and pose confidence.

        ``extra`` holds ``pose_confidence`` (max q(t, r')) and
        ``rotation_entropy`` (entropy of q(r') in nats).

        On the CPU the batch is read out a few images at a time
        (:meth:`readout_chunk`), one chunk per thread: the encoder's
        activations (about 12,000 cells x 128 fields per image at the paper's
        MNIST setting) then stay in the caches, and the threads work side by
        side instead of splitting every product (faster on two cores in our
        measurements). On GPUs the batch goes whole.
        """
        chunk = self.readout_chunk()
        if images.device.type == "cpu" and images.shape[0] > chunk:
            return concatenate_readouts(map_in_cpu_threads(self._readout_batch, images.split(chunk)))
        return self._readout_batch(images)

    def readout_chunk(self) -> int:
        """Images per readout pass on the CPU: about 1.6 million encoder activations (small
        models take larger chunks, or the per-pass overhead dominates), at least two images
        (the paper's MNIST model: 12,168 cells x 128 fields per image)."""
        activations = self.cell_angle.shape[0] * self.config.n_fields
        return max(2, READOUT_CHUNK_ACTIVATIONS // activations)

    def _readout_batch(self, images: torch.Tensor) -> Readout:
        post = self.posterior(images)
        log_q = post["log_q"]
        index = log_q.argmax(-1)
        batch = torch.arange(log_q.shape[0], device=log_q.device)
        angle = self.cell_angle[index]
        position = self.cell_position[index]
        theta_offset = post["theta_mu"][batch, index] if self.infers_offset else None
        delta = post["delta_mu"][batch, index] if self.config.subpixel else None
        theta, t = self._cell_pose(angle, position, theta_offset, delta)
        theta = wrap_angle(theta)
        if self.zdim > 0:
            z_mean, z_std = post["z_mu"][batch, index], post["z_logstd"][batch, index].exp()
        else:
            z_mean = z_std = torch.zeros(log_q.shape[0], 0, device=log_q.device)
        q_rotation = log_q.exp().view(log_q.shape[0], self.rotations, -1).sum(-1)
        entropy = (-(q_rotation * torch.log(q_rotation.clamp_min(1e-30))).sum(-1)).clamp_min(0.0)
        extra = {"pose_confidence": log_q.max(-1).values.exp(), "rotation_entropy": entropy}
        return Readout(theta=theta, t=t, z_mean=z_mean, z_std=z_std, extra=extra)

    def decode(self, z: torch.Tensor | None, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Images ``(B, N, N)`` in data units (probabilities or means) at pose ``(theta rad, t px)``."""
        raw = self.generator(z if self.zdim > 0 else None, theta, t / grid_half_width(self.box))
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw


def _kl_normal(mu: torch.Tensor, logstd: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(mu, exp(logstd)^2) || N(0, prior_std^2)), elementwise."""
    var_ratio = torch.exp(2 * logstd) / prior_std ** 2
    return 0.5 * (var_ratio + mu ** 2 / prior_std ** 2 - 1.0 - torch.log(var_ratio))
