"""Tests for spatial-VAE: shapes, closed-form KL terms, gradients, the pose
convention of ``decode``, readout, checkpoint round trips, invalid settings,
a short optimisation and the train -> infer command-line path.

Models are tiny (boxes of 16-33 px, narrow networks) so that the file runs in
seconds on a CPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from particle_vae import cli
from particle_vae import conventions as cv
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import ParticleStar
from particle_vae.models import MODELS, SpatialVAE, SpatialVAEConfig, build_model
from particle_vae.models.base import learnable_state, load_learnable_state
from particle_vae.models.spatial_vae import UNIFORM_THETA_STD

BOX = 16
SMALL = {"box": BOX, "zdim": 2, "enc_hidden": 32, "enc_channels": 4, "gen_hidden": 32, "n_fourier": 16}


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0, **overrides) -> SpatialVAE:
    torch.manual_seed(seed)
    return SpatialVAE(SpatialVAEConfig(**{**SMALL, **overrides}))


def bar_images(n: int = 16, box: int = BOX) -> torch.Tensor:
    """``n`` copies of a soft bar rotated by evenly spaced angles, values in [0, 1]: ``(n, 1, box, box)``."""
    grid = cv.pixel_grid(box)
    x, y = grid[..., 0], grid[..., 1]
    images = []
    for angle in torch.arange(n) * (2 * math.pi / n):
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * x + s * y, -s * x + c * y
        images.append(torch.exp(-0.5 * ((u / 4.0) ** 2 + (v / 1.2) ** 2)))
    return torch.stack(images)[:, None]


def set_head(model: SpatialVAE, values: dict[str, list[float]]) -> None:
    """Make the inference network's output constant: zero last-layer weights, chosen biases."""
    last = model.encoder[-1] if model.config.encoder == "mlp" else model.encoder.head[-1]
    k = model.zdim
    layout = {"z_mu": slice(0, k), "z_logstd": slice(k, 2 * k), "theta_mu": slice(2 * k, 2 * k + 1),
              "theta_logstd": slice(2 * k + 1, 2 * k + 2), "t_mu": slice(2 * k + 2, 2 * k + 4),
              "t_logstd": slice(2 * k + 4, 2 * k + 6)}
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        for name, value in values.items():
            last.bias[layout[name]] = torch.tensor(value)


# ---------------------------------------------------------------------------
# shapes and registration
# ---------------------------------------------------------------------------

def test_registered_under_its_name():
    assert MODELS["spatial-vae"] is SpatialVAE
    model = build_model({"model": "spatial-vae", **SMALL})
    assert isinstance(model, SpatialVAE) and model.has_pose


@pytest.mark.parametrize("overrides", [
    {},
    {"encoder": "conv"},
    {"zdim": 0},
    {"likelihood": "gaussian", "mask_radius": 6.0},
    {"infer_rotation": False},
    {"infer_translation": False, "n_fourier": 0},
])
def test_shapes(overrides):
    model = make_model(**overrides)
    images = bar_images(5)
    post = model.posterior(images)
    k = model.zdim
    assert post["z_mu"].shape == post["z_logstd"].shape == (5, k)
    assert ("theta_mu" in post) == model.config.infer_rotation
    assert ("t_mu" in post) == model.config.infer_translation
    if model.config.infer_rotation:
        assert post["theta_mu"].shape == post["theta_logstd"].shape == (5,)
    if model.config.infer_translation:
        assert post["t_mu"].shape == post["t_logstd"].shape == (5, 2)
    terms = model.loss(images)
    assert terms.loss.shape == terms.elbo.shape == ()
    out = model.readout(images)
    assert out.theta.shape == (5,) and out.t.shape == (5, 2)
    assert out.z_mean.shape == out.z_std.shape == (5, k)
    assert set(out.extra) == {"theta_std", "translation_std"}
    assert all(v.shape == (5,) for v in out.extra.values())
    assert model.decode(out.z_mean, out.theta, out.t).shape == (5, BOX, BOX)
    assert model.reconstruct(images).shape == (5, BOX, BOX)


