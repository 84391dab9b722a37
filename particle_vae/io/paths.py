"""Where files live: reference data (``$PARTICLE_VAE_DATA`` or an explicit path), and the
project folder that ``rlnImageName`` in written STAR files resolves from (as RELION resolves it)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from particle_vae.errors import InputFileError

log = logging.getLogger(__name__)

DATA_ENV = "PARTICLE_VAE_DATA"


def data_root(explicit: str | Path | None = None, required: bool = True) -> Path | None:
    """The reference-data folder (holding ``mnist/``, ``structures/``, ``cryoem/``).

    Args:
        explicit: a path given on the command line; wins over the environment.
        required: raise when nothing is configured (otherwise return ``None``).
    """
    value = explicit or os.environ.get(DATA_ENV)
    if not value:
        if required:
            raise InputFileError("no reference-data folder given", None, f"pass --data-dir or set {DATA_ENV} (for example to ../shared/data)")
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise InputFileError("reference-data folder not found", root, f"pass --data-dir or set {DATA_ENV} to an existing folder")
    return root


# --------------------------------------------------------------------------- the project folder
#
# RELION opens every rlnImageName relative to the folder it runs in (the project
# folder), never relative to the STAR's own folder. A STAR that RELION is to read
# from anywhere in a project therefore names its stacks relative to the project
# folder, or absolutely for stacks outside it.


def project_folder(explicit: str | Path | None = None) -> Path:
    """The project folder that written ``rlnImageName`` values resolve from, as an absolute path.

    Args:
        explicit: ``--project-dir`` from the command line; ``None``: the current folder.
    Raises:
        InputFileError: ``explicit`` is not an existing folder.
    """
    if explicit is None:
        return Path.cwd()
    folder = Path(os.path.abspath(Path(explicit).expanduser()))
    if not folder.is_dir():
        raise InputFileError("project folder not found", explicit,
                             "pass --project-dir with the folder RELION runs in (the one holding its job folders)")
    return folder


def stack_name_for_project(stack: str | Path, project: str | Path) -> str:
    """How ``rlnImageName`` names the stack file ``stack`` so that RELION, run in ``project``, opens it.

    Returns:
        The path relative to ``project`` (``/`` separators) when the stack lies
        inside it (also when only the symlink-resolved paths show that), else the
        stack's absolute path.
    """
    stack_path = Path(os.path.abspath(stack))
    project_path = Path(os.path.abspath(project))
    for inner, outer in ((stack_path, project_path), (stack_path.resolve(), project_path.resolve())):
        try:
            return inner.relative_to(outer).as_posix()
        except ValueError:
            continue
    return stack_path.as_posix()


def opens_from(stack_name: str, folder: str | Path, stack: str | Path | None = None) -> bool:
    """Whether the stack path of an ``rlnImageName`` (the part after ``@``), opened from ``folder``
    as RELION opens it, is an existing file (and, given ``stack``, that very file)."""
    name = Path(stack_name.strip())
    candidate = name if name.is_absolute() else Path(folder) / name
    if not candidate.is_file():
        return False
    if stack is None:
        return True
    try:
        return os.path.samefile(candidate, stack)
    except OSError:
        return False


def stacks_not_found_from(image_names: Iterable[str], folder: str | Path) -> list[str]:
    """The distinct stack paths of ``image_names`` (``N@stack`` values, in order of first
    appearance) that do not open from ``folder`` as RELION opens them.

    ``stacks_not_found_from(names, Path.cwd())`` lists what ``relion_stack_create --i STAR``
    run in the current folder would fail on; names without ``@`` are taken as stack paths.
    """
    stacks = dict.fromkeys(str(name).split("@", 1)[-1].strip() for name in image_names)
    return [stack for stack in stacks if not opens_from(stack, folder)]


def find_project_folder(star_path: str | Path, image_names: Iterable[str], levels: int = 4) -> Path | None:
    """The nearest folder above a STAR's own from which every stack it names opens, as RELION run there
    would open them: the project folder of a STAR in ``Job/jobNNN/`` whose names are project-relative.

    Args:
        star_path: the STAR file; image_names: its ``rlnImageName`` values.
        levels: how many folders above the STAR's own are tried.
    Returns:
        The folder, or ``None`` when no folder within ``levels`` opens them all.
    """
    folder = Path(os.path.abspath(star_path)).parent
    stacks = list(dict.fromkeys(str(name).split("@", 1)[-1].strip() for name in image_names))
    for candidate in list(folder.parents)[:levels]:
        if stacks and all(opens_from(stack, candidate) for stack in stacks):
            return candidate
    return None


def project_image_names(image_names: Sequence[str], stack_paths: Sequence[Path], stack_index: np.ndarray,
                        project: str | Path) -> np.ndarray | None:
    """``rlnImageName`` values that RELION, run in ``project``, resolves to the stacks found for them.

    A relative name whose stack already opens from ``project`` as the same file
    is kept as it is (a RELION project's own layout), and so is an absolute one
    for a stack outside ``project``; the others get the stack's name from
    :func:`stack_name_for_project` (relative inside ``project``, absolute
    outside it), with their image number unchanged.

    Args:
        image_names: ``(N,)`` ``N@stack`` strings as read.
        stack_paths: ``(S,)`` the stack files the reader found; stack_index: ``(N,)`` int, into ``stack_paths``.
        project: the project folder.
    Returns:
        ``(N,)`` object array of names, or ``None`` when every name already resolves from ``project``.
    """
    names = np.asarray(image_names, dtype=object)
    stack_index = np.asarray(stack_index, dtype=np.int64)
    out = names.copy()
    changed = False
    order = np.argsort(stack_index, kind="stable")  # rows grouped by stack: one pass, also for thousands of stacks
    starts = np.searchsorted(stack_index[order], np.arange(len(stack_paths) + 1))
    for number, stack in enumerate(stack_paths):
        rows = order[starts[number]:starts[number + 1]]
        if rows.size == 0:
            continue
        written = str(names[rows[0]]).split("@", 1)[1].strip()
        new_stack = stack_name_for_project(stack, project)
        if opens_from(written, project, stack) and (not Path(written).is_absolute() or Path(new_stack).is_absolute()):
            continue
        out[rows] = [str(name).split("@", 1)[0].strip() + "@" + new_stack for name in names[rows]]
        changed = True
    return out if changed else None


def project_names_for_source(source, project: str | Path) -> dict[str, np.ndarray]:
    """``{"rlnImageName": names}`` for a particle source read from a STAR (:func:`project_image_names`),
    or ``{}`` when its names already resolve from ``project``."""
    names = source.star.particles["rlnImageName"].astype(str).to_numpy()
    new = project_image_names(names, source.stack_paths, source.stack_index, project)
    return {} if new is None else {"rlnImageName": new}


def project_names_for_star(star_path: str | Path, project: str | Path, datadir: str | Path | None = None,
                           source=None) -> dict[str, np.ndarray]:
    """:func:`project_names_for_source` for a STAR file, opening it (headers only) when ``source`` is not
    given. Without ``datadir``, stacks not found beside the STAR or from the current folder are looked
    for from ``project``, then from the folders above the STAR's (:func:`find_project_folder`: a STAR
    written for a project, read from elsewhere); when they cannot be found the names are kept, with a warning."""
    if source is None:
        from particle_vae.data.sources import open_source
        from particle_vae.errors import ParticleVAEError

        try:
            source = open_source(star_path, datadir=datadir)
        except ParticleVAEError as error:
            source = None
            if datadir is None:
                for folder in (project, _star_project_folder(star_path)):
                    try:
                        source = open_source(star_path, datadir=folder) if folder is not None else None
                    except ParticleVAEError:
                        continue
                    if source is not None:
                        break
            if source is None:
                log.warning("rlnImageName kept as it is (stacks not checked: %s)", error)
                return {}
    return project_names_for_source(source, project)


def _star_project_folder(star_path: str | Path) -> Path | None:
    """:func:`find_project_folder` for a STAR file (``None`` when it cannot be read)."""
    from particle_vae.errors import ParticleVAEError
    from particle_vae.io.star import ParticleStar

    try:
        names = ParticleStar(star_path).particles["rlnImageName"].astype(str)
    except ParticleVAEError:
        return None
    return find_project_folder(star_path, names)
