"""cryoSPARC particle files (``.cs``): read as RELION particle STARs, written back from them.

A ``.cs`` file is a numpy structured array saved with ``np.save`` (``np.load``
reads it), one row per particle, fields named ``slot/field``. Only the slots
that describe particles are read: ``blob`` (where the image is), ``ctf`` and the
alignments (``alignments2D``, ``alignments3D``). The mapping, its units and the
sign conventions are in docs/conventions.md ("cryoSPARC .cs files"); in short:

==========================  ==============================================  ====================
cryoSPARC field             RELION column                                   conversion
==========================  ==============================================  ====================
``blob/path``, ``blob/idx``  ``rlnImageName`` ``N@stack``                     ``N = idx + 1``
``blob/psize_A``            ``rlnImagePixelSize`` (optics)                  Angstrom, as is
``blob/shape``              ``rlnImageSize`` (optics)                       pixels
``ctf/accel_kv``            ``rlnVoltage`` (optics)                         kV, as is
``ctf/cs_mm``               ``rlnSphericalAberration`` (optics)             mm, as is
``ctf/amp_contrast``        ``rlnAmplitudeContrast`` (optics)               as is
``ctf/exp_group_id``        ``rlnOpticsGroup`` / ``rlnOpticsGroupName``     1..G, name ``exposureGroupK``
``ctf/df1_A``, ``df2_A``    ``rlnDefocusU``, ``rlnDefocusV``                Angstrom, as is
``ctf/df_angle_rad``        ``rlnDefocusAngle``                             radians -> degrees
``ctf/phase_shift_rad``     ``rlnPhaseShift``                               radians -> degrees
``ctf/bfactor``, ``scale``  ``rlnCtfBfactor``, ``rlnCtfScalefactor``        as is
``alignments2D/pose``       ``rlnAnglePsi``                                 ``psi = degrees(pose)``
``alignments2D/shift``      ``rlnOriginXAngst``, ``rlnOriginYAngst``        ``origin = shift * alignments2D/psize_A``
``alignments3D/pose``       ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi``  ``A = expmap(pose)^T`` (below)
``alignments3D/shift``      ``rlnOriginXAngst``, ``rlnOriginYAngst``        ``origin = shift * alignments3D/psize_A``
``alignments*/class``       ``rlnClassNumber``                              ``class + 1``
``alignments*/split``       ``rlnRandomSubset``                             ``split + 1`` (only when both halves occur)
``uid``, ``blob/sign``      ``pvaeCryosparcUid``, ``pvaeCryosparcSign``     kept for the way back
==========================  ==============================================  ====================

``expmap(pose)`` is the rotation by ``|pose|`` radians about ``pose / |pose|``
(Rodrigues) and ``A`` is RELION's Euler matrix
(:func:`particle_vae.conventions.euler_to_matrix`). With both 2D and 3D
alignments the 3D pose goes to the RELION columns and the 2D one to
``pvaeAnglePsi``, ``pvaeOriginXAngst``, ``pvaeOriginYAngst``.

Paths: ``blob/path`` is relative to the cryoSPARC project folder, or, with a
leading ``>`` (files written by cryoSPARC's Export), to the folder of the
``.cs`` file itself. The converted STAR names each stack relative to the
``.cs`` file's folder when the stack is found, so that
:meth:`~particle_vae.io.star.ParticleStar.image_locations` finds it.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from particle_vae.conventions import euler_to_matrix, matrix_to_euler
from particle_vae.errors import InputFileError
from particle_vae.io.atomic import atomic_path, check_output_path
from particle_vae.io.star import IMAGE_NAME, OPTICS_GROUP, ParticleStar, StarFile

CS_SUFFIX = ".cs"
#: STAR columns that carry what RELION has no column for, so that a particle goes back to cryoSPARC as itself
UID_COLUMN = "pvaeCryosparcUid"
SIGN_COLUMN = "pvaeCryosparcSign"
#: in-plane pose columns used for a 2D alignment when the RELION pose columns hold a 3D one
INPLANE_COLUMNS = ("pvaeAnglePsi", "pvaeOriginXAngst", "pvaeOriginYAngst")
#: ``blob/path`` prefix of exported files: the path is relative to the .cs file's folder, not the project folder
EXPORTED_PREFIX = ">"
_GROUP_NAME = re.compile(r"^exposureGroup(\d+)$")

#: the particle fields cryoSPARC writes per slot (from real exported files), with the value a new row gets
_BLOB_FIELDS = {"blob/path": None, "blob/idx": ("<u4", 0), "blob/shape": ("<u4", 0, (2,)), "blob/psize_A": ("<f4", 0.0),
                "blob/sign": ("<f4", -1.0)}
_CTF_FIELDS = {"ctf/type": ("S9", b"imported"), "ctf/exp_group_id": ("<u4", 0), "ctf/accel_kv": ("<f4", 0.0),
               "ctf/cs_mm": ("<f4", 0.0), "ctf/amp_contrast": ("<f4", 0.0), "ctf/df1_A": ("<f4", 0.0),
               "ctf/df2_A": ("<f4", 0.0), "ctf/df_angle_rad": ("<f4", 0.0), "ctf/phase_shift_rad": ("<f4", 0.0),
               "ctf/scale": ("<f4", 1.0), "ctf/scale_const": ("<f4", 0.0), "ctf/shift_A": ("<f4", 0.0, (2,)),
               "ctf/tilt_A": ("<f4", 0.0, (2,)), "ctf/trefoil_A": ("<f4", 0.0, (2,)), "ctf/tetra_A": ("<f4", 0.0, (4,)),
               "ctf/anisomag": ("<f4", 0.0, (4,)), "ctf/bfactor": ("<f4", 0.0)}
_ALIGNMENT_FIELDS = ("split", "shift", "pose", "psize_A", "error", "error_min", "resid_pow", "slice_pow", "image_pow",
                     "cross_cor", "alpha", "alpha_min", "weight", "pose_ess", "shift_ess", "class_posterior", "class", "class_ess")
_ALIGNMENT_DEFAULTS = {"alpha": 1.0, "class_posterior": 1.0, "class_ess": 1.0}
#: cryoSPARC's higher-order optics, which have no converted RELION counterpart here
_ABERRATION_FIELDS = ("ctf/shift_A", "ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag")


def read_cryosparc(path: str | Path) -> np.ndarray:
    """Read a cryoSPARC particle ``.cs`` file.

    Returns:
        ``(N,)`` numpy structured array with at least ``blob/path`` and ``blob/idx``.
    Raises:
        InputFileError: missing file, not a numpy structured array, or a file
            without the ``blob`` fields that locate the particle images (a
            passthrough or exposure file).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError("file not found" if not path.exists() else "is not a file", path, "check the path")
    try:
        records = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputFileError(f"is not a cryoSPARC .cs file (numpy cannot read it: {error})", path,
                             "give a particle .cs file written by cryoSPARC (e.g. J24_001_particles.cs or an Export's ..._exported.cs)"
                             ) from None
    if not isinstance(records, np.ndarray) or records.dtype.names is None or records.ndim != 1:
        raise InputFileError("is a numpy array but not a cryoSPARC table (no named fields)", path,
                             "give a particle .cs file written by cryoSPARC")
    missing = [name for name in ("blob/path", "blob/idx") if name not in records.dtype.names]
    if missing:
        slots = sorted({name.split("/")[0] for name in records.dtype.names if "/" in name})
        raise InputFileError(f"has no {' and '.join(missing)} field: it does not say where the particle images are "
                             f"(its slots: {', '.join(slots) or 'none'})", path,
                             "give the particles .cs of the job (not its passthrough file), or an exported particle .cs")
    if len(records) == 0:
        raise InputFileError("lists no particles", path, "give a particle .cs with at least one row")
    return records


