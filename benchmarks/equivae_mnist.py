"""EquiVAE on MNIST: supervised and semi-supervised classification error (CPU-sized).

Trains EquiVAE on the first --n-train MNIST training digits (28x28, values in
[0, 1]) of which the first --labels carry their label (all of them with
--labels -1), then classifies the first --n-test test digits by the nearest
class mean of the invariant embedding (the paper's rule) and reports the error.

  python benchmarks/equivae_mnist.py --data-dir ../shared/data --out bench/equivae --labels 100,600,1000,3000,-1

Writes OUT/results.json and OUT/results.md (one row per label count).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large CPU tensors in huge pages

import torch

from particle_vae.data.memory import ArrayDataset, LabelledDataset
from particle_vae.data.mnist import load_mnist, resolve_mnist_dir
from particle_vae.engine.run import RunDirectory
from particle_vae.engine.run_config import RunConfig
from particle_vae.engine.trainer import Trainer, TrainSettings, seed_everything
from particle_vae.models import build_model
from particle_vae.models.base import load_learnable_state

# error rates of the paper (Feige 2019) for comparison: labels -> % error
PAPER_ERROR = {100: 8.90, 600: 3.99, 1000: 3.34, 3000: 2.23, -1: 0.82}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labels", default="100,1000,-1", help="comma-separated labelled counts; -1 = all (supervised)")
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    mnist = resolve_mnist_dir(None, args.data_dir)
    train_images, train_labels = load_mnist(mnist, "train")
    test_images, test_labels = load_mnist(mnist, "test")
    train_images = train_images[: args.n_train].astype(np.float32) / 255.0
    train_labels = train_labels[: args.n_train]
    test_images = test_images[: args.n_test].astype(np.float32) / 255.0
    test_labels = test_labels[: args.n_test]
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d"),
               "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
               "rows": []}
    for count in [int(c) for c in args.labels.split(",")]:
        seed_everything(args.seed)
        labels = train_labels.copy().astype(np.int64)
        if count >= 0:
            labels[count:] = -1
        model = build_model({"model": "equivae", "box": 28, "n_classes": 10, "hidden": args.hidden, "seed": args.seed})
        run = RunDirectory(args.out / f"labels_{count}")
        run.create(overwrite=True)
        settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, val_fraction=0.1, seed=args.seed,
                                 device=args.device, early_stop_patience=0)
        run.write_config(RunConfig(model=model.config_dict(), train=vars(settings), box=28, pixel_size=1.0,
                                   data={"kind": "mnist", "n": args.n_train, "labels": count}))
        trainer = Trainer(model, LabelledDataset(ArrayDataset(train_images), labels), settings, run)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        load_learnable_state(model, run.load_checkpoint("best")["model"])
        model.eval().to("cpu")
        with torch.no_grad():
            predicted = np.concatenate([
                model.readout(torch.from_numpy(test_images[i:i + 500])[:, None]).extra["predicted_class"].numpy()
                for i in range(0, len(test_images), 500)]).astype(np.int64) - 1
        error = float((predicted != test_labels).mean() * 100)
        labelled = args.n_train if count < 0 else count
        results["rows"].append({"labels": labelled, "error_percent": round(error, 2), "paper_error_percent": PAPER_ERROR.get(count),
                                "train_seconds": round(seconds, 1)})
        logging.info("%d labels: %.2f%% error (%.0f s)", labelled, error, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| labelled images | test error (ours) | paper (full MNIST, 60k) | train time (s) |", "|---|---|---|---|"]
    for row in results["rows"]:
        paper = "n/a" if row["paper_error_percent"] is None else f"{row['paper_error_percent']}%"
        lines.append(f"| {row['labels']} | {row['error_percent']}% | {paper} | {row['train_seconds']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
