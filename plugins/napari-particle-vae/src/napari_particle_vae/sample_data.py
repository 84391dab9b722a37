"""A small simulated run for trying the plugin: three synthetic shapes, a tiny TARGET-VAE, inferred latents, clusters.

Nothing is downloaded and no reference data is needed: the three densities
are drawn here from Gaussian blobs (a compact ball, a ring and a rod), the
project's simulator projects them with random 3D orientations, in-plane shifts,
CTF and noise, the ``tiny`` preset is trained for a few epochs on CPU, and the
latents are written and clustered through :mod:`particle_vae.api`, exactly as
``particle-vae infer`` (``--no-refine``) and ``particle-vae analyze`` do. The finished run is cached (see
:func:`sample_cache_dir`), so only the first click takes time (about half a
minute on a laptop CPU).

Layout of a sample run folder ``OUT``::

    OUT/data/particles.mrcs, particles.star   simulated particles (with pvaeTrue* ground truth)
    OUT/run/                                  the training run (config.json, checkpoints/)
    OUT/particles_vae.star                    written by infer (poses, pvaeZ1..k)
    OUT/analysis/clustered_particles.star     written by analyze (rlnClassNumber)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: the STAR a finished sample run is opened from (relative to its folder)
SAMPLE_STAR = Path("analysis") / "clustered_particles.star"
#: names of the synthetic classes, in class order
SHAPE_NAMES = ("ball", "ring", "rod")


def sample_cache_dir() -> Path:
    """Where the one-click sample run is built and kept.

    ``$NAPARI_PARTICLE_VAE_SAMPLE_DIR`` if set, else
    ``$XDG_CACHE_HOME/napari-particle-vae/sample_run`` (``~/.cache`` by default).
    """
    explicit = os.environ.get("NAPARI_PARTICLE_VAE_SAMPLE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "napari-particle-vae" / "sample_run"


def synthetic_densities(box: int, pixel_size: float) -> list[np.ndarray]:
    """Three test objects as ``(box, box, box)`` float32 volumes indexed ``[z, y, x]``.

    * ``ball``: one compact blob, radius about 15% of the box;
    * ``ring``: a ring of 12 blobs, radius about 28% of the box (a donut);
    * ``rod``: 9 blobs along a line of about 60% of the box (a cigar).

    Blob width is about 1.5 pixels plus 6 Angstrom, so the shapes are smooth at
    any pixel size. Each volume sums to 1 (the simulator sets the noise level
    from the signal variance, so the scale does not matter).
    """
    centre = box // 2
    axis = (np.arange(box, dtype=np.float64) - centre) * pixel_size
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    half = box * pixel_size / 2
    sigma = 1.5 * pixel_size + 6.0

    def blobs(points: np.ndarray, width: float) -> np.ndarray:
        volume = np.zeros((box, box, box), dtype=np.float64)
        for x, y, z in points:
            volume += np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * width ** 2))
        return (volume / volume.sum()).astype(np.float32)

    ball = blobs(np.zeros((1, 3)), 0.15 * half * 1.6)
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ring_radius = 0.56 * half
    ring = blobs(np.stack([ring_radius * np.cos(angles), ring_radius * np.sin(angles), np.zeros(12)], axis=1), sigma)
    along = np.linspace(-0.6 * half, 0.6 * half, 9)
    rod = blobs(np.stack([np.zeros(9), np.zeros(9), along], axis=1), sigma)
    return [ball, ring, rod]


def make_sample_run(out_dir: str | Path, n: int = 400, epochs: int = 4, box: int = 32, pixel_size: float = 8.0,
                    snr: float = 0.5, k: int = 3, seed: int = 0, overwrite: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Simulate, train, infer and cluster a small run; return its clustered STAR.

    Args:
        out_dir: folder to write (see the module docstring for its layout).
        n: particles; epochs: training epochs of the ``tiny`` preset.
        box: image edge in pixels (the ``tiny`` preset trains at 32 px);
            pixel_size: Angstrom per pixel.
        snr: signal-to-noise ratio of the simulated particles (variance ratio).
        k: k-means clusters written to ``rlnClassNumber``.
        seed: seed of the simulation, training and clustering.
        overwrite: rebuild even if the folder holds a finished sample run.
        progress: optional ``callback(step description, step number, number of steps)``.
    Returns:
        ``out_dir / analysis / clustered_particles.star``.
    Raises:
        particle_vae.errors.ParticleVAEError: a step failed for a reason a user can fix.
    """
    from particle_vae import api
    from particle_vae.data.simulation import SimulationConfig, StructureSpec, validate_config

    out_dir = Path(out_dir)
    result = out_dir / SAMPLE_STAR
    if result.is_file() and not overwrite:
        return result
    steps = 4

    def report(text: str, number: int) -> None:
        log.info("sample run: %s", text)
        if progress is not None:
            progress(text, number, steps)

    report(f"simulating {n} particles of three shapes", 0)
    densities = synthetic_densities(box, pixel_size)
    config = SimulationConfig(
        structures=[StructureSpec(Path(f"synthetic_{name}"), name, False) for name in SHAPE_NAMES], n=int(n), box=int(box),
        pixel_size=float(pixel_size), downsample_to=None, snr=float(snr), seed=int(seed), max_shift=2.0,
        defocus_range=(8000.0, 15000.0),
    )
    validate_config(config)
    # the sample folder is its own project folder: its STARs name the stacks relative to it, wherever napari runs
    simulated = api.simulate(api.SimulateRequest(config, out_dir / "data", overwrite=True, progress=False,
                                                 project_dir=out_dir, densities=densities))

    report(f"training the tiny TARGET-VAE for {epochs} epochs", 1)
    trained = api.train(api.TrainRequest.from_preset("tiny", out_dir / "run", api.ParticleData(simulated.star),
                                                     epochs=int(epochs), seed=int(seed), device="cpu", overwrite=True))

    report("writing poses and latents (infer)", 2)
    inferred = api.infer(api.InferRequest(trained.run, out_dir / "particles_vae.star", device="cpu", refine=None,
                                          project_dir=out_dir, overwrite=True))

    report(f"clustering the latents into {k} classes (analyze)", 3)
    api.analyze(api.AnalyzeRequest(inferred.star, out_dir / "analysis", run=trained.run, k=int(k), seed=int(seed),
                                   images=False, project_dir=out_dir, overwrite=True))
    report("done", 4)
    return result


def make_sample_data():
    """napari sample-data command: build (once) and open the sample run.

    Returns:
        napari layer data tuples, as the reader gives for the run's clustered STAR.
    """
    from napari.utils.notifications import show_info

    from napari_particle_vae.reader import read_particle_run

    folder = sample_cache_dir()
    star = folder / SAMPLE_STAR
    if not star.is_file():
        show_info(f"napari-particle-vae: building the sample run in {folder} (once; about half a minute on CPU)")
        make_sample_run(folder)
    return read_particle_run(str(star))
