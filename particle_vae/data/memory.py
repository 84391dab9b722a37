"""An in-memory image dataset with the same batch interface as ParticleDataset
(used for the MNIST benchmarks, which are generated on the fly)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Images held in memory.

    Args:
        images: ``(N, H, W)`` array (converted to float32 once).
    ``dataset[i]`` -> ``{"images": (1, H, W), "index": ()}``;
    ``dataset.__getitems__(idx)`` -> ``{"images": (B, 1, H, W), "index": (B,)}``.
    """

    def __init__(self, images: np.ndarray):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"expected square images (N, H, H), got {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def box(self) -> int:
        return int(self.images.shape[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[int(i)][None], "index": torch.tensor(int(i))}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"images": self.images[index][:, None], "index": index}


class LabelledDataset(Dataset):
    """Adds class labels to another dataset's batches.

    Args:
        dataset: yields ``{"images", "index"}`` (per item or via ``__getitems__``).
        labels: ``(N,)`` int64 class ids ``0..C-1``, ``-1`` for unlabelled items.
    Batches gain ``"labels"``: ``()`` per item, ``(B,)`` per batch.
    """

    def __init__(self, dataset: Dataset, labels: np.ndarray):
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(dataset):
            raise ValueError(f"{len(labels)} labels for {len(dataset)} items")
        self.dataset = dataset
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # box, storage_order, source, ... of the wrapped dataset
        if name in ("dataset", "labels"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[i])
        item["labels"] = self.labels[int(i)]
        return item

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self.dataset.__getitems__(indices)
        if isinstance(batch, dict) and "index" in batch:  # a WorkerError passes through unchanged
            batch = dict(batch)
            batch["labels"] = self.labels[batch["index"]]
        return batch
