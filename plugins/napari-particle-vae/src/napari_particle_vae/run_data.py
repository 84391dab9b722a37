"""Opening a particle-vae result for exploration: the STAR table, the lazy particle stack, the run's model.

Nothing here imports Qt or napari, so it is tested and usable on its own.

* :func:`resolve_inputs` turns what the user opened (a STAR written by
  ``particle-vae infer``/``analyze``, a run directory, or a folder holding a
  run) into a STAR path and, when one is found, the run directory that wrote it.
* :class:`ParticleRun` holds the particle table (every STAR column), the latent
  columns ``pvaeZ1..k``, the poses and a lazily opened particle source.
* :class:`LazyParticleStack` is an array-like ``(N, box, box)`` float32 stack
  that reads only the images a viewer asks for (through
  :class:`particle_vae.data.particles.ParticleDataset`), normalised per image.

Images are read at the STAR's own box and pixel size and normalised with the
background normalisation of :mod:`particle_vae.data.preprocess` (mean 0 and
standard deviation 1 outside 85% of the half box), so a stack of particles from
different micrographs shares one contrast setting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from particle_vae.errors import InputFileError, ParticleVAEError
from particle_vae.io.star import scan_star_header

#: latent mean columns written by ``particle-vae infer``
LATENT_RE = re.compile(r"^pvaeZ(\d+)$")
#: the column ``particle-vae analyze`` writes cluster ids to (and ``select --classes`` reads)
CLUSTER_COLUMN = "rlnClassNumber"
#: STAR files looked for, in this order, when a folder is opened
PREFERRED_STARS = ("analysis/clustered_particles.star", "clustered_particles.star", "particles_vae.star")
#: integer columns with at most this many distinct values are treated as categories when colouring
MAX_CATEGORIES = 30

NO_ROWS = "lists no particles (its rlnImageName loop has no rows)"
FIX_NO_LATENTS = ("open the STAR written by 'particle-vae infer RUN --out FILE.star' "
                  "(or analyze's clustered_particles.star), or the run directory")


def star_columns(path: str | Path) -> list[str]:
    """Column names of the particle block of a STAR file, read from its header only
    (:func:`particle_vae.io.star.scan_star_header`).

    Returns:
        Column names without the leading underscore (``[]`` when no block has
        ``rlnImageName``).
    """
    return scan_star_header(path).columns


def check_particle_star(path: Path) -> list[str]:
    """The particle block's columns of a STAR that the plugin can open, or a one-line error saying why not.

    Checked from the header only, in the order a user would fix them: an
    empty file, a file that is not a particle STAR (compressed, not UTF-8,
    or without a loop holding ``rlnImageName``), a particle block without
    rows, and a particle STAR without the ``pvaeZ`` latent columns.

    Raises:
        InputFileError: naming ``path`` and the fix.
    """
    try:
        header = scan_star_header(path)
    except OSError as error:
        raise InputFileError(f"cannot be read ({error.strerror or error})", path, "check the file's permissions") from None
    if not header.columns:
        if not header.blocks and not _has_text(path):
            raise InputFileError("is empty (no STAR data blocks)", path, FIX_NO_LATENTS)
        _raise_unreadable_star(path)
        raise InputFileError("is not a particle STAR file: no loop has an rlnImageName column (a class-average, model or "
                             "optics STAR?)", path, FIX_NO_LATENTS)
    if not header.has_rows:
        raise InputFileError(NO_ROWS, path, FIX_NO_LATENTS)
    if not latent_columns_of(header.columns):
        raise InputFileError("has no pvaeZ latent columns", path, FIX_NO_LATENTS)
    return header.columns


def _has_text(path: Path) -> bool:
    """Whether the file holds anything besides blank lines and ``#`` comments."""
    with open(path, "rb") as handle:
        for line in handle:
            text = line.strip()
            if text and not text.startswith(b"#"):
                return True
    return False


def _raise_unreadable_star(path: Path) -> None:
    """Let the core reader name why a file without a particle block cannot be read (compressed, UTF-16, not UTF-8)."""
    from particle_vae.io.star import read_star

    try:
        read_star(path)
    except InputFileError:
        raise
    except Exception:  # noqa: BLE001 - a parse failure of a non-particle file: the caller's message says more
        return


def latent_columns_of(columns) -> list[str]:
    """The ``pvaeZ1..k`` columns among ``columns``, in numeric order (``pvaeZStd*`` excluded)."""
    found = [(int(m.group(1)), str(c)) for c in columns if (m := LATENT_RE.match(str(c)))]
    return [c for _, c in sorted(found)]


