"""Tests for EquiVAE: class representations from other same-class images,
the exact expectation over classes, KL, the semi-supervised loss, the
class-mean bank, readout and classification, checkpoint round trips, invalid
settings, a short supervised optimisation and the command-line path.

Models are tiny (12 px boxes, narrow MLPs) so that the file runs in seconds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from particle_vae import conventions as cv
from particle_vae.models import MODELS, EquiVAE, EquiVAEConfig, build_model
from particle_vae.models.base import learnable_state, load_learnable_state
from particle_vae.models.equivae import class_probabilities, gaussian_kl, other_member_means

BOX = 12
SMALL = {"box": BOX, "n_classes": 3, "embed_dim": 4, "zdim": 2, "hidden": 32, "layers": 1}

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed: int = 0, **overrides) -> EquiVAE:
    torch.manual_seed(seed)
    return EquiVAE(EquiVAEConfig(**{**SMALL, **overrides}))


def shapes(n: int, box: int = BOX, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images alternating two classes: a randomly rotated bar (label 0)
    and a ring of random radius (label 1), values in [0, 1]; ``(n, 1, box, box)``, ``(n,)``."""
    gen = torch.Generator().manual_seed(seed)
    grid = cv.pixel_grid(box)
    x, y = grid[..., 0], grid[..., 1]
    images, labels = [], []
    for i in range(n):
        if i % 2 == 0:
            angle = float(torch.rand((), generator=gen)) * math.pi
            c, s = math.cos(angle), math.sin(angle)
            u, v = c * x + s * y, -s * x + c * y
            images.append(torch.exp(-0.5 * ((u / 3.5) ** 2 + (v / 1.0) ** 2)))
        else:
            radius = 2.5 + 1.5 * float(torch.rand((), generator=gen))
            images.append(torch.exp(-0.5 * ((grid.norm(dim=-1) - radius) / 0.8) ** 2))
        labels.append(i % 2)
    return torch.stack(images)[:, None], torch.tensor(labels)


