"""The TARGET-VAE paper's MNIST tables (Nasiri & Bepler, NeurIPS 2022), one command per table.

  python benchmarks/paper_tables.py --table 1 --preset quick --data-dir ../shared/data \\
      --out benchmarks/results/table1_quick.json

Tables (all on the transformed-MNIST benchmarks of particle_vae.data.benchmarks):

  1  pose recovery: circular correlation of predicted and true rotation, Pearson
     correlation of predicted and true translation (both relative to the
     prediction on the untransformed digit), on MNIST(N) and MNIST(U), for
     spatial-VAE and TARGET-VAE with P4, P8 and P16 (z = 2).
  2  clustering accuracy on MNIST(U) (k-means with k = 10 on the latent means,
     Hungarian matching): VAE, beta-VAE (beta 4), spatial-VAE, TARGET-VAE P8
     with z = 2 and z = 32.
  3  per-digit rotation RMSE (degrees) of TARGET-VAE P8 trained on MNIST(U):
     each test digit, centred, is turned through --rotations evenly spaced
     angles and the spread of the rotation error around its circular mean is
     measured (particle_vae.analysis.metrics.rotation_sweep_rmse).
  4  ablations of TARGET-VAE P8 on MNIST(U): the full model; without the
     sub-pixel translation offset; discrete rotations only (no continuous
     offset); no inference over rotation (group convolutions pooled over
     rotations); ordinary convolutions (translation only).

Presets: ``quick`` is sized for a 2-core CPU (10-15 minutes per table: 1,500
to 2,000 training images, 2-3 epochs, 8 fields, a 2 x 64 generator; see
QUICK_PER_TABLE); ``paper`` is the paper's model
size on all 60,000 training images (GPU; the number of epochs, 100, is our
choice). Any preset value can be overridden (--n-train, --epochs, ...).

Writes OUT (JSON: settings, hardware, date, one entry per row), OUT with
suffix .md (the markdown table, also printed) and run directories under
--work (default: OUT without suffix, i.e. benchmarks/results/table1_quick/).
Training and scoring reuse benchmarks/mnist_target_vs_vae.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large CPU tensors in huge pages

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mnist_target_vs_vae as base  # noqa: E402

from particle_vae.analysis.evaluate import rotation_rmse_per_label  # noqa: E402
from particle_vae.data.benchmarks import make_benchmark  # noqa: E402
from particle_vae.data.mnist import load_mnist, resolve_mnist_dir  # noqa: E402

log = logging.getLogger("paper_tables")

#: Training and model sizes of each preset (every key is also a command-line override).
RUN_SIZES: dict[str, dict] = {
    "quick": {"n_train": 2000, "n_test": 500, "epochs": 4, "batch_size": 64, "lr": 1e-3, "fields": 8, "kernel": 28,
              "padding": 8, "gen_hidden": 64, "fourier": 32, "vae_hidden": 256, "rotations": 160,
              "rotation_images": 200},
    "paper": {"n_train": 60000, "n_test": 10000, "epochs": 100, "batch_size": 100, "lr": 1e-4, "fields": 128,
              "kernel": 28, "padding": 8, "gen_hidden": 512, "fourier": 256, "vae_hidden": 512, "rotations": 160,
              "rotation_images": 10000},
}

#: Per-table changes to the quick preset, so that each table takes 10-15 minutes on 2 CPU cores
#: (Table 1 trains eight models, four of them P16/P8 TARGET-VAEs; Table 3 one model plus the sweep).
QUICK_PER_TABLE: dict[int, dict] = {1: {"n_train": 1500, "epochs": 2}, 2: {"n_train": 2000, "epochs": 2},
                                    3: {"n_train": 2000, "epochs": 3, "rotation_images": 100},
                                    4: {"n_train": 1500, "epochs": 2}}

#: TARGET-VAE ablations of Table 4: name -> changes to the full model's config.
ABLATIONS: dict[str, dict] = {
    "full": {"subpixel": True},  # every part, the sub-pixel offset (off by default since 2026-12-06) included
    "no-subpixel": {"subpixel": False},
    "discrete-rotation": {"rotation": "discrete"},
    "no-rotation-inference": {"rotation": "none"},
    "plain-conv": {"encoder": "plain", "rotation": "none"},
}


def table_rows(table: int) -> list[tuple[str, str, str, dict]]:
    """The rows of a table: ``(row name, dataset, base model, config changes)``."""
    if table == 1:
        rows = []
        for dataset in ("mnist-n", "mnist-u"):
            rows.append((f"{dataset}/spatial-vae", dataset, "spatial-vae", {}))
            rows += [(f"{dataset}/target-vae-p{r}", dataset, "target-vae", {"group_order": r}) for r in (4, 8, 16)]
        return rows
    if table == 2:
        return [("vae", "mnist-u", "vae", {}), ("beta-vae", "mnist-u", "beta-vae", {}),
                ("spatial-vae", "mnist-u", "spatial-vae", {}), ("target-vae-p8-z2", "mnist-u", "target-vae", {}),
                ("target-vae-p8-z32", "mnist-u", "target-vae", {"zdim": 32})]
    if table == 3:
        return [("target-vae-p8", "mnist-u", "target-vae", {})]
    if table == 4:
        return [(name, "mnist-u", "target-vae", changes) for name, changes in ABLATIONS.items()]
    raise ValueError(f"unknown table {table}")


def _settings(args) -> argparse.Namespace:
    """The namespace mnist_target_vs_vae.model_configs reads (z = 2, P8 unless a row changes them)."""
    return argparse.Namespace(zdim=2, group=8, fields=args.fields, kernel=args.kernel, padding=args.padding,
                              gen_hidden=args.gen_hidden, fourier=args.fourier, vae_hidden=args.vae_hidden,
                              cluster_dim=5, seed=args.seed, dataset=None)


def _fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def markdown(table: int, rows: dict) -> str:
    """The markdown table of one result set."""
    if table == 1:
        lines = ["| model | MNIST(N) rotation | MNIST(N) translation | MNIST(U) rotation | MNIST(U) translation |",
                 "|---|---|---|---|---|"]
        for model in ("spatial-vae", "target-vae-p4", "target-vae-p8", "target-vae-p16"):
            cells = []
            for dataset in ("mnist-n", "mnist-u"):
                entry = rows.get(f"{dataset}/{model}")
                scores = entry["scores"] if entry else {}
                cells += [_fmt(scores.get("rotation_correlation")), _fmt(scores.get("translation_correlation"))]
            if any(cell != "n/a" for cell in cells):
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    if table == 3:
        lines = ["| model | " + " | ".join(f"digit {d}" for d in range(10)) + " | all |", "|---" * 12 + "|"]
        for name, entry in rows.items():
            per = entry["rotation_rmse"]["per_label_deg"]
            lines.append(f"| {name} | " + " | ".join(f"{per[str(d)]:.1f}" if str(d) in per else "n/a" for d in range(10))
                         + f" | {entry['rotation_rmse']['mean_deg']:.1f} |")
        return "\n".join(lines)
    lines = ["| model | rotation corr. | translation corr. | clustering acc. | val ELBO | params | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in rows.items():
        s = entry["scores"]
        lines.append(f"| {name} | {_fmt(s['rotation_correlation'])} | {_fmt(s['translation_correlation'])} | "
                     f"{_fmt(s['clustering_accuracy'], percent=True)} | {_fmt(entry['final_val_elbo'])} | "
                     f"{entry['parameters']:,} | {entry['train_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=int, choices=(1, 2, 3, 4), required=True)
    parser.add_argument("--preset", choices=sorted(RUN_SIZES), default="quick")
    parser.add_argument("--data-dir", type=Path, help="reference-data folder holding mnist/ (or $PARTICLE_VAE_DATA)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (the markdown table goes beside it, .md)")
    parser.add_argument("--work", type=Path, help="folder for the run directories (default: OUT without suffix)")
    parser.add_argument("--rows", help="comma-separated subset of the table's rows (default all)")
    for key, value in RUN_SIZES["quick"].items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), help=f"override the preset's {key}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = dict(RUN_SIZES[args.preset])
    if args.preset == "quick":
        preset.update(QUICK_PER_TABLE[args.table])
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = args.work or args.out.with_suffix("")

    rows = table_rows(args.table)
    if args.rows:
        wanted = args.rows.split(",")
        unknown = set(wanted) - {row[0] for row in rows}
        if unknown:
            parser.error(f"unknown row(s) {sorted(unknown)}; table {args.table} has {[row[0] for row in rows]}")
        rows = [row for row in rows if row[0] in wanted]

    mnist_dir = resolve_mnist_dir(None, args.data_dir)
    test_digits, _ = load_mnist(mnist_dir, "test")
    sets: dict[str, tuple] = {}
    results = {"table": args.table, "preset": args.preset,
               "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
               "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                            "torch": torch.__version__},
               "date": time.strftime("%Y-%m-%d"), "rows": {}}
    started = time.perf_counter()
    for name, dataset, model_name, changes in rows:
        if dataset not in sets:
            train_set = make_benchmark(dataset, mnist_dir, split="train", seed=args.seed, n=args.n_train)
            test_set = make_benchmark(dataset, mnist_dir, split="test", seed=args.seed, n=args.n_test)
            sets[dataset] = (train_set, test_set, test_set.canonical_images(test_digits))
        train_set, test_set, canonical = sets[dataset]
        settings = _settings(args)
        settings.dataset = dataset
        config = {**base.model_configs(settings, train_set.box)[model_name], **changes}
        log.info("table %d, row %s: %s", args.table, name, config)
        meta = {"kind": "benchmark", "benchmark": dataset, "mnist_dir": str(mnist_dir), "split": "train",
                "n": args.n_train, "seed": args.seed}
        run_dir = work / name.replace("/", "_")
        if args.table == 3:
            model, history, seconds, device = base.train_model(config, train_set.images, run_dir, epochs=args.epochs,
                                                               batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                                               device=args.device, data_meta=meta)
            sweep_set = make_benchmark(dataset, mnist_dir, split="test", seed=args.seed, n=args.rotation_images)
            rmse = rotation_rmse_per_label(model, sweep_set.canonical_images(test_digits), sweep_set.labels,
                                           n_rotations=args.rotations, device=device)
            entry = {"rotation_rmse": rmse, "train_seconds": round(seconds, 1),
                     "final_val_elbo": history[-1].get("val_elbo"), "parameters": sum(p.numel() for p in model.parameters())}
            log.info("%s: mean rotation RMSE %.1f degrees", name, rmse["mean_deg"])
        else:
            entry = base.train_and_score(name, config, train_set, test_set, canonical, run_dir, epochs=args.epochs,
                                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                                         data_meta=meta)
        entry["config"] = config
        results["rows"][name] = entry
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    text = markdown(args.table, results["rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    log.info("table %d (%s preset) in %.0f s; wrote %s", args.table, args.preset, results["total_seconds"], args.out)
    return results


if __name__ == "__main__":
    main()
