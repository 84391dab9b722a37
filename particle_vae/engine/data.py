"""Turning a run's data settings into a dataset (particles or a paper benchmark).

The settings are a plain dict stored in the run's config.json, so ``infer``
and ``--resume`` rebuild exactly the data pipeline training saw:

* particles: ``{"kind": "particles", "path", "datadir", "pixel_size",
  "preprocessing": {Preprocessing fields except box/pixel_size},
  "label_column": optional STAR column with class labels,
  "cache": optional {"path", "dtype"}: read the preprocessed images from one
  contiguous cache file, built on first use (see particle_vae.data.cache)}``
* benchmark: ``{"kind": "benchmark", "benchmark": "mnist-u", "mnist_dir",
  "split", "n", "seed", "labels": optional number of labelled images (the first ones)}``

With labels, batches carry ``"labels"`` (int64, ``-1`` for unlabelled) for
semi-supervised models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from particle_vae.data.memory import ArrayDataset, LabelledDataset
from particle_vae.data.particles import ParticleDataset
from particle_vae.data.preprocess import Preprocessing
from particle_vae.data.sources import ParticleSource, open_source
from particle_vae.errors import ParticleVAEError


@dataclass
class PreparedData:
    """A dataset plus what the model and the outputs need to know about it.

    Attributes:
        dataset: yields ``{"images": (B, 1, N, N), "index": (B,)}`` batches.
        box: ``N``, the model's image size (after preprocessing), pixels.
        pixel_size: Angstrom per model pixel (``None`` if unknown).
        steps: human-readable preprocessing steps, for the log.
        source: the particle source (``None`` for benchmarks).
        benchmark: the generated benchmark set (``None`` for particles).
    """

    dataset: Dataset
    box: int
    pixel_size: float | None
    steps: list[str] = field(default_factory=list)
    source: ParticleSource | None = None
    benchmark: object | None = None
    class_values: list | None = None


def prepare_data(spec: dict, path_override: str | Path | None = None, source: ParticleSource | None = None,
                 num_workers: int = 0, context=None) -> PreparedData:
    """Build the dataset described by ``spec`` (see the module docstring).

    Args:
        spec: data settings.
        path_override: read particles from this input instead of ``spec["path"]``
            (inference on another STAR with the same preprocessing); the cache
            is not used then.
        source: the already opened particle source of ``spec`` (saves reading
            the stack headers again).
        num_workers: reader processes while building a cache.
        context: the :class:`~particle_vae.engine.distributed.DistContext`; a
            cache is built by rank 0 while the other ranks wait.
    """
    if spec["kind"] == "benchmark":
        from particle_vae.data.benchmarks import make_benchmark

        bench = make_benchmark(spec["benchmark"], spec["mnist_dir"], split=spec.get("split", "train"),
                               seed=spec.get("seed", 0), n=spec.get("n"), progress=None)
        steps = [f"{spec['benchmark']} {spec.get('split', 'train')} split: {len(bench.images)} images of "
                 f"{bench.box}x{bench.box} px in [0, 1] (seed {spec.get('seed', 0)})"]
        dataset = ArrayDataset(bench.images)
        classes = None
        if spec.get("labels") is not None:
            labels = np.full(len(bench.labels), -1, dtype=np.int64)
            known = min(int(spec["labels"]), len(labels))
            labels[:known] = bench.labels[:known]
            dataset, classes = LabelledDataset(dataset, labels), list(range(10))
            steps.append(f"labels: the first {known} images labelled, {len(labels) - known} unlabelled")
        return PreparedData(dataset, bench.box, 1.0, steps, benchmark=bench, class_values=classes)
    if source is None:
        path = path_override or spec["path"]
        source = open_source(path, datadir=spec.get("datadir"), pixel_size=spec.get("pixel_size"))
    prep = Preprocessing(box=source.box, pixel_size=source.pixel_size, **spec.get("preprocessing", {}))
    steps = [source.describe()] + prep.describe()
    cache = spec.get("cache") if path_override is None else None
    if cache:
        from particle_vae.data.cache import ensure_cache, open_cache
        from particle_vae.engine.distributed import SINGLE, run_on_main

        info = run_on_main(context or SINGLE, lambda: ensure_cache(source, spec.get("preprocessing", {}), cache["path"],
                                                                   dtype=cache.get("dtype", "float16"), num_workers=num_workers))
        dataset = open_cache(info)
        steps.append(f"cache: {info.path} ({info.dtype}, {'built' if info.built else 'reused'}), "
                     f"the preprocessed images in input order")
    else:
        dataset = ParticleDataset(source, transform=prep)
    classes = None
    if spec.get("label_column"):
        labels, classes = star_labels(source, spec["label_column"])
        dataset = LabelledDataset(dataset, labels)
        steps.append(f"labels from {spec['label_column']}: {len(classes)} classes {classes[:10]}, "
                     f"{int((labels >= 0).sum())} labelled, {int((labels < 0).sum())} unlabelled")
    return PreparedData(dataset, prep.output_box, prep.output_pixel_size, steps, source=source, class_values=classes)


def star_labels(source: ParticleSource, column: str) -> tuple[np.ndarray, list]:
    """Class labels from a STAR column: ``(labels (N,) int64 in 0..C-1 or -1 where
    empty/NaN, sorted class values)``."""
    if source.star is None or column not in source.star.particles.columns:
        raise ParticleVAEError(f"{source.path}: no column {column} for --label-column; "
                               "give a STAR with that column (e.g. rlnClassNumber from an earlier classification)")
    values = pd.Series(source.star.particles[column]).reset_index(drop=True)
    present = values.notna() & (values.astype(str).str.strip() != "")
    classes = sorted(pd.unique(values[present]).tolist())
    labels = np.full(len(values), -1, dtype=np.int64)
    mask = present.to_numpy(dtype=bool)
    labels[mask] = pd.Index(classes).get_indexer(values[mask])
    return labels, classes
