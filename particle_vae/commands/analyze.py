"""Cluster the latents of an inferred STAR; write class averages, plots and a record.

INPUT is a STAR written by `particle-vae infer` (it has pvaeZ1..k columns), or
a run directory together with --star. The latent means are clustered (k-means,
Gaussian mixture or Ward; --k auto scores a range of k); when infer refined the
poses (pvaeRefineClass) and --k is below the number of its classes, those
classes are kept whole and grouped by their mean latent and their mass instead
(--classes-from, --mass-tolerance), and OUT receives:

  clustered_particles.star   the input (all columns, optics) with rlnClassNumber (1-based); rlnImageName
                             resolves from the folder RELION runs in (--project-dir, default the current one)
  analysis.json              method, k (with --k auto: how strongly the data support it), scores,
                             per-class counts, settings, files
  class_averages.mrcs/.star  per class, the mean of its particles with the written pose undone (pvaeAnglePsi,
                             pvaeOriginX/YAngst when infer put its pose there, else the RELION columns)
                             (then centred on its centre of mass, origins updated; --no-center: not)
  class_averages.png         the averages (and, with a run, the decoded cluster centres)
  cluster_centres.mrcs       with a run: the generator at each cluster centre, pose zero (centred on its
                             centre of mass like the averages; --no-center: as drawn)
  latent_scatter.png/.csv    latent means coloured by class (PCA beyond 2 dimensions)
  latent_tsne.png/.csv       with --tsne
  latent_traversal.png/.npz  with a run: a grid through two latent dimensions, pose zero
  pose_histograms.png/.csv   rlnAnglePsi and shifts
  training_curves.png/.csv   with a run: from its metrics.jsonl
  gallery.png/.npz           the first aligned particles of each class

With a run, particles are read with the run's preprocessing (images in the
model's box); without one, raw particles normalised with --normalize. See
docs/analysis.md. Example:

  particle-vae analyze run1/particles_vae.star --run run1 --k auto --out run1/analysis
"""

from __future__ import annotations

import argparse
from pathlib import Path

from particle_vae.engine.presets import MASS_TOLERANCE


def _k_value(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.cli import add_project_dir_option, add_stack_dir_option

    parser.add_argument("input", type=Path, help="STAR written by particle-vae infer, or a run directory (then give --star)")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument("--star", type=Path, help="the inferred STAR, when INPUT is a run directory (default: none)")
    parser.add_argument("--run", type=Path, help="run directory that wrote the STAR: enables decoded centres, traversal, "
                                                 "training curves, and reads particles with its preprocessing (default: none)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best", help="checkpoint of the run")
    parser.add_argument("--method", choices=["kmeans", "gmm", "ward"],
                        help="clustering method of the latents (default: kmeans; gmm or ward also mean the latents are "
                             "clustered, not the refinement classes, under --classes-from auto)")
    parser.add_argument("--classes-from", choices=["auto", "latents", "refinement"], default="auto",
                        help="what is clustered: the particles' latents, or the classes of infer's pose refinement (kept whole, "
                             "grouped by their mean latent and mass with k-means; purer where the refinement separated what the latents "
                             "mix); auto: the refinement classes when the STAR has infer's pvaeRefineClass column, --k is a "
                             "number below their count and --method is kmeans or not given, else the latents (default: auto)")
    parser.add_argument("--mass-tolerance", type=float, default=MASS_TOLERANCE, metavar="F",
                        help="when refinement classes are grouped: the relative difference of their masses (infer's "
                             "pvaeRefineClassMass, the integrated density of each class reference, the same for every view of "
                             "one structure) that counts as much as one prior standard deviation of the mean latent; 0 groups "
                             "by the latents alone")
    parser.add_argument("--k", type=_k_value, default="auto",
                        help="number of clusters, or auto: gmm by the lowest BIC (k = 1 included); kmeans/ward test one population "
                             "against several with the gap statistic, then take the highest silhouette (see docs/analysis.md)")
    parser.add_argument("--k-range", type=int, nargs=2, metavar=("KMIN", "KMAX"),
                        help="k searched by --k auto (default: 1 10, capped by the number of particles)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of clustering, the k test and embeddings")
    parser.add_argument("--tsne", action="store_true", help="also draw a t-SNE embedding of the latents (slower)")
    parser.add_argument("--gallery", type=int, default=6, metavar="G", help="particles shown per class in gallery.png, 0 for none")
    parser.add_argument("--traverse", type=int, nargs="+", metavar="DIM",
                        help="latent dimensions (1-based, one or two) of the traversal grid (default: 1 2, or 1 for one latent)")
    parser.add_argument("--traversal-steps", type=int, default=7, help="values per traversed dimension")
    parser.add_argument("--normalize", choices=["background", "zscore", "minmax", "none"], default="background",
                        help="per-image normalisation of raw particles when no run is given")
    parser.add_argument("--no-images", action="store_true", help="do not read particle images (no class averages or gallery)")
    parser.add_argument("--no-center", action="store_true",
                        help="keep the class averages where the poses put them; by default each aligned average is moved "
                             "to put its centre of mass on the box centre and the particles' origins are changed to match")
    add_stack_dir_option(parser)
    add_project_dir_option(parser)
    parser.add_argument("--pixel-size", type=float, metavar="A",
                        help="the particles' pixel size, Angstrom (default: the STAR's, else the stack header's)")
    parser.add_argument("--batch-size", type=int, default=256, help="particles read at once")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never the input)")


def _resolve_inputs(args) -> tuple[Path, Path | None]:
    """The STAR and run (or ``None``) that INPUT, ``--star`` and ``--run`` name (their existence is
    checked by :func:`particle_vae.api.analyze`)."""
    from particle_vae.errors import InputFileError, ParticleVAEError

    path = args.input
    if not path.exists():
        raise InputFileError("not found", path, "give a STAR written by particle-vae infer, or a run directory with --star")
    if path.is_dir():
        if args.run is not None:
            raise ParticleVAEError(f"{path}: is a run directory and --run was also given; give one of them")
        if args.star is None:
            raise ParticleVAEError(f"{path}: is a run directory; pass --star with the STAR written by "
                                   f"'particle-vae infer {path} --out FILE.star'")
        return args.star, path
    if args.star is not None:
        raise ParticleVAEError(f"{path}: INPUT is already a STAR file; use --star only with a run directory as INPUT")
    return path, args.run


def request(args: argparse.Namespace):
    """The :class:`particle_vae.api.AnalyzeRequest` that ``args`` (this command's options) describe."""
    from particle_vae.api import AnalyzeRequest

    star, run = _resolve_inputs(args)
    return AnalyzeRequest(
        star=star, out=args.out, run=run, checkpoint=args.checkpoint, method=args.method, classes_from=args.classes_from,
        mass_tolerance=args.mass_tolerance, k=args.k, k_range=None if args.k_range is None else tuple(args.k_range), seed=args.seed,
        tsne=args.tsne, gallery=args.gallery, traverse=args.traverse, traversal_steps=args.traversal_steps, normalize=args.normalize,
        images=not args.no_images, centre=not args.no_center, stack_dir=args.stack_dir, project_dir=args.project_dir,
        pixel_size=args.pixel_size, batch_size=args.batch_size, overwrite=args.overwrite)


def main(args: argparse.Namespace) -> int:
    """Run the analysis ``args`` describe (:func:`particle_vae.api.analyze`); returns 0."""
    from particle_vae import api

    api.analyze(request(args))
    return 0
