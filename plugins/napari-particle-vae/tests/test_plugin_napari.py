"""The plugin in a real napari viewer (headless under Xvfb): reader, widget, views, generator, export, sample data, 200k points."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

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

    widget.show_selection()
    _wait_idle(qtbot, widget)
    base = "analysis/clustered_particles"
    assert viewer.layers[f"{base} selection raw"].data.shape == (selected, 32, 32)
    assert viewer.layers[f"{base} selection aligned"].data.shape == (selected, 32, 32)
    assert viewer.layers[f"{base} selection average"].data.shape == (32, 32)
    # aligned = raw with the STAR pose undone: different pixels, same particles
    raw = viewer.layers[f"{base} selection raw"].data
    aligned = viewer.layers[f"{base} selection aligned"].data
    assert not np.allclose(raw, aligned)
    assert np.allclose(viewer.layers[f"{base} selection average"].data, aligned.mean(axis=0), atol=1e-4)

    widget.reconstruct()
    _wait_idle(qtbot, widget)
    reconstruction = viewer.layers[f"{base} reconstruction"].data
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
    assert viewer.layers[f"{base} traversal"].data.shape == (6, 32, 32)

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
    """Plot building and a lasso selection on 200,000 particles take seconds at most (density + subset drawing)."""
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
    started = time.perf_counter()
    widget.update_plot()
    widget.canvas.draw()
    build = time.perf_counter() - started
    assert widget.plot.density and len(widget.embedding) == n

    lasso = [(-4, -4), (0, -4), (0, 0), (-4, 0)]
    started = time.perf_counter()
    mask = widget.select_polygon(lasso)
    widget.canvas.draw()
    select = time.perf_counter() - started
    expected = (z[:, 0] > -4) & (z[:, 0] < 0) & (z[:, 1] > -4) & (z[:, 1] < 0)
    assert np.array_equal(mask, expected)
    assert build < 5.0, f"plot of 200k points took {build:.2f} s"
    assert select < 3.0, f"lasso selection among 200k points took {select:.2f} s"


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
