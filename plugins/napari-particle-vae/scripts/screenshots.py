"""Take the screenshots of docs/napari.md with a real napari viewer.

Builds (or reuses) a simulated run of three shapes with the plugin's sample
builder, opens it through the plugin's reader, drives the latent-space
explorer programmatically (a lasso around the largest cluster, the selection
views, a reconstruction and a traversal between two cluster centres) and
saves:

* ``napari_overview.png``: the whole window (the particle stack, the views
  laid out beside it with their titles and cell labels, and the widget);
* ``napari_widget.png``: the widget alone;
* ``napari_200k.png``: the widget on 200,000 synthetic latent points (density
  view with a coloured subset on top, and a lasso selection).

Needs a display; headless, run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" python plugins/napari-particle-vae/scripts/screenshots.py

Options: ``--out`` (default ``docs/images`` of the repository), ``--work``
(folder of the simulated run, default a ``screenshot_run`` folder next to the
sample cache), ``--n``, ``--epochs``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]


def wait_until(condition, timeout: float = 300.0) -> None:
    """Process Qt events until ``condition()`` is true (raises ``TimeoutError`` after ``timeout`` seconds)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the viewer did not finish in time")
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()


def _settle(viewer, seconds: float = 0.5) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def synthetic_run(n: int = 200_000, seed: int = 0):
    """A :class:`~napari_particle_vae.run_data.ParticleRun` of ``n`` synthetic 2D latents in four classes (no images)."""
    from napari_particle_vae.run_data import ParticleRun

    from particle_vae.io.star import image_name, make_particle_star

    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 5, n)
    centres = np.array([[0, 0], [-2, -2], [2, -1], [0, 2.5], [3, 3]])
    z = centres[labels] + rng.normal(scale=0.6, size=(n, 2))
    star = make_particle_star([image_name(i % 1000, "absent.mrcs") for i in range(n)], 2.0, 64, columns={
        "pvaeZ1": z[:, 0], "pvaeZ2": z[:, 1], "rlnClassNumber": labels})
    return ParticleRun(star_path=Path("synthetic_200k.star"), star=star, table=star.particles.reset_index(drop=True),
                       latent_columns=["pvaeZ1", "pvaeZ2"], image_error="synthetic latents without images")


def take_screenshots(out_dir: Path, run_folder: Path, size: tuple[int, int] = (1600, 1000), with_200k: bool = True,
                     viewer=None) -> list[Path]:
    """Open ``run_folder`` in ``viewer`` (default: a new one, closed at the end), drive the widget and save
    the screenshots to ``out_dir``.

    Returns:
        The PNG paths written.
    """
    import napari
    from napari_particle_vae.reader import layer_data
    from scipy.spatial import ConvexHull

    out_dir.mkdir(parents=True, exist_ok=True)
    own_viewer = viewer is None
    if own_viewer:
        viewer = napari.Viewer(show=True, title="particle-vae")
    written = []
    try:
        viewer.window._qt_window.resize(*size)
        viewer.open(str(run_folder), plugin="napari-particle-vae")
        _, widget = viewer.window.add_plugin_dock_widget("napari-particle-vae", "Latent space explorer")
        wait_until(lambda: widget.embedding is not None and widget.busy == 0)
        run = widget.run

        # a lasso around the largest cluster (class 1), drawn as its convex hull
        classes = run.table[run.cluster_column()].to_numpy()
        largest = widget.embedding.coords[classes[widget.embedding.rows] == 1]
        hull = largest[ConvexHull(largest).vertices]
        widget.tool_combo.setCurrentText("lasso")
        widget.select_polygon(hull, mode="replace")
        widget.show_selection()
        wait_until(lambda: widget.busy == 0)
        widget.reconstruct(source="selection")
        wait_until(lambda: widget.busy == 0)
        latents = run.latents()
        widget.set_traversal_end(0, z=latents[classes == 1].mean(axis=0))
        widget.set_traversal_end(1, z=latents[classes == 2].mean(axis=0))
        widget.traverse(steps=9)
        wait_until(lambda: widget.busy == 0)
        widget.show_particle(int(np.flatnonzero(widget.selected)[0]))
        viewer.layers.selection.active = widget.view_layer("selection_average")
        viewer.reset_view()
        _settle(viewer)
        overview = out_dir / "napari_overview.png"
        napari.utils.io.imsave(str(overview), viewer.screenshot(canvas_only=False, flash=False))
        written.append(overview)
        widget_png = out_dir / "napari_widget.png"
        widget.grab().save(str(widget_png))
        written.append(widget_png)

        if with_200k:
            for data, kwargs, kind in layer_data(synthetic_run()):
                getattr(viewer, f"add_{kind}")(data, **kwargs)
            wait_until(lambda: widget.run is not None and len(widget.run) == 200_000 and widget.embedding is not None)
            widget.select_polygon([(-4, -4.5), (0.5, -4.5), (0.8, -0.5), (-1.5, 0.6), (-4, -1)], mode="replace")
            _settle(viewer)
            dense = out_dir / "napari_200k.png"
            widget.grab().save(str(dense))
            written.append(dense)
    finally:
        if own_viewer:
            viewer.close()
    return written


def main(argv: list[str] | None = None) -> int:
    from napari_particle_vae.sample_data import make_sample_run, sample_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the PNGs (default docs/images)")
    parser.add_argument("--work", type=Path, default=sample_cache_dir().parent / "screenshot_run",
                        help="folder of the simulated run (built when missing)")
    parser.add_argument("--n", type=int, default=600, help="particles simulated (default 600)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--rebuild", action="store_true", help="simulate and train again even if --work holds a run")
    args = parser.parse_args(argv)
    make_sample_run(args.work, n=args.n, epochs=args.epochs, overwrite=args.rebuild)
    for path in take_screenshots(args.out, args.work):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
