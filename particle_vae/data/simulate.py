"""Simulated cryo-EM particle stacks with known poses, classes, CTF and noise.

Image formation, per particle (see ``docs/simulator.md``):

1. pose: RELION Euler angles ``(rot, tilt, psi)`` in degrees, uniform on SO(3)
   (Haar measure: ``rot, psi`` uniform, ``cos(tilt)`` uniform) or a limited
   view set; the projection of a density ``V`` indexed ``[z, y, x]`` and
   centred on voxel ``box // 2`` is
   ``P(x, y) = sum_z V(A^T (x, y, z))`` with ``A = euler_to_matrix(rot, tilt, psi)``,
   evaluated with trilinear interpolation (``torch.nn.functional.grid_sample``)
   at unit steps along ``z`` (:class:`Projector`);
2. optional Fourier-crop downsampling to the output box (the centre pixel
   stays at ``box // 2``; the pixel size grows by ``box / output box``);
3. shift: the particle centre is moved to ``d`` (pixels of the output box) with
   an exact Fourier phase ramp, so RELION's origin is ``o = -d``
   (``rlnOriginXAngst, rlnOriginYAngst = -d * pixel_size``) and the image obeys
   RELION's forward model ``obs(x) = P_{rot,tilt,0}(R(psi)(x + o))``;
4. CTF (:mod:`particle_vae.data.ctf`, RELION convention) by Fourier
   multiplication in the box;
5. white Gaussian noise at a requested SNR, where
   ``SNR = var(noise-free image over the whole box) / var(noise)``, either for
   the dataset (one noise level for all particles: the mean image variance of
   the first ``min(n, 256)`` particles divided by the SNR) or per particle;
6. optionally (``ctf_premultiplied``, RELION 5's ``rlnCtfDataAreCtfPremultiplied = 1``)
   the recorded image of steps 4-5 is multiplied once more by its own CTF, as
   RELION's premultiplied extraction does: the stored particle is
   ``CTF * (CTF * projection + noise)``. The SNR of step 5 is that of the
   recorded image before this multiplication (the microscope's SNR; the noise
   level, and with it the noise drawn for each particle, is the same as without
   premultiplication). The multiplication leaves the ratio at each Fourier
   component unchanged (signal and noise are both multiplied by the CTF) but
   colours the noise, so the variance ratio of the stored image over the box
   differs from the requested SNR. Noise-free, the stored particle is the
   inverse transform of ``CTF**2 * FT(projection)`` (exactly so in an odd box;
   in an even box the self-mirrored Nyquist column of the ``rfft2`` grid can
   only carry the CTF averaged over ``ky`` and ``-ky``, so there the square of
   that average is applied).

:func:`run_simulation` streams batches into ``particles.mrcs`` (and optionally
``clean.mrcs``, the noise-free particles as stored (premultiplied when the
particles are), and ``centred.mrcs``, the projections
with ``psi = 0`` and no shift before the CTF), then writes ``particles.star``
and ``simulation.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from particle_vae.conventions import euler_to_matrix, fourier_shift
from particle_vae.data.ctf import apply_ctf, compute_ctf, electron_wavelength, read_defocus_table, sample_defocus
from particle_vae.data.structures import load_density
from particle_vae.errors import InputFileError
from particle_vae.fourier import fourier_crop
from particle_vae.io.atomic import atomic_write_text, check_output_path

__all__ = [
    "VIEWS",
    "SHIFT_DISTRIBUTIONS",
    "SNR_MODES",
    "SIMULATION_PRESETS",
    "StructureSpec",
    "SimulationConfig",
    "ParticleParameters",
    "SimulationResult",
    "Simulator",
    "Projector",
    "project_volume",
    "sample_rotations",
    "sample_shifts",
    "preset_config",
    "validate_config",
    "run_simulation",
]

log = logging.getLogger(__name__)

#: Per-particle angles: a ``(B,)`` sequence, array or tensor (degrees).
Angles = Sequence[float] | np.ndarray | torch.Tensor

VIEWS = ("uniform", "top", "side", "top-side")
SHIFT_DISTRIBUTIONS = ("uniform", "gaussian")
SNR_MODES = ("dataset", "particle")

#: Particles whose clean-image variance sets the noise level in ``dataset`` SNR mode.
SNR_PILOT = 256

#: Relative path (under the data root) of the EMPIAR-10025 micrograph CTF table.
EMPIAR10025_CTF = "cryoem/empiar10025_metadata/ctf_params.star"

#: Preset settings; structure files are relative to ``<data root>/structures``.
SIMULATION_PRESETS: dict[str, dict] = {
    "t20s": {
        "description": "EMPIAR-10025-like T20S proteasome (PDB 3J9I), 64 px at 4 A",
        "structures": [("t20s", "t20s_3j9i.pdb", True)],
        "box": 64, "pixel_size": 4.0, "downsample_to": None,
        "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1,
        "defocus_star": EMPIAR10025_CTF, "defocus_range": (13800.0, 19900.0), "max_astigmatism": 300.0,
        "max_shift": 3.0,
    },
    "groel": {
        "description": "EMPIAR-10029-like GroEL 14-mer (PDB 1OEL + BIOMT), 200 px at 1.35 A Fourier-cropped to 100 px at 2.7 A",
        "structures": [("groel", "groel_1oel.pdb", True)],
        "box": 200, "pixel_size": 1.35, "downsample_to": 100,
        "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1,
        "defocus_star": None, "defocus_range": (10000.0, 25000.0), "max_astigmatism": 300.0,
        "max_shift": 5.0,
    },
    "mixture": {
        "description": "three classes (T20S, GroEL 14-mer, single GroEL heptamer ring), 64 px at 4 A",
        "structures": [("t20s", "t20s_3j9i.pdb", True), ("groel", "groel_1oel.pdb", True),
                       ("groel_ring", "groel_1oel.pdb", False)],
        "box": 64, "pixel_size": 4.0, "downsample_to": None,
        "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1,
        "defocus_star": EMPIAR10025_CTF, "defocus_range": (13800.0, 19900.0), "max_astigmatism": 300.0,
        "max_shift": 3.0,
    },
}


@dataclass
class StructureSpec:
    """One class of the simulation.

    Attributes:
        path: PDB model or MRC map.
        name: label written to ``pvaeTrueStructure``.
        assembly: expand PDB ``REMARK 350`` assemblies (ignored for maps).
    """

    path: Path
    name: str
    assembly: bool = True


@dataclass
class SimulationConfig:
    """Every setting of a simulation (all lengths documented with their unit).

    Attributes:
        structures: one :class:`StructureSpec` per class.
        n: number of particles.
        box: simulation box edge in pixels; pixel_size: its Angstrom per pixel.
        downsample_to: output box (pixels) after Fourier cropping, or ``None``.
        resolution: Angstrom, Gaussian blur of PDB models (default ``2 * pixel_size``)
            and optional low-pass of maps (default none).
        class_weights: relative class frequencies (default equal).
        views: ``uniform`` (SO(3) Haar), ``top`` (rot = tilt = 0), ``side``
            (tilt = 90, rot uniform) or ``top-side`` (half each); psi is always uniform.
        max_shift: pixels of the output box; ``uniform``: each axis uniform in
            ``[-max_shift, max_shift]``; ``gaussian``: normal with standard deviation
            ``max_shift / 2`` truncated at ``+-max_shift``.
        ctf: apply a CTF. voltage: kV; cs: mm; amplitude_contrast: fraction;
            phase_shift: degrees; bfactor: Angstrom^2 (envelope ``exp(-B k^2 / 4)``).
        ctf_premultiplied: store CTF-premultiplied particles, ``CTF * (CTF * projection + noise)``
            (module docstring, step 6), flagged ``rlnCtfDataAreCtfPremultiplied = 1`` in the
            optics block; needs ``ctf``. ``snr`` is then the SNR of the recorded image
            ``CTF * projection + noise``, before the premultiplication.
        defocus_star: STAR with rlnDefocusU/V[/Angle] rows to draw from, else
            ``defocus_range`` (mean defocus, Angstrom) and ``max_astigmatism`` (Angstrom).
        snr: signal-to-noise ratio (``None`` or ``inf``: no noise); snr_mode:
            ``dataset`` or ``particle`` (see module docstring).
        seed: random seed; batch_size: particles per batch (does not change results).
        write_clean: also write ``clean.mrcs`` and ``centred.mrcs``.
        preset: name of the preset this came from, if any.
    """

    structures: list[StructureSpec]
    n: int
    box: int = 64
    pixel_size: float = 4.0
    downsample_to: int | None = None
    resolution: float | None = None
    class_weights: list[float] | None = None
    views: str = "uniform"
    max_shift: float = 0.0
    shift_distribution: str = "uniform"
    ctf: bool = True
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift: float = 0.0
    bfactor: float = 0.0
    ctf_premultiplied: bool = False
    defocus_star: Path | None = None
    defocus_range: tuple[float, float] = (10000.0, 25000.0)
    max_astigmatism: float = 300.0
    snr: float | None = 0.1
    snr_mode: str = "dataset"
    seed: int = 0
    batch_size: int = 64
    write_clean: bool = False
    preset: str | None = None

    @property
    def output_box(self) -> int:
        """Edge of the written images in pixels."""
        return int(self.downsample_to or self.box)

    @property
    def output_pixel_size(self) -> float:
        """Angstrom per pixel of the written images."""
        return float(self.pixel_size) * self.box / self.output_box

    @property
    def noisy(self) -> bool:
        """Whether noise is added."""
        return self.snr is not None and math.isfinite(self.snr)

    def to_dict(self) -> dict:
        """JSON-friendly settings (paths as strings)."""
        out = asdict(self)
        out["structures"] = [{"path": str(s.path), "name": s.name, "assembly": s.assembly} for s in self.structures]
        out["defocus_star"] = None if self.defocus_star is None else str(self.defocus_star)
        out["defocus_range"] = list(self.defocus_range)
        out["snr"] = self.snr if self.noisy else None
        out["output_box"] = self.output_box
        out["output_pixel_size"] = self.output_pixel_size
        return out


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


# --------------------------------------------------------------------------- poses

def sample_rotations(n: int, rng: np.random.Generator, views: str = "uniform") -> np.ndarray:
    """Draw RELION Euler angles.

    ``uniform`` is the Haar measure on SO(3): for ``A = Rz(psi) Ry(tilt) Rz(rot)``
    the invariant volume element is ``sin(tilt) d rot d tilt d psi``, so ``rot``
    and ``psi`` are uniform and ``cos(tilt)`` is uniform in ``[-1, 1]``.
    ``top``: ``rot = tilt = 0``; ``side``: ``tilt = 90``, ``rot`` uniform;
    ``top-side``: each particle top or side with probability 1/2. ``psi`` is
    always uniform.

    Args:
        n: number of poses; rng: numpy generator; views: one of :data:`VIEWS`.
    Returns:
        ``(n, 3)`` float64 ``(rot, tilt, psi)`` in degrees, ``rot, psi`` in
        ``[-180, 180)``, ``tilt`` in ``[0, 180]``.
    """
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    rot = rng.uniform(-180.0, 180.0, size=n)
    cos_tilt = rng.uniform(-1.0, 1.0, size=n)
    psi = rng.uniform(-180.0, 180.0, size=n)
    side = rng.uniform(size=n) < 0.5
    tilt = np.degrees(np.arccos(cos_tilt))
    if views == "top":
        rot, tilt = np.zeros(n), np.zeros(n)
    elif views == "side":
        tilt = np.full(n, 90.0)
    elif views == "top-side":
        rot = np.where(side, rot, 0.0)
        tilt = np.where(side, 90.0, 0.0)
    return np.stack([rot, tilt, psi], axis=1)


def sample_shifts(n: int, rng: np.random.Generator, max_shift: float, distribution: str = "uniform") -> np.ndarray:
    """Draw particle-centre displacements.

    Args:
        n: number; rng: numpy generator; max_shift: pixels (>= 0).
        distribution: ``uniform`` (each axis in ``[-max_shift, max_shift]``) or
            ``gaussian`` (standard deviation ``max_shift / 2``, truncated at
            ``+-max_shift`` by redrawing).
    Returns:
        ``(n, 2)`` float64 ``(dx, dy)`` in pixels.
    """
    if distribution not in SHIFT_DISTRIBUTIONS:
        raise ValueError(f"shift distribution must be one of {SHIFT_DISTRIBUTIONS}, got {distribution!r}")
    if max_shift <= 0:
        return np.zeros((n, 2))
    if distribution == "uniform":
        return rng.uniform(-max_shift, max_shift, size=(n, 2))
    out = rng.normal(0.0, max_shift / 2.0, size=(n, 2))
    bad = np.abs(out) > max_shift
    while bad.any():
        out[bad] = rng.normal(0.0, max_shift / 2.0, size=int(bad.sum()))
        bad = np.abs(out) > max_shift
    return out


# ----------------------------------------------------------------------- projection

class Projector:
    """Real-space projector of one density (trilinear line integrals).

    For each output pixel ``(x, y)`` (relative to ``box // 2``) the volume is
    sampled at ``A^T (x, y, z)`` for integer ``z``; only points inside the
    density's support sphere (radius from ``support_threshold``, at most
    ``box / 2``: density outside the sphere inscribed in the box is ignored)
    are evaluated, which halves the work compared with the full cube.

    Args:
        volume: ``(box, box, box)`` density indexed ``[z, y, x]``, centred on voxel ``box // 2``.
        support_threshold: voxels with ``|V| > threshold * max|V|`` define the support.
        max_samples: largest number of sample points evaluated in one
            ``grid_sample`` call (bounds memory to about ``40 * max_samples`` bytes).
    """

    def __init__(self, volume: np.ndarray | torch.Tensor, support_threshold: float = 1e-4, max_samples: int = 1 << 23):
        vol = torch.as_tensor(np.asarray(volume, dtype=np.float32) if not isinstance(volume, torch.Tensor) else volume)
        vol = vol.to(torch.float32).contiguous()
        if vol.dim() != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"Projector needs a cubic (box, box, box) volume, got {tuple(vol.shape)}")
        self.volume = vol
        self.box = box = int(vol.shape[0])
        c = box // 2
        magnitude = vol.abs()
        peak = float(magnitude.max())
        if peak == 0:
            raise ValueError("the volume is empty (all zeros)")
        support = torch.nonzero(magnitude > support_threshold * peak).to(torch.float32) - c
        radius = float(support.norm(dim=1).max()) + 1.0
        self.radius = min(radius, box / 2.0)
        h = int(math.ceil(self.radius))
        axis = torch.arange(-h, h + 1, dtype=torch.float32)
        zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
        points = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
        inside = (points.square().sum(dim=1) <= self.radius ** 2)
        inside &= (points[:, 0] >= -c) & (points[:, 0] <= box - 1 - c) & (points[:, 1] >= -c) & (points[:, 1] <= box - 1 - c)
        self.points = points[inside].contiguous()  # (M, 3) (x, y, z) voxels from the centre
        self.pixel_index = ((self.points[:, 1] + c) * box + (self.points[:, 0] + c)).to(torch.int64)
        self.max_samples = int(max_samples)

    @property
    def n_points(self) -> int:
        """Sample points per projection."""
        return int(self.points.shape[0])

    def project(self, rot: Angles, tilt: Angles, psi: Angles) -> torch.Tensor:
        """Project for a batch of poses.

        Args:
            rot, tilt, psi: ``(B,)`` RELION Euler angles in degrees.
        Returns:
            ``(B, box, box)`` float32 projections, ``P(x, y) = sum_z V(A^T (x, y, z))``.
        """
        mats = torch.as_tensor(euler_to_matrix(rot, tilt, psi), dtype=torch.float32)
        batch = mats.shape[0]
        box, c = self.box, self.box // 2
        out = torch.zeros(batch, box * box, dtype=torch.float32)
        chunk = max(1, self.max_samples // max(self.n_points, 1))
        scale = 2.0 / max(box - 1, 1)
        volume = self.volume[None, None]
        for start in range(0, batch, chunk):
            mat = mats[start:start + chunk]
            # row vectors: (A^T p)^T = p^T A
            coords = torch.matmul(self.points[None], mat)  # (b, M, 3) = (x, y, z) voxel offsets
            coords.add_(c).mul_(scale).sub_(1.0)
            samples = F.grid_sample(volume, coords[None, :, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=True)
            out[start:start + chunk].index_add_(1, self.pixel_index, samples.reshape(mat.shape[0], -1))
        return out.reshape(batch, box, box)


def project_volume(volume: np.ndarray | torch.Tensor, rot: Angles, tilt: Angles, psi: Angles) -> torch.Tensor:
    """Project a ``[z, y, x]`` volume for RELION poses (degrees); see :class:`Projector`.

    Returns:
        ``(B, box, box)`` float32 tensor.
    """
    return Projector(volume).project(rot, tilt, psi)


# ------------------------------------------------------------------- configuration

def _settings_error(message: str, fix: str | None = None) -> InputFileError:
    return InputFileError(message, None, fix)


def validate_config(config: SimulationConfig) -> None:
    """Reject impossible settings with a one-line :class:`InputFileError`."""
    if not config.structures:
        raise _settings_error("no structure to simulate", "pass --structure PATH or a preset")
    if int(config.n) < 1:
        raise _settings_error(f"--n {config.n}: need at least one particle")
    if int(config.box) < 8:
        raise _settings_error(f"--box {config.box} is too small", "use a box of at least 8 px")
    if not config.pixel_size > 0:
        raise _settings_error(f"--pixel-size {config.pixel_size} must be positive")
    if config.downsample_to is not None and not 8 <= int(config.downsample_to) <= int(config.box):
        raise _settings_error(f"--downsample-to {config.downsample_to} must lie between 8 and the simulation box ({config.box} px)",
                              "give a smaller --downsample-to or a larger --box")
    if config.resolution is not None and not config.resolution > 0:
        raise _settings_error(f"--resolution {config.resolution} must be positive (Angstrom)")
    if config.views not in VIEWS:
        raise _settings_error(f"unknown view set '{config.views}'", f"choose one of {', '.join(VIEWS)}")
    if config.shift_distribution not in SHIFT_DISTRIBUTIONS:
        raise _settings_error(f"unknown shift distribution '{config.shift_distribution}'",
                              f"choose one of {', '.join(SHIFT_DISTRIBUTIONS)}")
    if not 0 <= config.max_shift < config.output_box / 2:
        raise _settings_error(f"--max-shift {config.max_shift} px is impossible in a {config.output_box} px box",
                              f"use 0 <= max shift < {config.output_box / 2:g} px")
    if config.snr is not None and not (config.snr > 0):
        raise _settings_error(f"--snr {config.snr} must be positive", "use e.g. 0.1, or inf for noise-free particles")
    if config.snr_mode not in SNR_MODES:
        raise _settings_error(f"unknown SNR mode '{config.snr_mode}'", f"choose one of {', '.join(SNR_MODES)}")
    if config.ctf_premultiplied and not config.ctf:
        raise _settings_error("--ctf-premultiplied multiplies the particles by their CTF, but the CTF is off (--no-ctf)",
                              "drop --no-ctf or --ctf-premultiplied")
    if not config.voltage > 0 or config.cs < 0 or not 0 <= config.amplitude_contrast < 1:
        raise _settings_error(f"impossible optics: {config.voltage} kV, Cs {config.cs} mm, amplitude contrast {config.amplitude_contrast}",
                              "voltage must be positive, Cs non-negative and amplitude contrast in [0, 1)")
    low, high = config.defocus_range
    if not 0 < low <= high or config.max_astigmatism < 0 or config.max_astigmatism / 2 >= low:
        raise _settings_error(f"impossible defocus range {low}-{high} A with astigmatism {config.max_astigmatism} A",
                              "use 0 < min <= max (Angstrom, underfocus positive)")
    if config.class_weights is not None:
        weights = np.asarray(config.class_weights, dtype=np.float64)
        if weights.shape != (len(config.structures),) or (weights < 0).any() or not weights.sum() > 0:
            raise _settings_error(f"class weights {list(config.class_weights)} do not fit {len(config.structures)} structure(s)",
                                  "give one non-negative weight per structure")
    if int(config.batch_size) < 1:
        raise _settings_error(f"--batch-size {config.batch_size} must be at least 1")
    names = [s.name for s in config.structures]
    if len(set(names)) != len(names):
        raise _settings_error(f"structure names {names} are not unique", "rename the files or give distinct names")


def preset_config(
    preset: str,
    n: int,
    data_dir: str | Path | None = None,
    structures: Sequence[str | Path] | None = None,
    defocus_star: str | Path | None = None,
    **overrides,
) -> SimulationConfig:
    """Build the configuration of a preset (see :data:`SIMULATION_PRESETS`), with overrides.

    Structure files are looked up in ``<data root>/structures`` (``data_dir``
    or ``$PARTICLE_VAE_DATA``) unless ``structures`` lists the files (one
    class per file, named after the file stem, assemblies expanded). The
    EMPIAR-10025 CTF table is used for ``t20s``/``mixture`` when the data root
    has it; ``defocus_star`` replaces it. Overriding ``box`` without
    ``downsample_to`` turns the preset's downsampling off.

    Args:
        preset: ``t20s``, ``groel`` or ``mixture``.
        n: number of particles.
        overrides: any :class:`SimulationConfig` field (``None`` values are ignored).
    Returns:
        A validated :class:`SimulationConfig`.
    Raises:
        InputFileError: unknown preset, no data root when one is needed,
            impossible settings.
    """
    from particle_vae.io.paths import data_root

    if preset not in SIMULATION_PRESETS:
        raise _settings_error(f"unknown preset '{preset}'", f"choose one of {', '.join(SIMULATION_PRESETS)}")
    spec = SIMULATION_PRESETS[preset]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(SimulationConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown simulation settings: {sorted(unknown)}")
    root = None
    if structures:
        specs = [StructureSpec(Path(p), Path(p).stem, True) for p in structures]
        stems = [s.name for s in specs]
        if len(set(stems)) != len(stems):
            specs = [replace(s, name=f"{s.name}_{i + 1}") for i, s in enumerate(specs)]
    else:
        root = data_root(data_dir)
        specs = [StructureSpec(root / "structures" / filename, name, assembly) for name, filename, assembly in spec["structures"]]
    star = None
    if defocus_star is not None:
        star = Path(defocus_star)
    elif spec["defocus_star"] is not None:
        root = root if root is not None else data_root(data_dir, required=False)
        if root is not None and (root / spec["defocus_star"]).is_file():
            star = root / spec["defocus_star"]
        else:
            log.info("no %s under the data root; drawing defocus uniformly from %.0f-%.0f A", spec["defocus_star"], *spec["defocus_range"])
    values = {key: spec[key] for key in ("box", "pixel_size", "downsample_to", "voltage", "cs", "amplitude_contrast",
                                         "defocus_range", "max_astigmatism", "max_shift")}
    if "box" in overrides and "downsample_to" not in overrides:
        values["downsample_to"] = None
    values.update(overrides)
    config = SimulationConfig(structures=specs, n=int(n), defocus_star=star, preset=preset, **values)
    validate_config(config)
    return config


# ----------------------------------------------------------------------- simulation

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
            if cfg.ctf_premultiplied:  # CTF * (CTF * projection + noise), step 6 of the module docstring
                ctf = self.ctf(start, stop)
                clean_np = apply_ctf(clean, ctf).numpy()
                particles = apply_ctf(torch.from_numpy(recorded), ctf).numpy() if cfg.noisy else clean_np
            yield {"start": start, "stop": stop, "particles": particles, "clean": clean_np, "recorded": recorded,
                   "recorded_clean": recorded_clean, "centred": None if cent is None else cent.numpy(), "sigma": sigma}


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
