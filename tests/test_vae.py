"""Plain VAE / beta-VAE baseline."""

from __future__ import annotations

import pytest
import torch

from particle_vae.models import VAE, VAEConfig, build_model
from particle_vae.models.base import learnable_state, load_learnable_state


def test_vae_loss_readout_and_rebuild(tmp_path):
    torch.manual_seed(0)
    model = VAE(VAEConfig(box=12, zdim=3, hidden=16, beta=4.0))
    images = torch.rand(5, 1, 12, 12)
    terms = model.loss(images)
    # beta weights the KL in the objective but the reported ELBO is the true one
    assert torch.isclose(terms.loss, terms.terms["recon"] + 4.0 * terms.terms["kl_z"], rtol=1e-5)
    assert torch.isclose(terms.elbo, -(terms.terms["recon"] + terms.terms["kl_z"]), rtol=1e-5)
    terms.loss.backward()
    out = model.readout(images)
    assert out.z_mean.shape == (5, 3) and (out.theta == 0).all() and (out.t == 0).all()
    assert model.decode(out.z_mean, out.theta, out.t).shape == (5, 12, 12)
    twin = build_model(model.config_dict())
    load_learnable_state(twin, learnable_state(model))
    assert torch.equal(twin.readout(images).z_mean, out.z_mean)


def test_vae_gaussian_and_invalid_settings():
    model = VAE(VAEConfig(box=8, likelihood="gaussian"))
    assert torch.isfinite(model.loss(torch.randn(2, 1, 8, 8)).loss)
    with pytest.raises(ValueError, match="likelihood"):
        VAE(VAEConfig(box=8, likelihood="poisson"))


def test_vae_learns_a_constant_image():
    torch.manual_seed(1)
    model = VAE(VAEConfig(box=8, zdim=2, hidden=32))
    images = torch.zeros(16, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(images).elbo.item()
    for _ in range(60):
        terms = model.loss(images)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    assert terms.elbo.item() > first + 20
