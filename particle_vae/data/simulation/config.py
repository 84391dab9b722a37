"""Simulation settings: the :class:`SimulationConfig` dataclass, its :class:`StructureSpec`
classes and the allowed values of its choice fields."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

VIEWS = ("uniform", "top", "side", "top-side")
SHIFT_DISTRIBUTIONS = ("uniform", "gaussian")
SNR_MODES = ("dataset", "particle")


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
            (package docstring, step 6), flagged ``rlnCtfDataAreCtfPremultiplied = 1`` in the
            optics block; needs ``ctf``. ``snr`` is then the SNR of the recorded image
            ``CTF * projection + noise``, before the premultiplication.
        defocus_star: STAR with rlnDefocusU/V[/Angle] rows to draw from, else
            ``defocus_range`` (mean defocus, Angstrom) and ``max_astigmatism`` (Angstrom).
        snr: signal-to-noise ratio (``None`` or ``inf``: no noise); snr_mode:
            ``dataset`` or ``particle`` (see the package docstring).
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
