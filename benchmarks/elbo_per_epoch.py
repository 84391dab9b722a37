"""ELBO per epoch of TARGET-VAE at the paper's optimiser settings, for comparisons with the authors' code.

Trains TARGET-VAE (P8, z = 2, 16 encoder fields, kernel 28, padding 8, a 2 x 128
generator) with Adam at lr 2e-4 and batch 100 on the first --n MNIST(U) training
images (10% of them held out for validation) for --epochs epochs, in float32 on
the CPU, and prints the mean training and validation ELBO (nats per image)
after every epoch. The generator's random Fourier features (--fourier-bandwidth,
cycles per pixel; --fourier-features, frequencies, each giving a cosine and a
sine; --learnable-fourier) and the other differences from the authors' code
that we measured (--extra-validation: all N images train, as theirs do;
--no-subpixel: no offset inside a translation cell, as theirs has none;
--leaky-relu-slope: theirs is 0.01) are options, so that each setting can be
compared with another:

  OMP_NUM_THREADS=1 python benchmarks/elbo_per_epoch.py --data-dir ../shared/data \\
      --fourier-bandwidth 0.16 --label "authors' scale" --out benchmarks/results/elbo_per_epoch_cpu.json

Every run adds (or replaces) its --label entry in the --out JSON (per epoch:
ELBO, reconstruction and KL terms, seconds), so several settings accumulate in
one file; the run's table is printed at the end. docs/benchmarks.md has the
results.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large CPU tensors in huge pages

import torch
from torch import nn

from particle_vae.data.benchmarks import make_benchmark
from particle_vae.data.memory import ArrayDataset
from particle_vae.data.mnist import resolve_mnist_dir
from particle_vae.engine.presets import BENCHMARK_THETA_PRIOR
from particle_vae.engine.run import RunDirectory
from particle_vae.engine.run_config import RunConfig
from particle_vae.engine.trainer import Trainer, TrainSettings, seed_everything
from particle_vae.models import build_model

log = logging.getLogger("benchmark")

#: the per-epoch values kept from the trainer's metrics rows
KEPT_METRICS = ("train_elbo", "val_elbo", "train_recon", "val_recon", "train_kl_pose", "val_kl_pose", "train_kl_theta",
                "val_kl_theta", "train_kl_z", "val_kl_z", "train_kl_offset", "val_kl_offset", "time_s", "lr")


def model_config(args: argparse.Namespace, box: int) -> dict:
    """The TARGET-VAE config of this comparison (pixels, cycles per pixel)."""
    prior, prior_std = BENCHMARK_THETA_PRIOR["mnist-u"]
    config = {"model": "target-vae", "box": box, "zdim": args.zdim, "group_order": args.group, "n_fields": args.fields,
              "kernel": args.kernel, "padding": args.padding, "mixing": "shared", "gen_hidden": args.gen_hidden,
              "gen_layers": args.gen_layers, "n_fourier": args.fourier_features, "fourier_bandwidth": args.fourier_bandwidth,
              "translation_prior_std": args.translation_prior_std, "theta_prior": prior, "likelihood": "bernoulli",
              "subpixel": not args.no_subpixel, "seed": args.seed}
    if prior_std is not None:
        config["theta_prior_std"] = prior_std
    if args.leaky_relu_slope is not None:
        config["leaky_relu_slope"] = args.leaky_relu_slope
    return config


def make_fourier_learnable(model: nn.Module) -> None:
    """Turn the generator's fixed Fourier frequencies into a trained parameter (same initial values)."""
    features = model.generator.features
    frequencies = features.frequencies.detach().clone()
    del features.frequencies
    features.frequencies = nn.Parameter(frequencies)


def validation_fraction(args: argparse.Namespace) -> float:
    """Share of the loaded images held out: 10% of --n, or --extra-validation images loaded beyond --n."""
    if args.extra_validation is None:
        return 0.1
    return args.extra_validation / (args.n + args.extra_validation)


