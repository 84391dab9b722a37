"""The training loop shared by every model.

Adam; learning-rate halving when the validation ELBO stops improving; early
stopping; a held-out validation split drawn from the training data with the
run's seed; bf16 autocast and channels-last on CUDA; a checkpoint after every
epoch written atomically, from which ``--resume`` continues exactly (model,
optimiser, scheduler, random-number states and data order are all restored).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from particle_vae.data.particles import make_loader
from particle_vae.engine.device import resolve_device
from particle_vae.engine.run import RunDirectory
from particle_vae.errors import ParticleVAEError
from particle_vae.models.base import PoseVAE, learnable_state, load_learnable_state

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 7919


@dataclass
class TrainSettings:
    """Optimisation settings (all recorded in the run's config.json).

    Attributes:
        epochs: maximum number of epochs.
        batch_size: images per step.
        lr: Adam learning rate.
        val_fraction: share of the training data held out for validation.
        lr_patience: epochs without validation improvement before halving the rate.
        min_lr: the rate is never halved below this.
        early_stop_patience: epochs without improvement before stopping (0: never).
        seed: seeds the split, the data order, the model's initialisation and sampling.
        num_workers: DataLoader worker processes.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        bf16: bf16 autocast on CUDA (ignored on CPU).
        channels_last: channels-last memory format on CUDA.
    """

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-4
    val_fraction: float = 0.1
    lr_patience: int = 3
    min_lr: float = 1e-6
    early_stop_patience: int = 10
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    bf16: bool = True
    channels_last: bool = True


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``range(n)``, both sorted (on-disk order).

    Returns:
        ``(train (n - m,), val (m,))`` int64 with ``m = round(val_fraction * n)``
        (at least 1 when ``val_fraction > 0`` and ``n >= 2``).
    """
    if not 0 <= val_fraction < 1:
        raise ParticleVAEError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains a :class:`PoseVAE` on a dataset yielding ``{"images", "index"}`` batches.

    Args:
        model: the model (its parameters are trained in place).
        dataset: a dataset with ``__getitems__`` (ParticleDataset, ArrayDataset).
        settings: :class:`TrainSettings`.
        run: the run directory (config must already be written).
        ctf_for: optional callable ``index (B,) -> CTF (B, N, N//2+1)`` for
            CTF-aware likelihoods.
    """

    def __init__(self, model: PoseVAE, dataset: Dataset, settings: TrainSettings, run: RunDirectory, ctf_for=None):
        self.model, self.dataset, self.settings, self.run = model, dataset, settings, run
        self.ctf_for = ctf_for
        self.takes_labels = "labels" in inspect.signature(model.loss).parameters
        self.device = resolve_device(settings.device)
        self.cuda = self.device.type == "cuda"
        self.model.to(self.device)
        if self.cuda and settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_idx, self.val_idx = split_indices(len(dataset), settings.val_fraction, settings.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=0.5, patience=settings.lr_patience, min_lr=settings.min_lr)
        self.train_loader = make_loader(Subset(dataset, self.train_idx.tolist()), settings.batch_size, shuffle=True,
                                        num_workers=settings.num_workers, seed=settings.seed,
                                        pin_memory=self.cuda, persistent_workers=settings.num_workers > 0)
        self.val_loader = (make_loader(Subset(dataset, self.val_idx.tolist()), settings.batch_size, shuffle=False,
                                       num_workers=settings.num_workers, pin_memory=self.cuda)
                           if len(self.val_idx) else None)
        self.start_epoch = 0
        self.best_val = -math.inf
        self.stale_epochs = 0

    # -- state ---------------------------------------------------------------
    def resume(self) -> None:
        """Restore the state saved after the last finished epoch."""
        state = self.run.load_checkpoint("last")
        load_learnable_state(self.model, state["model"])
        self.model.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_val = float(state["best_val"])
        self.stale_epochs = int(state["stale_epochs"])
        _set_rng_state(state["rng"])
        rows = [row for row in self.run.read_metrics() if row["epoch"] < self.start_epoch]
        self.run.write_metrics(rows)
        log.info("resuming after epoch %d (best validation ELBO %.4f)", self.start_epoch, self.best_val)

    def _checkpoint(self, epoch: int) -> dict:
        return {
            "epoch": epoch, "model": learnable_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "best_val": self.best_val,
            "stale_epochs": self.stale_epochs, "model_config": self.model.config_dict(),
        }

    # -- steps -----------------------------------------------------------------
    def _batch_loss(self, batch: dict):
        images = batch["images"].to(self.device, non_blocking=True)
        if self.cuda and self.settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        ctf = self.ctf_for(batch["index"]).to(self.device) if self.ctf_for is not None else None
        extra = {}
        if "labels" in batch and self.takes_labels:
            extra["labels"] = batch["labels"].to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cuda and self.settings.bf16):
            return self.model.loss(images, ctf=ctf, **extra), images.shape[0]

    def _run_epoch(self, loader, train: bool, desc: str) -> dict[str, float]:
        totals: dict[str, torch.Tensor] = {}
        count = 0
        self.model.train(train)
        bar = tqdm(total=len(loader.dataset), desc=desc, leave=False, unit="img", disable=None)
        for batch in loader:
            if train:
                terms, n = self._batch_loss(batch)
                if not torch.isfinite(terms.loss):
                    raise ParticleVAEError("the loss became NaN or infinite; lower --lr, check the input for outliers, or change the normalisation")
                self.optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                self.optimizer.step()
            else:
                with torch.no_grad():
                    terms, n = self._batch_loss(batch)
            values = {"elbo": terms.elbo.detach(), **{k: v.detach() for k, v in terms.terms.items()}}
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value.float() * n
            count += n
            bar.update(n)
            if train and not bar.disable:
                bar.set_postfix(elbo=f"{float(terms.elbo):.2f}")
        bar.close()
        return {key: float(value) / max(count, 1) for key, value in totals.items()}

    def _validate(self, epoch: int) -> dict[str, float]:
        """Validation metrics with a fixed sampling seed, leaving the training RNG untouched."""
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.settings.seed + VALIDATION_SEED_OFFSET)
            return self._run_epoch(self.val_loader, train=False, desc=f"epoch {epoch + 1} validation")

    # -- loop ------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train until ``epochs`` or early stopping; returns the metrics of this call's epochs."""
        settings = self.settings
        rows = []
        epoch = self.start_epoch
        for epoch in range(self.start_epoch, settings.epochs):
            self.train_loader.batch_sampler.set_epoch(epoch)
            start = time.perf_counter()
            train = self._run_epoch(self.train_loader, train=True, desc=f"epoch {epoch + 1}/{settings.epochs}")
            seconds = time.perf_counter() - start
            val = self._validate(epoch) if self.val_loader is not None else {}
            score = val.get("elbo", train["elbo"])
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step(score)
            improved = score > self.best_val
            if improved:
                self.best_val, self.stale_epochs = score, 0
            else:
                self.stale_epochs += 1
            row = {"epoch": epoch, "lr": lr, "time_s": round(seconds, 3),
                   "images_per_s": round(len(self.train_idx) / max(seconds, 1e-9), 2),
                   **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()}}
            state = self._checkpoint(epoch)
            if improved:
                self.run.save_checkpoint(self.run.best_checkpoint, {"epoch": epoch, "model": state["model"],
                                                                    "model_config": state["model_config"]})
            self.run.save_checkpoint(self.run.last_checkpoint, state)
            self.run.append_metrics(row)
            rows.append(row)
            log.info("epoch %d/%d: train ELBO %.3f, validation ELBO %s, lr %.2g, %.1f images/s%s", epoch + 1, settings.epochs,
                     train["elbo"], f"{val['elbo']:.3f}" if val else "n/a", lr, row["images_per_s"], " (best)" if improved else "")
            if settings.early_stop_patience and self.stale_epochs >= settings.early_stop_patience:
                log.info("stopping early: no validation improvement for %d epochs", self.stale_epochs)
                break
        return rows

