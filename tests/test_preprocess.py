"""Preprocessing steps on hand-made images with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from particle_vae.data.particles import ParticleDataset
from particle_vae.data.preprocess import (
    Preprocessing,
    centre_crop,
    circular_mask,
    normalize_background,
    normalize_minmax,
    normalize_zscore,
    radial_distance,
)
from particle_vae.fourier import fourier_crop


def gaussian(box: int, sigma: float, cx: float = 0.0, cy: float = 0.0) -> torch.Tensor:
    """``exp(-|x - c|^2 / (2 sigma^2))`` sampled on pixel coordinates relative to pixel ``box // 2``."""
    axis = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))


def outside(box: int, radius: float) -> torch.Tensor:
    axis = np.arange(box) - box // 2
    return torch.from_numpy(np.hypot(axis[:, None], axis[None, :]) > radius)


def noisy_particles(batch: int = 6, box: int = 48, seed: int = 0) -> torch.Tensor:
    """Background noise with a per-image offset and scale plus a bright disc in the middle."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-50, 80, batch)[:, None, None, None]
    scales = torch.linspace(0.2, 9, batch)[:, None, None, None]
    noise = torch.randn(batch, 1, box, box, generator=gen, dtype=torch.float64)
    disc = (radial_distance(box, dtype=torch.float64) < box / 5).to(torch.float64) * 40
    return (offsets + scales * noise + disc).to(torch.float32)


# --------------------------------------------------------------------------- cropping


@pytest.mark.parametrize("box,new_box", [(64, 32), (65, 33), (64, 33), (65, 32), (10, 1)])
def test_centre_crop_keeps_centre_pixel(box: int, new_box: int):
    image = torch.zeros(2, 1, box, box)
    image[..., box // 2, box // 2] = 1.0
    cropped = centre_crop(image, new_box)
    assert cropped.shape == (2, 1, new_box, new_box)
    assert cropped[0, 0, new_box // 2, new_box // 2] == 1.0 and cropped.sum() == 2.0
    start = box // 2 - new_box // 2
    ramp = torch.arange(box * box, dtype=torch.float32).reshape(box, box)
    assert torch.equal(centre_crop(ramp, new_box), ramp[start:start + new_box, start:start + new_box])
    with pytest.raises(ValueError):
        centre_crop(image, box + 1)


@pytest.mark.parametrize("box,new_box", [(64, 32), (64, 48), (65, 33), (65, 32), (128, 40)])
def test_fourier_crop_of_gaussian_is_the_smaller_gaussian(box: int, new_box: int):
    sigma, cx, cy = 6.0, 4.0, -5.0
    factor = new_box / box
    result = fourier_crop(gaussian(box, sigma, cx, cy), new_box)
    expected = gaussian(new_box, sigma * factor, cx * factor, cy * factor)
    assert result.shape == (new_box, new_box)
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=0)
    # a constant stays the same constant, in any batch layout and dtype
    flat = fourier_crop(torch.full((3, 1, box, box), 2.5), new_box)
    assert flat.dtype == torch.float32
    torch.testing.assert_close(flat, torch.full((3, 1, new_box, new_box), 2.5), atol=1e-5, rtol=0)


def test_preprocessing_crop_then_downsample_and_pixel_size():
    images = torch.randn(4, 1, 64, 64)
    prep = Preprocessing(box=64, pixel_size=1.5, crop_box=48, target_box=24, normalize="none")
    assert (prep.cropped_box, prep.output_box, prep.scale, prep.output_pixel_size) == (48, 24, 2.0, 3.0)
    out = prep(images)
    assert out.shape == (4, 1, 24, 24)
    torch.testing.assert_close(out, fourier_crop(centre_crop(images, 48), 24))
    assert prep(images[:, 0]).shape == (4, 24, 24)
    lines = prep.describe()
    assert lines[0] == "input: 64x64 px, 1.5 A/px" and lines[-1] == "output: 24x24 px, 3 A/px"
    assert any("centre crop 64 -> 48 px" in line and "32 -> 24" in line for line in lines)
    assert any("Fourier crop 48 -> 24 px" in line and "1.5 -> 3 A/px" in line and "x2" in line for line in lines)
    assert "no intensity normalisation" in lines


# --------------------------------------------------------------------------- intensities


def test_invert_flips_sign():
    images = torch.randn(3, 1, 16, 16)
    prep = Preprocessing(box=16, invert=True, normalize="none")
    assert torch.equal(prep(images), -images)
    assert "invert contrast (multiply by -1)" in prep.describe()
    # inversion happens before normalisation: minmax of -x is 1 - minmax of x
    torch.testing.assert_close(Preprocessing(box=16, invert=True, normalize="minmax")(images),
                               1 - normalize_minmax(images), atol=1e-6, rtol=0)


@pytest.mark.parametrize("box", [48, 49])
def test_background_normalisation_outside_mask(box: int):
    images = noisy_particles(box=box)
    prep = Preprocessing(box=box, pixel_size=2.0)
    radius = 0.85 * box / 2
    assert prep.effective_background_radius == pytest.approx(radius)
    out = prep(images).to(torch.float64)
    background = out[..., outside(box, radius)]  # (B, 1, count)
    torch.testing.assert_close(background.mean(-1), torch.zeros(6, 1, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(background.std(-1, correction=0), torch.ones(6, 1, dtype=torch.float64), atol=1e-5, rtol=0)
    # the particle does not take part: brightening the disc leaves the background values unchanged
    brighter = images + 100 * (radial_distance(box) < box / 5)
    torch.testing.assert_close(prep(brighter)[..., outside(box, radius)], out.to(torch.float32)[..., outside(box, radius)])
    # and whole-image statistics would differ
    assert out.mean(dim=(-2, -1)).abs().min() > 0.1
    c = box // 2
    assert any(f"farther than {radius:.4g} px = {radius * 2:.4g} A from pixel ({c}, {c})" in line for line in prep.describe())


def test_background_normalisation_custom_radius_and_constant_background():
    images = torch.zeros(2, 32, 32)
    images[0] = 7.0  # constant everywhere: only shifted
    images[1, 14:18, 14:18] = 5.0
    images[1] += 3.0
    out = normalize_background(images, radius=10)
    assert torch.equal(out[0], torch.zeros(32, 32))
    assert torch.allclose(out[1][outside(32, 10)], torch.zeros(())) and out[1, 16, 16] == 5.0
    with pytest.raises(ValueError):
        normalize_background(images, radius=100)
    with pytest.raises(ValueError):
        Preprocessing(box=32, background_radius=40)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.01, 1e3), offset=st.floats(-1e3, 1e3), seed=st.integers(0, 2**16))
def test_normalisations_ignore_affine_changes(scale: float, offset: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 1, 20, 20, generator=gen, dtype=torch.float64)
    moved = images * scale + offset
    for fn in (lambda x: normalize_background(x, 7.0), normalize_zscore, normalize_minmax):
        torch.testing.assert_close(fn(moved), fn(images), atol=1e-6, rtol=1e-6)


def test_zscore_whole_image():
    images = noisy_particles(box=32)
    out = Preprocessing(box=32, normalize="zscore")(images).to(torch.float64)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(6, 1, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1), correction=0), torch.ones(6, 1, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(normalize_zscore(torch.full((1, 4, 4), 3.0)), torch.zeros(1, 4, 4))


def test_minmax_in_unit_interval():
    images = noisy_particles(box=32)
    out = Preprocessing(box=32, normalize="minmax")(images)
    flat = out.reshape(6, -1)
    assert torch.equal(flat.min(dim=1).values, torch.zeros(6)) and torch.allclose(flat.max(dim=1).values, torch.ones(6))
    assert (out >= 0).all() and (out <= 1).all()
    expected = (images - images.amin(dim=(-2, -1), keepdim=True)) / (
        images.amax(dim=(-2, -1), keepdim=True) - images.amin(dim=(-2, -1), keepdim=True))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert torch.equal(normalize_minmax(torch.full((2, 4, 4), -1.0)), torch.zeros(2, 4, 4))


# --------------------------------------------------------------------------- masks


def test_circular_mask_hard_and_soft():
    hard = circular_mask(33, radius=10)
    r = radial_distance(33)
    assert torch.equal(hard, (r <= 10).float()) and hard[16, 16] == 1 and hard[16, 27] == 0 and hard[16, 26] == 1
    soft = circular_mask(64, radius=20, soft_edge=4)
    r = radial_distance(64)
    assert torch.equal(soft[r <= 20], torch.ones(int((r <= 20).sum())))
    assert torch.equal(soft[r >= 24], torch.zeros(int((r >= 24).sum())))
    ring = (r > 20) & (r < 24)
    expected = 0.5 * (1 + torch.cos(math.pi * (r[ring] - 20) / 4))
    torch.testing.assert_close(soft[ring], expected)
    assert soft[32, 32 + 22] == pytest.approx(0.5)  # half way down the edge


def test_mask_applied_after_normalisation():
    images = noisy_particles(box=40)
    prep = Preprocessing(box=40, pixel_size=1.0, normalize="background", mask_radius=12, mask_soft_edge=3)
    out = prep(images)
    r = radial_distance(40)
    assert torch.equal(out[..., r >= 15], torch.zeros_like(out[..., r >= 15]))
    torch.testing.assert_close(out[..., r <= 12], normalize_background(images, 17.0)[..., r <= 12])
    line = [line for line in prep.describe() if "mask" in line][0]
    assert "radius 12 px = 12 A" in line and "raised-cosine edge 3 px" in line and "(20, 20)" in line
    # minmax values stay in [0, 1] after masking
    masked = Preprocessing(box=40, normalize="minmax", mask_radius=15)(images)
    assert masked.min() >= 0 and masked.max() <= 1


# --------------------------------------------------------------------------- config and data


def test_preprocessing_validation():
    with pytest.raises(ValueError):
        Preprocessing(box=32, target_box=40)
    with pytest.raises(ValueError):
        Preprocessing(box=32, crop_box=24, target_box=28)
    with pytest.raises(ValueError):
        Preprocessing(box=32, normalize="l2")
    with pytest.raises(ValueError):
        Preprocessing(box=32, mask_radius=-1)
    with pytest.raises(ValueError):
        Preprocessing(box=32)(torch.zeros(2, 1, 30, 30))
    with pytest.raises(ValueError):
        Preprocessing(box=32)(torch.zeros(2, 3, 32, 32))
    assert Preprocessing(box=32).describe()[-1] == "output: 32x32 px, unknown pixel size"


def test_preprocessing_keeps_dtype():
    images = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    assert Preprocessing(box=32, target_box=16)(images).dtype == torch.float64


def test_preprocessing_as_dataset_transform_on_real_particles(cryoem_dir: Path):
    star = cryoem_dir / "relion31" / "relion31.star"
    raw = ParticleDataset(star)
    prep = Preprocessing(box=raw.box, pixel_size=raw.pixel_size, target_box=64, invert=True)
    assert prep.output_pixel_size == pytest.approx(2.806 * 4)
    batch = ParticleDataset(star, transform=prep).__getitems__([0, 1, 2, 3, 4])
    assert batch["images"].shape == (5, 1, 64, 64) and torch.isfinite(batch["images"]).all()
    background = batch["images"][..., outside(64, 0.85 * 32)].to(torch.float64)
    torch.testing.assert_close(background.mean(-1), torch.zeros(5, 1, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(background.std(-1, correction=0), torch.ones(5, 1, dtype=torch.float64), atol=1e-4, rtol=0)
    expected = prep(raw.__getitems__([0, 1, 2, 3, 4])["images"])
    torch.testing.assert_close(batch["images"], expected)