def train(args: argparse.Namespace, images: np.ndarray) -> list[dict]:
    """Train one model on ``images`` ``(N, 50, 50)`` in [0, 1]; returns one dict of :data:`KEPT_METRICS`
    per epoch (ELBO and its terms in nats per image, seconds)."""
    seed_everything(args.seed)
    model = build_model(model_config(args, int(images.shape[-1])))
    if args.learnable_fourier:
        make_fourier_learnable(model)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             val_fraction=validation_fraction(args), seed=args.seed, device="cpu", precision="fp32",
                             early_stop_patience=0)
    with tempfile.TemporaryDirectory(prefix="elbo_per_epoch_") as folder:
        run = RunDirectory(Path(folder) / "run")
        run.create(overwrite=True)
        run.write_config(RunConfig(model=model.config_dict(), train=vars(settings), data={}, pixel_size=1.0,
                                   box=int(images.shape[-1])))
        rows = Trainer(model, ArrayDataset(images), settings, run).fit()
    return [{key: row[key] for key in KEPT_METRICS if key in row} | {"epoch": row["epoch"] + 1} for row in rows]


def add_entry(path: Path, label: str, entry: dict) -> None:
    """Add (or replace) ``label`` in the JSON file ``path``, holding a lock on it: runs of several
    settings may end at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        results = json.loads(text) if text.strip() else {}
        results[label] = entry
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(results, indent=2) + "\n")


def table(entries: dict[str, dict]) -> str:
    """Markdown table: one column pair (train / validation ELBO) per label, one row per epoch."""
    labels = list(entries)
    epochs = max(len(entry["epochs"]) for entry in entries.values())
    lines = ["| epoch | " + " | ".join(f"{label} train / val" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for epoch in range(epochs):
        cells = []
        for label in labels:
            rows = entries[label]["epochs"]
            cells.append(f"{rows[epoch]['train_elbo']:.0f} / {rows[epoch]['val_elbo']:.0f}" if epoch < len(rows) else "")
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="reference-data folder holding mnist/ (default: $PARTICLE_VAE_DATA)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file; this run's --label entry is added or replaced")
    parser.add_argument("--label", help="name of this setting in --out (default: from the Fourier settings)")
    parser.add_argument("--n", type=int, default=2000,
                        help="first N MNIST(U) training images, 10%% of them held out for validation (default: 2000)")
    parser.add_argument("--extra-validation", type=int, metavar="M",
                        help="load the first N + M images and hold M of them out, so that N train (the authors' code "
                             "trains on all its N images and tests on others) (default: hold out 10%% of the N)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs (default: 4)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per step (default: 100, the paper's)")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: 2e-4, the paper's)")
    parser.add_argument("--group", type=int, default=8, help="rotation group order r of P_r (default: 8)")
    parser.add_argument("--zdim", type=int, default=2, help="semantic latent dimensions (default: 2)")
    parser.add_argument("--fields", type=int, default=16, help="encoder fields (default: 16; paper: 128)")
    parser.add_argument("--kernel", type=int, default=28, help="encoder kernel, pixels (default: 28)")
    parser.add_argument("--padding", type=int, default=8, help="encoder padding, pixels (default: 8)")
    parser.add_argument("--gen-hidden", type=int, default=128, help="generator width (default: 128; paper: 512)")
    parser.add_argument("--gen-layers", type=int, default=2, help="generator layers (default: 2)")
    parser.add_argument("--fourier-features", type=int, default=512,
                        help="Fourier frequencies, each a cosine and a sine (default: 512, the mnist preset's)")
    parser.add_argument("--fourier-bandwidth", type=float, default=0.1,
                        help="std of the Fourier frequencies, cycles per pixel (default: 0.1; the authors': about 0.16)")
    parser.add_argument("--learnable-fourier", action="store_true", help="train the Fourier frequencies too")
    parser.add_argument("--no-subpixel", action="store_true",
                        help="no continuous translation offset inside a cell (the paper has none; ours is on by default)")
    parser.add_argument("--leaky-relu-slope", type=float,
                        help="negative slope of every LeakyReLU (default: ours, 0.2; the authors' code: 0.01, PyTorch's default)")
    parser.add_argument("--translation-prior-std", type=float, default=5.0, help="std of p(t), pixels (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data order, initialisation and sampling (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    label = args.label or (f"bandwidth {args.fourier_bandwidth:g}, {args.fourier_features} frequencies"
                           + (", learnable" if args.learnable_fourier else ""))

    n_images = args.n + (args.extra_validation or 0)
    train_set = make_benchmark("mnist-u", resolve_mnist_dir(None, args.data_dir), split="train", seed=0, n=n_images)
    start = time.perf_counter()
    epochs = train(args, train_set.images)
    entry = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.perf_counter() - start, 1),
             "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
             "epochs": epochs}
    add_entry(args.out, label, entry)
    print(table({label: entry}))
    return entry


if __name__ == "__main__":
    main()
