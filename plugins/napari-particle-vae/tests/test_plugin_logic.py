"""Qt-free parts of the plugin: opening runs, the lazy stack, alignment, the generator, export, plot geometry.

These need only the core package and run without napari or Qt.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from napari_particle_vae import export, scatter
from napari_particle_vae.run_data import LazyParticleStack, open_particle_run, resolve_inputs, star_columns
from napari_particle_vae.views import (
    ModelHandle,
    SelectionSample,
    align,
    cell_origins,
    interpolate_latents,
    montage,
    montage_columns,
    selection_views,
)

from particle_vae.conventions import apply_relion_pose
from particle_vae.errors import InputFileError, OutputFileError, ParticleVAEError
from particle_vae.io.mrc import StackWriter
from particle_vae.io.star import ParticleStar, image_name, make_particle_star

# ----------------------------------------------------------------------------- opening


def test_resolve_star_run_dir_and_project_folder(sample_run: Path):
    clustered = sample_run / "analysis" / "clustered_particles.star"
    inferred = sample_run / "particles_vae.star"
    run_dir = sample_run / "run"
    # the STAR written by analyze: the run is found two levels up (PROJECT/run beside PROJECT/analysis)
    assert resolve_inputs(clustered) == (clustered, run_dir)
    assert resolve_inputs(inferred) == (inferred, run_dir)
    # the project folder prefers analyze's output; the run directory finds the STAR beside it
    assert resolve_inputs(sample_run) == (clustered, run_dir)
    assert resolve_inputs(run_dir) == (clustered, run_dir)


def test_stacks_named_from_the_project_folder_open_from_anywhere(sample_run: Path):
    # the sample folder is its own project folder; napari (the tests) runs elsewhere
    clustered = sample_run / "analysis" / "clustered_particles.star"
    assert set(ParticleStar(clustered).particles["rlnImageName"].str.split("@").str[1]) == {"data/particles.mrcs"}
    assert Path.cwd().resolve() != sample_run.resolve()
    run = open_particle_run(clustered)
    # found by the core reader (the folders above the STAR's) or by the plugin's project search: either way it opens
    assert run.image_error is None and run.datadir in (None, sample_run) and run.read_images([0]).shape[0] == 1


def test_star_without_latents_is_a_one_line_error(sample_run: Path):
    plain = sample_run / "data" / "particles.star"
    assert "rlnImageName" in star_columns(plain)
    with pytest.raises(InputFileError) as info:
        open_particle_run(plain)
    message = str(info.value)
    assert "\n" not in message
    assert "particles.star" in message and "pvaeZ" in message and "particle-vae infer" in message


#: STAR files the plugin cannot show: (file name, content, words the one-line reason must hold)
BAD_STARS = [
    ("empty.star", b"", "is empty"),
    ("comments.star", b"# only a comment\n\n", "is empty"),
    ("classes.star", b"data_model_classes\n\nloop_\n_rlnReferenceImage #1\n_rlnClassDistribution #2\n1@c.mrcs 0.5\n",
     "is not a particle STAR"),
    ("header_only.star", b"data_particles\n\nloop_\n_rlnImageName #1\n_pvaeZ1 #2\n_pvaeZ2 #3\n", "lists no particles"),
    ("no_latents.star", b"data_particles\n\nloop_\n_rlnImageName #1\n_rlnAnglePsi #2\n1@p.mrcs 10.0\n", "no pvaeZ"),
    ("compressed.star", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip"),
]


@pytest.mark.parametrize(("name", "content", "reason"), BAD_STARS, ids=[case[0] for case in BAD_STARS])
def test_stars_that_cannot_be_shown_say_why_in_one_line(tmp_path: Path, name: str, content: bytes, reason: str):
    """Empty, non-particle, row-less, latent-less or compressed STARs: one line naming the file, the reason and the fix."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputFileError) as info:
        open_particle_run(path)
    message = str(info.value)
    assert "\n" not in message and name in message and reason in message, message
    assert "particle-vae infer" in message or "decompress" in message, message  # what to do
    assert path.read_bytes() == content


def test_folder_without_a_run_is_an_error(tmp_path: Path):
    with pytest.raises(InputFileError, match="no particle-vae run"):
        resolve_inputs(tmp_path)


