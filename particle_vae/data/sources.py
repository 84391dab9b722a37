"""Particle sources: what the user points the program at, opened as one index over all particles.

A *source* is:

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
input order. Reading the images is
:class:`particle_vae.data.particles.ParticleDataset`'s job.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from particle_vae.errors import InputFileError
from particle_vae.io.mrc import MRCStack
from particle_vae.io.star import ParticleStar

__all__ = ["STACK_SUFFIXES", "ParticleSource", "open_source", "read_stack_list"]

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
