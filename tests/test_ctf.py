"""CTF: wavelength, sign at k = 0, zero crossings, astigmatism direction, envelope, I/O."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from particle_vae.data import ctf as C
from particle_vae.errors import InputFileError
from particle_vae.fourier import ctf_frequencies


def test_relativistic_wavelength_matches_tabulated_values():
    # Standard tables: 100 kV 0.03701 A, 200 kV 0.02508 A, 300 kV 0.01969 A.
    assert C.electron_wavelength(300) == pytest.approx(0.019687, abs=2e-6)
    assert C.electron_wavelength(200) == pytest.approx(0.025079, abs=2e-6)
    assert C.electron_wavelength(100) == pytest.approx(0.037014, abs=2e-6)
    with pytest.raises(ValueError):
        C.electron_wavelength(0)


@pytest.mark.parametrize("w", [0.0, 0.07, 0.1, 0.3])
def test_value_at_zero_frequency_is_plus_amplitude_contrast(w):
    zero = torch.zeros(1, dtype=torch.float64)
    value = C.evaluate_ctf(zero, zero, 15000.0, 14000.0, 30.0, 300.0, 2.7, w)
    assert float(value) == pytest.approx(w, abs=1e-12)
    # A 90 degree phase plate turns the k = 0 value into sqrt(1 - w^2) (cos of the amplitude phase).
    plate = C.evaluate_ctf(zero, zero, 15000.0, 14000.0, 30.0, 300.0, 2.7, w, phase_shift=90.0)
    assert float(plate) == pytest.approx(math.sqrt(1 - w * w), abs=1e-12)
    # On the grid, the [0, 0] element of every particle's CTF is +w too.
    grid = C.compute_ctf(32, 2.0, [15000.0, 20000.0], [15000.0, 18000.0], [0.0, 45.0], amplitude_contrast=w)
    assert torch.allclose(grid[:, 0, 0], torch.full((2,), w, dtype=grid.dtype), atol=1e-6)


def _analytic_zeros(defocus, voltage, cs_mm, w, count):
    """k (1/A) where -sin(chi) = 0: chi = -n pi, a quadratic in s = k^2."""
    lam = C.electron_wavelength(voltage)
    cs = cs_mm * 1e7
    phi = math.atan(w / math.sqrt(1 - w * w))
    a, b = 0.5 * math.pi * cs * lam ** 3, -math.pi * lam * defocus
    zeros = []
    for n in range(1, count + 1):
        c = n * math.pi - phi
        s = (-b - math.sqrt(b * b - 4 * a * c)) / (2 * a) if a > 0 else -c / b
        zeros.append(math.sqrt(s))
    return np.array(zeros)


def test_zero_crossings_sit_at_the_analytic_positions():
    defocus, voltage, cs, w = 20000.0, 300.0, 2.7, 0.1
    zeros = _analytic_zeros(defocus, voltage, cs, w, 6)
    # First zero at 2 um and 300 kV is near 1 / sqrt(lambda dz) ~ 1/19.8 A^-1.
    assert 1 / zeros[0] == pytest.approx(19.8, abs=0.6)
    k = torch.as_tensor(zeros)
    at_zeros = C.evaluate_ctf(k, torch.zeros_like(k), defocus, defocus, 0.0, voltage, cs, w)
    assert torch.all(at_zeros.abs() < 1e-9)
    # Sign changes of the CTF sampled finely along x appear exactly there.
    kx = torch.linspace(1e-4, zeros[-1] + 0.5 * (zeros[-1] - zeros[-2]), 200001, dtype=torch.float64)
    profile = C.evaluate_ctf(kx, torch.zeros_like(kx), defocus, defocus, 0.0, voltage, cs, w).numpy()
    changes = kx.numpy()[np.flatnonzero(np.sign(profile[1:]) != np.sign(profile[:-1]))]
    assert len(changes) == len(zeros)
    np.testing.assert_allclose(changes, zeros, atol=float(kx[1] - kx[0]) * 1.5)
    # Low-frequency lobe is positive for underfocus (RELION sign convention).
    assert profile[np.searchsorted(kx.numpy(), zeros[0] / 2)] > 0


def test_without_cs_and_amplitude_contrast_zeros_are_sqrt_n_over_lambda_dz():
    lam = C.electron_wavelength(200)
    dz = 12000.0
    k = torch.tensor([math.sqrt(n / (lam * dz)) for n in (1, 2, 3)], dtype=torch.float64)
    values = C.evaluate_ctf(k, torch.zeros_like(k), dz, dz, 0.0, 200.0, 0.0, 0.0)
    assert torch.all(values.abs() < 1e-9)


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_astigmatism_defocus_u_lies_along_the_angle_from_x(angle):
    u, v = 22000.0, 14000.0
    k_u = _analytic_zeros(u, 300, 2.7, 0.1, 1)[0]
    k_v = _analytic_zeros(v, 300, 2.7, 0.1, 1)[0]
    a = math.radians(angle)
    along = C.evaluate_ctf(torch.tensor([k_u * math.cos(a)]), torch.tensor([k_u * math.sin(a)]), u, v, angle)
    across = C.evaluate_ctf(torch.tensor([-k_v * math.sin(a)]), torch.tensor([k_v * math.cos(a)]), u, v, angle)
    assert abs(float(along)) < 1e-9 and abs(float(across)) < 1e-9
    # And not the other way round.
    swapped = C.evaluate_ctf(torch.tensor([k_v * math.cos(a)]), torch.tensor([k_v * math.sin(a)]), u, v, angle)
    assert abs(float(swapped)) > 0.1


def test_grid_layout_rows_are_y_and_columns_are_x():
    box, apix = 64, 3.0
    ctf = C.compute_ctf(box, apix, 25000.0, 10000.0, 90.0, rfft=False, dtype=torch.float64)[0]
    freq = np.fft.fftfreq(box, d=apix)
    for row, col in [(3, 0), (0, 5), (7, 11), (60, 2), (33, 40)]:
        expected = C.evaluate_ctf(torch.tensor([freq[col]]), torch.tensor([freq[row]]), 25000.0, 10000.0, 90.0)
        assert float(ctf[row, col]) == pytest.approx(float(expected), abs=1e-12)
    # angle 90: the larger defocus U runs along y (rows), so the CTF oscillates faster down column 0.
    along_y = np.sign(ctf[: box // 2, 0].numpy())
    along_x = np.sign(ctf[0, : box // 2].numpy())
    assert np.count_nonzero(np.diff(along_y)) > np.count_nonzero(np.diff(along_x))
    half = C.compute_ctf(box, apix, 25000.0, 10000.0, 90.0, rfft=True, dtype=torch.float64)[0]
    assert half.shape == (box, box // 2 + 1)
    assert torch.allclose(half, ctf[:, : box // 2 + 1])


def test_bfactor_envelope_is_exp_minus_b_k2_over_4():
    box, apix, bfac = 48, 2.5, 400.0
    plain = C.compute_ctf(box, apix, 15000.0, 15000.0, 0.0, dtype=torch.float64)[0]
    damped = C.compute_ctf(box, apix, 15000.0, 15000.0, 0.0, bfactor=bfac, dtype=torch.float64)[0]
    kx, ky = ctf_frequencies(box, apix)
    envelope = torch.exp(-bfac * (kx ** 2 + ky ** 2) / 4)
    assert torch.allclose(damped, plain * envelope, atol=1e-12)
    assert float(envelope.min()) < 0.05  # the test exercises a strong envelope


def test_batched_parameters_give_one_ctf_per_particle():
    u = [12000.0, 18000.0, 25000.0]
    batch = C.compute_ctf(32, 3.0, u, u, 0.0, dtype=torch.float64)
    assert batch.shape == (3, 32, 17)
    for i, value in enumerate(u):
        assert torch.allclose(batch[i], C.compute_ctf(32, 3.0, value, value, 0.0, dtype=torch.float64)[0])


def test_apply_ctf_is_fourier_multiplication():
    torch.manual_seed(0)
    params = ([10000.0, 15000.0, 20000.0], [9000.0, 15000.0, 21000.0], [10.0, 0.0, 80.0])
    # An odd box has no Nyquist column, so the half-plane and full layouts agree exactly.
    images = torch.randn(3, 41, 41, dtype=torch.float64)
    half = C.compute_ctf(41, 2.0, *params, dtype=torch.float64)
    full = C.compute_ctf(41, 2.0, *params, rfft=False, dtype=torch.float64)
    expected = torch.fft.ifft2(torch.fft.fft2(images) * full).real
    assert torch.allclose(C.apply_ctf(images, half), expected, atol=1e-10)
    assert torch.allclose(C.apply_ctf(images, full), expected, atol=1e-10)
    assert torch.allclose(C.apply_ctf(images, torch.ones(1, 41, 21)), images, atol=1e-12)
    # The CTF's inverse transform is the point-spread function: an impulse at the origin gives it back.
    delta = torch.zeros(1, 41, 41, dtype=torch.float64)
    delta[0, 0, 0] = 1
    psf = C.apply_ctf(delta, full[:1])
    assert torch.allclose(torch.fft.fft2(psf).real, full[:1], atol=1e-10)
    # Even box: identical away from the (ambiguous) Nyquist row and column.
    spectrum = torch.fft.fft2(torch.randn(3, 40, 40, dtype=torch.float64))
    spectrum[..., 20, :] = 0
    spectrum[..., :, 20] = 0
    even = torch.fft.ifft2(spectrum).real
    full40 = C.compute_ctf(40, 2.0, *params, rfft=False, dtype=torch.float64)
    expected = torch.fft.ifft2(torch.fft.fft2(even) * full40).real
    assert torch.allclose(C.apply_ctf(even, C.compute_ctf(40, 2.0, *params, dtype=torch.float64)), expected, atol=1e-10)
    with pytest.raises(ValueError):
        C.apply_ctf(images, torch.ones(1, 41, 7))


def test_ctf_from_table_handles_several_optics_groups():
    import pandas as pd

    table = pd.DataFrame({"defocus_u": [15000.0, 16000.0], "defocus_v": [14000.0, 16000.0], "defocus_angle": [20.0, 0.0],
                          "voltage": [300.0, 200.0], "cs": [2.7, 2.0], "amplitude_contrast": [0.1, 0.07],
                          "phase_shift": [0.0, 0.0], "bfactor": [0.0, 50.0]})
    ctfs = C.ctf_from_table(table, 32, 2.0, dtype=torch.float64)
    first = C.compute_ctf(32, 2.0, 15000.0, 14000.0, 20.0, 300.0, 2.7, 0.1, dtype=torch.float64)[0]
    second = C.compute_ctf(32, 2.0, 16000.0, 16000.0, 0.0, 200.0, 2.0, 0.07, bfactor=50.0, dtype=torch.float64)[0]
    assert torch.allclose(ctfs[0], first) and torch.allclose(ctfs[1], second)


def test_defocus_table_from_empiar10025_metadata(fixtures_dir):
    path = fixtures_dir / "empiar10025_ctf_params.star"  # the first micrographs of EMPIAR-10025's ctf_params.star
    table = C.read_defocus_table(path)
    assert table.shape[1] == 3 and len(table) == json.loads((fixtures_dir / "manifest.json").read_text())[path.name]["rows"] > 1
    assert (table[:, :2] > 10000).all() and (table[:, :2] < 25000).all()
    sample = C.sample_defocus(500, np.random.default_rng(1), table)
    rows = {tuple(r) for r in table}
    assert all(tuple(r) in rows for r in sample)
    assert len({tuple(r) for r in sample}) > len(table) // 2


def test_uniform_defocus_sampling_respects_range_and_astigmatism():
    draws = C.sample_defocus(2000, np.random.default_rng(0), None, (10000.0, 20000.0), 400.0)
    mean = draws[:, :2].mean(axis=1)
    assert mean.min() >= 10000 and mean.max() <= 20000
    assert ((draws[:, 0] - draws[:, 1]) >= 0).all() and ((draws[:, 0] - draws[:, 1]) <= 400).all()
    assert (draws[:, 2] >= 0).all() and (draws[:, 2] < 180).all()


def test_star_without_defocus_columns_is_rejected(tmp_path):
    path = tmp_path / "nodefocus.star"
    path.write_text("data_images\n\nloop_\n_rlnVoltage #1\n_rlnMicrographName #2\n300.0 a.mrc\n300.0 b.mrc\n")
    with pytest.raises(InputFileError) as info:
        C.read_defocus_table(path)
    message = str(info.value)
    assert str(path) in message and "rlnDefocusU" in message and "\n" not in message
    with pytest.raises(InputFileError, match="not found"):
        C.read_defocus_table(tmp_path / "missing.star")
