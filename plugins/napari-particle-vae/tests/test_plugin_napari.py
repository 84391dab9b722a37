"""The plugin in a real napari viewer (headless under Xvfb): reader, widget, views, generator, export, sample data, 200k points."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from napari_particle_vae.views import cell_origins

pytestmark = pytest.mark.gui

PLUGIN = "napari-particle-vae"
WIDGET = "Latent space explorer"
WAIT_MS = 60_000


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer(show=True)


def _open(viewer, path) -> list:
    return viewer.open(str(path), plugin=PLUGIN)


def _widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    return widget


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: widget.busy == 0, timeout=WAIT_MS)


def _errors_since(count: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[count:]]


def _record_count() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def test_reader_opens_particles_lazily_with_the_table_as_features(viewer, sample_run: Path):
    from napari_particle_vae.run_data import LazyParticleStack, star_columns

    star_path = sample_run / "analysis" / "clustered_particles.star"
    layers = _open(viewer, star_path)
    assert [layer.name for layer in layers] == ["analysis/clustered_particles particles", "analysis/clustered_particles table"]
    particles, table = layers
    assert isinstance(particles.data, LazyParticleStack)
    assert particles.data.shape == (120, 32, 32)
    # only the contrast sample and the slices on screen were read, not the stack
    assert particles.data.images_read < 40
    assert table.data.shape == (120, 3)
    assert list(table.features.columns) == star_columns(star_path)
    assert np.allclose(table.features["pvaeZ1"].to_numpy(), particles.metadata["particle_vae_run"].latents()[:, 0])
    # the run folder opens the same STAR
    again = _open(viewer, sample_run)
    assert again[0].data.shape == (120, 32, 32) and len(again) == 2


def test_bad_inputs_give_one_line_notifications(viewer, sample_run: Path, tmp_path: Path):
    count = _record_count()
    layers = _open(viewer, sample_run / "data" / "particles.star")  # a particle STAR without latents
    assert len(viewer.layers) == 0 and not [layer for layer in layers if layer is not None]
    messages = _errors_since(count)
    assert any("particles.star" in m and "pvaeZ" in m and "particle-vae infer" in m and "\n" not in m for m in messages), messages

    moved = tmp_path / "moved" / "particles_vae.star"  # the stacks are not beside it any more
    moved.parent.mkdir()
    moved.write_text((sample_run / "particles_vae.star").read_text())
    count = _record_count()
    layers = _open(viewer, moved)
    assert [layer.name for layer in layers] == ["moved/particles_vae table"]  # the table opens, the images do not
    messages = _errors_since(count)
    assert any("particles.mrcs" in m and "not found" in m and "\n" not in m for m in messages), messages
    widget = _widget(viewer)
    widget.select_rows([0, 1, 2])
    count = _record_count()
    assert widget.show_selection() is None
    assert any("not found" in m for m in _errors_since(count))


@pytest.mark.parametrize("plugin", [PLUGIN, None], ids=["plugin chosen", "napari chooses"])
def test_stars_that_cannot_be_shown_get_the_plugins_one_line_reason(viewer, tmp_path: Path, plugin):
    """Opened through napari (with or without naming the plugin), an empty or non-particle STAR gets the plugin's
    reason in one notification naming the file and the fix, not napari's generic "refused the file"."""
    from napari_particle_vae.reader import get_reader

    cases = [
        ("empty.star", b"", "is empty"),
        ("classes.star", b"data_model_classes\n\nloop_\n_rlnReferenceImage #1\n1@classes.mrcs\n", "is not a particle STAR"),
        ("header_only.star", b"data_particles\n\nloop_\n_rlnImageName #1\n_pvaeZ1 #2\n", "lists no particles"),
    ]
    for name, content, reason in cases:
        path = tmp_path / name
        path.write_bytes(content)
        assert callable(get_reader(str(path)))  # every STAR is the plugin's to explain
        count = _record_count()
        layers = viewer.open(str(path), plugin=plugin)  # no exception
        assert [layer for layer in layers if layer is not None] == [] and len(viewer.layers) == 0
        messages = _errors_since(count)
        assert len(messages) == 1, messages
        message = messages[0]
        assert name in message and reason in message and "particle-vae infer" in message and "\n" not in message, message
        assert "refused" not in message


