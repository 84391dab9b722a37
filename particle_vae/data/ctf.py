"""Contrast transfer function (CTF) of a transmission electron microscope.

The CTF is written in RELION's sign convention (``CTF::getCTF``), so that images
simulated here and CTF values computed from the same STAR columns agree with
what RELION itself would use. For a spatial frequency ``k`` (1/Angstrom) with
azimuth ``az`` (radians, measured from the ``+x`` axis, i.e. along image
columns, towards ``+y``, i.e. along rows)::

    dz(k)  = (U + V) / 2 + (U - V) / 2 * cos(2 (az - angle))      underfocus > 0
    chi(k) = -pi * lambda * dz * |k|^2 + (pi / 2) * Cs * lambda^3 * |k|^4
             - phase_shift - atan(w / sqrt(1 - w^2))
    CTF(k) = -sin(chi(k)) * exp(-B |k|^2 / 4)

with ``U, V`` = ``rlnDefocusU, rlnDefocusV`` (Angstrom), ``angle`` =
``rlnDefocusAngle`` (degrees in the files, radians in the formula), ``lambda``
the relativistic electron wavelength (Angstrom), ``Cs`` the spherical
aberration (mm in the files, converted to Angstrom), ``w`` the amplitude
contrast, ``phase_shift`` = ``rlnPhaseShift`` (degrees in the files) and ``B`` =
``rlnCtfBfactor`` (Angstrom^2).

Sign: at ``k = 0`` and without a phase plate ``chi = -atan(w / sqrt(1 - w^2))``
so ``CTF(0) = sin(atan(w / sqrt(1 - w^2))) = +w``, and for underfocus the CTF
rises from ``+w`` towards ``+1`` at low frequency. Multiplying a projection of a
positive density by this CTF therefore gives a particle that is bright on a
dark background at low resolution, like RELION-extracted particles (which are
contrast-inverted during extraction).

Defocus along the direction ``angle`` is ``U`` and perpendicular to it ``V``.

**CTF-premultiplied particles.** RELION can store particles already multiplied
by their CTF (``rlnCtfDataAreCtfPremultiplied = 1`` in the optics block; RELION
5 writes the flag for every optics group). Such an image is
``CTF * (CTF * projection + noise)``, so wherever a model is compared with the
stored image the projection must be multiplied by ``CTF**2``, not by the CTF.
:func:`effective_ctf` returns exactly the factor to use (``CTF`` or ``CTF**2``
per particle); :func:`ctf_from_table` stays the physical CTF.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from particle_vae.errors import InputFileError
from particle_vae.fourier import ctf_frequencies

#: A scalar or a per-particle ``(B,)`` sequence, array or tensor.
PerParticle = float | Sequence[float] | np.ndarray | torch.Tensor

__all__ = [
    "electron_wavelength",
    "evaluate_ctf",
    "compute_ctf",
    "ctf_from_table",
    "effective_ctf",
    "premultiplied_ctf",
    "apply_ctf",
    "read_defocus_table",
    "sample_defocus",
    "PerParticle",
]

# CODATA 2018 exact / recommended values (SI).
_PLANCK = 6.62607015e-34  # J s
_ELECTRON_MASS = 9.1093837015e-31  # kg
_ELEMENTARY_CHARGE = 1.602176634e-19  # C
_SPEED_OF_LIGHT = 299792458.0  # m / s


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic wavelength of electrons accelerated through ``voltage_kv``.

    ``lambda = h / sqrt(2 m0 e U (1 + e U / (2 m0 c^2)))``.

    Args:
        voltage_kv: acceleration voltage in kilovolts (e.g. 300).
    Returns:
        Wavelength in Angstrom (0.019687 A at 300 kV, 0.025079 A at 200 kV).
    Raises:
        ValueError: non-positive voltage.
    """
    if not voltage_kv > 0:
        raise ValueError(f"acceleration voltage must be positive, got {voltage_kv} kV")
    volts = float(voltage_kv) * 1e3
    energy = _ELEMENTARY_CHARGE * volts
    momentum = math.sqrt(2.0 * _ELECTRON_MASS * energy * (1.0 + energy / (2.0 * _ELECTRON_MASS * _SPEED_OF_LIGHT ** 2)))
    return _PLANCK / momentum * 1e10