# ---------------------------------------------------------------------------
# KL terms and the objective
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("theta_prior, prior_std", [("normal", 0.3), ("uniform", None)])
def test_kl_terms_match_torch_distributions(theta_prior, prior_std):
    model = make_model(theta_prior=theta_prior, theta_prior_std=prior_std or 1.0, translation_prior_std=2.5)
    images = bar_images(4) + 0.3 * torch.randn(4, 1, BOX, BOX, generator=torch.Generator().manual_seed(1))
    post = model.posterior(images)
    kl = model.kl_divergence(post)
    theta_std = prior_std if theta_prior == "normal" else UNIFORM_THETA_STD
    assert UNIFORM_THETA_STD == pytest.approx(math.pi)
    expected = {
        "kl_z": kl_divergence(Normal(post["z_mu"], post["z_logstd"].exp()), Normal(0.0, 1.0)).sum(-1),
        "kl_theta": kl_divergence(Normal(post["theta_mu"], post["theta_logstd"].exp()), Normal(0.0, theta_std)),
        "kl_t": kl_divergence(Normal(post["t_mu"], post["t_logstd"].exp()), Normal(0.0, 2.5)).sum(-1),
    }
    assert set(kl) == set(expected)
    for name, value in expected.items():
        assert kl[name].shape == (4,)
        torch.testing.assert_close(kl[name], value, atol=1e-5, rtol=1e-5)


def test_kl_is_zero_at_the_prior_and_absent_for_fixed_pose():
    model = make_model(theta_prior="normal", theta_prior_std=0.5, translation_prior_std=3.0)
    set_head(model, {"theta_logstd": [math.log(0.5)], "t_logstd": [math.log(3.0)] * 2})
    kl = model.kl_divergence(model.posterior(bar_images(2)))
    for value in kl.values():
        torch.testing.assert_close(value, torch.zeros(2), atol=1e-6, rtol=0)
    fixed = make_model(zdim=0, infer_rotation=False, infer_translation=False)
    assert fixed.kl_divergence(fixed.posterior(bar_images(2))) == {}
    terms = fixed.loss(bar_images(2))
    assert torch.isclose(terms.elbo, -terms.terms["recon"])


def test_elbo_is_likelihood_minus_kl():
    model = make_model(likelihood="gaussian")
    terms = model.loss(bar_images(3))
    kl = sum(v for k, v in terms.terms.items() if k.startswith("kl_"))
    assert set(terms.terms) == {"recon", "kl_z", "kl_theta", "kl_t", "sigma"}
    torch.testing.assert_close(terms.elbo, -(terms.terms["recon"] + kl), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(terms.loss.detach(), -terms.elbo)


def test_sampled_pose_is_the_mean_when_the_posterior_is_sharp():
    """With the smallest posterior stds the training sample equals the readout pose."""
    model = make_model(likelihood="gaussian", gaussian_sigma=1.0)
    set_head(model, {"z_mu": [0.3, -0.2], "z_logstd": [-8.0, -8.0], "theta_mu": [1.1], "theta_logstd": [-8.0],
                     "t_mu": [1.5, -2.0], "t_logstd": [-8.0, -8.0]})
    images = bar_images(3)
    out = model.readout(images)
    raw = model.decode(out.z_mean, out.theta, out.t)
    expected = model.log_likelihood(images[:, 0], raw)
    torch.testing.assert_close(-model.loss(images).terms["recon"], expected.mean(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"encoder": "conv", "likelihood": "gaussian"}])
def test_loss_is_finite_and_gradients_reach_encoder_and_generator(overrides):
    model = make_model(**overrides)
    terms = model.loss(bar_images(4))
    assert torch.isfinite(terms.loss)
    terms.loss.backward()
    for part in (model.encoder, model.generator):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    if model.log_sigma is not None:
        assert model.log_sigma.grad is not None and model.log_sigma.grad != 0


