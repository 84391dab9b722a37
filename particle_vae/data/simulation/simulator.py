"""The :class:`Simulator`: loads the densities, draws every particle's ground truth
(:class:`ParticleParameters`) and renders noise-free and noisy particles in batches
(image formation: the package docstring)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from particle_vae.conventions import fourier_shift
from particle_vae.data.ctf import apply_ctf, compute_ctf, electron_wavelength, read_defocus_table, sample_defocus
from particle_vae.data.simulation.config import SimulationConfig
from particle_vae.data.simulation.poses import sample_rotations, sample_shifts
from particle_vae.data.simulation.projection import Projector
from particle_vae.data.simulation.validation import validate_config
from particle_vae.data.structures import load_density
from particle_vae.errors import InputFileError
from particle_vae.fourier import fourier_crop

log = logging.getLogger(__name__)

#: Particles whose clean-image variance sets the noise level in ``dataset`` SNR mode.
SNR_PILOT = 256


@dataclass
class ParticleParameters:
    """Ground truth of every particle.

    Attributes:
        classes: ``(n,)`` int, 0-based class index.
        angles: ``(n, 3)`` float64 ``(rot, tilt, psi)`` degrees (RELION ZYZ).
        shifts: ``(n, 2)`` float64 ``(dx, dy)`` particle-centre displacement in
            output pixels; RELION origin = ``-shifts * output_pixel_size`` Angstrom.
        defocus: ``(n, 3)`` float64 ``(U, V, angle)`` Angstrom, Angstrom, degrees.
    """

    classes: np.ndarray
    angles: np.ndarray
    shifts: np.ndarray
    defocus: np.ndarray

    def __len__(self) -> int:
        return int(self.classes.shape[0])



class Simulator:
    """Loads densities, draws the ground truth and renders particles in batches.

    Args:
        config: the settings (validated here).
        densities: optional pre-computed ``(box, box, box)`` volumes, one per
            structure (skips reading ``config.structures``).
    Attributes:
        params: :class:`ParticleParameters` of all ``config.n`` particles.
        projectors: one :class:`Projector` per class.
        noise_sigma: the dataset noise standard deviation once :meth:`batches` has started.
    """

    def __init__(self, config: SimulationConfig, densities: Sequence[np.ndarray] | None = None):
        validate_config(config)
        self.config = config
        self.noise_sigma: float | None = None  # set by batches() in dataset SNR mode
        if densities is None:
            densities = [load_density(s.path, config.pixel_size, config.box, config.resolution, assembly=s.assembly)
                         for s in config.structures]
        if len(densities) != len(config.structures):
            raise ValueError(f"{len(densities)} densities given for {len(config.structures)} structures")
        self.projectors = []
        for spec, volume in zip(config.structures, densities):
            if tuple(np.shape(volume)) != (config.box,) * 3:
                raise ValueError(f"density of {spec.name} has shape {np.shape(volume)}, expected {(config.box,) * 3}")
            try:
                self.projectors.append(Projector(volume))
            except ValueError:
                raise InputFileError("gives an empty density", spec.path, "check the file") from None
        self.defocus_table = read_defocus_table(config.defocus_star) if (config.ctf and config.defocus_star is not None) else None
        self.params = self._draw_parameters()
        self._check_ctf_sampling()

    def _draw_parameters(self) -> ParticleParameters:
        cfg = self.config
        streams = np.random.SeedSequence(int(cfg.seed)).spawn(5)
        rng_class, rng_pose, rng_shift, rng_ctf = (np.random.default_rng(s) for s in streams[:4])
        self._noise_seed = streams[4]
        k = len(cfg.structures)
        weights = np.ones(k) if cfg.class_weights is None else np.asarray(cfg.class_weights, dtype=np.float64)
        classes = rng_class.choice(k, size=cfg.n, p=weights / weights.sum()) if k > 1 else np.zeros(cfg.n, dtype=np.int64)
        angles = sample_rotations(cfg.n, rng_pose, cfg.views)
        shifts = sample_shifts(cfg.n, rng_shift, cfg.max_shift, cfg.shift_distribution)
        defocus = sample_defocus(cfg.n, rng_ctf, self.defocus_table, cfg.defocus_range, cfg.max_astigmatism)
        return ParticleParameters(classes=classes.astype(np.int64), angles=angles, shifts=shifts, defocus=defocus)

    def _check_ctf_sampling(self) -> None:
        """Warn when the CTF phase changes by more than pi between neighbouring
        Fourier pixels at Nyquist (the box is too small for the defocus)."""
        cfg = self.config
        if not cfg.ctf:
            return
        lam = electron_wavelength(cfg.voltage)
        k_nyq = 0.5 / cfg.output_pixel_size
        dk = 1.0 / (cfg.output_box * cfg.output_pixel_size)
        dz = float(self.params.defocus[:, :2].max())
        slope = abs(2 * math.pi * lam * dz * k_nyq - 2 * math.pi * cfg.cs * 1e7 * lam ** 3 * k_nyq ** 3)
        if slope * dk > math.pi:
            log.warning("the CTF at %.0f A defocus oscillates faster than a %d px box samples it at Nyquist; "
                        "use a larger box or smaller defocus", dz, cfg.output_box)

    def render(self, start: int, stop: int, centred: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise-free particles ``start .. stop-1``.

        Returns:
            ``(clean, centred)``: ``(B, out, out)`` float32 images after
            projection, downsampling, shift and CTF; and, if asked, the
            projections with ``psi = 0`` and no shift before the CTF (else ``None``).
        """
        cfg, p = self.config, self.params
        sl = slice(start, stop)
        angles, classes = p.angles[sl], p.classes[sl]
        batch = stop - start
        proj = torch.zeros(batch, cfg.box, cfg.box)
        cent = torch.zeros(batch, cfg.box, cfg.box) if centred else None
        for k in np.unique(classes):
            rows = np.flatnonzero(classes == k)
            a = angles[rows]
            proj[torch.as_tensor(rows)] = self.projectors[k].project(a[:, 0], a[:, 1], a[:, 2])
            if centred:
                cent[torch.as_tensor(rows)] = self.projectors[k].project(a[:, 0], a[:, 1], np.zeros(len(rows)))
        out_box = cfg.output_box
        if out_box != cfg.box:
            proj = fourier_crop(proj, out_box)
            cent = fourier_crop(cent, out_box) if centred else None
        clean = fourier_shift(proj, torch.as_tensor(p.shifts[sl]))
        ctf = self.ctf(start, stop)
        if ctf is not None:
            clean = apply_ctf(clean, ctf)
        return clean.to(torch.float32), cent

    def ctf(self, start: int, stop: int) -> torch.Tensor | None:
        """CTFs of particles ``start .. stop-1``: ``(B, out, out//2 + 1)`` float32 on the
        unshifted ``rfft2`` grid of the output box (``None`` when the CTF is off)."""
        cfg = self.config
        if not cfg.ctf:
            return None
        d = self.params.defocus[start:stop]
        return compute_ctf(cfg.output_box, cfg.output_pixel_size, d[:, 0], d[:, 1], d[:, 2], cfg.voltage, cfg.cs,
                           cfg.amplitude_contrast, cfg.phase_shift, cfg.bfactor)

    def batches(self, centred: bool = False) -> Iterator[dict]:
        """Render all particles in order, adding noise.

        Yields:
            dicts with ``start``, ``stop``, ``particles`` (noisy, float32 numpy
            ``(B, out, out)``, as stored), ``clean`` (the same without noise),
            ``recorded`` and ``recorded_clean`` (the recorded images with and
            without noise, before a CTF premultiplication: the arrays
            ``particles`` and ``clean`` themselves when the particles are not
            premultiplied), ``centred`` (or ``None``) and ``sigma`` (``(B,)``
            noise standard deviations of the recorded images).

        In ``dataset`` mode the noise level is fixed from the first
        ``min(n, 256)`` particles before anything is yielded; the noise stream
        is consumed particle by particle, so results do not depend on
        ``batch_size``.
        """
        cfg = self.config
        noise_rng = np.random.default_rng(self._noise_seed)
        self.noise_sigma = None
        pending: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
        if cfg.noisy and cfg.snr_mode == "dataset":
            pilot = min(cfg.n, SNR_PILOT)
            variances = []
            for start in range(0, pilot, cfg.batch_size):
                stop = min(start + cfg.batch_size, cfg.n)
                clean, cent = self.render(start, stop, centred)
                variances.append(clean.to(torch.float64).var(dim=(-2, -1), unbiased=False)[: pilot - start])
                pending.append((start, stop, clean, cent))
            signal = float(torch.cat(variances).mean())
            if not signal > 0:
                raise InputFileError("the simulated particles have no contrast (zero variance)", cfg.structures[0].path,
                                     "check the structure and the box")
            self.noise_sigma = math.sqrt(signal / cfg.snr)
        next_start = pending[-1][1] if pending else 0

        def produce() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
            yield from pending
            for start in range(next_start, cfg.n, cfg.batch_size):
                stop = min(start + cfg.batch_size, cfg.n)
                clean, cent = self.render(start, stop, centred)
                yield start, stop, clean, cent

        for start, stop, clean, cent in produce():
            clean_np = clean.numpy()
            batch = stop - start
            if cfg.noisy:
                if self.noise_sigma is not None:
                    sigma = np.full(batch, self.noise_sigma)
                else:
                    sigma = np.sqrt(clean_np.astype(np.float64).var(axis=(-2, -1)) / cfg.snr)
                noise = noise_rng.standard_normal(clean_np.shape, dtype=np.float32)
                particles = clean_np + noise * sigma[:, None, None].astype(np.float32)
            else:
                sigma = np.zeros(batch)
                particles = clean_np
            recorded, recorded_clean = particles, clean_np
            if cfg.ctf_premultiplied:  # CTF * (CTF * projection + noise), step 6 of the package docstring
                ctf = self.ctf(start, stop)
                clean_np = apply_ctf(clean, ctf).numpy()
                particles = apply_ctf(torch.from_numpy(recorded), ctf).numpy() if cfg.noisy else clean_np
            yield {"start": start, "stop": stop, "particles": particles, "clean": clean_np, "recorded": recorded,
                   "recorded_clean": recorded_clean, "centred": None if cent is None else cent.numpy(), "sigma": sigma}
