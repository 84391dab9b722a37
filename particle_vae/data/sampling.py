"""The order particles are loaded in: batch samplers and the loader built on them.

:class:`ChunkShuffleBatchSampler` gives shuffled training batches made of runs
of consecutive stored images (rank-aware for data-parallel training);
:class:`SequentialBatchSampler` gives batches in input order, for inference and
export. :func:`make_loader` picks one and returns a
:class:`~particle_vae.data.particles.ParticleLoader` over a dataset.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from particle_vae.data.particles import ParticleDataset, ParticleLoader, collate

__all__ = ["ChunkShuffleBatchSampler", "SequentialBatchSampler", "make_loader"]


class ChunkShuffleBatchSampler(Sampler):
    """Shuffled training batches built from runs of consecutive stored images.

    The particles (in ``order``, by default ``0..N-1``; pass
    :meth:`ParticleDataset.storage_order` for on-disk order) are cut into
    chunks of ``chunk_size`` consecutive entries; each epoch the chunks are
    permuted with a generator seeded by ``(seed, epoch)`` and the result is cut
    into batches of ``batch_size``. Each batch therefore needs about
    ``batch_size / chunk_size`` contiguous reads instead of ``batch_size``
    scattered ones, while batches still mix particles from all over the input.
    Every index appears exactly once per epoch (unless ``drop_last`` drops the
    short final batch). Call :meth:`set_epoch` before each epoch.

    **Several ranks** (data-parallel training): with ``world_size = W > 1``,
    ``batch_size`` is the *global* batch. Every rank computes the same
    permutation and the same global batches and yields only its share: the
    ``rank``-th of ``W`` contiguous slices of each global batch (sizes differ by
    at most one). A rank's slice is therefore still made of runs of consecutive
    stored images, and the union of the ranks' ``t``-th batches is the ``t``-th
    batch of a single process with the same seed. A final global batch with
    fewer than ``W`` particles is skipped on every rank (a rank would
    otherwise have nothing to compute).

    Args:
        n: number of particles ``N`` (or a dataset).
        batch_size: particles per (global) batch ``B``.
        chunk_size: consecutive particles kept together (1 = fully random).
        seed: base seed; the order is a function of ``(seed, epoch)`` only.
        drop_last: drop the final batch when it has fewer than ``batch_size``.
        order: ``(N,)`` permutation of ``0..N-1`` defining "consecutive".
        rank, world_size: this process's rank and the number of processes.
    """

    def __init__(self, n: int | Dataset, batch_size: int, chunk_size: int = 16, seed: int = 0,
                 drop_last: bool = False, order: np.ndarray | None = None, rank: int = 0, world_size: int = 1):
        n = len(n) if not isinstance(n, (int, np.integer)) else int(n)
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1 (got {batch_size}, {chunk_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.n, self.batch_size, self.chunk_size = n, int(batch_size), int(chunk_size)
        self.seed, self.drop_last, self.epoch = int(seed), bool(drop_last), 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch = 0
        self.order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
        if self.order.shape != (n,):
            raise ValueError(f"order must have shape ({n},), got {self.order.shape}")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the permutation of epoch ``epoch`` (any non-negative integer).

        Args:
            start_batch: skip the first ``start_batch`` batches of the epoch
                (continuing an epoch that was interrupted after that many steps).
        """
        self.epoch = int(epoch)
        self.start_batch = max(int(start_batch), 0)

    def permutation(self) -> np.ndarray:
        """The ``(N,)`` particle order of the current epoch (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_chunks = -(-self.n // self.chunk_size)
        starts = rng.permutation(n_chunks) * self.chunk_size
        lengths = np.minimum(self.chunk_size, self.n - starts)
        positions = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        return self.order[positions]

    def _global_batches(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        if rest and not self.drop_last and rest >= self.world_size:
            return full + 1
        return full

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        for number in range(self.start_batch, self._global_batches()):
            batch = perm[number * self.batch_size:(number + 1) * self.batch_size]
            if self.world_size > 1:
                base, extra = divmod(len(batch), self.world_size)
                start = self.rank * base + min(self.rank, extra)
                batch = batch[start:start + base + (1 if self.rank < extra else 0)]
            yield batch.tolist()

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the same number on every rank)."""
        return max(self._global_batches() - self.start_batch, 0)


class SequentialBatchSampler(Sampler):
    """Batches ``[0..B), [B..2B), ...`` in input order, for inference and export.

    Args:
        n: number of particles ``N`` (or a dataset).
        batch_size: particles per batch ``B`` (the last batch may be shorter).
    """

    def __init__(self, n: int | Dataset, batch_size: int):
        n = len(n) if not isinstance(n, (int, np.integer)) else int(n)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size = n, int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        """No effect (the order never changes); present for a uniform interface."""

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.n)))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def make_loader(
    dataset: ParticleDataset | Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    chunk_size: int = 16,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> ParticleLoader:
    """A DataLoader yielding ``{"images": (B, 1, box, box), "index": (B,)}`` batches.

    ``shuffle=True`` uses :class:`ChunkShuffleBatchSampler` over the dataset's
    on-disk order (call ``loader.batch_sampler.set_epoch(epoch)`` each epoch);
    ``shuffle=False`` uses :class:`SequentialBatchSampler` (input order, for
    inference). Each batch is fetched with one ``__getitems__`` call in a worker;
    the loader never draws from the global torch random generator;
    a read error in a worker is raised in the main process as the original
    one-line InputFileError.

    Args:
        dataset: a :class:`ParticleDataset` (or a ``Subset`` of one).
        batch_size: ``B``; num_workers: worker processes (0 = main process).
        seed: sampler seed; chunk_size: consecutive particles read together.
        drop_last: drop a short final batch when shuffling.
        pin_memory, prefetch_factor, persistent_workers: passed to DataLoader.
        rank, world_size: with ``shuffle=True``, yield only this rank's share
            of each global batch of ``batch_size`` (see :class:`ChunkShuffleBatchSampler`).
    """
    if shuffle:
        order = dataset.storage_order() if hasattr(dataset, "storage_order") else None
        sampler: Sampler = ChunkShuffleBatchSampler(len(dataset), batch_size, chunk_size=chunk_size, seed=seed,
                                                    drop_last=drop_last, order=order, rank=rank, world_size=world_size)
    else:
        sampler = SequentialBatchSampler(len(dataset), batch_size)
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    # The loader's own generator (it seeds the workers) keeps DataLoader from drawing from the global
    # torch RNG each time an iterator starts, so that a run resumed inside an epoch samples exactly
    # as one that was not interrupted.
    generator = torch.Generator().manual_seed(int(seed))
    return ParticleLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                          pin_memory=pin_memory, generator=generator, **extra)
