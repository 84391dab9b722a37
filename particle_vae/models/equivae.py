"""EquiVAE: invariant-equivariant representation learning for multi-class data
(Feige, ICML 2019).

Re-derived from the paper. Each image ``x`` is described by two latents:

* an **invariant** representation of its class, built from a deterministic
  embedding network ``e(x)`` (``embed_dim`` numbers). For a labelled image of
  class ``y`` the class representation ``r_y`` is the mean of ``e`` over
  ``m`` *other* images of class ``y`` (``m`` drawn uniformly in
  ``1..m_max``), so ``r_y`` cannot carry anything specific to ``x``;
* an **equivariant** stochastic latent ``v`` (``zdim`` numbers) with
  ``q(v | r_y, x) = N(mu, sigma^2)`` and prior ``p(v) = N(0, I)``, which has
  to describe everything that varies inside the class (pose, conformation).

The decoder ``p(x | r_y, v)`` is an MLP (Bernoulli or Gaussian likelihood via
:meth:`PoseVAE.log_likelihood`). With a uniform class prior ``p(y) = 1/K``:

Labelled ``(x, y)`` (paper eq. 4, plus ``log p(y)``):

    L(x, y) = E_q(v | r_y, x)[log p(x | r_y, v)] - KL(q(v | r_y, x) || p(v)) - log K

Unlabelled ``x`` (eq. 5-7), the expectation over ``y`` computed exactly by
summing over all ``K`` classes (one reparameterised ``v`` sample per class):

    U(x) = sum_y q(y | x) L(x, y) + H(q(y | x))

The classifier is the paper's nearest-class-mean rule made soft:
``q(y | x) = softmax_y(-||e(x) - c_y||^2)`` with ``c_y`` the class-mean bank
below, so the invariant embedding itself is the classifier and no extra head
is needed. Training minimises ``-(L + alpha log q(y | x))`` on labelled and
``-U`` on unlabelled images (averaged over the batch); the reported ``elbo``
is the mean of ``L`` / ``U`` (a bound on ``log p(x, y)`` resp. ``log p(x)``).

**Class-mean bank.** A persistent buffer ``class_means`` ``(K, embed_dim)``
(saved with the weights) holds a running mean embedding per class. It starts
at seeded N(0, I) vectors; in training mode each batch moves the entry of
every labelled class present towards the batch mean of that class's
embeddings by an exponential moving average (``bank_momentum``; the first
update of a class copies the batch mean). With ``bank_from_unlabelled`` the
unlabelled images also update it, weighted by ``q(y | x)`` (classes with at
least one image's worth of responsibility). The bank (detached, no gradient)
serves as: ``r_y`` of a labelled image whose class has no other member in the
batch; ``r_y`` for every class of an unlabelled image; the centres of
``q(y | x)``; and the readout's class prediction.

Labels are 0-based class indices in ``0..n_classes-1``; ``-1`` marks an
unlabelled image and ``labels=None`` means the whole batch is unlabelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from particle_vae.models.base import LossTerms, ModelConfig, ModelOption, PoseVAE, Readout
from particle_vae.nn.mlp import mlp

LOGSTD_MIN, LOGSTD_MAX = -8.0, 4.0


@dataclass
class EquiVAEConfig(ModelConfig):
    """Settings that rebuild an EquiVAE.

    Attributes:
        box: image size in pixels.
        n_classes: number of classes ``K``.
        embed_dim: size of the invariant embedding ``e(x)`` / class representation ``r_y``.
        zdim: size of the equivariant latent ``v``.
        hidden, layers: width and hidden layers of each MLP (embedding,
            ``q(v | r, x)`` encoder, decoder).
        m_max: largest number of other same-class images averaged into ``r_y``.
        alpha: weight of ``log q(y | x)`` on labelled images.
        bank_momentum: EMA momentum of the class-mean bank (0: replace by the batch mean).
        bank_from_unlabelled: also update the bank from unlabelled images, weighted by ``q(y | x)``.
        likelihood: ``"bernoulli"`` or ``"gaussian"``; gaussian_sigma: fixed
            std or ``None`` to learn it.
        seed: seed of the initial class-mean bank.
    """

    n_classes: int = 10
    embed_dim: int = 16
    hidden: int = 512
    layers: int = 2
    m_max: int = 5
    alpha: float = 10.0
    bank_momentum: float = 0.9
    bank_from_unlabelled: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for impossible settings."""
        super().validate()
        if self.box < 1:
            raise ValueError("box must be positive")
        if self.n_classes < 2:
            raise ValueError("n_classes must be at least 2")
        if self.embed_dim < 1:
            raise ValueError("embed_dim must be positive")
        if self.zdim < 1:
            raise ValueError("zdim must be positive")
        if self.hidden < 1 or self.layers < 1:
            raise ValueError("hidden and layers must be positive")
        if self.m_max < 1:
            raise ValueError("m_max must be at least 1")
        if not self.alpha >= 0:
            raise ValueError("alpha must be non-negative")
        if not 0 <= self.bank_momentum < 1:
            raise ValueError("bank_momentum must be in [0, 1)")


