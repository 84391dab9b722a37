"""Densities for the simulator: PDB atomic models and MRC maps on a common grid.

* :func:`read_pdb` reads ``ATOM``/``HETATM`` records (first model, first
  alternate location) and the ``REMARK 350`` ``BIOMT`` operators that build the
  biological assembly; :func:`expand_assembly` applies them (PDB 1OEL: 7 chains
  -> the GroEL 14-mer).
* :func:`atoms_to_density` turns atoms into a density on a ``(box, box, box)``
  grid indexed ``[z, y, x]``: every atom's atomic number is spread onto its 8
  neighbouring voxels (trilinear splatting, vectorised), then the grid is
  blurred in Fourier space by a Gaussian whose transform falls to ``1/e`` at
  the target resolution (``sigma = resolution / (pi * sqrt(2))``, the
  convention of UCSF Chimera's ``molmap``). The weighted centre of mass of the
  atoms is put exactly on the centre voxel ``box // 2`` (both operations keep the
  centre of mass).
* :func:`resample_map` brings an MRC map to a pixel size and box by Fourier
  cropping/padding and a centred real-space crop/pad that keeps the centre
  voxel at ``n // 2``.
* :func:`load_density` does either, depending on the file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from particle_vae.errors import InputFileError
from particle_vae.fourier import centred_crop_pad, fourier_resize, gaussian_filter_fourier

__all__ = [
    "AtomModel",
    "AssemblyGroup",
    "ATOMIC_NUMBERS",
    "atomic_numbers",
    "read_pdb",
    "expand_assembly",
    "atoms_to_density",
    "resolution_sigma",
    "resample_map",
    "centre_of_mass",
    "load_density",
    "PDB_SUFFIXES",
    "MAP_SUFFIXES",
]

log = logging.getLogger(__name__)

PDB_SUFFIXES = (".pdb", ".ent", ".pdb1")
MAP_SUFFIXES = (".mrc", ".map", ".mrcs", ".ccp4")

#: Atomic numbers of the elements found in biological models (others: carbon, with a warning).
ATOMIC_NUMBERS = {
    "H": 1, "D": 1, "HE": 2, "LI": 3, "BE": 4, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "NE": 10,
    "NA": 11, "MG": 12, "AL": 13, "SI": 14, "P": 15, "S": 16, "CL": 17, "AR": 18, "K": 19, "CA": 20,
    "SC": 21, "TI": 22, "V": 23, "CR": 24, "MN": 25, "FE": 26, "CO": 27, "NI": 28, "CU": 29, "ZN": 30,
    "GA": 31, "GE": 32, "AS": 33, "SE": 34, "BR": 35, "KR": 36, "RB": 37, "SR": 38, "Y": 39, "ZR": 40,
    "MO": 42, "RU": 44, "RH": 45, "PD": 46, "AG": 47, "CD": 48, "IN": 49, "SN": 50, "SB": 51, "TE": 52,
    "I": 53, "XE": 54, "CS": 55, "BA": 56, "LA": 57, "GD": 64, "YB": 70, "W": 74, "RE": 75, "OS": 76,
    "IR": 77, "PT": 78, "AU": 79, "HG": 80, "TL": 81, "PB": 82, "BI": 83, "U": 92,
}

_WATER = {"HOH", "WAT", "H2O", "DOD", "SOL", "TIP", "TIP3"}


@dataclass
class AssemblyGroup:
    """One ``APPLY THE FOLLOWING TO CHAINS`` group of a ``REMARK 350`` biomolecule.

    Attributes:
        chains: chain identifiers the operators apply to.
        operators: ``(K, 3, 4)`` float64 ``[R | t]`` (t in Angstrom), applied as
            ``x' = R x + t``.
        operator_ids: ``(K,)`` the BIOMT serial numbers.
    """

    chains: list[str]
    operators: np.ndarray
    operator_ids: list[int]


@dataclass
class AtomModel:
    """Atoms of a PDB model.

    Attributes:
        coords: ``(N, 3)`` float64 ``(x, y, z)`` in Angstrom.
        elements: ``(N,)`` upper-case element symbols.
        chains: ``(N,)`` chain labels (``"A"``; assembly copies get ``"A_2"`` etc.).
        residue_names: ``(N,)`` residue names.
        hetero: ``(N,)`` bool, ``True`` for ``HETATM`` records.
        assemblies: biomolecule number -> groups of BIOMT operators.
        path: the file it came from.
    """

    coords: np.ndarray
    elements: np.ndarray
    chains: np.ndarray
    residue_names: np.ndarray
    hetero: np.ndarray
    assemblies: dict[int, list[AssemblyGroup]] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def chain_ids(self) -> list[str]:
        """Distinct chain labels in order of first appearance."""
        _, first = np.unique(self.chains, return_index=True)
        return [str(self.chains[i]) for i in sorted(first)]

    @property
    def weights(self) -> np.ndarray:
        """``(N,)`` float64 atomic numbers, the scattering weight of each atom."""
        return atomic_numbers(self.elements)


def atomic_numbers(elements: Sequence[str] | np.ndarray) -> np.ndarray:
    """Atomic numbers for element symbols (unknown symbols count as carbon, 6).

    Args:
        elements: ``(N,)`` symbols, any case.
    Returns:
        ``(N,)`` float64 array.
    """
    elements = np.asarray(elements).astype(str)
    symbols, inverse = np.unique(np.char.upper(np.char.strip(elements)), return_inverse=True)
    values = np.empty(len(symbols), dtype=np.float64)
    unknown = []
    for i, symbol in enumerate(symbols):
        if symbol in ATOMIC_NUMBERS:
            values[i] = ATOMIC_NUMBERS[symbol]
        else:
            values[i] = 6.0
            unknown.append(symbol)
    if unknown:
        log.warning("unknown element symbol(s) %s weighted as carbon", ", ".join(repr(s) for s in unknown[:8]))
    return values[np.asarray(inverse).reshape(-1)]


def _element_from_name(name_field: str, record: str) -> str:
    """Element from the 4-character PDB atom-name field (columns 13-16)."""
    if len(name_field) < 4:
        name_field = name_field.ljust(4)
    head = name_field[:2]
    if head[0] in " 0123456789":
        letter = head[1].strip() or name_field.strip()[:1]
        return letter.upper()
    # Two-letter elements are left-justified in column 13; in ATOM records the
    # first letter alone is the element (CA is an alpha carbon, not calcium).
    if record == "HETATM" and head.upper() in ATOMIC_NUMBERS and head.isalpha():
        return head.upper()
    return head[0].upper()


def read_pdb(path: str | Path, include_hetatm: bool = True, include_water: bool = False,
             include_hydrogen: bool = True) -> AtomModel:
    """Read atoms and assembly operators from a PDB-format file.

    Only the first ``MODEL`` is read; of alternate locations the first label
    seen (usually ``A``) is kept. Elements come from columns 77-78, or from the
    atom name when those are blank.

    Args:
        path: ``.pdb`` file.
        include_hetatm: keep ``HETATM`` records (ligands, ions).
        include_water: keep water molecules (``HOH``...), off by default since
            solvent is not part of a particle's density.
        include_hydrogen: keep hydrogen atoms when the model has them.
    Returns:
        :class:`AtomModel` with coordinates in Angstrom.
    Raises:
        InputFileError: missing file, an mmCIF file, unreadable coordinates or no atoms.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError("file not found", path, "check the path (or --data-dir)")
    if path.is_dir():
        raise InputFileError("is a folder, not a PDB file", path)
    if path.suffix.lower() in (".cif", ".mmcif"):
        raise InputFileError("mmCIF files are not supported", path, "convert it to PDB format (e.g. with gemmi convert) or give a map")
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise InputFileError(f"cannot be read ({exc.strerror})", path) from None

    coords, elements, chains, residues, hetero = [], [], [], [], []
    altloc_kept: str | None = None
    seen_model = False
    biomt_lines: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        record = line[:6].rstrip()
        if record == "MODEL":
            if seen_model:
                break
            seen_model = True
            continue
        if record == "ENDMDL":
            break
        if record.startswith("REMARK") and line[7:10] == "350":
            biomt_lines.append(line)
            continue
        if record not in ("ATOM", "HETATM"):
            continue
        resname = line[17:20].strip()
        if record == "HETATM":
            if not include_hetatm or (not include_water and resname in _WATER):
                continue
        altloc = line[16:17] if len(line) > 16 else " "
        if altloc not in (" ", ""):
            if altloc_kept is None:
                altloc_kept = altloc
            if altloc != altloc_kept:
                continue
        try:
            xyz = (float(line[30:38]), float(line[38:46]), float(line[46:54]))
        except ValueError:
            raise InputFileError(f"line {number}: cannot read the x/y/z coordinates of an {record} record", path,
                                 "the file is not a valid fixed-column PDB file") from None
        element = line[76:78].strip().upper() if len(line) >= 77 else ""
        if not element or not element.isalpha():
            element = _element_from_name(line[12:16], record)
        if not include_hydrogen and element in ("H", "D"):
            continue
        coords.append(xyz)
        elements.append(element)
        chains.append(line[21:22].strip() or "_")
        residues.append(resname)
        hetero.append(record == "HETATM")
    if not coords:
        raise InputFileError("contains no ATOM/HETATM records", path, "give a PDB file with atomic coordinates, or an MRC map")
    return AtomModel(
        coords=np.asarray(coords, dtype=np.float64),
        elements=np.asarray(elements),
        chains=np.asarray(chains),
        residue_names=np.asarray(residues),
        hetero=np.asarray(hetero, dtype=bool),
        assemblies=_parse_biomt(biomt_lines, path),
        path=path,
    )


