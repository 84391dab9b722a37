"""Plot per-epoch curves of several runs on one figure (e.g. reconstruction loss).

  python benchmarks/plot_curves.py bench/so2/mce-vae bench/so2/spatial-vae bench/so2/beta-vae \\
      --metric val_recon --out docs/images/so2_reconstruction.png

Each RUN is a run directory (its metrics.jsonl is read); the legend uses the
folder names. The numbers plotted are also written next to the PNG as CSV.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from particle_vae.engine.run import RunDirectory  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--metric", default="val_recon", help="metrics.jsonl key (default val_recon: negative log-likelihood, nats)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    figure, axes = plt.subplots(figsize=(6, 4))
    rows = []
    for run in args.runs:
        metrics = RunDirectory(run).read_metrics()
        epochs = [m["epoch"] + 1 for m in metrics if args.metric in m]
        values = [m[args.metric] for m in metrics if args.metric in m]
        if not values:
            raise SystemExit(f"{run}: no {args.metric} in metrics.jsonl")
        axes.plot(epochs, values, marker="o", label=run.name)
        rows += [(run.name, e, v) for e, v in zip(epochs, values)]
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"{args.metric} (nats per image)")
    axes.set_title(args.title or f"{args.metric} per epoch")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    with open(args.out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "epoch", args.metric])
        writer.writerows(rows)
    return args.out


if __name__ == "__main__":
    main()