def images_and_labels(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    images, _ = shapes(n)
    return images, torch.arange(n) % 3


# ---------------------------------------------------------------------------
# registration and shapes
# ---------------------------------------------------------------------------

def test_registered_under_its_name():
    assert MODELS["equivae"] is EquiVAE
    model = build_model({"model": "equivae", **SMALL})
    assert isinstance(model, EquiVAE) and not model.has_pose
    assert model.zdim == SMALL["embed_dim"] + SMALL["zdim"]


@pytest.mark.parametrize("overrides", [{}, {"likelihood": "gaussian"}, {"likelihood": "gaussian", "gaussian_sigma": 0.3}])
def test_readout_and_decode_shapes(overrides):
    model = make_model(**overrides).eval()
    images, _ = images_and_labels(5)
    out = model.readout(images)
    k, d = model.zdim, SMALL["embed_dim"]
    assert out.theta.shape == (5,) and out.t.shape == (5, 2)
    assert (out.theta == 0).all() and (out.t == 0).all()
    assert out.z_mean.shape == out.z_std.shape == (5, k)
    assert (out.z_std[:, :d] == 0).all() and (out.z_std[:, d:] > 0).all()
    torch.testing.assert_close(out.z_mean[:, :d], model.embed(images))
    assert set(out.extra) == {"predicted_class", "class_probability"}
    assert all(v.shape == (5,) for v in out.extra.values())
    predicted = out.extra["predicted_class"]
    assert predicted.dtype.is_floating_point and (predicted == predicted.round()).all()
    assert ((predicted >= 1) & (predicted <= SMALL["n_classes"])).all()
    prob = out.extra["class_probability"]
    assert ((prob >= 1 / SMALL["n_classes"] - 1e-6) & (prob <= 1)).all()
    assert model.decode(out.z_mean, out.theta, out.t).shape == (5, BOX, BOX)
    assert model.reconstruct(images).shape == (5, BOX, BOX)
    if model.config.likelihood == "bernoulli":
        recon = model.reconstruct(images)
        assert ((recon >= 0) & (recon <= 1)).all()


# ---------------------------------------------------------------------------
# class representations
# ---------------------------------------------------------------------------

def test_class_mean_excludes_the_image_itself():
    """Class 0 has two members, so each one's r must be exactly the *other*'s embedding."""
    e = torch.tensor([[1.0, 0.0], [0.0, 5.0], [3.0, 3.0], [4.0, 4.0], [6.0, 6.0], [-9.0, -9.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, -1])
    for _ in range(20):
        r, found = other_member_means(e, labels, m_max=10)
        assert found.tolist() == [True, True, True, True, True, False]
        torch.testing.assert_close(r[0], e[1])
        torch.testing.assert_close(r[1], e[0])
        # class 1: a mean of 1 or 2 of the two others, never involving the image itself
        for i, others in ((2, (3, 4)), (3, (2, 4)), (4, (2, 3))):
            allowed = [e[others[0]], e[others[1]], e[list(others)].mean(0)]
            assert any(torch.allclose(r[i], a) for a in allowed), (i, r[i])
        assert (r[5] == 0).all()


def test_number_of_averaged_members_covers_1_to_m_max():
    e = torch.eye(6) * torch.arange(1.0, 7.0)[:, None]  # distinct one-hot rows: count = non-zeros
    labels = torch.zeros(6, dtype=torch.long)
    torch.manual_seed(0)
    counts = set()
    for _ in range(200):
        r, _ = other_member_means(e, labels, m_max=3)
        nonzero = (r != 0).sum(1)
        assert (r[:, :] * (torch.eye(6) > 0)).abs().sum() == 0  # own coordinate never used
        counts.update(nonzero.tolist())
    assert counts == {1, 2, 3}


def test_singleton_class_falls_back_to_the_bank():
    model = make_model()
    e = torch.randn(4, SMALL["embed_dim"])
    labels = torch.tensor([0, 0, 2, -1])
    r = model.class_representations(e, labels)
    torch.testing.assert_close(r[0], e[1])
    torch.testing.assert_close(r[1], e[0])
    torch.testing.assert_close(r[2], model.class_means[2])


def test_gradient_reaches_the_other_members_embedding():
    e = torch.randn(3, 2, requires_grad=True)
    r, _ = other_member_means(e, torch.tensor([1, 1, 0]), m_max=4)
    r[0].sum().backward()
    assert e.grad[1].abs().sum() > 0 and e.grad[0].abs().sum() == 0 and e.grad[2].abs().sum() == 0


# ---------------------------------------------------------------------------
# objective
# ---------------------------------------------------------------------------

def test_kl_matches_torch_distributions():
    model = make_model()
    images, _ = images_and_labels(4)
    mu, logstd = model.encode_v(images, torch.randn(4, SMALL["embed_dim"]))
    expected = kl_divergence(Normal(mu, logstd.exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logstd), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_exact_expectation_over_classes_matches_a_loop(monkeypatch, likelihood):
    """With v at its mean (no sampling noise) the vectorised sum over y equals
    a loop over classes of q(y|x) [log p(x|r_y,v) - KL] + H(q) + log p(y)."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    model = make_model(seed=2, likelihood=likelihood).eval()
    with torch.no_grad():
        model.class_means.copy_(torch.randn(3, SMALL["embed_dim"]) * 0.5)
    images, _ = images_and_labels(4)
    with torch.no_grad():
        e = model.embed(images)
        q = class_probabilities(e, model.class_means)
        expected = torch.zeros(4)
        for y in range(3):
            r = model.class_means[y].expand(4, -1)
            mu, logstd = model.encode_v(images, r)
            raw = model.decoder(torch.cat([r, mu], -1)).view(4, BOX, BOX)
            log_lik = model.log_likelihood(images[:, 0], raw)
            expected += q[:, y] * (log_lik - gaussian_kl(mu, logstd))
        expected += -(q * q.log()).sum(-1) - math.log(3)
        out = model.unlabelled_elbo(images, q.log(), model.class_means)
        torch.testing.assert_close(out["elbo"], expected, atol=1e-4, rtol=1e-5)
        terms = model.loss(images)  # labels=None: everything unlabelled
        torch.testing.assert_close(terms.elbo, expected.mean(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(terms.loss, -expected.mean(), atol=1e-4, rtol=1e-5)


def test_labelled_objective_adds_alpha_log_q(monkeypatch):
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    images, labels = images_and_labels(6)
    losses = {}
    for alpha in (0.0, 2.0):
        model = make_model(seed=4, alpha=alpha).eval()
        terms = model.loss(images, labels=labels)
        losses[alpha] = terms
    torch.testing.assert_close(losses[0.0].elbo, losses[2.0].elbo)
    torch.testing.assert_close(losses[0.0].loss.detach(), -losses[0.0].elbo)
    torch.testing.assert_close(losses[2.0].loss.detach() - losses[0.0].loss.detach(),
                               2.0 * losses[2.0].terms["class_nll"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 2], [-1] * 6, [0, -1, 2, 0, -1, 1]])
def test_logged_terms_are_always_present_and_per_image(labels):
    """class_nll and correct are labelled sums / batch size (0 without labels), so epoch means stay exact."""
    model = make_model(seed=5).eval()
    images, _ = images_and_labels(6)
    labels = torch.tensor(labels)
    terms = model.loss(images, labels=labels).terms
    assert set(terms) == {"recon", "kl_v", "class_nll", "correct", "labelled_fraction", "class_entropy"}
    known = labels >= 0
    assert terms["labelled_fraction"] == known.float().mean()
    log_q = torch.log_softmax(-torch.cdist(model.embed(images), model.class_means) ** 2, -1).detach()
    expected_nll = -log_q[known, labels[known]].sum() / 6 if known.any() else torch.tensor(0.0)
    torch.testing.assert_close(terms["class_nll"], expected_nll, atol=1e-4, rtol=1e-4)
    expected_correct = (log_q.argmax(-1)[known] == labels[known]).sum() / 6
    torch.testing.assert_close(terms["correct"], expected_correct.float())
    assert 0 <= terms["class_entropy"] <= math.log(3) + 1e-6


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 2], [-1] * 6, [0, -1, 2, 0, -1, 1], None])
def test_loss_is_finite_and_gradients_flow(likelihood, labels):
    model = make_model(likelihood=likelihood)
    images, _ = images_and_labels(6)
    terms = model.loss(images, labels=None if labels is None else torch.tensor(labels))
    assert terms.loss.shape == terms.elbo.shape == ()
    assert torch.isfinite(terms.loss) and torch.isfinite(terms.elbo)
    assert all(torch.isfinite(v) for v in terms.terms.values())
    terms.loss.backward()
    for part in (model.embedder, model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    if model.log_sigma is not None:
        assert model.log_sigma.grad is not None and model.log_sigma.grad != 0


def test_ctf_in_the_likelihood():
    model = make_model(likelihood="gaussian", gaussian_sigma=0.5)
    images, labels = images_and_labels(4)
    ctf = torch.full((4, BOX, BOX // 2 + 1), 0.5)
    labels[1] = -1
    assert torch.isfinite(model.loss(images, ctf=ctf, labels=labels).loss)
    with pytest.raises(ValueError, match="gaussian"):
        make_model().loss(images, ctf=ctf)


@pytest.mark.parametrize("labels", [[0, 3, 1, 1], [0, -2, 1, 1], [0, 1]])
def test_invalid_labels_raise(labels):
    images, _ = images_and_labels(4)
    with pytest.raises(ValueError, match="labels"):
        make_model().loss(images, labels=torch.tensor(labels))


# ---------------------------------------------------------------------------
# class-mean bank and classification
# ---------------------------------------------------------------------------

def test_bank_is_updated_in_training_only():
    model = make_model(bank_momentum=0.5)
    images, labels = images_and_labels(6)
    labels = torch.tensor([0, 0, 1, 1, -1, -1])
    before = model.class_means.clone()
    model.eval()
    model.loss(images, labels=labels)
    assert torch.equal(model.class_means, before)
    model.train()
    e = model.embed(images).detach()
    model.loss(images, labels=labels)
    # first update copies the batch mean; class 2 (absent) and unlabelled images leave the bank alone
    torch.testing.assert_close(model.class_means[0], e[:2].mean(0))
    torch.testing.assert_close(model.class_means[1], e[2:4].mean(0))
    assert torch.equal(model.class_means[2], before[2])
    assert model.class_seen.tolist() == [1, 1, 0]
    model.loss(images, labels=torch.tensor([1, 1, -1, -1, -1, -1]))
    torch.testing.assert_close(model.class_means[1], 0.5 * e[2:4].mean(0) + 0.5 * e[:2].mean(0), atol=1e-5, rtol=1e-5)


def test_bank_from_unlabelled_uses_q_weights():
    model = make_model(bank_from_unlabelled=True).train()
    images, _ = images_and_labels(6)
    before = model.class_means.clone()
    model.loss(images)
    assert not torch.equal(model.class_means, before)
    assert "class_means" in learnable_state(model) and "class_seen" in learnable_state(model)


def test_nearest_class_mean_classification(monkeypatch):
    model = make_model(embed_dim=2).eval()
    means = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    with torch.no_grad():
        model.class_means.copy_(means)
    truth = torch.tensor([2, 0, 1, 1, 0, 2])
    embeddings = means[truth] + 0.5 * torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(model, "embed", lambda images: embeddings)
    out = model.readout(torch.zeros(6, 1, BOX, BOX))
    assert out.extra["predicted_class"].tolist() == (truth + 1).float().tolist()
    assert (out.extra["class_probability"] > 0.99).all()
    probs = class_probabilities(embeddings, means)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    assert probs.argmax(-1).tolist() == truth.tolist()


# ---------------------------------------------------------------------------
# checkpoints and settings
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"likelihood": "gaussian"}])
def test_rebuild_from_config_and_state_gives_identical_readout(overrides):
    model = make_model(seed=3, **overrides)
    images, labels = images_and_labels(6)
    model.train()
    model.loss(images, labels=labels)  # moves the bank away from its seeded start
    model.eval()
    config = model.config_dict()
    assert config["model"] == "equivae"
    json.dumps(config)
    twin = build_model(config)
    assert not torch.equal(twin.class_means, model.class_means)
    load_learnable_state(twin, learnable_state(model))
    twin.eval()
    assert torch.equal(twin.class_means, model.class_means)
    a, b = model.readout(images), twin.readout(images)
    for name in ("theta", "t", "z_mean", "z_std"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in a.extra:
        assert torch.equal(a.extra[name], b.extra[name]), name
    assert torch.equal(model.reconstruct(images), twin.reconstruct(images))


@pytest.mark.parametrize("overrides, match", [
    ({"likelihood": "poisson"}, "likelihood"),
    ({"n_classes": 1}, "n_classes"),
    ({"embed_dim": 0}, "embed_dim"),
    ({"zdim": 0}, "zdim"),
    ({"hidden": 0}, "hidden"),
    ({"layers": 0}, "layers"),
    ({"m_max": 0}, "m_max"),
    ({"alpha": -1.0}, "alpha"),
    ({"bank_momentum": 1.0}, "bank_momentum"),
    ({"bank_momentum": -0.1}, "bank_momentum"),
    ({"gaussian_sigma": 0.0, "likelihood": "gaussian"}, "gaussian_sigma"),
    ({"box": 0}, "box"),
])
def test_invalid_settings_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        EquiVAE(EquiVAEConfig(**{**SMALL, **overrides}))


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def test_short_supervised_training_raises_the_elbo_and_classifies():
    images, labels = shapes(32, seed=0)
    model = make_model(seed=1, n_classes=2, hidden=64, m_max=4, alpha=5.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        first = np.mean([model.loss(images, labels=labels).elbo.item() for _ in range(3)])
    model.train()
    for step in range(120):
        batch = torch.randperm(32)[:16]
        terms = model.loss(images[batch], labels=labels[batch])
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        last = np.mean([model.loss(images, labels=labels).elbo.item() for _ in range(3)])
    assert last > first + 20, (first, last)
    test_images, test_labels = shapes(20, seed=5)
    predicted = model.readout(test_images).extra["predicted_class"]
    assert (predicted == (test_labels + 1).float()).float().mean() >= 0.95


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def test_train_and_infer_with_labels_through_the_cli(tmp_path):
    from particle_vae import cli
    from particle_vae.io.mrc import write_stack
    from particle_vae.io.star import ParticleStar

    images, labels = shapes(24, box=16, seed=1)
    rng = np.random.default_rng(0)
    data = images[:, 0].numpy() + 0.05 * rng.standard_normal((24, 16, 16))
    stack = write_stack(tmp_path / "shapes.mrcs", data.astype(np.float32), pixel_size=2.0)
    star = tmp_path / "shapes.star"
    rows = "\n".join(f"{i + 1:06d}@shapes.mrcs {int(c) + 1}" for i, c in enumerate(labels))
    star.write_text("\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnClassNumber #2\n" + rows + "\n")
    assert stack.exists()
    run, out = tmp_path / "run", tmp_path / "classes.star"
    code = cli.main(["-q", "train", str(star), "--model", "equivae", "--zdim", "2", "--gen-hidden", "32",
                     "--gen-layers", "1", "--cluster-dim", "3", "--likelihood", "gaussian", "--label-column",
                     "rlnClassNumber", "--batch-size", "8", "--epochs", "1", "--seed", "0", "--out", str(run)])
    assert code == 0
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["model"] == "equivae" and config["box"] == 16 and config["hidden"] == 32
    assert config["n_classes"] == 2 and config["layers"] == 1 and config["embed_dim"] == 3
    assert cli.main(["-q", "infer", str(run), "--out", str(out)]) == 0
    particles = ParticleStar(out).particles
    assert len(particles) == 24
    for column in ("pvaeZ1", "pvaeZStd1", "pvaePredictedClass", "pvaeClassProbability"):
        assert column in particles.columns, column
        assert np.isfinite(particles[column].to_numpy(float)).all(), column
    assert particles["pvaePredictedClass"].between(1, 2).all()