def _parse_biomt(lines: list[str], path: Path) -> dict[int, list[AssemblyGroup]]:
    """Parse ``REMARK 350`` lines into biomolecule -> operator groups."""
    assemblies: dict[int, list[AssemblyGroup]] = {}
    current: int | None = None
    chains: list[str] | None = None
    collecting_chains = False
    rows: dict[int, dict[int, list[float]]] = {}

    def flush() -> None:
        nonlocal rows
        if current is not None and chains is not None and rows:
            ids = sorted(rows)
            ops = []
            for op in ids:
                if sorted(rows[op]) != [1, 2, 3]:
                    raise InputFileError(f"REMARK 350 operator {op} of biomolecule {current} lacks BIOMT1/2/3 rows", path,
                                         "fix the file or turn assembly expansion off")
                ops.append([rows[op][1], rows[op][2], rows[op][3]])
            assemblies.setdefault(current, []).append(
                AssemblyGroup(chains=list(chains), operators=np.asarray(ops, dtype=np.float64), operator_ids=ids))
        rows = {}

    for line in lines:
        body = line[10:].strip()
        upper = body.upper()
        if upper.startswith("BIOMOLECULE:"):
            flush()
            chains = None
            try:
                current = int(body.split(":", 1)[1].split()[0])
            except (ValueError, IndexError):
                current = None
            collecting_chains = False
        elif "APPLY THE FOLLOWING TO CHAINS:" in upper:
            flush()
            chains = _split_chains(body.split(":", 1)[1])
            collecting_chains = True
        elif collecting_chains and upper.startswith("AND CHAINS:"):
            chains = (chains or []) + _split_chains(body.split(":", 1)[1])
        elif upper.startswith("BIOMT"):
            collecting_chains = False
            parts = body.split()
            try:
                axis = int(parts[0][5:])
                op = int(parts[1])
                values = [float(p) for p in parts[2:6]]
            except (ValueError, IndexError):
                raise InputFileError(f"malformed REMARK 350 line '{body}'", path, "fix the file or turn assembly expansion off") from None
            rows.setdefault(op, {})[axis] = values
        else:
            collecting_chains = collecting_chains and not upper
    flush()
    return assemblies


