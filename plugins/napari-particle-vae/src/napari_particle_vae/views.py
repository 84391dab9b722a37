"""What a selection looks like: raw particles, aligned particles, their average, and the generator's drawings.

Qt-free; the widget runs these functions in worker threads.

* :func:`selection_views`: the first ``max_shown`` selected particles as read
  (background-normalised), the same particles aligned with the pose written in
  the STAR (through :func:`particle_vae.conventions.undo_relion_pose`, as
  ``particle-vae analyze`` does: ``c(y) = obs(R(-psi) y - o)``), and the mean of
  the aligned particles over the whole selection (at most ``max_averaged``,
  a random subset beyond).
* :class:`ModelHandle`: the run's model, loaded once on CPU or GPU, drawing
  ``model.decode(z, theta=0, t=0)`` (the generator's upright image, moved so that
  its centre of mass is on the box centre, the frame of the aligned particles
  whose origins ``particle-vae infer`` centres the same way) at latent points and
  along a straight line between two latent points.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_particle_vae.run_data import ParticleRun
from particle_vae.errors import ParticleVAEError

#: particles shown (raw and aligned) for a selection
MAX_SHOWN = 256
#: particles averaged for a selection (a random subset beyond, seed 0)
MAX_AVERAGED = 20_000
#: particles read per batch
BATCH = 256

Progress = Callable[[int, int], None]


@dataclass
class SelectionViews:
    """Images of a selection.

    Attributes:
        rows: ``(S,)`` STAR rows shown (the first ``max_shown`` selected, in STAR order).
        raw: ``(S, N, N)`` float32 normalised particles as read.
        aligned: ``(S, N, N)`` float32 the same particles with their pose undone
            (equal to ``raw`` when the STAR has no ``rlnAnglePsi``).
        average: ``(N, N)`` float32 mean of the aligned particles over ``averaged_rows``.
        averaged_rows: ``(A,)`` STAR rows that went into ``average``.
        aligned_with_pose: whether poses were undone.
    """

    rows: np.ndarray
    raw: np.ndarray
    aligned: np.ndarray
    average: np.ndarray
    averaged_rows: np.ndarray
    aligned_with_pose: bool


def align(run: ParticleRun, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Undo the STAR poses of ``rows`` on ``images`` ``(B, N, N)`` -> ``(B, N, N)`` float32.

    Uses :func:`particle_vae.analysis.averages.align_particles` (which calls
    :func:`particle_vae.conventions.undo_relion_pose`) with the particles'
    pixel size; returns the images unchanged when the STAR has no poses.
    """
    import torch

    from particle_vae.analysis.averages import align_particles

    poses = run.poses()
    if poses is None or len(rows) == 0:
        return np.asarray(images, dtype=np.float32)
    pixel_size = run.pixel_size
    if pixel_size is None:
        raise ParticleVAEError(f"{run.star_path}: no pixel size known to convert rlnOriginX/YAngst to pixels; "
                               "add rlnImagePixelSize to the optics block")
    psi, origin = poses
    aligned = align_particles(torch.from_numpy(np.asarray(images, dtype=np.float64)), psi[rows], origin[rows], pixel_size)
    return aligned.numpy().astype(np.float32)


def _batches(rows: np.ndarray, size: int = BATCH) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def iter_selection_views(run: ParticleRun, selected, max_shown: int = MAX_SHOWN, max_averaged: int = MAX_AVERAGED,
                         seed: int = 0) -> Generator[tuple[int, int], None, SelectionViews]:
    """Generator form of :func:`selection_views`: yields ``(particles read, total)`` after each batch
    and returns the :class:`SelectionViews` (``StopIteration.value``)."""
    rows = _as_rows(selected, len(run))
    if rows.size == 0:
        raise ParticleVAEError("nothing is selected; draw a lasso or rectangle on the latent plot first")
    shown = rows[:max_shown]
    averaged = rows
    if rows.size > max_averaged:
        averaged = np.sort(np.random.default_rng(seed).choice(rows, max_averaged, replace=False))
    total = shown.size + averaged.size
    done = 0
    raw_parts, aligned_parts = [], []
    for batch in _batches(shown):
        images = run.read_images(batch)
        raw_parts.append(images)
        aligned_parts.append(align(run, images, batch))
        done += batch.size
        yield done, total
    total_sum = np.zeros((run.box, run.box), dtype=np.float64)
    for batch in _batches(averaged):
        total_sum += align(run, run.read_images(batch), batch).astype(np.float64).sum(axis=0)
        done += batch.size
        yield done, total
    return SelectionViews(rows=shown, raw=np.concatenate(raw_parts), aligned=np.concatenate(aligned_parts),
                          average=(total_sum / averaged.size).astype(np.float32), averaged_rows=averaged,
                          aligned_with_pose=run.poses() is not None)


