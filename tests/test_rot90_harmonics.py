"""The first group convolution through its quarter-turn harmonics (particle_vae.nn.rot90_harmonics)
against the direct convolution, and its use by the encoder at inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from particle_vae.nn.equivariant import GroupConvEncoder
from particle_vae.nn.rot90_harmonics import (
    filters_are_quarter_turn_symmetric,
    harmonic_filters,
    orbit_images,
    orbit_taps,
    quarter_turn_group_conv,
)


def random_encoder(group_order: int, kernel: int, padding: int, fields: int = 6, seed: int = 0) -> GroupConvEncoder:
    torch.manual_seed(seed)
    encoder = GroupConvEncoder(group_order, 5, n_fields=fields, kernel=kernel, padding=padding, mixing="shared")
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0.0, 0.3)  # biases too: zero biases would hide a wrong bias layout
    return encoder.eval()


@pytest.mark.parametrize("kernel", [1, 2, 5, 8, 9, 28])
def test_orbits_cover_every_tap_once_and_follow_the_quarter_turn(kernel):
    rows, cols = orbit_taps(kernel)
    taps = (rows * kernel + cols).reshape(-1).tolist()
    centre = [(kernel // 2) * kernel + kernel // 2] if kernel % 2 else []
    assert sorted(taps + centre) == list(range(kernel * kernel))
    # rho(i, j) = (j, K-1-i), the map under which torch.rot90(w, 1, (-2, -1)) moves a value
    for k in range(3):
        assert torch.equal(rows[k + 1], cols[k]) and torch.equal(cols[k + 1], kernel - 1 - rows[k])
    grid = torch.arange(kernel * kernel).view(kernel, kernel)
    turned = torch.rot90(grid, 1, (-2, -1))
    assert torch.equal(turned[rows[0], cols[0]], grid[rows[1], cols[1]])


@pytest.mark.parametrize("group_order", [4, 8, 16])
def test_e2cnn_filters_have_the_quarter_turn_symmetry(group_order):
    encoder = random_encoder(group_order, 9, 2)
    assert filters_are_quarter_turn_symmetric(encoder.layers[0].filter, group_order)
    bias = encoder.layers[0].expanded_bias.view(-1, group_order)
    assert torch.equal(bias, bias[:, :1].expand_as(bias))  # one bias per field, as the harmonic path assumes
    assert not filters_are_quarter_turn_symmetric(torch.randn(8 * 3, 1, 9, 9), 8)
    assert not filters_are_quarter_turn_symmetric(encoder.layers[0].filter, 6)  # r not divisible by 4


def test_orbit_images_gather_the_rotated_windows():
    padded = torch.randn(2, 12, 12, dtype=torch.float64)
    kernel = 5
    rows, cols = orbit_taps(kernel)
    gathered = orbit_images(padded, kernel)
    size = 12 - kernel + 1
    assert gathered.shape == (4, 2, size, size, rows.shape[1])
    windows = padded.unfold(1, kernel, 1).unfold(2, kernel, 1)  # (B, M, M, K, K)
    torch.testing.assert_close(gathered, windows[:, :, :, rows, cols].permute(3, 0, 1, 2, 4), rtol=0, atol=0)
    bf16 = orbit_images(padded.to(torch.bfloat16), kernel)  # gathered by bit pattern, any 2/4/8-byte dtype
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, gathered.to(torch.bfloat16))


@pytest.mark.parametrize("group_order,kernel,padding", [(8, 28, 8), (8, 17, 2), (4, 9, 3), (16, 6, 1), (8, 3, 0)])
def test_harmonic_convolution_equals_the_direct_one_in_float64(group_order, kernel, padding):
    # (a copy: .double() on the e2cnn module would also convert the sampled basis e2cnn shares between layers)
    first = random_encoder(group_order, kernel, padding).layers[0]
    weight, bias = first.filter.double(), first.expanded_bias.double()  # field-major channels f r + j
    images = torch.randn(3, 1, 30, 30, dtype=torch.float64)
    direct = F.conv2d(images, weight, bias, padding=padding)  # (B, C r, M, M)
    padded = F.pad(images[:, 0], (padding,) * 4)
    out = quarter_turn_group_conv(padded, harmonic_filters(weight, bias, group_order), kernel)  # (4, B, M, M, (j, f))
    quarters, batch, size, _, _ = out.shape
    fields = weight.shape[0] // group_order
    # [m, b, y, x, j, f] -> channel f r + (j + (r/4) m)
    out = out.view(quarters, batch, size, size, group_order // 4, fields).permute(1, 5, 0, 4, 2, 3)
    torch.testing.assert_close(out.reshape(batch, fields * group_order, size, size), direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("group_order,kernel", [(8, 28), (4, 9), (8, 7)])
def test_encoder_inference_path_equals_the_training_path(group_order, kernel):
    """Under no_grad on the CPU the encoder takes the harmonic path; with gradients the direct one."""
    encoder = random_encoder(group_order, kernel, 4, fields=8)
    images = torch.randn(2, 1, 34, 34)
    direct = encoder(images).detach()
    with torch.no_grad():
        fast = encoder(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = encoder(images)
    assert encoder._harmonics_cache[1] is not None  # the harmonic path ran
    scale = direct.abs().max()
    # float32 both ways, the first layer's 784 (or fewer) products summed in another order: a reordered float32 sum
    # moves by about sqrt(n) * 2^-24 of its terms' size (28 * 6e-8 here), far below 1e-5 of the outputs' size
    assert (fast - direct).abs().max() < 1e-5 * scale
    # bf16: the first layer rounds its input, filters and output, each 1 x 1 layer its weights and output (9
    # roundings of up to 2^-8 along the chain; measured: about 2 of them)
    assert (half.float() - direct).abs().max() < 9 * 2.0 ** -8 * scale


def test_encoder_falls_back_where_the_symmetry_does_not_hold():
    encoder = random_encoder(6, 9, 2)  # C6: no quarter turn in the group
    images = torch.randn(2, 1, 20, 20)
    direct = encoder(images).detach()
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), direct, rtol=1e-5, atol=1e-5)
    assert getattr(encoder, "_harmonics_cache", None) is None


def test_harmonic_filters_follow_new_weights():
    """The eval-mode cache is keyed by e2cnn's expanded filter: new weights give new harmonics."""
    encoder = random_encoder(8, 9, 2)
    images = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        before = encoder(images)
        encoder.train()
        encoder.layers[0].weights.mul_(-1.0)
        encoder.eval()  # e2cnn re-expands the filter here
        after = encoder(images)
    direct = encoder(images).detach()
    torch.testing.assert_close(after, direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        encoder.layers[1].weight.mul_(0.5)  # the 1x1 weights are cached in the products' dtype too
        halved = encoder(images)
    torch.testing.assert_close(halved, encoder(images).detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(halved, after)


def test_readout_of_the_published_mnist_model_equals_the_direct_path():
    """The inference fast path (harmonic first layer, chunks in threads) at the paper's MNIST
    setting (kernel 28, P8) gives the readout of the plain computation."""
    from particle_vae.models.target_vae import TargetVAE, TargetVAEConfig

    torch.manual_seed(3)
    model = TargetVAE(TargetVAEConfig(box=50, group_order=8, n_fields=32, kernel=28, padding=8, mixing="shared",
                                      gen_hidden=16, n_fourier=16)).eval()
    images = torch.rand(7, 1, 50, 50)
    fast = model.readout(images)
    with torch.enable_grad():
        direct = model._readout_batch(images)  # gradients on: the direct convolution
    for name in ("theta", "t", "z_mean", "z_std"):
        torch.testing.assert_close(getattr(fast, name), getattr(direct, name).detach(), rtol=1e-4, atol=1e-4)
    for key in direct.extra:
        torch.testing.assert_close(fast.extra[key], direct.extra[key].detach(), rtol=1e-4, atol=1e-5)
