"""Benchmark metrics on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from particle_vae.analysis.metrics import circular_correlation, cluster_latents, clustering_accuracy, pearson


def test_clustering_accuracy_is_permutation_invariant():
    true = np.array([0, 0, 1, 1, 2, 2])
    assert clustering_accuracy(true, [5, 5, 3, 3, 9, 9]) == 1.0
    assert clustering_accuracy(true, [1, 1, 1, 1, 2, 2]) == pytest.approx(4 / 6)
    # more clusters than labels: only one cluster may map to each label
    assert clustering_accuracy([0, 0, 0, 0], [0, 1, 2, 3]) == 0.25


def test_circular_correlation_cases():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 2 * np.pi, 500)
    assert circular_correlation(a, a + 1.3) == pytest.approx(1.0)
    assert circular_correlation(a, -a) == pytest.approx(-1.0)
    assert abs(circular_correlation(a, rng.uniform(0, 2 * np.pi, 500))) < 0.1
    # wrapping does not matter
    assert circular_correlation(a, np.mod(a + 3.0, 2 * np.pi) - np.pi) == pytest.approx(1.0)
    assert math.isnan(circular_correlation(a, np.zeros_like(a)))


def test_circular_correlation_hand_computed():
    a = np.array([0.0, np.pi / 2])
    b = np.array([0.0, np.pi / 4])
    # means: pi/4 and pi/8; sin terms: (-s1, s1) and (-s2, s2)
    assert circular_correlation(a, b) == pytest.approx(1.0)
    assert circular_correlation(a, -b) == pytest.approx(-1.0)


def test_pearson():
    x = np.arange(10.0)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, np.ones(10)))


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_cluster_latents_recovers_separated_blobs(method):
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    labels = np.repeat(np.arange(3), 50)
    z = centres[labels] + rng.normal(scale=0.5, size=(150, 2))
    assert clustering_accuracy(labels, cluster_latents(z, 3, method)) == 1.0


# --------------------------------------------------------------------------- rotation sweep (TARGET-VAE appendix)


def test_rotation_sweep_rmse_is_zero_for_an_equivariant_prediction():
    from particle_vae.analysis.metrics import rotation_sweep_rmse

    alpha = 2 * np.pi * np.arange(160) / 160
    offsets = np.array([0.0, 2.5, -3.0])  # each image's own canonical angle, wrapped round freely
    predicted = offsets[:, None] - alpha[None, :]  # generator angle of an object turned by alpha is -alpha
    np.testing.assert_allclose(rotation_sweep_rmse(predicted, alpha), 0.0, atol=1e-12)
    np.testing.assert_allclose(rotation_sweep_rmse(np.mod(predicted, 2 * np.pi), alpha), 0.0, atol=1e-12)


def test_rotation_sweep_rmse_hand_computed():
    from particle_vae.analysis.metrics import rotation_sweep_rmse

    alpha = np.array([0.0, 0.5, 1.0, 1.5])
    # errors +d, -d, +d, -d around the constant 1.0: RMSE is d
    d = 0.2
    predicted = 1.0 - alpha + np.array([d, -d, d, -d])
    assert rotation_sweep_rmse(predicted[None], alpha)[0] == pytest.approx(d)
    # errors (0, 0, 0, 0.4): circular mean ~0.1, RMSE sqrt(mean([.1,.1,.1,.3]^2)) to first order
    predicted = -alpha + np.array([0.0, 0.0, 0.0, 0.4])
    error = np.array([0.0, 0.0, 0.0, 0.4])
    centre = np.arctan2(np.sin(error).mean(), np.cos(error).mean())
    assert rotation_sweep_rmse(predicted[None], alpha)[0] == pytest.approx(np.sqrt(((error - centre) ** 2).mean()))
    # the wrong sense of rotation is far from zero, and a constant prediction is as bad as chance
    alpha = 2 * np.pi * np.arange(160) / 160
    assert rotation_sweep_rmse(alpha[None], alpha)[0] > 1.5
    assert rotation_sweep_rmse(np.zeros((1, 160)), alpha)[0] == pytest.approx(np.pi / np.sqrt(3), rel=0.02)
    with pytest.raises(ValueError):
        rotation_sweep_rmse(np.zeros((2, 3)), alpha)


def test_mean_per_label():
    from particle_vae.analysis.metrics import mean_per_label

    assert mean_per_label([1.0, 3.0, 10.0], [7, 7, 2]) == {2: 10.0, 7: 2.0}


def test_rotation_sweep_reads_equivariant_angles_from_an_oracle():
    """rotation_sweep turns the images itself: an oracle that measures the angle of a
    bar through the box centre must give zero RMSE; the same oracle with the wrong
    sign must not."""
    import torch

    from particle_vae.analysis.evaluate import rotation_sweep
    from particle_vae.analysis.metrics import rotation_sweep_rmse
    from particle_vae.conventions import pixel_grid
    from particle_vae.models.base import Readout

    grid = pixel_grid(33, dtype=torch.float64)
    # an arrow: a bar along +x with a blob at its tip, so the angle is defined over 2 pi
    arrow = ((grid[..., 1].abs() < 1.5) & (grid[..., 0] > -8) & (grid[..., 0] < 12)).double()
    arrow += torch.exp(-((grid[..., 0] - 10) ** 2 + grid[..., 1] ** 2) / 8)

    class AngleOracle(torch.nn.Module):
        def __init__(self, sign: float):
            super().__init__()
            self.sign = sign

        def readout(self, images):
            w = images[:, 0].double()
            x, y = grid[..., 0], grid[..., 1]
            angle = torch.atan2((w * y).sum((1, 2)), (w * x).sum((1, 2)))  # direction of the mass centroid
            n = len(images)
            return Readout(-self.sign * angle, torch.zeros(n, 2), torch.zeros(n, 1), torch.ones(n, 1))

    canonical = arrow.numpy()[None].clip(0, 1)
    theta, alpha = rotation_sweep(AngleOracle(1.0), canonical, n_rotations=24)
    assert theta.shape == (1, 24)
    assert np.degrees(rotation_sweep_rmse(theta, alpha)[0]) < 2.0
    theta, alpha = rotation_sweep(AngleOracle(-1.0), canonical, n_rotations=24)
    assert np.degrees(rotation_sweep_rmse(theta, alpha)[0]) > 60.0


def _blob(n: int, x0: float, y0: float, sx: float = 2.0, sy: float = 2.0) -> np.ndarray:
    coords = np.arange(n) - n // 2
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return np.exp(-((x - x0) ** 2 / (2 * sx ** 2) + (y - y0) ** 2 / (2 * sy ** 2)))


def test_image_centre_of_mass_is_x_y_from_the_box_centre():
    from particle_vae.analysis.metrics import image_centre_of_mass

    np.testing.assert_allclose(image_centre_of_mass(_blob(33, 3.0, -2.0)), [3.0, -2.0], atol=1e-3)
    # a constant background and negative fringes do not pull the centre
    image = _blob(32, -4.0, 1.0) + 5.0 - 0.3 * _blob(32, 6.0, 6.0, 1.0, 1.0)
    np.testing.assert_allclose(image_centre_of_mass(image), [-4.0, 1.0], atol=0.05)


def test_rotational_correlation_finds_the_turn_and_anisotropy_separates_shapes():
    import torch

    from particle_vae.analysis.metrics import anisotropy, rotational_correlation
    from particle_vae.conventions import move_objects

    bar = _blob(33, 0.0, 0.0, 6.0, 1.5) + _blob(33, 5.0, 0.0, 1.5, 1.5)  # asymmetric: angle defined over 2 pi
    turned = move_objects(torch.as_tensor(bar[None]), np.radians([40.0]), np.zeros((1, 2))).numpy()[0]
    angles, correlation = rotational_correlation(turned, bar)
    # turning the observed image back by -40 degrees (i.e. by 320) matches the reference
    assert angles[correlation.argmax()] == pytest.approx(320.0, abs=1.0) and correlation.max() > 0.99
    assert anisotropy(bar) > 0.5 and anisotropy(_blob(33, 0.0, 0.0)) < 0.15  # 1-px rings leave a small floor
    # the mean of many randomly turned bars is nearly round
    turns = move_objects(torch.as_tensor(np.repeat(bar[None], 200, 0)), np.random.default_rng(0).uniform(0, 2 * np.pi, 200),
                         np.zeros((200, 2))).numpy().mean(0)
    assert anisotropy(turns) < 0.3 * anisotropy(bar)
