"""Summarise a particle STAR file, a cryoSPARC .cs particle file, an MRC stack or a .txt list of stacks.

Checks what training would check (every stack exists and is complete, one box
size, image numbers inside their stacks) by reading headers only, then prints
the particle count, box, pixel size, optics groups (with CTF premultiplication
and the aberrations RELION records), CTF ranges and which pose, latent and
ground-truth columns are present. ``--json`` prints the same as JSON.

With --no-images only the metadata of a STAR or .cs file is summarised, and
where each stack is looked for is shown; the same summary is printed when the
stacks are missing or do not match the metadata, followed by the one-line error
(exit code 2). A warning says when RELION, run in the current folder, would not
find the stacks that particle-vae finds (RELION reads rlnImageName relative to
the folder it runs in). Examples:

  particle-vae info particles.star
  particle-vae info --no-images Refine3D/job042/run_data.star
  particle-vae info P12/J24/J24_001_particles.cs --stack-dir P12
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from particle_vae.data.sources import open_source
from particle_vae.errors import InputFileError, ParticleVAEError

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY",
                "pvaeAnglePsi", "pvaeOriginXAngst", "pvaeOriginYAngst",
                "pvaeAnglePsiStd", "pvaePoseProbability", "pvaeRefineClass", "pvaeRefineClassProbability")
#: optics groups listed one per line; more are counted
SHOWN_OPTICS_GROUPS = 8


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.cli import add_stack_dir_option

    parser.add_argument("path", type=Path, help="particle .star, cryoSPARC particle .cs, .mrcs/.mrc stack, or .txt list of stacks")
    add_stack_dir_option(parser, "folder holding the particle stacks that the STAR's rlnImageName names, e.g. the RELION "
                                 "project folder (default: paths relative to the STAR's folder); for a .cs file the "
                                 "cryoSPARC project folder that blob/path is relative to (default: looked for beside the .cs file)")
    parser.add_argument("--pixel-size", type=float, default=None, metavar="A",
                        help="pixel size, Angstrom (default: the STAR's, else the stack header's)")
    parser.add_argument("--sample", type=int, default=64, help="images read to report pixel statistics (0 to skip)")
    parser.add_argument("--no-images", action="store_true",
                        help="summarise the metadata of a STAR or .cs file only, without opening the stacks (shows where "
                             "each is looked for)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def summarize(path: Path, datadir: Path | None = None, pixel_size: float | None = None, sample: int = 64) -> dict:
    """Collect a summary of a particle input (see the module docstring), opening every stack's header.

    Returns:
        A JSON-serialisable dict.
    Raises:
        ParticleVAEError: a missing or inconsistent input (see
            :func:`particle_vae.data.sources.open_source`).
    """
    source = open_source(path, datadir=datadir, pixel_size=pixel_size)
    summary: dict = {
        "path": str(source.path),
        "kind": source.kind,
        "particles": len(source),
        "stacks": source.n_stacks,
        "images_checked": True,
        "box_px": source.box,
        "pixel_size_angst": source.pixel_size,
        "pixel_size_from": source.pixel_size_from,
    }
    if source.pixel_size is None:
        summary["pixel_size_missing"] = f"{source.missing_pixel_size()}; train and infer need --pixel-size (Angstrom per pixel)"
    star = source.star
    if star is not None:
        summary.update(_star_details(star))
        lookup = _stack_lookup(star, datadir)
        warning = _relion_path_warning(star, lookup)
        if warning:
            summary["relion_paths_warning"] = warning
        npz_status = _infer_npz_status(Path(source.path))
        if npz_status is not None:
            summary["infer_npz"] = npz_status
    if sample > 0:
        from particle_vae.data.particles import ParticleDataset

        dataset = ParticleDataset(source)
        indices = np.linspace(0, len(source) - 1, num=min(sample, len(source))).round().astype(np.int64)
        images = dataset.read(np.unique(indices))
        dataset.close()
        summary["pixel_stats"] = {
            "images_read": int(images.shape[0]), "mean": float(images.mean()), "std": float(images.std()),
            "min": float(images.min()), "max": float(images.max()),
        }
    return summary


def summarize_metadata(path: Path, datadir: Path | None = None, pixel_size: float | None = None) -> dict:
    """Summarise a STAR or ``.cs`` file's metadata without opening any stack.

    Besides what :func:`summarize` reports from the metadata it lists how many
    stacks are named and found, and where the first missing one was looked for.

    Returns:
        A JSON-serialisable dict (``images_checked`` is ``False``).
    Raises:
        InputFileError: the input is not a STAR or ``.cs`` file, or its metadata
            cannot be read.
    """
    star = _open_metadata(Path(path), datadir)
    summary: dict = {"path": str(path), "kind": "cryosparc" if path.suffix.lower() == ".cs" else "star",
                     "particles": len(star), "images_checked": False}
    sizes = star.column("rlnImageSize")
    summary["box_px"] = None if sizes is None else sorted({int(v) for v in sizes.to_numpy(dtype=np.int64)})
    if pixel_size is not None:
        summary["pixel_size_angst"], summary["pixel_size_from"] = float(pixel_size), "user"
    else:
        try:
            sizes = star.pixel_sizes()
        except ParticleVAEError as error:
            sizes, summary["pixel_size_problem"] = None, str(error)
        distinct = [] if sizes is None else sorted({round(float(v), 4) for v in sizes})
        summary["pixel_size_angst"] = distinct[0] if len(distinct) == 1 else None
        summary["pixel_size_from"] = "star" if distinct else "unknown"
        if len(distinct) > 1:
            summary["pixel_size_problem"] = (f"{'/'.join(f'{v:g}' for v in distinct)} A in different optics groups; train and "
                                             f"infer need one pixel size (split the STAR by optics group)")
    lookup = _stack_lookup(star, datadir)
    missing = [(name, candidates) for name, candidates, found in lookup if found is None]
    summary["stacks"] = len(lookup)
    summary["stacks_found"] = len(lookup) - len(missing)
    if missing:
        summary["first_missing_stack"] = {"name": missing[0][0], "looked_in": [str(c) for c in missing[0][1]]}
    summary.update(_star_details(star))
    warning = _relion_path_warning(star, lookup)
    if warning:
        summary["relion_paths_warning"] = warning
    return summary


def _open_metadata(path: Path, datadir: Path | None):
    """The particle STAR of a ``.star`` or ``.cs`` file (metadata only)."""
    from particle_vae.io.star import ParticleStar

    suffix = path.suffix.lower()
    if suffix == ".cs":
        from particle_vae.io.cryosparc import read_cryosparc_star

        return read_cryosparc_star(path, project_dir=datadir)
    if suffix == ".star":
        return ParticleStar(path)
    raise InputFileError("--no-images summarises the metadata of a .star or .cs file", path,
                         "leave out --no-images for stacks and lists")


def _stack_lookup(star, datadir: Path | None) -> list[tuple[str, list[Path], Path | None]]:
    """Per distinct stack name: ``(name, where it is looked for, the file found or None)``."""
    from particle_vae.io.cryosparc import CryosparcStar

    if isinstance(star, CryosparcStar):
        return star.stack_lookup()
    names = star.particles["rlnImageName"].astype(str).str.partition("@")[2].str.strip()
    out = []
    for name in pd.unique(names):
        candidates = star.stack_candidates(name, datadir)
        out.append((name, candidates, next((c for c in candidates if c.is_file()), None)))
    return out


def _relion_path_warning(star, lookup: list[tuple[str, list[Path], Path | None]]) -> str | None:
    """What goes wrong when RELION reads this STAR in the current folder, where particle-vae finds
    stacks that a name relative to the current folder does not reach; ``None`` when nothing does."""
    from particle_vae.io.cryosparc import CryosparcStar
    from particle_vae.io.paths import opens_from

    if isinstance(star, CryosparcStar) or star.path is None:
        return None
    here = Path.cwd()
    unreachable = [(name, found) for name, _, found in lookup if found is not None and not opens_from(name, here, found)]
    if not unreachable:
        return None
    name, found = unreachable[0]
    found = Path(os.path.abspath(found))
    folder = found.parent
    for _ in Path(name).parts[:-1]:
        folder = folder.parent
    where = f"run RELION in {folder}, or " if (folder / name).resolve() == found.resolve() else ""
    return (f"{len(unreachable)} of {len(lookup)} stack name(s) in rlnImageName (first: {name}) do not resolve from the "
            f"current folder {here}, where RELION looks for them: a RELION job run here would fail; {where}write a copy "
            f"whose names resolve from here with: particle-vae export {star.path} --to relion --out NEW.star "
            f"(--project-dir FOLDER for another RELION project folder)")


def _star_version(path: Path | None) -> str | None:
    """The ``# version NNNNN`` header of a STAR file (RELION 3.1/4 write 30001, RELION 5 50001)."""
    if path is None or path.suffix.lower() != ".star":
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"#\s*(?:RELION;\s*)?version\s+([0-9][0-9.]*)", head)
    return match.group(1) if match else None