def test_missing_stacks_keep_the_table(sample_run: Path, tmp_path: Path):
    moved = tmp_path / "elsewhere" / "particles_vae.star"
    moved.parent.mkdir()
    moved.write_text((sample_run / "particles_vae.star").read_text())
    run = open_particle_run(moved)
    assert len(run) == 120 and run.n_latents == 2
    assert run.image_error is not None and "not found" in run.image_error and "\n" not in run.image_error
    assert not run.has_images


def test_table_has_every_column(sample_run: Path):
    star_path = sample_run / "analysis" / "clustered_particles.star"
    run = open_particle_run(star_path)
    assert list(run.table.columns) == star_columns(star_path)
    assert run.latent_columns == ["pvaeZ1", "pvaeZ2"]
    assert run.cluster_column() == "rlnClassNumber"
    assert run.numeric_columns()[:2] == ["pvaeZ1", "pvaeZ2"]


# ----------------------------------------------------------------------------- lazy stack


def test_lazy_stack_reads_only_what_is_indexed(sample_run: Path):
    run = open_particle_run(sample_run / "particles_vae.star")
    stack = run.image_stack()
    assert isinstance(stack, LazyParticleStack)
    assert stack.shape == (120, 32, 32) and stack.dtype == np.float32 and stack.ndim == 3
    one = stack[7]
    assert one.shape == (32, 32) and stack.images_read == 1
    assert np.allclose(stack[-1], stack[119])
    assert stack[10:14].shape == (4, 32, 32)
    assert stack[[3, 1]].shape == (2, 32, 32)
    assert stack[5, 2:6, :].shape == (4, 32)
    assert stack[..., 0].shape == (120, 32)  # the only call here that reads everything
    with pytest.raises(TypeError, match="lazily"):
        np.asarray(stack)
    # the same pixels as reading through the dataset directly
    assert np.allclose(stack[7], run.read_images([7])[0])


# ----------------------------------------------------------------------------- alignment through the conventions


def _template(box: int) -> np.ndarray:
    """An asymmetric test object (an L of two blobs), centred."""
    axis = np.arange(box) - box // 2
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return (np.exp(-((x - 5) ** 2 + y ** 2) / 6.0) + 0.6 * np.exp(-(x ** 2 + (y - 7) ** 2) / 4.0)).astype(np.float32)


