"""Write particles back for RELION (STAR) or cryoSPARC (.cs): a selection, a refined pose set, a conversion.

The input is a particle STAR (e.g. from particle-vae infer or select) or a
cryoSPARC particle .cs file. Every particle keeps its image, CTF and pose; the
conversion between RELION's columns and cryoSPARC's fields, with units and sign
conventions, is in docs/conventions.md ("cryoSPARC .cs files").

--to relion writes a STAR: a .cs input becomes a RELION 3.1 STAR, a STAR
input keeps its layout, blocks and columns. rlnImageName names each stack
relative to --project-dir (the folder RELION runs in, default the current
folder), or absolutely for stacks outside it.

--to cryosparc writes a .cs file with the slots cryoSPARC's particle outputs
have: uid, blob (path, idx, shape, psize_A, sign), ctf, and alignments3D (a
STAR with rlnAngleRot/rlnAngleTilt) and/or alignments2D (an in-plane pose).
blob/path is relative to --project-dir, here the cryoSPARC project folder. With
--template (the .cs the particles came from, e.g. the job's exported .cs), rows
are matched by the pvaeCryosparcUid column that particle-vae keeps from a .cs
input, and every field the STAR does not carry (blob/path, statistics, the
higher-order CTF terms) is copied from the matched row; a .cs input is its own
template. Without --template, a STAR converted from a .cs (by export --to
relion, or read by info/train/infer, which keep every column) carries every
field of the .cs in pvaeCs_<type>_<field> columns: the .cs written from it
has the original fields in their order and type, those RELION has no column
for (scores, ctf/type, location/*, trefoil, tetrafoil, anisotropic
magnification) as they were, and the converted ones (CTF, pose, image) from
the STAR's RELION columns, with their exact original values where those
columns are unchanged. A .cs -> STAR -> .cs round trip therefore gives back
the same file, and a selection or a new pose comes back as such.

Beside the .cs, FILE.csg is written (--no-csg: not): the result-group file of
cryoSPARC's Import Result Group job, naming the .cs for each of its slots
(group and version copied from the template's .csg when there is one).
Examples:

  particle-vae export P12/J24/J24_001_particles.cs --stack-dir P12 --to relion --out particles.star
  particle-vae export selected.star --to cryosparc --template P12/exports/groups/J24_particles/J24_particles_exported.cs \\
      --out P12/exports/groups/J24_particles/J24_particles_selected.cs
  particle-vae export run1/particles_vae.star --to relion --project-dir /data/relion_project --out /data/relion_project/vae.star
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.cli import add_stack_dir_option

    parser.add_argument("input", type=Path, help="particle .star or cryoSPARC particle .cs file")
    parser.add_argument("--to", required=True, choices=["relion", "cryosparc"],
                        help="relion: a RELION 3.1 STAR; cryosparc: a cryoSPARC particle .cs file")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output file (.star for relion, .cs for cryosparc)")
    parser.add_argument("--template", type=Path, metavar="CS",
                        help="(--to cryosparc) the .cs file the particles came from: rows matched by pvaeCryosparcUid, "
                             "fields the STAR does not carry copied from it (default: the input when it is a .cs, else none)")
    parser.add_argument("--project-dir", dest="project_dir", type=Path, metavar="FOLDER",
                        help="the folder the output's image paths are relative to: the RELION project folder (--to relion) "
                             "or the cryoSPARC project folder (--to cryosparc); stacks outside it are named absolutely "
                             "(default: the current folder)")
    add_stack_dir_option(parser, "folder holding the stacks that a STAR's rlnImageName names (default: paths relative to the "
                                 "STAR's folder); for a .cs input the cryoSPARC project folder that blob/path is relative to "
                                 "(default: looked for beside the .cs file)")
    parser.add_argument("--drop-cryosparc-fields", action="store_true",
                        help="(--to relion) leave out the pvaeCs_* columns that keep every field of a .cs input (about 2/3 of "
                             "the STAR's size); without them a later --to cryosparc needs --template to give the fields back")
    parser.add_argument("--no-csg", dest="csg", action="store_false",
                        help="(--to cryosparc) do not write FILE.csg, the result-group file for cryoSPARC's Import Result Group, "
                             "beside FILE.cs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file (never an input)")


def main(args: argparse.Namespace) -> int:
    from particle_vae.errors import ParticleVAEError
    from particle_vae.io.atomic import check_output_path
    from particle_vae.io.paths import project_folder

    suffix = ".star" if args.to == "relion" else ".cs"
    if args.out.suffix.lower() != suffix:
        raise ParticleVAEError(f"{args.out}: --to {args.to} writes a {suffix} file; name the output FILE{suffix}")
    if args.template is not None and args.to != "cryosparc":
        raise ParticleVAEError("--template is the .cs file a cryoSPARC output copies its other fields from; "
                               "use it with --to cryosparc")
    inputs = (args.input,) + ((args.template,) if args.template is not None else ())
    check_output_path(args.out, overwrite=args.overwrite, inputs=inputs)  # refuse before any work
    if args.to == "cryosparc" and getattr(args, "csg", True):
        check_output_path(args.out.with_suffix(".csg"), overwrite=args.overwrite, inputs=inputs)
    project = project_folder(args.project_dir)
    star = _read_input(args.input, args.stack_dir)
    stack_names = _stack_names(star, args.input, args.stack_dir, project)
    if args.to == "relion":
        _write_relion(star, stack_names, args, inputs)
    else:
        _write_cryosparc(star, stack_names, args, inputs)
    return 0


def _read_input(path: Path, stack_dir: Path | None):
    from particle_vae.errors import InputFileError
    from particle_vae.io.star import ParticleStar

    suffix = path.suffix.lower()
    if suffix == ".cs":
        from particle_vae.io.cryosparc import aberrations_present, read_cryosparc_star

        star = read_cryosparc_star(path, project_dir=stack_dir)
        unconverted = aberrations_present(star.records)
        if unconverted:
            log.warning("%s: %s hold non-zero values that have no RELION column here (RELION will not apply them); a STAR "
                        "output keeps them in its pvaeCs_ columns and a .cs output gives them back", path, ", ".join(unconverted))
        return star
    if suffix == ".star":
        return ParticleStar(path)
    raise InputFileError(f"unrecognised input type '{path.suffix}'", path, "give a particle .star or a cryoSPARC particle .cs file")


def _stack_names(star, path: Path, stack_dir: Path | None, project: Path) -> pd.Series:
    """Per particle, its stack named relative to ``project`` (absolute outside it); names of stacks
    that are not found are kept as written, with a warning."""
    from particle_vae.io.cryosparc import CryosparcStar
    from particle_vae.io.paths import stack_name_for_project

    names = star.particles["rlnImageName"].astype(str).str.partition("@")[2].str.strip().reset_index(drop=True)
    datadir = None if isinstance(star, CryosparcStar) else stack_dir  # a .cs STAR names stacks from the .cs file's folder
    renamed, missing = {}, []
    for name in pd.unique(names):
        found = next((c for c in star.stack_candidates(name, datadir) if c.is_file()), None)
        if found is None:
            missing.append(name)
            renamed[name] = name
        else:
            renamed[name] = stack_name_for_project(found, project)
    if missing:
        hint = "pass --stack-dir with the folder the names are relative to" + (
            " (the cryoSPARC project folder)" if isinstance(star, CryosparcStar) else "")
        log.warning("%s: %d of %d stacks not found (first: %s): their names are written as in the input, unchecked; %s",
                    path, len(missing), len(renamed), missing[0], hint)
    return names.map(renamed)


def _write_relion(star, stack_names: pd.Series, args: argparse.Namespace, inputs: tuple) -> None:
    from particle_vae.io.star import write_star

    numbers = star.particles["rlnImageName"].astype(str).str.partition("@")[0].str.strip().reset_index(drop=True)
    out = star.with_columns({"rlnImageName": (numbers + "@" + stack_names).to_numpy(dtype=object)})
    if getattr(args, "drop_cryosparc_fields", False):
        from particle_vae.io.cryosparc import KEPT_PREFIX
        from particle_vae.io.star import ParticleStar, StarFile

        blocks = dict(out.star.blocks)
        particles = blocks[out.particles_block]
        blocks[out.particles_block] = particles[[c for c in particles.columns if not str(c).startswith(KEPT_PREFIX)]]
        out = ParticleStar(StarFile(blocks=blocks, path=out.path))
    path = write_star(args.out, out.star, overwrite=args.overwrite, inputs=inputs)
    log.info("wrote %s (%d particles, %s; image names relative to %s)", path, len(out),
             "optics kept" if out.optics is not None else "RELION 3.0 layout kept", project_text(args.project_dir))


def project_text(project_dir: Path | None) -> str:
    return str(project_dir) if project_dir is not None else "the current folder"


def _write_cryosparc(star, stack_names: pd.Series, args: argparse.Namespace, inputs: tuple) -> None:
    from particle_vae.io.cryosparc import (
        BEAM_TILT_COLUMNS,
        EXPORTED_PREFIX,
        CryosparcStar,
        kept_records,
        read_cryosparc,
        star_to_cryosparc,
        write_cryosparc,
        write_csg,
    )
    from particle_vae.io.star import ABERRATION_COLUMNS

    template = None
    if args.template is not None:
        template = read_cryosparc(args.template)
    elif isinstance(star, CryosparcStar):
        template, args.template = star.records, args.input
    kept = kept_records(star) if template is None else None
    box = _box(star, args.stack_dir if not isinstance(star, CryosparcStar) else None)
    records = star_to_cryosparc(star, stack_names.to_numpy(dtype=object), box=box, template=template)
    if template is None and kept is None:
        log.info("no --template and no pvaeCs_ columns: uid, blob, ctf (beam tilt included) and the poses come from the "
                 "STAR, other fields (scores, class statistics, higher-order CTF terms) are written at neutral values")
        aberrations = [c for c in ABERRATION_COLUMNS
                       if c not in BEAM_TILT_COLUMNS and star.column(c) is not None and _non_default(star.column(c), c)]
        if aberrations:
            log.warning("%s: %s are not converted to cryoSPARC's ctf fields; refine them again in cryoSPARC "
                        "(Global CTF Refinement) or give --template", args.input, ", ".join(aberrations))
    elif kept is not None:
        log.info("fields restored from the STAR's %d pvaeCs_ columns (converted fields from the RELION columns where these "
                 "changed)", len(kept.dtype.names) - 1)
    paths = np.char.decode(records["blob/path"].astype(bytes), "utf-8") if "blob/path" in records.dtype.names else []
    exported = any(p.startswith(EXPORTED_PREFIX) for p in paths)
    if exported and template is not None and args.out.resolve().parent != Path(args.template).resolve().parent:
        log.warning("the template's blob/path values start with '%s', so cryoSPARC looks for the stacks beside the .cs "
                    "file: write the output into %s", EXPORTED_PREFIX, Path(args.template).parent)
    elif exported and template is None:
        log.warning("blob/path values kept from the original export start with '%s', so cryoSPARC looks for the stacks "
                    "beside the .cs file: write the output into the folder of the exported .cs it came from", EXPORTED_PREFIX)
    path = write_cryosparc(args.out, records, overwrite=args.overwrite, inputs=inputs)
    slots = sorted({name.split("/")[0] for name in records.dtype.names if "/" in name})
    log.info("wrote %s (%d particles; slots %s%s)", path, len(records), ", ".join(slots),
             f"; other fields from {args.template}" if template is not None else "")
    if getattr(args, "csg", True):
        csg = write_csg(path, records, template_cs=args.template, overwrite=args.overwrite, inputs=inputs)
        log.info("wrote %s: import %s into cryoSPARC with Import Result Group, giving this file", csg, path.name)


def _non_default(values: pd.Series, column: str) -> bool:
    """Whether an optics column records an aberration (beam tilt, Zernike terms, a non-identity magnification)."""
    if column in ("rlnOddZernike", "rlnEvenZernike"):
        return bool(values.astype(str).str.strip("[] ").str.len().gt(0).any())
    identity = 1.0 if column in ("rlnMagMat00", "rlnMagMat11") else 0.0
    return bool(np.any(np.abs(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64) - identity) > 1e-9))


def _box(star, stack_dir: Path | None) -> int | None:
    """The image size from the first stack that opens, for STARs without rlnImageSize."""
    if star.column("rlnImageSize") is not None:
        return None
    from particle_vae.errors import ParticleVAEError
    from particle_vae.io.mrc import MRCStack

    for name in pd.unique(star.particles["rlnImageName"].astype(str).str.partition("@")[2].str.strip()):
        for candidate in star.stack_candidates(name, stack_dir):
            if candidate.is_file():
                try:
                    return MRCStack(candidate).box
                except ParticleVAEError:
                    return None
    return None