def is_run_directory(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``particle-vae train`` (it holds ``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


def _run_zdim(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "config.json").read_text())["model"]["zdim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _star_candidates(folder: Path) -> list[Path]:
    """STAR files with latent columns in ``folder`` (and its ``analysis`` sub-folders), best first."""
    found: list[Path] = []
    for name in PREFERRED_STARS:
        if (folder / name).is_file():
            found.append(folder / name)
    others = sorted(folder.glob("*.star")) + sorted(folder.glob("*/clustered_particles.star"))
    for path in others:
        if path not in found:
            found.append(path)
    return [p for p in found if latent_columns_of(star_columns(p))]


def find_run_for_star(star_path: Path, n_latents: int) -> Path | None:
    """The run directory that most likely wrote ``star_path``.

    Looked for, in order: the STAR's folder, its parent (``RUN/analysis/x.star``),
    and sub-folders of both (``PROJECT/run`` beside ``PROJECT/particles_vae.star``).
    A run qualifies when its model has ``n_latents`` latent dimensions.
    """
    folder = star_path.resolve().parent
    candidates = [folder, folder.parent]
    for base in (folder, folder.parent):
        candidates += sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    seen = set()
    for candidate in candidates:
        if candidate in seen:
            continue
        seen.add(candidate)
        if is_run_directory(candidate) and _run_zdim(candidate) == n_latents:
            return candidate
    return None


def resolve_inputs(path: str | Path) -> tuple[Path, Path | None]:
    """What to open for ``path``: ``(STAR with latent columns, run directory or None)``.

    ``path`` may be a STAR file; a run directory (the STAR is looked for inside
    it, then beside it); or a folder holding a run directory (the layout of the
    README's demo: ``demo_run/run`` and ``demo_run/particles_vae.star``).

    Raises:
        InputFileError: nothing usable found, with the fix in the message.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError("not found", path, "check the path")
    if path.is_file():
        latents = latent_columns_of(check_particle_star(path))
        return path, find_run_for_star(path, len(latents))
    runs = [path] if is_run_directory(path) else sorted(p for p in path.iterdir() if is_run_directory(p))
    places = [path] + ([path.parent] if is_run_directory(path) else [])
    for place in places:
        stars = _star_candidates(place)
        if stars:
            latents = latent_columns_of(star_columns(stars[0]))
            run = next((r for r in runs if _run_zdim(r) == len(latents)), None)
            return stars[0], run or find_run_for_star(stars[0], len(latents))
    if runs:
        raise InputFileError(
            "holds a training run but no STAR with latents", path,
            f"write one with 'particle-vae infer {runs[0]} --out {runs[0] / 'particles_vae.star'}' and open it")
    raise InputFileError("holds no particle-vae run or STAR with pvaeZ latent columns", path, FIX_NO_LATENTS)


@dataclass
class ParticleRun:
    """One opened result: table, latents, poses, images and (optionally) the run.

    Attributes:
        star_path: the STAR that was opened.
        star: the :class:`particle_vae.io.star.ParticleStar` (all blocks; edited
            in place when the user adds a cluster).
        table: the particle block, ``N`` rows, index ``0..N-1``, every column.
        latent_columns: ``pvaeZ1..k`` names in order.
        run_dir: the training run, or ``None`` (then no reconstructions).
        datadir: folder to look for the stacks in (``None``: next to the STAR).
        image_error: why the particle images cannot be read (``None`` when they can).
    """

    star_path: Path
    star: object
    table: pd.DataFrame
    latent_columns: list[str]
    run_dir: Path | None = None
    datadir: Path | None = None
    image_error: str | None = None
    _source: object = field(default=None, repr=False)
    _dataset: object = field(default=None, repr=False)

    # -- table ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    @property
    def n_latents(self) -> int:
        """Number of latent dimensions ``k``."""
        return len(self.latent_columns)

    def latents(self) -> np.ndarray:
        """``(N, k)`` float64 latent means."""
        return self.table[self.latent_columns].to_numpy(dtype=np.float64)

    def numeric_columns(self) -> list[str]:
        """Columns that can be plotted or coloured by: latents first, then every other numeric column."""
        numeric = [str(c) for c in self.table.columns if pd.api.types.is_numeric_dtype(self.table[c])]
        return self.latent_columns + [c for c in numeric if c not in self.latent_columns]

    def cluster_column(self) -> str | None:
        """``rlnClassNumber`` when present, else ``None``."""
        return CLUSTER_COLUMN if CLUSTER_COLUMN in self.table.columns else None

    def poses(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(psi_deg (N,), origin_angst (N, 2))`` from the STAR, or ``None`` without a psi column:
        ``pvaeAnglePsi``, ``pvaeOriginX/YAngst`` when present (infer's pose beside a 3D refinement),
        else ``rlnAnglePsi``, ``rlnOriginX/YAngst`` (:func:`particle_vae.analysis.averages.relion_poses`)."""
        from particle_vae.analysis.averages import relion_poses

        try:
            return relion_poses(self.table, self.pixel_size)
        except ValueError as error:
            raise InputFileError(str(error), self.star_path, "re-run 'particle-vae infer'") from None

    # -- images ---------------------------------------------------------------
    @property
    def source(self):
        """The :class:`particle_vae.data.sources.ParticleSource` (headers only; opened on first use).

        Raises:
            InputFileError: a missing or truncated stack (one line naming the file and the fix).
        """
        if self._source is None:
            from particle_vae.data.sources import open_source

            try:
                self._source = open_source(self.star_path, datadir=self.datadir)
            except ParticleVAEError as error:
                self.image_error = str(error)
                raise
            if len(self._source) != len(self.table):
                raise InputFileError(f"the stacks give {len(self._source)} images for {len(self.table)} rows", self.star_path)
        return self._source

    def check_images(self) -> bool:
        """Open the stack headers now: whether the particle images can be read (the reason is kept in :attr:`image_error`)."""
        try:
            self.source  # noqa: B018 - the property opens the source
        except ParticleVAEError:
            return False
        return True

    @property
    def has_images(self) -> bool:
        """Whether the particle stacks can be opened (errors are kept in :attr:`image_error`)."""
        return self.check_images()

    @property
    def box(self) -> int:
        """Particle box in pixels (from the stacks)."""
        return int(self.source.box)

    @property
    def pixel_size(self) -> float | None:
        """Angstrom per pixel of the particles (STAR optics, else the stack header)."""
        if self._source is not None:
            return self._source.pixel_size
        try:
            return self.star.pixel_size()
        except ParticleVAEError:
            return None

    def dataset(self):
        """A :class:`~particle_vae.data.particles.ParticleDataset` yielding background-normalised images."""
        if self._dataset is None:
            from particle_vae.data.particles import ParticleDataset
            from particle_vae.data.preprocess import Preprocessing

            source = self.source
            self._dataset = ParticleDataset(source, transform=Preprocessing(box=source.box, pixel_size=source.pixel_size,
                                                                            normalize="background"))
        return self._dataset

    def read_images(self, rows) -> np.ndarray:
        """Normalised particle images of STAR rows ``rows`` (``(B,)`` 0-based): ``(B, box, box)`` float32."""
        import torch

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        dataset = self.dataset()
        if rows.size == 0:
            return np.zeros((0, self.box, self.box), dtype=np.float32)
        raw = torch.from_numpy(dataset.read(rows))[:, None]
        return dataset.transform(raw)[:, 0].numpy()

    def image_stack(self) -> LazyParticleStack:
        """All particles as a lazy ``(N, box, box)`` array-like (see :class:`LazyParticleStack`)."""
        return LazyParticleStack(self)

    # -- edits ----------------------------------------------------------------
    def set_column(self, name: str, values) -> None:
        """Add or replace a per-particle column in both :attr:`table` and :attr:`star` (``values`` ``(N,)``)."""
        values = np.asarray(values)
        if values.shape != (len(self.table),):
            raise ValueError(f"column {name}: expected {len(self.table)} values, got shape {values.shape}")
        self.star = self.star.with_columns({name: values})
        self.table[name] = values


def open_particle_run(path: str | Path, datadir: str | Path | None = None) -> ParticleRun:
    """Open a STAR written by ``particle-vae infer``/``analyze``, or a run folder (see :func:`resolve_inputs`).

    The particle images are not read; whether their stacks can be found is
    checked (headers only) and a problem is kept in :attr:`ParticleRun.image_error`
    so that the latent space can still be explored. The STAR is parsed once:
    the particle source reads it together with the stack headers, and only
    when the stacks cannot be opened is it read again for the table alone.
    Stacks named relative to a RELION project folder above the STAR's own
    (as particle-vae writes them, :mod:`particle_vae.io.paths`) are found
    from there when napari was started elsewhere (``datadir`` then becomes
    that folder).

    Raises:
        InputFileError: no STAR with latent columns, no particle rows, an unreadable STAR, or
            a STAR beside the ``.npz`` of another ``infer`` run.
    """
    import logging

    from particle_vae.data.sources import open_source
    from particle_vae.io.infer_pair import check_pair
    from particle_vae.io.paths import find_project_folder
    from particle_vae.io.star import ParticleStar

    star_path, run_dir = resolve_inputs(path)
    missing_npz = check_pair(star_path, allow_missing_npz=True)  # raises for a STAR beside another infer run's .npz
    if missing_npz:
        logging.getLogger(__name__).warning("%s", missing_npz)
    datadir = None if datadir is None else Path(datadir)
    source, image_error = None, None
    try:
        source = open_source(star_path, datadir=datadir)
        star = source.star
    except ParticleVAEError as error:
        image_error = str(error)
        star = ParticleStar(star_path)  # a problem of the STAR itself is raised here; one of the stacks was kept above
        project = None if datadir is not None else find_project_folder(star_path, star.particles["rlnImageName"].astype(str))
        if project is not None:  # names relative to the RELION project folder above the STAR (napari started elsewhere)
            try:
                source = open_source(star_path, datadir=project)
                star, datadir, image_error = source.star, project, None
            except ParticleVAEError:
                pass
    table = star.particles.reset_index(drop=True)
    if len(table) == 0:
        raise InputFileError(NO_ROWS, star_path, FIX_NO_LATENTS)
    latents = latent_columns_of(table.columns)
    if not latents:
        raise InputFileError("has no pvaeZ latent columns", star_path, FIX_NO_LATENTS)
    bad = [c for c in latents if not pd.api.types.is_numeric_dtype(table[c])]
    if bad:
        raise InputFileError(f"latent column {bad[0]} is not numeric", star_path, "re-run 'particle-vae infer'")
    values = table[latents].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputFileError(f"{int((~np.isfinite(values)).any(axis=1).sum())} rows have NaN or Inf latents", star_path,
                             "re-run 'particle-vae infer'")
    run = ParticleRun(star_path=Path(star_path), star=star, table=table, latent_columns=latents, run_dir=run_dir,
                      datadir=datadir, image_error=image_error)
    if source is not None and len(source) != len(table):
        run.image_error = str(InputFileError(f"the stacks give {len(source)} images for {len(table)} rows", star_path))
    elif source is not None:
        run._source = source
    return run


class LazyParticleStack:
    """A ``(N, box, box)`` float32 array-like over a run's particles that reads images on demand.

    Supports numpy basic indexing on the first axis (an integer, a slice, a
    list or array of integers) followed by any indexing of the two image axes;
    only the requested particles are read from disk (grouped contiguous reads
    per stack) and normalised. Nothing is cached, so memory stays bounded by
    what a viewer shows. ``images_read`` counts the images read so far.
    """

    def __init__(self, run: ParticleRun):
        self.run = run
        box = run.box
        self.shape = (len(run), box, box)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3
        self.size = int(np.prod(self.shape))
        self.images_read = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyParticleStack({self.run.star_path.name}, shape={self.shape})"

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            position = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (3 - (len(key) - 1))
            key = key[:position] + fill + key[position + 1:]
        first, rest = key[0], key[1:]
        n = self.shape[0]
        if isinstance(first, (int, np.integer)):
            index = int(first) + (n if int(first) < 0 else 0)
            if not 0 <= index < n:
                raise IndexError(f"particle {first} out of range for {n} particles")
            images = self.run.read_images([index])[0]
            self.images_read += 1
            return images[rest] if rest else images
        if isinstance(first, slice):
            rows = np.arange(n)[first]
        else:
            rows = np.arange(n)[np.asarray(first)]
        images = self.run.read_images(rows)
        self.images_read += int(rows.size)
        return images[(slice(None),) + rest] if rest else images

    def __array__(self, dtype=None, copy=None):
        raise TypeError(f"{self!r} is read lazily; index it (stack[i]) instead of converting the whole stack to an array")

    def sample_contrast(self, count: int = 16) -> tuple[float, float]:
        """Display range: 0.5th-99.5th percentile of the first ``count`` images (reads only those)."""
        images = self[: min(count, self.shape[0])]
        low, high = np.percentile(images, [0.5, 99.5])
        if not high > low:
            high = low + 1.0
        return float(low), float(high)
