"""Particle loader throughput against training throughput, at 64 px and 128 px boxes.

For each box the script writes a synthetic data set (random float32 images, not
sparse files: every byte is really read) as several ``.mrcs`` stacks and a
RELION 3.1 STAR, then measures particles/s of a full shuffled epoch through:

* ``lazy``: the lazy reader (``ParticleDataset``: ``preadv`` of contiguous
  runs, LRU of open stacks) + ``ChunkShuffleBatchSampler`` + N worker
  processes (``make_loader``), with the preprocessing of training
  (background normalisation; at 128 px also the on-the-fly Fourier crop to 64 px);
* ``cache-float16`` / ``cache-float32``: the same loader over the
  preprocessed cache file (``particle_vae.data.cache``), built once (its build
  rate is reported too).

Each configuration is read twice: ``cold`` after asking the kernel to drop
the files from its page cache (``posix_fadvise(DONTNEED)``; no root needed,
but a file another process holds may stay cached) and ``warm`` right after.
Training throughput is forward + backward + Adam on in-memory random batches
for the model that box feeds (``benchmarks/throughput.py`` configurations:
``particle-64``, the paper-size TARGET-VAE at 64 px, and ``particle-32``, the
``tiny`` preset), and ``ratio`` = loader / training particles/s. The loader
is measured alone, with the same cores the training would use, so the ratio is
a lower bound of the headroom only where training runs on a GPU.

  python benchmarks/loader_throughput.py --train-steps 3 --out benchmarks/results/loader_throughput_cpu.json
  python benchmarks/loader_throughput.py --n64 2000 --n128 1000 --workers 0 --train-steps 2   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large CPU tensors in huge pages

import torch

from particle_vae.data.cache import ensure_cache, open_cache
from particle_vae.data.particles import ParticleDataset
from particle_vae.data.preprocess import Preprocessing
from particle_vae.data.sampling import make_loader
from particle_vae.data.sources import open_source
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import image_name, make_particle_star

HERE = Path(__file__).resolve().parent


def write_dataset(folder: Path, n: int, box: int, n_stacks: int, seed: int = 0) -> Path:
    """``n`` random ``box`` px float32 particles in ``n_stacks`` stacks and a STAR; returns the STAR."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for s, count in enumerate(np.array_split(np.arange(n), n_stacks)):
        images = rng.normal(size=(len(count), box, box)).astype(np.float32)
        write_stack(folder / f"s{s:03d}.mrcs", images, pixel_size=2.0, overwrite=True)
        names += [image_name(i, f"s{s:03d}.mrcs") for i in range(len(count))]
    return make_particle_star(names, pixel_size=2.0, box=box).write(folder / "particles.star", overwrite=True)


def drop_page_cache(paths) -> None:
    """Ask the kernel to forget the cached pages of ``paths`` (best effort)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def epoch_rate(dataset, batch_size: int, workers: int, chunk: int, files) -> dict:
    """Particles/s of one shuffled epoch, cold then warm."""
    out = {}
    for label in ("cold", "warm"):
        if label == "cold":
            drop_page_cache(files)
        loader = make_loader(dataset, batch_size, shuffle=True, num_workers=workers, seed=1, chunk_size=chunk,
                             prefetch_factor=4 if workers else None)
        count, checksum = 0, 0.0
        start = time.perf_counter()
        for batch in loader:
            count += batch["images"].shape[0]
            checksum += float(batch["images"][:, 0, 0, 0].sum())
        seconds = time.perf_counter() - start
        assert count == len(dataset)
        out[label] = round(count / seconds, 1)
    return out


def training_rate(config_name: str, batch_size: int, steps: int, warmup: int = 1) -> float:
    """Training images/s (forward, backward, Adam) of a ``benchmarks/throughput.py`` configuration on CPU."""
    spec = importlib.util.spec_from_file_location("throughput", HERE / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from particle_vae.models import TargetVAE, TargetVAEConfig

    model = TargetVAE(TargetVAEConfig(zdim=2, **module.CONFIGS[config_name]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 1, model.box, model.box)
    for number in range(warmup + steps):
        if number == warmup:
            start = time.perf_counter()
        terms = model.loss(images)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
    return round(batch_size * steps / (time.perf_counter() - start), 2)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n64", type=int, default=40_000, help="particles of the 64 px set")
    parser.add_argument("--n128", type=int, default=10_000, help="particles of the 128 px set")
    parser.add_argument("--stacks", type=int, default=20, help="stack files per set")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16, help="chunk size of the chunk-shuffle sampler")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="reader processes to try")
    parser.add_argument("--train-batch", type=int, default=32, help="training batch (the tiny preset uses 32)")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--train-configs", nargs="+", default=["particle-32", "particle-64"],
                        help="benchmarks/throughput.py configurations to time (the first is the fastest model)")
    parser.add_argument("--work", type=Path, help="folder for the data (default: a temporary folder, removed after)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="loader_throughput_"))
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    results = {"hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "torch_threads": torch.get_num_threads()},
               "command": "python benchmarks/loader_throughput.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
               "batch_size": args.batch_size, "chunk_size": args.chunk, "boxes": {}}
    training = {name: training_rate(name, args.train_batch, args.train_steps) for name in args.train_configs}
    results["training_images_per_s"] = training
    print(f"training (CPU, {torch.get_num_threads()} threads): " + ", ".join(f"{k} {v:.1f} images/s" for k, v in training.items()))
    try:
        for box, n in ((64, args.n64), (128, args.n128)):
            star = write_dataset(work / f"box{box}", n, box, args.stacks)
            source = open_source(star)
            files = [str(p) for p in source.stack_paths]
            prep_settings = {"normalize": "background", **({"target_box": 64} if box == 128 else {})}
            prep = Preprocessing(box=box, pixel_size=source.pixel_size, **prep_settings)
            entry = {"particles": n, "stored_mb": round(n * box * box * 4 / 1e6, 1), "preprocessing": prep.describe(), "loaders": {}}
            for workers in args.workers:
                rate = epoch_rate(ParticleDataset(source, transform=prep), args.batch_size, workers, args.chunk, files)
                entry["loaders"][f"lazy, {workers} workers"] = rate
                print(f"{box} px, lazy reader + chunk shuffle + preprocessing, {workers} workers: {rate}")
            for dtype in ("float16", "float32"):
                cache_path = work / f"box{box}" / f"cache_{dtype}.mrcs"
                info = ensure_cache(source, prep_settings, cache_path, dtype=dtype, batch_size=args.batch_size,
                                    num_workers=max(args.workers))
                entry[f"cache_{dtype}_build_per_s"] = round(n / max(info.seconds, 1e-9), 1)
                for workers in args.workers:
                    rate = epoch_rate(open_cache(info), args.batch_size, workers, args.chunk, [str(cache_path)])
                    entry["loaders"][f"cache-{dtype}, {workers} workers"] = rate
                    print(f"{box} px, cache {dtype} ({info.box} px) + chunk shuffle, {workers} workers: {rate}")
            slowest_loader = min(min(r.values()) for r in entry["loaders"].values())
            entry["min_ratio_to_training"] = {name: round(slowest_loader / rate, 1) for name, rate in training.items()}
            results["boxes"][str(box)] = entry
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
