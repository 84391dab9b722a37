"""Refinement classes brought into one frame (particle_vae.engine.refine.register_frames and friends)."""

from __future__ import annotations

import numpy as np
import torch
from test_pose_search import angle_error, particles_of, template

from particle_vae.analysis.metrics import image_centre_of_mass
from particle_vae.conventions import move_objects, undo_relion_pose
from particle_vae.engine.refine import RefineResult, apply_registration, register_frames, resample_image

BOX = 48


def turned(image: torch.Tensor, degrees) -> np.ndarray:
    """Copies of ``image`` turned counter-clockwise by each angle: ``(len(degrees), N, N)``."""
    degrees = np.atleast_1d(np.asarray(degrees, dtype=np.float64))
    stack = image[None].expand(len(degrees), -1, -1).contiguous()
    return move_objects(stack, np.radians(degrees), np.zeros((len(degrees), 2)), mode="bicubic").numpy()


def blurred(image: np.ndarray, sigma_px: float) -> np.ndarray:
    n = image.shape[-1]
    f = np.fft.fftfreq(n)
    gauss = np.exp(-2 * (np.pi * sigma_px) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    return np.fft.ifft2(np.fft.fft2(image) * gauss).real


def test_turned_copies_of_one_object_are_turned_back_onto_the_drawing_frame():
    """Three classes hold the same object in frames turned by 35, -100 and 170 degrees; the drawings
    (blurred) are upright: each class gets minus its frame's turn, within half a degree."""
    shape = template(BOX, 0)
    frames = np.array([35.0, -100.0, 170.0])
    references = turned(shape, frames)
    drawings = np.stack([blurred(shape.numpy(), 2.0)] * 3)
    registration = register_frames(references, drawings)
    assert (registration.group == 0).all()
    assert angle_error(registration.angle_deg, -frames).max() < 0.5, registration.angle_deg
    assert registration.drawing_correlation.min() > 0.8


def triangle(box: int = BOX) -> torch.Tensor:
    """Three blobs at the corners of a triangle, one larger: a shape that no turn of :func:`template` matches
    (its anisotropic part is mostly three-fold, the template's mostly two-fold)."""
    grid = np.arange(box) - box // 2
    y, x = np.meshgrid(grid, grid, indexing="ij")
    corners = [(10 * np.cos(a), 10 * np.sin(a), w) for a, w in zip(np.radians([90, 210, 330]), (1.0, 1.0, 1.4))]
    image = sum(w * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 3.0 ** 2)) for cx, cy, w in corners)
    return torch.as_tensor(image)


def test_two_objects_form_two_groups_each_turned_onto_its_own_drawings():
    first, second = template(BOX, 0), triangle()
    references = np.concatenate([turned(first, [20.0, -60.0]), turned(second, [90.0, 5.0])])
    drawings = np.stack([first.numpy(), first.numpy(), second.numpy(), second.numpy()])
    registration = register_frames(references, drawings)
    assert registration.group[0] == registration.group[1] != registration.group[2] == registration.group[3]
    assert angle_error(registration.angle_deg, [-20.0, 60.0, -90.0, -5.0]).max() < 0.5, registration.angle_deg


def test_a_group_is_turned_by_its_drawings_together_not_by_one_bad_drawing():
    """Four classes of one object; one drawing (of a small class) is turned by 90 degrees. Alone it would
    turn its class by 90 degrees against the others; weighted by class size the group stays together and upright."""
    shape = template(BOX, 0)
    frames = np.array([10.0, -30.0, 50.0, 120.0])
    references = turned(shape, frames)
    drawings = np.concatenate([np.stack([shape.numpy()] * 3), turned(shape, [90.0])])
    registration = register_frames(references, drawings, weights=np.array([100, 80, 90, 10]))
    assert angle_error(registration.angle_deg, -frames).max() < 0.5, registration.angle_deg


