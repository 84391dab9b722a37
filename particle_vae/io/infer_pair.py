"""The STAR and the ``.npz`` that ``infer`` writes, kept as a pair.

``infer`` writes ``OUT.star`` and ``OUT.npz`` through :func:`write_pair`: both
go to temporaries in the output folder, are flushed to the disk, and are renamed
into place, the ``.npz`` first and the STAR last. A random pair id ties them
together: the STAR's first line is a comment ``# particle-vae infer pair <id> ...``
and the ``.npz`` holds the same id under ``pair_id``.

What a kill at any point leaves:

* before the first rename: the old pair (or nothing), untouched;
* between the two renames: the old STAR beside the new ``.npz``. The ids
  differ, and every reader says so in one line (:func:`check_pair`);
* after the second rename: the new pair.

A STAR therefore never sits beside an older ``.npz`` than its own, nor without
its ``.npz``, unless someone moved or copied files. Temporaries left by a
killed run are removed when the same output is written again
(:func:`particle_vae.io.atomic.remove_stale_temporaries`).

The STAR parsers skip comments, so the pair id is not carried into STARs
written from this one (``select``, ``analyze``, the napari plugin); those
are not paired with any ``.npz``.
"""

from __future__ import annotations

import re
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from particle_vae.errors import InputFileError
from particle_vae.io.atomic import atomic_paths, check_output_path
from particle_vae.io.star import StarFile, format_star

#: the ``.npz`` key holding the pair id
PAIR_ID_KEY = "pair_id"

_MARKER_RE = re.compile(r"^# particle-vae infer pair ([0-9a-f]{32})\b")
#: bytes of the STAR read to find the pair id (it is the first line)
_HEADER_BYTES = 4096

FIX_REINFER = "rerun particle-vae infer (with --overwrite) to write a matching STAR and .npz"


def npz_path_for(star_path: str | Path) -> Path:
    """The ``.npz`` that belongs beside ``star_path`` (same name, suffix ``.npz``)."""
    return Path(star_path).with_suffix(".npz")


def write_pair(star: StarFile, star_path: str | Path, arrays: Mapping[str, object], npz_path: str | Path | None = None) -> str:
    """Write ``star`` to ``star_path`` and ``arrays`` to ``npz_path`` as a pair (see the module docstring).

    Args:
        star: the blocks to write; the file it was read from is never overwritten.
        arrays: name -> array (or scalar) for ``numpy.savez``; ``pair_id`` is added.
        npz_path: default :func:`npz_path_for` ``(star_path)``.

    Returns:
        The pair id, 32 hexadecimal digits.
    """
    star_path = Path(star_path)
    npz_path = npz_path_for(star_path) if npz_path is None else Path(npz_path)
    check_output_path(star_path, overwrite=True, inputs=(star.path,))
    pair_id = uuid.uuid4().hex
    text = (f"# particle-vae infer pair {pair_id}: {npz_path.name} beside this file holds the same pair_id\n"
            + format_star(star.blocks))
    # the STAR comes last: readers start from it, so it is the commit point
    with atomic_paths(npz_path, star_path) as (npz_tmp, star_tmp):
        with open(npz_tmp, "wb") as handle:
            np.savez(handle, **arrays, **{PAIR_ID_KEY: np.array(pair_id)})
        with open(star_tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return pair_id


def star_pair_id(star_path: str | Path) -> str | None:
    """The pair id in ``star_path``'s header comments, ``None`` when it has none (not written by ``infer``)."""
    try:
        with open(star_path, "rb") as handle:
            head = handle.read(_HEADER_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in head.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return None
        match = _MARKER_RE.match(stripped)
        if match:
            return match.group(1)
    return None


def npz_pair_id(npz_path: str | Path) -> str | None:
    """The pair id stored in ``npz_path``, ``None`` when it holds none.

    Raises:
        InputFileError: the file cannot be read as an ``.npz``.
    """
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            return str(npz[PAIR_ID_KEY][()]) if PAIR_ID_KEY in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputFileError(f"cannot be read as an .npz ({type(exc).__name__})", npz_path, FIX_REINFER) from None


def pair_problem(star_path: str | Path) -> tuple[str, str] | None:
    """What is wrong with ``star_path`` and the ``.npz`` beside it, if anything.

    Returns:
        ``None`` when they are a pair, or when neither carries a pair id (not
        written by ``infer``, or by an older version); otherwise ``(kind, message)``
        with kind ``"missing"`` (the STAR alone is complete) or ``"mismatch"``
        and a one-line message naming the files and the fix.
    """
    star_path = Path(star_path)
    npz_path = npz_path_for(star_path)
    star_id = star_pair_id(star_path)
    if not npz_path.exists():
        if star_id is None:
            return None
        return "missing", str(InputFileError(f"was written by infer together with {npz_path.name}, which is not beside it",
                                             star_path, f"put {npz_path.name} back beside it, or {FIX_REINFER}"))
    try:
        npz_id = npz_pair_id(npz_path)
    except InputFileError as unreadable:
        return ("mismatch", str(unreadable)) if star_id is not None else None
    if star_id == npz_id:
        return None
    return "mismatch", str(InputFileError(
        f"does not belong with {npz_path.name} beside it (they come from different infer runs: infer was stopped while "
        "replacing the pair, or one file was copied over)", star_path, FIX_REINFER))


def check_pair(star_path: str | Path, allow_missing_npz: bool = False) -> str | None:
    """Refuse a STAR whose ``.npz`` beside it is from another ``infer`` run.

    Args:
        allow_missing_npz: for readers that use the STAR alone: a missing
            ``.npz`` is then returned as a one-line warning instead of raised.

    Returns:
        ``None``, or the warning when the ``.npz`` is missing and that is allowed.

    Raises:
        InputFileError: the files are mismatched, or the ``.npz`` is missing
            and not allowed to be.
    """
    problem = pair_problem(star_path)
    if problem is None:
        return None
    kind, message = problem
    if kind == "missing" and allow_missing_npz:
        return message
    raise InputFileError(message)


def load_pair_npz(star_path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` beside ``star_path`` after checking that the two are a pair.

    Raises:
        InputFileError: the ``.npz`` is missing, unreadable or from another ``infer`` run.
    """
    npz_path = npz_path_for(star_path)
    if not npz_path.exists():
        raise InputFileError(f"no {npz_path.name} beside it", star_path, f"put it back, or {FIX_REINFER}")
    check_pair(star_path)
    with np.load(npz_path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files if key != PAIR_ID_KEY}
