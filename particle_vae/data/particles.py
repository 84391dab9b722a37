"""Particle sources and a lazy, batched PyTorch dataset over them.

A *source* is what the user points the program at:

* a RELION particle STAR file (3.0 single block or 3.1 optics + particles),
  whose ``rlnImageName`` entries (``N@stack.mrcs``) are resolved against the
  STAR's folder or ``datadir``;
* a bare image stack (``.mrcs``, ``.mrc``, ``.st``);
* a ``.txt`` list of stack files, one per line, relative to the list's folder
  (blank lines and lines starting with ``#`` are ignored);
* a cryoSPARC particle file (``.cs``), read as the RELION particle STAR it
  converts to (:mod:`particle_vae.io.cryosparc`); its ``blob/path`` entries are
  relative to the cryoSPARC project folder (``datadir``, else found beside the
  ``.cs`` file).

:func:`open_source` reads only headers: it checks that every stack exists and
is complete, that all images have the same box, and that every image a STAR
asks for lies inside its stack. The result, :class:`ParticleSource`, is one
index over all particles (stack number + image number inside that stack) in
input order.

:class:`ParticleDataset` reads images on demand with grouped contiguous reads,
keeps at most ``max_open_stacks`` stacks open (least recently used are closed)
and never caches pixels, so memory is bounded by the batch size whatever the
number or size of the stacks. It implements PyTorch's batched fetch hook
``__getitems__``; use :func:`collate` (or :func:`make_loader`) as the
DataLoader's ``collate_fn``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from particle_vae.errors import InputFileError
from particle_vae.io.mrc import MRCStack
from particle_vae.io.star import ParticleStar

__all__ = [
    "STACK_SUFFIXES",
    "ParticleSource",
    "open_source",
    "read_stack_list",
    "ParticleDataset",
    "collate",
    "WorkerError",
    "ChunkShuffleBatchSampler",
    "SequentialBatchSampler",
    "IndexSubset",
    "make_loader",
    "ParticleLoader",
]

#: File name endings read as image stacks (case-insensitive).
STACK_SUFFIXES = (".mrcs", ".mrc", ".st")
_STAR_SUFFIXES = (".star",)
_LIST_SUFFIXES = (".txt",)
_CRYOSPARC_SUFFIXES = (".cs",)


@dataclass
class ParticleSource:
    """All particles of an input, in input order, with where each image lives.

    Attributes:
        path: the file the user gave (STAR, stack or list).
        kind: ``"star"``, ``"stack"``, ``"list"`` or ``"cryosparc"`` (a ``.cs`` file).
        stack_paths: the stack files, one entry per stack (``S`` of them).
        stack_lengths: ``(S,)`` int64, number of images in each stack.
        stack_index: ``(N,)`` int64, which stack holds particle ``i``.
        image_index: ``(N,)`` int64, 0-based image number of particle ``i``
            inside its stack (RELION's ``N@stack`` minus one).
        box: edge length of every image, in pixels.
        pixel_size: Angstrom per pixel, or ``None`` if nothing gives one.
        pixel_size_from: where ``pixel_size`` came from: ``"user"``,
            ``"star"``, ``"header"`` (the stack's MRC header) or ``"unknown"``.
        star: the particle STAR (rows in the same order as the particles; for a
            ``.cs`` file the STAR it converts to) or ``None`` for stacks and
            lists; use it to write results back.
    """

    path: Path
    kind: str
    stack_paths: list[Path]
    stack_lengths: np.ndarray
    stack_index: np.ndarray
    image_index: np.ndarray
    box: int
    pixel_size: float | None
    pixel_size_from: str
    star: ParticleStar | None = None

    def __len__(self) -> int:
        return int(self.stack_index.shape[0])

    @property
    def n_particles(self) -> int:
        """Number of particles ``N``."""
        return len(self)

    @property
    def n_stacks(self) -> int:
        """Number of distinct stack files ``S``."""
        return len(self.stack_paths)

    def storage_order(self) -> np.ndarray:
        """Particle indices sorted by (stack, image number): the on-disk order.

        Returns:
            ``(N,)`` int64 permutation of ``0..N-1``; reading particles in this
            order touches each stack once, front to back.
        """
        return np.lexsort((self.image_index, self.stack_index)).astype(np.int64)

    def missing_pixel_size(self) -> str | None:
        """Why the pixel size is unknown (where it was looked for), or ``None`` when it is known."""
        if self.pixel_size is not None:
            return None
        headers = "the MRC header gives" if self.n_stacks == 1 else "the MRC headers give"
        if self.kind == "cryosparc":
            return f"neither the .cs file (blob/psize_A) nor {headers} one"
        if self.kind == "star":
            return f"neither the STAR (rlnImagePixelSize, rlnPixelSize, rlnDetectorPixelSize/rlnMagnification) nor {headers} one"
        return "the MRC header of the stack gives none" if self.n_stacks == 1 else "the MRC headers of the stacks give none"

    def require_pixel_size(self) -> float:
        """The pixel size in Angstrom; a one-line error saying where it was looked for when unknown."""
        if self.pixel_size is None:
            raise InputFileError(f"the pixel size is unknown: {self.missing_pixel_size()}", self.path,
                                 "pass --pixel-size (Angstrom per pixel); infer needs it to write origins in Angstrom")
        return self.pixel_size

    def describe(self) -> str:
        """One line: what was opened, how many particles and stacks, box and pixel size."""
        apix = "unknown pixel size" if self.pixel_size is None else f"{self.pixel_size:g} A/px (from {self.pixel_size_from})"
        return (f"{self.path} ({self.kind}): {len(self)} particles in {self.n_stacks} stack(s), "
                f"{self.box}x{self.box} px, {apix}")


def read_stack_list(path: str | Path) -> list[Path]:
    """Read a ``.txt`` list of stack paths.

    One path per line; relative paths are relative to the list's folder; blank
    lines and lines starting with ``#`` are skipped.

    Returns:
        The stack paths in file order (not checked for existence).
    Raises:
        InputFileError: missing list or a list naming no stack.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError("stack list not found", path, "check the path")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputFileError("is not a text file", path, "a .txt input must list one stack path per line") from None
    stacks = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        stack = Path(entry).expanduser()
        stacks.append(stack if stack.is_absolute() else path.parent / stack)
    if not stacks:
        raise InputFileError("the stack list names no stacks", path, "write one .mrcs path per line")
    return stacks


def _open_headers(paths: Sequence[Path], listed_in: Path | None) -> list[MRCStack]:
    """Parse and check every stack's header (no descriptor is kept open); error for missing ones."""
    stacks = []
    for number, stack_path in enumerate(paths):
        if not stack_path.exists() and listed_in is not None:
            raise InputFileError(f"stack {stack_path} (entry {number + 1}) not found", listed_in,
                                 "fix the path in the list; relative paths are relative to the list's folder")
        stack = MRCStack(stack_path)  # validates header and file length; opens no descriptor
        stacks.append(stack)
    return stacks


def _common_box(stacks: Sequence[MRCStack], context: Path) -> int:
    """The box shared by all stacks; error naming the odd one out otherwise."""
    boxes = Counter(stack.box for stack in stacks)
    box = boxes.most_common(1)[0][0]
    if len(boxes) > 1:
        reference = next(s for s in stacks if s.box == box)
        odd = next(s for s in stacks if s.box != box)
        others = boxes[box] - 1
        holders = f"{context.name}'s stack {reference.path} " + ("holds" if others == 0 else f"and {others} other(s) hold")
        raise InputFileError(
            f"images are {odd.box}x{odd.box} px but {holders} {box}x{box} px images",
            odd.path,
            "all particles must share one box size: re-extract with one box or train on the stacks separately",
        )
    return box


def open_source(
    path: str | Path,
    datadir: str | Path | None = None,
    pixel_size: float | None = None,
) -> ParticleSource:
    """Open a STAR file, an image stack or a ``.txt`` list of stacks (headers only).

    Args:
        path: ``.star``, ``.mrcs``/``.mrc``/``.st``, ``.txt`` (one stack path per
            line) or a cryoSPARC ``.cs`` particle file.
        datadir: folder to look for the stacks named in a STAR's ``rlnImageName``
            (the command line's ``--stack-dir``); for a ``.cs`` file the cryoSPARC
            project folder that ``blob/path`` is relative to; ignored for stacks and lists.
        pixel_size: Angstrom per pixel; overrides the STAR and the MRC header.
    Returns:
        A :class:`ParticleSource` whose particles are in input order (STAR rows,
        or stack after stack, image after image).
    Raises:
        InputFileError: missing or truncated stack, STAR without
            ``rlnImageName``, different box sizes, an image number beyond the end
            of its stack, a box that disagrees with the STAR's ``rlnImageSize``,
            or an unrecognised file type.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if pixel_size is not None and not (pixel_size > 0 and math.isfinite(pixel_size)):
        raise InputFileError(f"pixel size {pixel_size} is not a positive number", path, "pass --pixel-size in Angstrom per pixel")
    if not path.exists():
        raise InputFileError("file not found", path, "check the path")
    star = None
    if suffix in _STAR_SUFFIXES:
        kind = "star"
        star = ParticleStar(path)
        if len(star) == 0:
            raise InputFileError("lists no particles", path, "give a particle STAR with at least one rlnImageName row")
        locations = star.image_locations(datadir)
        stacks = _open_headers(locations.stack_paths, None)
        stack_index = np.asarray(locations.stack_index, dtype=np.int64)
        image_index = np.asarray(locations.image_index, dtype=np.int64)
    elif suffix in _CRYOSPARC_SUFFIXES:
        from particle_vae.io.cryosparc import read_cryosparc_star, stack_not_found

        kind = "cryosparc"
        star = read_cryosparc_star(path, project_dir=datadir)
        try:
            locations = star.image_locations(None)  # the converted names are relative to the .cs file's folder
        except InputFileError as error:
            raise stack_not_found(star, datadir) or error from None
        stacks = _open_headers(locations.stack_paths, None)
        stack_index = np.asarray(locations.stack_index, dtype=np.int64)
        image_index = np.asarray(locations.image_index, dtype=np.int64)
    elif suffix in STACK_SUFFIXES:
        kind = "stack"
        stacks = _open_headers([path], None)
        stack_index = np.zeros(stacks[0].n_images, dtype=np.int64)
        image_index = np.arange(stacks[0].n_images, dtype=np.int64)
    elif suffix in _LIST_SUFFIXES:
        kind = "list"
        stacks = _open_headers(read_stack_list(path), path)
        lengths = [stack.n_images for stack in stacks]
        stack_index = np.repeat(np.arange(len(stacks), dtype=np.int64), lengths)
        image_index = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    else:
        raise InputFileError(
            f"unrecognised input type '{path.suffix}'", path,
            "give a particle .star file, a cryoSPARC particle .cs file, an .mrcs/.mrc stack or a .txt list of stacks",
        )
    box = _common_box(stacks, path)
    lengths = np.array([stack.n_images for stack in stacks], dtype=np.int64)
    if star is not None:
        _check_star_against_stacks(star, stacks, stack_index, image_index, box)

    if pixel_size is not None:
        apix, origin = float(pixel_size), "user"
        if star is not None:
            star.pixel_sizes()  # a bad pixel size in the STAR is an error all the same: outputs keep its optics
    else:
        apix = star.pixel_size() if star is not None else None
        origin = "star"
        if apix is None:
            apix, origin = _header_pixel_size(stacks)
    return ParticleSource(
        path=path, kind=kind, stack_paths=[s.path for s in stacks], stack_lengths=lengths,
        stack_index=stack_index, image_index=image_index, box=box, pixel_size=apix,
        pixel_size_from=origin, star=star,
    )


def _check_star_against_stacks(star: ParticleStar, stacks: Sequence[MRCStack], stack_index: np.ndarray,
                               image_index: np.ndarray, box: int) -> None:
    lengths = np.array([stack.n_images for stack in stacks], dtype=np.int64)
    beyond = np.flatnonzero(image_index >= lengths[stack_index])
    if beyond.size:
        row = int(beyond[0])
        stack = stacks[int(stack_index[row])]
        name = star.particles["rlnImageName"].iloc[row]
        raise InputFileError(
            f"particle {row} (rlnImageName {name}) asks for image {int(image_index[row]) + 1} but {stack.path} holds "
            f"{stack.n_images} images ({beyond.size} such particle(s))",
            star.path,
            "the STAR does not match its stacks: re-extract, or point --stack-dir at the right stacks",
        )
    sizes = star.column("rlnImageSize")
    if sizes is not None:
        sizes = np.unique(sizes.to_numpy(dtype=np.int64))
        if sizes.size and (sizes.size > 1 or int(sizes[0]) != box):
            raise InputFileError(
                f"rlnImageSize says {', '.join(str(int(s)) for s in sizes)} px but the stacks hold {box}x{box} px images",
                star.path,
                "use the STAR that was written with these stacks (or correct rlnImageSize)",
            )


def _header_pixel_size(stacks: Sequence[MRCStack]) -> tuple[float | None, str]:
    sizes = [(s.pixel_size, s.path) for s in stacks if s.pixel_size is not None]
    if not sizes:
        return None, "unknown"
    first, first_path = sizes[0]
    for value, stack_path in sizes[1:]:
        if not math.isclose(value, first, rel_tol=1e-3):
            raise InputFileError(
                f"MRC header pixel size {value:g} A differs from {first:g} A in {first_path}", stack_path,
                "pass --pixel-size to set the pixel size of all stacks",
            )
    return float(first), "header"


# --------------------------------------------------------------------------- dataset


class ParticleDataset(Dataset):
    """Lazily read particle images as float32 tensors.

    ``dataset[i]`` returns ``{"images": (1, box, box) float32, "index": int64
    scalar}``; ``dataset.__getitems__(indices)`` (called by a DataLoader with
    a batch sampler) returns one batch ``{"images": (B, 1, box, box),
    "index": (B,)}`` read with one grouped, contiguous-run read per stack.
    Pixel values are as stored in the stacks (no scaling) unless ``transform``
    is given.

    At most ``max_open_stacks`` stack files are open per process (least
    recently used closed first) and no pixels are cached. The dataset is
    pickle-safe: each DataLoader worker opens its own file descriptors. The
    pickled copy does not carry ``source.star`` (workers do not need it).

    Args:
        source: a :class:`ParticleSource`, or a path given to :func:`open_source`.
        datadir, pixel_size: passed to :func:`open_source` when ``source`` is a path.
        max_open_stacks: ``K``, the most stack files kept open at once.
        transform: optional callable applied to each batch tensor
            ``(B, 1, box, box) -> (B, 1, box', box')`` (e.g. a
            :class:`~particle_vae.data.preprocess.Preprocessing`), run inside the
            worker processes.
    Raises:
        InputFileError: from :func:`open_source`, and on reading an image that
            holds NaN or Inf values.
    """

    def __init__(
        self,
        source: ParticleSource | str | Path,
        datadir: str | Path | None = None,
        pixel_size: float | None = None,
        max_open_stacks: int = 16,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if not isinstance(source, ParticleSource):
            source = open_source(source, datadir=datadir, pixel_size=pixel_size)
        if int(max_open_stacks) < 1:
            raise ValueError(f"max_open_stacks must be >= 1, got {max_open_stacks}")
        self.source = source
        self.max_open_stacks = int(max_open_stacks)
        self.transform = transform
        self._open: OrderedDict[int, MRCStack] = OrderedDict()

    # -- properties -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source)

    @property
    def box(self) -> int:
        """Edge length of the stored images in pixels."""
        return self.source.box

    @property
    def pixel_size(self) -> float | None:
        """Angstrom per pixel of the stored images, or ``None``."""
        return self.source.pixel_size

    @property
    def n_open_stacks(self) -> int:
        """Stack files currently open in this process (``<= max_open_stacks``)."""
        return len(self._open)

    def storage_order(self) -> np.ndarray:
        """``(N,)`` particle indices in on-disk order; see :meth:`ParticleSource.storage_order`."""
        return self.source.storage_order()

    # -- pickling / resources -------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["source"] = dataclasses.replace(self.source, star=None)
        return state

    def close(self) -> None:
        """Close every open stack file (reading again reopens them)."""
        while self._open:
            _, stack = self._open.popitem(last=False)
            stack.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _stack(self, number: int) -> MRCStack:
        stack = self._open.get(number)
        if stack is not None:
            self._open.move_to_end(number)
            return stack
        stack = MRCStack(self.source.stack_paths[number])
        expected = int(self.source.stack_lengths[number])
        if stack.box != self.source.box or stack.n_images != expected:
            raise InputFileError(
                f"changed since it was opened: now {stack.n_images} images of {stack.box}x{stack.box} px, "
                f"was {expected} of {self.source.box}x{self.source.box}",
                stack.path, "restart with the current files",
            )
        self._open[number] = stack
        while len(self._open) > self.max_open_stacks:
            _, old = self._open.popitem(last=False)
            old.close()
        return stack

    # -- reading --------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Read particles by index, grouped per stack into contiguous runs.

        Args:
            indices: ``(B,)`` particle indices in ``[0, N)`` (any order, repeats allowed).
        Returns:
            ``(B, box, box)`` float32 numpy array in the order given.
        Raises:
            IndexError: an index outside ``[0, N)``.
            InputFileError: an image containing NaN or Inf (names stack and image).
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"particle index out of range for {n} particles")
        indices = np.where(indices < 0, indices + n, indices)
        box = self.source.box
        out = np.empty((indices.size, box, box), dtype=np.float32)
        if indices.size == 0:
            return out
        stack_of = self.source.stack_index[indices]
        image_of = self.source.image_index[indices]
        order = np.argsort(stack_of, kind="stable")
        bounds = np.flatnonzero(np.diff(stack_of[order])) + 1
        for group in np.split(order, bounds):
            number = int(stack_of[group[0]])
            block = self._stack(number).read_indices(image_of[group])
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                bad = int(np.flatnonzero(~finite)[0])
                raise InputFileError(
                    f"image {int(image_of[group[bad]]) + 1} (1-based; particle {int(indices[group[bad]])}) contains NaN or "
                    f"Inf pixel values",
                    self.source.stack_paths[number],
                    "remove that particle from the input or re-extract it",
                )
            if len(group) == indices.size:  # one stack: stable argsort kept the order, no copy needed
                return block
            out[group] = block
        return out

    def _batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(self.read(indices))[:, None]
        if self.transform is not None:
            images = self.transform(images)
        n = len(self)
        index = torch.from_numpy(np.where(indices < 0, indices + n, indices))
        return {"images": images, "index": index}

    def _fetch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        try:
            return self._batch(indices)
        except InputFileError as error:
            if get_worker_info() is None:
                raise
            # In a DataLoader worker: hand the one-line error to the main process
            # instead of letting PyTorch wrap it in a multi-line traceback.
            return WorkerError(message=str(error), path=None if error.path is None else str(error.path))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """One particle: ``{"images": (1, box, box) float32, "index": () int64}``.

        Inside a DataLoader worker a read error is returned as a :class:`WorkerError`
        (raised again in the main process) rather than raised.
        """
        batch = self._fetch(np.array([int(i)], dtype=np.int64))
        if isinstance(batch, WorkerError):
            return batch
        return {"images": batch["images"][0], "index": batch["index"][0]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A batch: ``{"images": (B, 1, box, box) float32, "index": (B,) int64}`` in the order given.

        Inside a DataLoader worker a read error is returned as a :class:`WorkerError`.
        """
        return self._fetch(np.asarray(indices, dtype=np.int64).reshape(-1))


class WorkerError(dict):
    """A batch that failed in a DataLoader worker, carrying the one-line error.

    PyTorch re-raises worker exceptions with the whole worker traceback in the
    message; instead the dataset returns this placeholder and the error is
    raised, unchanged, in the main process: by :class:`ParticleLoader` as soon as
    the batch arrives, or on the first key access (``batch["images"]``) with a
    plain DataLoader.
    """

    def error(self) -> InputFileError:
        """The original :class:`~particle_vae.errors.InputFileError` (same message and path)."""
        error = InputFileError(dict.get(self, "message", "a DataLoader worker failed"))
        path = dict.get(self, "path")
        error.path = None if path is None else Path(path)
        return error

    def __getitem__(self, key):
        raise self.error()


def collate(items: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DataLoader ``collate_fn`` for :class:`ParticleDataset`.

    Accepts either a batch already built by ``__getitems__`` (a dict whose
    ``index`` is 1-D, returned unchanged) or a list of per-particle dicts from
    ``__getitem__`` (stacked). A :class:`WorkerError` is passed through.

    Returns:
        ``{"images": (B, 1, box, box) float32, "index": (B,) int64}``.
    """
    if isinstance(items, WorkerError):
        return items
    if isinstance(items, dict):
        if items["index"].dim() == 1:
            return items
        return {"images": items["images"][None], "index": items["index"].reshape(1)}
    items = list(items)
    for item in items:
        if isinstance(item, WorkerError):
            return item
    if items and isinstance(items[0], dict) and items[0]["index"].dim() == 1:  # list of batches
        return {"images": torch.cat([b["images"] for b in items]), "index": torch.cat([b["index"] for b in items])}
    return {"images": torch.stack([item["images"] for item in items]),
            "index": torch.stack([item["index"] for item in items]).reshape(-1)}


# --------------------------------------------------------------------------- samplers


class ChunkShuffleBatchSampler(Sampler):
    """Shuffled training batches built from runs of consecutive stored images.

    The particles (in ``order``, by default ``0..N-1``; pass
    :meth:`ParticleDataset.storage_order` for on-disk order) are cut into
    chunks of ``chunk_size`` consecutive entries; each epoch the chunks are
    permuted with a generator seeded by ``(seed, epoch)`` and the result is cut
    into batches of ``batch_size``. Each batch therefore needs about
    ``batch_size / chunk_size`` contiguous reads instead of ``batch_size``
    scattered ones, while batches still mix particles from all over the input.
    Every index appears exactly once per epoch (unless ``drop_last`` drops the
    short final batch). Call :meth:`set_epoch` before each epoch.

    **Several ranks** (data-parallel training): with ``world_size = W > 1``,
    ``batch_size`` is the *global* batch. Every rank computes the same
    permutation and the same global batches and yields only its share: the
    ``rank``-th of ``W`` contiguous slices of each global batch (sizes differ by
    at most one). A rank's slice is therefore still made of runs of consecutive
    stored images, and the union of the ranks' ``t``-th batches is the ``t``-th
    batch of a single process with the same seed. A final global batch with
    fewer than ``W`` particles is skipped on every rank (a rank would
    otherwise have nothing to compute).

    Args:
        n: number of particles ``N`` (or a dataset).
        batch_size: particles per (global) batch ``B``.
        chunk_size: consecutive particles kept together (1 = fully random).
        seed: base seed; the order is a function of ``(seed, epoch)`` only.
        drop_last: drop the final batch when it has fewer than ``batch_size``.
        order: ``(N,)`` permutation of ``0..N-1`` defining "consecutive".
        rank, world_size: this process's rank and the number of processes.
    """

    def __init__(self, n: int | Dataset, batch_size: int, chunk_size: int = 16, seed: int = 0,
                 drop_last: bool = False, order: np.ndarray | None = None, rank: int = 0, world_size: int = 1):
        n = len(n) if not isinstance(n, (int, np.integer)) else int(n)
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1 (got {batch_size}, {chunk_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.n, self.batch_size, self.chunk_size = n, int(batch_size), int(chunk_size)
        self.seed, self.drop_last, self.epoch = int(seed), bool(drop_last), 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch = 0
        self.order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
        if self.order.shape != (n,):
            raise ValueError(f"order must have shape ({n},), got {self.order.shape}")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the permutation of epoch ``epoch`` (any non-negative integer).

        Args:
            start_batch: skip the first ``start_batch`` batches of the epoch
                (continuing an epoch that was interrupted after that many steps).
        """
        self.epoch = int(epoch)
        self.start_batch = max(int(start_batch), 0)

    def permutation(self) -> np.ndarray:
        """The ``(N,)`` particle order of the current epoch (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_chunks = -(-self.n // self.chunk_size)
        starts = rng.permutation(n_chunks) * self.chunk_size
        lengths = np.minimum(self.chunk_size, self.n - starts)
        positions = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        return self.order[positions]

    def _global_batches(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        if rest and not self.drop_last and rest >= self.world_size:
            return full + 1
        return full

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        for number in range(self.start_batch, self._global_batches()):
            batch = perm[number * self.batch_size:(number + 1) * self.batch_size]
            if self.world_size > 1:
                base, extra = divmod(len(batch), self.world_size)
                start = self.rank * base + min(self.rank, extra)
                batch = batch[start:start + base + (1 if self.rank < extra else 0)]
            yield batch.tolist()

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the same number on every rank)."""
        return max(self._global_batches() - self.start_batch, 0)


class SequentialBatchSampler(Sampler):
    """Batches ``[0..B), [B..2B), ...`` in input order, for inference and export.

    Args:
        n: number of particles ``N`` (or a dataset).
        batch_size: particles per batch ``B`` (the last batch may be shorter).
    """

    def __init__(self, n: int | Dataset, batch_size: int):
        n = len(n) if not isinstance(n, (int, np.integer)) else int(n)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size = n, int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        """No effect (the order never changes); present for a uniform interface."""

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.n)))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class IndexSubset(Dataset):
    """A view of some items of a dataset, held as one int64 array.

    Like ``torch.utils.data.Subset`` but without a Python list of indices (a
    1,000,000-particle training split is 8 MB here, and pickles to workers as
    one array), with batched reads passed through to ``__getitems__`` and an
    on-disk order for the chunk-shuffle sampler.

    Args:
        dataset: the underlying dataset (``ParticleDataset``, ``LabelledDataset``, ...).
        indices: ``(M,)`` positions in ``dataset``; item ``j`` of the view is
            item ``indices[j]`` of ``dataset``. Batches keep the underlying
            ``index`` (so CTF tables and STAR rows stay addressable).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray):
        self.dataset = dataset
        self.indices = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
            raise IndexError(f"subset indices must lie in [0, {len(dataset)})")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getattr__(self, name):  # box, pixel_size, source, ... of the wrapped dataset
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def storage_order(self) -> np.ndarray:
        """``(M,)`` positions of this view sorted by the underlying on-disk order.

        The underlying dataset's ``storage_order()`` when it has one, else its index order.
        """
        order_of = getattr(self.dataset, "storage_order", None)
        if order_of is None:
            return np.argsort(self.indices, kind="stable").astype(np.int64)
        rank = np.empty(len(self.dataset), dtype=np.int64)
        rank[order_of()] = np.arange(len(self.dataset), dtype=np.int64)
        return np.argsort(rank[self.indices], kind="stable").astype(np.int64)

    def __getitem__(self, j: int):
        return self.dataset[int(self.indices[int(j)])]

    def __getitems__(self, positions: Sequence[int]):
        chosen = self.indices[np.asarray(positions, dtype=np.int64)]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(chosen)
        return [self.dataset[int(i)] for i in chosen]


class ParticleLoader(DataLoader):
    """A DataLoader that raises a worker's read error as the original one-line
    :class:`~particle_vae.errors.InputFileError` (see :class:`WorkerError`)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().__iter__():
            if isinstance(batch, WorkerError):
                raise batch.error()
            yield batch


