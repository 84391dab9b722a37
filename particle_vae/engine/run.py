"""A run directory: config, metrics log, checkpoints, written atomically.

Layout::

    RUN/config.json          model + training + data settings (rebuilds everything)
    RUN/metrics.jsonl        one JSON object per finished epoch
    RUN/train.log            the log
    RUN/checkpoints/last.pt  state after the last finished epoch (resumable)
    RUN/checkpoints/best.pt  learnable parameters at the best validation ELBO
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from particle_vae.errors import OutputFileError, ParticleVAEError
from particle_vae.io.atomic import atomic_path, atomic_write_text


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
            raise OutputFileError("already holds a training run", self.path, "pass --resume to continue it, --overwrite to start again, or another --out")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in (self.metrics_path, self.last_checkpoint, self.best_checkpoint):
                stale.unlink(missing_ok=True)

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=False) + "\n")

    def read_config(self) -> dict:
        if not self.config_path.exists():
            raise ParticleVAEError(f"{self.path}: not a particle-vae run directory (no config.json); give the folder written by particle-vae train")
        return json.loads(self.config_path.read_text())

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

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

    def load_checkpoint(self, which: str = "best") -> dict:
        path = self.best_checkpoint if which == "best" else self.last_checkpoint
        if not path.exists() and which == "best":
            path = self.last_checkpoint
        if not path.exists():
            raise ParticleVAEError(f"{self.path}: no checkpoint yet (expected {path.name}); train at least one epoch")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a foreign or damaged file
            raise ParticleVAEError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}); retrain or restore it") from None
