"""Property tests for the pose and coordinate conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from particle_vae import conventions as cv


def gaussian_blob(box: int, centre=(0.0, 0.0), sigma=(3.0, 1.5), angle=0.0) -> torch.Tensor:
    """An anisotropic Gaussian (major axis along ``angle``, CCW from +x) at ``centre`` (px)."""
    grid = cv.pixel_grid(box, dtype=torch.float64) - torch.tensor(centre, dtype=torch.float64)
    rot = cv.rotation_matrix(torch.tensor(-angle, dtype=torch.float64))
    local = grid @ rot.T
    return torch.exp(-0.5 * ((local[..., 0] / sigma[0]) ** 2 + (local[..., 1] / sigma[1]) ** 2))


def test_box_centre_follows_relion():
    assert cv.box_centre(64) == 32 and cv.box_centre(65) == 32
    grid = cv.pixel_grid(5)
    assert grid[2, 2].tolist() == [0.0, 0.0]
    assert grid[0, 4].tolist() == [2.0, -2.0]  # row 0 is y = -2, col 4 is x = +2


def test_rotation_matrix_is_ccw_in_xy():
    r = cv.rotation_matrix(torch.tensor(math.pi / 2, dtype=torch.float64))
    assert torch.allclose(r @ torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12)


@given(st.floats(-20, 20, allow_nan=False))
def test_wrap_angle_range(theta):
    wrapped = cv.wrap_angle(theta)
    assert -math.pi < wrapped <= math.pi + 1e-12
    assert math.isclose(math.cos(wrapped), math.cos(theta), abs_tol=1e-9)
    assert math.isclose(math.sin(wrapped), math.sin(theta), abs_tol=1e-9)


def test_warp_translation_moves_content_opposite_to_t():
    blob = gaussian_blob(33)[None]
    out = cv.warp_images(blob, torch.zeros(1), torch.tensor([[3.0, -2.0]]))
    expected = gaussian_blob(33, centre=(-3.0, 2.0))[None]
    assert torch.allclose(out, expected, atol=1e-6)


def test_move_objects_rotates_ccw_and_displaces():
    box = 41
    blob = gaussian_blob(box, sigma=(5.0, 1.5), angle=0.0)[None]
    alpha, d = math.radians(30.0), (4.0, -3.0)
    moved = cv.move_objects(blob, torch.tensor([alpha]), torch.tensor([d]), mode="bicubic")
    expected = gaussian_blob(box, centre=d, sigma=(5.0, 1.5), angle=alpha)[None]
    assert (moved - expected).abs().max() < 0.02


def test_fourier_shift_matches_integer_roll():
    img = torch.randn(2, 16, 16, dtype=torch.float64)
    shifted = cv.fourier_shift(img, torch.tensor([[2.0, -3.0], [0.0, 1.0]]))
    assert torch.allclose(shifted[0], torch.roll(img[0], shifts=(-3, 2), dims=(0, 1)), atol=1e-10)
    assert torch.allclose(shifted[1], torch.roll(img[1], shifts=(1, 0), dims=(0, 1)), atol=1e-10)


@settings(max_examples=50, deadline=None)
@given(
    theta=st.floats(-math.pi, math.pi),
    tx=st.floats(-10, 10),
    ty=st.floats(-10, 10),
    apix=st.floats(0.5, 5.0),
)
def test_model_relion_round_trip(theta, tx, ty, apix):
    psi, ox, oy = cv.model_pose_to_relion([theta], [[tx, ty]], apix)
    theta2, t2 = cv.relion_to_model_pose(psi, ox, oy, apix)
    assert math.isclose(math.cos(theta2[0] - theta), 1.0, abs_tol=1e-9)
    np.testing.assert_allclose(t2[0], [tx, ty], atol=1e-9)
    # the RELION origin has the length of t (it is t rotated into the image frame)
    assert math.isclose(math.hypot(ox[0], oy[0]), apix * math.hypot(tx, ty), rel_tol=1e-9, abs_tol=1e-9)


def test_generator_pose_and_relion_pose_render_the_same_image():
    box, apix = 45, 1.7
    ref = gaussian_blob(box, centre=(2.0, 1.0), sigma=(6.0, 2.0), angle=0.3)[None]
    theta, t = torch.tensor([0.8]), torch.tensor([[2.5, -4.0]])
    by_model = cv.warp_images(ref, theta, t, mode="bicubic")
    psi, ox, oy = cv.model_pose_to_relion(theta.numpy(), t.numpy(), apix)
    by_relion = cv.apply_relion_pose(ref, psi, np.stack([ox, oy], -1), apix, mode="bicubic")
    assert torch.allclose(by_model, by_relion, atol=1e-6)


def test_object_pose_relion_truth_undoes_the_motion():
    box, apix = 49, 2.0
    ref = gaussian_blob(box, sigma=(7.0, 2.0), angle=0.0)[None]
    alpha, d = torch.tensor([1.1]), torch.tensor([[5.0, 3.0]])
    observed = cv.move_objects(ref, alpha, d, mode="bicubic")
    psi, ox, oy = cv.object_pose_to_relion(alpha.numpy(), d.numpy(), apix)
    assert math.isclose(psi[0], -math.degrees(1.1), abs_tol=1e-4)
    np.testing.assert_allclose([ox[0], oy[0]], [-10.0, -6.0])
    recovered = cv.undo_relion_pose(observed, psi, np.stack([ox, oy], -1), apix, mode="bicubic")
    assert (recovered - ref).abs().max() < 0.03


def test_object_pose_to_model_agrees_with_move_objects():
    ref = gaussian_blob(39, sigma=(6.0, 2.0))[None]
    theta, t = cv.object_pose_to_model([0.4], [[3.0, -1.0]])
    a = cv.warp_images(ref, theta, t)
    b = cv.move_objects(ref, torch.tensor([0.4]), torch.tensor([[3.0, -1.0]]))
    assert torch.allclose(a, b, atol=1e-6)


def test_undo_relion_pose_inverts_apply():
    box, apix = 51, 1.3
    ref = gaussian_blob(box, centre=(-2.0, 3.0), sigma=(5.0, 2.5), angle=-0.5)[None]
    psi, origin = np.array([-72.0]), np.array([[3.9, -6.5]])
    observed = cv.apply_relion_pose(ref, psi, origin, apix, mode="bicubic")
    recovered = cv.undo_relion_pose(observed, psi, origin, apix, mode="bicubic")
    assert (recovered - ref).abs().max() < 0.02


def test_euler_matrix_is_a_rotation_and_reduces_to_psi_in_plane():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-180, 180, size=(20, 3))
    mats = cv.euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    eye = np.einsum("bij,bkj->bik", mats, mats)
    np.testing.assert_allclose(eye, np.broadcast_to(np.eye(3), eye.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)
    # rot = tilt = 0: A^T restricted to the plane is R(psi), the 2D rule obs(x) = ref(R(psi) x)
    psi = 35.0
    a = cv.euler_to_matrix(0.0, 0.0, psi)[0]
    np.testing.assert_allclose(a[:2, :2].T, cv.rotation_matrix(torch.tensor(math.radians(psi), dtype=torch.float64)).numpy(), atol=1e-12)


@pytest.mark.parametrize("box", [32, 33])
def test_warp_identity_is_exact(box):
    img = torch.rand(3, box, box)
    out = cv.warp_images(img, torch.zeros(3), torch.zeros(3, 2))
    assert torch.allclose(out, img, atol=1e-5)


@pytest.mark.parametrize("box", [32, 33])
def test_mirror_images_maps_x_to_minus_x_and_is_its_own_inverse(box):
    blob = gaussian_blob(box, centre=(3.0, -2.0), sigma=(2.5, 1.2), angle=0.4)
    mirrored = cv.mirror_images(blob)
    expected = gaussian_blob(box, centre=(-3.0, -2.0), sigma=(2.5, 1.2), angle=-0.4)
    paired = slice(1 - box % 2, None)  # an even box's first column (x = -box / 2) has no mirror partner
    torch.testing.assert_close(mirrored[:, paired], expected[:, paired])
    torch.testing.assert_close(cv.mirror_images(mirrored), blob)


def test_projection_from_the_opposite_side_is_the_mirror_image():
    """Turning an object by 180 degrees about the y axis, ``(x, y, z) -> (-x, y, -z)``, mirrors its projection."""
    from particle_vae.data.simulation.projection import project_volume

    box = 16
    rng = np.random.default_rng(3)
    volume = torch.zeros(box, box, box, dtype=torch.float64)
    axis = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    for centre in rng.uniform(-4, 4, (4, 3)):  # (x, y, z) of an asymmetric cluster of blobs
        volume += torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 4.0)
    turned = torch.roll(volume.flip(0, 2), shifts=(1, 1), dims=(0, 2))  # [z, y, x]: z -> -z, x -> -x about box // 2
    front = project_volume(volume.numpy().astype(np.float32), 0.0, 0.0, 0.0)[0].double()
    back = project_volume(turned.numpy().astype(np.float32), 0.0, 0.0, 0.0)[0].double()
    torch.testing.assert_close(back, cv.mirror_images(front), atol=1e-4 * float(front.abs().max()), rtol=0)
    assert not torch.allclose(back, front, atol=0.05 * float(front.abs().max()))  # the object is not mirror-symmetric