def _star_details(star) -> dict:
    """What the metadata says: format, blocks, optics groups, CTF, pose/latent/truth columns (and the
    cryoSPARC fields of a ``.cs`` input)."""
    from particle_vae.io.cryosparc import CryosparcStar, aberrations_present

    details: dict = {}
    if isinstance(star, CryosparcStar):
        records = star.records
        slots = sorted({name.split("/")[0] for name in records.dtype.names if "/" in name})
        details["star_format"] = "cryoSPARC .cs, read as RELION 3.1+"
        details["cryosparc"] = {"fields": len(records.dtype.names), "slots": slots,
                                "blob_sign": sorted({float(v) for v in np.unique(records["blob/sign"])}) if "blob/sign" in records.dtype.names else None,
                                "aberrations_not_converted": aberrations_present(records)}
    else:
        details["star_format"] = "RELION 3.1+" if star.is_relion31 else "RELION 3.0"
        version = _star_version(star.path)
        if version is not None:
            details["star_version"] = version
    details["blocks"] = list(star.star.blocks)
    details["particles_block"] = star.particles_block
    details["optics_block"] = star.optics_block
    details["optics_groups"] = None if star.optics is None else len(star.optics)  # None: RELION 3.0, no optics block
    if star.optics is not None:
        details["optics"] = [_optics_group(row) for _, row in star.optics.iterrows()]
    columns = list(star.particles.columns)
    details["columns"] = columns
    details["pose_columns"] = [c for c in POSE_COLUMNS if c in columns]
    details["latent_columns"] = [c for c in columns if c.startswith("pvaeZ")]
    details["truth_columns"] = [c for c in columns if c.startswith("pvaeTrue")]
    try:
        ctf = star.ctf_parameters()
    except ParticleVAEError as missing:
        details["ctf"] = f"not available ({missing})"
    else:
        defocus = (ctf["defocus_u"] + ctf["defocus_v"]) / 2e4
        details["ctf"] = {
            "defocus_um_min": float(defocus.min()), "defocus_um_max": float(defocus.max()),
            "voltage_kv": sorted(set(ctf["voltage"].round(3).tolist())),
            "cs_mm": sorted(set(ctf["cs"].round(4).tolist())),
            "amplitude_contrast": sorted(set(ctf["amplitude_contrast"].round(4).tolist())),
            "premultiplied_particles": int(ctf["premultiplied"].sum()),
        }
    return details


