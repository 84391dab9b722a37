"""The LeakyReLU slope is a TARGET-VAE config value that reaches every code path of encoder and generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from particle_vae.models import build_model
from particle_vae.models.target_vae import TargetVAEConfig

SMALL = {"box": 16, "zdim": 2, "group_order": 8, "n_fields": 4, "kernel": 9, "padding": 2, "gen_hidden": 16, "gen_layers": 2,
         "n_fourier": 8}


def small_model(**settings):
    torch.manual_seed(0)
    return build_model({"model": "target-vae", **SMALL, **settings})


def test_the_default_slope_is_the_one_every_earlier_run_used():
    assert TargetVAEConfig(box=16).leaky_relu_slope == 0.2
    model = small_model()
    slopes = {m.negative_slope for m in model.generator.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2} and model.encoder.leaky_relu_slope == 0.2


@pytest.mark.parametrize("mixing", ["full", "shared"])
def test_slope_reaches_encoder_and_generator(mixing):
    images = torch.randn(3, 1, 16, 16)
    default, authors = small_model(mixing=mixing), small_model(mixing=mixing, leaky_relu_slope=0.01)
    authors.load_state_dict(default.state_dict())
    slopes = {m.negative_slope for m in authors.generator.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    with torch.no_grad():
        assert not torch.allclose(default.encoder(images), authors.encoder(images))
    # the CPU inference path (quarter-turn harmonics, no autograd) and the training path agree at the new slope
    authors.eval()
    with torch.enable_grad():
        training_path = authors.encoder(images).detach()
    with torch.no_grad():
        inference_path = authors.encoder(images)
    scale = training_path.abs().max().item()
    assert torch.allclose(inference_path.float(), training_path.float(), rtol=0, atol=1e-4 * scale)


def test_slope_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="LeakyReLU slope"):
        TargetVAEConfig(box=16, leaky_relu_slope=-0.1).validate()