def gaussian_kl(mu: torch.Tensor, logstd: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logstd)^2) || N(0, I))`` summed over the last dimension."""
    return 0.5 * (mu ** 2 + torch.exp(2 * logstd) - 1.0 - 2 * logstd).sum(-1)


def class_probabilities(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``q(y | x) = softmax_y(-||e - c_y||^2)``: ``(B, D), (K, D) -> (B, K)``."""
    return log_class_probabilities(embeddings, centres).exp()


def log_class_probabilities(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``log q(y | x)``, ``(B, K)``."""
    sq = ((embeddings[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return F.log_softmax(-sq, dim=-1)


def other_member_means(embeddings: torch.Tensor, labels: torch.Tensor, m_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class representations from *other* same-class images of the batch.

    For every labelled image ``i`` (``labels[i] >= 0``) draw ``m`` uniformly in
    ``1..min(m_max, n_i)`` (``n_i``: other images of the same class in the
    batch, image ``i`` itself excluded), choose ``m`` of them at random and
    average their embeddings.

    Returns:
        ``r (B, D)`` (zeros where there is no other member) and ``found (B,)``
        bool, true where image ``i`` had at least one other labelled member.
    """
    batch = embeddings.shape[0]
    device = embeddings.device
    labelled = labels >= 0
    eligible = (labels[:, None] == labels[None, :]) & labelled[:, None] & labelled[None, :]
    eligible &= ~torch.eye(batch, dtype=torch.bool, device=device)
    n_other = eligible.sum(1)
    found = n_other > 0
    # random order of the eligible members in each row; ineligible ones last
    scores = torch.rand(batch, batch, device=device)
    scores = scores.masked_fill(~eligible, -1.0)
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
    limit = n_other.clamp(max=m_max).clamp(min=1)
    draw = torch.rand(batch, device=device)
    m = (draw * limit).floor().long().clamp(max=limit - 1) + 1
    chosen = (eligible & (rank < m[:, None])).to(embeddings.dtype)
    r = chosen @ embeddings / chosen.sum(1, keepdim=True).clamp(min=1.0)
    return r, found


class EquiVAE(PoseVAE):
    """EquiVAE on ``(B, 1, N, N)`` images with optional class labels."""

    name = "equivae"
    preset_fields = {"hidden": "gen_hidden", "layers": "gen_layers"}
    config_class = EquiVAEConfig
    has_pose = False
    supports_labels = True
    options = (
        ModelOption("--zdim", "zdim", "dimensions of the equivariant latent v (the readout latent is [r, v])", type=int),
        *PoseVAE.options[1:],
        ModelOption("--embed-dim", "embed_dim", "size of the invariant class embedding", type=int,
                    old_flags=("--cluster-dim",)),
        ModelOption("--hidden", "hidden", "width of the embedding, encoder and decoder MLPs", type=int,
                    old_flags=("--gen-hidden",)),
        ModelOption("--layers", "layers", "hidden layers of each MLP", type=int, old_flags=("--gen-layers",)),
    )

    def __init__(self, config: EquiVAEConfig):
        super().__init__(config)
        pixels = config.box * config.box
        self.embedder = mlp(pixels, config.hidden, config.layers, config.embed_dim)
        self.encoder = mlp(pixels + config.embed_dim, config.hidden, config.layers, 2 * config.zdim)
        self.decoder = mlp(config.embed_dim + config.zdim, config.hidden, config.layers, pixels)
        init = torch.randn(config.n_classes, config.embed_dim, generator=torch.Generator().manual_seed(int(config.seed)))
        self.register_buffer("class_means", init)
        self.register_buffer("class_seen", torch.zeros(config.n_classes))
        self._init_likelihood()

    @property
    def zdim(self) -> int:
        """Width of the readout / decode latent ``[r, v]``: ``embed_dim + zdim``."""
        return int(self.config.embed_dim + self.config.zdim)

    @property
    def n_classes(self) -> int:
        return int(self.config.n_classes)

    # -- networks ---------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Invariant embedding ``e(x)``: ``(B, 1, N, N) -> (B, embed_dim)``."""
        return self.embedder(images.flatten(1))

    def encode_v(self, images: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(v | r, x)``: mean and log-std ``(B, zdim)``."""
        mu, logstd = self.encoder(torch.cat([images.flatten(1), r], dim=-1)).chunk(2, dim=-1)
        return mu, logstd.clamp(LOGSTD_MIN, LOGSTD_MAX)

    def _raw(self, r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([r, v], dim=-1)).view(-1, self.box, self.box)

    def conditional_elbo(self, images: torch.Tensor, r: torch.Tensor, ctf: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One-sample ``log p(x | r, v) - KL(q(v | r, x) || p(v))`` (no ``log p(y)``).

        Returns ``(elbo, log_lik, kl)``, each ``(B,)``.
        """
        mu, logstd = self.encode_v(images, r)
        v = mu + logstd.exp() * torch.randn_like(mu)
        log_lik = self.log_likelihood(images[:, 0], self._raw(r, v), ctf)
        kl = gaussian_kl(mu, logstd)
        return log_lik - kl, log_lik, kl

    def unlabelled_elbo(self, images: torch.Tensor, log_q: torch.Tensor, centres: torch.Tensor,
                        ctf: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Exact expectation over classes: ``sum_y q(y|x) [L(x, y)] + H(q(y|x))``.

        Args:
            images: ``(B, 1, N, N)``; log_q: ``(B, K)`` ``log q(y | x)``;
            centres: ``(K, D)`` class representations ``r_y``.
        Returns:
            ``elbo``, ``log_lik``, ``kl`` (q-weighted), ``entropy``, all ``(B,)``.
        """
        batch, k = log_q.shape
        rep = images.repeat_interleave(k, dim=0)  # image i, class y at row i * K + y
        r = centres.repeat(batch, 1)
        rep_ctf = None if ctf is None else ctf.repeat_interleave(k, dim=0)
        cond, log_lik, kl = (x.view(batch, k) for x in self.conditional_elbo(rep, r, rep_ctf))
        q = log_q.exp()
        entropy = -(q * log_q).sum(-1)
        log_prior = -math.log(k)
        return {"elbo": (q * cond).sum(-1) + log_prior + entropy, "log_lik": (q * log_lik).sum(-1),
                "kl": (q * kl).sum(-1), "entropy": entropy}

    # -- class-mean bank ----------------------------------------------------------

    @torch.no_grad()
    def update_bank(self, embeddings: torch.Tensor, labels: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """EMA update of :attr:`class_means` from labelled embeddings (and, with
        ``bank_from_unlabelled``, ``q``-weighted unlabelled ones)."""
        e = embeddings.detach().to(self.class_means.dtype)
        momentum = float(self.config.bank_momentum)
        labelled = labels >= 0
        if labelled.any():
            onehot = F.one_hot(labels[labelled], self.n_classes).to(e.dtype)  # (L, K)
            counts = onehot.sum(0)
            means = onehot.T @ e[labelled] / counts.clamp(min=1.0)[:, None]
            self._ema(means, counts > 0, momentum)
        if self.config.bank_from_unlabelled and q is not None and (~labelled).any():
            weights = q.detach()[~labelled].to(e.dtype)
            mass = weights.sum(0)
            means = weights.T @ e[~labelled] / mass.clamp(min=1e-12)[:, None]
            self._ema(means, mass >= 1.0, momentum)

    def _ema(self, means: torch.Tensor, present: torch.Tensor, momentum: float) -> None:
        first = present & (self.class_seen == 0)
        later = present & (self.class_seen > 0)
        self.class_means[first] = means[first]
        self.class_means[later] = momentum * self.class_means[later] + (1 - momentum) * means[later]
        self.class_seen[present] += 1

    def class_representations(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``r_y`` of each labelled image: the mean of 1..m_max other same-class
        images of the batch, or the (detached) bank entry when there is none.
        Rows of unlabelled images are the bank entry of class 0 (unused)."""
        r, found = other_member_means(embeddings, labels, int(self.config.m_max))
        bank = self.class_means.detach()[labels.clamp(min=0)].to(embeddings.dtype)
        return torch.where(found[:, None], r, bank)

    # -- PoseVAE interface ------------------------------------------------------------

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> LossTerms:
        """Negative semi-supervised objective; see the module docstring."""
        batch = images.shape[0]
        if labels is None:
            labels = torch.full((batch,), -1, dtype=torch.long, device=images.device)
        labels = labels.to(images.device).long().view(-1)
        if labels.shape[0] != batch:
            raise ValueError(f"labels has {labels.shape[0]} entries for {batch} images")
        if (labels < -1).any() or (labels >= self.n_classes).any():
            raise ValueError(f"labels must be -1 (unlabelled) or class indices 0..{self.n_classes - 1}")
        labelled = labels >= 0
        class_nll = correct = torch.zeros((), device=images.device)
        e = self.embed(images)
        centres = self.class_means.detach().to(e.dtype)
        log_q = log_class_probabilities(e, centres)
        log_prior = -math.log(self.n_classes)

        # per-image values in float32 (the pieces may be bf16 under autocast)
        elbo, objective, log_lik, kl = (torch.zeros(batch, device=images.device) for _ in range(4))

        def put(target: torch.Tensor, idx: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            return target.index_put((idx,), value.to(target.dtype))

        terms: dict[str, torch.Tensor] = {}
        if labelled.any():
            idx = labelled.nonzero().squeeze(1)
            r = self.class_representations(e, labels)[idx]
            sub_ctf = None if ctf is None else ctf[idx]
            cond, ll, kk = self.conditional_elbo(images[idx], r, sub_ctf)
            log_q_y = log_q[idx, labels[idx]]
            elbo = put(elbo, idx, cond + log_prior)
            objective = put(objective, idx, cond + log_prior + self.config.alpha * log_q_y)
            log_lik = put(log_lik, idx, ll)
            kl = put(kl, idx, kk)
            class_nll = -log_q_y.detach().float().sum() / batch
            correct = (log_q[idx].argmax(-1) == labels[idx]).float().sum() / batch
        if (~labelled).any():
            idx = (~labelled).nonzero().squeeze(1)
            sub_ctf = None if ctf is None else ctf[idx]
            out = self.unlabelled_elbo(images[idx], log_q[idx], centres, sub_ctf)
            elbo = put(elbo, idx, out["elbo"])
            objective = put(objective, idx, out["elbo"])
            log_lik = put(log_lik, idx, out["log_lik"])
            kl = put(kl, idx, out["kl"])
        if self.training:
            self.update_bank(e, labels, log_q.exp())
        # class_nll and correct are sums over the labelled images divided by the
        # batch size, so their epoch means divided by labelled_fraction's are the
        # labelled images' mean -log q(y|x) and accuracy
        entropy = -(log_q.exp() * log_q).sum(-1).mean()
        terms.update(recon=-log_lik.mean().detach(), kl_v=kl.mean().detach(), class_nll=class_nll, correct=correct,
                     labelled_fraction=labelled.float().mean(), class_entropy=entropy.detach().float())
        if self.log_sigma is not None:
            terms["sigma"] = self.log_sigma.exp().detach()
        return LossTerms(loss=-objective.mean(), elbo=elbo.mean().detach(), terms=terms)

    @torch.no_grad()
    def readout(self, images: torch.Tensor) -> Readout:
        """``z_mean = [e(x), mean of q(v | e(x), x)]``, ``z_std = [0, std of v]``;
        ``predicted_class`` (1-based, nearest class mean) and its ``class_probability``."""
        e = self.embed(images)
        mu, logstd = self.encode_v(images, e)
        probs = class_probabilities(e, self.class_means.to(e.dtype))
        prob, index = probs.max(-1)
        batch = images.shape[0]
        zeros = torch.zeros(batch, device=images.device)
        return Readout(theta=zeros, t=torch.zeros(batch, 2, device=images.device),
                       z_mean=torch.cat([e, mu], dim=-1),
                       z_std=torch.cat([torch.zeros_like(e), logstd.exp()], dim=-1),
                       extra={"predicted_class": (index + 1).float(), "class_probability": prob.float()})

    def decode(self, z: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Images ``(B, N, N)`` from ``z = [r, v]`` (``embed_dim + zdim``); the pose is ignored."""
        raw = self._raw(z[:, : self.config.embed_dim], z[:, self.config.embed_dim:])
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw
