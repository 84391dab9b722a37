"""`particle-vae analyze`: clustering, aligned class averages, plots, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from particle_vae import cli
from particle_vae.analysis import clustering
from particle_vae.analysis.averages import traversal_values
from particle_vae.analysis.metrics import clustering_accuracy, image_centre_of_mass
from particle_vae.conventions import apply_relion_pose, fourier_shift, pixel_grid, undo_relion_pose
from particle_vae.io.mrc import MRCStack, write_stack
from particle_vae.io.star import ParticleStar, image_name, make_particle_star

TINY = ["--preset", "tiny", "--fields", "4", "--gen-hidden", "32", "--fourier-features", "16", "--group", "4",
        "--downsample-to", "24", "--batch-size", "16", "--seed", "3"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A three-class simulated mixture (96 particles, 32 px), a tiny model trained
    for one epoch on it, and the STAR its inference wrote."""
    root = tmp_path_factory.mktemp("mixture")
    assert cli.main(["-q", "simulate", "--preset", "mixture", "--n", "96", "--box", "32", "--pixel-size", "8", "--snr", "1",
                     "--data-dir", str(data_root), "--out", str(root / "sim"), "--no-progress"]) == 0
    run = root / "run"
    assert cli.main(["-q", "train", str(root / "sim" / "particles.star"), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    star = root / "inferred" / "particles_vae.star"
    assert cli.main(["-q", "infer", str(run), "--out", str(star)]) == 0
    return run, star


def test_analyze_with_a_run_writes_every_output(trained, tmp_path):
    run, star = trained
    out = tmp_path / "analysis"
    assert cli.main(["-q", "analyze", str(star), "--run", str(run), "--method", "gmm", "--k", "3", "--gallery", "4",
                     "--traversal-steps", "5", "--out", str(out)]) == 0
    source = ParticleStar(star)
    clustered = ParticleStar(out / "clustered_particles.star")
    # every input row and column, the optics block, and 1-based classes
    assert len(clustered) == len(source) == 96
    for column in source.particles.columns:
        if column not in ("rlnImageName", "rlnOriginXAngst", "rlnOriginYAngst"):  # origins: re-centred (below)
            pd.testing.assert_series_equal(clustered.particles[column], source.particles[column], check_names=False)
    assert clustered.optics.equals(source.optics)
    classes = clustered.particles["rlnClassNumber"].to_numpy()
    assert classes.dtype.kind == "i" and classes.min() >= 1 and classes.max() <= 3
    assert clustered.image_locations().stack_paths[0].resolve() == source.image_locations().stack_paths[0].resolve()

    record = json.loads((out / "analysis.json").read_text())
    assert record["method"] == "gmm" and record["k"] == 3 and record["k_selection"] == "given"
    assert list(record["scores"]) == ["3"] and record["criterion"] == "bic"
    counts = [c["count"] for c in record["classes"]]
    assert sum(counts) == 96 and counts == sorted(counts, reverse=True)
    assert counts == [int((classes == j).sum()) for j in (1, 2, 3)]

    model_box = json.loads((run / "config.json").read_text())["model"]["box"]
    averages = MRCStack(out / "class_averages.mrcs")
    assert (averages.n_images, averages.box) == (3, model_box)
    assert np.isfinite(averages.read(0, 3)).all()
    class_star = ParticleStar(out / "class_averages.star")
    # the current folder is the project folder and the output lies outside it: absolute names
    assert class_star.particles["rlnImageName"].tolist() == [image_name(j, str(out / "class_averages.mrcs")) for j in range(3)]
    assert class_star.particles["rlnClassNumber"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(class_star.particles["rlnClassDistribution"], np.array(counts) / 96, atol=1e-6)
    assert class_star.pixel_size() == pytest.approx(record["averages"]["pixel_size"])
    assert record["averages"]["aligned"] is True and record["averages"]["box"] == model_box
    assert record["averages"]["centred"] is True and len(record["averages"]["centre_shift_px"]) == 3
    moved = np.hypot(clustered.particles["rlnOriginXAngst"] - source.particles["rlnOriginXAngst"],
                     clustered.particles["rlnOriginYAngst"] - source.particles["rlnOriginYAngst"]).to_numpy()
    shift_angst = np.hypot(*np.array(record["averages"]["centre_shift_px"]).T) * record["averages"]["pixel_size"]
    np.testing.assert_allclose(moved, shift_angst[classes - 1], atol=2e-3)  # a rotation of each class's shift (shifts rounded to 1e-4 px)
    assert class_star.image_locations().stack_paths[0].name == "class_averages.mrcs"
    centres = MRCStack(out / "cluster_centres.mrcs")
    assert (centres.n_images, centres.box) == (3, model_box)

    scatter = pd.read_csv(out / "latent_scatter.csv")
    assert len(scatter) == 96 and (scatter["rlnClassNumber"].to_numpy() == classes).all()
    traversal = np.load(out / "latent_traversal.npz")
    assert traversal["images"].shape == (5, 5, model_box, model_box) and traversal["z"].shape == (5, 5, 2)
    gallery = np.load(out / "gallery.npz")
    assert gallery["gallery"].shape == (3, 4, model_box, model_box) and gallery["averages"].shape == (3, model_box, model_box)
    assert pd.read_csv(out / "training_curves.csv")["epoch"].tolist() == [1]  # counted from 1, as train.log counts
    poses = pd.read_csv(out / "pose_histograms.csv")
    assert poses.groupby("quantity")["count"].sum().eq(96).all()
    for name in ("class_averages", "latent_scatter", "latent_traversal", "pose_histograms", "training_curves", "gallery"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name
    assert set(record["outputs"].values()) == {p.name for p in out.iterdir()}

    # select the largest class from the result, ready for RELION
    subset = tmp_path / "class1.star"
    assert cli.main(["-q", "select", str(out / "clustered_particles.star"), "--classes", "1", "--out", str(subset)]) == 0
    chosen = ParticleStar(subset)
    assert len(chosen) == counts[0] and list(chosen.particles.columns) == list(clustered.particles.columns)
    assert chosen.optics.equals(clustered.optics) and (chosen.particles["rlnClassNumber"] == 1).all()


def test_analyze_a_run_directory_with_k_auto_and_tsne(trained, tmp_path):
    run, star = trained
    out = tmp_path / "auto"
    assert cli.main(["-q", "analyze", str(run), "--star", str(star), "--method", "ward", "--k", "auto", "--k-range", "2", "5",
                     "--tsne", "--no-images", "--out", str(out)]) == 0
    record = json.loads((out / "analysis.json").read_text())
    assert record["k_selection"] == "auto" and record["criterion"] == "silhouette"
    assert list(record["scores"]) == ["2", "3", "4", "5"]
    assert record["scores"][str(record["k"])] == max(record["scores"].values())
    assert len(pd.read_csv(out / "latent_tsne.csv")) == 96
    assert not (out / "class_averages.mrcs").exists() and record["averages"] is None
    assert MRCStack(out / "cluster_centres.mrcs").n_images == record["k"]


# --------------------------------------------------------------------------- aligned averages, by hand


BOX, APIX = 32, 2.0


def _template(centres, sigma: float = 1.8) -> torch.Tensor:
    grid = pixel_grid(BOX, dtype=torch.float64)
    image = torch.zeros(BOX, BOX, dtype=torch.float64)
    for cx, cy in centres:
        image += torch.exp(-((grid[..., 0] - cx) ** 2 + (grid[..., 1] - cy) ** 2) / (2 * sigma ** 2))
    return image


def test_class_averages_undo_known_relion_poses(tmp_path):
    """Particles made from two templates with known RELION poses, and latents
    that separate the two groups: each class average is its template."""
    templates = [_template([(-6, 0), (0, 0), (6, 0), (6, 6)]), _template([(0, 7), (-6, -4), (6, -4)])]
    rng = np.random.default_rng(1)
    n = 48
    group = rng.permutation(np.repeat([0, 1], n // 2))
    psi = rng.uniform(-180, 180, n)
    origin = rng.uniform(-3, 3, (n, 2)) * APIX
    references = torch.stack([templates[g] for g in group])
    particles = apply_relion_pose(references, psi, origin, APIX, mode="bicubic").numpy()
    stack = write_stack(tmp_path / "particles.mrcs", particles, APIX)
    z = np.where(group[:, None] == 0, [-3.0, 0.0], [3.0, 0.5]) + rng.normal(0, 0.1, (n, 2))
    columns = {"rlnAnglePsi": psi, "rlnOriginXAngst": origin[:, 0], "rlnOriginYAngst": origin[:, 1],
               "pvaeZ1": z[:, 0], "pvaeZ2": z[:, 1], "pvaeZStd1": np.full(n, 0.1), "pvaeZStd2": np.full(n, 0.1)}
    star = make_particle_star([image_name(i, stack.name) for i in range(n)], APIX, BOX, columns=columns)
    star_path = star.write(tmp_path / "posed.star")

    out = tmp_path / "analysis"
    assert cli.main(["-q", "analyze", str(star_path), "--k", "2", "--normalize", "none", "--no-center", "--out", str(out)]) == 0
    classes = ParticleStar(out / "clustered_particles.star").particles["rlnClassNumber"].to_numpy()
    averages = MRCStack(out / "class_averages.mrcs").read(0, 2)
    assert averages.shape == (2, BOX, BOX)
    for number in (1, 2):
        members = group[classes == number]
        assert len(set(members)) == 1, "the latents separate the groups exactly"
        template = templates[members[0]].numpy()
        error = np.linalg.norm(averages[number - 1] - template) / np.linalg.norm(template)
        assert error < 0.06, (number, error)
    # undoing the opposite rotation does not give the template: the check has teeth
    wrong = undo_relion_pose(torch.as_tensor(particles[group == 0], dtype=torch.float64), -psi[group == 0],
                             origin[group == 0], APIX, mode="bicubic").mean(0).numpy()
    assert np.linalg.norm(wrong - templates[0].numpy()) / np.linalg.norm(templates[0].numpy()) > 0.3
    record = json.loads((out / "analysis.json").read_text())
    assert record["averages"]["aligned"] and record["averages"]["images"] == "raw particles, normalize=none"
    assert "cluster_centres" not in " ".join(record["outputs"].values())
    assert record["averages"]["centred"] is False and record["averages"]["centre_shift_px"] is None

    # by default the averages are centred on their centre of mass, and the written origins agree with them
    centred_out = tmp_path / "centred"
    assert cli.main(["-q", "analyze", str(star_path), "--k", "2", "--normalize", "none", "--out", str(centred_out)]) == 0
    clustered = ParticleStar(centred_out / "clustered_particles.star").particles
    centred = MRCStack(centred_out / "class_averages.mrcs").read(0, 2)
    shifts = json.loads((centred_out / "analysis.json").read_text())["averages"]["centre_shift_px"]
    assert np.hypot(*image_centre_of_mass(templates[0].numpy())) > 2.0  # off-centre: centring has something to do
    for number in (1, 2):
        template = templates[group[classes == number][0]]
        com = image_centre_of_mass(template.numpy())
        np.testing.assert_allclose(shifts[number - 1], -com, atol=0.15)
        expected = fourier_shift(template, torch.as_tensor(-com)).numpy()
        assert np.abs(image_centre_of_mass(centred[number - 1])).max() < 0.1
        assert np.linalg.norm(centred[number - 1] - expected) / np.linalg.norm(expected) < 0.06
        # undoing the new poses of the class's particles gives the centred template
        rows = np.flatnonzero(classes == number)
        redone = undo_relion_pose(torch.as_tensor(particles[rows], dtype=torch.float64), clustered["rlnAnglePsi"].to_numpy()[rows],
                                  clustered[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[rows], APIX, mode="bicubic")
        assert np.linalg.norm(redone.mean(0).numpy() - expected) / np.linalg.norm(expected) < 0.06


# --------------------------------------------------------------------------- clustering units


def _blobs(seed: int = 0, per: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [3.0, 5.0]])
    labels = np.repeat(np.arange(3), per)
    return centres[labels] + rng.normal(0, 0.4, (3 * per, 2)), labels


@pytest.mark.parametrize("method", ["kmeans", "gmm", "ward"])
def test_k_auto_picks_three_well_separated_blobs(method):
    z, truth = _blobs()
    selection = clustering.suggest_k(z, method, (1 if method == "gmm" else 2, 6))
    assert selection.k == 3, selection.scores
    result = clustering.fit_clusters(z, 3, method)
    from particle_vae.analysis.metrics import clustering_accuracy

    assert clustering_accuracy(truth, result.labels) == 1.0
    assert result.counts.tolist() == [40, 40, 40] and result.centres.shape == (3, 2)


def test_clusters_are_numbered_by_size():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 0.2, (10, 2)), rng.normal(5, 0.2, (30, 2)), rng.normal(-5, 0.2, (20, 2))])
    result = clustering.fit_clusters(z, 3, "kmeans")
    assert result.counts.tolist() == [30, 20, 10]
    np.testing.assert_allclose(result.centres[0], [5, 5], atol=0.2)
    assert (result.labels[10:40] == 0).all()


def test_latent_columns_and_traversal_grid():
    frame = pd.DataFrame({"pvaeZ10": [0.0], "pvaeZ2": [0.0], "pvaeZStd1": [0.0], "pvaeZ1": [0.0], "rlnAnglePsi": [0.0]})
    assert clustering.latent_columns(frame) == ["pvaeZ1", "pvaeZ2", "pvaeZ10"]
    z = np.random.default_rng(0).normal(size=(200, 3))
    grid, axes = traversal_values(z, (0, 2), steps=4)
    assert grid.shape == (4, 4, 3) and axes.shape == (2, 4)
    np.testing.assert_allclose(grid[:, 0, 0], axes[0])
    np.testing.assert_allclose(grid[0, :, 2], axes[1])
    np.testing.assert_allclose(grid[..., 1], np.median(z[:, 1]))


def test_k_auto_through_the_cli_on_blobs_without_images(tmp_path, capsys):
    z, _ = _blobs(per=20)
    star = make_particle_star([image_name(i, "absent.mrcs") for i in range(len(z))], 1.0, 16,
                              columns={"pvaeZ1": z[:, 0], "pvaeZ2": z[:, 1]})
    path = star.write(tmp_path / "blobs.star")
    assert cli.main(["-q", "analyze", str(path), "--method", "gmm", "--no-images", "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert record["k"] == 3 and list(record["scores"]) == [str(k) for k in range(1, 11)]
    assert [c["count"] for c in record["classes"]] == [20, 20, 20]
    # no pose columns: no pose histograms; the stacks are absent, so the names are kept (with a warning)
    assert not (tmp_path / "a" / "pose_histograms.png").exists()
    assert "rlnImageName kept" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def _latent_star(tmp_path, n: int = 5, latent: bool = True):
    columns = {"pvaeZ1": np.arange(n, dtype=float), "pvaeZ2": np.zeros(n)} if latent else {"rlnDefocusU": np.full(n, 1e4)}
    star = make_particle_star([image_name(i, "absent.mrcs") for i in range(n)], 1.0, 16, columns=columns)
    return star.write(tmp_path / ("latents.star" if latent else "plain.star"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (lambda tmp: [str(_latent_star(tmp, latent=False))], "plain.star: has no pvaeZ latent columns"),
        (lambda tmp: [str(_latent_star(tmp)), "--k", "6"], "--k 6 is larger than the number of particles (5)"),
        (lambda tmp: [str(_latent_star(tmp)), "--k", "0"], "below 1"),
        (lambda tmp: [str(tmp / "missing.star")], "missing.star: not found"),
        (lambda tmp: [str(tmp)], "pass --star"),
        (lambda tmp: [str(_latent_star(tmp)), "--run", str(tmp / "norun")], "norun: is not a run directory"),
        (lambda tmp: [str(_latent_star(tmp)), "--method", "kmeans", "--k-range", "2", "9"], "can score k from 1 to 4"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, capsys, args, expected):
    argv = args(tmp_path)
    assert cli.main(["-q", "analyze", *argv, "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert expected in err, err


def test_analyze_never_overwrites_its_input(tmp_path, capsys):
    star = _latent_star(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["-q", "analyze", str(star), "--k", "2", "--no-images", "--out", str(out)]) == 0
    capsys.readouterr()
    clustered = out / "clustered_particles.star"
    before = clustered.read_bytes()
    assert cli.main(["-q", "analyze", str(clustered), "--k", "3", "--no-images", "--overwrite", "--out", str(out)]) == 2
    assert "is an input of this command" in one_line_error(capsys)
    assert clustered.read_bytes() == before


def test_analyze_refuses_to_overwrite_and_checks_the_run(trained, tmp_path, capsys):
    run, star = trained
    out = tmp_path / "a"
    assert cli.main(["-q", "analyze", str(star), "--k", "2", "--no-images", "--out", str(out)]) == 0
    before = (out / "analysis.json").read_bytes()
    assert cli.main(["-q", "analyze", str(star), "--k", "2", "--no-images", "--out", str(out)]) == 2
    assert "already exists" in one_line_error(capsys) and (out / "analysis.json").read_bytes() == before
    # a STAR whose latent size does not match the run
    three = ParticleStar(star).with_columns({"pvaeZ3": np.zeros(96)}).write(tmp_path / "three.star")
    assert cli.main(["-q", "analyze", str(three), "--run", str(run), "--k", "2", "--out", str(tmp_path / "b")]) == 2
    assert "3 latent columns but the run" in one_line_error(capsys)
    assert cli.main(["-q", "analyze", str(star), "--run", str(run), "--traverse", "3", "--out", str(tmp_path / "c")]) == 2
    assert "--traverse takes one or two different latent dimensions between 1 and 2" in one_line_error(capsys)


# --------------------------------------------------------------------------- classes of infer's pose refinement


def _refined_pair(tmp_path) -> Path:
    """An infer-like STAR: 4 refinement classes of 30 particles whose latents are too noisy to
    cluster one by one (two populations 1.5 apart, noise 1.0), but whose class means are clear."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 30)
    population = groups // 2  # classes 0, 1 -> population 0; 2, 3 -> 1
    z = np.stack([1.5 * population, np.zeros(len(groups))], 1) + rng.normal(0.0, 1.0, (len(groups), 2))
    star = make_particle_star([image_name(i, "absent.mrcs") for i in range(len(z))], 1.0, 16,
                              columns={"pvaeZ1": z[:, 0], "pvaeZ2": z[:, 1], "pvaeTruth": population, "pvaeRefineClass": groups + 1})
    return star.write(tmp_path / "inferred.star")


def test_merge_groups_keeps_groups_whole_and_follows_their_means():
    z = np.array([[0.0], [0.2], [10.0], [10.4], [0.1], [9.9]])
    groups = np.array([7, 7, 3, 3, 5, 9])
    result = clustering.merge_groups(z, groups, 2)
    assert result.labels.tolist() == [0, 0, 1, 1, 0, 1] and result.counts.tolist() == [3, 3]
    np.testing.assert_allclose(result.centres[:, 0], [0.1, (10.0 + 10.4 + 9.9) / 3])
    with pytest.raises(ValueError, match="4 groups"):
        clustering.merge_groups(z, groups, 5)


def test_merge_groups_puts_joined_particles_in_the_cluster_of_the_group_they_join():
    """``join`` moves single particles (infer's low-resolution class) and leaves the clusters of the groups as they were."""
    z = np.array([[0.0], [0.2], [10.0], [10.4], [0.1], [9.9]])
    groups = np.array([7, 7, 3, 3, 5, 9])
    plain = clustering.merge_groups(z, groups, 2)
    # particle 1 (group 7, near 0) joins group 9 (near 10); particle 3 joins its own group; 4 names a group no particle has
    joined = clustering.merge_groups(z, groups, 2, join=np.array([7, 9, 3, 3, 42, 9]))
    assert joined.labels.tolist() == [1, 0, 0, 0, 1, 0] and joined.counts.tolist() == [4, 2]
    assert joined.info["moved"] == 1 and plain.info["moved"] == 0
    np.testing.assert_allclose(joined.centres[:, 0], [(0.2 + 10.0 + 10.4 + 9.9) / 4, 0.05])
    with pytest.raises(ValueError, match="5 joined groups"):
        clustering.merge_groups(z, groups, 2, join=groups[:5])


def test_merge_groups_separates_structures_by_mass_where_the_latents_mix():
    """Six classes: two structures seen in three views each, where the latent follows the view
    (means 0, 1, 2 for both); the masses (1000 and 1300, each within 1%) tell the structures apart."""
    views = np.array([0.0, 1.0, 2.0, 0.05, 1.05, 2.05])
    structure = np.array([0, 0, 0, 1, 1, 1])
    class_mass = np.array([1000.0, 1008.0, 995.0, 1300.0, 1290.0, 1311.0])
    groups = np.repeat(np.arange(6), 10)
    z = views[groups][:, None]
    truth = structure[groups]
    by_mass = clustering.merge_groups(z, groups, 2, mass=class_mass[groups])
    assert clustering_accuracy(truth, by_mass.labels) == 1.0 and by_mass.info["mass"]
    by_latent = clustering.merge_groups(z, groups, 2)
    assert clustering_accuracy(truth, by_latent.labels) <= 4 / 6 + 1e-9 and not by_latent.info["mass"]
    # one structure in two states the latents separate (masses within 2%): the latents decide, as without masses
    states = np.array([0.0, 0.1, 0.2, 3.0, 3.1, 3.2])[groups][:, None]
    same = np.array([1000.0, 1020.0, 985.0, 1010.0, 990.0, 1015.0])
    np.testing.assert_array_equal(clustering.merge_groups(states, groups, 2, mass=same[groups]).labels,
                                  clustering.merge_groups(states, groups, 2).labels)
    # a flat reference (mass <= 0) is a class of its own kind, not an error
    flat = class_mass.copy()
    flat[2] = 0.0
    assert (clustering.merge_groups(z, groups, 3, mass=flat[groups]).labels[groups == 2] == 2).all()
    with pytest.raises(ValueError, match="mass tolerance"):
        clustering.merge_groups(z, groups, 2, mass=class_mass[groups], mass_tolerance=0.0)
    with pytest.raises(ValueError, match="NaN"):
        clustering.merge_groups(z, groups, 2, mass=np.full(len(z), np.nan))


def test_analyze_groups_refinement_classes_by_mass(tmp_path, capsys):
    """Infer's class masses group the classes when the latents cannot; --mass-tolerance 0 turns them off."""
    path = _refined_pair(tmp_path)
    star = ParticleStar(path)
    groups = star.particles["pvaeRefineClass"].to_numpy() - 1
    # the latents put classes 1+2 against 3+4; the masses put 1+3 against 2+4
    truth = groups % 2
    star = star.with_columns({"pvaeRefineClassMass": np.where(truth == 0, 900.0, 1400.0), "pvaeTruth": truth})
    path = star.write(tmp_path / "with_mass.star")
    assert cli.main(["-q", "analyze", str(path), "--k", "2", "--no-images", "--out", str(tmp_path / "mass")]) == 0
    grouped = ParticleStar(tmp_path / "mass" / "clustered_particles.star").particles["rlnClassNumber"].to_numpy()
    assert clustering_accuracy(truth, grouped) == 1.0
    assert json.loads((tmp_path / "mass" / "analysis.json").read_text())["mass_tolerance"] == 0.1
    assert cli.main(["-q", "analyze", str(path), "--k", "2", "--mass-tolerance", "0", "--no-images", "--out", str(tmp_path / "z")]) == 0
    latent = ParticleStar(tmp_path / "z" / "clustered_particles.star").particles["rlnClassNumber"].to_numpy()
    assert clustering_accuracy(truth, latent) == 0.5
    assert json.loads((tmp_path / "z" / "analysis.json").read_text())["mass_tolerance"] is None
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(path), "--k", "2", "--mass-tolerance", "-1", "--no-images", "--out", str(tmp_path / "bad")]) == 2
    assert "--mass-tolerance -1.0 must be a number >= 0" in one_line_error(capsys)
    text = path.read_text().replace("1400.0", "nan", 1)
    broken = tmp_path / "broken.star"
    broken.write_text(text)
    assert cli.main(["-q", "analyze", str(broken), "--k", "2", "--no-images", "--out", str(tmp_path / "broken_out")]) == 2
    assert "pvaeRefineClassMass column holds values that are not numbers" in one_line_error(capsys)
    classes = ParticleStar(path).particles["pvaeRefineClass"].to_numpy().astype(np.float64)
    classes[3] = np.nan
    no_class = ParticleStar(path).with_columns({"pvaeRefineClass": classes}).write(tmp_path / "no_class.star")
    assert cli.main(["-q", "analyze", str(no_class), "--k", "2", "--no-images", "--out", str(tmp_path / "no_class_out")]) == 2
    assert "pvaeRefineClass column holds values that are not class numbers" in one_line_error(capsys)


def test_analyze_puts_each_particle_in_the_group_of_its_low_resolution_class(tmp_path, capsys):
    """infer's pvaeLowResClass moves a particle into the group of the class it fits best at low resolution;
    without the column every particle stays with its refinement class."""
    plain_path = _refined_pair(tmp_path)
    star = ParticleStar(plain_path)
    classes = star.particles["pvaeRefineClass"].to_numpy()
    low_res = classes.copy()
    moved = np.flatnonzero(classes == 1)[:3]
    target = classes[np.argmax(star.particles["pvaeTruth"].to_numpy() != star.particles["pvaeTruth"].to_numpy()[moved[0]])]
    low_res[moved] = target
    path = star.with_columns({"pvaeLowResClass": low_res}).write(tmp_path / "low_res.star")
    assert cli.main(["-q", "analyze", str(path), "--k", "2", "--no-images", "--out", str(tmp_path / "joined")]) == 0
    joined = ParticleStar(tmp_path / "joined" / "clustered_particles.star").particles["rlnClassNumber"].to_numpy()
    assert cli.main(["-q", "analyze", str(plain_path), "--k", "2", "--no-images", "--out", str(tmp_path / "plain")]) == 0
    plain = ParticleStar(tmp_path / "plain" / "clustered_particles.star").particles["rlnClassNumber"].to_numpy()
    partner = np.flatnonzero(classes == target)[0]
    assert (joined[moved] == joined[partner]).all() and (plain[moved] != plain[partner]).all()
    rest = np.setdiff1d(np.arange(len(classes)), moved)
    assert clustering_accuracy(plain[rest], joined[rest]) == 1.0
    broken = star.with_columns({"pvaeLowResClass": np.where(np.arange(len(low_res)) == 2, np.nan, low_res)})
    broken_path = broken.write(tmp_path / "broken.star")
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(broken_path), "--k", "2", "--no-images", "--out", str(tmp_path / "broken")]) == 2
    assert "pvaeLowResClass column holds values that are not class numbers" in one_line_error(capsys)


def test_analyze_groups_the_refinement_classes_when_they_are_there(tmp_path, capsys):
    path = _refined_pair(tmp_path)
    truth = ParticleStar(path).particles["pvaeTruth"].to_numpy()
    assert cli.main(["-q", "analyze", str(path), "--k", "2", "--no-images", "--out", str(tmp_path / "auto")]) == 0
    grouped = ParticleStar(tmp_path / "auto" / "clustered_particles.star").particles["rlnClassNumber"].to_numpy()
    assert clustering_accuracy(truth, grouped) == 1.0
    assert json.loads((tmp_path / "auto" / "analysis.json").read_text())["classes_from"] == "refinement (4 classes)"
    assert cli.main(["-q", "analyze", str(path), "--k", "2", "--classes-from", "latents", "--no-images",
                     "--out", str(tmp_path / "latents")]) == 0
    latent = ParticleStar(tmp_path / "latents" / "clustered_particles.star").particles["rlnClassNumber"].to_numpy()
    assert clustering_accuracy(truth, latent) < 0.85  # the particles' own latents overlap
    # k as large as the number of refinement classes: auto clusters the latents; refinement must be asked for with k <= 4
    assert cli.main(["-q", "analyze", str(path), "--k", "4", "--no-images", "--out", str(tmp_path / "k4")]) == 0
    assert json.loads((tmp_path / "k4" / "analysis.json").read_text())["classes_from"] == "latents"
    # a method chosen for the latents (gmm, ward) means the latents are clustered
    assert cli.main(["-q", "analyze", str(path), "--k", "2", "--method", "gmm", "--no-images", "--out", str(tmp_path / "gmm")]) == 0
    record = json.loads((tmp_path / "gmm" / "analysis.json").read_text())
    assert record["classes_from"] == "latents" and record["method"] == "gmm"
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(path), "--k", "5", "--classes-from", "refinement", "--no-images",
                     "--out", str(tmp_path / "k5")]) == 2
    assert "has 4 refinement classes" in one_line_error(capsys)
