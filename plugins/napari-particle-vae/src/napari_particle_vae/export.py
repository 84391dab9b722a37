"""Taking a selection back to RELION: a STAR subset, or the selection as a new cluster.

Qt-free. Both write through :mod:`particle_vae.io.star`, like
``particle-vae select``: every block (optics included), every column and the
column order are kept, rows stay in STAR order, ``rlnImageName`` is rewritten
only where RELION, run in the project folder (``project_dir``, default the
current folder), would not find the stacks (:mod:`particle_vae.io.paths`), the
file is written atomically and the STAR that was opened is never overwritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_particle_vae.run_data import CLUSTER_COLUMN, ParticleRun
from particle_vae.errors import OutputFileError, ParticleVAEError


def _project_names(run: ParticleRun, project_dir: str | Path | None):
    from particle_vae.io.paths import project_folder, project_names_for_star

    source = run._source if run.image_error is None else None
    return project_names_for_star(run.star_path, project_folder(project_dir), run.datadir, source=source)


def write_subset(run: ParticleRun, selected, out_path: str | Path, overwrite: bool = False,
                 project_dir: str | Path | None = None) -> Path:
    """Write the selected particles as a STAR subset of the opened file.

    Args:
        selected: ``(N,)`` boolean mask or 0-based STAR rows.
        out_path: the new STAR; overwrite: replace an existing file (never the input).
        project_dir: the folder RELION runs in, that ``rlnImageName`` resolves from (default: the current folder).
    Returns:
        The written path.
    Raises:
        ParticleVAEError: empty selection; OutputFileError: the output exists or is the input.
    """
    from particle_vae.io.atomic import check_output_path

    mask = selection_mask(selected, len(run))
    if not mask.any():
        raise ParticleVAEError("nothing is selected; draw a lasso or rectangle on the latent plot first")
    out_path = check_output_path(Path(out_path), overwrite=overwrite, inputs=(run.star_path,))
    star = run.star
    from particle_vae.engine.inference import kept_pose_text

    names = _project_names(run, project_dir)
    kept = kept_pose_text(star, names)  # a 3D refinement's pose columns byte for byte, as the opened STAR has them
    if names or kept:
        star = star.with_columns({**names, **kept})
    star.subset(mask).write(out_path, overwrite=True)
    return out_path


def write_all(run: ParticleRun, out_path: str | Path, overwrite: bool = False, project_dir: str | Path | None = None) -> Path:
    """Write the whole table (e.g. with clusters added by :func:`add_cluster`) as a new STAR (``project_dir``:
    see :func:`write_subset`)."""
    return write_subset(run, np.ones(len(run), dtype=bool), out_path, overwrite=overwrite, project_dir=project_dir)


def add_cluster(run: ParticleRun, selected, column: str = CLUSTER_COLUMN) -> int:
    """Give the selected particles a new cluster id in ``column`` (``rlnClassNumber``).

    The new id is one more than the largest present. When the column does not
    exist yet, every particle gets class 1 and the selection class 2, so that
    ``particle-vae select --classes 2`` picks the selection. Edits the run's
    table and STAR in memory; write them with :func:`write_all` or :func:`write_subset`.

    Returns:
        The new cluster id.
    """
    mask = selection_mask(selected, len(run))
    if not mask.any():
        raise ParticleVAEError("nothing is selected; draw a lasso or rectangle on the latent plot first")
    if column in run.table.columns:
        try:
            values = run.table[column].to_numpy().astype(np.int64)
        except (TypeError, ValueError):
            raise ParticleVAEError(f"{run.star_path}: {column} holds values that are not class numbers; "
                                   "write the selection as a subset instead") from None
        new_id = int(values.max()) + 1
    else:
        values = np.ones(len(run), dtype=np.int64)
        new_id = 2
    values = values.copy()
    values[mask] = new_id
    run.set_column(column, values)
    return new_id


def selection_mask(selected, n: int) -> np.ndarray:
    """A ``(n,)`` boolean mask from a mask or 0-based row numbers."""
    selected = np.asarray(selected)
    if selected.dtype == bool:
        if selected.shape != (n,):
            raise ValueError(f"selection mask has shape {selected.shape}, expected ({n},)")
        return selected
    mask = np.zeros(n, dtype=bool)
    rows = selected.astype(np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"selected rows outside 0..{n - 1}")
    mask[rows] = True
    return mask


__all__ = ["OutputFileError", "add_cluster", "selection_mask", "write_all", "write_subset"]
