"""Centred origins at inference: where the aligned particles of each latent group have their object."""

from __future__ import annotations

import numpy as np
import torch

from particle_vae.conventions import pixel_grid
from particle_vae.engine.inference import InferenceResult, data_centres, result_columns


def test_data_centres_find_each_group_s_object_in_the_aligned_frame():
    """Two kinds of particle (latents near -3 and +3), each an object whose centre, once the
    particle is aligned with its pose, sits at its own offset ``d``: every particle gets its group's ``d``."""
    from particle_vae.conventions import relion_to_model_pose, warp_images
    from particle_vae.data.memory import ArrayDataset
    from particle_vae.engine.data import PreparedData

    rng = np.random.default_rng(1)
    box, apix, n = 33, 2.0, 60
    offsets = np.array([[3.0, -2.0], [-1.5, 2.5]])
    kind = np.repeat([0, 1], n // 2)
    z = np.stack([np.where(kind == 0, -3.0, 3.0) + rng.normal(0, 0.2, n), rng.normal(0, 0.2, n)], 1)
    psi = rng.uniform(-180, 180, n)
    origin = rng.normal(0, 2.0, (n, 2)) * apix
    grid = pixel_grid(box).double()
    particles = []
    for i in range(n):
        aligned = torch.exp(-((grid - torch.as_tensor(offsets[kind[i]])) ** 2).sum(-1) / (2 * 2.0 ** 2))[None]
        theta, t = relion_to_model_pose(psi[i:i + 1], origin[i:i + 1, 0], origin[i:i + 1, 1], apix)
        particles.append(warp_images(aligned, torch.as_tensor(theta), torch.as_tensor(t), mode="bicubic")[0].numpy())
    prepared = PreparedData(dataset=ArrayDataset(np.stack(particles)), box=box, pixel_size=apix)
    centres = data_centres(prepared, z, psi, origin, apix, groups=2)
    assert np.abs(centres - offsets[kind]).max() < 0.2


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


class _OffCentreGenerator(torch.nn.Module):
    """A generator whose drawing at pose zero is a Gaussian blob at ``(x, y) = (z0, z1)`` pixels from the
    box centre, on a constant background that fills the box (as a generator's drawings do)."""

    zdim = 2

    def __init__(self, box: int = 32):
        super().__init__()
        self.box = box
        self.scale = torch.nn.Parameter(torch.ones(()))

    def decode(self, z, theta, t):
        coords = torch.arange(self.box, dtype=torch.float32) - self.box // 2
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        blob = torch.exp(-((x - z[:, 0, None, None]) ** 2 + (y - z[:, 1, None, None]) ** 2) / (2 * 3.0 ** 2))
        return self.scale * blob + 0.3


def test_decode_centred_puts_each_drawing_on_the_box_centre():
    """The drawing at pose zero, moved onto its centre of mass: a blob drawn 2.5 px right and 1.5 px up
    ends on the box centre within 0.01 px, as the same blob drawn there; one drawn on the centre stays as it is."""
    from particle_vae.analysis.averages import decode_at_pose_zero, decode_centred
    from particle_vae.analysis.metrics import image_centre_of_mass

    model = _OffCentreGenerator()
    z = np.array([[2.5, -1.5], [0.0, 0.0]])
    drawn = decode_at_pose_zero(model, z)
    assert np.abs(image_centre_of_mass(drawn[0]) - [2.5, -1.5]).max() < 0.05
    centred = decode_centred(model, z)
    assert centred.shape == (2, 32, 32) and centred.dtype == np.float32
    for image in centred:
        assert np.abs(image_centre_of_mass(image)).max() < 0.01
    np.testing.assert_allclose(centred[1], drawn[1], atol=1e-5)
    np.testing.assert_allclose(centred[0], drawn[1], atol=1e-3)