def _text(values: np.ndarray) -> np.ndarray:
    """Byte strings (cryoSPARC stores ``S`` fields) as ``str`` objects."""
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8").astype(object)
    return values.astype(str).astype(object)


def stack_candidates(blob_path: str, cs_path: Path | None, project_dir: str | Path | None = None) -> list[Path]:
    """Where the stack of a ``blob/path`` value is looked for, in order.

    A path starting with ``>`` (cryoSPARC Export) is relative to the ``.cs``
    file's folder; other relative paths are relative to the cryoSPARC project
    folder: ``project_dir`` when given, else the parent of the ``.cs`` file's
    folder (a job folder ``P12/J24/`` inside project ``P12/``), the ``.cs``
    file's folder itself, and the current folder.
    """
    folder = cs_path.parent if cs_path is not None else Path.cwd()
    project = Path(project_dir) if project_dir is not None else None
    if blob_path.startswith(EXPORTED_PREFIX):
        relative = Path(blob_path[len(EXPORTED_PREFIX):])
        return [folder / relative] + ([project / relative, project / relative.name] if project is not None else [])
    raw = Path(blob_path)
    if raw.is_absolute():
        return [raw] + ([project / raw.name] if project is not None else [])
    if project is not None:
        return [project / raw, project / raw.name]
    return [folder.parent / raw, folder / raw, folder / raw.name, Path.cwd() / raw]


