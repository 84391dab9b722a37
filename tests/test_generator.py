"""Tests for the coordinate-MLP generator and its random Fourier features."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from particle_vae import conventions as cv
from particle_vae.nn.generator import RandomFourierFeatures, SpatialGenerator, interleave_weight

BOX = 33


pytestmark = pytest.mark.usefixtures("single_thread")


def make_generator(box: int = BOX, zdim: int = 3, seed: int = 0, **kwargs) -> SpatialGenerator:
    torch.manual_seed(1234)
    settings_ = {"hidden": 32, "n_layers": 3, "n_features": 16, "bandwidth": 0.1, "seed": seed}
    settings_.update(kwargs)
    return SpatialGenerator(box, zdim, **settings_)


def mlp_at(gen: SpatialGenerator, z: torch.Tensor | None, points: torch.Tensor) -> torch.Tensor:
    """Evaluate the generator's canonical object f at normalised coordinates ``points (B, P, 2)``."""
    feats = gen.features(points) if gen.features is not None else points
    hidden = gen.coord_branch(feats)
    if gen.latent_branch is not None:
        hidden = hidden + gen.latent_branch(z)[:, None, :]
    return gen.trunk(hidden)[..., 0]


# ---------------------------------------------------------------------------
# RandomFourierFeatures
# ---------------------------------------------------------------------------

def test_fourier_features_shape_and_range():
    rff = RandomFourierFeatures(12, sigma=2.0, seed=3)
    assert rff.out_features == 24 and rff.frequencies.shape == (12, 2)
    coords = torch.randn(4, 7, 2)
    out = rff(coords)
    assert out.shape == (4, 7, 24)
    cos, sin = out[..., :12], out[..., 12:]
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones_like(cos))
    # definition: [cos(2 pi B x), sin(2 pi B x)]. Here and in the module the float32 phase is rounded a few times
    # (scaling, two products, their sum) in another order, each time by up to 2^-24 of the terms' size
    # 2 pi |B| |x| (phases up to ~100 rad): cos and sin move by no more than the phase does, plus their own
    # rounding (an ulp of 1 on each side), whichever vectorised sin/cos and product kernels the CPU has
    phase = 2 * math.pi * coords @ rff.frequencies.T
    reach = 2 * math.pi * coords.abs() @ rff.frequencies.abs().T
    bound = 8 * 2.0 ** -24 * reach + 2.0 ** -22
    assert ((cos - torch.cos(phase)).abs() <= bound).all(), float(((cos - torch.cos(phase)).abs() / bound).max())
    assert ((sin - torch.sin(phase)).abs() <= bound).all(), float(((sin - torch.sin(phase)).abs() / bound).max())
    # at the origin every feature is cos = 1, sin = 0
    origin = rff(torch.zeros(1, 2))
    assert torch.equal(origin, torch.cat([torch.ones(1, 12), torch.zeros(1, 12)], -1))


