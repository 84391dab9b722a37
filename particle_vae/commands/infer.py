"""Read out per-particle pose and latents with a trained run; write a STAR file.

By default the model's poses are then refined by a likelihood search against
class references (seeded by k-means groups of the latents and the model's
poses, each particle scored with its own CTF; a few EM iterations, as in 2D
classification), and the refined poses are written to the RELION columns (the
pvae ones for inputs with 3D angles, below) with their uncertainty (pvaeAnglePsiStd, degrees) and class (pvaeRefineClass);
--no-refine writes the model's own poses.

The STAR keeps every input column and the optics block (a RELION 3.0 input is
upgraded to 3.1) and adds or replaces rlnAnglePsi, rlnOriginXAngst/YAngst and
the pvae* latent and confidence columns (see docs/training.md). An input with
3D angles (rlnAngleRot/rlnAngleTilt, e.g. from a 3D refinement) keeps every
RELION pose column exactly as written and gets the in-plane pose in
pvaeAnglePsi, pvaeOriginXAngst/YAngst instead (--poses-to-relion-columns:
into the RELION columns). rlnImageName names the stacks relative to the
folder RELION runs in (--project-dir, default the current folder), so that
relion_stack_create --i OUT works from there. The origins
centre each particle: on the centre of mass of the aligned particles of each
latent group (--no-center: the model's own origins, relative to the generator's
drawing, which may sit a few pixels off the box centre). A .npz with the same numbers is written beside it. Example:

  particle-vae infer run1 --out run1/particles_pose.star
  particle-vae infer run1 --out run1/particles_pose.star --gpus 4     # sharded over 4 GPUs, one STAR in input order
"""

from __future__ import annotations

import argparse
from pathlib import Path

from particle_vae.engine.presets import REFINE_CLASSES, REFINE_PARTICLES_PER_CLASS


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.cli import add_project_dir_option, add_stack_dir_option

    parser.add_argument("run", type=Path, help="run directory written by particle-vae train")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output STAR file (a .npz is written beside it)")
    parser.add_argument("--particles", type=Path, help="particles to process (default: the training input)")
    add_stack_dir_option(parser)
    parser.add_argument("--pixel-size", type=float, metavar="A",
                        help="input pixel size, Angstrom (default: the STAR's, else the stack header's)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best",
                        help="best: at the best validation ELBO; last: at the last finished epoch")
    parser.add_argument("--batch-size", type=int, default=256, help="particles per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes, 0: read in the main process")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast: 2-3x faster on GPUs and CPUs with bf16 instructions, "
                             "latents to about 3 significant digits")
    parser.add_argument("--poses-to-relion-columns", action="store_true",
                        help="when the input has 3D angles (rlnAngleRot/rlnAngleTilt), write the in-plane pose into "
                             "rlnAnglePsi, rlnOriginXAngst/YAngst instead of pvaeAnglePsi, pvaeOriginXAngst/YAngst "
                             "(replacing the refinement's psi and origins; 2D inputs always get the RELION columns)")
    add_project_dir_option(parser)
    parser.add_argument("--no-center", action="store_true",
                        help="write the model's own origins (relative to its drawing at pose zero, which may sit a few pixels "
                             "off the box centre) instead of origins that centre each particle")
    refine = parser.add_argument_group("pose refinement (on by default; see docs/training.md)")
    refine.add_argument("--no-refine", action="store_true",
                        help="write the model's own poses instead of refining them by likelihood search against class references")
    refine.add_argument("--refine-iterations", type=int, default=12, help="expectation-maximisation iterations")
    refine.add_argument("--refine-classes", type=int, default=REFINE_CLASSES,
                        help=f"class references, seeded by k-means of the latents (at most one per {REFINE_PARTICLES_PER_CLASS} particles; "
                             "more for many distinct views)")
    refine.add_argument("--refine-angle-step", type=float, default=5.0,
                        help="degrees between searched angles (each pose is then refined below the step)")
    refine.add_argument("--refine-max-shift", type=int, help="largest particle shift searched, pixels of the refined images "
                                                               "(default: an eighth of the box, at most 6)")
    refine.add_argument("--refine-box", type=int, default=128,
                        help="refine on particles Fourier-cropped to at most this box, pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never the input)")
    from particle_vae.cli import add_launch_options

    add_launch_options(parser, "inference sharded")


def request(args: argparse.Namespace):
    """The :class:`particle_vae.api.InferRequest` that ``args`` (this command's options) describe;
    one-line errors for refinement options out of range."""
    from particle_vae.api import InferRequest
    from particle_vae.errors import ParticleVAEError

    refine = None
    if not args.no_refine:
        from particle_vae.engine.refine import RefineSettings

        for name in ("refine_iterations", "refine_classes", "refine_box", "refine_max_shift"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ParticleVAEError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 < args.refine_angle_step <= 90:
            raise ParticleVAEError(f"--refine-angle-step must lie in (0, 90] degrees, got {args.refine_angle_step}")
        refine = RefineSettings(iterations=args.refine_iterations, n_psi=max(4, round(360.0 / args.refine_angle_step)),
                                max_shift=args.refine_max_shift, device="auto" if args.device == "auto" else args.device)
    return InferRequest(
        run=args.run, out=args.out, particles=args.particles, checkpoint=args.checkpoint, batch_size=args.batch_size,
        device=args.device, workers=args.workers, stack_dir=args.stack_dir, pixel_size=args.pixel_size,
        precision=args.precision, centre=not args.no_center, refine=refine, refine_classes=args.refine_classes,
        refine_box=args.refine_box, poses_to_relion_columns=args.poses_to_relion_columns, project_dir=args.project_dir,
        overwrite=args.overwrite)


def main(args: argparse.Namespace) -> int:
    """Read out the run ``args`` describe (:func:`particle_vae.api.infer`), or start it again in
    several processes (``--gpus``, ``--ddp-cpu-processes``); returns the exit code."""
    from particle_vae import api
    from particle_vae.engine.launch import relaunch, wants_launch

    if wants_launch(args):
        return relaunch(args, args._launch_parser, "infer")
    api.infer(request(args))
    return 0