def test_select_view_reconstruct_traverse_and_export(viewer, qtbot, sample_run: Path, tmp_path: Path):
    from particle_vae.io.star import ParticleStar

    star_path = sample_run / "analysis" / "clustered_particles.star"
    _open(viewer, star_path)
    widget = _widget(viewer)
    assert widget.run is not None and widget.embedding is not None
    assert widget.embedding.labels == ("pvaeZ1", "pvaeZ2") and len(widget.embedding) == 120
    assert widget.colours.column == "rlnClassNumber" and widget.colours.categorical

    # a rectangle over the left half of the plot, chosen programmatically
    coords = widget.embedding.coords
    middle = float(np.median(coords[:, 0]))
    mask = widget.select_rectangle((coords[:, 0].min() - 1, middle), (coords[:, 1].min() - 1, coords[:, 1].max() + 1))
    expected = coords[:, 0] <= middle
    assert np.array_equal(mask, expected) and 50 <= mask.sum() <= 70
    assert "selected" in widget.selection_label.text()
    selected = int(mask.sum())

    widget.show_selection()  # fewer than a page: every selected particle, in montages
    _wait_idle(qtbot, widget)
    base = "analysis/clustered_particles"
    raw_layer = viewer.layers[f"{base} selection raw particles"]
    aligned_layer = viewer.layers[f"{base} selection aligned particles"]
    assert raw_layer.metadata["particle_vae_cells"].shape == (selected, 32, 32)
    assert aligned_layer.metadata["particle_vae_cells"].shape == (selected, 32, 32)
    assert np.array_equal(raw_layer.metadata["particle_vae_rows"], np.flatnonzero(mask))
    columns = widget.sample.columns
    assert raw_layer.data.shape == (-(-selected // columns) * 34 - 2, columns * 34 - 2)
    assert viewer.layers[f"{base} selection average (aligned)"].data.shape == (32, 32)
    # aligned = raw with the STAR pose undone: different pixels, same particles
    raw = raw_layer.metadata["particle_vae_cells"]
    aligned = aligned_layer.metadata["particle_vae_cells"]
    assert not np.allclose(raw, aligned)
    assert np.allclose(viewer.layers[f"{base} selection average (aligned)"].data, aligned.mean(axis=0), atol=1e-4)

    widget.reconstruct()
    _wait_idle(qtbot, widget)
    reconstruction = viewer.layers[f"{base} reconstruction (pose zero)"].data
    assert reconstruction.shape == (32, 32) and np.isfinite(reconstruction).all()

    # a chosen point: the pick tool's click, then a traversal between two points
    widget.tool_combo.setCurrentText("pick")
    row = widget.pick_point(*coords[5])
    assert row == 5 and viewer.dims.point[0] == 5
    widget.point_combo.setCurrentIndex(1)
    start = widget.set_traversal_end(0)
    assert np.allclose(start, widget.run.latents()[5])  # two latent axes: the point is the latent itself
    widget.pick_point(*coords[9])
    widget.set_traversal_end(1)
    widget.traverse(steps=6)
    _wait_idle(qtbot, widget)
    traversal = viewer.layers[f"{base} traversal (pose zero)"]
    assert traversal.metadata["particle_vae_cells"].shape == (6, 32, 32)
    assert traversal.data.shape == (32, 6 * 34 - 2)  # one row of six cells

    # export the selection and read it back: the right rows, every column, the optics block
    out = widget.export_selection(tmp_path / "selection.star")
    assert out is not None
    back, original = ParticleStar(out), ParticleStar(star_path)
    assert len(back) == selected
    assert list(back.particles.columns) == list(original.particles.columns)
    assert back.optics.equals(original.optics)
    rows = np.flatnonzero(mask)
    for column in ("pvaeZ1", "pvaeZ2", "rlnAnglePsi", "rlnClassNumber", "pvaeTrueClass", "rlnDefocusU"):
        assert np.array_equal(back.particles[column].to_numpy(), original.particles[column].to_numpy()[rows]), column

    # the selection as a new cluster, written with the whole table
    new_id = widget.add_cluster()
    assert new_id == int(original.particles["rlnClassNumber"].max()) + 1
    table_layer = viewer.layers[f"{base} table"]
    assert (table_layer.features["rlnClassNumber"].to_numpy()[mask] == new_id).all()
    assert new_id in widget.colours.categories
    written = widget.export_table(tmp_path / "clusters.star")
    classes = ParticleStar(written).particles["rlnClassNumber"].to_numpy()
    assert np.array_equal(classes == new_id, mask)


def _canvas_shows(viewer, layer) -> float:
    """Standard deviation of the canvas with only ``layer`` visible, zoomed onto it (0 for a black canvas)."""
    from qtpy.QtWidgets import QApplication

    shown = {other.name: other.visible for other in viewer.layers}
    for other in viewer.layers:
        other.visible = other is layer
    height, width = (np.asarray(layer.data.shape[-2:]) * np.asarray(layer.scale[-2:]))
    viewer.camera.center = (float(layer.translate[-2] + height / 2), float(layer.translate[-1] + width / 2))
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9 keeps the canvas size there
    canvas_height, canvas_width = canvas.size if canvas is not None else viewer._canvas_size
    viewer.camera.zoom = 0.9 * min(canvas_height / height, canvas_width / width)
    QApplication.processEvents()
    picture = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(np.float64)
    for other in viewer.layers:
        other.visible = shown[other.name]
    return float(picture.std())


def test_views_show_at_every_slider_position_and_are_labelled(viewer, qtbot, sample_run: Path):
    """Raw, aligned and averaged particles, reconstruction and traversal are 2D views: none goes black wherever the
    particle slider stands (the viewer opens at particle 60 of 120, past a 16-particle selection), and the canvas says
    what each view and each montage cell shows."""
    star_path = sample_run / "analysis" / "clustered_particles.star"
    _open(viewer, star_path)
    widget = _widget(viewer)
    run = widget.run
    rows = np.arange(0, 120, 3)  # 40 particles, shown 16 at first
    widget.select_rows(rows)
    widget.show_selection(count=16)
    _wait_idle(qtbot, widget)
    widget.reconstruct()
    _wait_idle(qtbot, widget)
    widget.traverse(steps=5, z_start=run.latents()[0], z_end=run.latents()[1])
    _wait_idle(qtbot, widget)

    roles = ("selection_raw", "selection_aligned", "selection_average", "reconstruction", "traversal")
    layers = {role: widget.view_layer(role) for role in roles}
    assert all(layer is not None and layer.ndim == 2 for layer in layers.values()), layers
    names = {role: layer.name for role, layer in layers.items()}
    assert "raw" in names["selection_raw"] and "aligned" in names["selection_aligned"]
    assert "average" in names["selection_average"] and "pose zero" in names["reconstruction"]
    assert viewer.dims.axis_labels[0] == "particle (STAR row)"
    for position in (0, 60, 119):  # 60 is where napari opened the 120-particle stack
        viewer.dims.set_point(0, position)
        for role, layer in layers.items():
            assert _canvas_shows(viewer, layer) > 5, f"{names[role]} is blank with the slider at particle {position}"

    # the montage cells are the particles read for their rows, in cell order
    raw = layers["selection_raw"]
    shown_rows = raw.metadata["particle_vae_rows"]
    assert shown_rows.size == 16 and np.isin(shown_rows, rows).all()
    columns = widget.sample.columns
    for index, (top, left) in enumerate(cell_origins(16, columns, 32)):
        assert np.allclose(raw.data[top:top + 32, left:left + 32], run.read_images([shown_rows[index]])[0])

    # titles above the views, one label per montage cell: STAR row and cluster, inside its cell
    base = widget._base_name()
    titles = list(viewer.layers[f"{base} view titles"].features["label"])
    assert any(t.startswith("raw: 16 of 40 selected (random sample, seed 0)") for t in titles), titles
    assert any(t.startswith("aligned (STAR pose undone)") for t in titles), titles
    assert any(t.startswith("average of 16 aligned") for t in titles), titles
    assert any(t.startswith("generator at z = (") for t in titles) and any(t.startswith("traversal: 5 steps") for t in titles)
    assert any(t.startswith("all 120 particles (slider: particle (STAR row))") for t in titles), titles
    cells = viewer.layers[f"{base} cell labels"]
    order = [layer.name for layer in viewer.layers]
    assert order[-2:] == [f"{base} view titles", f"{base} cell labels"]  # text over every view
    labels = list(cells.features["label"])
    classes = run.table["rlnClassNumber"].to_numpy()
    expected = [f"#{row} c{classes[row]}" for row in shown_rows]
    assert labels == expected + expected + [f"{i}/5" for i in range(1, 6)]
    apix = run.pixel_size
    for layer, points in ((raw, cells.data[:16]), (layers["selection_aligned"], cells.data[16:32]),
                          (layers["traversal"], cells.data[32:])):
        low = np.asarray(layer.translate) - 0.5 * apix
        high = low + np.asarray(layer.data.shape) * np.asarray(layer.scale)
        assert ((points >= low) & (points < high)).all(), layer.name
    # the views do not overlap one another or the particle stack
    boxes = [(np.asarray(layer.translate), np.asarray(layer.translate) + np.asarray(layer.data.shape) * np.asarray(layer.scale))
             for layer in [*layers.values(), viewer.layers[f"{base} particles"]]]
    for i, (low_a, high_a) in enumerate(boxes):
        for low_b, high_b in boxes[i + 1:]:
            assert (high_a[-2:] <= low_b[-2:]).any() or (high_b[-2:] <= low_a[-2:]).any()


def test_large_selection_shows_a_seeded_sample_and_more_on_demand(viewer, qtbot, tmp_path: Path, synthetic_star):
    """A selection larger than a page shows a random sample (seed 0) at once; 'show more' appends the next particles of
    the same random order, the montages stop at their cap and the average keeps growing."""
    from napari_particle_vae.views import MAX_MONTAGE_CELLS, PAGE_SIZE

    star_path = synthetic_star(tmp_path, 3000, box=16)
    _open(viewer, star_path)
    widget = _widget(viewer)
    widget.select_rows(np.arange(3000))
    assert not widget.more_button.isEnabled()
    widget.show_selection()
    _wait_idle(qtbot, widget)
    order = np.random.default_rng(0).permutation(3000)
    raw = widget.view_layer("selection_raw")
    assert np.array_equal(raw.metadata["particle_vae_rows"], np.sort(order[:PAGE_SIZE]))
    assert raw.metadata["particle_vae_cells"].shape == (PAGE_SIZE, 16, 16)
    assert widget.sample.columns == 16 and raw.data.shape == (PAGE_SIZE // 16 * 18 - 2, 16 * 18 - 2)
    first_rows = raw.data.copy()
    assert widget.more_button.isEnabled()
    assert widget.status_label.text().startswith(f"showing {PAGE_SIZE} of 3,000 selected (random sample, seed 0)")

    widget.show_more()
    _wait_idle(qtbot, widget)
    assert raw.metadata["particle_vae_cells"].shape == (2 * PAGE_SIZE, 16, 16)
    assert np.array_equal(np.sort(raw.metadata["particle_vae_rows"]), np.sort(order[:2 * PAGE_SIZE]))
    assert np.array_equal(raw.data[:first_rows.shape[0]], first_rows)  # the first cells stay where they were
    assert widget.sample.n_read == 2 * PAGE_SIZE
    assert len(viewer.layers[f"{widget._base_name()} cell labels"].data) == 2 * 2 * PAGE_SIZE

    widget.page_spin.setValue(2000)  # past the montages' cap: they stop there, the average takes every particle read
    widget.show_more()
    _wait_idle(qtbot, widget)
    assert raw.metadata["particle_vae_cells"].shape[0] == MAX_MONTAGE_CELLS
    assert widget.sample.n_read == 2 * PAGE_SIZE + 2000
    assert "the montages are full" in widget.status_label.text()
    average = widget.view_layer("selection_average").data
    rows = widget.sample.averaged_rows
    from napari_particle_vae.views import align

    expected = align(widget.run, widget.run.read_images(rows), rows).mean(axis=0)
    assert np.allclose(average, expected, atol=1e-4)
    assert "average of 2,128 aligned" in " ".join(viewer.layers[f"{widget._base_name()} view titles"].features["label"])

    widget.select_rows([1, 2, 3], mode="replace")  # another selection: 'show more' would mix the two
    assert not widget.more_button.isEnabled()
    count = _record_count()
    assert widget.show_more() is None
    assert any("selection changed" in m for m in _errors_since(count))


def test_views_of_a_second_run_keep_its_selection(viewer, qtbot, sample_run: Path):
    """With several runs open, showing views (which adds layers) keeps the run shown and its selection; a run opened
    twice (napari names its layers '... [1]') gets its own views beside its own stack."""
    _open(viewer, sample_run / "analysis" / "clustered_particles.star")
    _open(viewer, sample_run / "particles_vae.star")
    widget = _widget(viewer)
    second = widget.run
    assert second.star_path.name == "particles_vae.star"
    widget.select_rows(np.arange(30))
    widget.show_selection(count=8)
    _wait_idle(qtbot, widget)
    assert widget.run is second and int(widget.selected.sum()) == 30
    base = f"{sample_run.name}/particles_vae"
    assert widget.view_layer("selection_raw").name == f"{base} selection raw particles"
    widget.show_more(count=8)
    _wait_idle(qtbot, widget)
    assert widget.sample.n_read == 16 and widget.view_layer("selection_raw").metadata["particle_vae_cells"].shape[0] == 16

    again = _open(viewer, sample_run / "particles_vae.star")  # the same STAR once more: napari appends " [1]"
    assert again[1].name.endswith("table [1]") and widget.run is again[1].metadata["particle_vae_run"]
    widget.select_rows([3, 4, 5])
    widget.show_selection()
    _wait_idle(qtbot, widget)
    raw = widget.view_layer("selection_raw")
    assert raw.name == f"{base} [1] selection raw particles"
    assert raw.metadata["particle_vae_run"] is widget.run
    titles = list(viewer.layers[f"{base} [1] view titles"].features["label"])
    assert any(t.startswith("raw: 3 of 3 selected") for t in titles), titles


def test_status_line_says_what_is_being_computed_now(viewer, qtbot, sample_run: Path):
    _open(viewer, sample_run / "analysis" / "clustered_particles.star")
    widget = _widget(viewer)
    status = widget.status_label.text
    assert status() == "plot: pvaeZ2 against pvaeZ1, 120 particles"
    widget.set_projection("pca")
    assert status() == "computing the PCA of the latents of 120 particles..."
    widget.set_projection("columns", x="pvaeZ1", y="rlnAnglePsi")  # back to two columns before the PCA is done
    assert status() == "plot: rlnAnglePsi against pvaeZ1, 120 particles"
    _wait_idle(qtbot, widget)
    assert status() == "plot: rlnAnglePsi against pvaeZ1, 120 particles" and widget.embedding.kind == "columns"
    widget.set_projection("tsne")
    assert status() == "computing the t-SNE of the latents of 120 particles..."
    _wait_idle(qtbot, widget)
    assert status() == "plot: t-SNE of the latents of 120 particles"
    widget.set_projection("pca")
    _wait_idle(qtbot, widget)
    assert status().startswith("plot: PCA of the latents, PC1 (")
    widget.select_rows(np.arange(30))
    widget.show_selection(count=8)
    assert status() == "reading 8 of 30 selected particles (random sample)..."
    _wait_idle(qtbot, widget)
    assert status().startswith("showing 8 of 30 selected (random sample, seed 0), average of 8")


def test_projections_and_colours(viewer, qtbot, sample_run: Path):
    _open(viewer, sample_run / "analysis" / "clustered_particles.star")
    widget = _widget(viewer)
    worker = widget.set_projection("pca")
    assert worker is not None
    _wait_idle(qtbot, widget)
    assert widget.embedding.kind == "pca" and widget.embedding.labels[0].startswith("PC1")
    widget.set_projection("tsne")
    _wait_idle(qtbot, widget)
    assert widget.embedding.kind == "tsne" and widget.embedding.coords.shape == (120, 2)
    widget.set_projection("columns", x="rlnAnglePsi", y="pvaeZ1")
    assert widget.embedding.labels == ("rlnAnglePsi", "pvaeZ1")
    widget.set_colour("pvaePoseConfidence")
    assert widget.colours.column == "pvaePoseConfidence" and not widget.colours.categorical
    # the generator's point for non-latent axes: the mean latent of the nearest particles
    widget.pick_point(*widget.embedding.coords[0])
    z = widget.current_latent("point")
    assert z.shape == (2,)
    # a newly opened run is shown at once
    _open(viewer, sample_run / "particles_vae.star")
    assert widget.run.star_path.name == "particles_vae.star" and widget.run_combo.count() == 2


def test_sample_data_contribution(viewer, sample_run: Path, monkeypatch):
    monkeypatch.setenv("NAPARI_PARTICLE_VAE_SAMPLE_DIR", str(sample_run))  # built already: opens at once
    layers = viewer.open_sample(PLUGIN, "simulated_run")
    names = [layer.name for layer in viewer.layers]
    assert names == ["analysis/clustered_particles particles", "analysis/clustered_particles table"], (names, layers)


def test_200k_points_in_the_widget(viewer, qtbot):
    """Plot building and a lasso selection on 200,000 particles take seconds at most (density + subset drawing).

    Timed in CPU seconds of this process (all its threads), not wall time: other jobs on a shared 2-core machine
    stretch wall time (3.5 s measured for the selection under a load of five), not the work done here."""
    from napari_particle_vae.reader import layer_data
    from napari_particle_vae.run_data import ParticleRun

    from particle_vae.io.star import image_name, make_particle_star

    n = 200_000
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 5, n)
    centres = np.array([[0, 0], [-2, -2], [2, -1], [0, 2.5], [3, 3]])
    z = centres[labels] + rng.normal(scale=0.6, size=(n, 2))
    star = make_particle_star([image_name(i % 1000, "absent.mrcs") for i in range(n)], 2.0, 64, columns={
        "pvaeZ1": z[:, 0], "pvaeZ2": z[:, 1], "rlnClassNumber": labels})
    run = ParticleRun(star_path=Path("synthetic_200k.star"), star=star, table=star.particles.reset_index(drop=True),
                      latent_columns=["pvaeZ1", "pvaeZ2"], image_error="no images in this test")
    for data, kwargs, kind in layer_data(run):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = _widget(viewer)
    started = time.process_time()
    widget.update_plot()
    widget.canvas.draw()
    build = time.process_time() - started
    assert widget.plot.density and len(widget.embedding) == n

    lasso = [(-4, -4), (0, -4), (0, 0), (-4, 0)]
    started = time.process_time()
    mask = widget.select_polygon(lasso)
    widget.canvas.draw()
    select = time.process_time() - started
    expected = (z[:, 0] > -4) & (z[:, 0] < 0) & (z[:, 1] > -4) & (z[:, 1] < 0)
    assert np.array_equal(mask, expected)
    assert build < 5.0, f"plot of 200k points took {build:.2f} CPU s"
    assert select < 3.0, f"lasso selection among 200k points took {select:.2f} CPU s"


def test_200k_particle_star_opens_and_shows_a_large_selection_quickly(viewer, qtbot, tmp_path: Path, synthetic_star):
    """200,000 particles through the reader: opening, and showing a lasso of about 78,000 of them (a page of 64 at
    once, then 'show more'), each take seconds at most (the aim is under 2 s; the bounds leave room for a busy machine)."""
    import importlib

    from qtpy.QtWidgets import QApplication

    for module in ("particle_vae.analysis.averages", "particle_vae.data.particles"):
        importlib.import_module(module)  # one-time imports (torch, scipy) are not what is timed here

    star_path = synthetic_star(tmp_path, 200_000, box=32, stack_images=1000)
    started = time.perf_counter()
    layers = _open(viewer, star_path)
    QApplication.processEvents()
    opening = time.perf_counter() - started
    assert layers[0].data.shape == (200_000, 32, 32) and len(layers[1].data) == 200_000
    widget = _widget(viewer)
    assert len(widget.run) == 200_000 and widget.plot.density
    mask = widget.select_polygon([(-4, -4.5), (2.0, -4.5), (2.0, 0.3), (-4, 0.3)])
    widget.canvas.draw()
    QApplication.processEvents()
    assert 60_000 < mask.sum() < 95_000

    timings = {}
    for action in ("show", "more"):
        started = time.perf_counter()
        widget.show_selection() if action == "show" else widget.show_more()
        _wait_idle(qtbot, widget)
        QApplication.processEvents()
        timings[action] = time.perf_counter() - started
    assert widget.sample.n_shown == 128 and widget.sample.n_selected == mask.sum()
    print(f"200k particles: open {opening:.2f} s, show a page of 64 of {int(mask.sum()):,} selected {timings['show']:.2f} s, "
          f"show 64 more {timings['more']:.2f} s")
    # The bounds separate the two algorithms, not fast from slow machines: reading every selected particle took
    # 36 s for a 78,000-particle lasso on an idle 2-core machine, reading one page 0.3-2.8 s (5.1 s while the
    # machine ran two other jobs); 15 s leaves a factor of 3 for load on either side.
    assert opening < 20.0, f"opening 200,000 particles took {opening:.2f} s"
    assert timings["show"] < 15.0, f"showing 64 of {int(mask.sum()):,} selected particles took {timings['show']:.2f} s"
    assert timings["more"] < 15.0, f"showing 64 more took {timings['more']:.2f} s"


def test_screenshot_script(viewer, sample_run: Path, tmp_path: Path):
    """scripts/screenshots.py (which makes the docs' images) runs and writes non-blank PNGs."""
    import importlib.util

    from imageio.v3 import imread

    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshots.py"
    spec = importlib.util.spec_from_file_location("pvae_screenshots", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.take_screenshots(tmp_path, sample_run, size=(1200, 800), with_200k=False, viewer=viewer)
    assert [p.name for p in written] == ["napari_overview.png", "napari_widget.png"]
    for path in written:
        image = np.asarray(imread(str(path)))
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
        assert image[..., :3].std() > 10  # not a blank window
    assert "selection average" in " ".join(layer.name for layer in viewer.layers)
