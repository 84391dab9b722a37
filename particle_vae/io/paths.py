"""Where reference data lives: ``$PARTICLE_VAE_DATA`` or an explicit path."""

from __future__ import annotations

import os
from pathlib import Path

from particle_vae.errors import InputFileError

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
