"""Tests for MCE-VAE and its Lie-algebra helpers: the exponential map and pose
extraction, the spatial transformer's pose convention, the KL terms and the
mixture KL bound, the invariance term, readout, checkpoint round trips,
invalid settings, a short optimisation and the train -> infer command line.

Models are tiny (boxes of 16-20 px, narrow networks) so that the file runs in
seconds on a CPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal, kl_divergence

from particle_vae import cli
from particle_vae import conventions as cv
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import ParticleStar
from particle_vae.models import MCEVAE, MODELS, MCEVAEConfig, build_model
from particle_vae.models.base import learnable_state, load_learnable_state
from particle_vae.models.mce_vae import TAU_INIT_LOGSTD
from particle_vae.nn import lie

BOX = 16
SMALL = {"box": BOX, "zdim": 2, "n_clusters": 3, "cluster_dim": 2, "aug_dim": 32, "enc_channels": 4, "enc_hidden": 32,
         "dec_hidden": 32, "invariance_translation": 1}


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0, **overrides) -> MCEVAE:
    torch.manual_seed(seed)
    return MCEVAE(MCEVAEConfig(**{**SMALL, **overrides}))


def shape_images(n: int = 16, box: int = BOX, kind: str = "bar", seed: int | None = None) -> torch.Tensor:
    """Soft shapes (``bar`` or an asymmetric ``ell``) rotated by evenly spaced (or,
    with a seed, random) angles; values in [0, 1]: ``(n, 1, box, box)``."""
    grid = cv.pixel_grid(box)
    x, y = grid[..., 0], grid[..., 1]
    if seed is None:
        angles = torch.arange(n) * (2 * math.pi / n)
    else:
        angles = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    images = []
    for angle in angles.tolist():
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * x + s * y, -s * x + c * y
        if kind == "bar":
            img = torch.exp(-0.5 * ((u / 4.0) ** 2 + (v / 1.2) ** 2))
        else:  # an L: a long arm along u and a short one along v
            arm1 = torch.exp(-0.5 * (((u - 1.0) / 3.0) ** 2 + ((v + 2.0) / 1.0) ** 2))
            arm2 = torch.exp(-0.5 * (((u + 2.0) / 1.0) ** 2 + ((v - 0.5) / 2.5) ** 2))
            img = torch.maximum(arm1, arm2)
        images.append(img)
    return torch.stack(images)[:, None]


def set_head(head: torch.nn.Sequential, bias) -> None:
    """Make a head's output constant: zero last-layer weights, the given bias."""
    last = head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def set_canonical(model: MCEVAE, image: torch.Tensor) -> None:
    """Make the decoder output ``image`` (raw units) for every latent."""
    set_head(model.decoder, image.reshape(-1))


def smooth_image(box: int, seed: int = 0) -> torch.Tensor:
    """A smooth asymmetric test image (sum of Gaussian blobs) with zero border: ``(box, box)``."""
    gen = torch.Generator().manual_seed(seed)
    grid = cv.pixel_grid(box)
    out = torch.zeros(box, box)
    for _ in range(4):
        centre = (torch.rand(2, generator=gen) - 0.5) * box * 0.4
        width = 1.5 + 2 * torch.rand((), generator=gen)
        out += torch.exp(-0.5 * ((grid - centre) ** 2).sum(-1) / width ** 2)
    return out


