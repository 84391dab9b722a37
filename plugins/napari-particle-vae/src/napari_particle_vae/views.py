"""What a selection looks like: raw particles, aligned particles, their average, and the generator's drawings.

Qt-free; the widget runs these functions in worker threads.

* :func:`selection_views`: the first ``max_shown`` selected particles as read
  (background-normalised), the same particles aligned with the pose written in
  the STAR (through :func:`particle_vae.conventions.undo_relion_pose`, as
  ``particle-vae analyze`` does: ``c(y) = obs(R(-psi) y - o)``), and the mean of
  the aligned particles over the whole selection (at most ``max_averaged``,
  a random subset beyond).
* :class:`SelectionSample`: a selection of any size shown a page at a time:
  its particles in a fixed random order (seeded), each page read, aligned and
  added to the average on demand, so that showing a selection of hundreds of
  thousands of particles costs one page, not the whole selection.
* :func:`montage` and :func:`cell_origins`: particles laid out as a grid of
  cells in one 2D image, so that a view does not depend on napari's shared
  particle slider (a stack shorter than the slider's position shows nothing).
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
#: particles shown at first and added by each "show more" of a selection
PAGE_SIZE = 64
#: seed of the random order in which a selection's particles are shown
SAMPLE_SEED = 0
#: most cells of a montage of selected particles (beyond, more particles only refine the average)
MAX_MONTAGE_CELLS = 1024
#: most pixels of one montage (64 MiB of float32): large boxes get fewer cells
MAX_MONTAGE_PIXELS = 4096 * 4096
#: pixels between the cells of a montage
MONTAGE_GAP = 2

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


@dataclass
class SelectionPage:
    """One page of a :class:`SelectionSample`, read in a worker thread and added with :meth:`SelectionSample.add`.

    Attributes:
        rows: ``(B,)`` STAR rows read, ascending.
        raw: ``(B, N, N)`` float32 normalised particles as read.
        aligned: ``(B, N, N)`` float32 the same with their STAR pose undone.
        aligned_sum: ``(N, N)`` float64 sum of ``aligned`` (for the running average).
    """

    rows: np.ndarray
    raw: np.ndarray
    aligned: np.ndarray
    aligned_sum: np.ndarray


class SelectionSample:
    """A selection of any size, shown a page at a time in a fixed random order.

    The selected STAR rows are put in a random order drawn once with
    ``seed`` (the same selection and seed always give the same pages); each
    page takes the next ``count`` rows of that order, sorted by STAR row. Up
    to :attr:`max_cells` particles are kept for the montages of raw and aligned
    particles; every particle read goes into :attr:`average`.

    Args:
        run: the opened result (its stacks must be readable).
        selected: ``(N,)`` boolean mask or ``(S,)`` STAR rows.
        seed: seed of the random order.
        max_cells: most particles kept for the montages (default: :data:`MAX_MONTAGE_CELLS`,
            fewer for boxes over ``sqrt(MAX_MONTAGE_PIXELS / MAX_MONTAGE_CELLS)`` = 128 px).
    Raises:
        ParticleVAEError: empty selection.
    """

    def __init__(self, run: ParticleRun, selected, seed: int = SAMPLE_SEED, max_cells: int | None = None):
        rows = _as_rows(selected, len(run))
        if rows.size == 0:
            raise ParticleVAEError("nothing is selected; draw a lasso or rectangle on the latent plot first")
        self.run = run
        self.seed = int(seed)
        self.order = np.random.default_rng(self.seed).permutation(np.unique(rows))
        self.box = int(run.box)
        self.max_cells = int(max_cells) if max_cells is not None else max(
            1, min(MAX_MONTAGE_CELLS, MAX_MONTAGE_PIXELS // (self.box * self.box)))
        self.aligned_with_pose = run.poses() is not None
        #: montage columns, fixed for the sample so that cells keep their place as pages are added
        self.columns = montage_columns(min(self.n_selected, self.max_cells))
        self.n_read = 0
        self._requested = 0
        self._shown_rows: list[np.ndarray] = []
        self._raw: list[np.ndarray] = []
        self._aligned: list[np.ndarray] = []
        self._sum = np.zeros((self.box, self.box), dtype=np.float64)

    @property
    def n_selected(self) -> int:
        """Number of selected particles."""
        return int(self.order.size)

    @property
    def n_shown(self) -> int:
        """Particles in the montages (at most :attr:`max_cells`)."""
        return int(sum(part.size for part in self._shown_rows))

    @property
    def remaining(self) -> int:
        """Selected particles not read yet (nor asked for)."""
        return self.n_selected - self._requested

    @property
    def montage_full(self) -> bool:
        """Whether the montages hold :attr:`max_cells` particles (more pages only refine the average)."""
        return self.n_shown >= self.max_cells

    @property
    def rows(self) -> np.ndarray:
        """``(S,)`` STAR rows in the montages, in cell order."""
        return np.concatenate(self._shown_rows) if self._shown_rows else np.zeros(0, dtype=np.int64)

    @property
    def averaged_rows(self) -> np.ndarray:
        """``(A,)`` STAR rows in :attr:`average` (the first :attr:`n_read` of the random order)."""
        return np.sort(self.order[:self.n_read])

    @property
    def raw(self) -> np.ndarray:
        """``(S, N, N)`` float32 particles in the montages, as read."""
        return np.concatenate(self._raw) if self._raw else np.zeros((0, self.box, self.box), dtype=np.float32)

    @property
    def aligned(self) -> np.ndarray:
        """``(S, N, N)`` float32 the same particles with their STAR pose undone."""
        return np.concatenate(self._aligned) if self._aligned else np.zeros((0, self.box, self.box), dtype=np.float32)

    @property
    def average(self) -> np.ndarray:
        """``(N, N)`` float32 mean of every aligned particle read so far (zeros before the first page)."""
        return (self._sum / max(self.n_read, 1)).astype(np.float32)

    def release(self) -> None:
        """Give back the rows reserved by :meth:`take` but never added (their page failed)."""
        self._requested = self.n_read

    def take(self, count: int = PAGE_SIZE) -> np.ndarray:
        """Reserve the next ``count`` particles of the random order: ``(B,)`` STAR rows, ascending (empty when all are taken)."""
        count = max(0, min(int(count), self.remaining))
        rows = np.sort(self.order[self._requested:self._requested + count])
        self._requested += count
        return rows

    def iter_read(self, rows: np.ndarray) -> Generator[tuple[int, int], None, SelectionPage]:
        """Read and align ``rows`` (from :meth:`take`); yields ``(read, total)`` per batch and returns the page.

        Touches no state of the sample, so it can run in a worker thread while
        the montages are shown.
        """
        raw_parts, aligned_parts = [], []
        total = np.zeros((self.box, self.box), dtype=np.float64)
        done = 0
        for batch in _batches(rows):
            images = self.run.read_images(batch)
            aligned = align(self.run, images, batch)
            raw_parts.append(images)
            aligned_parts.append(aligned)
            total += aligned.astype(np.float64).sum(axis=0)
            done += batch.size
            yield done, int(rows.size)
        empty = np.zeros((0, self.box, self.box), dtype=np.float32)
        return SelectionPage(rows=np.asarray(rows, dtype=np.int64), raw=np.concatenate(raw_parts) if raw_parts else empty,
                             aligned=np.concatenate(aligned_parts) if aligned_parts else empty, aligned_sum=total)

    def add(self, page: SelectionPage) -> int:
        """Add a page read by :meth:`iter_read`: to the average always, to the montages while there is room.

        Returns:
            Particles added to the montages.
        """
        self._sum += page.aligned_sum
        self.n_read += int(page.rows.size)
        room = max(0, self.max_cells - self.n_shown)
        if room and page.rows.size:
            self._shown_rows.append(page.rows[:room])
            self._raw.append(page.raw[:room])
            self._aligned.append(page.aligned[:room])
        return min(room, int(page.rows.size))

    def load(self, count: int = PAGE_SIZE, progress: Progress | None = None) -> SelectionPage:
        """Take, read and add the next ``count`` particles in one call (scripts; the widget runs the steps in a worker)."""
        steps = self.iter_read(self.take(count))
        while True:
            try:
                done, total = next(steps)
            except StopIteration as finished:
                self.add(finished.value)
                return finished.value
            if progress is not None:
                progress(done, total)


def montage_columns(count: int) -> int:
    """Columns of a montage of ``count`` cells: about square, 4 to 16 wide (fewer when there are fewer cells)."""
    return int(min(max(count, 1), max(4, min(16, int(np.ceil(np.sqrt(max(count, 1))))))))


def cell_origins(count: int, columns: int, box: int, gap: int = MONTAGE_GAP) -> np.ndarray:
    """``(count, 2)`` pixel (row, column) of the top-left corner of each montage cell, filled row by row."""
    index = np.arange(int(count))
    return np.stack([index // columns, index % columns], axis=1) * (int(box) + int(gap))


def montage(images: np.ndarray, columns: int, gap: int = MONTAGE_GAP, fill: float | None = None) -> np.ndarray:
    """Lay ``images`` ``(S, N, N)`` out as one 2D image, row by row, ``columns`` cells wide.

    Args:
        images: the cells, ``S >= 1``.
        columns: cells per row.
        gap: pixels between cells.
        fill: value of the gaps and of the empty cells of the last row
            (default: the 0.5th percentile of ``images``, which the display's
            contrast range shows black).
    Returns:
        ``(rows * (N + gap) - gap, columns * (N + gap) - gap)`` float32, ``rows = ceil(S / columns)``.
    """
    images = np.asarray(images, dtype=np.float32)
    count, box = images.shape[0], images.shape[-1]
    rows = max(1, -(-count // columns))
    if fill is None:
        fill = float(np.percentile(images, 0.5)) if count else 0.0
    out = np.full((rows * (box + gap) - gap, columns * (box + gap) - gap), fill, dtype=np.float32)
    for image, (top, left) in zip(images, cell_origins(count, columns, box, gap)):
        out[top:top + box, left:left + box] = image
    return out


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
        from particle_vae.analysis.averages import decode_centred

        z = np.asarray(z, dtype=np.float64)
        if z.ndim == 1:
            z = z[None]
        if z.shape[1] != self.zdim:
            raise ParticleVAEError(f"{self.run_dir}: the model has {self.zdim} latent dimensions but the point has {z.shape[1]}; "
                                   "open the STAR together with the run that wrote it")
        return decode_centred(self.model, z)

    def traverse(self, z_start, z_end, steps: int = 9) -> tuple[np.ndarray, np.ndarray]:
        """Decode ``steps`` points on the straight line from ``z_start`` to ``z_end``.

        Returns:
            ``(images (steps, box, box) float32, latents (steps, k))``.
        """
        points = interpolate_latents(z_start, z_end, steps)
        return self.decode(points), points