def _split_chains(text: str) -> list[str]:
    return [c.strip() for c in text.replace(" AND", ",").split(",") if c.strip()]


def expand_assembly(model: AtomModel, biomolecule: int = 1) -> AtomModel:
    """Build a biological assembly by applying its ``BIOMT`` operators.

    Chains listed in a group are copied once per operator; a copy made by an
    identity operator keeps its chain label, others are labelled
    ``"<chain>_<operator id>"``. Atoms of chains the biomolecule does not list
    are dropped (as in the PDB's assembly files).

    Args:
        model: from :func:`read_pdb`.
        biomolecule: the ``BIOMOLECULE:`` number.
    Returns:
        A new :class:`AtomModel` (the input itself when the file has no
        ``REMARK 350`` operators).
    Raises:
        InputFileError: the requested biomolecule does not exist or selects no atoms.
    """
    if not model.assemblies:
        return model
    if biomolecule not in model.assemblies:
        raise InputFileError(f"has no REMARK 350 biomolecule {biomolecule} (has {sorted(model.assemblies)})", model.path,
                             "choose an existing biomolecule or turn assembly expansion off")
    parts = {name: [] for name in ("coords", "elements", "chains", "residue_names", "hetero")}
    identity = np.hstack([np.eye(3), np.zeros((3, 1))])
    for group in model.assemblies[biomolecule]:
        mask = np.isin(model.chains, group.chains)
        if not mask.any():
            continue
        for op_id, op in zip(group.operator_ids, group.operators):
            parts["coords"].append(model.coords[mask] @ op[:, :3].T + op[:, 3])
            labels = model.chains[mask]
            if not np.allclose(op, identity, atol=1e-6):
                labels = np.char.add(np.char.add(labels.astype(str), "_"), str(op_id))
            parts["chains"].append(labels.astype(str))
            parts["elements"].append(model.elements[mask])
            parts["residue_names"].append(model.residue_names[mask])
            parts["hetero"].append(model.hetero[mask])
    if not parts["coords"]:
        raise InputFileError(f"REMARK 350 biomolecule {biomolecule} names no chain present in the file", model.path,
                             "turn assembly expansion off")
    return AtomModel(
        coords=np.concatenate(parts["coords"]),
        elements=np.concatenate(parts["elements"]),
        chains=np.concatenate(parts["chains"]),
        residue_names=np.concatenate(parts["residue_names"]),
        hetero=np.concatenate(parts["hetero"]),
        assemblies={},
        path=model.path,
    )