# ---------------------------------------------------------------------------
# Lie algebra
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("group, scale", [("so2", False), ("so2", True), ("se2", False), ("se2", True)])
def test_exp_map_matches_matrix_exponential_and_is_identity_at_zero(group, scale):
    n = lie.n_generators(group, scale)
    assert lie.generators(group, scale).shape == (n, 3, 3)
    tau = torch.randn(32, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2.0
    tau[0] = 0.0
    tau[1] = 1e-5  # inside the series branch
    tau[2] = 0.05
    torch.testing.assert_close(lie.exp_map(tau, group, scale), lie.exp_map_matrix(tau, group, scale), atol=1e-10, rtol=1e-10)
    identity = lie.exp_map(torch.zeros(3, n), group, scale)
    torch.testing.assert_close(identity, torch.eye(3).expand(3, 3, 3))
    # finite gradients at and near the identity
    tau_grad = torch.zeros(2, n, requires_grad=True)
    lie.exp_map(tau_grad, group, scale).sum().backward()
    assert torch.isfinite(tau_grad.grad).all()


def test_exp_map_closed_forms():
    theta = torch.tensor([0.0, 0.4, -2.5, 3.1])
    rot = lie.exp_map(theta[:, None], "so2")
    torch.testing.assert_close(rot[:, :2, :2], cv.rotation_matrix(theta))
    assert (rot[:, :2, 2] == 0).all()
    # SE(2) with zero rotation: the translation coefficients are the translation in pixels
    shift = torch.tensor([[1.5, -2.0], [0.0, 3.0], [-4.0, 0.25], [0.0, 0.0]])
    m = lie.exp_map(torch.cat([torch.zeros(4, 1), shift], -1), "se2")
    torch.testing.assert_close(m[:, :2, :2], torch.eye(2).expand(4, 2, 2))
    torch.testing.assert_close(m[:, :2, 2], shift)
    # with rotation: t = V(theta) tau_xy, V = sin/theta I + (1 - cos)/theta J
    th = torch.tensor([1.2])
    v = torch.tensor([[2.0, -1.0]])
    m = lie.exp_map(torch.cat([th[:, None], v], -1), "se2")
    j = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    big_v = torch.sin(th) / th * torch.eye(2) + (1 - torch.cos(th)) / th * j
    torch.testing.assert_close(m[0, :2, 2], big_v @ v[0])
    # scale: exp of the similarity generator is the positive factor exp(tau_s)
    m = lie.exp_map(torch.tensor([[0.3, math.log(1.5)]]), "so2", scale=True)
    torch.testing.assert_close(m[0, :2, :2], 1.5 * cv.rotation_matrix(torch.tensor(0.3)))


@pytest.mark.parametrize("group, scale", [("so2", False), ("se2", False), ("se2", True)])
def test_pose_extraction_round_trip(group, scale):
    gen = torch.Generator().manual_seed(3)
    theta = (torch.rand(20, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi * 0.999
    t = (torch.rand(20, 2, generator=gen, dtype=torch.float64) - 0.5) * 10 if group == "se2" else torch.zeros(20, 2, dtype=torch.float64)
    s = torch.exp(torch.randn(20, generator=gen, dtype=torch.float64) * 0.2) if scale else torch.ones(20, dtype=torch.float64)
    tau = lie.pose_to_tau(theta, t, group, s, with_scale=scale)
    assert tau.shape == (20, lie.n_generators(group, scale))
    theta2, t2, s2 = lie.matrix_to_pose(lie.exp_map(tau, group, scale))
    torch.testing.assert_close(theta2, theta)
    torch.testing.assert_close(t2, t)
    torch.testing.assert_close(s2, s)
    torch.testing.assert_close(lie.pose_matrix(theta, t, s), lie.exp_map(tau, group, scale))
    # angles outside (-pi, pi] come back wrapped
    theta3, _, _ = lie.matrix_to_pose(lie.exp_map(torch.tensor([[2 * math.pi + 0.5]]), "so2"))
    torch.testing.assert_close(theta3, torch.tensor([0.5]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# spatial transformer and pose convention
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("box", [15, 16])
def test_spatial_transformer_is_warp_images(box):
    images = torch.stack([smooth_image(box, seed) for seed in range(3)])
    theta = torch.tensor([0.7, -2.0, 3.0])
    t = torch.tensor([[2.0, -1.5], [0.0, 3.0], [-2.5, 0.5]])
    matrix = lie.pose_matrix(theta, t)
    expected = cv.warp_images(images, theta, t)
    torch.testing.assert_close(lie.spatial_transform(images, matrix, padding_mode="zeros"), expected, atol=1e-5, rtol=0)
    inside = cv.pixel_grid(box).norm(dim=-1) <= box // 2 - 4  # R x + t stays inside the box
    torch.testing.assert_close(lie.spatial_transform(images, matrix)[:, inside], expected[:, inside], atol=1e-5, rtol=0)


def test_decode_pose_convention_matches_warp_images():
    """``decode(z, theta, t)`` is the canonical image resampled at ``R(theta) x + t`` (t in pixels)."""
    model = make_model(likelihood="gaussian").eval()
    canonical = smooth_image(BOX, seed=5)
    set_canonical(model, canonical)
    z = torch.randn(3, model.zdim)
    theta = torch.tensor([0.7, -2.0, 3.0])
    t = torch.tensor([[2.0, -1.5], [0.0, 2.0], [-2.5, 0.5]])
    with torch.no_grad():
        base = model.decode(z, torch.zeros(3), torch.zeros(3, 2))
        posed = model.decode(z, theta, t)
    torch.testing.assert_close(base, canonical.expand(3, BOX, BOX))
    inside = cv.pixel_grid(BOX).norm(dim=-1) <= 4
    scale = canonical.std()

    def error(th, tt):
        return ((cv.warp_images(base, th, tt) - posed)[:, inside].abs().max() / scale).item()

    assert error(theta, t) < 1e-4
    rotated_t = torch.einsum("bij,bj->bi", cv.rotation_matrix(theta), t)
    for wrong in [(-theta, t), (theta, -t), (theta, t / cv.grid_half_width(BOX)), (theta, rotated_t)]:
        assert error(*wrong) > 0.2


@pytest.mark.parametrize("overrides", [{}, {"scale": True}])
def test_readout_pose_is_the_transform_the_model_applies(overrides):
    """The readout pose of ``M = exp(tau)`` reproduces, through ``warp_images``, the
    image the training path draws; ``t`` is in pixels."""
    model = make_model(likelihood="gaussian", gaussian_sigma=1.0, **overrides).eval()
    canonical = smooth_image(BOX, seed=7)
    set_canonical(model, canonical)
    tau_mu = [2.0, 1.5, -2.0] + ([math.log(1.1)] if model.config.scale else [])
    set_head(model.tau_head, tau_mu + [-8.0] * len(tau_mu))
    images = shape_images(3)
    out = model.readout(images)
    theta, t, _ = lie.matrix_to_pose(lie.exp_map(torch.tensor([tau_mu]), "se2", model.config.scale))
    torch.testing.assert_close(out.theta, theta.expand(3))
    torch.testing.assert_close(out.t, t.expand(3, 2))
    if model.config.scale:
        torch.testing.assert_close(out.extra["scale"], torch.full((3,), 1.1))
    else:
        # the image drawn from tau in the loss is warp_images of the canonical image at the readout pose
        with torch.no_grad():
            drawn = model.transform(canonical.expand(3, BOX, BOX), model.tau_matrix(model.posterior(images)["tau_mu"]))
        inside = cv.pixel_grid(BOX).norm(dim=-1) <= 3
        expected = cv.warp_images(canonical.expand(3, BOX, BOX), out.theta, out.t)
        torch.testing.assert_close(drawn[:, inside], expected[:, inside], atol=1e-4, rtol=0)
        torch.testing.assert_close(model.reconstruct(images), model.decode(out.z_mean, out.theta, out.t))
        # with sharp posteriors the loss's reconstruction term is the likelihood of that image
        set_head(model.cluster_head, torch.cat([torch.zeros(3), torch.zeros(6), torch.full((6,), -8.0)]))
        set_head(model.z_head, [0.0, 0.0, -8.0, -8.0])
        expected_ll = model.log_likelihood(images[:, 0], model.decode(model.readout(images).z_mean, out.theta, out.t))
        torch.testing.assert_close(-model.loss(images).terms["recon"], expected_ll.mean(), atol=1e-2, rtol=1e-5)


# ---------------------------------------------------------------------------
# KL terms and the mixture bound
# ---------------------------------------------------------------------------

def test_kl_terms_match_torch_distributions():
    model = make_model(theta_prior="normal", theta_prior_std=0.5, translation_prior_std=3.0, scale=True, scale_prior_std=0.2)
    torch.manual_seed(4)
    for head in (model.cluster_head, model.z_head, model.tau_head):
        torch.nn.init.normal_(head[-1].weight, std=0.3)
        torch.nn.init.normal_(head[-1].bias, std=0.3)
    post = model.posterior(shape_images(4))
    kl = model.kl_divergence(post)
    assert set(kl) == {"kl_cluster", "kl_z", "kl_tau"}
    z_expected = kl_divergence(Normal(post["z_mu"], post["z_logstd"].exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl["kl_z"], z_expected, atol=1e-5, rtol=1e-5)
    prior_std = torch.tensor([0.5, 3.0, 3.0, 0.2])
    tau_expected = kl_divergence(Normal(post["tau_mu"], post["tau_logstd"].exp()), Normal(0.0, prior_std)).sum(-1)
    torch.testing.assert_close(kl["kl_tau"], tau_expected, atol=1e-5, rtol=1e-5)
    q_k = Independent(Normal(post["c_mu"], post["c_logstd"].exp()), 1)
    p_k = Independent(Normal(model.prior_mean, model.prior_log_std.exp()[:, None].expand(3, 2)), 1)
    torch.testing.assert_close(model.mixture_kl(post)["components"], kl_divergence(q_k, p_k), atol=1e-5, rtol=1e-5)
    for value in kl.values():
        assert value.shape == (4,) and (value >= 0).all()


def test_prior_means_are_separated_axis_points():
    model = make_model(n_clusters=4, cluster_dim=2, cluster_spread=2.5)
    torch.testing.assert_close(model.prior_mean, torch.tensor([[2.5, 0.0], [0.0, 2.5], [-2.5, 0.0], [0.0, -2.5]]))
    assert "prior_mean" in dict(model.named_buffers())
    learned = make_model(n_clusters=4, cluster_dim=2, learn_prior=True)
    assert {"prior_mean", "prior_log_std"} <= dict(learned.named_parameters()).keys()


@pytest.mark.parametrize("posterior_weights", ["shared", "learned"])
def test_mixture_kl_bound_is_the_weighted_sum_and_bounds_the_true_kl(posterior_weights):
    weights = [0.2, 0.3, 0.5]
    model = make_model(posterior_weights=posterior_weights, cluster_weights=weights)
    torch.manual_seed(6)
    torch.nn.init.normal_(model.cluster_head[-1].weight, std=0.5)
    torch.nn.init.normal_(model.cluster_head[-1].bias, std=0.5)
    post = model.posterior(shape_images(3))
    parts = model.mixture_kl(post)
    q_k = Independent(Normal(post["c_mu"], post["c_logstd"].exp()), 1)
    p_k = Independent(Normal(model.prior_mean, model.prior_log_std.exp()[:, None].expand(3, 2)), 1)
    components = kl_divergence(q_k, p_k)  # (B, K)
    pi = torch.tensor(weights)
    if posterior_weights == "shared":
        torch.testing.assert_close(post["log_w"].exp(), pi.expand(3, 3))
        torch.testing.assert_close(parts["bound"], (pi * components).sum(-1), atol=1e-5, rtol=1e-5)
        assert (parts["weights"] == 0).all()
    else:
        w = post["log_w"].exp()
        expected = kl_divergence(Categorical(probs=w), Categorical(probs=pi)) + (w * components).sum(-1)
        torch.testing.assert_close(parts["bound"], expected, atol=1e-5, rtol=1e-5)
    assert (parts["bound"] >= 0).all()
    # Monte Carlo estimate of the true mixture KL never exceeds the bound
    q = MixtureSameFamily(Categorical(logits=post["log_w"]), Independent(Normal(post["c_mu"], post["c_logstd"].exp()), 1))
    p = MixtureSameFamily(Categorical(probs=pi), p_k)
    with torch.no_grad():
        samples = q.sample((20000,))  # (S, B, d)
        log_ratio = q.log_prob(samples) - p.log_prob(samples)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(20000)
    assert (parts["bound"].detach() >= mc - 4 * se).all(), (parts["bound"], mc)


def test_elbo_is_likelihood_minus_kl():
    model = make_model(likelihood="gaussian")
    terms = model.loss(shape_images(3))
    assert set(terms.terms) == {"recon", "kl_cluster", "kl_z", "kl_tau", "invariance", "sigma"}
    kl = sum(v for k, v in terms.terms.items() if k.startswith("kl_"))
    torch.testing.assert_close(terms.elbo, -(terms.terms["recon"] + kl), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(terms.loss.detach(), -terms.elbo + terms.terms["invariance"], atol=1e-4, rtol=1e-5)
    no_inv = make_model(invariance_weight=0.0)
    terms = no_inv.loss(shape_images(3))
    assert "invariance" not in terms.terms
    torch.testing.assert_close(terms.loss.detach(), -terms.elbo)


# ---------------------------------------------------------------------------
# loss, gradients, invariance
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {},
    {"likelihood": "gaussian", "posterior_weights": "shared", "learn_prior": True, "mask_radius": 6.0},
    {"group": "so2", "scale": True, "zdim": 0},
])
def test_loss_is_finite_and_gradients_reach_every_head(overrides):
    model = make_model(**overrides)
    terms = model.loss(shape_images(4))
    assert torch.isfinite(terms.loss) and terms.loss.shape == terms.elbo.shape == ()
    terms.loss.backward()
    parts = [model.encoder, model.cluster_head, model.tau_head, model.decoder] + ([model.z_head] if model.z_head else [])
    for part in parts:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    # the zero-initialised tau head still learns: its last layer gets a gradient
    assert model.tau_head[-1].weight.grad.abs().sum() > 0
    if model.config.learn_prior:
        assert model.prior_mean.grad.abs().sum() > 0 and model.prior_log_std.grad.abs().sum() > 0
    if model.log_sigma is not None:
        assert model.log_sigma.grad is not None and model.log_sigma.grad != 0


def test_tau_head_starts_at_the_identity():
    model = make_model()
    post = model.posterior(shape_images(3))
    assert (post["tau_mu"] == 0).all()
    torch.testing.assert_close(post["tau_logstd"], torch.full((3, 3), TAU_INIT_LOGSTD))
    out = model.readout(shape_images(3))
    assert (out.theta == 0).all() and (out.t == 0).all()


def test_ctf_in_the_likelihood():
    model = make_model(likelihood="gaussian", gaussian_sigma=0.5)
    ctf = torch.full((2, BOX, BOX // 2 + 1), 0.5)
    assert torch.isfinite(model.loss(shape_images(2), ctf=ctf).loss)
    with pytest.raises(ValueError, match="gaussian"):
        make_model().loss(shape_images(2), ctf=ctf)


def test_invariance_term_vanishes_for_the_identity_only():
    model = make_model(seed=2)
    for head in (model.cluster_head, model.z_head):
        torch.nn.init.normal_(head[-1].weight, std=0.5)
    images = shape_images(4, kind="ell")
    with torch.no_grad():
        same = model.invariance_distance(images, torch.zeros(4), torch.zeros(4, 2))
        turned = model.invariance_distance(images, torch.full((4,), math.pi / 2), torch.zeros(4, 2))
        shifted = model.invariance_distance(images, torch.zeros(4), torch.tensor([[2.0, -1.0]] * 4))
    assert same.shape == (4,)
    assert same.abs().max() < 1e-10
    # an untrained encoder depends only weakly on its input, but clearly more than rounding
    floor = 1e-8 + 1e3 * same.abs().max()
    assert (turned > floor).all() and (shifted > floor).all()


def test_group_elements_come_from_the_finite_support():
    model = make_model(invariance_rotations=4, invariance_translation=2)
    torch.manual_seed(0)
    theta, t = model.sample_group_elements(500)
    assert theta.shape == (500,) and t.shape == (500, 2)
    steps = theta / (math.pi / 2)
    torch.testing.assert_close(steps, steps.round())
    assert set(steps.round().long().tolist()) == {0, 1, 2, 3}
    assert set(t.long().flatten().tolist()) == {-2, -1, 0, 1, 2}


# ---------------------------------------------------------------------------
# readout, rebuild, settings
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"posterior_weights": "shared"}, {"scale": True, "zdim": 0}])
def test_readout_shapes_and_clusters(overrides):
    model = make_model(**overrides)
    images = shape_images(5)
    out = model.readout(images)
    width = model.config.cluster_dim + model.config.zdim
    assert model.zdim == width
    assert out.theta.shape == (5,) and out.t.shape == (5, 2)
    assert out.z_mean.shape == out.z_std.shape == (5, width)
    assert (out.z_std >= 0).all()
    expected_extra = {"cluster", "cluster_probability"} | ({"scale"} if model.config.scale else set())
    assert set(out.extra) == expected_extra
    assert all(v.shape == (5,) for v in out.extra.values())
    cluster = out.extra["cluster"]
    assert cluster.dtype.is_floating_point and (cluster == cluster.round()).all()
    assert ((cluster >= 1) & (cluster <= model.config.n_clusters)).all()
    prob = out.extra["cluster_probability"]
    assert ((prob >= 1 / model.config.n_clusters - 1e-6) & (prob <= 1)).all()
    assert model.decode(out.z_mean, out.theta, out.t).shape == (5, BOX, BOX)
    assert model.reconstruct(images).shape == (5, BOX, BOX)


def test_cluster_readout_follows_the_mixture_weights():
    model = make_model()
    d, k = model.config.cluster_dim, model.config.n_clusters
    set_head(model.cluster_head, torch.cat([torch.tensor([0.0, 2.0, 0.0]), torch.zeros(2 * k * d)]))
    out = model.readout(shape_images(2))
    assert (out.extra["cluster"] == 2).all()
    torch.testing.assert_close(out.extra["cluster_probability"], torch.softmax(torch.tensor([0.0, 2.0, 0.0]), 0)[1].expand(2))
    # shared weights: the prior responsibility at the posterior mean (here the third prior mean)
    shared = make_model(posterior_weights="shared", cluster_weights=[1.0, 1.0, 1.0])
    third = shared.prior_mean[2]
    set_head(shared.cluster_head, torch.cat([third.repeat(k), torch.full((k * d,), -3.0)]))
    out = shared.readout(shape_images(2))
    assert (out.extra["cluster"] == 3).all()
    torch.testing.assert_close(out.z_mean[:, :d], third.expand(2, d))


@pytest.mark.parametrize("overrides", [{}, {"learn_prior": True, "likelihood": "gaussian", "mask_radius": 6.0, "scale": True}])
def test_rebuild_from_config_and_state_gives_identical_readout(overrides):
    model = make_model(seed=3, **overrides).eval()
    torch.nn.init.normal_(model.tau_head[-1].weight, std=0.1)
    if model.config.learn_prior:
        with torch.no_grad():
            model.prior_mean.add_(0.3)
    config = json.loads(json.dumps(model.config_dict()))
    assert config["model"] == "mce-vae"
    twin = build_model(config)
    images = shape_images(3)
    assert not torch.equal(twin.readout(images).z_mean, model.readout(images).z_mean)
    load_learnable_state(twin, learnable_state(model))
    twin.eval()
    a, b = model.readout(images), twin.readout(images)
    for name in ("theta", "t", "z_mean", "z_std"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.extra.keys() == b.extra.keys()
    for name in a.extra:
        assert torch.equal(a.extra[name], b.extra[name]), name
    assert torch.equal(model.reconstruct(images), twin.reconstruct(images))


@pytest.mark.parametrize("overrides, match", [
    ({"box": 6}, "box"),
    ({"zdim": -1}, "zdim"),
    ({"n_clusters": 0}, "n_clusters"),
    ({"n_clusters": 5, "cluster_dim": 2}, "n_clusters"),
    ({"cluster_spread": 0.0}, "cluster_spread"),
    ({"cluster_weights": [1.0, 2.0]}, "cluster_weights"),
    ({"cluster_weights": [1.0, 0.0, 1.0]}, "cluster_weights"),
    ({"posterior_weights": "soft"}, "posterior_weights"),
    ({"group": "so3"}, "group"),
    ({"theta_prior": "vonmises"}, "theta_prior"),
    ({"translation_prior_std": -1.0}, "translation_prior_std"),
    ({"invariance_weight": -0.1}, "invariance_weight"),
    ({"invariance_rotations": 0}, "invariance_rotations"),
    ({"aug_dim": 0}, "aug_dim"),
    ({"dec_layers": 0}, "dec_layers"),
    ({"likelihood": "poisson"}, "likelihood"),
    ({"gaussian_sigma": 0.0, "likelihood": "gaussian"}, "gaussian_sigma"),
    ({"mask_radius": 0.0}, "mask_radius"),
])
def test_invalid_settings_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        MCEVAE(MCEVAEConfig(**{**SMALL, **overrides}))


def test_registered_under_its_name():
    assert MODELS["mce-vae"] is MCEVAE
    model = build_model({"model": "mce-vae", **SMALL})
    assert isinstance(model, MCEVAE) and model.has_pose


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def test_short_training_raises_the_elbo():
    images = torch.cat([shape_images(16, kind="bar", seed=1), shape_images(16, kind="ell", seed=2)])
    model = make_model(seed=1, group="so2", n_clusters=2, cluster_dim=1, zdim=1, dec_hidden=64, invariance_weight=0.1,
                       invariance_translation=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        first = np.mean([model.loss(images).elbo.item() for _ in range(3)])
    for _ in range(100):
        terms = model.loss(images)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = np.mean([model.loss(images).elbo.item() for _ in range(3)])
    assert last > first + 80, (first, last)


def test_train_and_infer_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    images = shape_images(24, box=20, seed=0)[:, 0].numpy() + 0.1 * rng.standard_normal((24, 20, 20))
    stack = write_stack(tmp_path / "bars.mrcs", images.astype(np.float32), pixel_size=2.0)
    run, out = tmp_path / "run", tmp_path / "poses.star"
    code = cli.main(["-q", "train", str(stack), "--model", "mce-vae", "--zdim", "1", "--gen-hidden", "32",
                     "--gen-layers", "1", "--enc-hidden", "32", "--enc-channels", "4", "--group", "4",
                     "--likelihood", "gaussian", "--translation-prior-std", "2", "--theta-prior", "normal",
                     "--theta-prior-std-deg", "90", "--batch-size", "8", "--epochs", "1", "--seed", "0", "--out", str(run)])
    assert code == 0
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["model"] == "mce-vae" and config["box"] == 20
    assert config["dec_hidden"] == 32 and config["dec_layers"] == 1 and config["invariance_rotations"] == 4
    assert config["translation_prior_std"] == 2.0 and config["theta_prior_std"] == pytest.approx(math.pi / 2)
    assert cli.main(["-q", "infer", str(run), "--out", str(out)]) == 0
    particles = ParticleStar(out).particles
    assert len(particles) == 24
    k = config["cluster_dim"] + config["zdim"]
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", f"pvaeZ{k}", f"pvaeZStd{k}", "pvaeCluster",
                   "pvaeClusterProbability"):
        assert column in particles.columns, column
        assert np.isfinite(particles[column].to_numpy(float)).all(), column
    assert particles["rlnAnglePsi"].between(-180, 180).all()
    cluster = particles["pvaeCluster"].to_numpy(float)
    assert ((cluster >= 1) & (cluster <= config["n_clusters"]) & (cluster == np.round(cluster))).all()