def test_ctf_and_mask_in_the_likelihood():
    model = make_model(likelihood="gaussian", gaussian_sigma=0.5, mask_radius=5.0)
    images = bar_images(2)
    ctf = torch.full((2, BOX, BOX // 2 + 1), 0.5)
    assert torch.isfinite(model.loss(images, ctf=ctf).loss)
    # pixels outside the mask do not change the likelihood of a given generated image
    raw = torch.randn(2, BOX, BOX)
    outside = cv.pixel_grid(BOX).norm(dim=-1) > 5.0
    changed = images[:, 0].clone()
    changed[:, outside] += 10.0
    torch.testing.assert_close(model.log_likelihood(images[:, 0], raw), model.log_likelihood(changed, raw))
    with pytest.raises(ValueError, match="gaussian"):
        make_model().loss(images, ctf=ctf)


# ---------------------------------------------------------------------------
# pose convention and readout
# ---------------------------------------------------------------------------

def test_decode_pose_convention_matches_warp_images():
    """``decode(z, theta, t)`` is the canonical image resampled at ``R(theta) x + t`` (t in pixels)."""
    box = 33
    model = make_model(seed=0, box=box, gen_hidden=64, n_fourier=32, fourier_bandwidth=0.05, likelihood="gaussian").eval()
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    theta = torch.tensor([0.7, -2.0, 3.0])
    t = torch.tensor([[2.0, -1.5], [0.0, 3.0], [-2.5, 0.5]])
    with torch.no_grad():
        base = model.decode(z, torch.zeros(3), torch.zeros(3, 2))
        posed = model.decode(z, theta, t)
    inside = cv.pixel_grid(box).norm(dim=-1) <= 11  # R x + t stays inside the box
    scale = base.std()

    def error(th, tt):
        warped = cv.warp_images(base, th, tt, mode="bicubic")
        return ((warped - posed)[:, inside].abs().max() / scale).item()

    assert error(theta, t) < 0.15
    # the wrong conventions are far off: this pins the sign of theta, of t, and t in pixels
    rotated_t = torch.einsum("bij,bj->bi", cv.rotation_matrix(theta), t)
    for wrong in [(-theta, t), (theta, -t), (theta, t / cv.grid_half_width(box)), (theta, rotated_t)]:
        assert error(*wrong) > 1.0


def test_readout_is_the_wrapped_posterior_mean_in_pixels():
    model = make_model(translation_prior_std=4.0)
    theta_mu, t_mu = 2 * math.pi + 3.0, [2.5, -1.25]
    set_head(model, {"z_mu": [0.4, -0.6], "z_logstd": [-1.0, 0.5], "theta_mu": [theta_mu], "theta_logstd": [-2.0],
                     "t_mu": t_mu, "t_logstd": [math.log(0.3), math.log(0.4)]})
    out = model.readout(bar_images(3))
    torch.testing.assert_close(out.theta, torch.full((3,), 3.0), atol=1e-5, rtol=0)
    assert (out.theta > -math.pi).all() and (out.theta <= math.pi).all()
    torch.testing.assert_close(out.t, torch.tensor([t_mu] * 3))
    torch.testing.assert_close(out.z_mean, torch.tensor([[0.4, -0.6]] * 3))
    torch.testing.assert_close(out.z_std, torch.tensor([[math.exp(-1.0), math.exp(0.5)]] * 3))
    torch.testing.assert_close(out.extra["theta_std"], torch.full((3,), math.exp(-2.0)))
    torch.testing.assert_close(out.extra["translation_std"], torch.full((3,), math.sqrt((0.3 ** 2 + 0.4 ** 2) / 2)))
    # the reconstruction is drawn at exactly that pose
    torch.testing.assert_close(model.reconstruct(bar_images(3)), model.decode(out.z_mean, out.theta, out.t))


def test_readout_reports_zero_pose_when_it_is_not_inferred():
    model = make_model(infer_rotation=False, infer_translation=False)
    out = model.readout(bar_images(2))
    assert (out.theta == 0).all() and (out.t == 0).all()
    assert (out.extra["theta_std"] == 0).all() and (out.extra["translation_std"] == 0).all()


@pytest.mark.parametrize("overrides", [{}, {"encoder": "conv", "likelihood": "gaussian", "mask_radius": 6.0}])
def test_rebuild_from_config_and_state_gives_identical_readout(overrides):
    model = make_model(seed=3, **overrides).eval()
    config = model.config_dict()
    assert config["model"] == "spatial-vae"
    twin = build_model(config)
    assert not torch.equal(twin.readout(bar_images(3)).theta, model.readout(bar_images(3)).theta)
    load_learnable_state(twin, learnable_state(model))
    twin.eval()
    images = bar_images(3)
    a, b = model.readout(images), twin.readout(images)
    for name in ("theta", "t", "z_mean", "z_std"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in a.extra:
        assert torch.equal(a.extra[name], b.extra[name]), name
    assert torch.equal(model.reconstruct(images), twin.reconstruct(images))


@pytest.mark.parametrize("overrides, match", [
    ({"encoder": "group"}, "encoder"),
    ({"likelihood": "poisson"}, "likelihood"),
    ({"theta_prior": "vonmises"}, "theta_prior"),
    ({"zdim": -1}, "zdim"),
    ({"enc_layers": 0}, "enc_"),
    ({"gen_hidden": 0}, "gen_hidden"),
    ({"translation_prior_std": 0.0}, "translation_prior_std"),
    ({"theta_prior_std": -1.0}, "theta_prior_std"),
    ({"gaussian_sigma": 0.0, "likelihood": "gaussian"}, "gaussian_sigma"),
    ({"mask_radius": 0.0}, "mask_radius"),
    ({"encoder": "conv", "box": 6}, "box"),
])
def test_invalid_settings_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        SpatialVAE(SpatialVAEConfig(**{**SMALL, **overrides}))


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def test_short_training_raises_the_elbo():
    images = bar_images(16)
    model = make_model(seed=1, zdim=1, enc_hidden=64, gen_hidden=64, n_fourier=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        first = np.mean([model.loss(images).elbo.item() for _ in range(5)])
    for _ in range(120):
        terms = model.loss(images)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = np.mean([model.loss(images).elbo.item() for _ in range(5)])
    assert last > first + 50, (first, last)


def test_train_and_infer_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    images = bar_images(24, box=20)[:, 0].numpy() + 0.1 * rng.standard_normal((24, 20, 20))
    stack = write_stack(tmp_path / "bars.mrcs", images.astype(np.float32), pixel_size=2.0)
    run, out = tmp_path / "run", tmp_path / "poses.star"
    code = cli.main(["-q", "train", str(stack), "--model", "spatial-vae", "--zdim", "2", "--gen-hidden", "32",
                     "--fourier-features", "16", "--likelihood", "gaussian", "--translation-prior-std", "2",
                     "--theta-prior", "normal", "--theta-prior-std-deg", "90", "--batch-size", "8", "--epochs", "1",
                     "--seed", "0", "--out", str(run)])
    assert code == 0
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["model"] == "spatial-vae" and config["box"] == 20 and config["gen_hidden"] == 32
    assert config["translation_prior_std"] == 2.0 and config["theta_prior_std"] == pytest.approx(math.pi / 2)
    assert cli.main(["-q", "infer", str(run), "--out", str(out)]) == 0
    particles = ParticleStar(out).particles
    assert len(particles) == 24
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "pvaeZ1", "pvaeZ2", "pvaeZStd1",
                   "pvaeThetaStd", "pvaeTranslationStd"):
        assert column in particles.columns, column
        assert np.isfinite(particles[column].to_numpy(float)).all(), column
    assert particles["rlnAnglePsi"].between(-180, 180).all()
