"""The training loop shared by every model.

Adam; learning-rate halving when the validation ELBO stops improving; early
stopping; a held-out validation split drawn from the training data with the
run's seed; bf16 autocast and channels-last on CUDA; a checkpoint after every
epoch written atomically, from which ``--resume`` continues exactly (model,
optimiser, scheduler, random-number states and data order are all restored).
Checkpoints hold only tensors, numbers, strings, lists and dicts (the numpy and
Python random states converted), so they load with ``weights_only=True``, and
the ``schema_version`` of the program that wrote them (see
:mod:`particle_vae.engine.run_config`).

Data-parallel (several processes started by torchrun, see
:mod:`particle_vae.engine.distributed`): ``batch_size`` is the global batch;
each rank trains on its share of every global batch through
DistributedDataParallel, validation is split across ranks and its sums are
added up, and only rank 0 writes the run directory. ``max_steps`` stops a run
after that many optimiser steps, in the middle of an epoch if need be; the
checkpoint then records how far the epoch got and ``--resume`` continues from
the next batch.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from particle_vae.data.particles import IndexSubset
from particle_vae.data.sampling import make_loader
from particle_vae.engine import distributed as ddp
from particle_vae.engine.distributed import SINGLE, DistContext
from particle_vae.engine.run import RunDirectory
from particle_vae.engine.run_config import SCHEMA_VERSION
from particle_vae.errors import ParticleVAEError
from particle_vae.models.base import LossTerms, PoseVAE, learnable_state, load_learnable_state

log = logging.getLogger(__name__)

VALIDATION_SEED_OFFSET = 7919
#: added (times the rank) to the seed of ranks other than 0, so their sampling noise differs
RANK_SEED_STRIDE = 1_000_003
#: on GPUs, training steps between checks that the loss is finite (each check waits for the device)
FINITE_CHECK_STEPS_GPU = 20


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
        num_workers: DataLoader worker processes (per rank).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        bf16: allow bf16 autocast (``False``: never, as ``precision="fp32"``).
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 on CPU), ``"bf16"``
            (bf16 autocast on CUDA and CPU: several times faster on CPUs with
            AVX512-BF16 or AMX) or ``"fp32"``.
        channels_last: channels-last memory format on CUDA.
        max_steps: stop after this many optimiser steps in all (``None``: no limit);
            a run stopped inside an epoch resumes from the next batch.
        compile: ``torch.compile`` the training step's loss (meant for CUDA; on the
            CPU it needs a C++ compiler and minutes of compilation). When compiling
            or running the compiled loss fails, training goes on without it (a
            warning says why).
        grad_clip_factor: clip the gradient norm of a step at this many times the
            median norm of the previous :data:`GRAD_NORM_WINDOW` steps (the first
            :data:`GRAD_CLIP_WARMUP` steps are never clipped; 0, the default: never
            clip). Rare steps whose gradient is a hundred times the usual one (a KL
            term that jumps) move Adam's weights far, since its second-moment
            estimate lags; see :class:`GradientSpikeClipper` and docs/training.md for
            what clipping did and did not change.
        batch_size is the *global* batch: with ``W`` data-parallel processes each
        computes ``batch_size / W`` images per step.
    """

    # the TARGET-VAE paper's training (engine.presets.PAPER_TRAINING; sources in docs/training.md)
    epochs: int = 500
    batch_size: int = 100
    lr: float = 2e-4
    val_fraction: float = 0.1
    lr_patience: int = 10
    min_lr: float = 1e-6
    early_stop_patience: int = 20
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    bf16: bool = True
    precision: str = "auto"
    channels_last: bool = True
    max_steps: int | None = None
    compile: bool = False
    grad_clip_factor: float = 0.0


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
    """This process's torch, numpy and Python random states, and its current CUDA device's.

    Stored as tensors, strings and numbers only, so that the checkpoint loads with
    ``torch.load(..., weights_only=True)``; :func:`_set_rng_state` restores them exactly.
    Only the current device's CUDA state is kept: querying every visible GPU
    would create a CUDA context on each of them in every data-parallel process.
    """
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_saved(np.random.get_state()),
             "python": _python_state_to_saved(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def _numpy_state_to_saved(state: tuple) -> dict:
    """``np.random.get_state()`` (``("MT19937", uint32 keys (624,), pos, has_gauss, cached_gaussian)``)
    as weights_only-safe content: the keys as an int64 tensor (every uint32 fits), the rest as numbers."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return {"bit_generator": str(name), "keys": torch.tensor(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_state_from_saved(saved) -> tuple:
    """The inverse of :func:`_numpy_state_to_saved`; a tuple (checkpoints written before it) is returned as it is."""
    if not isinstance(saved, dict):
        return saved
    keys = np.asarray(saved["keys"].numpy(), dtype=np.uint32)
    return saved["bit_generator"], keys, int(saved["pos"]), int(saved["has_gauss"]), float(saved["cached_gaussian"])


def _python_state_to_saved(state: tuple) -> dict:
    """``random.getstate()`` (``(version, 625 ints, gauss_next or None)``) as weights_only-safe content:
    the 625 ints (each below 2**32) as an int64 tensor."""
    version, internal, gauss_next = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next)}


def _python_state_from_saved(saved) -> tuple:
    """The inverse of :func:`_python_state_to_saved`; a tuple (checkpoints written before it) is returned as it is."""
    if not isinstance(saved, dict):
        return saved
    return int(saved["version"]), tuple(int(value) for value in saved["internal"].tolist()), saved["gauss_next"]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_saved(state["numpy"]))
    random.setstate(_python_state_from_saved(state["python"]))
    if torch.cuda.is_available():
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"])
        elif "cuda" in state:  # checkpoints written before data-parallel training: every device's state
            torch.cuda.set_rng_state_all(state["cuda"])


#: steps whose gradient norms make up the running median of :class:`GradientSpikeClipper`
GRAD_NORM_WINDOW = 50
#: steps before :class:`GradientSpikeClipper` starts clipping (its median needs a history)
GRAD_CLIP_WARMUP = 10


class GradientSpikeClipper:
    """Clips a step's gradient norm at ``factor`` times the median norm of the recent steps.

    The limit follows the scale of the loss (the gradient norm of a summed pixel
    likelihood runs to thousands) without a setting per data set, and it only
    acts on spikes: on the two-protein mixture of ``tests/test_mixture.py`` the
    norms of ordinary steps stay within a few times their running median while a
    spike reaches 200 times it (docs/training.md). Everything stays on the device:
    no step waits for a GPU to report its norm.

    Args:
        factor: the limit in multiples of the running median (``<= 0``: never clip).
        window: steps in the running median; warmup: steps before clipping starts.
    """

    def __init__(self, factor: float, window: int = GRAD_NORM_WINDOW, warmup: int = GRAD_CLIP_WARMUP):
        self.factor, self.window, self.warmup = float(factor), int(window), int(warmup)
        self.history = torch.zeros(self.window, dtype=torch.float32)
        self.count = 0  # steps seen
        self.clipped = torch.zeros((), dtype=torch.int64)  # steps clipped (a device counter)

    def __call__(self, parameters) -> None:
        """Clip the gradients of ``parameters`` in place (after ``backward``, before the optimiser step)."""
        if self.factor <= 0:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        device = grads[0].device
        if self.history.device != device:
            self.history, self.clipped = self.history.to(device), self.clipped.to(device)
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads]))
        if self.count >= self.warmup:
            limit = self.factor * self.history[:min(self.count, self.window)].nanmedian()
            coef = (limit / (total + 1e-12)).clamp(max=1.0)
            coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
            for grad in grads:
                grad.mul_(coef.to(grad.dtype))
            self.clipped += (coef < 1.0).to(torch.int64)
        # the unclipped norm enters the history; a non-finite one as NaN, which the median leaves out
        self.history[self.count % self.window] = torch.where(torch.isfinite(total), total, torch.full_like(total, math.nan))
        self.count += 1

    def take_clipped(self) -> int:
        """Steps clipped since the last call (reading it waits for the device once)."""
        value = int(self.clipped)
        self.clipped.zero_()
        return value

    def state_dict(self) -> dict:
        return {"history": self.history.cpu().clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].to(self.history.device, torch.float32).clone()
        self.count = int(state["count"])


class Trainer:
    """Trains a :class:`PoseVAE` on a dataset yielding ``{"images", "index"}`` batches.

    Args:
        model: the model (its parameters are trained in place).
        dataset: a dataset with ``__getitems__`` (ParticleDataset, ArrayDataset).
        settings: :class:`TrainSettings`.
        run: the run directory (config must already be written).
        ctf_for: optional callable ``index (B,) -> CTF (B, N, N//2+1)`` for
            CTF-aware likelihoods.
        context: the distributed context (default: a single process). With
            ``W > 1`` ranks the model is wrapped in DistributedDataParallel and
            only rank 0 writes to ``run``.
    Raises:
        ParticleVAEError: ``batch_size`` not divisible by the number of processes.
    """

    def __init__(self, model: PoseVAE, dataset: Dataset, settings: TrainSettings, run: RunDirectory, ctf_for=None,
                 context: DistContext | None = None):
        self.model, self.dataset, self.settings, self.run = model, dataset, settings, run
        self.ctf_for = ctf_for
        self.context = context = context or SINGLE
        if context.is_main:
            run.remove_stale_temporaries()  # left by a run killed while writing a checkpoint
        world = context.world_size
        if settings.batch_size % world:
            raise ParticleVAEError(f"--batch-size {settings.batch_size} (the global batch) is not divisible by the {world} "
                                   f"processes; use a multiple of {world}")
        if settings.max_steps is not None and settings.max_steps < 1:
            raise ParticleVAEError(f"--max-steps must be at least 1, got {settings.max_steps}")
        self.takes_labels = bool(getattr(model, "supports_labels", False))
        self.device = ddp.device_for(context, settings.device)
        self.cuda = self.device.type == "cuda"
        self.model.to(self.device)
        if self.cuda and settings.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ddp_model = ddp.wrap_ddp(self.model, context, self.device) if context.distributed else None
        # compiled lazily, at the first training step; None: eager (also after a failed compilation)
        self.compiled_step = None
        if settings.compile:
            self.compiled_step = torch.compile(self.ddp_model if self.ddp_model is not None else self.model.loss)
        if context.rank > 0:  # different sampling noise on every rank; rank 0 keeps the single-process stream
            seed_everything(settings.seed + RANK_SEED_STRIDE * context.rank)
        self.train_idx, self.val_idx = split_indices(len(dataset), settings.val_fraction, settings.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.clipper = GradientSpikeClipper(settings.grad_clip_factor)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=0.5, patience=settings.lr_patience, min_lr=settings.min_lr)
        self.train_loader = make_loader(IndexSubset(dataset, self.train_idx), settings.batch_size, shuffle=True,
                                        num_workers=settings.num_workers, seed=settings.seed,
                                        pin_memory=self.cuda, persistent_workers=settings.num_workers > 0,
                                        rank=context.rank, world_size=world)
        val_start, val_stop = ddp.shard_bounds(len(self.val_idx), context)
        self.val_loader = (make_loader(IndexSubset(dataset, self.val_idx[val_start:val_stop]), max(settings.batch_size // world, 1),
                                       shuffle=False, num_workers=settings.num_workers, pin_memory=self.cuda)
                           if len(self.val_idx) else None)
        self.start_epoch = 0
        self.start_batch = 0
        self.global_step = 0
        self.best_val = -math.inf
        self.stale_epochs = 0

    @property
    def is_main(self) -> bool:
        """True in the process that writes the run directory (rank 0)."""
        return self.context.is_main

    # -- state ---------------------------------------------------------------
    def resume(self) -> None:
        """Restore the state saved at the last checkpoint (every rank reads it)."""
        state = self.run.load_checkpoint("last")
        load_learnable_state(self.model, state["model"])
        self.model.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        complete = bool(state.get("epoch_complete", True))
        self.start_epoch = int(state["epoch"]) + (1 if complete else 0)
        self.start_batch = 0 if complete else int(state["batches_done"])
        self.global_step = int(state.get("step", 0))
        self.best_val = float(state["best_val"])
        self.stale_epochs = int(state["stale_epochs"])
        if "grad_clip" in state:  # checkpoints written before clipping: the history starts again
            self.clipper.load_state_dict(state["grad_clip"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.context.world_size:
            _set_rng_state(per_rank[self.context.rank])
        elif self.context.rank == 0:
            _set_rng_state(state["rng"])
        else:  # resumed on a different number of processes: data order is kept, sampling noise is reseeded
            seed_everything(self.settings.seed + RANK_SEED_STRIDE * self.context.rank + self.global_step)
        if self.is_main:
            rows = [row for row in self.run.read_metrics() if row["epoch"] < self.start_epoch]
            self.run.write_metrics(rows)
            where = f"epoch {self.start_epoch + 1}, batch {self.start_batch + 1}" if self.start_batch else f"epoch {self.start_epoch + 1}"
            log.info("resuming at %s, step %d (best validation ELBO %.4f)", where, self.global_step, self.best_val)

    def _checkpoint(self, epoch: int, batches_done: int, complete: bool) -> dict:
        """The resumable state; collective (every rank must call it), complete on rank 0."""
        rng_states = ddp.all_gather_objects(self.context, _rng_state())
        return {
            "schema_version": SCHEMA_VERSION, "epoch": epoch, "epoch_complete": complete, "batches_done": batches_done, "step": self.global_step,
            "model": learnable_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_states[0], "rng_per_rank": rng_states,
            "world_size": self.context.world_size, "best_val": self.best_val,
            "stale_epochs": self.stale_epochs, "model_config": self.model.config_dict(),
            "grad_clip": self.clipper.state_dict(),
        }

    @property
    def uses_bf16(self) -> bool:
        """Whether steps run under bf16 autocast (see ``TrainSettings.precision``)."""
        precision = self.settings.precision
        return self.settings.bf16 and (precision == "bf16" or (precision == "auto" and self.cuda))

    # -- steps -----------------------------------------------------------------
    def _batch_loss(self, batch: dict, scale: float | None = None) -> tuple[LossTerms, int]:
        """Loss of one (local) batch; ``scale`` (training under DDP) routes it through the DDP wrapper."""
        images = batch["images"].to(self.device, non_blocking=True)
        if self.cuda and self.settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        ctf = self.ctf_for(batch["index"]).to(self.device) if self.ctf_for is not None else None
        extra = {}
        if "labels" in batch and self.takes_labels:
            extra["labels"] = batch["labels"].to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.uses_bf16):
            if scale is not None and self.ddp_model is not None:
                loss, elbo, names, values = self._training_call(self.ddp_model, images, scale=scale, ctf=ctf, **extra)
                return LossTerms(loss=loss, elbo=elbo, terms=dict(zip(names, values))), images.shape[0]
            if torch.is_grad_enabled():
                return self._training_call(self.model.loss, images, ctf=ctf, **extra), images.shape[0]
            return self.model.loss(images, ctf=ctf, **extra), images.shape[0]

    def _training_call(self, eager, *args, **kwargs):
        """``eager(*args, **kwargs)``, through the compiled step when ``compile`` is on and it works."""
        if self.compiled_step is None:
            return eager(*args, **kwargs)
        try:
            return self.compiled_step(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  any failure of the compiler stack: go on without it
            if self.is_main:
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                log.warning("torch.compile failed (%s: %s); training continues without it", type(error).__name__, message[:300])
            self.compiled_step = None
            return eager(*args, **kwargs)

    def _global_batch(self, number: int) -> int:
        """Images in global training batch ``number`` of an epoch."""
        return min(self.settings.batch_size, len(self.train_idx) - number * self.settings.batch_size)

    def _reduce(self, totals: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Per-image averages of ``totals`` (sums over this rank's images) over all ranks."""
        if not self.context.distributed:
            return {key: float(value) / max(count, 1) for key, value in totals.items()}
        keys = ddp.broadcast_object(self.context, sorted(totals))
        local = torch.stack([totals[key].double() if key in totals else torch.zeros((), dtype=torch.float64) for key in keys]
                            + [torch.tensor(float(count), dtype=torch.float64)])
        summed = ddp.all_reduce_sum(self.context, local.cpu())
        averages = {key: float(summed[i]) / max(float(summed[-1]), 1.0) for i, key in enumerate(keys)}
        return ddp.broadcast_object(self.context, averages)  # bit-identical decisions on every rank

    def _run_epoch(self, loader, train: bool, desc: str, first_batch: int = 0) -> tuple[dict[str, float], int, int]:
        """One pass over ``loader``.

        Returns:
            ``(metrics, batches run, images run over all ranks)``; a training pass
            stops early when ``max_steps`` is reached.
        """
        totals: dict[str, torch.Tensor] = {}
        count, batches, images_run = 0, 0, 0
        finite_so_far = None  # device-side flag: no wait for the device at every step
        world = self.context.world_size
        if self.ddp_model is not None:
            self.ddp_model.train(train)
        self.model.train(train)
        bar = tqdm(total=len(loader.dataset), initial=min(first_batch * self.settings.batch_size, len(loader.dataset)) if train else 0,
                   desc=desc, leave=False, unit="img", disable=None if self.is_main else True)
        max_steps = self.settings.max_steps
        for batch in loader:
            if train and max_steps is not None and self.global_step >= max_steps:
                break
            if train:
                n_global = self._global_batch(first_batch + batches)
                scale = batch["images"].shape[0] * world / n_global if self.ddp_model is not None else None
                terms, n = self._batch_loss(batch, scale=scale)
                finite = torch.isfinite(terms.loss.detach())
                finite_so_far = finite if finite_so_far is None else finite_so_far & finite
                if (batches + 1) % self.finite_check_steps == 0:
                    self._stop_unless_finite(finite_so_far)
                self.optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                self.clipper(self.model.parameters())
                self.optimizer.step()
                self.global_step += 1
                images_run += n_global
            else:
                with torch.no_grad():
                    terms, n = self._batch_loss(batch)
                images_run += n
            values = {"elbo": terms.elbo.detach(), **{k: v.detach() for k, v in terms.terms.items()}}
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value.float() * n
            count += n
            batches += 1
            bar.update(n * world if train else n)
            if train and not bar.disable and batches % 20 == 1:  # reading the value waits for the GPU: not every step
                bar.set_postfix(elbo=f"{float(terms.elbo):.2f}")
        bar.close()
        if finite_so_far is not None:
            self._stop_unless_finite(finite_so_far)  # before any checkpoint of this epoch is written
        return self._reduce(totals, count), batches, images_run

    @property
    def finite_check_steps(self) -> int:
        """Training steps between checks that the loss is finite: every step on the CPU, where the
        check is free; every few on GPUs, where reading the flag waits for the device (a step on a
        non-finite loss spoils the weights, but the run stops at the next check, before any
        checkpoint is written)."""
        return FINITE_CHECK_STEPS_GPU if self.cuda else 1

    def _stop_unless_finite(self, finite: torch.Tensor) -> None:
        if ddp.any_rank(self.context, not bool(finite)):
            raise ParticleVAEError("the loss became NaN or infinite; lower --lr, check the input for outliers, or change the normalisation")

    def _validate(self, epoch: int) -> dict[str, float]:
        """Validation metrics with a fixed sampling seed, leaving the training RNG untouched."""
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.settings.seed + VALIDATION_SEED_OFFSET + RANK_SEED_STRIDE * self.context.rank)
            return self._run_epoch(self.val_loader, train=False, desc=f"epoch {epoch + 1} validation")[0]

    # -- loop ------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train until ``epochs``, ``max_steps`` or early stopping; returns the metrics of this call's epochs."""
        settings = self.settings
        rows = []
        epoch = self.start_epoch
        for epoch in range(self.start_epoch, settings.epochs):
            if settings.max_steps is not None and self.global_step >= settings.max_steps:
                break
            first_batch = self.start_batch if epoch == self.start_epoch else 0
            self.train_loader.batch_sampler.set_epoch(epoch, start_batch=first_batch)
            start = time.perf_counter()
            train, batches, images_run = self._run_epoch(self.train_loader, train=True, desc=f"epoch {epoch + 1}/{settings.epochs}",
                                                         first_batch=first_batch)
            seconds = time.perf_counter() - start
            batches_done = first_batch + batches
            complete = batches >= len(self.train_loader.batch_sampler)
            val = self._validate(epoch) if self.val_loader is not None else {}
            score = val.get("elbo", train.get("elbo", -math.inf))
            lr = self.optimizer.param_groups[0]["lr"]
            improved = False
            if complete:  # a partial epoch (max_steps) is reported but moves no schedule, so resuming stays exact
                self.scheduler.step(score)
                improved = score > self.best_val
                if improved:
                    self.best_val, self.stale_epochs = score, 0
                else:
                    self.stale_epochs += 1
            row = {"epoch": epoch, "step": self.global_step, "lr": lr, "time_s": round(seconds, 3),
                   "images_per_s": round(images_run / max(seconds, 1e-9), 2),
                   **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()}}
            if self.clipper.factor > 0:
                row["clipped_steps"] = self.clipper.take_clipped()
            if not complete:
                row["partial"] = True
            state = self._checkpoint(epoch, batches_done, complete)
            if self.is_main:
                if improved:
                    self.run.save_checkpoint(self.run.best_checkpoint, {"schema_version": SCHEMA_VERSION, "epoch": epoch,
                                                                        "model": state["model"], "model_config": state["model_config"]})
                self.run.save_checkpoint(self.run.last_checkpoint, state)
                self.run.append_metrics(row)
                log.info("epoch %d/%d%s: train ELBO %.3f, validation ELBO %s, lr %.2g, %.1f images/s%s", epoch + 1, settings.epochs,
                         "" if complete else f" (stopped at step {self.global_step}, --max-steps)", train.get("elbo", math.nan),
                         f"{val['elbo']:.3f}" if val else "n/a", lr, row["images_per_s"], " (best)" if improved else "")
            rows.append(row)
            if not complete:
                break
            if settings.early_stop_patience and self.stale_epochs >= settings.early_stop_patience:
                if self.is_main:
                    log.info("stopping early: no validation improvement for %d epochs", self.stale_epochs)
                break
        ddp.barrier(self.context)
        return rows
