"""Write a subset of a particle STAR: chosen classes and/or a box in latent space.

Keeps the chosen rows with all their columns, in input order, and the optics
block, so the subset goes straight back into RELION. --classes picks
rlnClassNumber values (as written by particle-vae analyze); --box keeps the
particles with MIN <= value <= MAX on each of two columns (--columns, default
pvaeZ1 pvaeZ2). Given both, a particle must pass both. rlnImageName names the
stacks relative to the folder RELION runs in (--project-dir, default the
current folder). The input is never overwritten. Examples:

  particle-vae select analysis/clustered_particles.star --classes 1 3 --out good.star
  particle-vae select particles_vae.star --box -1 1 -0.5 2 --out region.star
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.cli import add_project_dir_option, add_stack_dir_option

    parser.add_argument("star", type=Path, help="particle STAR (e.g. clustered_particles.star from particle-vae analyze)")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output STAR file")
    parser.add_argument("--classes", type=int, nargs="+", metavar="N", help="keep these class numbers (of --class-column) (default: all classes)")
    parser.add_argument("--class-column", default="rlnClassNumber", help="column holding the class numbers")
    parser.add_argument("--box", type=float, nargs=4, metavar=("Z1MIN", "Z1MAX", "Z2MIN", "Z2MAX"),
                        help="keep particles inside this range of the two --columns (inclusive) (default: no range)")
    parser.add_argument("--columns", nargs=2, metavar=("COL1", "COL2"), help="columns of --box (default: pvaeZ1 pvaeZ2)")
    add_stack_dir_option(parser, "folder holding the particle stacks that the STAR's rlnImageName names, to check and "
                                 "rewrite the names for the project folder (default: paths relative to the STAR's folder)")
    add_project_dir_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file (never the input)")


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from particle_vae.analysis.clustering import box_rows, class_rows
    from particle_vae.errors import InputFileError, ParticleVAEError
    from particle_vae.io.atomic import check_output_path
    from particle_vae.io.star import ParticleStar

    if args.classes is None and args.box is None:
        raise ParticleVAEError("nothing to select: give --classes N [N ...] and/or --box Z1MIN Z1MAX Z2MIN Z2MAX")
    if args.columns is not None and args.box is None:
        raise ParticleVAEError("--columns names the columns of --box; give --box too")
    from particle_vae.io.paths import project_folder, project_names_for_star

    project = project_folder(args.project_dir)
    out = check_output_path(args.out, overwrite=args.overwrite, inputs=(args.star,))
    star = ParticleStar(args.star)
    particles = star.particles.reset_index(drop=True)
    keep = np.ones(len(particles), dtype=bool)
    if args.classes is not None:
        try:
            chosen = class_rows(particles, args.classes, args.class_column)
        except KeyError:
            raise InputFileError(f"has no {args.class_column} column", args.star,
                                 "run 'particle-vae analyze' first and select from its clustered_particles.star") from None
        except ValueError as error:
            raise InputFileError(str(error), args.star, "choose classes that occur in the file") from None
        log.info("classes %s: %d of %d particles", " ".join(map(str, args.classes)), int(chosen.sum()), len(particles))
        keep &= chosen
    if args.box is not None:
        columns = list(args.columns or ["pvaeZ1", "pvaeZ2"])
        try:
            inside = box_rows(particles, columns, args.box)
        except KeyError as missing:
            available = [c for c in particles.columns if str(c).startswith("pvae")]
            hint = f"columns available: {', '.join(available[:12])}" if available else "pass --columns with two numeric columns of the file"
            raise InputFileError(f"has no column {missing.args[0]}", args.star, hint) from None
        except ValueError as error:
            raise InputFileError(str(error), args.star) from None
        log.info("%s in [%g, %g], %s in [%g, %g]: %d of %d particles", columns[0], args.box[0], args.box[1], columns[1],
                 args.box[2], args.box[3], int(inside.sum()), len(particles))
        keep &= inside
    if not keep.any():
        raise ParticleVAEError(f"{args.star}: no particle matches the selection; widen --box or choose other --classes")
    from particle_vae.engine.inference import kept_pose_text

    names = project_names_for_star(args.star, project, args.stack_dir)
    kept = kept_pose_text(star, names)  # a 3D refinement's pose columns byte for byte, as the input has them
    if names or kept:
        star = star.with_columns({**names, **kept})
    subset = star.subset(keep)
    subset.write(out, overwrite=True)
    log.info("wrote %s (%d of %d particles, %d columns%s)", out, int(keep.sum()), len(particles), len(particles.columns),
             ", optics kept" if subset.optics is not None else "")
    return 0
