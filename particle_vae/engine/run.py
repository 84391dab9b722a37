"""A run directory: config, metrics log, checkpoints, written atomically.

Layout::

    RUN/config.json          model + training + data settings (rebuilds everything)
    RUN/metrics.jsonl        one JSON object per finished epoch
    RUN/train.log            the log
    RUN/checkpoints/last.pt  state after the last finished epoch (resumable)
    RUN/checkpoints/best.pt  learnable parameters at the best validation ELBO

config.json carries a ``schema_version`` and is read through
:class:`~particle_vae.engine.run_config.RunConfig` (older versions migrated,
unknown keys refused in one line). Checkpoints are loaded with
``torch.load(..., weights_only=True)`` (:func:`load_checkpoint_file`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from particle_vae.engine.run_config import RunConfig
from particle_vae.errors import OutputFileError, ParticleVAEError
from particle_vae.io.atomic import atomic_path, atomic_write_text, folder_problem, remove_stale_temporaries

log = logging.getLogger(__name__)


class RunDirectory:
    """Paths and atomic I/O for one training run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    log_path = property(lambda self: self.path / "train.log")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.checkpoint_dir / "last.pt")
    best_checkpoint = property(lambda self: self.checkpoint_dir / "best.pt")

    def create(self, overwrite: bool = False) -> None:
        """Make the folder; refuse to reuse one holding a run unless ``overwrite``."""
        if self.config_path.exists() and not overwrite:
            if not self.last_checkpoint.exists():
                raise OutputFileError("already holds a training run without a checkpoint (stopped in, or still in, its first epoch)",
                                      self.path, "pass --overwrite to start it again, or another --out")
            raise OutputFileError("already holds a training run", self.path, "pass --resume to continue it, --overwrite to start again, or another --out")
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputFileError(f"cannot create the run directory ({folder_problem(self.checkpoint_dir, exc)})", self.path,
                                  "choose another --out") from None
        if overwrite:
            for stale in (self.metrics_path, self.last_checkpoint, self.best_checkpoint):
                stale.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporaries (``.last.pt.<pid>.tmp`` and the like) that a killed run left
        beside the config, metrics and checkpoints; a live writer's are kept.

        Returns:
            The files removed.
        """
        removed = []
        for path in (self.config_path, self.metrics_path, self.last_checkpoint, self.best_checkpoint):
            removed += remove_stale_temporaries(path)
        return removed

    def write_config(self, config: dict | RunConfig) -> None:
        """Write config.json (atomically) at the current schema version.

        Args:
            config: a :class:`RunConfig`, or its content as a dict (this program's own,
                at the current version: checked, not migrated).
        Raises:
            InputFileError: an unknown or missing key (see :mod:`particle_vae.engine.run_config`).
        """
        if not isinstance(config, RunConfig):
            config = RunConfig.from_dict(config, self.config_path, current=True)
        atomic_write_text(self.config_path, config.to_json())

    def read_run_config(self) -> RunConfig:
        """config.json, migrated to the current schema version and checked.

        Raises:
            ParticleVAEError: no config.json (not a run directory), or a one-line
                problem with its content (unreadable, unknown key, newer version).
        """
        if not self.config_path.exists():
            raise ParticleVAEError(f"{self.path}: not a particle-vae run directory (no config.json); give the folder written by particle-vae train")
        return RunConfig.read(self.config_path)

    def read_config(self) -> dict:
        """config.json as a dict (``config["model"]["zdim"]`` ...), migrated and checked
        as :meth:`read_run_config` does; its ``schema_version`` is the current one."""
        return self.read_run_config().to_dict()

    def read_metrics(self) -> list[dict]:
        """One dict per epoch line. A last line cut off mid-write (training killed
        while appending it) is dropped with a warning; a damaged line before it is an error."""
        if not self.metrics_path.exists():
            return []
        lines = [(number, line) for number, line in enumerate(
            self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1) if line.strip()]
        rows = []
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif number == lines[-1][0]:
                log.warning("%s: ignoring its last line (%d), cut off mid-write when training stopped", self.metrics_path, number)
            else:
                raise ParticleVAEError(f"{self.metrics_path}: line {number} is not a JSON object of epoch metrics; "
                                       "delete that line (the checkpoints are unaffected)")
        return rows

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows))

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def save_checkpoint(self, path: Path, state: dict) -> None:
        """``torch.save`` to a temporary file, then rename: never a half-written checkpoint."""
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def require_checkpoint(self) -> None:
        """A one-line error unless the run has a checkpoint (``last.pt``, written at the end of every epoch)."""
        if not self.last_checkpoint.exists():
            raise ParticleVAEError(f"{self.path}: no checkpoint yet (one is written at the end of every epoch and this run "
                                   f"has not finished its first); if its training was stopped, start it again with "
                                   f"particle-vae train ... --out {self.path} --overwrite")

    def load_checkpoint(self, which: str = "best") -> dict:
        """A checkpoint's content, loaded with ``torch.load(..., weights_only=True)``.

        Args:
            which: ``"best"`` (falls back to ``last.pt`` when there is no ``best.pt``) or ``"last"``.
        Raises:
            ParticleVAEError: no checkpoint yet, or a foreign or damaged file.
        """
        path = self.best_checkpoint if which == "best" else self.last_checkpoint
        if not path.exists() and which == "best":
            path = self.last_checkpoint
        if not path.exists():
            self.require_checkpoint()
        try:
            return load_checkpoint_file(path)
        except Exception as exc:  # a foreign or damaged file
            raise ParticleVAEError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}); retrain or restore it") from None


def _legacy_numpy_globals() -> list:
    """The numpy objects that ``np.random.get_state()`` pickles as: an array's rebuild function,
    ``ndarray``, ``dtype`` and the uint32 dtype's class; with torch 2.6 or newer also the rebuild
    function under both its numpy 1 and numpy 2 module names (a file written with the other numpy)."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    names = []
    if tuple(int(part) for part in torch.__version__.split(".")[:2] if part.isdigit()) >= (2, 6):
        names = [(reconstruct, f"{module}.multiarray._reconstruct") for module in ("numpy.core", "numpy._core")]
    return [reconstruct, *names, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint_file(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, also for checkpoints written before
    schema version 1.

    Checkpoints of this version hold only tensors, numbers, strings, lists and dicts (the
    trainer stores the numpy and Python random states as tensors and numbers). A ``last.pt``
    written before (schema version 0) holds ``np.random.get_state()`` as it is: a tuple with a
    uint32 numpy array. For it the load is retried with an allowlist of exactly the numpy
    globals that rebuild such an array (``torch.serialization.safe_globals``, scoped to this
    call; torch 2.5 or newer) rather than with ``weights_only=False``: these globals only build
    arrays, whose items stay under the weights_only rules, so a foreign file still cannot run
    code; and the retry needs no knowledge of the run's schema version (a version-0 run resumed
    by this program keeps its old ``last.pt`` until its next epoch ends, while its config.json
    may already have been rewritten at version 1).

    Raises:
        Whatever ``torch.load`` raises for a foreign or damaged file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not hasattr(torch.serialization, "safe_globals"):
            raise
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
