"""Write a transformed-MNIST benchmark set with exact ground truth.

Kinds: mnist-n and mnist-u are TARGET-VAE's MNIST(N) and MNIST(U) (50x50,
rotation N(0, (pi/4)^2) or U(0, 2pi), shift N(0, 5^2) px per axis); so2 and se2
are MCE-VAE's SO(2)- and SE(2)-MNIST (28x28, rotation U(-90, 90) degrees, SE(2)
also shift U(-7, 7) px per axis). For each split this writes NAME_SPLIT.mrcs (the
images), NAME_SPLIT.star (RELION 3.1, with the true label and pose in pvaeTrue*
columns; rlnImageName relative to --project-dir, default the current folder)
and NAME_SPLIT.json (how the set was drawn). MNIST is read from local
IDX files (--mnist-dir, or the mnist/ folder of --data-dir / $PARTICLE_VAE_DATA).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from particle_vae.data.benchmarks import BENCHMARKS, benchmark_paths, make_benchmark, write_benchmark
from particle_vae.data.mnist import MNIST_FILES, SPLIT_SIZES, find_mnist_file, resolve_mnist_dir
from particle_vae.errors import ParticleVAEError
from particle_vae.io.atomic import check_output_path
from particle_vae.io.paths import project_folder

log = logging.getLogger("particle_vae.make_benchmark")


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the ``make-benchmark`` options on ``parser``."""
    parser.add_argument("kind", choices=list(BENCHMARKS), help="which benchmark set to write")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if needed)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mnist-dir", type=Path, metavar="DIR", help="folder holding the MNIST IDX files, .gz or raw (default: DATA/mnist of --data-dir)")
    source.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="reference-data folder with an mnist/ subfolder (default: $PARTICLE_VAE_DATA)")
    parser.add_argument("--split", choices=["train", "test", "both"], default="both", help="MNIST split(s) to transform")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="keep only the first N digits of each split (default: all, 60000 / 10000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; train and test use separate streams")
    parser.add_argument("--pixel-size", type=float, default=1.0, metavar="A",
                        help="Angstrom per pixel written to the MRC header and STAR")
    parser.add_argument("--name", default=None, metavar="STEM",
                        help="file name stem; files are STEM_SPLIT.* (default: the kind, e.g. mnist_n)")
    from particle_vae.cli import add_project_dir_option

    add_project_dir_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def main(args: argparse.Namespace) -> int:
    """Generate and write the requested split(s); returns 0 on success.

    Raises:
        ParticleVAEError: missing/corrupt MNIST, bad settings, or outputs that
            exist without ``--overwrite`` (reported as one line by the CLI).
    """
    splits = ["train", "test"] if args.split == "both" else [args.split]
    if args.n is not None:
        for split in splits:
            if not 1 <= args.n <= SPLIT_SIZES[split]:
                raise ParticleVAEError(f"--n {args.n} is out of range for the {split} split of {SPLIT_SIZES[split]} digits",
                                       None, f"choose 1 <= N <= {SPLIT_SIZES[split]}" + (" or --split train" if split == "test" else ""))
    if args.seed < 0:
        raise ParticleVAEError(f"--seed {args.seed} is negative", None, "pass an integer >= 0")
    if not args.pixel_size > 0:
        raise ParticleVAEError(f"--pixel-size {args.pixel_size} is not positive", None, "pass Angstrom per pixel, e.g. 1.0")
    mnist_root = resolve_mnist_dir(args.mnist_dir, args.data_dir)
    project = project_folder(args.project_dir)
    stem = args.name or args.kind.replace("-", "_")

    # Check every input and output before the (long) rendering starts.
    inputs = {split: tuple(find_mnist_file(mnist_root, name) for name in MNIST_FILES[split]) for split in splits}
    all_inputs = tuple(path for paths in inputs.values() for path in paths)
    for split in splits:
        for path in benchmark_paths(args.out, f"{stem}_{split}"):
            check_output_path(path, overwrite=args.overwrite, inputs=all_inputs)

    show_progress = False if getattr(args, "quiet", False) else None  # None: bar on a terminal only
    for split in splits:
        dataset = make_benchmark(args.kind, mnist_root, split, seed=args.seed, n=args.n, progress=show_progress)
        files = write_benchmark(dataset, args.out, f"{stem}_{split}", pixel_size=args.pixel_size,
                                overwrite=args.overwrite, inputs=all_inputs, project_dir=project)
        log.info("wrote %s %s: %d images of %dx%d px (seed %d) to %s, %s, %s", dataset.spec.title, split, len(dataset),
                 dataset.box, dataset.box, args.seed, files.stack, files.star, files.metadata)
    return 0