def _optics_group(row: pd.Series) -> dict:
    """One optics row: its values and which aberrations (kept in outputs, not modelled) it records."""
    from particle_vae.io.star import PREMULTIPLIED

    def number(name):
        value = row.get(name)
        try:
            return None if value is None or pd.isna(value) else float(value)
        except (TypeError, ValueError):
            return None

    group = {"group": row.get("rlnOpticsGroup"), "name": row.get("rlnOpticsGroupName"),
             "pixel_size_angst": number("rlnImagePixelSize"), "box_px": number("rlnImageSize"),
             "voltage_kv": number("rlnVoltage"), "cs_mm": number("rlnSphericalAberration"),
             "amplitude_contrast": number("rlnAmplitudeContrast"), "premultiplied": bool(number(PREMULTIPLIED) or 0)}
    group = {key: (int(value) if key in ("group", "box_px") and value is not None else value) for key, value in group.items()}
    if group["name"] is not None:
        group["name"] = str(group["name"])
    aberrations = []
    tilt = (number("rlnBeamTiltX") or 0.0, number("rlnBeamTiltY") or 0.0)
    if any(tilt):
        aberrations.append(f"beam tilt ({tilt[0]:g}, {tilt[1]:g}) mrad")
    for column, label in (("rlnOddZernike", "odd Zernike"), ("rlnEvenZernike", "even Zernike")):
        value = row.get(column)
        if isinstance(value, str) and value.strip("[] "):
            aberrations.append(f"{label} ({len(value.strip('[] ').split(','))} coefficients)")
    matrix = [number(f"rlnMagMat{i}{j}") for i in (0, 1) for j in (0, 1)]
    if all(v is not None for v in matrix) and not np.allclose(matrix, [1, 0, 0, 1]):
        aberrations.append("magnification matrix [[{:g}, {:g}], [{:g}, {:g}]]".format(*matrix))
    group["aberrations"] = aberrations
    return group