def resolution_sigma(resolution: float) -> float:
    """Gaussian standard deviation (Angstrom) whose Fourier transform
    ``exp(-2 pi^2 sigma^2 k^2)`` equals ``1/e`` at ``k = 1 / resolution``:
    ``sigma = resolution / (pi sqrt(2))`` (about ``0.225 * resolution``)."""
    return float(resolution) / (math.pi * math.sqrt(2.0))


def atoms_to_density(
    coords: np.ndarray,
    weights: np.ndarray,
    box: int,
    pixel_size: float,
    resolution: float | None = None,
    centre: bool = True,
    path: str | Path | None = None,
) -> np.ndarray:
    """Render atoms as a density on a cubic grid.

    Each weight is split over the 8 voxels around its atom (trilinear
    splatting, one vectorised ``bincount``), and the grid is then blurred by a
    Gaussian of standard deviation ``sigma = resolution / (pi sqrt(2))``
    (Fourier space, :func:`resolution_sigma`). Splatting itself blurs by a
    triangle kernel of variance ``1/6`` voxel^2 per axis, so the Gaussian's
    variance is reduced by that amount (when possible) to keep the total
    blur at ``sigma``.

    Args:
        coords: ``(N, 3)`` ``(x, y, z)`` Angstrom.
        weights: ``(N,)`` scattering weights (atomic numbers).
        box: grid edge in voxels.
        pixel_size: Angstrom per voxel.
        resolution: Angstrom; ``None`` means ``2 * pixel_size`` (Nyquist).
        centre: put the weighted centre of mass on voxel ``box // 2``;
            otherwise the coordinate origin is voxel ``box // 2``.
        path: the source file, named in errors.
    Returns:
        ``(box, box, box)`` float32 array indexed ``[z, y, x]``; its sum equals
        ``weights.sum()`` (mass is conserved while the structure fits).
    Raises:
        InputFileError: atoms fall outside the grid (box too small).
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if coords.shape[0] != weights.shape[0] or coords.shape[0] == 0:
        raise ValueError(f"need the same non-zero number of coordinates and weights, got {coords.shape[0]} and {weights.shape[0]}")
    box = int(box)
    c = box // 2
    resolution = 2.0 * pixel_size if resolution is None else float(resolution)
    origin = (weights[:, None] * coords).sum(0) / weights.sum() if centre else np.zeros(3)
    voxel = (coords - origin) / float(pixel_size) + c  # (x, y, z) voxel indices
    sigma_px = resolution_sigma(resolution) / float(pixel_size)
    low, high = voxel.min(axis=0), voxel.max(axis=0)
    if (low < 0).any() or (high > box - 1).any():
        extent = (voxel.max(axis=0) - voxel.min(axis=0)).max() * pixel_size
        raise InputFileError(
            f"the structure ({extent:.0f} A across) does not fit in a box of {box} px at {pixel_size:g} A/px ({box * pixel_size:.0f} A)",
            path, "increase --box or --pixel-size")
    radius = np.sqrt(((voxel - c) ** 2).sum(axis=1)).max()
    if radius + 2 * sigma_px > box / 2:
        log.warning("%s: atoms reach %.0f A from the centre, beyond the sphere inscribed in the %.0f A box; "
                    "projections will clip them in some views", path or "structure", radius * pixel_size, box * pixel_size)
    base = np.floor(voxel).astype(np.int64)
    frac = voxel - base
    grid = np.zeros(box ** 3, dtype=np.float64)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx = base + np.array([dx, dy, dz])
                w = weights.copy()
                w *= frac[:, 0] if dx else 1.0 - frac[:, 0]
                w *= frac[:, 1] if dy else 1.0 - frac[:, 1]
                w *= frac[:, 2] if dz else 1.0 - frac[:, 2]
                ok = ((idx >= 0) & (idx < box)).all(axis=1)
                flat = (idx[ok, 2] * box + idx[ok, 1]) * box + idx[ok, 0]
                grid += np.bincount(flat, weights=w[ok], minlength=box ** 3)
    volume = grid.reshape(box, box, box)
    volume = gaussian_filter_fourier(volume, math.sqrt(max(sigma_px ** 2 - 1.0 / 6.0, 0.0)))
    return volume.astype(np.float32)


def centre_of_mass(volume: np.ndarray, positive_only: bool = True) -> np.ndarray:
    """Centre of mass of a ``[z, y, x]`` volume in voxel indices.

    Args:
        volume: ``(D, H, W)`` array.
        positive_only: ignore negative values (noise in experimental maps).
    Returns:
        ``(3,)`` float64 ``(x, y, z)`` voxel indices.
    """
    vol = np.asarray(volume, dtype=np.float64)
    if positive_only:
        vol = np.clip(vol, 0.0, None)
    total = vol.sum()
    if total <= 0:
        raise ValueError("the volume has no positive mass")
    z = (vol.sum(axis=(1, 2)) * np.arange(vol.shape[0])).sum() / total
    y = (vol.sum(axis=(0, 2)) * np.arange(vol.shape[1])).sum() / total
    x = (vol.sum(axis=(0, 1)) * np.arange(vol.shape[2])).sum() / total
    return np.array([x, y, z])


def _best_padded_size(n: int, ratio: float) -> int:
    """Smallest ``m >= n`` for which ``m * ratio`` is (nearly) an integer."""
    best, best_err = n, float("inf")
    for m in range(n, 2 * n + 2):
        target = m * ratio
        err = abs(target - round(target)) / max(target, 1.0)
        if err < best_err - 1e-12:
            best, best_err = m, err
        if err < 1e-5:
            return m
    return best


def resample_map(volume: np.ndarray, voxel_size: float, pixel_size: float, box: int) -> np.ndarray:
    """Resample a cubic map to ``pixel_size`` and ``box`` keeping its centre voxel.

    The map is zero-padded (centred) to the smallest edge ``n'`` for which
    ``n' * voxel_size / pixel_size`` is an integer ``m`` (within 1e-5; the
    closest value otherwise), Fourier cropped/padded from ``n'`` to ``m``
    voxels (so the voxel size becomes ``pixel_size``), and finally cropped or
    zero-padded to ``box``. Voxel ``n // 2`` of the input stays at ``box // 2``.

    Args:
        volume: ``(n, n, n)`` map indexed ``[z, y, x]``.
        voxel_size: its Angstrom per voxel. pixel_size: target Angstrom per voxel.
        box: target edge in voxels.
    Returns:
        ``(box, box, box)`` float32 array.
    """
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"resample_map needs a cubic volume, got shape {volume.shape}")
    n = volume.shape[0]
    ratio = float(voxel_size) / float(pixel_size)
    padded = _best_padded_size(n, ratio)
    size = max(int(round(padded * ratio)), 1)
    achieved = padded * voxel_size / size
    if abs(achieved - pixel_size) / pixel_size > 1e-3:
        log.warning("map resampled to %.5f A/voxel instead of %.5f A", achieved, pixel_size)
    work = centred_crop_pad(volume, padded) if padded != n else volume
    work = fourier_resize(work, size)
    return centred_crop_pad(work, int(box)).astype(np.float32)


def _shift_volume(volume: np.ndarray, shift_xyz: np.ndarray) -> np.ndarray:
    """Move content by ``shift_xyz`` voxels with a Fourier phase ramp: ``out(r) = vol(r - shift)``."""
    shape = volume.shape
    kz = np.fft.fftfreq(shape[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2])[None, None, :]
    phase = np.exp(-2j * math.pi * (kx * shift_xyz[0] + ky * shift_xyz[1] + kz * shift_xyz[2]))
    return np.fft.irfftn(np.fft.rfftn(volume) * phase, s=shape, axes=(0, 1, 2))


def load_density(
    path: str | Path,
    pixel_size: float,
    box: int,
    resolution: float | None = None,
    assembly: bool = True,
    centre: bool | None = None,
    biomolecule: int = 1,
) -> np.ndarray:
    """A density on a ``(box, box, box)`` grid at ``pixel_size`` from a PDB model or an MRC map.

    * PDB (``.pdb``, ``.ent``): atoms (waters dropped), expanded to the
      biological assembly when ``assembly`` and the file has ``REMARK 350``
      operators, rendered with :func:`atoms_to_density` (weights = atomic
      numbers; ``resolution`` default ``2 * pixel_size``).
    * MRC (``.mrc``, ``.map``, ``.mrcs``, ``.ccp4``): read with
      :func:`particle_vae.io.mrc.read_map`, resampled with
      :func:`resample_map`; with ``resolution`` also Gaussian-filtered to it.

    Args:
        path: the structure file.
        pixel_size: Angstrom per voxel of the output; box: edge in voxels.
        resolution: Angstrom (see above).
        assembly: expand PDB ``BIOMT`` assemblies.
        centre: move the centre of mass (positive density) to voxel
            ``box // 2``; default ``True`` for models, ``False`` for maps (a
            map's own centre voxel ``n // 2`` is kept).
        biomolecule: which ``REMARK 350`` biomolecule to build.
    Returns:
        ``(box, box, box)`` float32 array indexed ``[z, y, x]``.
    Raises:
        InputFileError: missing or unreadable file, unknown format, no atoms,
            structure larger than the box, a map without a voxel size.
    """
    from particle_vae.io.mrc import read_map

    path = Path(path)
    if not pixel_size > 0 or int(box) < 2:
        raise InputFileError(f"impossible grid: box {box} px at {pixel_size} A/px", path,
                             "give a positive pixel size and a box of at least 2 px")
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputFileError("file not found", path, "check the path, --structure or --data-dir")
    if suffix in PDB_SUFFIXES or suffix in (".cif", ".mmcif"):
        model = read_pdb(path)
        if assembly:
            model = expand_assembly(model, biomolecule)
        return atoms_to_density(model.coords, model.weights, box, pixel_size, resolution,
                                centre=True if centre is None else centre, path=path)
    if suffix in MAP_SUFFIXES:
        volume, voxel_size = read_map(path)
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise InputFileError(f"map is {volume.shape[2]}x{volume.shape[1]}x{volume.shape[0]} voxels, not a cube", path,
                                 "pad the map to a cube (e.g. relion_image_handler --new_box)")
        if voxel_size is None:
            raise InputFileError("the map header gives no voxel size", path, "set it (e.g. relion_image_handler --force_header_angpix)")
        if not np.isfinite(volume).all():
            raise InputFileError("the map contains NaN or infinite values", path, "repair the map")
        work = volume.astype(np.float64)
        if centre:
            com = centre_of_mass(work)
            work = _shift_volume(work, np.full(3, work.shape[0] // 2) - com)
        if resolution is not None:
            sigma_px = resolution_sigma(resolution) / voxel_size
            work = gaussian_filter_fourier(work, sigma_px)
        return resample_map(work, voxel_size, pixel_size, box)
    raise InputFileError(f"unknown structure format '{path.suffix}'", path,
                         "give a PDB model (.pdb/.ent) or an MRC map (.mrc/.map)")
