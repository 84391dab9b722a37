"""Centred origins at inference: where the generator draws its object at pose zero."""

from __future__ import annotations

import numpy as np
import torch

from particle_vae.conventions import pixel_grid
from particle_vae.engine.inference import InferenceResult, generator_centres, result_columns


class BlobGenerator(torch.nn.Module):
    """Draws a Gaussian blob at pose zero whose centre is ``(2 z_0, -z_1)`` pixels (x, y)."""

    zdim = 2
    box = 33

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # decode_at_pose_zero asks the parameters for the device

    def decode(self, z, theta, t):
        assert torch.all(theta == 0) and torch.all(t == 0)
        centre = torch.stack([2 * z[:, 0], -z[:, 1]], -1)  # (B, 2)
        grid = pixel_grid(self.box)  # (N, N, 2) x, y from pixel box // 2
        return torch.exp(-((grid[None] - centre[:, None, None]) ** 2).sum(-1) / (2 * 2.0 ** 2))


def test_generator_centres_find_the_drawn_object_for_every_particle():
    rng = np.random.default_rng(0)
    z = rng.uniform(-2, 2, size=(1000, 2))
    centres = generator_centres(BlobGenerator(), z, representatives=300)
    expected = np.stack([2 * z[:, 0], -z[:, 1]], 1)
    error = np.abs(centres - expected)
    # 300 drawings for 1000 particles: each takes the nearest representative's centre
    assert np.median(error) < 0.2 and error.max() < 1.0
    exact = generator_centres(BlobGenerator(), z[:50], representatives=300)  # every particle drawn
    assert np.abs(exact - expected[:50]).max() < 0.05


def test_centred_origins_move_the_particle_centre_to_the_box_centre():
    """A particle whose aligned image has its object at ``d`` (pose psi, origin o) gets the origin
    ``o - R(-psi) d``: aligned with it, the object sits on the box centre."""
    from particle_vae.conventions import relion_to_model_pose, undo_relion_pose, warp_images

    psi = np.array([30.0, -120.0])
    result = InferenceResult(theta=np.radians(psi), t=np.array([[1.0, -2.0], [0.5, 3.0]]), z_mean=np.zeros((2, 0)),
                             z_std=np.zeros((2, 0)), extra={})
    d = np.array([[3.0, -1.5], [-2.0, 2.5]])
    columns = result_columns(result, pixel_size=2.0, centres_px=d)
    raw = result_columns(result, pixel_size=2.0)
    assert np.allclose(columns["rlnAnglePsi"], raw["rlnAnglePsi"])
    # an image whose object, undone with the raw pose, sits at d: draw it in the aligned frame and pose it
    box = 41
    grid = pixel_grid(box).double()
    for i in range(2):
        aligned_blob = torch.exp(-((grid - torch.as_tensor(d[i])) ** 2).sum(-1) / 4.0)[None]
        theta, t = relion_to_model_pose(raw["rlnAnglePsi"][i:i + 1], raw["rlnOriginXAngst"][i:i + 1],
                                        raw["rlnOriginYAngst"][i:i + 1], 2.0)
        observed = warp_images(aligned_blob, torch.as_tensor(theta), torch.as_tensor(t), mode="bicubic")
        origin = np.stack([columns["rlnOriginXAngst"][i:i + 1], columns["rlnOriginYAngst"][i:i + 1]], 1)
        centred = undo_relion_pose(observed, columns["rlnAnglePsi"][i:i + 1], origin, 2.0, mode="bicubic")[0].numpy()
        weights = np.clip(centred, 0, None)
        xy = grid.numpy()
        centre = (weights[..., None] * xy).sum((0, 1)) / weights.sum()
        assert np.abs(centre).max() < 0.1, centre