def make_loader(
    dataset: ParticleDataset | Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    chunk_size: int = 16,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> ParticleLoader:
    """A DataLoader yielding ``{"images": (B, 1, box, box), "index": (B,)}`` batches.

    ``shuffle=True`` uses :class:`ChunkShuffleBatchSampler` over the dataset's
    on-disk order (call ``loader.batch_sampler.set_epoch(epoch)`` each epoch);
    ``shuffle=False`` uses :class:`SequentialBatchSampler` (input order, for
    inference). Each batch is fetched with one ``__getitems__`` call in a worker;
    the loader never draws from the global torch random generator;
    a read error in a worker is raised in the main process as the original
    one-line InputFileError.

    Args:
        dataset: a :class:`ParticleDataset` (or a ``Subset`` of one).
        batch_size: ``B``; num_workers: worker processes (0 = main process).
        seed: sampler seed; chunk_size: consecutive particles read together.
        drop_last: drop a short final batch when shuffling.
        pin_memory, prefetch_factor, persistent_workers: passed to DataLoader.
        rank, world_size: with ``shuffle=True``, yield only this rank's share
            of each global batch of ``batch_size`` (see :class:`ChunkShuffleBatchSampler`).
    """
    if shuffle:
        order = dataset.storage_order() if hasattr(dataset, "storage_order") else None
        sampler: Sampler = ChunkShuffleBatchSampler(len(dataset), batch_size, chunk_size=chunk_size, seed=seed,
                                                    drop_last=drop_last, order=order, rank=rank, world_size=world_size)
    else:
        sampler = SequentialBatchSampler(len(dataset), batch_size)
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    # The loader's own generator (it seeds the workers) keeps DataLoader from drawing from the global
    # torch RNG each time an iterator starts, so that a run resumed inside an epoch samples exactly
    # as one that was not interrupted.
    generator = torch.Generator().manual_seed(int(seed))
    return ParticleLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                          pin_memory=pin_memory, generator=generator, **extra)