def _infer_npz_status(star_path: Path) -> str | None:
    """The ``.npz`` that ``infer`` wrote beside ``star_path``, or what is wrong with it; ``None`` when not an infer output."""
    from particle_vae.io.infer_pair import npz_path_for, pair_problem, star_pair_id

    problem = pair_problem(star_path)
    if problem is not None:
        return problem[1]
    return f"{npz_path_for(star_path).name} (the same infer run)" if star_pair_id(star_path) is not None else None


def _blocks_text(summary: dict) -> str:
    """The STAR's data blocks by their names as written (``data_`` for an unnamed one) and what each holds."""
    described = []
    for name in summary["blocks"]:
        if name == summary.get("particles_block"):
            role = f"{summary['particles']} particles"
        elif name == summary.get("optics_block"):
            role = f"{summary['optics_groups']} optics group{'s' if summary['optics_groups'] != 1 else ''}"
        else:
            role = "not used"
        described.append(f"data_{name} ({role})")
    text = ", ".join(described)
    if summary.get("optics_block") is None:
        text += "; no optics block (RELION 3.0 layout: optics values such as voltage and Cs are in each particle row)"
    return text


def format_summary(summary: dict) -> str:
    """Human-readable multi-line text for :func:`summarize`'s or :func:`summarize_metadata`'s result."""
    apix = summary["pixel_size_angst"]
    if apix is None and summary.get("pixel_size_problem"):
        apix_text = summary["pixel_size_problem"]
    elif apix is None:
        apix_text = f"unknown: {summary.get('pixel_size_missing', 'the input gives none')}"
    else:
        apix_text = f"{apix:g} A (from {summary['pixel_size_from']})"
    title = summary.get("star_format", summary["kind"])
    if summary.get("star_version"):
        title += f" (header '# version {summary['star_version']}')"
    lines = [f"{summary['path']}: {title}", f"  particles       {summary['particles']}"]
    if summary.get("images_checked", True):
        lines += [f"  stacks          {summary['stacks']} (all found and complete)", f"  box             {summary['box_px']} px"]
    else:
        stacks = f"  stacks          {summary['stacks']} named, {summary['stacks_found']} found (metadata only: no image read)"
        missing = summary.get("first_missing_stack")
        if missing:
            stacks += f"; {missing['name']} looked for as {', '.join(missing['looked_in'])}"
        boxes = summary.get("box_px")
        lines += [stacks, f"  box             {'/'.join(str(b) for b in boxes) + ' px (rlnImageSize)' if boxes else 'not given'}"]
    lines.append(f"  pixel size      {apix_text}")
    if "blocks" in summary:
        lines.append(f"  blocks          {_blocks_text(summary)}")
        groups = summary.get("optics") or []
        for group in groups[:SHOWN_OPTICS_GROUPS]:
            lines.append(f"  optics group    {_optics_text(group)}")
        if len(groups) > SHOWN_OPTICS_GROUPS:
            lines.append(f"  optics group    ... and {len(groups) - SHOWN_OPTICS_GROUPS} more")
        if any(group["aberrations"] for group in groups):
            lines.append("  aberrations     kept in every STAR particle-vae writes, for RELION; not part of particle-vae's CTF model")
        ctf = summary["ctf"]
        if isinstance(ctf, dict):
            premultiplied = ctf.get("premultiplied_particles", 0)
            lines.append(
                f"  CTF             defocus {ctf['defocus_um_min']:.3g}-{ctf['defocus_um_max']:.3g} um, "
                f"{'/'.join(f'{v:g}' for v in ctf['voltage_kv'])} kV, Cs {'/'.join(f'{v:g}' for v in ctf['cs_mm'])} mm, "
                f"amplitude contrast {'/'.join(f'{v:g}' for v in ctf['amplitude_contrast'])}"
                + (f"; {premultiplied} particles CTF-premultiplied (the model uses CTF squared for them)" if premultiplied else "")
            )
        else:
            lines.append(f"  CTF             {ctf}")
        for label, key in (("pose columns", "pose_columns"), ("latent columns", "latent_columns"), ("ground truth", "truth_columns")):
            lines.append(f"  {label:<15} {', '.join(summary[key]) if summary[key] else 'none'}")
        lines.append(f"  all columns     {len(summary['columns'])}")
        if "cryosparc" in summary:
            info = summary["cryosparc"]
            text = f"{info['fields']} fields in slots {', '.join(info['slots'])}"
            if info.get("blob_sign") is not None:
                text += f"; blob/sign {'/'.join(f'{v:g}' for v in info['blob_sign'])} (kept as pvaeCryosparcSign; pixels are read as stored)"
            if info.get("aberrations_not_converted"):
                text += f"; not converted: {', '.join(info['aberrations_not_converted'])}"
            lines.append(f"  cryoSPARC       {text}")
        if "infer_npz" in summary:
            lines.append(f"  infer .npz      {summary['infer_npz']}")
    if "pixel_stats" in summary:
        stats = summary["pixel_stats"]
        lines.append(f"  pixels          mean {stats['mean']:.4g}, std {stats['std']:.4g}, range {stats['min']:.4g}..{stats['max']:.4g} "
                     f"({stats['images_read']} images sampled)")
    if summary.get("relion_paths_warning"):
        lines.append(f"  warning         {summary['relion_paths_warning']}")
    return "\n".join(lines)