def _star_stack_name(blob_path: str, cs_path: Path | None, project_dir) -> str:
    """The stack name for ``rlnImageName``: relative to the ``.cs`` file's folder (where
    :class:`ParticleStar` looks first) when found, else ``blob/path`` without ``>``."""
    for candidate in stack_candidates(blob_path, cs_path, project_dir):
        if candidate.is_file():
            if cs_path is None:
                return str(candidate)
            return os.path.relpath(candidate, cs_path.parent)
    return blob_path.removeprefix(EXPORTED_PREFIX)


class CryosparcStar(ParticleStar):
    """The particle STAR a ``.cs`` file converts to, with the records and the project folder it came from.

    Attributes:
        records: the ``(N,)`` cryoSPARC records, rows in the STAR's order.
        project_dir: the cryoSPARC project folder given for ``blob/path`` (``None``: looked for).
    """

    def __init__(self, star: StarFile, records: np.ndarray, project_dir: str | Path | None = None):
        super().__init__(star)
        self.records = records
        self.project_dir = None if project_dir is None else Path(project_dir)

    def stack_lookup(self) -> list[tuple[str, list[Path], Path | None]]:
        """For each distinct ``blob/path``: ``(blob/path, where it was looked for, the file found or None)``."""
        out = []
        for blob_path in pd.unique(pd.Series(_text(self.records["blob/path"]))):
            candidates = stack_candidates(str(blob_path), self.path, self.project_dir)
            out.append((str(blob_path), candidates, next((c for c in candidates if c.is_file()), None)))
        return out


def stack_not_found(star: ParticleStar, project_dir: str | Path | None = None) -> InputFileError | None:
    """The one-line error for the first stack of a converted ``.cs`` file that is not found, or ``None``."""
    if not isinstance(star, CryosparcStar):
        return None
    lookup = star.stack_lookup()
    missing = [(blob_path, candidates) for blob_path, candidates, found in lookup if found is None]
    if not missing:
        return None
    blob_path, candidates = missing[0]
    folders = ", ".join(dict.fromkeys(str(c.parent) for c in candidates))
    others = f", nor {len(missing) - 1} other stack(s) of {len(lookup)}" if len(missing) > 1 else ""
    fix = ("pass --stack-dir with the cryoSPARC project folder that blob/path is relative to (the folder holding "
           f"{Path(blob_path.lstrip(EXPORTED_PREFIX)).parts[0]}/)") if project_dir is None else \
        "check --stack-dir: it must be the cryoSPARC project folder that blob/path is relative to"
    return InputFileError(f"stack '{blob_path}' named in blob/path was not found (looked in {folders}){others}", star.path, fix)


def _field(records: np.ndarray, name: str) -> np.ndarray | None:
    return records[name] if name in records.dtype.names else None


def _shortest(values: np.ndarray) -> np.ndarray:
    """float32 values as the float64 of their shortest decimal form (0.1, not 0.10000000149011612),
    which converts back to the same float32; for fields with few distinct values (optics, pixel sizes)."""
    distinct, inverse = np.unique(np.asarray(values, dtype=np.float32), return_inverse=True)
    return np.array([float(str(v)) for v in distinct], dtype=np.float64)[inverse.reshape(-1)]


