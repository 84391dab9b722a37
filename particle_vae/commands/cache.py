"""Preprocess particles once into one contiguous cache file for training.

Writes the particles, preprocessed as `train` would (preset and options the
same), in input order to one float16 or float32 MRC stack plus a .json
sidecar; `particle-vae train ... --cache PATH` with the same input and
preprocessing then reads it instead of the stacks (and rebuilds it when the
input or the preprocessing changed). Building it beforehand is useful before a
multi-node run, where the other ranks would otherwise wait for rank 0. Example:

  particle-vae cache particles.star --preset particles --out /scratch/particles_cache.mrcs --workers 8
  particle-vae train particles.star --preset particles --cache /scratch/particles_cache.mrcs --gpus 4 --out run1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("particle_vae")


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.commands.train import add_input_options
    from particle_vae.data.cache import CACHE_DTYPES
    from particle_vae.engine.presets import TRAINING_PRESETS

    parser.add_argument("input", type=Path, help="particle .star, .mrcs/.mrc stack or .txt list of stacks")
    parser.add_argument("--out", "-o", type=Path, required=True, help="the cache stack to write (e.g. particles_cache.mrcs; a .json goes beside it)")
    parser.add_argument("--dtype", choices=sorted(CACHE_DTYPES), default="float16", help="stored values")
    parser.add_argument("--preset", choices=sorted(TRAINING_PRESETS), help="take the preprocessing of this training preset (default: none)")
    add_input_options(parser)
    parser.add_argument("--batch-size", type=int, default=512, help="particles read and written at once")
    parser.add_argument("--workers", type=int, default=0, help="reader processes, 0: read in the main process")


def main(args: argparse.Namespace) -> int:
    from particle_vae.commands.train import PREP_OPTIONS
    from particle_vae.data.cache import ensure_cache
    from particle_vae.data.sources import open_source
    from particle_vae.engine.presets import TRAINING_PRESETS

    preset = TRAINING_PRESETS[args.preset] if args.preset else {}
    prep = dict(preset.get("preprocessing", {}))
    for option, name in PREP_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            prep[name] = value
    source = open_source(args.input.resolve(), datadir=None if args.stack_dir is None else args.stack_dir.resolve(),
                         pixel_size=args.pixel_size)
    limit = prep.get("crop_box") or source.box  # as train does: a preset box larger than the input is dropped
    if prep.get("target_box") and prep["target_box"] >= limit:
        prep.pop("target_box")
    info = ensure_cache(source, prep, args.out, dtype=args.dtype, batch_size=args.batch_size, num_workers=args.workers)
    log.info("%s %s: %d particles of %dx%d px (%s); train with --cache %s and the same preprocessing options",
             "wrote" if info.built else "up to date:", info.path, info.n_particles, info.box, info.box, info.dtype, info.path)
    return 0