def test_fourier_features_deterministic_by_seed_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = RandomFourierFeatures(8, 1.0, seed=5)
    torch.manual_seed(1)
    b = RandomFourierFeatures(8, 1.0, seed=5)
    c = RandomFourierFeatures(8, 1.0, seed=6)
    assert torch.equal(a.frequencies, b.frequencies)
    assert not torch.equal(a.frequencies, c.frequencies)
    # the global RNG is not consumed
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    RandomFourierFeatures(8, 1.0, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_fourier_features_bandwidth_scales_frequencies():
    base = RandomFourierFeatures(64, 1.0, seed=2)
    for sigma in (0.1, 3.0):
        scaled = RandomFourierFeatures(64, sigma, seed=2)
        torch.testing.assert_close(scaled.frequencies, sigma * base.frequencies)
    wide = RandomFourierFeatures(4096, 0.5, seed=0)
    assert abs(wide.frequencies.std().item() - 0.5) < 0.02
    # the features are a persistent buffer (saved with the model), not parameters
    assert "frequencies" in base.state_dict() and not list(base.parameters())


def test_generator_bandwidth_is_in_cycles_per_pixel():
    """The same bandwidth gives the same feature phase at the same pixel offset for any box."""
    small, large = make_generator(box=33, n_features=32), make_generator(box=65, n_features=32)
    pixel = torch.tensor([[5.0, -3.0]])
    feat_small = small.features(pixel / cv.grid_half_width(33))
    feat_large = large.features(pixel / cv.grid_half_width(65))
    torch.testing.assert_close(feat_small, feat_large, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.features.frequencies / cv.grid_half_width(33),
                               large.features.frequencies / cv.grid_half_width(65))


# ---------------------------------------------------------------------------
# SpatialGenerator
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("zdim, n_features, n_layers", [(3, 16, 3), (0, 16, 2), (2, 0, 1), (1, 8, 0)])
def test_generator_shapes(zdim, n_features, n_layers):
    gen = make_generator(zdim=zdim, n_features=n_features, n_layers=n_layers)
    z = torch.randn(4, zdim) if zdim else None
    out = gen(z, torch.zeros(4), torch.zeros(4, 2))
    assert out.shape == (4, BOX, BOX) and torch.isfinite(out).all()
    assert (gen.latent_branch is None) == (zdim == 0)
    assert (gen.features is None) == (n_features == 0)
    linears = [m for m in gen.trunk if isinstance(m, torch.nn.Linear)]
    assert len(linears) == max(n_layers - 1, 0) + 1 and linears[-1].out_features == 1
    # the pixel grid is a non-persistent buffer
    assert "grid" not in gen.state_dict()
    torch.testing.assert_close(gen.grid, cv.normalized_grid(BOX).reshape(-1, 2))


def test_generator_depends_on_z_and_is_batch_independent():
    gen = make_generator()
    torch.manual_seed(0)
    z = torch.randn(3, 3)
    theta, t = torch.tensor([0.0, 0.5, -1.0]), torch.tensor([[0.0, 0.0], [0.1, -0.2], [0.3, 0.05]])
    out = gen(z, theta, t)
    assert not torch.allclose(gen(z + 1, theta, t), out)
    for i in range(3):
        torch.testing.assert_close(gen(z[i:i + 1], theta[i:i + 1], t[i:i + 1])[0], out[i], atol=1e-6, rtol=1e-5)


def test_zdim_zero_ignores_z():
    gen = make_generator(zdim=0)
    theta, t = torch.tensor([0.3, 1.0]), torch.tensor([[0.1, 0.0], [0.0, -0.1]])
    out = gen(None, theta, t)
    torch.testing.assert_close(gen(torch.zeros(2, 0), theta, t), out)
    # pose only: identical poses give identical images
    torch.testing.assert_close(gen(None, theta[:1].expand(2), t[:1].expand(2, 2)), out[:1].expand(2, -1, -1))


def _pose_reference(gen: SpatialGenerator, z, theta, t) -> torch.Tensor:
    """f(R(theta) x + t) with R written out by hand (independent of conventions.transform_coordinates)."""
    grid = cv.normalized_grid(gen.box)  # (N, N, 2): (x, y)
    x, y = grid[..., 0].reshape(-1), grid[..., 1].reshape(-1)
    c, s = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    px = c * x - s * y + t[:, 0:1]
    py = s * x + c * y + t[:, 1:2]
    return mlp_at(gen, z, torch.stack([px, py], -1)).reshape(-1, gen.box, gen.box)


@settings(max_examples=25, deadline=None)
@given(
    theta=st.floats(-7.0, 7.0, allow_nan=False),
    tx=st.floats(-1.0, 1.0, allow_nan=False),
    ty=st.floats(-1.0, 1.0, allow_nan=False),
)
def test_pose_acts_as_f_of_rotated_plus_translated_coordinates(theta, tx, ty):
    gen = make_generator()
    z = torch.linspace(-1.0, 1.0, 3)[None]
    theta_t, t = torch.tensor([theta]), torch.tensor([[tx, ty]])
    out = gen(z, theta_t, t)
    torch.testing.assert_close(out, _pose_reference(gen, z, theta_t, t), atol=1e-5, rtol=1e-5)
    # and via the shared convention helper
    coords = cv.transform_coordinates(cv.normalized_grid(BOX), theta_t, t)  # (1, N, N, 2)
    torch.testing.assert_close(out, mlp_at(gen, z, coords.reshape(1, -1, 2)).reshape(1, BOX, BOX), atol=1e-5, rtol=1e-5)


def test_rotation_by_quarter_turns_is_rot90_and_whole_pixel_shift_is_a_crop():
    gen = make_generator(seed=4)
    torch.manual_seed(2)
    z = torch.randn(2, 3)
    zero = torch.zeros(2, 2)
    base = gen(z, torch.zeros(2), zero)
    for k in (1, 2, 3, -1):
        turned = gen(z, torch.full((2,), k * math.pi / 2), zero)
        # torch.rot90(img, 1)(x) = img(R(pi/2) x) in (x = col, y = row) coordinates
        torch.testing.assert_close(turned, torch.rot90(base, k, (-2, -1)), atol=1e-5, rtol=1e-4)
    # t = (3, -2) px: out[row, col] = base[row - 2, col + 3]
    half = cv.grid_half_width(BOX)
    moved = gen(z, torch.zeros(2), torch.tensor([[3.0, -2.0]] * 2) / half)
    torch.testing.assert_close(moved[:, 2:, :BOX - 3], base[:, :BOX - 2, 3:], atol=1e-5, rtol=1e-4)
    # rotation then translation compose as f(R x + t): theta = pi/2 and t = (3, -2) px
    both = gen(z, torch.full((2,), math.pi / 2), torch.tensor([[3.0, -2.0]] * 2) / half)
    expected, valid = _rotated_then_shifted(base, 3, -2)
    assert valid.sum() > BOX * BOX // 2
    torch.testing.assert_close(both[:, valid], expected[:, valid], atol=1e-5, rtol=1e-4)


def _rotated_then_shifted(base: torch.Tensor, tx: int, ty: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixelwise f(R(pi/2) x + t) read off the unposed image f, and where it is inside the box."""
    n = base.shape[-1]
    c = n // 2
    out = torch.zeros_like(base)
    valid = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        for col in range(n):
            x, y = col - c, row - c
            sx, sy = -y + tx, x + ty  # R(pi/2) (x, y) + t
            r2, c2 = sy + c, sx + c
            if 0 <= r2 < n and 0 <= c2 < n:
                out[:, row, col] = base[:, r2, c2]
                valid[row, col] = True
    return out, valid


def test_generator_matches_warp_images_convention():
    """g(x) = f(R x + t) is what conventions.warp_images does to the canonical image."""
    gen = make_generator(seed=5, bandwidth=0.05)
    torch.manual_seed(3)
    z = torch.randn(1, 3)
    base = gen(z, torch.zeros(1), torch.zeros(1, 2))
    half = cv.grid_half_width(BOX)
    for theta, t_px in ((math.pi / 2, (2.0, 1.0)), (math.pi, (-3.0, 0.0)), (0.0, (4.0, -5.0))):
        posed = gen(z, torch.tensor([theta]), torch.tensor([t_px]) / half)
        warped = cv.warp_images(base, torch.tensor([theta]), torch.tensor([t_px]), mode="nearest")
        inside = (cv.transform_coordinates(cv.pixel_grid(BOX), torch.tensor([theta]), torch.tensor([t_px]))[0].abs()
                  <= BOX // 2).all(-1)
        torch.testing.assert_close(posed[0][inside], warped[0][inside], atol=1e-5, rtol=1e-4)


def test_generator_is_differentiable_in_pose_and_z():
    gen = make_generator()
    z = torch.randn(2, 3, requires_grad=True)
    theta = torch.tensor([0.2, -0.4], requires_grad=True)
    t = torch.tensor([[0.1, 0.0], [0.0, 0.1]], requires_grad=True)
    gen(z, theta, t).pow(2).sum().backward()
    for value in (z, theta, t):
        assert value.grad is not None and torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0


def test_generator_float64():
    gen = make_generator().double()
    out = gen(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    assert out.dtype == torch.float64


# ---------------------------------------------------------------------------
# Separable features on the posed grid (the fast path of the generator)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("box", [8, 9, 33])
def test_grid_features_match_features_of_transformed_coordinates_with_gradients(box):
    features = RandomFourierFeatures(24, 1.5, seed=3).double()
    axis = cv.normalized_grid(box, dtype=torch.float64)[0, :, 0]
    grid = cv.normalized_grid(box, dtype=torch.float64).reshape(-1, 2)
    theta = torch.tensor([0.3, -2.0, 4.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.1, -0.2], [0.0, 0.3], [-0.5, 0.05]], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, box * box, 48, dtype=torch.float64)

    fast = features.on_grid(axis, theta, t)
    (fast * weights).sum().backward()
    fast_grads = theta.grad.clone(), t.grad.clone()
    theta.grad = t.grad = None
    slow = features(cv.transform_coordinates(grid, theta, t))
    slow = slow.view(3, box * box, 2, 24).transpose(-1, -2).reshape(3, box * box, 48)  # interleaved channels
    (slow * weights).sum().backward()

    assert fast.shape == slow.shape == (3, box * box, 48)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast_grads[0], theta.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fast_grads[1], t.grad, rtol=1e-9, atol=1e-9)


def test_generator_under_bf16_autocast_stays_close_to_float32():
    gen = make_generator(box=16, hidden=64, n_features=32)
    z = torch.randn(4, 3)
    theta = torch.tensor([0.0, 1.0, 2.0, -1.0])
    t = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, -0.2], [0.05, 0.05]])
    reference = gen(z, theta, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gen(z, theta, t)
    assert mixed.shape == reference.shape
    scale = reference.abs().max()
    # bf16 keeps 8 significant bits (a rounding moves a value by up to 2^-8 of itself): four linear layers in a
    # row, each rounding its input, weights and output (products summed in float32), plus the rounded sum of the
    # coordinate and latent branches: 13 roundings along the chain (the phases stay in float32)
    assert (mixed.float() - reference).abs().max() < 13 * 2.0 ** -8 * scale


def test_interleaved_weight_gives_the_same_product():
    features = RandomFourierFeatures(5, 1.0, seed=1)
    coords = torch.randn(7, 2)
    weight = torch.randn(3, 10)
    flat = features(coords)
    interleaved = flat.view(7, 2, 5).transpose(1, 2).reshape(7, 10)
    torch.testing.assert_close(interleaved @ interleave_weight(weight).T, flat @ weight.T)