def cryosparc_to_star(records: np.ndarray, path: str | Path | None = None, project_dir: str | Path | None = None) -> CryosparcStar:
    """Convert cryoSPARC particle records to a RELION 3.1 particle STAR (module docstring table).

    Args:
        records: ``(N,)`` structured array from :func:`read_cryosparc`.
        path: the ``.cs`` file (the STAR's ``path``; stack names are relative to its folder).
        project_dir: the cryoSPARC project folder that ``blob/path`` is relative to
            (default: looked for beside the ``.cs`` file, see :func:`stack_candidates`).
    Returns:
        A :class:`CryosparcStar` (a :class:`ParticleStar`) with an optics block (one
        group per exposure group and optics) and a particles block, rows in file order.
    """
    path = Path(path) if path is not None else None
    n = len(records)
    raw_paths = _text(records["blob/path"])
    codes, uniques = pd.factorize(pd.Series(raw_paths))
    names = np.array([_star_stack_name(str(value), path, project_dir) for value in uniques], dtype=object)
    index = records["blob/idx"].astype(np.int64) + 1
    image_names = [f"{number:06d}@{name}" for number, name in zip(index, names[codes])]

    psize = _field(records, "blob/psize_A")
    shape = _field(records, "blob/shape")
    optics_values = {
        "exposure_group": (_field(records, "ctf/exp_group_id"), None),
        "rlnAmplitudeContrast": (_field(records, "ctf/amp_contrast"), None),
        "rlnSphericalAberration": (_field(records, "ctf/cs_mm"), None),
        "rlnVoltage": (_field(records, "ctf/accel_kv"), None),
        "rlnImagePixelSize": (psize, None),
        "rlnImageSize": (None if shape is None else shape[:, -1], None),
    }
    keys = pd.DataFrame({name: (np.zeros(n) if values is None else values.astype(np.float64))
                         for name, (values, _) in optics_values.items()})
    group_codes, group_rows = pd.factorize(pd.MultiIndex.from_frame(keys))
    groups = pd.DataFrame(list(group_rows), columns=keys.columns)
    order = np.argsort(groups["exposure_group"].to_numpy(), kind="stable")  # numbered by exposure group, then first use
    renumber = np.empty(len(order), dtype=np.int64)
    renumber[order] = np.arange(len(order))
    groups = groups.iloc[order].reset_index(drop=True)
    optics = pd.DataFrame({OPTICS_GROUP: np.arange(1, len(groups) + 1),
                           "rlnOpticsGroupName": [f"exposureGroup{int(g)}" for g in groups["exposure_group"]]})
    for name, (values, _) in optics_values.items():
        if name == "exposure_group" or values is None:
            continue
        column = groups[name].to_numpy()
        optics[name] = column.astype(np.int64) if name == "rlnImageSize" else _shortest(column)
    optics["rlnImageDimensionality"] = 2

    particles = pd.DataFrame({IMAGE_NAME: image_names, OPTICS_GROUP: renumber[group_codes] + 1})
    if _field(records, "ctf/df1_A") is not None:
        particles["rlnDefocusU"] = records["ctf/df1_A"].astype(np.float64)
        particles["rlnDefocusV"] = _field(records, "ctf/df2_A").astype(np.float64) if _field(records, "ctf/df2_A") is not None \
            else records["ctf/df1_A"].astype(np.float64)
        for field, column, scale in (("ctf/df_angle_rad", "rlnDefocusAngle", "degrees"), ("ctf/phase_shift_rad", "rlnPhaseShift", "degrees"),
                                     ("ctf/bfactor", "rlnCtfBfactor", None), ("ctf/scale", "rlnCtfScalefactor", None)):
            values = _field(records, field)
            if values is not None:
                values = values.astype(np.float64)
                particles[column] = np.degrees(values) if scale == "degrees" else values
    has_3d = _field(records, "alignments3D/pose") is not None
    has_2d = _field(records, "alignments2D/pose") is not None
    if has_3d:
        particles = _add_alignment(particles, records, "alignments3D", ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"),
                                   ("rlnOriginXAngst", "rlnOriginYAngst"), psize, path)
    if has_2d:
        angle, *origin = INPLANE_COLUMNS if has_3d else ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
        particles = _add_alignment(particles, records, "alignments2D", (angle,), tuple(origin), psize, path, labels=not has_3d)
    if "uid" in records.dtype.names:
        particles[UID_COLUMN] = records["uid"].astype(np.uint64)
    if _field(records, "blob/sign") is not None:
        particles[SIGN_COLUMN] = records["blob/sign"].astype(np.float64)
    return CryosparcStar(StarFile(blocks={"optics": optics, "particles": particles}, path=path), records, project_dir)


