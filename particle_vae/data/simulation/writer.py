"""Writing a simulation: :func:`run_simulation` streams the particles into ``particles.mrcs``
(and ``clean.mrcs``, ``centred.mrcs``), then writes ``particles.star`` and ``simulation.json``;
:class:`SimulationResult` records what was written."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from particle_vae.data.simulation.config import SimulationConfig
from particle_vae.data.simulation.simulator import ParticleParameters, Simulator
from particle_vae.data.simulation.validation import validate_config
from particle_vae.io.atomic import atomic_write_text, check_output_path


@dataclass
class SimulationResult:
    """What :func:`run_simulation` wrote.

    Attributes:
        out_dir: output folder; files: name -> path of every file written.
        n: particles; snr_measured: ``sum var(clean) / sum var(noise)`` over
            all particles (``None`` without noise); noise_sigma: the dataset
            noise standard deviation (``None`` in particle mode or without noise).
        summary: the contents of ``simulation.json``.
    """

    out_dir: Path
    files: dict[str, Path]
    n: int
    snr_measured: float | None
    noise_sigma: float | None
    summary: dict = field(default_factory=dict)


def _star_columns(config: SimulationConfig, params: ParticleParameters) -> dict[str, np.ndarray]:
    """Per-particle STAR columns: CTF (when applied) and the ``pvaeTrue*`` ground truth."""
    columns: dict[str, np.ndarray] = {}
    if config.ctf:
        n = len(params)
        columns.update({
            "rlnDefocusU": params.defocus[:, 0], "rlnDefocusV": params.defocus[:, 1], "rlnDefocusAngle": params.defocus[:, 2],
            "rlnCtfBfactor": np.full(n, float(config.bfactor)), "rlnPhaseShift": np.full(n, float(config.phase_shift)),
        })
    origin = -params.shifts * config.output_pixel_size
    names = np.asarray([s.name for s in config.structures], dtype=object)
    columns.update({
        "pvaeTrueAngleRot": params.angles[:, 0], "pvaeTrueAngleTilt": params.angles[:, 1], "pvaeTrueAnglePsi": params.angles[:, 2],
        "pvaeTrueOriginXAngst": origin[:, 0], "pvaeTrueOriginYAngst": origin[:, 1],
        "pvaeTrueClass": params.classes + 1, "pvaeTrueStructure": names[params.classes],
    })
    return columns


def run_simulation(
    config: SimulationConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    densities: Sequence[np.ndarray] | None = None,
    project_dir: str | Path | None = None,
) -> SimulationResult:
    """Simulate ``config.n`` particles and write them to ``out_dir``.

    Files: ``particles.mrcs`` (float32 stack), ``particles.star`` (RELION 3.1:
    optics block, with ``rlnCtfDataAreCtfPremultiplied 1`` for premultiplied
    particles, + particles with CTF and ``pvaeTrue*`` columns),
    ``simulation.json`` (settings, class counts, noise level, measured SNR) and,
    with ``config.write_clean``, ``clean.mrcs`` and ``centred.mrcs``. Every
    file is written atomically; existing files are kept unless ``overwrite``,
    and inputs are never overwritten.

    Args:
        config: settings; out_dir: output folder (created).
        overwrite: replace existing outputs. progress: show a tqdm bar.
        densities: optional pre-computed volumes (see :class:`Simulator`).
        project_dir: the folder RELION runs in: ``rlnImageName`` names ``particles.mrcs``
            relative to it, or absolutely when the stack lies outside it (default: the current folder).
    Returns:
        :class:`SimulationResult`.
    Raises:
        InputFileError / OutputFileError: bad inputs or settings, outputs that exist.
    """
    from tqdm import tqdm

    from particle_vae import __version__
    from particle_vae.io.mrc import StackWriter
    from particle_vae.io.paths import project_folder, stack_name_for_project
    from particle_vae.io.star import PREMULTIPLIED, image_name, make_particle_star

    began = time.perf_counter()
    validate_config(config)
    out_dir = Path(out_dir)
    if project_dir is not None and os.path.abspath(Path(project_dir).expanduser()) == os.path.abspath(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)  # the output folder as the project folder: it is about to exist
    project = project_folder(project_dir)
    inputs = tuple(s.path for s in config.structures) + ((config.defocus_star,) if config.defocus_star else ())
    names = ["particles.mrcs", "particles.star", "simulation.json"] + (["clean.mrcs", "centred.mrcs"] if config.write_clean else [])
    files = {name: out_dir / name for name in names}
    for path in files.values():  # fail before any work
        check_output_path(path, overwrite=overwrite, inputs=inputs)

    sim = Simulator(config, densities)
    box, apix = config.output_box, config.output_pixel_size
    writers = {"particles": StackWriter(files["particles.mrcs"], box, apix, overwrite=overwrite, inputs=inputs)}
    if config.write_clean:
        writers["clean"] = StackWriter(files["clean.mrcs"], box, apix, overwrite=overwrite, inputs=inputs)
        writers["centred"] = StackWriter(files["centred.mrcs"], box, apix, overwrite=overwrite, inputs=inputs)
    signal_var = noise_var = 0.0
    per_particle_snr = []
    entered = []
    try:
        for writer in writers.values():
            writer.__enter__()
            entered.append(writer)
        with tqdm(total=config.n, unit="particle", desc="simulate", disable=not progress, leave=False) as bar:
            for batch in sim.batches(centred=config.write_clean):
                writers["particles"].write(batch["particles"])
                if config.write_clean:
                    writers["clean"].write(batch["clean"])
                    writers["centred"].write(batch["centred"])
                clean = batch["recorded_clean"].astype(np.float64)  # the SNR is that of the recorded images
                noise = batch["recorded"].astype(np.float64) - clean
                s_var, n_var = clean.var(axis=(-2, -1)), noise.var(axis=(-2, -1))
                signal_var += float(s_var.sum())
                noise_var += float(n_var.sum())
                if config.noisy:
                    per_particle_snr.append(s_var / np.maximum(n_var, 1e-300))
                bar.update(batch["stop"] - batch["start"])
    except BaseException as error:
        for writer in reversed(entered):
            writer.__exit__(type(error), error, error.__traceback__)
        raise
    for writer in reversed(entered):
        writer.__exit__(None, None, None)

    params = sim.params
    stack_name = stack_name_for_project(files["particles.mrcs"], project)
    star = make_particle_star(
        [image_name(i, stack_name) for i in range(config.n)], pixel_size=apix, box=box, voltage=config.voltage,
        cs=config.cs, amplitude_contrast=config.amplitude_contrast, columns=_star_columns(config, params))
    if config.ctf_premultiplied:
        star = star.with_columns({}, optics_columns={PREMULTIPLIED: 1})
    star.write(files["particles.star"], overwrite=overwrite)

    snr_measured = signal_var / noise_var if config.noisy and noise_var > 0 else None
    counts = np.bincount(params.classes, minlength=len(config.structures))
    summary = {
        "particle_vae_version": __version__,
        "settings": config.to_dict(),
        "defocus_source": str(config.defocus_star) if (config.ctf and config.defocus_star) else ("uniform range" if config.ctf else None),
        "classes": [{"class": i + 1, "name": s.name, "path": str(s.path), "count": int(counts[i])}
                    for i, s in enumerate(config.structures)],
        "snr_definition": "variance of the noise-free (CTF-modulated) image over the whole box / noise variance"
                          + (", of the recorded image before the CTF premultiplication" if config.ctf_premultiplied else ""),
        "ctf_premultiplied": bool(config.ctf_premultiplied),
        "snr_requested": config.snr if config.noisy else None,
        "snr_measured": snr_measured,
        "snr_measured_mean_per_particle": float(np.concatenate(per_particle_snr).mean()) if per_particle_snr else None,
        "noise_sigma": sim.noise_sigma,
        "mean_signal_variance": signal_var / config.n,
        "support_radius_px": [round(p.radius, 2) for p in sim.projectors],
        "files": {name: str(path) for name, path in files.items()},
        "runtime_s": round(time.perf_counter() - began, 3),
    }
    check_output_path(files["simulation.json"], overwrite=overwrite, inputs=inputs)
    atomic_write_text(files["simulation.json"], json.dumps(summary, indent=2, default=str) + "\n")
    return SimulationResult(out_dir=out_dir, files=files, n=config.n, snr_measured=snr_measured,
                            noise_sigma=sim.noise_sigma, summary=summary)
