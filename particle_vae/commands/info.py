"""Summarise a particle STAR file, an MRC stack or a .txt list of stacks.

Checks what training would check (every stack exists and is complete, one box
size, image numbers inside their stacks) by reading headers only, then prints
the particle count, box, pixel size, CTF ranges and which pose, latent and
ground-truth columns are present. ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from particle_vae.data.particles import open_source
from particle_vae.errors import ParticleVAEError

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY",
                "pvaeAnglePsiStd", "pvaePoseProbability", "pvaeRefineClass", "pvaeRefineClassProbability")


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.cli import add_stack_dir_option

    parser.add_argument("path", type=Path, help="particle .star, .mrcs/.mrc stack, or .txt list of stacks")
    add_stack_dir_option(parser)
    parser.add_argument("--pixel-size", type=float, default=None, metavar="A",
                        help="pixel size, Angstrom (default: the STAR's, else the stack header's)")
    parser.add_argument("--sample", type=int, default=64, help="images read to report pixel statistics (0 to skip)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def summarize(path: Path, datadir: Path | None = None, pixel_size: float | None = None, sample: int = 64) -> dict:
    """Collect a summary of a particle input (see the module docstring).

    Returns:
        A JSON-serialisable dict.
    """
    source = open_source(path, datadir=datadir, pixel_size=pixel_size)
    summary: dict = {
        "path": str(source.path),
        "kind": source.kind,
        "particles": len(source),
        "stacks": source.n_stacks,
        "box_px": source.box,
        "pixel_size_angst": source.pixel_size,
        "pixel_size_from": source.pixel_size_from,
    }
    if source.pixel_size is None:
        summary["pixel_size_missing"] = f"{source.missing_pixel_size()}; train and infer need --pixel-size (Angstrom per pixel)"
    star = source.star
    if star is not None:
        summary["star_format"] = "RELION 3.1+" if star.is_relion31 else "RELION 3.0"
        summary["blocks"] = list(star.star.blocks)
        summary["particles_block"] = star.particles_block
        summary["optics_block"] = star.optics_block
        summary["optics_groups"] = None if star.optics is None else len(star.optics)  # None: RELION 3.0, no optics block
        columns = list(star.particles.columns)
        summary["columns"] = columns
        summary["pose_columns"] = [c for c in POSE_COLUMNS if c in columns]
        summary["latent_columns"] = [c for c in columns if c.startswith("pvaeZ")]
        summary["truth_columns"] = [c for c in columns if c.startswith("pvaeTrue")]
        npz_status = _infer_npz_status(Path(source.path))
        if npz_status is not None:
            summary["infer_npz"] = npz_status
        try:
            ctf = star.ctf_parameters()
        except ParticleVAEError as missing:
            summary["ctf"] = f"not available ({missing})"
        else:
            defocus = (ctf["defocus_u"] + ctf["defocus_v"]) / 2e4
            summary["ctf"] = {
                "defocus_um_min": float(defocus.min()), "defocus_um_max": float(defocus.max()),
                "voltage_kv": sorted(set(ctf["voltage"].round(3).tolist())),
                "cs_mm": sorted(set(ctf["cs"].round(4).tolist())),
                "amplitude_contrast": sorted(set(ctf["amplitude_contrast"].round(4).tolist())),
            }
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
    """Human-readable multi-line text for :func:`summarize`'s result."""
    apix = summary["pixel_size_angst"]
    if apix is None:
        apix_text = f"unknown: {summary.get('pixel_size_missing', 'the input gives none')}"
    else:
        apix_text = f"{apix:g} A (from {summary['pixel_size_from']})"
    lines = [
        f"{summary['path']}: {summary.get('star_format', summary['kind'])}",
        f"  particles       {summary['particles']}",
        f"  stacks          {summary['stacks']} (all found and complete)",
        f"  box             {summary['box_px']} px",
        f"  pixel size      {apix_text}",
    ]
    if "blocks" in summary:
        lines.append(f"  blocks          {_blocks_text(summary)}")
        ctf = summary["ctf"]
        if isinstance(ctf, dict):
            lines.append(
                f"  CTF             defocus {ctf['defocus_um_min']:.3g}-{ctf['defocus_um_max']:.3g} um, "
                f"{'/'.join(f'{v:g}' for v in ctf['voltage_kv'])} kV, Cs {'/'.join(f'{v:g}' for v in ctf['cs_mm'])} mm, "
                f"amplitude contrast {'/'.join(f'{v:g}' for v in ctf['amplitude_contrast'])}"
            )
        else:
            lines.append(f"  CTF             {ctf}")
        for label, key in (("pose columns", "pose_columns"), ("latent columns", "latent_columns"), ("ground truth", "truth_columns")):
            lines.append(f"  {label:<15} {', '.join(summary[key]) if summary[key] else 'none'}")
        lines.append(f"  all columns     {len(summary['columns'])}")
        if "infer_npz" in summary:
            lines.append(f"  infer .npz      {summary['infer_npz']}")
    if "pixel_stats" in summary:
        stats = summary["pixel_stats"]
        lines.append(f"  pixels          mean {stats['mean']:.4g}, std {stats['std']:.4g}, range {stats['min']:.4g}..{stats['max']:.4g} "
                     f"({stats['images_read']} images sampled)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    summary = summarize(args.path, datadir=args.stack_dir, pixel_size=args.pixel_size, sample=args.sample)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