def _add_alignment(particles: pd.DataFrame, records: np.ndarray, slot: str, angle_columns: tuple[str, ...],
                   origin_columns: tuple[str, ...], blob_psize: np.ndarray | None, path: Path | None,
                   labels: bool = True) -> pd.DataFrame:
    """Add one alignment slot's pose (and, with ``labels``, its class and half-set) as RELION columns."""
    pose = records[f"{slot}/pose"].astype(np.float64)
    if len(angle_columns) == 3:
        rotation = _rotation_from_rotvec(pose.reshape(-1, 3))
        angles = matrix_to_euler(np.transpose(rotation, (0, 2, 1)))  # A = expmap(pose)^T
        for column, values in zip(angle_columns, angles.T):
            particles[column] = values
    else:
        particles[angle_columns[0]] = np.degrees(pose.reshape(-1))
    shift = _field(records, f"{slot}/shift")
    if shift is not None:
        psize = _field(records, f"{slot}/psize_A")
        psize = _shortest(psize if psize is not None else blob_psize) if (psize is not None or blob_psize is not None) else None
        if psize is None:
            raise InputFileError(f"has {slot}/shift in pixels but no {slot}/psize_A or blob/psize_A to turn it into Angstrom", path,
                                 "give a particle .cs with pixel sizes")
        shift_angst = shift.astype(np.float64) * psize.astype(np.float64)[:, None]
        particles[origin_columns[0]] = shift_angst[:, 0]
        particles[origin_columns[1]] = shift_angst[:, 1]
    if labels:
        classes = _field(records, f"{slot}/class")
        if classes is not None:
            particles["rlnClassNumber"] = classes.astype(np.int64) + 1
        split = _field(records, f"{slot}/split")
        if split is not None and np.unique(split).size == 2:  # a single half would leave RELION's other half empty
            particles["rlnRandomSubset"] = split.astype(np.int64) + 1
    return particles


