"""Simulator: pose sampling, projection convention, pose round trip, SNR, CTF columns, outputs, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from particle_vae import cli, conventions
from particle_vae.data import simulation as sim
from particle_vae.data.ctf import apply_ctf, ctf_from_table
from particle_vae.data.structures import atoms_to_density, read_pdb
from particle_vae.errors import InputFileError
from particle_vae.io.mrc import MRCStack
from particle_vae.io.star import ParticleStar

BOX, APIX = 40, 6.0


@pytest.fixture(scope="module")
def t20s_density(structures_dir):
    model = read_pdb(structures_dir / "t20s_3j9i.pdb")
    return atoms_to_density(model.coords, model.weights, BOX, APIX, resolution=2.5 * APIX)


def _config(structures_dir, **kw):
    values = dict(structures=[sim.StructureSpec(structures_dir / "t20s_3j9i.pdb", "t20s")], n=12, box=BOX, pixel_size=APIX,
                  max_shift=3.0, seed=3, batch_size=5)
    values.update(kw)
    return sim.SimulationConfig(**values)


def _read(out_dir, name):
    stack = MRCStack(out_dir / name)
    return stack.read(0, stack.n_images).astype(np.float64)


# ------------------------------------------------------------------------ poses

def _rotation_angle(mats):
    return np.arccos(np.clip((np.trace(mats, axis1=1, axis2=2) - 1) / 2, -1, 1))


def test_uniform_rotations_follow_the_haar_measure():
    angles = sim.sample_rotations(20000, np.random.default_rng(0), "uniform")
    mats = conventions.euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    assert np.abs(mats.mean(axis=0)).max() < 0.02  # E[A] = 0 under Haar
    np.testing.assert_allclose((mats ** 2).mean(axis=0), 1 / 3, atol=0.02)
    # Haar: rotation angle w has density (1 - cos w) / pi, CDF (w - sin w) / pi.
    haar_cdf = lambda w: (w - np.sin(w)) / np.pi  # noqa: E731
    assert stats.kstest(_rotation_angle(mats), haar_cdf).pvalue > 1e-3
    # The same test rejects the naive sampler with tilt uniform in [0, 180].
    rng = np.random.default_rng(0)
    naive = conventions.euler_to_matrix(rng.uniform(-180, 180, 20000), rng.uniform(0, 180, 20000), rng.uniform(-180, 180, 20000))
    assert stats.kstest(_rotation_angle(naive), haar_cdf).pvalue < 1e-6
    assert angles[:, 1].min() >= 0 and angles[:, 1].max() <= 180


def test_limited_view_sets():
    rng = np.random.default_rng(1)
    top = sim.sample_rotations(100, rng, "top")
    assert (top[:, :2] == 0).all() and top[:, 2].std() > 50
    side = sim.sample_rotations(100, rng, "side")
    assert (side[:, 1] == 90).all() and side[:, 0].std() > 50
    mixed = sim.sample_rotations(400, rng, "top-side")
    assert set(np.unique(mixed[:, 1])) == {0.0, 90.0} and 0.35 < (mixed[:, 1] == 90).mean() < 0.65
    with pytest.raises(ValueError):
        sim.sample_rotations(3, rng, "diagonal")


def test_shift_distributions_stay_within_max_shift():
    rng = np.random.default_rng(2)
    uniform = sim.sample_shifts(5000, rng, 4.0, "uniform")
    assert np.abs(uniform).max() <= 4 and uniform.std() == pytest.approx(4 / math.sqrt(3), rel=0.05)
    gauss = sim.sample_shifts(5000, rng, 4.0, "gaussian")
    assert np.abs(gauss).max() <= 4 and gauss.std() == pytest.approx(1.75, rel=0.1)
    assert (sim.sample_shifts(5, rng, 0.0) == 0).all()


# ------------------------------------------------------------------- projection

def _gaussian_volume(box, centres, sigma=1.5):
    idx = np.arange(box) - box // 2
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    vol = np.zeros((box,) * 3)
    for cx, cy, cz in centres:
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma ** 2))
    return vol.astype(np.float32)


POSES = [(0, 0, 0), (0, 0, 60), (30, 90, 0), (0, 90, 45), (70, 40, -120), (-45, 90, 90), (10, 180, 0)]


@pytest.mark.parametrize("box", [32, 33])
def test_off_centre_blob_lands_where_the_rotation_matrix_predicts(box):
    r0 = np.array([6.0, -3.0, 4.0])  # (x, y, z) voxels from the centre
    volume = _gaussian_volume(box, [r0])
    angles = np.array(POSES, dtype=np.float64)
    images = sim.project_volume(volume, angles[:, 0], angles[:, 1], angles[:, 2]).numpy()
    mats = conventions.euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    c = box // 2
    for image, mat in zip(images, mats):
        # P(x) = sum_z V(A^T (x, y, z)): the blob appears at (A r0)_xy
        expected = (mat @ r0)[:2] + c
        row, col = ndimage.center_of_mass(image)
        np.testing.assert_allclose([col, row], expected, atol=0.05)
        assert image.sum() == pytest.approx(volume.sum(), rel=5e-3)  # trilinear sampling keeps the mass


def test_projector_matches_an_independent_trilinear_line_integral():
    box = 24
    volume = _gaussian_volume(box, [(3, -2, 1), (-3, 3, -2), (0, 4, 2)], sigma=1.5)  # inside the inscribed sphere
    rot, tilt, psi = 37.0, 71.0, -20.0
    fast = sim.project_volume(volume, [rot], [tilt], [psi])[0].numpy()
    mat = conventions.euler_to_matrix(rot, tilt, psi)[0]
    c = box // 2
    axis = np.arange(box) - c
    y, x, z = np.meshgrid(axis, axis, np.arange(-box, box + 1), indexing="ij")
    points = np.stack([x, y, z], axis=-1) @ mat  # rows: (A^T p)^T
    sampled = ndimage.map_coordinates(volume.astype(np.float64), [points[..., 2] + c, points[..., 1] + c, points[..., 0] + c],
                                      order=1, mode="constant", cval=0.0)
    slow = sampled.sum(axis=-1)
    np.testing.assert_allclose(fast, slow, atol=2e-4 * slow.max())


# ------------------------------------------------------------- pose round trip

@pytest.mark.parametrize("downsample", [None, 24])
def test_noise_free_particle_undone_with_its_true_pose_matches_the_centred_projection(tmp_path, structures_dir, t20s_density, downsample):
    config = _config(structures_dir, ctf=False, snr=None, write_clean=True, downsample_to=downsample,
                     max_shift=4.0 * (downsample or BOX) / BOX)
    result = sim.run_simulation(config, tmp_path, progress=False, densities=[t20s_density])
    star = ParticleStar(result.files["particles.star"])
    table = star.particles
    clean = torch.as_tensor(_read(tmp_path, "clean.mrcs"))
    centred = _read(tmp_path, "centred.mrcs")
    np.testing.assert_array_equal(clean.numpy(), _read(tmp_path, "particles.mrcs"))  # no noise
    apix = star.pixel_size()
    assert apix == pytest.approx(config.output_pixel_size)
    psi = table["pvaeTrueAnglePsi"].to_numpy()
    origin = table[["pvaeTrueOriginXAngst", "pvaeTrueOriginYAngst"]].to_numpy()
    assert np.abs(origin / apix).max() > 1.0  # the shifts are real
    aligned = conventions.undo_relion_pose(clean, psi, origin, apix, mode="bicubic").numpy()

    def correlation(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    scores = [correlation(a, b) for a, b in zip(aligned, centred)]
    assert min(scores) > 0.995
    rel = np.linalg.norm(aligned - centred) / np.linalg.norm(centred)
    assert rel < 0.05
    # The check is sharp: the wrong origin sign or psi sign fails it.
    wrong_shift = conventions.undo_relion_pose(clean, psi, -origin, apix, mode="bicubic").numpy()
    wrong_psi = conventions.undo_relion_pose(clean, -psi, origin, apix, mode="bicubic").numpy()
    assert np.mean([correlation(a, b) for a, b in zip(wrong_shift, centred)]) < 0.97
    assert np.mean([correlation(a, b) for a, b in zip(wrong_psi, centred)]) < 0.97
    # centred.mrcs is the projection at (rot, tilt, 0): the same view for rot/tilt, regardless of psi.
    proj = sim.project_volume(t20s_density, table["pvaeTrueAngleRot"].to_numpy()[:2], table["pvaeTrueAngleTilt"].to_numpy()[:2], [0.0, 0.0])
    if downsample:
        from particle_vae.fourier import fourier_crop
        proj = fourier_crop(proj, downsample)
    np.testing.assert_allclose(centred[:2], proj.numpy(), atol=1e-3 * np.abs(centred).max())


# ------------------------------------------------------------------ SNR and CTF

def test_measured_snr_of_written_particles_equals_the_request(tmp_path, structures_dir, t20s_density):
    config = _config(structures_dir, n=40, snr=0.5, write_clean=True, batch_size=16)
    result = sim.run_simulation(config, tmp_path / "dataset", progress=False, densities=[t20s_density])
    clean = _read(tmp_path / "dataset", "clean.mrcs")
    noise = _read(tmp_path / "dataset", "particles.mrcs") - clean
    measured = clean.var(axis=(1, 2)).sum() / noise.var(axis=(1, 2)).sum()
    assert measured == pytest.approx(0.5, rel=0.03)
    assert result.snr_measured == pytest.approx(measured, rel=1e-4)
    summary = json.loads(result.files["simulation.json"].read_text())
    assert summary["snr_requested"] == 0.5 and summary["snr_measured"] == pytest.approx(measured, rel=1e-4)
    # one noise level for the dataset
    assert noise.std(axis=(1, 2)) == pytest.approx(np.full(40, result.noise_sigma), rel=0.1)

    per = sim.run_simulation(_config(structures_dir, n=40, snr=0.5, snr_mode="particle", write_clean=True),
                             tmp_path / "particle", progress=False, densities=[t20s_density])
    clean = _read(tmp_path / "particle", "clean.mrcs")
    noise = _read(tmp_path / "particle", "particles.mrcs") - clean
    ratios = clean.var(axis=(1, 2)) / noise.var(axis=(1, 2))
    assert np.all(np.abs(ratios / 0.5 - 1) < 0.2) and ratios.mean() == pytest.approx(0.5, rel=0.03)
    assert per.noise_sigma is None


def test_written_ctf_columns_reproduce_the_applied_ctf(tmp_path, structures_dir, t20s_density, cryoem_dir):
    star_path = cryoem_dir / "empiar10025_metadata" / "ctf_params.star"
    common = dict(snr=None, write_clean=False, bfactor=80.0, phase_shift=10.0, defocus_star=star_path)
    with_ctf = sim.run_simulation(_config(structures_dir, **common), tmp_path / "ctf", progress=False, densities=[t20s_density])
    without = sim.run_simulation(_config(structures_dir, ctf=False, **common), tmp_path / "noctf", progress=False, densities=[t20s_density])
    star = ParticleStar(with_ctf.files["particles.star"])
    plain_star = ParticleStar(without.files["particles.star"])
    for column in ("pvaeTrueAngleRot", "pvaeTrueAngleTilt", "pvaeTrueAnglePsi", "pvaeTrueOriginXAngst"):
        np.testing.assert_array_equal(star.particles[column], plain_star.particles[column])
    assert "rlnDefocusU" not in plain_star.particles.columns  # no CTF, no CTF columns
    params = star.ctf_parameters()
    assert (params["bfactor"] == 80).all() and (params["phase_shift"] == 10).all()
    from particle_vae.data.ctf import read_defocus_table
    rows = {tuple(np.round(r[:2], 3)) for r in read_defocus_table(star_path)}
    assert all(tuple(np.round(r, 3)) in rows for r in params[["defocus_u", "defocus_v"]].to_numpy())
    ctf = ctf_from_table(params, BOX, star.pixel_size(), dtype=torch.float64)
    predicted = apply_ctf(torch.as_tensor(_read(tmp_path / "noctf", "particles.mrcs")), ctf).numpy()
    observed = _read(tmp_path / "ctf", "particles.mrcs")
    error = np.linalg.norm(predicted - observed) / np.linalg.norm(observed)
    assert error < 1e-4
    # and a different defocus would not reproduce it
    params["defocus_u"] += 2000.0
    params["defocus_v"] += 2000.0
    off = apply_ctf(torch.as_tensor(_read(tmp_path / "noctf", "particles.mrcs")), ctf_from_table(params, BOX, star.pixel_size())).numpy()
    assert np.linalg.norm(off - observed) / np.linalg.norm(observed) > 100 * max(error, 1e-5)


def test_premultiplied_particles_are_the_recorded_ones_multiplied_by_their_ctf_again(tmp_path, structures_dir, t20s_density):
    """CTF * (CTF * projection + noise), checked against the same particles simulated without premultiplication.

    The output box is odd (Fourier-cropped 40 -> 39 px): an even box has a Nyquist column in the rfft2 grid that
    is its own mirror image, where a real image can only carry the CTF averaged over ky and -ky (apply_ctf's
    inverse transform averages), so there applying the CTF twice differs from applying its square."""
    from particle_vae.data.sources import open_source

    out = 39
    runs = {}
    for name, kw in (("noctf", dict(ctf=False)), ("plain", {}), ("pm", dict(ctf_premultiplied=True))):
        for snr in (None, 0.5):
            config = _config(structures_dir, snr=snr, write_clean=True, bfactor=40.0, downsample_to=out, **kw)
            runs[name, snr] = sim.run_simulation(config, tmp_path / f"{name}_{snr}", progress=False, densities=[t20s_density])
    apix = runs["pm", None].summary["settings"]["output_pixel_size"]
    table = ParticleStar(runs["pm", None].files["particles.star"]).ctf_parameters()
    ctf = ctf_from_table(table, out, apix, dtype=torch.float32)  # the simulator's float32 CTF (both evaluate in float64)
    c64 = ctf.to(torch.float64)
    projection = torch.as_tensor(_read(tmp_path / "noctf_None", "particles.mrcs"))  # shifted projections, no CTF
    plain = _read(tmp_path / "plain_None", "particles.mrcs")
    premultiplied = _read(tmp_path / "pm_None", "particles.mrcs")
    expected = torch.fft.irfft2(c64 * c64 * torch.fft.rfft2(projection), s=(out, out)).numpy()
    # Tolerance from float32 rounding (unit roundoff u = 2^-24): the recorded image is rounded to float32 once
    # (|error| <= u |plain| per pixel), multiplied by the CTF (|CTF| <= 1 does not grow an L2 error) and the
    # result rounded once more (<= u |premultiplied|); the float64 FFTs add ~1e-15 relative.
    u = 2.0 ** -24
    norm = lambda a: np.linalg.norm(a.reshape(len(a), -1), axis=1)  # noqa: E731
    bound = u * (norm(plain) + norm(premultiplied)) + 1e-12 * norm(projection.numpy())
    assert np.all(norm(premultiplied - expected) <= bound)
    assert np.all(norm(premultiplied - plain) > 1e3 * bound)  # the premultiplication is not a no-op
    np.testing.assert_array_equal(_read(tmp_path / "pm_None", "clean.mrcs"), premultiplied)  # clean.mrcs: as stored
    # with noise: the same noise as without premultiplication (the SNR is that of the recorded image), then the CTF again
    noisy_plain = _read(tmp_path / "plain_0.5", "particles.mrcs")
    noisy = _read(tmp_path / "pm_0.5", "particles.mrcs")
    again = torch.fft.irfft2(c64 * torch.fft.rfft2(torch.as_tensor(noisy_plain)), s=(out, out)).numpy()
    assert np.all(norm(noisy - again) <= u * norm(noisy) + 1e-12 * norm(noisy_plain))
    assert runs["pm", 0.5].noise_sigma == runs["plain", 0.5].noise_sigma
    assert runs["pm", 0.5].snr_measured == runs["plain", 0.5].snr_measured == pytest.approx(0.5, rel=0.1)
    summary = json.loads(runs["pm", 0.5].files["simulation.json"].read_text())
    assert summary["ctf_premultiplied"] is True and "before the CTF premultiplication" in summary["snr_definition"]
    # the written STAR carries the flag in its optics block, and the reader hands it on: effective_ctf is CTF^2
    from particle_vae.data.ctf import effective_ctf
    from particle_vae.io.star import PREMULTIPLIED, read_star

    optics = read_star(runs["pm", 0.5].files["particles.star"]).blocks["optics"]
    assert PREMULTIPLIED in optics.columns and optics[PREMULTIPLIED].tolist() == [1]
    assert PREMULTIPLIED not in read_star(runs["plain", 0.5].files["particles.star"]).blocks["optics"].columns
    for name, squared in (("pm", True), ("plain", False)):
        source = open_source(runs[name, 0.5].files["particles.star"])
        params = source.star.ctf_parameters()
        assert params["premultiplied"].tolist() == [squared] * 12
        physical = ctf_from_table(params, out, source.pixel_size, dtype=torch.float64)
        assert torch.equal(effective_ctf(params, out, source.pixel_size, dtype=torch.float64), physical ** 2 if squared else physical)


def test_premultiplied_needs_a_ctf(structures_dir, t20s_density):
    with pytest.raises(InputFileError, match="--ctf-premultiplied"):
        sim.Simulator(_config(structures_dir, ctf=False, ctf_premultiplied=True), [t20s_density])


# --------------------------------------------------------------------- outputs

def test_outputs_read_back_with_all_columns(tmp_path, structures_dir, t20s_density):
    config = _config(structures_dir, n=10, snr=0.2)
    result = sim.run_simulation(config, tmp_path, progress=False, densities=[t20s_density])
    star = ParticleStar(result.files["particles.star"])
    assert star.is_relion31 and len(star) == 10
    expected = ["rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnPhaseShift",
                "pvaeTrueAngleRot", "pvaeTrueAngleTilt", "pvaeTrueAnglePsi", "pvaeTrueOriginXAngst", "pvaeTrueOriginYAngst",
                "pvaeTrueClass", "pvaeTrueStructure"]
    assert list(star.particles.columns) == expected
    assert (star.particles["pvaeTrueClass"] == 1).all() and (star.particles["pvaeTrueStructure"] == "t20s").all()
    assert star.pixel_size() == APIX and int(star.optics["rlnImageSize"].iloc[0]) == BOX
    assert float(star.optics["rlnVoltage"].iloc[0]) == 300.0
    locations = star.image_locations()
    assert locations.stack_paths == [result.files["particles.mrcs"]]
    np.testing.assert_array_equal(locations.image_index, np.arange(10))
    stack = MRCStack(result.files["particles.mrcs"])
    assert stack.shape == (10, BOX, BOX) and stack.pixel_size == pytest.approx(APIX)
    np.testing.assert_allclose(star.particles[["pvaeTrueAngleRot", "pvaeTrueAngleTilt", "pvaeTrueAnglePsi"]].to_numpy(),
                               sim.Simulator(config, [t20s_density]).params.angles)
    summary = json.loads(result.files["simulation.json"].read_text())
    assert summary["settings"]["n"] == 10 and summary["classes"][0]["count"] == 10
    assert set(summary["files"]) == {"particles.mrcs", "particles.star", "simulation.json"}


def test_results_do_not_depend_on_batch_size_and_follow_the_seed(tmp_path, structures_dir, t20s_density):
    runs = {}
    for name, batch, seed in (("a", 3, 7), ("b", 64, 7), ("c", 64, 8)):
        sim.run_simulation(_config(structures_dir, n=9, snr=0.3, batch_size=batch, seed=seed), tmp_path / name,
                           progress=False, densities=[t20s_density])
        runs[name] = _read(tmp_path / name, "particles.mrcs")
    np.testing.assert_allclose(runs["a"], runs["b"], rtol=0, atol=1e-5 * np.abs(runs["a"]).max())
    assert not np.allclose(runs["a"], runs["c"])


def test_mixture_preset_keeps_class_labels(tmp_path, data_root):
    config = sim.preset_config("mixture", 9, data_dir=data_root, box=32, pixel_size=9.0, snr=None, seed=1)
    assert [s.name for s in config.structures] == ["t20s", "groel", "groel_ring"]
    assert config.defocus_star is not None and config.downsample_to is None
    result = sim.run_simulation(config, tmp_path, progress=False)
    table = ParticleStar(result.files["particles.star"]).particles
    names = dict(zip(table["pvaeTrueClass"], table["pvaeTrueStructure"]))
    assert set(names) <= {1, 2, 3} and len(names) >= 2
    assert all(names[k] == ["t20s", "groel", "groel_ring"][k - 1] for k in names)
    assert sum(c["count"] for c in result.summary["classes"]) == 9


def test_groel_preset_numbers(data_root):
    config = sim.preset_config("groel", 5, data_dir=data_root)
    assert (config.box, config.pixel_size, config.output_box) == (200, 1.35, 100)
    assert config.output_pixel_size == pytest.approx(2.7)
    assert config.structures[0].path.name == "groel_1oel.pdb" and config.structures[0].assembly
    t20s = sim.preset_config("t20s", 5, data_dir=data_root)
    assert (t20s.box, t20s.pixel_size, t20s.voltage, t20s.cs, t20s.amplitude_contrast) == (64, 4.0, 300.0, 2.7, 0.1)
    assert t20s.defocus_star.name == "ctf_params.star"
    # overriding the box turns the preset's downsampling off
    assert sim.preset_config("groel", 5, data_dir=data_root, box=64).downsample_to is None


# ------------------------------------------------------------------------- CLI

@pytest.fixture()
def run_cli(monkeypatch, capsys):
    """Call particle_vae.cli.main with only the simulate command registered."""
    monkeypatch.setattr(cli, "COMMANDS", {"simulate": cli.COMMANDS["simulate"]})

    def call(*argv):
        code = cli.main(["-q", "simulate", *map(str, argv)])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return code, captured.err
    return call


def test_cli_end_to_end(tmp_path, data_root, run_cli):
    out = tmp_path / "sim"
    args = ["--preset", "t20s", "--n", 6, "--box", 32, "--pixel-size", 8, "--out", out, "--data-dir", data_root,
            "--write-clean", "--no-progress", "--snr", 0.2, "--seed", 4]
    code, err = run_cli(*args)
    assert code == 0, err
    for name in ("particles.mrcs", "particles.star", "simulation.json", "clean.mrcs", "centred.mrcs"):
        assert (out / name).is_file()
    assert MRCStack(out / "particles.mrcs").shape == (6, 32, 32)
    summary = json.loads((out / "simulation.json").read_text())
    assert summary["settings"]["seed"] == 4 and summary["snr_requested"] == 0.2
    code, err = run_cli(*args)
    assert code == 2 and err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    code, err = run_cli(*args, "--overwrite", "--downsample-to", 16, "--no-ctf", "--snr", "inf")
    assert code == 0, err
    assert MRCStack(out / "particles.mrcs").shape == (6, 16, 16)
    assert ParticleStar(out / "particles.star").pixel_size() == pytest.approx(16.0)
    code, err = run_cli(*args, "--overwrite", "--ctf-premultiplied")
    assert code == 0, err
    assert ParticleStar(out / "particles.star").optics["rlnCtfDataAreCtfPremultiplied"].tolist() == [1]
    assert json.loads((out / "simulation.json").read_text())["settings"]["ctf_premultiplied"] is True
    code, err = run_cli(*args, "--overwrite", "--ctf-premultiplied", "--no-ctf")
    assert code == 2 and err.count("\n") == 1 and "--ctf-premultiplied" in err and "--no-ctf" in err


def test_cli_error_paths_name_the_file(tmp_path, data_root, run_cli):
    common = ["--n", 4, "--box", 32, "--pixel-size", 8, "--no-progress", "--data-dir", data_root]
    missing = tmp_path / "nothere.mrc"
    code, err = run_cli("--out", tmp_path / "a", "--structure", missing, *common)
    assert code == 2 and err.count("\n") == 1 and str(missing) in err

    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    NO ATOMS\nEND\n")
    code, err = run_cli("--out", tmp_path / "b", "--structure", empty, *common)
    assert code == 2 and err.count("\n") == 1 and str(empty) in err and "ATOM" in err

    nodefocus = tmp_path / "nodefocus.star"
    nodefocus.write_text("data_particles\n\nloop_\n_rlnImageName #1\n1@x.mrcs\n")
    code, err = run_cli("--out", tmp_path / "c", "--defocus-star", nodefocus, *common)
    assert code == 2 and err.count("\n") == 1 and str(nodefocus) in err and "rlnDefocusU" in err

    code, err = run_cli("--out", tmp_path / "d", "--downsample-to", 64, *common)
    assert code == 2 and err.count("\n") == 1 and "--downsample-to" in err

    code, err = run_cli("--out", tmp_path / "e", "--max-shift", 20, *common)
    assert code == 2 and err.count("\n") == 1 and "--max-shift" in err

    small = tmp_path / "small"
    code, err = run_cli("--out", small, "--box", 8, "--pixel-size", 2, "--n", 2, "--no-progress", "--data-dir", data_root)
    assert code == 2 and err.count("\n") == 1 and "t20s_3j9i.pdb" in err and "does not fit" in err

    # an input is never overwritten, even with --overwrite
    code, err = run_cli("--out", tmp_path / "f", *common)
    assert code == 0, err
    code, err = run_cli("--out", tmp_path / "f", "--defocus-star", tmp_path / "f" / "particles.star", "--overwrite", *common)
    assert code == 2 and "input" in err and str(tmp_path / "f" / "particles.star") in err
    assert (tmp_path / "f" / "particles.star").read_text().count("rlnDefocusU") == 1


def test_the_output_folder_can_be_the_project_folder_before_it_exists(tmp_path, data_root):
    """``simulate --out sim --project-dir sim``: names relative to the simulation's own folder, which is created."""
    from particle_vae import cli
    from particle_vae.io.star import ParticleStar

    out = tmp_path / "new" / "sim"
    assert cli.main(["-q", "simulate", "--preset", "t20s", "--n", "3", "--box", "16", "--pixel-size", "16", "--data-dir", str(data_root), "--out", str(out),
                     "--project-dir", str(out), "--no-progress"]) == 0
    assert ParticleStar(out / "particles.star").particles["rlnImageName"].str.endswith("@particles.mrcs").all()
