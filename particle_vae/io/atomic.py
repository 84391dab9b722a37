"""Atomic file output: write next to the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from particle_vae.errors import OutputFileError


def check_output_path(path: str | Path, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Refuse to write over an input file, or over an existing file unless ``overwrite``.

    Returns:
        The output path, with its parent folder created.
    """
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        if source is not None and Path(source).resolve() == resolved:
            raise OutputFileError("is an input of this command and would be overwritten", path, "choose another output name")
    if path.exists() and not overwrite:
        raise OutputFileError("already exists", path, "choose another output name or pass --overwrite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFileError(f"cannot create its folder ({folder_problem(path.parent, exc)})", path,
                              "choose an output in a folder you can write to") from None
    return path


def folder_problem(folder: str | Path, error: OSError) -> str:
    """Why ``folder`` could not be created, in words: the part of the path that is a
    file rather than a folder when there is one, else the system's reason."""
    for parent in (Path(folder), *Path(folder).parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    return error.strerror or str(error)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
