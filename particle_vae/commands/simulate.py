"""Simulate a cryo-EM particle stack with known poses, classes, CTF and noise.

Writes OUT/particles.mrcs and a RELION 3.1 OUT/particles.star (CTF columns and
the ground truth in pvaeTrue* columns; rlnImageName names the stack relative to
the folder RELION runs in, --project-dir, default the current folder), OUT/simulation.json (settings and the
measured SNR) and, with --write-clean, the noise-free OUT/clean.mrcs and the
centred projections OUT/centred.mrcs (psi = 0, no shift, no CTF).
--ctf-premultiplied stores CTF * (CTF * projection + noise), the particles of
a RELION 5 premultiplied extraction, and flags them in the optics block
(rlnCtfDataAreCtfPremultiplied 1).

Presets: t20s (EMPIAR-10025-like, 64 px at 4 A), groel (EMPIAR-10029-like,
200 px at 1.35 A Fourier-cropped to 100 px at 2.7 A) and mixture (T20S, GroEL
and a single GroEL ring as three classes, 64 px at 4 A). Structures are read
from DATA/structures (--data-dir or $PARTICLE_VAE_DATA) unless --structure is
given. See docs/simulator.md.
"""

from __future__ import annotations

import argparse
import math

from particle_vae.data.simulation import SHIFT_DISTRIBUTIONS, SIMULATION_PRESETS, SNR_MODES, VIEWS, preset_config


def _snr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (or inf for no noise), got {text}")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the ``simulate`` options on ``parser``."""
    parser.add_argument("--preset", choices=sorted(SIMULATION_PRESETS), default="t20s", help="simulation preset")
    parser.add_argument("--n", type=int, required=True, help="number of particles")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--snr", type=_snr, default=0.1,
                        help="signal-to-noise ratio: variance of the noise-free image over the box / noise variance; "
                             "inf = no noise")
    parser.add_argument("--snr-mode", choices=SNR_MODES, default="dataset",
                        help="one noise level for the whole dataset or per particle")
    parser.add_argument("--box", type=int, help="simulation box in pixels; overriding it turns the preset's downsampling off (default: the preset's)")
    parser.add_argument("--pixel-size", type=float, help="Angstrom per pixel of the simulation box (default: the preset's)")
    parser.add_argument("--downsample-to", type=int, help="Fourier-crop the particles to this box, pixels (default: the preset's)")
    parser.add_argument("--resolution", type=float, help="blur of PDB models, Angstrom (default: 2 x pixel size)")
    parser.add_argument("--structure", nargs="+", metavar="PATH", help="PDB model(s) or MRC map(s), one class each, replacing the preset's (default: the preset's)")
    parser.add_argument("--class-weights", type=float, nargs="+", metavar="W", help="relative class frequencies (default: equal)")
    parser.add_argument("--defocus-star", metavar="PATH", help="STAR file whose rlnDefocusU/V/Angle rows are sampled (default: the preset's)")
    parser.add_argument("--views", choices=VIEWS, default="uniform", help="orientations: uniform on SO(3), top, side or top-side")
    parser.add_argument("--max-shift", type=float, help="largest particle displacement in output pixels (default: the preset's)")
    parser.add_argument("--shift-distribution", choices=SHIFT_DISTRIBUTIONS, default="uniform",
                        help="uniform in [-max, max] per axis or Gaussian with sd max/2 truncated at max")
    parser.add_argument("--no-ctf", action="store_true", help="do not apply a CTF")
    parser.add_argument("--ctf-premultiplied", action="store_true",
                        help="store CTF-premultiplied particles, CTF * (CTF * projection + noise), as RELION 5's premultiplied "
                             "extraction does, flagged rlnCtfDataAreCtfPremultiplied 1 in the optics block; --snr is then the SNR "
                             "of the recorded image CTF * projection + noise, before the premultiplication")
    parser.add_argument("--bfactor", type=float, default=0.0, help="CTF B-factor envelope in A^2")
    parser.add_argument("--phase-shift", type=float, default=0.0, help="phase-plate phase shift in degrees")
    parser.add_argument("--write-clean", action="store_true", help="also write clean.mrcs (noise-free) and centred.mrcs")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--batch-size", type=int, default=64, help="particles rendered at once; results do not depend on it")
    parser.add_argument("--data-dir", help="reference-data folder holding structures/ and cryoem/ (default: $PARTICLE_VAE_DATA)")
    from particle_vae.cli import add_project_dir_option

    add_project_dir_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the simulation described by ``args`` (:func:`particle_vae.api.simulate`); returns 0."""
    from particle_vae import api

    config = preset_config(
        args.preset, args.n, data_dir=args.data_dir, structures=args.structure, defocus_star=args.defocus_star,
        box=args.box, pixel_size=args.pixel_size, downsample_to=args.downsample_to, resolution=args.resolution,
        class_weights=args.class_weights, views=args.views, max_shift=args.max_shift,
        shift_distribution=args.shift_distribution, ctf=not args.no_ctf, ctf_premultiplied=args.ctf_premultiplied, bfactor=args.bfactor,
        phase_shift=args.phase_shift, snr=args.snr, snr_mode=args.snr_mode,  # inf: noise-free
        seed=args.seed, batch_size=args.batch_size, write_clean=args.write_clean,
    )
    api.simulate(api.SimulateRequest(config, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                                     project_dir=args.project_dir))
    return 0