def _optics_text(group: dict) -> str:
    parts = [f"{group['group']}" + (f" ({group['name']})" if group.get("name") else "")]
    for key, unit in (("pixel_size_angst", " A/px"), ("box_px", " px"), ("voltage_kv", " kV"), ("cs_mm", " mm Cs"),
                      ("amplitude_contrast", " amplitude contrast")):
        if group.get(key) is not None:
            parts.append(f"{group[key]:g}{unit}")
    if group.get("premultiplied"):
        parts.append("CTF-premultiplied")
    return ", ".join(parts[:1]) + ": " + ", ".join(parts[1:] + group["aberrations"])


def main(args: argparse.Namespace) -> int:
    def show(summary: dict) -> None:
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)

    if args.no_images:
        show(summarize_metadata(args.path, datadir=args.stack_dir, pixel_size=args.pixel_size))
        return 0
    try:
        summary = summarize(args.path, datadir=args.stack_dir, pixel_size=args.pixel_size, sample=args.sample)
    except InputFileError as error:
        # stacks missing or not matching: show what the metadata says, then the error
        if args.path.suffix.lower() in (".star", ".cs") and args.path.is_file():
            try:
                metadata = summarize_metadata(args.path, datadir=args.stack_dir, pixel_size=args.pixel_size)
            except ParticleVAEError:
                raise error from None
            show(metadata)
        raise
    show(summary)
    return 0
