"""napari reader contribution: particle-vae STAR files and run folders.

Opening a STAR written by ``particle-vae infer``/``analyze`` (or a run
directory, or a folder holding one) gives two layers:

* ``<name> particles``: an image layer over all particles, ``(N, box, box)``,
  read lazily (only the particle on screen is read) and background-normalised;
* ``<name> table``: a points layer with one point per particle at the
  particle's centre in its image (``-origin`` from the box centre, see
  docs/conventions.md) whose ``features`` are the whole particle table (every
  STAR column, latents included). The latent-space widget works on this layer.

Every ``.star`` file is claimed, so that a STAR the plugin cannot show (an
empty file, a class-average or model STAR without ``rlnImageName``, a particle
block without rows, a STAR without latent columns, a compressed or non-UTF-8
file) gets the plugin's own one-line error notification naming the file and
the fix, instead of napari's generic "refused the file": npe2 treats a
``get_reader`` that returns ``None`` as "not mine" and then reports only that
no reader accepted the path, and an exception raised while reading is shown
as a plugin failure with a stack trace. The reader function therefore reports
the problem itself and returns napari's "read, but no layers" value.
Missing stacks do not stop the table from opening (the latent space can still
be explored; particle views need the stacks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_particle_vae.run_data import (
    ParticleRun,
    is_run_directory,
    latent_columns_of,
    open_particle_run,
    star_columns,
)
from particle_vae.conventions import box_centre
from particle_vae.errors import ParticleVAEError

#: key of layer.metadata holding the :class:`ParticleRun`
METADATA_KEY = "particle_vae_run"
#: key of layer.metadata saying which layer of a run this is ("particles", "table", or a view of the widget)
ROLE_KEY = "particle_vae_role"
#: label of the particle axis (the slider): the particle's 0-based row in the STAR
PARTICLE_AXIS_LABEL = "particle (STAR row)"
#: axis labels of the particle stack and the table's points
AXIS_LABELS = (PARTICLE_AXIS_LABEL, "y", "x")

NULL_LAYER = [(None,)]


def get_reader(path):
    """napari ``get_reader`` hook: the reader for any ``.star`` file and for folders holding a particle-vae run, else ``None``.

    A ``.star`` file that cannot be shown is accepted too, so that the reader
    can say why in one line (see the module docstring).
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(str(path))
    if path.is_file():
        # every STAR is ours: what cannot be shown is explained by read_particle_run, not refused silently
        return read_particle_run if path.suffix.lower() == ".star" else None
    if path.is_dir() and (is_run_directory(path) or _holds_result(path)):
        return read_particle_run
    return None


def _holds_result(folder: Path) -> bool:
    try:
        return any(is_run_directory(p) for p in folder.iterdir()) or any(
            latent_columns_of(star_columns(p)) for p in folder.glob("*.star"))
    except OSError:
        return False


def read_particle_run(path) -> list[tuple]:
    """Open a run and return napari layer data ``[(data, kwargs, layer_type), ...]``.

    On a problem a user can fix, shows one error notification naming the file
    and the fix and returns napari's "read, but no layers" value ``[(None,)]``.
    """
    from napari.utils.notifications import show_error, show_warning

    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        run = open_particle_run(path)
    except ParticleVAEError as error:
        show_error(f"particle-vae: {error}")
        return NULL_LAYER
    if run.image_error is not None:
        show_warning(f"particle-vae: {run.image_error} (in napari: keep the STAR where its rlnImageName paths resolve, "
                     "i.e. beside the stacks or in the RELION project folder); only the latent table was opened")
    return layer_data(run)


def layer_data(run: ParticleRun) -> list[tuple]:
    """Layer data tuples for an opened run (see the module docstring).

    Both layers are scaled to Angstrom on the image axes (``scale = (1,
    pixel size, pixel size)``) so that the widget's averages and generator
    images, drawn at their own pixel sizes, line up with them.
    """
    name = _layer_name(run)
    metadata = {METADATA_KEY: run}
    layers = []
    centres = np.zeros((len(run), 2))
    apix = run.pixel_size or 1.0
    scale = (1.0, apix, apix)
    if run.image_error is None:
        stack = run.image_stack()
        low, high = stack.sample_contrast()
        layers.append((stack, {"name": f"{name} particles", "contrast_limits": [low, high], "colormap": "gray", "scale": scale,
                               **_axis_labels(), "metadata": {**metadata, ROLE_KEY: "particles"}}, "image"))
        centres = particle_centres(run)
    points = np.concatenate([np.arange(len(run), dtype=np.float64)[:, None], centres], axis=1)
    # size 1 (data pixel) keeps the layer's extent along the particle axis equal to the image's
    # (napari pads every axis by half the largest point size); the canvas limits keep the cross visible.
    layers.append((points, {"name": f"{name} table", "features": run.table, "size": 1.0, "symbol": "cross",
                            "face_color": "red", "border_width": 0, "canvas_size_limits": (9, 9), "scale": scale,
                            "out_of_slice_display": False, "visible": run.image_error is None, **_axis_labels(),
                            "metadata": {**metadata, ROLE_KEY: "table"}}, "points"))
    return layers


def particle_centres(run: ParticleRun) -> np.ndarray:
    """``(N, 2)`` (row, column) of each particle's centre in its image: the box centre minus the origin shift.

    By docs/conventions.md the particle's centre sits at ``-o`` (pixels, ``o =
    origin / pixel size``) from the box centre ``box // 2``; ``x`` runs along
    columns and ``y`` along rows. Without poses the box centre.
    """
    centre = float(box_centre(run.box))
    out = np.full((len(run), 2), centre)
    poses = run.poses()
    if poses is None or run.pixel_size is None:
        return out
    origin_px = poses[1] / run.pixel_size
    out[:, 0] -= origin_px[:, 1]
    out[:, 1] -= origin_px[:, 0]
    return out


def _axis_labels() -> dict:
    """``{"axis_labels": ...}`` where napari's layers take axis labels (napari >= 0.6), else ``{}``."""
    import inspect

    try:
        from napari.layers import Image
    except ImportError:
        return {}
    return {"axis_labels": AXIS_LABELS} if "axis_labels" in inspect.signature(Image.__init__).parameters else {}


def _layer_name(run: ParticleRun) -> str:
    stem = run.star_path.stem
    parent = run.star_path.parent.name
    return f"{parent}/{stem}" if parent else stem