def _rotation_from_rotvec(rotvec: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(rotvec).as_matrix()


def _rotvec_from_rotation(matrices: np.ndarray, near: np.ndarray | None = None) -> np.ndarray:
    """Axis-angle vectors of rotation matrices; with ``near``, of all vectors ``u (theta + 2 pi k)``
    that give the same rotation, the one closest to ``near`` (cryoSPARC does not keep ``|pose| <= pi``)."""
    from scipy.spatial.transform import Rotation

    rotvec = Rotation.from_matrix(matrices).as_rotvec()
    if near is None:
        return rotvec
    angle = np.linalg.norm(rotvec, axis=1)
    axis = np.divide(rotvec, angle[:, None], out=np.zeros_like(rotvec), where=angle[:, None] > 0)
    # along the axis, near projects to t; the best angle theta + 2 pi k is the one closest to t
    along = np.einsum("ij,ij->i", near, axis)
    turns = np.round((along - angle) / (2 * np.pi))
    return axis * (angle + 2 * np.pi * turns)[:, None]


def read_cryosparc_star(path: str | Path, project_dir: str | Path | None = None) -> CryosparcStar:
    """:func:`read_cryosparc` then :func:`cryosparc_to_star`."""
    path = Path(path)
    return cryosparc_to_star(read_cryosparc(path), path, project_dir)


def aberrations_present(records: np.ndarray) -> list[str]:
    """cryoSPARC higher-order optics fields with non-zero values (not converted to RELION)."""
    return [name for name in _ABERRATION_FIELDS if name in records.dtype.names and np.any(records[name] != 0)]


# --------------------------------------------------------------------------- writing


def star_to_cryosparc(star: ParticleStar, blob_paths: np.ndarray, box: int | None = None,
                      template: np.ndarray | None = None) -> np.ndarray:
    """Convert a particle STAR to cryoSPARC particle records (the inverse of :func:`cryosparc_to_star`).

    Args:
        star: the particle STAR (3.0 or 3.1+).
        blob_paths: ``(N,)`` the ``blob/path`` of each particle (relative to the
            cryoSPARC project folder, or absolute).
        box: image size in pixels when the STAR has no ``rlnImageSize``.
        template: the ``.cs`` records the STAR came from; rows are matched by
            ``pvaeCryosparcUid`` and every field the STAR does not carry
            (``blob/path`` included) is taken from the matched row.
    Returns:
        ``(N,)`` structured array with ``uid``, the ``blob`` and ``ctf`` slots, and
        ``alignments3D`` (RELION rot/tilt/psi present) and/or ``alignments2D``
        (an in-plane pose: ``pvaeAnglePsi`` or a 2D ``rlnAnglePsi``).
    Raises:
        InputFileError: template rows that cannot be matched, no image size.
    """
    n = len(star)
    particles = star.particles.reset_index(drop=True)
    matched = _match_template(star, template) if template is not None else None
    columns = {}

    def value(name: str) -> np.ndarray | None:
        series = star.column(name)
        return None if series is None else series.to_numpy(dtype=np.float64)

    uid = _uids(star, particles) if matched is None else matched["uid"]
    columns["uid"] = uid
    if matched is None:
        columns["blob/path"] = np.array([str(p).encode("utf-8") for p in blob_paths])
        columns["blob/idx"] = _image_numbers(star) - 1
    size = value("rlnImageSize")
    if size is None and box is None and matched is None:
        raise InputFileError("gives no image size (rlnImageSize) and its stacks were not opened", star.path,
                             "pass --stack-dir so that the stacks can be read, or add rlnImageSize to the optics block")
    if size is not None or box is not None:
        side = size if size is not None else np.full(n, float(box))
        columns["blob/shape"] = np.repeat(side.reshape(-1, 1), 2, axis=1)
    psize = star.pixel_sizes()
    if psize is not None:
        columns["blob/psize_A"] = psize
    if SIGN_COLUMN in particles.columns:
        columns["blob/sign"] = particles[SIGN_COLUMN].to_numpy(np.float64)
    if star.column("rlnDefocusU") is not None:
        ctf = star.ctf_parameters()
        columns["ctf/exp_group_id"] = _exposure_groups(star)
        columns["ctf/accel_kv"] = ctf["voltage"].to_numpy()
        columns["ctf/cs_mm"] = ctf["cs"].to_numpy()
        columns["ctf/amp_contrast"] = ctf["amplitude_contrast"].to_numpy()
        columns["ctf/df1_A"] = ctf["defocus_u"].to_numpy()
        columns["ctf/df2_A"] = ctf["defocus_v"].to_numpy()
        columns["ctf/df_angle_rad"] = np.radians(ctf["defocus_angle"].to_numpy())
        columns["ctf/phase_shift_rad"] = np.radians(ctf["phase_shift"].to_numpy())
        columns["ctf/bfactor"] = ctf["bfactor"].to_numpy()
        columns["ctf/scale"] = ctf["scale"].to_numpy()
    has_3d = value("rlnAngleRot") is not None and value("rlnAngleTilt") is not None
    if has_3d:
        _alignment_columns(columns, "alignments3D", star, ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"),
                           ("rlnOriginXAngst", "rlnOriginYAngst"), psize, matched, labels=True)
    inplane = INPLANE_COLUMNS if INPLANE_COLUMNS[0] in particles.columns else (
        None if has_3d or value("rlnAnglePsi") is None else ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"))
    if inplane is not None:
        _alignment_columns(columns, "alignments2D", star, inplane[:1], inplane[1:], psize, matched, labels=not has_3d)
    return _assemble(columns, n, matched)


def _match_template(star: ParticleStar, template: np.ndarray) -> np.ndarray:
    """The template rows of the STAR's particles, matched by uid."""
    if UID_COLUMN not in star.particles.columns:
        raise InputFileError(f"has no {UID_COLUMN} column, so its particles cannot be matched with the template .cs", star.path,
                             "give the STAR that particle-vae wrote from that .cs (or its infer/select outputs), or leave out --template")
    if "uid" not in template.dtype.names:
        raise InputFileError("the template .cs has no uid field", star.path, "give the particle .cs the STAR came from")
    wanted = star.particles[UID_COLUMN].to_numpy().astype(np.uint64)
    uids = template["uid"].astype(np.uint64)
    order = np.argsort(uids, kind="stable")
    position = np.searchsorted(uids[order], wanted)
    position = np.minimum(position, len(uids) - 1)
    rows = order[position]
    missing = np.flatnonzero(uids[rows] != wanted)
    if missing.size:
        raise InputFileError(f"{missing.size} of {len(wanted)} particles (first: uid {wanted[missing[0]]}) are not in the template .cs",
                             star.path, "give the particle .cs the STAR was converted from")
    return template[rows]


def _uids(star: ParticleStar, particles: pd.DataFrame) -> np.ndarray:
    """The particles' cryoSPARC uids: kept ones, else new ones, the same for the same image names."""
    if UID_COLUMN in particles.columns:
        return particles[UID_COLUMN].to_numpy().astype(np.uint64)
    seed = zlib.crc32("\n".join(particles[IMAGE_NAME].astype(str)).encode("utf-8"))
    return np.random.default_rng(seed).integers(0, np.iinfo(np.uint64).max, size=len(particles), dtype=np.uint64, endpoint=True)


def _image_numbers(star: ParticleStar) -> np.ndarray:
    numbers = star.particles[IMAGE_NAME].astype(str).str.split("@", n=1).str[0].str.strip()
    if not numbers.str.isdigit().all():
        first = star.particles[IMAGE_NAME].astype(str)[~numbers.str.isdigit()].iloc[0]
        raise InputFileError(f"rlnImageName '{first}' is not of the form N@stack.mrcs", star.path)
    return numbers.astype(np.int64).to_numpy()


def _exposure_groups(star: ParticleStar) -> np.ndarray:
    """``ctf/exp_group_id`` per particle: from optics group names ``exposureGroupK`` (written by
    :func:`cryosparc_to_star`), else the optics group number minus one."""
    names = star.column("rlnOpticsGroupName")
    if names is not None:
        parsed = names.astype(str).str.extract(_GROUP_NAME)[0]
        if parsed.notna().all():
            return parsed.astype(np.int64).to_numpy()
    groups = star.column(OPTICS_GROUP)
    return np.zeros(len(star), dtype=np.int64) if groups is None else groups.to_numpy(dtype=np.int64) - 1


def _alignment_columns(columns: dict, slot: str, star: ParticleStar, angle_columns: tuple[str, ...],
                       origin_columns: tuple[str, ...], psize: np.ndarray | None, matched: np.ndarray | None, labels: bool) -> None:
    particles = star.particles.reset_index(drop=True)
    angles = np.stack([particles[c].to_numpy(np.float64) for c in angle_columns], axis=1)
    if len(angle_columns) == 3:
        rotation = np.transpose(euler_to_matrix(*angles.T), (0, 2, 1))  # expmap(pose) = A^T
        near = matched[f"{slot}/pose"].astype(np.float64) if matched is not None and f"{slot}/pose" in matched.dtype.names else None
        columns[f"{slot}/pose"] = _rotvec_from_rotation(rotation, near)
    else:
        columns[f"{slot}/pose"] = np.mod(np.radians(angles[:, 0]), 2 * np.pi)
    if all(c in particles.columns for c in origin_columns):
        if psize is None:
            raise InputFileError("has origins in Angstrom but no pixel size", star.path, "add rlnImagePixelSize to the optics block")
        origin = np.stack([particles[c].to_numpy(np.float64) for c in origin_columns], axis=1)
        columns[f"{slot}/shift"] = origin / psize[:, None]
        columns[f"{slot}/psize_A"] = psize
    elif psize is not None:
        columns[f"{slot}/psize_A"] = psize
    if labels:
        if "rlnClassNumber" in particles.columns:
            columns[f"{slot}/class"] = particles["rlnClassNumber"].to_numpy(np.int64) - 1
        if "rlnRandomSubset" in particles.columns:
            columns[f"{slot}/split"] = particles["rlnRandomSubset"].to_numpy(np.int64) - 1


def _new_field(name: str, columns: dict) -> tuple:
    """``(name, dtype[, shape])`` of a field cryoSPARC writes, for records built without a template."""
    if name == "uid":
        return ("uid", "<u8")
    if name == "blob/path":
        width = max(1, max((len(p) for p in columns["blob/path"]), default=1))
        return (name, f"S{width}")
    spec = _BLOB_FIELDS.get(name) or _CTF_FIELDS.get(name)
    if spec is None:
        field = name.split("/", 1)[1]
        if field == "pose":
            return (name, "<f4", (3,)) if name.startswith("alignments3D") else (name, "<f4")
        if field == "shift":
            return (name, "<f4", (2,))
        return (name, "<u4" if field in ("split", "class") else "<f4")
    return (name, spec[0]) + ((spec[2],) if len(spec) > 2 else ())


def _default(name: str):
    spec = _BLOB_FIELDS.get(name) or _CTF_FIELDS.get(name)
    if spec is not None:
        return spec[1]
    return _ALIGNMENT_DEFAULTS.get(name.split("/", 1)[-1], 0)


def _slot_fields(slot: str) -> list[str]:
    """The particle fields cryoSPARC writes for ``slot`` (as in its own exported files)."""
    if slot == "blob":
        return list(_BLOB_FIELDS)
    if slot == "ctf":
        return list(_CTF_FIELDS)
    return [f"{slot}/{field}" for field in _ALIGNMENT_FIELDS if not (slot == "alignments3D" and field == "alpha_min")]


def _assemble(columns: dict, n: int, matched: np.ndarray | None) -> np.ndarray:
    """Records holding ``columns``: the template rows' fields (or none), plus every field cryoSPARC
    writes for each slot used; fields neither given nor in the template get their neutral default."""
    fields, known = [], set()
    if matched is not None:
        for name in matched.dtype.names:
            dtype = matched.dtype[name]
            fields.append((name, dtype.base.str, dtype.shape) if dtype.shape else (name, dtype.str))
            known.add(name)
    slots = list(dict.fromkeys(name.split("/")[0] for name in columns if "/" in name))
    template_slots = set() if matched is None else {name.split("/")[0] for name in matched.dtype.names}
    # a slot the template lacks gets cryoSPARC's whole field set; one it has gets only fields that carry a value
    wanted = ["uid"] + [field for slot in slots if slot not in template_slots for field in _slot_fields(slot)]
    wanted += [name for name in columns if name.split("/")[0] not in template_slots
               or np.any(np.asarray(columns[name], dtype=object) != _default(name))]
    for name in wanted:
        if name not in known and (name != "blob/path" or name in columns):
            fields.append(_new_field(name, columns))
            known.add(name)
    out = np.zeros(n, dtype=np.dtype(fields))
    for name in out.dtype.names:
        if matched is not None and name in matched.dtype.names:
            out[name] = matched[name]
        elif name not in columns:
            out[name] = _default(name)
    for name, values in columns.items():
        if name in known:
            out[name] = np.asarray(values).astype(out.dtype[name].base, copy=False).reshape(out[name].shape)
    return out


def write_cryosparc(path: str | Path, records: np.ndarray, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Write records as a ``.cs`` file (``np.save`` format) atomically, never over an input.

    Raises:
        OutputFileError: the path is an input, exists without ``overwrite``, or
            does not end in ``.cs``.
    """
    from particle_vae.errors import OutputFileError

    path = Path(path)
    if path.suffix.lower() != CS_SUFFIX:
        raise OutputFileError("is not a .cs file name", path, "name the cryoSPARC output FILE.cs")
    path = check_output_path(path, overwrite=overwrite, inputs=inputs)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a file object: np.save given a name would append .npy
        np.save(handle, records, allow_pickle=False)
    return path
