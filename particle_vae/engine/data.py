"""Turning a run's data settings into a dataset (particles or a paper benchmark).

The settings are a plain dict stored in the run's config.json, so ``infer``
and ``--resume`` rebuild exactly the data pipeline training saw:

* particles: ``{"kind": "particles", "path", "datadir", "pixel_size",
  "preprocessing": {Preprocessing fields except box/pixel_size}}``
* benchmark: ``{"kind": "benchmark", "benchmark": "mnist-u", "mnist_dir",
  "split", "n", "seed"}``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from particle_vae.data.memory import ArrayDataset
from particle_vae.data.particles import ParticleDataset, ParticleSource, open_source
from particle_vae.data.preprocess import Preprocessing


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


def prepare_data(spec: dict, path_override: str | Path | None = None) -> PreparedData:
    """Build the dataset described by ``spec`` (see the module docstring).

    Args:
        spec: data settings.
        path_override: read particles from this input instead of ``spec["path"]``
            (inference on another STAR with the same preprocessing).
    """
    if spec["kind"] == "benchmark":
        from particle_vae.data.benchmarks import make_benchmark

        bench = make_benchmark(spec["benchmark"], spec["mnist_dir"], split=spec.get("split", "train"),
                               seed=spec.get("seed", 0), n=spec.get("n"), progress=None)
        steps = [f"{spec['benchmark']} {spec.get('split', 'train')} split: {len(bench.images)} images of "
                 f"{bench.box}x{bench.box} px in [0, 1] (seed {spec.get('seed', 0)})"]
        return PreparedData(ArrayDataset(bench.images), bench.box, 1.0, steps, benchmark=bench)
    path = path_override or spec["path"]
    source = open_source(path, datadir=spec.get("datadir"), pixel_size=spec.get("pixel_size"))
    prep = Preprocessing(box=source.box, pixel_size=source.pixel_size, **spec.get("preprocessing", {}))
    dataset = ParticleDataset(source, transform=prep)
    return PreparedData(dataset, prep.output_box, prep.output_pixel_size, [source.describe()] + prep.describe(), source=source)
