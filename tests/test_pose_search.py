"""Likelihood pose search and refinement (particle_vae.engine.pose_search / refine) and the pose scores
of particle_vae.analysis.pose_metrics, on hand-made templates with exactly known poses."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from particle_vae.analysis.averages import centre_on_mass
from particle_vae.analysis.pose_metrics import cyclic_symmetry_operators, origin_errors, purity, same_view_psi_errors
from particle_vae.conventions import euler_to_matrix, fourier_shift, mirror_images, pixel_grid, warp_images
from particle_vae.data.ctf import apply_ctf, ctf_from_table
from particle_vae.data.memory import ArrayDataset
from particle_vae.engine.pose_search import best_poses, local_refine, psi_grid, rotated_spectra, score_poses
from particle_vae.engine.refine import RefineSettings, aligned_ctf_table, low_resolution_classes, posterior_mean_centres, refine_poses
from particle_vae.fourier import shell_means

BOX = 48
APIX = 4.0


def template(box: int = BOX, kind: int = 0) -> torch.Tensor:
    """An asymmetric object of a few Gaussian blobs, centred near the box centre; ``(box, box)`` float64."""
    grid = pixel_grid(box, dtype=torch.float64)
    blobs = [((0, 0, 6, 1.0), (8, 2, 3, 1.5), (-5, -9, 2.5, 1.0), (2, 11, 2.0, 0.8)),
             ((0, 0, 4, 1.0), (-9, 0, 3, 1.2), (6, 6, 2.0, 1.5), (0, -12, 3.0, 0.6))][kind]
    image = torch.zeros(box, box, dtype=torch.float64)
    for cx, cy, sigma, amplitude in blobs:
        image += amplitude * torch.exp(-((grid[..., 0] - cx) ** 2 + (grid[..., 1] - cy) ** 2) / (2 * sigma ** 2))
    return image


def ctf_table(n: int, rng: np.random.Generator) -> pd.DataFrame:
    defocus = rng.uniform(12000, 20000, n)
    return pd.DataFrame({"defocus_u": defocus + 300, "defocus_v": defocus - 300, "defocus_angle": rng.uniform(-90, 90, n),
                         "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1})


def particles_of(reference: torch.Tensor, psi: np.ndarray, origin_px: np.ndarray, table: pd.DataFrame | None) -> torch.Tensor:
    """RELION's forward model: turn, shift (exact, in Fourier space) and multiply by each particle's CTF."""
    turned = warp_images(reference[None].expand(len(psi), -1, -1), torch.as_tensor(np.radians(psi)),
                         torch.zeros(len(psi), 2, dtype=torch.float64), mode="bicubic")
    shifted = fourier_shift(turned, torch.as_tensor(-origin_px))
    return apply_ctf(shifted, ctf_from_table(table, reference.shape[-1], APIX).to(torch.float64)) if table is not None else shifted


def search(particles: torch.Tensor, references: torch.Tensor, table: pd.DataFrame | None, n_psi: int = 72, max_shift: int = 6,
           inv_sigma2: torch.Tensor | None = None):
    box = particles.shape[-1]
    spectra = torch.fft.rfft2(particles)
    ctf = ctf_from_table(table, box, APIX) if table is not None else None
    grid = psi_grid(n_psi)
    inv = torch.ones(box, box // 2 + 1) if inv_sigma2 is None else inv_sigma2
    scores = score_poses(spectra, ctf, rotated_spectra(references.float(), grid), inv, max_shift, box // 2 - 1)
    best = best_poses(scores, grid, shift_sigma=None)
    psi, shift = local_refine(spectra, ctf, references, inv, best.classes, best.psi_deg, best.shift_px, box // 2 - 1,
                              angle_range=360.0 / n_psi)
    return best, psi.numpy(), -shift.numpy()


def angle_error(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize("with_ctf", [False, True])
def test_noise_free_template_pose_found_within_1_degree_and_a_quarter_pixel(with_ctf):
    rng = np.random.default_rng(1)
    n = 12
    psi = rng.uniform(-180, 180, n)
    origin = rng.uniform(-4, 4, (n, 2))
    table = ctf_table(n, rng) if with_ctf else None
    particles = particles_of(template(), psi, origin, table)
    best, found_psi, found_origin = search(particles, template()[None], table)
    assert angle_error(found_psi, psi).max() < 1.0
    assert np.abs(found_origin - origin).max() < 0.25
    # the grid pose alone is already within one step
    assert angle_error(best.psi_deg.numpy(), psi).max() < 5.0


def test_reference_is_scored_with_the_particles_own_ctf():
    """A CTF-modulated particle is most likely under its own CTF: swapping two particles' CTFs lowers the
    log-likelihood at the true pose, and the search with the own CTF finds the true pose."""
    table = pd.DataFrame({"defocus_u": [9000.0, 25000.0], "defocus_v": [9000.0, 25000.0], "defocus_angle": [0.0, 0.0],
                          "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1})
    psi, origin = np.array([30.0, -60.0]), np.array([[1.0, -2.0], [0.0, 3.0]])
    particles = particles_of(template(), psi, origin, table)
    spectra = torch.fft.rfft2(particles)
    grid = psi_grid(72)
    refs = rotated_spectra(template()[None].float(), grid)
    inv = torch.ones(BOX, BOX // 2 + 1)
    own = ctf_from_table(table, BOX, APIX)
    swapped = own.flip(0)
    loglik_own = score_poses(spectra, own, refs, inv, 4, BOX // 2 - 1).loglik
    loglik_swapped = score_poses(spectra, swapped, refs, inv, 4, BOX // 2 - 1).loglik
    assert (loglik_own.amax(dim=(1, 2, 3, 4)) > loglik_swapped.amax(dim=(1, 2, 3, 4))).all()
    _, found_psi, found_origin = search(particles, template()[None], table)
    assert angle_error(found_psi, psi).max() < 1.0 and np.abs(found_origin - origin).max() < 0.25


def test_rotated_ctf_matches_the_aligned_frame():
    """An astigmatic CTF image turned back by psi (the aligned particle's frame) is the CTF with the
    astigmatism direction moved by +psi (aligned_ctf_table)."""
    table = pd.DataFrame({"defocus_u": [20000.0], "defocus_v": [8000.0], "defocus_angle": [20.0], "voltage": 300.0, "cs": 2.7,
                          "amplitude_contrast": 0.1})
    psi = 35.0
    box = 64
    full = torch.fft.fftshift(ctf_from_table(table, box, 8.0, rfft=False).to(torch.float64), dim=(-2, -1))
    # the spectrum of img(R(-psi) x) is spectrum(R(-psi) f): warp the centred CTF image with theta = -psi
    turned = warp_images(full, torch.tensor([-math.radians(psi)], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64))
    expected = torch.fft.fftshift(ctf_from_table(aligned_ctf_table(table, np.array([psi])), box, 8.0, rfft=False), dim=(-2, -1))
    inner = pixel_grid(box).norm(dim=-1) < box // 2 - 2  # the disc that stays inside the box when turned
    matching = (turned[0][inner] - expected[0].to(torch.float64)[inner]).abs()
    other = torch.fft.fftshift(ctf_from_table(aligned_ctf_table(table, np.array([-psi])), box, 8.0, rfft=False), dim=(-2, -1))
    wrong = (turned[0][inner] - other[0].to(torch.float64)[inner]).abs()
    # bilinear interpolation of the oscillating CTF leaves a small error; the opposite turn is far off
    assert matching.mean() < 0.05 and wrong.mean() > 5 * matching.mean()


def test_pose_search_at_snr_0_1_over_many_particles():
    """200 particles at SNR 0.1 (variance of the CTF-modulated image over the box / noise variance) with
    random CTFs, searched against the true reference with the true noise power: documented limits
    (docs/training.md) of a median angle error below 6 degrees and a mean shift error below 1 pixel."""
    rng = np.random.default_rng(3)
    n = 200
    psi = rng.uniform(-180, 180, n)
    origin = rng.uniform(-3, 3, (n, 2))
    table = ctf_table(n, rng)
    clean = particles_of(template(), psi, origin, table)
    sigma = math.sqrt(float(clean.var(dim=(-2, -1)).mean()) / 0.1)
    noisy = clean + sigma * torch.as_tensor(rng.standard_normal(clean.shape))
    inv = torch.full((BOX, BOX // 2 + 1), 1.0 / (sigma ** 2 * BOX * BOX))
    _, found_psi, found_origin = search(noisy, template()[None], table, inv_sigma2=inv)
    errors = angle_error(found_psi, psi)
    assert np.median(errors) < 6.0
    assert np.hypot(*(found_origin - origin).T).mean() < 1.0


def test_noise_power_units_match_the_likelihood():
    """shell_means of |rfft2(noise)|^2 is N^2 times the pixel variance, the units score_poses expects."""
    rng = np.random.default_rng(4)
    noise = torch.as_tensor(rng.standard_normal((400, 32, 32))) * 0.5
    spectra = torch.fft.rfft2(noise)
    power = shell_means(spectra.real ** 2 + spectra.imag ** 2, 32).mean(0)
    assert power[1:].numpy() == pytest.approx(np.full(16, 0.25 * 32 * 32), rel=0.1)


def test_a_class_ruled_out_by_the_prior_gets_exactly_no_weight():
    """-inf in the class prior (the seed iterations' per-particle prior) gives zero probability and no top
    pose, even where the likelihood prefers that class by far."""
    box = 24
    references = torch.stack([template(box, 0), template(box, 1)])
    particles = references[1:2].repeat(2, 1, 1)  # both particles are class 1
    grid = psi_grid(8)
    scores = score_poses(torch.fft.rfft2(particles), None, rotated_spectra(references.float(), grid),
                         torch.ones(box, box // 2 + 1), 2, float(box))
    prior = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]], dtype=torch.float64)
    best = best_poses(scores, grid, prior, shift_sigma=1.0, top=4)
    assert best.classes.tolist() == [0, 1]
    assert float(best.class_probability[0, 1]) == 0.0 and float(best.class_probability[1, 0]) == 0.0
    assert best.top[0, :, 0].tolist() == [0.0] * 4 and best.top[1, :, 0].tolist() == [1.0] * 4
    assert torch.isfinite(best.log_evidence).all()


@pytest.mark.parametrize("chunk_elements", [1, 1 << 40])
def test_scores_equal_the_real_space_likelihood_whatever_the_class_chunks(monkeypatch, chunk_elements):
    """Every entry of score_poses is N^2 (<x, m> - <m, m> / 2) for the model image m = CTF * (reference turned
    and moved by d), with all coefficients kept and unit noise; classes scored one per chunk or all at once."""
    import particle_vae.engine.pose_search as pose_search

    monkeypatch.setattr(pose_search, "_CHUNK_ELEMENTS_CPU", chunk_elements)
    box = 24
    rng = np.random.default_rng(7)
    references = torch.stack([template(box, 0), template(box, 1), template(box, 0).flip(-1)])
    particles = torch.as_tensor(rng.standard_normal((2, box, box)))
    table = ctf_table(2, rng)
    ctf = ctf_from_table(table, box, APIX).to(torch.float64)
    grid = psi_grid(8)
    reference_spectra = rotated_spectra(references.float(), grid).to(torch.complex128)
    scores = score_poses(torch.fft.rfft2(particles), ctf, reference_spectra, torch.ones(box, box // 2 + 1), 2, float(box))
    assert scores.loglik.shape == (2, 3, 8, 5, 5)
    for b, k, r, iy, ix in [(0, 0, 0, 2, 2), (1, 2, 5, 0, 4), (0, 1, 3, 4, 1), (1, 1, 7, 3, 0)]:
        shift = torch.tensor([[float(scores.shifts[ix]), float(scores.shifts[iy])]], dtype=torch.float64)
        turned = torch.fft.irfft2(reference_spectra[k, r], s=(box, box))[None]
        model = apply_ctf(fourier_shift(turned, shift), ctf[b:b + 1])[0]
        expected = box * box * (float((particles[b] * model).sum()) - 0.5 * float((model * model).sum()))
        # float32 products over N^2 coefficients: relative errors of order 1e-6; 1e-4 leaves room for the sum of two terms
        assert float(scores.loglik[b, k, r, iy, ix]) == pytest.approx(expected, rel=1e-4, abs=1e-2 * box)


def test_refinement_recovers_consistent_poses_of_two_classes_from_random_seeds():
    """EM from random seed angles and zero shifts, seeds = the true classes: poses come back consistent
    (one constant angle and one constant shift per class, since a class reference's frame is free)."""
    rng = np.random.default_rng(5)
    per_class = 60
    box = 40
    images, psi_true, origin_true, classes = [], [], [], []
    table = ctf_table(2 * per_class, rng)
    for kind in (0, 1):
        psi = rng.uniform(-180, 180, per_class)
        origin = rng.uniform(-2, 2, (per_class, 2))
        rows = np.arange(kind * per_class, (kind + 1) * per_class)
        images.append(particles_of(template(box, kind), psi, origin, table.iloc[rows]))
        psi_true.append(psi), origin_true.append(origin), classes.append(np.full(per_class, kind))
    clean = torch.cat(images)
    sigma = math.sqrt(float(clean.var(dim=(-2, -1)).mean()) / 1.0)
    noisy = (clean + sigma * torch.as_tensor(rng.standard_normal(clean.shape))).to(torch.float32)
    psi_true, origin_true, classes = np.concatenate(psi_true), np.concatenate(origin_true), np.concatenate(classes)
    result = refine_poses(ArrayDataset(noisy.numpy()), table, APIX, classes, rng.uniform(-180, 180, len(classes)),
                          np.zeros((len(classes), 2)), RefineSettings(iterations=5, n_psi=36, batch_size=40), progress=False)
    assert purity(classes, result.classes) > 0.95
    for kind in (0, 1):
        rows = classes == kind
        delta = np.radians(result.psi_deg[rows] - psi_true[rows])
        spread = np.degrees(np.sqrt(-2 * np.log(np.hypot(np.cos(delta).mean(), np.sin(delta).mean()))))
        assert spread < 8.0, (kind, spread)
    # the centre: predicted origin minus true, one constant per class
    centre_true = -origin_true
    assert origin_errors(result.origin_px, result.psi_deg, centre_true, classes).mean() < 1.0
    assert result.psi_std_deg.shape == (len(classes),) and np.isfinite(result.psi_std_deg).all()
    # the structure decision at low resolution agrees with the classes where the objects differ in size and shape
    assert result.low_res_classes.shape == (len(classes),) and purity(classes, result.low_res_classes) > 0.95


def test_low_resolution_class_is_the_one_whose_envelope_matches_not_its_fine_detail():
    """A wide blob carrying the fine ripple of a small blob's class: over every frequency the small blob's
    reference (it has the ripple) fits better, up to a low resolution the wide blob's (exactly its envelope).
    A class that is not allowed is never chosen."""
    box = 48
    grid = pixel_grid(box, dtype=torch.float64)
    r2 = grid[..., 0] ** 2 + grid[..., 1] ** 2

    def blob(sigma):
        return torch.exp(-r2 / (2 * sigma ** 2))

    ripple = 0.8 * torch.cos(2 * math.pi * 14 * grid[..., 0] / box) * blob(8.0)
    references = torch.stack([blob(7.0), 1.6 * blob(4.5) + ripple, 0.3 * blob(12.0)])
    rng = np.random.default_rng(11)
    psi = rng.uniform(-180, 180, 6)
    origin = rng.uniform(-2, 2, (6, 2))
    particles = particles_of(blob(7.0) + ripple, psi, origin, None)
    dataset = ArrayDataset(particles.numpy())
    sigma2 = torch.ones(box // 2 + 1, dtype=torch.float64)
    allowed = np.ones(3, dtype=bool)
    full = low_resolution_classes(dataset, None, APIX, references, sigma2, allowed, box // 2 - 1, 4, progress=False)
    low = low_resolution_classes(dataset, None, APIX, references, sigma2, allowed, 4.0, 4, progress=False)
    assert full.tolist() == [1] * 6 and low.tolist() == [0] * 6
    allowed[0] = False
    assert low_resolution_classes(dataset, None, APIX, references, sigma2, allowed, 4.0, 4, progress=False).tolist() == [1] * 6


def _chiral_particles_and_references(box: int = 48):
    """Noise-free particles of a chiral object (an L with arms of different weight; turned, moved), references
    ``[its mirror image, a decoy of another shape]`` (each centred on its centre of mass), their origins (px)."""
    grid = pixel_grid(box, dtype=torch.float64)

    def blob(x, y, sigma):
        return torch.exp(-((grid[..., 0] - x) ** 2 + (grid[..., 1] - y) ** 2) / (2 * sigma ** 2))

    chiral = centre_on_mass(blob(0, 0, 4.0) + 0.8 * blob(9, 0, 3.0) + 0.6 * blob(0, 7, 2.5))[0]
    decoy = centre_on_mass(blob(0, 0, 4.0) + 0.8 * blob(9, 0, 3.0) + 0.6 * blob(-3, 7, 2.5))[0]
    rng = np.random.default_rng(5)
    psi, origin = rng.uniform(-180, 180, 8), rng.uniform(-2, 2, (8, 2))
    return particles_of(chiral, psi, origin, None), torch.stack([mirror_images(chiral), decoy]), origin


def test_structure_decision_counts_a_mirrored_reference_for_its_class():
    """Particles of a chiral object whose class holds only its mirror image (the view from the other side):
    unmirrored, no turn of that reference fits, and a decoy of another shape fits better; with the mirrors
    scored, the class is found at every angle and shift."""
    particles, references, _ = _chiral_particles_and_references()
    box = particles.shape[-1]
    sigma2 = torch.ones(box // 2 + 1, dtype=torch.float64)
    cutoff = box // 2 - 1
    # the premise: unmirrored, the decoy fits every particle better than the class that holds the mirror
    inv = torch.ones(box, box // 2 + 1)
    unmirrored = score_poses(torch.fft.rfft2(particles.float()), None, rotated_spectra(references.float(), psi_grid(72)),
                             inv, 4, cutoff).loglik.flatten(2).max(dim=2).values
    assert (unmirrored[:, 1] > unmirrored[:, 0]).all()
    chosen = low_resolution_classes(ArrayDataset(particles.numpy()), None, APIX, references, sigma2, np.ones(2, dtype=bool),
                                    cutoff, 4, progress=False)
    assert chosen.tolist() == [0] * 8


def test_posterior_mean_centre_lines_particles_up_with_a_mirrored_reference():
    """The same chiral particles: with the mirrors scored their centres come out exact; against the unmirrored
    references alone (no view fits) they are off by about a third of a pixel."""
    particles, references, origin = _chiral_particles_and_references()
    box = particles.shape[-1]
    dataset, sigma2, prior = ArrayDataset(particles.numpy()), torch.ones(box // 2 + 1, dtype=torch.float64), torch.tensor([0.5, 0.5])

    def errors(mirrors):
        shift = posterior_mean_centres(dataset, None, APIX, references, sigma2, prior, box // 2 - 1, 4, 2.0, mirrors=mirrors,
                                       progress=False)
        return np.linalg.norm(shift + origin, axis=1)  # the displacement is minus the RELION origin

    assert errors(True).max() < 0.05
    assert errors(False).mean() > 0.2


def _view_pose(rot: float, tilt: float, psi: float) -> np.ndarray:
    return np.array([rot, tilt, psi], dtype=np.float64)


def test_same_view_psi_errors_zero_for_consistent_predictions_and_large_for_random_ones():
    rng = np.random.default_rng(6)
    n = 400
    angles = np.stack([rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)], 1)
    classes = np.zeros(n, dtype=np.int64)
    # a 2D alignment against one view frame: the predicted psi is the true one plus a constant
    errors = same_view_psi_errors(angles, angles[:, 2] + 40.0, classes, max_view_angle_deg=10.0)[0]
    assert len(errors) > 10
    # nearby (not identical) views differ by a small in-plane rotation that depends on the pair
    assert np.median(errors) < 5.0
    random_errors = same_view_psi_errors(angles, rng.uniform(-180, 180, n), classes)[0]
    assert 60 < np.median(random_errors) < 120


def test_c7_top_view_turned_by_a_seventh_is_no_error():
    """Two top views of a C7 object along z whose true psi differ by 360/7 + 10 degrees look the same
    turned by 10 degrees: a prediction of 10 degrees is right once the symmetry is known."""
    angles = np.array([_view_pose(0, 0, 0), _view_pose(0, 0, 360 / 7 + 10)])
    ops = np.stack([np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
                    for a in 2 * np.pi * np.arange(7) / 7])
    predicted = np.array([0.0, 10.0])
    without = same_view_psi_errors(angles, predicted, np.zeros(2), symmetry=None)[0]
    with_symmetry = same_view_psi_errors(angles, predicted, np.zeros(2), symmetry={0: ops})[0]
    assert without[0] == pytest.approx(360 / 7, abs=1e-6)
    assert with_symmetry[0] == pytest.approx(0.0, abs=1e-6)


def test_cyclic_symmetry_axis_found_in_a_tilted_c3_density():
    n = 32
    axis_tilt = euler_to_matrix([30.0], [50.0], [0.0])[0]  # rows: a rotation taking z to a tilted axis
    grid = np.arange(n) - n // 2
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    volume = np.zeros((n, n, n))
    for g in range(3):
        a = 2 * math.pi * g / 3
        local = np.array([7 * math.cos(a), 7 * math.sin(a), 3.0 if g == 0 else -1.0 * g])
        local[2] = 2.0  # the same height for the three lobes: exact C3
        centre = axis_tilt.T @ local
        volume += np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * 2.5 ** 2))
    ops, corr = cyclic_symmetry_operators(volume, 3)
    assert corr > 0.95
    expected_axis = axis_tilt.T @ np.array([0.0, 0.0, 1.0])
    found_axis = np.array([ops[1][2, 1] - ops[1][1, 2], ops[1][0, 2] - ops[1][2, 0], ops[1][1, 0] - ops[1][0, 1]])
    assert abs(abs(found_axis @ expected_axis) / np.linalg.norm(found_axis) - 1.0) < 1e-3


def test_purity_and_origin_errors_by_hand():
    assert purity([0, 0, 1, 1], [5, 5, 5, 7]) == pytest.approx(0.75)
    truth = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    # class 0: the average's centre sits 1 px along +x of the true centre, seen at psi 0 and 90 degrees:
    # in the image the offset turns with psi, and it is still one constant offset of the average
    psi = np.array([0.0, 90.0, 0.0, 0.0])
    c = np.array([1.0, 0.0])
    rot_t = lambda a: np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])  # R(psi)^T
    origin = np.stack([rot_t(np.radians(p)) @ c - q for p, q in zip(psi[:2], truth[:2])] + [-truth[2] + [1.0, 0.0], -truth[3]])
    errors = origin_errors(origin, psi, truth, np.array([0, 0, 1, 1]))
    assert errors[:2] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert errors[2:] == pytest.approx([0.5, 0.5])


def test_infer_refines_poses_by_default_and_no_refine_keeps_the_models(tmp_path, data_root):
    """End to end on a tiny simulated set: infer writes refined poses with their uncertainty and class;
    --no-refine writes the model's own (centred) poses without those columns; the .npz keeps both."""
    from particle_vae import cli
    from particle_vae.io.star import ParticleStar

    sim, run = tmp_path / "sim", tmp_path / "run"
    assert cli.main(["-q", "simulate", "--preset", "t20s", "--n", "60", "--box", "32", "--pixel-size", "8", "--snr", "1",
                     "--data-dir", str(data_root), "--out", str(sim), "--no-progress"]) == 0
    assert cli.main(["-q", "train", str(sim / "particles.star"), "--preset", "tiny", "--fields", "4", "--gen-hidden", "32",
                     "--fourier-features", "16", "--group", "4", "--epochs", "1", "--out", str(run)]) == 0
    refined, plain = tmp_path / "refined.star", tmp_path / "plain.star"
    assert cli.main(["-q", "infer", str(run), "--out", str(refined), "--refine-iterations", "2"]) == 0
    assert cli.main(["-q", "infer", str(run), "--out", str(plain), "--no-refine"]) == 0
    rows = ParticleStar(refined).particles
    for column in ("pvaeAnglePsiStd", "pvaePoseProbability", "pvaeRefineClass", "pvaeRefineClassProbability", "pvaeLowResClass"):
        assert column in rows.columns
    assert rows["pvaeAnglePsiStd"].between(0, 400).all() and rows["pvaePoseProbability"].between(0, 1).all()
    assert rows["rlnAnglePsi"].between(-180, 180).all()
    assert "pvaeAnglePsiStd" not in ParticleStar(plain).particles.columns
    record = np.load(refined.with_suffix(".npz"))
    assert record["refine_references"].shape[1:] == (32, 32) and len(record["theta"]) == 60
    np.testing.assert_array_equal(record["refine_low_res_classes"] + 1, rows["pvaeLowResClass"].to_numpy())
    # the low-resolution class is one that kept particles
    assert set(rows["pvaeLowResClass"]) <= set(rows["pvaeRefineClass"])
    # each particle carries its class's mass, the integrated density of the class reference
    from particle_vae.engine.refine import class_masses

    masses = class_masses(record["refine_references"], float(record["refine_pixel_size"]))
    np.testing.assert_allclose(record["refine_class_mass"], masses)
    np.testing.assert_allclose(rows["pvaeRefineClassMass"].to_numpy(), masses[rows["pvaeRefineClass"].to_numpy() - 1],
                               rtol=1e-6, atol=1e-3)
    assert np.allclose(record["rlnAnglePsi"], rows["rlnAnglePsi"].to_numpy(), atol=1e-5)
    # the refined poses differ from the model's own
    assert not np.allclose(ParticleStar(plain).particles["rlnAnglePsi"].to_numpy(), rows["rlnAnglePsi"].to_numpy(), atol=1.0)
    assert cli.main(["-q", "infer", str(run), "--out", str(tmp_path / "bad.star"), "--refine-classes", "0"]) == 2


def test_class_masses_are_the_same_for_every_view_and_pixel_size():
    """The integral of a projection is the object's total density: projections of one 3D object
    along three axes share it (exactly), and so does an image resampled from 2 to 3 A/px
    (within 0.5%); an object of twice the density has twice the mass."""
    from particle_vae.engine.refine import class_masses, resample_image

    n = 48
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    volume = np.exp(-((x / 6.0) ** 2 + (y / 3.0) ** 2 + ((z - 2) / 4.0) ** 2) / 2)
    views = np.stack([volume.sum(axis) for axis in range(3)])
    masses = class_masses(views, 2.0)
    np.testing.assert_allclose(masses, masses[0], rtol=1e-10)
    assert np.allclose(masses[0], volume.sum() * 4.0)
    coarse = resample_image(views[0], 2.0, 32, 3.0)
    assert abs(class_masses(coarse[None], 3.0)[0] / masses[0] - 1) < 0.005
    assert np.allclose(class_masses(2 * views, 2.0), 2 * masses)


def test_posterior_mean_shift_is_the_mean_over_every_pose():
    """``shift_mean_px(m)`` is the posterior mean of d with the mode's neighbourhood (its class, the grid angles
    and shifts next to it) moved to ``m``: brute force over every pose."""
    from particle_vae.engine.pose_search import PoseScores

    rng = np.random.default_rng(13)
    b, k, r, s = 5, 3, 8, 7
    shifts = torch.arange(-(s // 2), s // 2 + 1, dtype=torch.float64)
    loglik = torch.as_tensor(rng.normal(0.0, 2.0, (b, k, r, s, s)))
    loglik[0, 1, 2, 3, 4] += 20.0  # one confident particle; the others spread over many poses
    best = best_poses(PoseScores(loglik=loglik, shifts=shifts), psi_grid(r), shift_sigma=2.0)
    post = torch.softmax((loglik - (shifts[:, None] ** 2 + shifts[None, :] ** 2) / 8.0).reshape(b, -1), 1).reshape(loglik.shape)
    refined_mode = best.top[:, 0, 2:] + torch.as_tensor(rng.uniform(-0.5, 0.5, (b, 2)))
    for i in range(b):
        kk, rr, yy, xx = np.unravel_index(int(post[i].argmax()), (k, r, s, s))
        mean, mode_weight = torch.zeros(2, dtype=torch.float64), 0.0
        for index in np.ndindex(k, r, s, s):
            p = float(post[i][index])
            near = (index[0] == kk and min((index[1] - rr) % r, (rr - index[1]) % r) <= 1
                    and abs(index[2] - yy) <= 1 and abs(index[3] - xx) <= 1)
            if near:
                mode_weight += p
            else:
                mean += p * torch.stack([shifts[index[3]], shifts[index[2]]])
        mean += mode_weight * refined_mode[i]
        assert float(best.mode_weight[i]) == pytest.approx(mode_weight, abs=1e-12)
        assert torch.allclose(best.shift_mean_px(refined_mode)[i], mean, atol=1e-10), i
    assert float(best.mode_weight[0]) > 0.99 and float(best.mode_weight[1:].max()) < 0.9
    assert torch.allclose(best.shift_mean_px()[0], best.shift_px[0], atol=0.01)
