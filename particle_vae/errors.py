"""User-facing errors.

Every problem a user can fix (a missing stack, a truncated MRC, a STAR file
without ``rlnImageName``) raises :class:`ParticleVAEError` with a one-line
message that names the file and says what to do. The command-line entry point
prints that line and exits with :data:`EXIT_USER_ERROR`, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class ParticleVAEError(Exception):
    """An error caused by input or settings, explained in one line."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{path}:")
        parts.append(message.rstrip("."))
        text = " ".join(parts)
        if fix:
            text += f"; {fix.rstrip('.')}"
        super().__init__(" ".join(text.split()))
        self.path = None if path is None else Path(path)


class InputFileError(ParticleVAEError):
    """A file the user gave is missing, unreadable or malformed."""


class OutputFileError(ParticleVAEError):
    """An output could not be written (or would overwrite an input)."""
