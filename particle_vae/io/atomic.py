"""Atomic file output: write next to the target, then rename over it.

A temporary file is named ``.<target name>.<pid>.tmp`` and sits beside its
target. A process killed while writing leaves it behind; the next command that
checks or writes the same target removes the temporaries of that target whose
writing process has ended (:func:`remove_stale_temporaries`), so they do not pile up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from particle_vae.errors import OutputFileError

log = logging.getLogger(__name__)

_PID_RE = re.compile(r"[0-9]{1,10}")
#: seconds of slack when comparing a process's start time (whole seconds from /proc) with a file's mtime
_START_TIME_SLACK_S = 2.0


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
    remove_stale_temporaries(path)
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


def temporary_path(path: str | Path) -> Path:
    """The temporary file this process writes ``path`` through: ``.<name>.<pid>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, seconds since the epoch (Linux ``/proc``; ``None`` elsewhere or unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot_line = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        # the fields after the command name, which may itself hold spaces and parentheses; starttime is field 22
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return int(boot_line.split()[1]) + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_has_ended(pid: int, modified: float) -> bool:
    """True when the process that wrote a temporary file has certainly ended.

    Args:
        pid: the writer's process id, from the file name.
        modified: the file's last modification time, seconds since the epoch.

    The writer has ended when no process ``pid`` exists, or when the process now
    holding that id started after the file was last written (the id was reused).
    This process, and anything in doubt (no POSIX signals, an id beyond the
    system's range), counts as still writing.
    """
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        pass
    except (OSError, OverflowError):
        return False
    started = _process_start_time(pid)
    return started is not None and started > modified + _START_TIME_SLACK_S


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of ``path`` (``.<name>.<pid>.tmp`` beside it) whose writer has ended.

    Only files of exactly that pattern are touched, and only when
    :func:`writer_has_ended`: a run still writing the same target keeps its file.

    Returns:
        The files removed.
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        entries = [entry for entry in os.scandir(path.parent) if entry.name.startswith(prefix) and entry.name.endswith(".tmp")]
    except OSError:
        return []
    removed = []
    for entry in entries:
        pid_text = entry.name[len(prefix):-len(".tmp")]
        if not _PID_RE.fullmatch(pid_text):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if writer_has_ended(int(pid_text), entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    for stale in removed:
        log.info("removed %s, left by an interrupted run (process %s has ended)", stale, stale.name[len(prefix):-len(".tmp")])
    return removed


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk, so that a rename after it cannot expose a file still
    in the page cache after a power loss (a no-op off POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | Path) -> None:
    """Flush ``folder``'s entries (the renames into it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    On error the temporary file is removed and ``path`` is left untouched.
    Temporaries of ``path`` left by ended processes are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
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


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[tuple[Path, ...]]:
    """Yield one temporary path beside each of ``paths``; on success flush every
    temporary to the disk, then rename them into place in the order given.

    The last rename is the commit point: a process killed before it leaves the
    last target as it was, and everything renamed before it already complete.
    Callers order ``paths`` so that the file readers start from comes last (and
    tie the files together so that a reader can tell a mix of old and new; see
    :mod:`particle_vae.io.infer_pair`). On an error the temporaries are removed.
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        remove_stale_temporaries(target)
    temporaries = tuple(temporary_path(target) for target in targets)
    try:
        yield temporaries
        for tmp in temporaries:
            fsync_file(tmp)
        for tmp, target in zip(temporaries, targets):
            os.replace(tmp, target)
        for folder in dict.fromkeys(target.parent for target in targets):
            fsync_folder(folder)
    except BaseException:
        for tmp in temporaries:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