def _param(value: PerParticle, like: torch.Tensor) -> torch.Tensor:
    """A per-particle parameter as ``(B, 1, ..., 1)`` (or a 0-d tensor) matching ``like``'s rank."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.array(value, dtype=np.float64))
    tensor = tensor.to(device=like.device, dtype=torch.float64)
    if tensor.dim() == 0:
        return tensor
    return tensor.reshape((-1,) + (1,) * like.dim())


def evaluate_ctf(
    kx: torch.Tensor,
    ky: torch.Tensor,
    defocus_u: PerParticle,
    defocus_v: PerParticle,
    defocus_angle: PerParticle = 0.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift: PerParticle = 0.0,
    bfactor: PerParticle = 0.0,
) -> torch.Tensor:
    """The CTF (module docstring formula) at arbitrary frequencies.

    Args:
        kx, ky: frequencies in 1/Angstrom, any common shape ``K`` (x along
            columns, y along rows).
        defocus_u, defocus_v: Angstrom, underfocus positive; scalars or ``(B,)``.
        defocus_angle: degrees from the ``+x`` axis to the ``U`` direction; scalar or ``(B,)``.
        voltage: kV. cs: spherical aberration in mm. amplitude_contrast: ``w`` in ``[0, 1)``.
        phase_shift: degrees (phase plate); scalar or ``(B,)``.
        bfactor: Angstrom^2, envelope ``exp(-B |k|^2 / 4)``; scalar or ``(B,)``.
    Returns:
        float64 tensor of shape ``K`` when every parameter is a scalar, else ``(B,) + K``.
    """
    if not 0.0 <= float(amplitude_contrast) < 1.0:
        raise ValueError(f"amplitude contrast must lie in [0, 1), got {amplitude_contrast}")
    kx = kx.to(torch.float64)
    ky = ky.to(torch.float64)
    wavelength = electron_wavelength(voltage)
    cs_angst = float(cs) * 1e7
    k2 = kx * kx + ky * ky
    azimuth = torch.atan2(ky, kx)
    u = _param(defocus_u, k2)
    v = _param(defocus_v, k2)
    angle = torch.deg2rad(_param(defocus_angle, k2))
    defocus = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2.0 * (azimuth - angle))
    w = float(amplitude_contrast)
    amplitude_phase = math.atan(w / math.sqrt(1.0 - w * w))
    chi = (
        -math.pi * wavelength * defocus * k2
        + 0.5 * math.pi * cs_angst * wavelength ** 3 * k2 * k2
        - torch.deg2rad(_param(phase_shift, k2))
        - amplitude_phase
    )
    ctf = -torch.sin(chi)
    bfac = _param(bfactor, k2)
    if bool(torch.any(bfac != 0)):
        ctf = ctf * torch.exp(-bfac * k2 / 4.0)
    return ctf


def compute_ctf(
    box: int,
    pixel_size: float,
    defocus_u: PerParticle,
    defocus_v: PerParticle,
    defocus_angle: PerParticle = 0.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift: PerParticle = 0.0,
    bfactor: PerParticle = 0.0,
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """CTF of a batch of particles on the FFT grid of a ``box x box`` image.

    Args:
        box: image edge in pixels; pixel_size: Angstrom per pixel.
        defocus_u, defocus_v: ``(B,)`` Angstrom (underfocus positive) or scalars.
        defocus_angle: ``(B,)`` degrees or scalar. voltage: kV; cs: mm;
        amplitude_contrast: fraction; phase_shift: degrees; bfactor: Angstrom^2.
        rfft: ``True`` for the ``rfft2`` half-plane layout ``(box, box//2 + 1)``,
            ``False`` for the full ``fft2`` layout ``(box, box)``; both unshifted.
    Returns:
        ``(B, box, box//2 + 1)`` (or ``(B, box, box)``) tensor; a leading batch
        axis of 1 when every parameter is a scalar.
    """
    kx, ky = ctf_frequencies(box, pixel_size, rfft=rfft, device=device)
    ctf = evaluate_ctf(kx, ky, defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift, bfactor)
    if ctf.dim() == 2:
        ctf = ctf[None]
    return ctf.to(dtype)


def ctf_from_table(table: pd.DataFrame, box: int, pixel_size: float, rfft: bool = True,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CTFs for the rows of :meth:`particle_vae.io.star.ParticleStar.ctf_parameters`.

    Args:
        table: DataFrame with ``defocus_u``, ``defocus_v`` (Angstrom),
            ``defocus_angle`` (degrees), ``voltage`` (kV), ``cs`` (mm),
            ``amplitude_contrast``, and optionally ``phase_shift`` (degrees)
            and ``bfactor`` (Angstrom^2). Voltage, Cs and amplitude contrast may
            vary between rows (several optics groups).
        box, pixel_size: image edge (pixels) and Angstrom per pixel.
    Returns:
        ``(len(table), box, box//2 + 1)`` (or ``(N, box, box)``) tensor.
    """
    n = len(table)
    phase = table["phase_shift"].to_numpy(np.float64) if "phase_shift" in table else np.zeros(n)
    bfac = table["bfactor"].to_numpy(np.float64) if "bfactor" in table else np.zeros(n)
    optics = table[["voltage", "cs", "amplitude_contrast"]].to_numpy(np.float64)
    kx, ky = ctf_frequencies(box, pixel_size, rfft=rfft, device=device)
    out = torch.empty((n,) + tuple(kx.shape), dtype=dtype, device=kx.device)
    keys, inverse = np.unique(optics, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    for group, (voltage, cs, w) in enumerate(keys):
        rows = np.flatnonzero(inverse == group)
        sub = table.iloc[rows]
        ctf = evaluate_ctf(kx, ky, sub["defocus_u"].to_numpy(np.float64), sub["defocus_v"].to_numpy(np.float64),
                           sub["defocus_angle"].to_numpy(np.float64) if "defocus_angle" in sub else 0.0,
                           voltage, cs, w, phase[rows], bfac[rows])
        out[torch.as_tensor(rows, device=kx.device)] = ctf.reshape((len(rows),) + tuple(kx.shape)).to(dtype)
    return out


def premultiplied_ctf(ctf: torch.Tensor, premultiplied: bool | Sequence[bool] | np.ndarray) -> torch.Tensor:
    """The factor a projection is multiplied by to match stored particles: ``ctf``
    where the particles are plain, ``ctf**2`` where they are CTF-premultiplied.

    Args:
        ctf: ``(B, H, W')`` CTFs (any layout; a leading axis of 1 broadcasts).
        premultiplied: one flag for all, or ``(B,)`` flags (RELION's ``rlnCtfDataAreCtfPremultiplied``).
    Returns:
        Tensor shaped like ``ctf``.
    """
    flags = np.array(premultiplied, dtype=bool).reshape(-1)  # a copy: pandas hands out read-only arrays
    if not flags.any():
        return ctf
    if flags.all():
        return ctf * ctf
    if ctf.shape[0] != flags.size:
        raise ValueError(f"{flags.size} premultiplied flags for {ctf.shape[0]} CTFs")
    squared = torch.as_tensor(flags, device=ctf.device).reshape((-1,) + (1,) * (ctf.dim() - 1))
    return torch.where(squared, ctf * ctf, ctf)


def effective_ctf(table: pd.DataFrame, box: int, pixel_size: float, rfft: bool = True,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The CTF as it acts on the stored particles of ``table``'s rows: :func:`ctf_from_table`,
    squared for the rows whose ``premultiplied`` column is true (module docstring).

    Use this, not :func:`ctf_from_table`, wherever a projection or a reference is
    multiplied by the CTF to be compared with particle images (likelihoods, pose
    search, Wiener sums).

    Args:
        table: rows of :meth:`particle_vae.io.star.ParticleStar.ctf_parameters`
            (without a ``premultiplied`` column every row counts as plain).
        box, pixel_size, rfft, device, dtype: as for :func:`ctf_from_table`.
    Returns:
        ``(len(table), box, box//2 + 1)`` (or ``(N, box, box)``) tensor.
    """
    ctf = ctf_from_table(table, box, pixel_size, rfft=rfft, device=device, dtype=dtype)
    if "premultiplied" not in table:
        return ctf
    return premultiplied_ctf(ctf, table["premultiplied"].to_numpy(dtype=bool))


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply images by a CTF in Fourier space (circular convolution in the box).

    Args:
        images: ``(B, H, W)`` real images (or ``(H, W)``).
        ctf: ``(B, H, W//2 + 1)`` (``rfft2`` layout) or ``(B, H, W)`` (``fft2``
            layout), unshifted, as from :func:`compute_ctf`; a leading axis of 1
            broadcasts over the batch.
    Returns:
        Real tensor shaped like ``images``, same dtype.
    """
    height, width = images.shape[-2:]
    work = images.to(torch.float64)
    ctf = ctf.to(device=images.device, dtype=torch.float64)
    if ctf.shape[-2:] == (height, width):
        out = torch.fft.ifft2(torch.fft.fft2(work) * ctf).real
    elif ctf.shape[-2:] == (height, width // 2 + 1):
        out = torch.fft.irfft2(torch.fft.rfft2(work) * ctf, s=(height, width))
    else:
        raise ValueError(f"CTF of shape {tuple(ctf.shape)} does not fit images of {height}x{width}")
    return out.to(images.dtype)


def read_defocus_table(path: str | Path) -> np.ndarray:
    """Defocus triples from any STAR block that has ``rlnDefocusU`` and ``rlnDefocusV``.

    Every row of the first such block is used (a micrograph CTF table or a
    particle STAR); ``rlnDefocusAngle`` is taken as 0 when absent.

    Args:
        path: STAR file.
    Returns:
        ``(M, 3)`` float64 array of ``(U, V, angle)``: Angstrom, Angstrom, degrees.
    Raises:
        InputFileError: missing/unreadable file, no block with both defocus
            columns, no rows, or non-finite / non-positive defocus values.
    """
    from particle_vae.io.star import read_star

    path = Path(path)
    star = read_star(path)
    for block in star.blocks.values():
        if isinstance(block, pd.DataFrame) and {"rlnDefocusU", "rlnDefocusV"} <= set(block.columns):
            try:
                u = pd.to_numeric(block["rlnDefocusU"]).to_numpy(np.float64)
                v = pd.to_numeric(block["rlnDefocusV"]).to_numpy(np.float64)
                angle = (pd.to_numeric(block["rlnDefocusAngle"]).to_numpy(np.float64)
                         if "rlnDefocusAngle" in block.columns else np.zeros(len(block)))
            except (ValueError, TypeError):
                raise InputFileError("has non-numeric rlnDefocusU/V/Angle values", path, "fix or regenerate the CTF table") from None
            if len(u) == 0:
                raise InputFileError("has a defocus table with no rows", path, "give a STAR with at least one CTF row")
            table = np.stack([u, v, angle], axis=1)
            if not np.isfinite(table).all() or (table[:, :2] <= 0).any():
                raise InputFileError("has non-finite or non-positive defocus values", path,
                                     "defocus must be underfocus in Angstrom (positive), as RELION writes it")
            return table
    raise InputFileError("has no block with rlnDefocusU and rlnDefocusV columns", path,
                         "pass a STAR with CTF parameters (e.g. a RELION micrograph CTF table) as --defocus-star, or leave it out")


def sample_defocus(
    n: int,
    rng: np.random.Generator,
    table: np.ndarray | str | Path | None = None,
    defocus_range: Sequence[float] = (10000.0, 25000.0),
    max_astigmatism: float = 300.0,
) -> np.ndarray:
    """Draw per-particle defocus triples.

    With ``table`` (an array from :func:`read_defocus_table`, or the path of a
    STAR file, read with it) rows are drawn uniformly
    with replacement, as if particles came from randomly chosen micrographs.
    Without it the mean defocus ``(U + V) / 2`` is uniform in
    ``defocus_range``, ``U - V`` uniform in ``[0, max_astigmatism]`` and the
    angle uniform in ``[0, 180)`` degrees.

    Args:
        n: number of particles.
        rng: numpy random generator.
        table: ``(M, 3)`` ``(U, V, angle)`` rows, a STAR path, or ``None``.
        defocus_range: ``(min, max)`` mean defocus in Angstrom.
        max_astigmatism: largest ``U - V`` in Angstrom.
    Returns:
        ``(n, 3)`` float64 array ``(U, V, angle)``: Angstrom, Angstrom, degrees.
    """
    if isinstance(table, (str, Path)):
        table = read_defocus_table(table)
    if table is not None:
        table = np.asarray(table, dtype=np.float64).reshape(-1, 3)
        return table[rng.integers(0, len(table), size=n)].copy()
    low, high = float(defocus_range[0]), float(defocus_range[1])
    if not 0 < low <= high:
        raise ValueError(f"defocus range must satisfy 0 < min <= max, got {defocus_range}")
    mean = rng.uniform(low, high, size=n)
    astig = rng.uniform(0.0, float(max_astigmatism), size=n)
    angle = rng.uniform(0.0, 180.0, size=n)
    return np.stack([mean + astig / 2, mean - astig / 2, angle], axis=1)