def test_aligned_particles_undo_the_star_pose(tmp_path: Path):
    """Particles made with RELION's forward model from one template come back upright and centred."""
    box, apix, n = 32, 2.0, 12
    rng = np.random.default_rng(3)
    psi = rng.uniform(-180, 180, n)
    origin = rng.uniform(-3, 3, (n, 2)) * apix
    template = _template(box)
    particles = apply_relion_pose(torch.from_numpy(np.repeat(template[None], n, 0)).double(), psi, origin, apix).numpy()
    with StackWriter(tmp_path / "p.mrcs", box, apix) as writer:
        writer.write(particles)
    star = make_particle_star([image_name(i, "p.mrcs") for i in range(n)], apix, box, columns={
        "rlnAnglePsi": psi, "rlnOriginXAngst": origin[:, 0], "rlnOriginYAngst": origin[:, 1],
        "pvaeZ1": rng.normal(size=n), "pvaeZ2": rng.normal(size=n)})
    star.write(tmp_path / "poses.star")
    run = open_particle_run(tmp_path / "poses.star")
    views = selection_views(run, np.ones(n, dtype=bool))
    assert views.raw.shape == views.aligned.shape == (n, box, box) and views.average.shape == (box, box)
    assert views.aligned_with_pose

    def correlation(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    assert correlation(views.average, template) > 0.97
    assert min(correlation(image, template) for image in views.aligned) > 0.9
    # the raw particles are rotated and shifted: their plain mean is not the template
    assert correlation(views.raw.mean(axis=0), template) < 0.8


def test_selection_views_limits_and_errors(sample_run: Path):
    run = open_particle_run(sample_run / "particles_vae.star")
    mask = np.zeros(len(run), dtype=bool)
    mask[::3] = True
    progress = []
    views = selection_views(run, mask, max_shown=10, max_averaged=25, progress=lambda d, t: progress.append((d, t)))
    assert views.raw.shape == (10, 32, 32) and np.array_equal(views.rows, np.flatnonzero(mask)[:10])
    assert views.averaged_rows.size == 25 and np.isin(views.averaged_rows, np.flatnonzero(mask)).all()
    assert progress[-1] == (35, 35)
    with pytest.raises(ParticleVAEError, match="nothing is selected"):
        selection_views(run, np.zeros(len(run), dtype=bool))


def test_selection_sample_is_seeded_paged_and_capped(tmp_path: Path, synthetic_star):
    """A large selection is read a page at a time in a fixed random order; the montages stop at their cap, the average does not."""
    run = open_particle_run(synthetic_star(tmp_path, 3000, box=16))
    selected = run.table["rlnClassNumber"].to_numpy() != 1
    rows = np.flatnonzero(selected)
    sample = SelectionSample(run, selected, seed=0, max_cells=100)
    assert sample.n_selected == rows.size and sample.columns == 10 and sample.n_read == 0

    first = sample.load(40)
    expected = np.sort(np.random.default_rng(0).permutation(rows)[:40])
    assert np.array_equal(first.rows, expected)  # the seeded random order, each page sorted by STAR row
    assert not np.array_equal(first.rows, rows[:40])  # a random sample, not the first rows
    assert np.array_equal(sample.rows, expected) and sample.raw.shape == (40, 16, 16)
    assert np.allclose(sample.raw, run.read_images(expected))
    assert np.allclose(sample.aligned, align(run, run.read_images(expected), expected), atol=1e-5)
    assert np.allclose(sample.average, sample.aligned.mean(axis=0), atol=1e-5)

    sample.load(40)  # cells keep their place: the second page goes after the first
    assert sample.n_shown == 80 and np.array_equal(sample.rows[:40], expected)
    assert np.array_equal(np.sort(sample.rows), np.sort(np.random.default_rng(0).permutation(rows)[:80]))
    sample.load(500)  # past the cap: the montages stop at 100 cells, the average takes every particle read
    assert sample.n_shown == 100 and sample.montage_full and sample.n_read == 580
    assert np.array_equal(sample.averaged_rows, np.sort(np.random.default_rng(0).permutation(rows)[:580]))
    every = sample.averaged_rows
    assert np.allclose(sample.average, align(run, run.read_images(every), every).mean(axis=0), atol=1e-5)
    sample.load(10 ** 6)
    assert sample.remaining == 0 and sample.n_read == rows.size and sample.take(5).size == 0
    # the same selection and seed give the same pages; another seed another sample
    again = SelectionSample(run, selected, seed=0)
    assert np.array_equal(again.take(40), expected)
    assert not np.array_equal(SelectionSample(run, selected, seed=1).take(40), expected)
    with pytest.raises(ParticleVAEError, match="nothing is selected"):
        SelectionSample(run, np.zeros(len(run), dtype=bool))


def test_montage_lays_cells_out_row_by_row():
    images = np.arange(5 * 3 * 3, dtype=np.float32).reshape(5, 3, 3)
    sheet = montage(images, columns=2, gap=1, fill=-1.0)
    assert sheet.shape == (3 * 4 - 1, 2 * 4 - 1)
    origins = cell_origins(5, 2, 3, gap=1)
    assert origins.tolist() == [[0, 0], [0, 4], [4, 0], [4, 4], [8, 0]]
    for image, (top, left) in zip(images, origins):
        assert np.array_equal(sheet[top:top + 3, left:left + 3], image)
    assert (sheet[:, 3] == -1).all() and (sheet[8:, 4:] == -1).all()  # gaps and the empty last cell
    assert [montage_columns(n) for n in (1, 3, 10, 64, 200, 5000)] == [1, 3, 4, 8, 15, 16]


# ----------------------------------------------------------------------------- generator


def test_model_handle_decodes_at_pose_zero(sample_run: Path, monkeypatch):
    model = ModelHandle(sample_run / "run", device="cpu")
    assert model.zdim == 2 and model.box == 32
    z = np.array([[0.0, 0.0], [1.5, -1.0]])
    images = model.decode(z)
    assert images.shape == (2, 32, 32) and images.dtype == np.float32 and np.isfinite(images).all()
    assert not np.allclose(images[0], images[1])
    from particle_vae.analysis.metrics import image_centre_of_mass

    for image in images:  # centred like the aligned particles
        assert np.abs(image_centre_of_mass(image)).max() < 0.5
    strip, points = model.traverse(z[0], z[1], steps=5)
    assert strip.shape == (5, 32, 32) and points.shape == (5, 2)
    assert np.allclose(strip[0], images[0], atol=1e-5) and np.allclose(strip[-1], images[1], atol=1e-5)
    with pytest.raises(ParticleVAEError, match="latent dimensions"):
        model.decode(np.zeros(3))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal, also on a machine with a GPU
    with pytest.raises(ParticleVAEError, match="not available"):
        ModelHandle(sample_run / "run", device="cuda")


def test_interpolate_latents():
    points = interpolate_latents([0, 0], [1, 2], 3)
    assert np.allclose(points, [[0, 0], [0.5, 1], [1, 2]])
    with pytest.raises(ValueError):
        interpolate_latents([0], [1, 2], 3)


# ----------------------------------------------------------------------------- export


def test_write_subset_keeps_rows_columns_and_optics(sample_run: Path, tmp_path: Path):
    star_path = sample_run / "analysis" / "clustered_particles.star"
    run = open_particle_run(star_path)
    rows = np.array([2, 5, 7, 50, 119])
    out = export.write_subset(run, rows, tmp_path / "sub" / "subset.star")
    back = ParticleStar(out)
    original = ParticleStar(star_path)
    assert list(back.particles.columns) == list(original.particles.columns)
    assert back.optics is not None and back.optics.equals(original.optics)
    kept = original.particles.reset_index(drop=True).iloc[rows].reset_index(drop=True)
    for column in kept.columns:
        if column == "rlnImageName":  # rewritten so the stacks resolve from the project folder (the current one)
            continue
        assert np.array_equal(back.particles[column].to_numpy(), kept[column].to_numpy()), column
    # the images are still found from the new folder, and they are the same particles
    reopened = open_particle_run(out)
    assert reopened.image_error is None
    assert np.allclose(reopened.read_images([1]), run.read_images([5]))
    # for RELION run in the sample's folder: its stack named relative to that folder
    for_project = export.write_subset(run, rows, tmp_path / "for_project.star", project_dir=sample_run)
    stacks = {name.split("@", 1)[1] for name in ParticleStar(for_project).particles["rlnImageName"]}
    assert all(not stack.startswith(("/", "..")) and (sample_run / stack).is_file() for stack in stacks), stacks
    with pytest.raises(OutputFileError):
        export.write_subset(run, rows, out)  # exists
    with pytest.raises(OutputFileError):
        export.write_subset(run, rows, star_path, overwrite=True)  # the input
    with pytest.raises(ParticleVAEError, match="nothing is selected"):
        export.write_subset(run, np.zeros(len(run), dtype=bool), tmp_path / "empty.star")


def test_add_cluster(sample_run: Path, tmp_path: Path):
    run = open_particle_run(sample_run / "analysis" / "clustered_particles.star")
    before = run.table["rlnClassNumber"].to_numpy().copy()
    mask = np.zeros(len(run), dtype=bool)
    mask[[0, 3, 4]] = True
    new_id = export.add_cluster(run, mask)
    assert new_id == before.max() + 1
    assert (run.table["rlnClassNumber"].to_numpy()[mask] == new_id).all()
    assert np.array_equal(run.table["rlnClassNumber"].to_numpy()[~mask], before[~mask])
    out = export.write_all(run, tmp_path / "with_cluster.star")
    assert np.array_equal(ParticleStar(out).particles["rlnClassNumber"].to_numpy(), run.table["rlnClassNumber"].to_numpy())
    # a table without a cluster column: everything 1, the selection 2
    plain = open_particle_run(sample_run / "particles_vae.star")
    assert "rlnClassNumber" not in plain.table.columns
    assert export.add_cluster(plain, mask) == 2
    assert sorted(np.unique(plain.table["rlnClassNumber"])) == [1, 2]


# ----------------------------------------------------------------------------- plot geometry and speed


def _blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    centres = np.array([[-2, -2], [2, -1], [0, 2.5], [3, 3]])
    return centres[labels] + rng.normal(scale=0.6, size=(n, 2)), labels + 1


def test_selection_geometry():
    coords = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.5, 1.5]])
    assert scatter.points_in_rectangle(coords, (1.5, -0.5), (-1, 1.2)).tolist() == [True, True, False, False]
    triangle = [(-1, -0.5), (3, -0.5), (3, 3.5)]  # below the line y = x + 0.5: (0, 0), (1, 1), (2, 2) inside, (0.5, 1.5) not
    assert scatter.points_in_polygon(coords, triangle).tolist() == [True, True, True, False]
    square = [(-0.5, -0.5), (1.2, -0.5), (1.2, 1.2), (-0.5, 1.2)]
    assert scatter.points_in_polygon(coords, square).tolist() == [True, True, False, False]
    assert scatter.nearest_point(coords, (1.98, 2.01)) == 2
    assert scatter.nearest_point(coords, (1.9, 2.05), max_distance=0.1) == 2
    assert scatter.nearest_point(coords, (10, 10)) is None
    old, new = np.array([True, True, False]), np.array([False, True, True])
    assert scatter.combine(old, new, "add").tolist() == [True, True, True]
    assert scatter.combine(old, new, "remove").tolist() == [True, False, False]
    assert scatter.combine(old, new, "replace").tolist() == [False, True, True]