def test_an_unmatched_class_stays_apart_and_a_round_object_keeps_a_finite_turn():
    """A round blob matches no asymmetric reference (its own group) and has no anisotropic part to align:
    the turn is whatever the flat curve gives, finite, and changes nothing that can be seen."""
    shape = template(BOX, 0)
    grid = np.arange(BOX) - BOX // 2
    round_blob = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 6.0 ** 2))
    references = np.concatenate([turned(shape, [30.0]), round_blob[None]])
    drawings = np.stack([shape.numpy(), round_blob])
    registration = register_frames(references, drawings)
    assert registration.group[0] != registration.group[1]
    assert np.isfinite(registration.angle_deg).all()
    assert angle_error(registration.angle_deg[0], -30.0) < 0.5


def test_applied_turn_keeps_particles_aligned_with_their_turned_reference():
    """Particles made from a reference with known (psi, origin) and refined into a frame turned by 40 degrees:
    after apply_registration, undoing each particle's new pose gives the turned reference (origins unchanged)."""
    rng = np.random.default_rng(0)
    shape = template(BOX, 0)
    psi = rng.uniform(-180, 180, 6)
    origin_px = rng.uniform(-2, 2, (6, 2))
    particles = particles_of(shape, psi, origin_px, None)
    # the class reference of the refinement is the object turned by 40 degrees, and the poses are relative to it
    frame = 40.0
    class_reference = turned(shape, [frame])
    refined_psi = psi + frame  # particle = the class reference turned by -(frame + psi)
    result = RefineResult(classes=np.zeros(6, np.int64), psi_deg=refined_psi, origin_px=origin_px, psi_std_deg=np.zeros(6),
                          probability=np.ones(6), class_probability=np.ones(6), references=class_reference.astype(np.float32),
                          counts=np.array([6]), resolution_shells=[])
    aligned_before = undo_relion_pose(particles, refined_psi, origin_px, 1.0, mode="bicubic").numpy()
    assert np.abs(aligned_before - class_reference).max() < 0.05 * np.abs(class_reference).max()
    registration = register_frames(class_reference, shape.numpy()[None])
    moved = apply_registration(result, registration)
    assert angle_error(moved.psi_deg, psi).max() < 0.5
    assert np.array_equal(moved.origin_px, origin_px)
    aligned = undo_relion_pose(particles, moved.psi_deg, moved.origin_px, 1.0, mode="bicubic").numpy()
    scale = np.abs(shape.numpy()).max()
    assert np.abs(aligned - shape.numpy()).max() < 0.05 * scale
    assert np.abs(moved.references[0] - shape.numpy()).max() < 0.05 * scale


def test_resample_image_keeps_the_centre_and_the_physical_size():
    """A Gaussian of sigma 8 A drawn at 2 A/px and at 4 A/px: resampling one grid onto the other gives the other."""
    def gaussian(box, apix, centre_angst=(6.0, -4.0)):
        grid = (np.arange(box) - box // 2) * apix
        return np.exp(-((grid[None, :] - centre_angst[0]) ** 2 + (grid[:, None] - centre_angst[1]) ** 2) / (2 * 8.0 ** 2))

    fine, coarse = gaussian(64, 2.0), gaussian(32, 4.0)
    down = resample_image(fine, 2.0, 32, 4.0)
    up = resample_image(coarse, 4.0, 64, 2.0)
    assert np.abs(down - coarse).max() < 0.02
    # upsampling interpolates bilinearly: error at most h^2/8 (|f_xx| + |f_yy|) = 1/8 * 2/sigma^2 = 0.0625 (h = 1 coarse px,
    # sigma = 2 coarse px, peak 1)
    assert np.abs(up - fine).max() < 0.0625
    assert np.allclose(image_centre_of_mass(down), np.array([6.0, -4.0]) / 4.0, atol=0.05)
    assert resample_image(fine, 2.0, 64, 2.0) is not fine and np.array_equal(resample_image(fine, 2.0, 64, 2.0), fine)