def selection_views(run: ParticleRun, selected, max_shown: int = MAX_SHOWN, max_averaged: int = MAX_AVERAGED,
                    progress: Progress | None = None, seed: int = 0) -> SelectionViews:
    """Raw, aligned and averaged images of the selected particles.

    Args:
        run: the opened result (its stacks must be readable).
        selected: ``(N,)`` boolean mask or ``(S,)`` STAR rows.
        max_shown: most particles returned in ``raw``/``aligned``.
        max_averaged: most particles averaged (random subset with ``seed`` beyond).
        progress: ``callback(done, total)`` in particles read.
    Raises:
        ParticleVAEError: empty selection, unreadable stacks.
    """
    steps = iter_selection_views(run, selected, max_shown, max_averaged, seed)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(done, total)


def _as_rows(selected, n: int) -> np.ndarray:
    selected = np.asarray(selected)
    if selected.dtype == bool:
        if selected.shape != (n,):
            raise ValueError(f"selection mask has shape {selected.shape}, expected ({n},)")
        return np.flatnonzero(selected)
    return np.sort(selected.astype(np.int64).reshape(-1))


def interpolate_latents(z_start, z_end, steps: int) -> np.ndarray:
    """``steps`` evenly spaced latent vectors from ``z_start`` to ``z_end`` (both included): ``(steps, k)``."""
    z_start = np.asarray(z_start, dtype=np.float64).reshape(-1)
    z_end = np.asarray(z_end, dtype=np.float64).reshape(-1)
    if z_start.shape != z_end.shape:
        raise ValueError(f"latent points differ in length: {z_start.shape[0]} and {z_end.shape[0]}")
    if steps < 2:
        raise ValueError(f"a traversal needs at least 2 steps, got {steps}")
    weights = np.linspace(0.0, 1.0, int(steps))[:, None]
    return (1 - weights) * z_start[None] + weights * z_end[None]


class ModelHandle:
    """A run's trained model, loaded once per device, drawing images at pose zero.

    Args:
        run_dir: the run directory (``config.json``, ``checkpoints/``).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        checkpoint: ``"best"`` or ``"last"``.
    Raises:
        ParticleVAEError: not a run, no checkpoint, or the device is not available.
    """

    def __init__(self, run_dir: str | Path, device: str = "cpu", checkpoint: str = "best"):
        import torch

        from particle_vae.engine.inference import load_model
        from particle_vae.engine.run import RunDirectory

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ParticleVAEError(f"device {device} is not available (no CUDA GPU visible to torch); choose cpu")
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.model, self.config = load_model(RunDirectory(self.run_dir), checkpoint, self.device)

    @property
    def zdim(self) -> int:
        """Latent dimensions ``k`` of the model."""
        return int(self.model.zdim)

    @property
    def box(self) -> int:
        """Edge of the generator's images in pixels (the model's box, after the run's downsampling)."""
        return int(self.model.box)

    @property
    def pixel_size(self) -> float | None:
        """Angstrom per pixel of the generator's images."""
        value = self.config.get("pixel_size")
        return None if value is None else float(value)

    def decode(self, z) -> np.ndarray:
        """``model.decode(z, theta=0, t=0)`` centred on its centre of mass: ``(B, k)`` or ``(k,)`` latents
        -> ``(B, box, box)`` float32 (data units)."""
        from particle_vae.analysis.averages import centre_on_mass, decode_at_pose_zero

        z = np.asarray(z, dtype=np.float64)
        if z.ndim == 1:
            z = z[None]
        if z.shape[1] != self.zdim:
            raise ParticleVAEError(f"{self.run_dir}: the model has {self.zdim} latent dimensions but the point has {z.shape[1]}; "
                                   "open the STAR together with the run that wrote it")
        drawings = decode_at_pose_zero(self.model, z)
        return np.stack([centre_on_mass(image)[0].numpy() for image in drawings]).astype(np.float32)

    def traverse(self, z_start, z_end, steps: int = 9) -> tuple[np.ndarray, np.ndarray]:
        """Decode ``steps`` points on the straight line from ``z_start`` to ``z_end``.

        Returns:
            ``(images (steps, box, box) float32, latents (steps, k))``.
        """
        points = interpolate_latents(z_start, z_end, steps)
        return self.decode(points), points
