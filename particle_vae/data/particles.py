"""A lazy, batched PyTorch dataset over a particle source, and its worker errors.

:class:`ParticleDataset` reads the images of a
:class:`~particle_vae.data.sources.ParticleSource` (opened by
:func:`~particle_vae.data.sources.open_source`) on demand with grouped
contiguous reads, keeps at most ``max_open_stacks`` stacks open (least recently
used are closed) and never caches pixels, so memory is bounded by the batch
size whatever the number or size of the stacks. It implements PyTorch's batched
fetch hook ``__getitems__``; use :func:`collate` (or
:func:`particle_vae.data.sampling.make_loader`) as the DataLoader's
``collate_fn``. A read error in a DataLoader worker comes back as a
:class:`WorkerError`, which :class:`ParticleLoader` raises as the original
one-line error. :class:`IndexSubset` is a view of some of a dataset's items
(a training or validation split).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from particle_vae.data.sources import ParticleSource, open_source
from particle_vae.errors import InputFileError
from particle_vae.io.mrc import MRCStack

__all__ = ["ParticleDataset", "collate", "WorkerError", "IndexSubset", "ParticleLoader"]


class ParticleDataset(Dataset):
    """Lazily read particle images as float32 tensors.

    ``dataset[i]`` returns ``{"images": (1, box, box) float32, "index": int64
    scalar}``; ``dataset.__getitems__(indices)`` (called by a DataLoader with
    a batch sampler) returns one batch ``{"images": (B, 1, box, box),
    "index": (B,)}`` read with one grouped, contiguous-run read per stack.
    Pixel values are as stored in the stacks (no scaling) unless ``transform``
    is given.

    At most ``max_open_stacks`` stack files are open per process (least
    recently used closed first) and no pixels are cached. The dataset is
    pickle-safe: each DataLoader worker opens its own file descriptors. The
    pickled copy does not carry ``source.star`` (workers do not need it).

    Args:
        source: a :class:`ParticleSource`, or a path given to :func:`open_source`.
        datadir, pixel_size: passed to :func:`open_source` when ``source`` is a path.
        max_open_stacks: ``K``, the most stack files kept open at once.
        transform: optional callable applied to each batch tensor
            ``(B, 1, box, box) -> (B, 1, box', box')`` (e.g. a
            :class:`~particle_vae.data.preprocess.Preprocessing`), run inside the
            worker processes.
    Raises:
        InputFileError: from :func:`open_source`, and on reading an image that
            holds NaN or Inf values.
    """

    def __init__(
        self,
        source: ParticleSource | str | Path,
        datadir: str | Path | None = None,
        pixel_size: float | None = None,
        max_open_stacks: int = 16,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if not isinstance(source, ParticleSource):
            source = open_source(source, datadir=datadir, pixel_size=pixel_size)
        if int(max_open_stacks) < 1:
            raise ValueError(f"max_open_stacks must be >= 1, got {max_open_stacks}")
        self.source = source
        self.max_open_stacks = int(max_open_stacks)
        self.transform = transform
        self._open: OrderedDict[int, MRCStack] = OrderedDict()

    # -- properties -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source)

    @property
    def box(self) -> int:
        """Edge length of the stored images in pixels."""
        return self.source.box

    @property
    def pixel_size(self) -> float | None:
        """Angstrom per pixel of the stored images, or ``None``."""
        return self.source.pixel_size

    @property
    def n_open_stacks(self) -> int:
        """Stack files currently open in this process (``<= max_open_stacks``)."""
        return len(self._open)

    def storage_order(self) -> np.ndarray:
        """``(N,)`` particle indices in on-disk order; see :meth:`ParticleSource.storage_order`."""
        return self.source.storage_order()

    # -- pickling / resources -------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["source"] = dataclasses.replace(self.source, star=None)
        return state

    def close(self) -> None:
        """Close every open stack file (reading again reopens them)."""
        while self._open:
            _, stack = self._open.popitem(last=False)
            stack.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _stack(self, number: int) -> MRCStack:
        stack = self._open.get(number)
        if stack is not None:
            self._open.move_to_end(number)
            return stack
        stack = MRCStack(self.source.stack_paths[number])
        expected = int(self.source.stack_lengths[number])
        if stack.box != self.source.box or stack.n_images != expected:
            raise InputFileError(
                f"changed since it was opened: now {stack.n_images} images of {stack.box}x{stack.box} px, "
                f"was {expected} of {self.source.box}x{self.source.box}",
                stack.path, "restart with the current files",
            )
        self._open[number] = stack
        while len(self._open) > self.max_open_stacks:
            _, old = self._open.popitem(last=False)
            old.close()
        return stack

    # -- reading --------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Read particles by index, grouped per stack into contiguous runs.

        Args:
            indices: ``(B,)`` particle indices in ``[0, N)`` (any order, repeats allowed).
        Returns:
            ``(B, box, box)`` float32 numpy array in the order given.
        Raises:
            IndexError: an index outside ``[0, N)``.
            InputFileError: an image containing NaN or Inf (names stack and image).
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"particle index out of range for {n} particles")
        indices = np.where(indices < 0, indices + n, indices)
        box = self.source.box
        out = np.empty((indices.size, box, box), dtype=np.float32)
        if indices.size == 0:
            return out
        stack_of = self.source.stack_index[indices]
        image_of = self.source.image_index[indices]
        order = np.argsort(stack_of, kind="stable")
        bounds = np.flatnonzero(np.diff(stack_of[order])) + 1
        for group in np.split(order, bounds):
            number = int(stack_of[group[0]])
            block = self._stack(number).read_indices(image_of[group])
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                bad = int(np.flatnonzero(~finite)[0])
                raise InputFileError(
                    f"image {int(image_of[group[bad]]) + 1} (1-based; particle {int(indices[group[bad]])}) contains NaN or "
                    f"Inf pixel values",
                    self.source.stack_paths[number],
                    "remove that particle from the input or re-extract it",
                )
            if len(group) == indices.size:  # one stack: stable argsort kept the order, no copy needed
                return block
            out[group] = block
        return out

    def _batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(self.read(indices))[:, None]
        if self.transform is not None:
            images = self.transform(images)
        n = len(self)
        index = torch.from_numpy(np.where(indices < 0, indices + n, indices))
        return {"images": images, "index": index}

    def _fetch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        try:
            return self._batch(indices)
        except InputFileError as error:
            if get_worker_info() is None:
                raise
            # In a DataLoader worker: hand the one-line error to the main process
            # instead of letting PyTorch wrap it in a multi-line traceback.
            return WorkerError(message=str(error), path=None if error.path is None else str(error.path))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """One particle: ``{"images": (1, box, box) float32, "index": () int64}``.

        Inside a DataLoader worker a read error is returned as a :class:`WorkerError`
        (raised again in the main process) rather than raised.
        """
        batch = self._fetch(np.array([int(i)], dtype=np.int64))
        if isinstance(batch, WorkerError):
            return batch
        return {"images": batch["images"][0], "index": batch["index"][0]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A batch: ``{"images": (B, 1, box, box) float32, "index": (B,) int64}`` in the order given.

        Inside a DataLoader worker a read error is returned as a :class:`WorkerError`.
        """
        return self._fetch(np.asarray(indices, dtype=np.int64).reshape(-1))