def test_latent_at_maps_plot_points_back():
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(500, 4)) @ np.diag([3, 2, 0.1, 0.1])
    pca = scatter.embed_pca(latents)
    point = pca.coords[17]
    z = scatter.latent_at(pca, point, latents)
    assert np.allclose(pca.pca.transform(z[None])[0], point)
    table = pd.DataFrame(latents, columns=[f"pvaeZ{i + 1}" for i in range(4)])
    columns = scatter.embed_columns(table, "pvaeZ3", "pvaeZ1", list(table.columns))
    z = scatter.latent_at(columns, (0.05, -1.0), latents)
    assert z[2] == 0.05 and z[0] == -1.0 and np.isclose(z[1], np.median(latents[:, 1]))


def test_200k_points_plot_and_select_quickly():
    """Building the plot (density + subset) and a lasso or rectangle selection on 200,000 points stay interactive."""
    from matplotlib.figure import Figure

    coords, labels = _blobs(200_000)
    table = pd.DataFrame({"pvaeZ1": coords[:, 0], "pvaeZ2": coords[:, 1], "rlnClassNumber": labels})
    started = time.perf_counter()
    embedding = scatter.embed_columns(table, "pvaeZ1", "pvaeZ2", ["pvaeZ1", "pvaeZ2"])
    colours = scatter.colouring(table, "rlnClassNumber", embedding.rows)
    figure = Figure(figsize=(5, 4))
    plot = scatter.ScatterPlot(figure)
    plot.draw(embedding, colours, np.zeros(len(table), dtype=bool))
    figure.canvas.draw()
    build = time.perf_counter() - started
    assert plot.density and len(plot.drawn) == scatter.MAX_POINTS_DRAWN
    assert colours.categorical and colours.categories.tolist() == [1, 2, 3, 4]

    lasso = [(-4, -4), (0, -4), (0, 0), (-4, 0)]
    started = time.perf_counter()
    inside = scatter.points_in_polygon(embedding.coords, lasso)
    rectangle = scatter.points_in_rectangle(embedding.coords, (-4, 0), (-4, 0))
    selected = np.zeros(len(table), dtype=bool)
    selected[embedding.rows[inside]] = True
    plot.set_selection(selected)
    figure.canvas.draw()
    select = time.perf_counter() - started
    assert np.array_equal(inside, rectangle)  # the square lasso and the rectangle agree
    expected = (coords[:, 0] > -4) & (coords[:, 0] < 0) & (coords[:, 1] > -4) & (coords[:, 1] < 0)
    assert np.array_equal(selected, expected)
    assert 40_000 < selected.sum() < 60_000
    assert build < 5.0, f"building the plot of 200k points took {build:.2f} s"
    assert select < 3.0, f"selecting among 200k points took {select:.2f} s"
