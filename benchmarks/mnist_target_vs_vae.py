"""CPU-sized MNIST benchmark: TARGET-VAE against the other models trained the same way.

Models (--models): target-vae, vae, beta-vae (beta 4), spatial-vae, mce-vae.

Trains each model on the first --n-train images of a benchmark's training split
(10% of them held out for validation), then scores the first --n-test images of
the test split: rotation correlation, translation correlation (relative to the
untransformed digit, as in the TARGET-VAE paper) and clustering accuracy
(k-means with 10 clusters on the latent means, Hungarian matching).

  python benchmarks/mnist_target_vs_vae.py --data-dir ../shared/data --out bench/mnist_u

Writes OUT/<model>/ (run directories), OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large CPU tensors in huge pages

import torch

from particle_vae.analysis.evaluate import evaluate_transformed_set
from particle_vae.data.benchmarks import make_benchmark
from particle_vae.data.memory import ArrayDataset
from particle_vae.data.mnist import load_mnist, resolve_mnist_dir
from particle_vae.engine.presets import BENCHMARK_THETA_PRIOR
from particle_vae.engine.run import RunDirectory
from particle_vae.engine.run_config import RunConfig
from particle_vae.engine.trainer import Trainer, TrainSettings, seed_everything
from particle_vae.models import build_model

log = logging.getLogger("benchmark")


def model_configs(args, box: int) -> dict[str, dict]:
    prior, prior_std = BENCHMARK_THETA_PRIOR[args.dataset]
    target = {"model": "target-vae", "box": box, "zdim": args.zdim, "group_order": args.group, "n_fields": args.fields,
              "kernel": args.kernel, "padding": args.padding, "gen_hidden": args.gen_hidden, "gen_layers": 2,
              "n_fourier": args.fourier, "translation_prior_std": 5.0, "theta_prior": prior, "likelihood": "bernoulli",
              "seed": args.seed}
    if prior_std is not None:
        target["theta_prior_std"] = prior_std
    vae = {"model": "vae", "box": box, "zdim": args.zdim, "hidden": args.vae_hidden, "layers": 2, "beta": 1.0,
           "likelihood": "bernoulli"}
    spatial = {"model": "spatial-vae", "box": box, "zdim": args.zdim, "encoder": "mlp", "enc_hidden": args.vae_hidden,
               "enc_layers": 2, "gen_hidden": args.gen_hidden, "gen_layers": 2, "n_fourier": args.fourier,
               "translation_prior_std": 5.0, "theta_prior": prior, "likelihood": "bernoulli", "seed": args.seed}
    if prior_std is not None:
        spatial["theta_prior_std"] = prior_std
    mce = {"model": "mce-vae", "box": box, "zdim": args.zdim, "n_clusters": 10, "cluster_dim": args.cluster_dim,
           "group": "so2" if args.dataset == "so2" else "se2", "dec_hidden": args.vae_hidden, "likelihood": "bernoulli"}
    return {"target-vae": target, "vae": vae, "beta-vae": {**vae, "model": "beta-vae", "beta": 4.0},
            "spatial-vae": spatial, "mce-vae": mce}


def train_model(config: dict, images, run_dir: Path, *, epochs: int, batch_size: int, lr: float, seed: int,
                device: str = "auto", data_meta: dict | None = None):
    """Train one model on ``images`` ``(N, H, W)`` into ``run_dir`` (10% held out).

    Returns ``(model with its best checkpoint loaded, metrics rows, train seconds, torch device)``.
    """
    from particle_vae.models.base import load_learnable_state

    seed_everything(seed)
    model = build_model(config)
    run = RunDirectory(run_dir)
    run.create(overwrite=True)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=0.1, seed=seed, device=device,
                             early_stop_patience=0)
    run.write_config(RunConfig(model=model.config_dict(), train=vars(settings), data=data_meta or {}, pixel_size=1.0,
                               box=int(images.shape[-1])))
    trainer = Trainer(model, ArrayDataset(images), settings, run)
    start = time.perf_counter()
    rows = trainer.fit()
    seconds = time.perf_counter() - start
    load_learnable_state(model, run.load_checkpoint("best")["model"])
    return model, rows, seconds, trainer.device


def train_and_score(name: str, config: dict, train_set, test_set, canonical, run_dir: Path, *, epochs: int,
                    batch_size: int, lr: float, seed: int, device: str = "auto", data_meta: dict | None = None) -> dict:
    """Train ``config`` on ``train_set.images`` and score it on ``test_set`` (poses relative to ``canonical``).

    Returns the results entry: ``scores`` (rotation/translation correlation, clustering accuracy, n),
    ``train_seconds``, ``final_val_elbo``, ``parameters``.
    """
    model, rows, seconds, torch_device = train_model(config, train_set.images, run_dir, epochs=epochs,
                                                     batch_size=batch_size, lr=lr, seed=seed, device=device,
                                                     data_meta=data_meta)
    scores = evaluate_transformed_set(model, test_set.images, canonical, test_set.alpha, test_set.displacement,
                                      test_set.labels, device=torch_device, seed=seed)
    log.info("%s: %s (%.0f s)", name, scores.as_dict(), seconds)
    return {"scores": scores.as_dict(), "train_seconds": round(seconds, 1), "final_val_elbo": rows[-1].get("val_elbo"),
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="reference-data folder holding mnist/ (or $PARTICLE_VAE_DATA)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="mnist-u", choices=sorted(BENCHMARK_THETA_PRIOR))
    parser.add_argument("--models", default="target-vae,vae")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--zdim", type=int, default=2)
    parser.add_argument("--fields", type=int, default=16)
    parser.add_argument("--kernel", type=int, default=28)
    parser.add_argument("--padding", type=int, default=8)
    parser.add_argument("--gen-hidden", type=int, default=128)
    parser.add_argument("--fourier", type=int, default=64)
    parser.add_argument("--vae-hidden", type=int, default=512)
    parser.add_argument("--cluster-dim", type=int, default=5, help="MCE-VAE cluster latent size (paper: 10)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    mnist_dir = resolve_mnist_dir(None, args.data_dir)
    train_set = make_benchmark(args.dataset, mnist_dir, split="train", seed=args.seed, n=args.n_train)
    test_set = make_benchmark(args.dataset, mnist_dir, split="test", seed=args.seed, n=args.n_test)
    test_digits, _ = load_mnist(mnist_dir, "test")
    canonical = test_set.canonical_images(test_digits)
    configs = model_configs(args, train_set.box)
    unknown = set(args.models.split(",")) - set(configs)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(configs)}")
    results = {"settings": vars(args) | {"data_dir": str(args.data_dir), "out": str(args.out)},
               "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in args.models.split(","):
        results["models"][name] = train_and_score(
            name, configs[name], train_set, test_set, canonical, args.out / name,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
            data_meta={"kind": "benchmark", "benchmark": args.dataset, "mnist_dir": str(mnist_dir), "split": "train",
                       "n": args.n_train, "seed": args.seed})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    def fmt(value: float) -> str:
        return "n/a" if value != value else f"{value:.3f}"

    lines = ["| model | rotation corr. | translation corr. | clustering acc. | val ELBO | params | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        s = entry["scores"]
        lines.append(f"| {name} | {fmt(s['rotation_correlation'])} | {fmt(s['translation_correlation'])} | "
                     f"{100 * s['clustering_accuracy']:.1f}% | {entry['final_val_elbo']:.1f} | {entry['parameters']} | {entry['train_seconds']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