class WorkerError(dict):
    """A batch that failed in a DataLoader worker, carrying the one-line error.

    PyTorch re-raises worker exceptions with the whole worker traceback in the
    message; instead the dataset returns this placeholder and the error is
    raised, unchanged, in the main process: by :class:`ParticleLoader` as soon as
    the batch arrives, or on the first key access (``batch["images"]``) with a
    plain DataLoader.
    """

    def error(self) -> InputFileError:
        """The original :class:`~particle_vae.errors.InputFileError` (same message and path)."""
        error = InputFileError(dict.get(self, "message", "a DataLoader worker failed"))
        path = dict.get(self, "path")
        error.path = None if path is None else Path(path)
        return error

    def __getitem__(self, key):
        raise self.error()


def collate(items: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DataLoader ``collate_fn`` for :class:`ParticleDataset`.

    Accepts either a batch already built by ``__getitems__`` (a dict whose
    ``index`` is 1-D, returned unchanged) or a list of per-particle dicts from
    ``__getitem__`` (stacked). A :class:`WorkerError` is passed through.

    Returns:
        ``{"images": (B, 1, box, box) float32, "index": (B,) int64}``.
    """
    if isinstance(items, WorkerError):
        return items
    if isinstance(items, dict):
        if items["index"].dim() == 1:
            return items
        return {"images": items["images"][None], "index": items["index"].reshape(1)}
    items = list(items)
    for item in items:
        if isinstance(item, WorkerError):
            return item
    if items and isinstance(items[0], dict) and items[0]["index"].dim() == 1:  # list of batches
        return {"images": torch.cat([b["images"] for b in items]), "index": torch.cat([b["index"] for b in items])}
    return {"images": torch.stack([item["images"] for item in items]),
            "index": torch.stack([item["index"] for item in items]).reshape(-1)}


class IndexSubset(Dataset):
    """A view of some items of a dataset, held as one int64 array.

    Like ``torch.utils.data.Subset`` but without a Python list of indices (a
    1,000,000-particle training split is 8 MB here, and pickles to workers as
    one array), with batched reads passed through to ``__getitems__`` and an
    on-disk order for the chunk-shuffle sampler.

    Args:
        dataset: the underlying dataset (``ParticleDataset``, ``LabelledDataset``, ...).
        indices: ``(M,)`` positions in ``dataset``; item ``j`` of the view is
            item ``indices[j]`` of ``dataset``. Batches keep the underlying
            ``index`` (so CTF tables and STAR rows stay addressable).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray):
        self.dataset = dataset
        self.indices = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
            raise IndexError(f"subset indices must lie in [0, {len(dataset)})")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getattr__(self, name):  # box, pixel_size, source, ... of the wrapped dataset
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def storage_order(self) -> np.ndarray:
        """``(M,)`` positions of this view sorted by the underlying on-disk order.

        The underlying dataset's ``storage_order()`` when it has one, else its index order.
        """
        order_of = getattr(self.dataset, "storage_order", None)
        if order_of is None:
            return np.argsort(self.indices, kind="stable").astype(np.int64)
        rank = np.empty(len(self.dataset), dtype=np.int64)
        rank[order_of()] = np.arange(len(self.dataset), dtype=np.int64)
        return np.argsort(rank[self.indices], kind="stable").astype(np.int64)

    def __getitem__(self, j: int):
        return self.dataset[int(self.indices[int(j)])]

    def __getitems__(self, positions: Sequence[int]):
        chosen = self.indices[np.asarray(positions, dtype=np.int64)]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(chosen)
        return [self.dataset[int(i)] for i in chosen]


class ParticleLoader(DataLoader):
    """A DataLoader that raises a worker's read error as the original one-line
    :class:`~particle_vae.errors.InputFileError` (see :class:`WorkerError`)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().__iter__():
            if isinstance(batch, WorkerError):
                raise batch.error()
            yield batch
