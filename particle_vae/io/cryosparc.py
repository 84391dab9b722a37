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
``ctf/tilt_A``              ``rlnBeamTiltX``, ``rlnBeamTiltY`` (optics)     ``mrad = A / (Cs[mm] 1e4)`` (:func:`beam_tilt_mrad`)
``uid``, ``blob/sign``      ``pvaeCryosparcUid``, ``pvaeCryosparcSign``     kept for the way back
every field but ``uid``     ``pvaeCs_<type>_<field>``                       value for value (:func:`kept_field_columns`)
==========================  ==============================================  ====================

The ``pvaeCs_`` columns keep each field of the ``.cs`` file in its exact type
(``pvaeCs_f4x2_ctf/trefoil_A``: float32, two values), so that
:func:`star_to_cryosparc` gives back, without a template, the fields RELION has
no column for (scores, ``ctf/type``, ``location/*``, trefoil, tetrafoil,
anisotropic magnification, ``ctf/shift_A``) and the exact values of the
converted fields whose RELION columns were not changed. ``export --to
cryosparc`` writes beside each ``.cs`` its result-group file (:func:`write_csg`).

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

import logging
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from particle_vae.conventions import euler_to_matrix, matrix_to_euler
from particle_vae.errors import InputFileError
from particle_vae.io.atomic import atomic_path, atomic_write_text, check_output_path
from particle_vae.io.star import IMAGE_NAME, OPTICS_GROUP, ParticleStar, StarFile

log = logging.getLogger(__name__)

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
#: cryoSPARC's higher-order optics that have no converted RELION counterpart here (``ctf/tilt_A`` is converted:
#: :func:`beam_tilt_mrad`); their values travel in the kept-field columns
_ABERRATION_FIELDS = ("ctf/shift_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag")
#: RELION's beam tilt columns (optics block, mrad)
BEAM_TILT_COLUMNS = ("rlnBeamTiltX", "rlnBeamTiltY")
#: prefix of the STAR columns that keep every field of a ``.cs`` file value for value (:func:`kept_field_columns`)
KEPT_PREFIX = "pvaeCs_"
#: a converted field counts as unchanged when the STAR gives it to within this fraction of ``max(1, |value|)``
#: (RELION's programs rewrite STAR values with six decimals: 5e-7, at most 5e-6 px in a shift after the
#: division by the pixel size; deliberate changes, refined poses or defocus, are far larger)
KEPT_TOLERANCE = 1e-5
_KEPT_RE = re.compile(r"^pvaeCs_([biufSU]\d+)((?:x\d+)*)_(\S+)$")
#: bytes a kept text value shows as they are; every other byte is written %XX (:func:`_encode_text`)
_TEXT_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~/>:+,@=")
#: STAR words a value must not start with, and text that STAR readers take for a number or a missing value
_STAR_RESERVED = ("data_", "loop_", "save_", "stop_", "global_")
_NOT_TEXT = {"", "nan", "-nan", "+nan", "na", "n/a", "null", "none", "inf", "-inf", "+inf", "infinity", "-infinity", "<na>", "true", "false"}


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


def cryosparc_to_star(records: np.ndarray, path: str | Path | None = None, project_dir: str | Path | None = None,
                      keep_fields: bool = True) -> CryosparcStar:
    """Convert cryoSPARC particle records to a RELION 3.1 particle STAR (module docstring table).

    Args:
        records: ``(N,)`` structured array from :func:`read_cryosparc`.
        path: the ``.cs`` file (the STAR's ``path``; stack names are relative to its folder).
        project_dir: the cryoSPARC project folder that ``blob/path`` is relative to
            (default: looked for beside the ``.cs`` file, see :func:`stack_candidates`).
        keep_fields: add the ``pvaeCs_`` columns that keep every field value for value
            (:func:`kept_field_columns`), for the way back to cryoSPARC.
    Returns:
        A :class:`CryosparcStar` (a :class:`ParticleStar`) with an optics block (one
        group per exposure group and optics, beam tilt included) and a particles block, rows in file order.
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
    tilt, cs = _field(records, "ctf/tilt_A"), _field(records, "ctf/cs_mm")
    if tilt is not None and cs is not None and tilt.shape[1:] == (2,) and np.any(tilt != 0):
        if np.all(cs != 0):  # Cs-corrected optics (Cs 0) have no beam tilt equivalent; ctf/tilt_A is then only kept
            for axis, name in enumerate(BEAM_TILT_COLUMNS):
                optics_values[name] = (tilt[:, axis], None)
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
        if name in BEAM_TILT_COLUMNS:
            continue
        optics[name] = column.astype(np.int64) if name == "rlnImageSize" else _shortest(column)
    if BEAM_TILT_COLUMNS[0] in groups:  # with the Cs written to rlnSphericalAberration, so that the way back is exact
        tilt_mrad = beam_tilt_mrad(groups[list(BEAM_TILT_COLUMNS)].to_numpy(), optics["rlnSphericalAberration"].to_numpy())
        optics[BEAM_TILT_COLUMNS[0]], optics[BEAM_TILT_COLUMNS[1]] = tilt_mrad[:, 0], tilt_mrad[:, 1]
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
    if keep_fields:
        particles = pd.concat([particles, pd.DataFrame(kept_field_columns(records))], axis=1)
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
    """cryoSPARC higher-order optics fields with non-zero values that are not converted to RELION columns
    (``ctf/shift_A``, ``ctf/trefoil_A``, ``ctf/tetra_A``, ``ctf/anisomag``; they are kept in the
    ``pvaeCs_`` columns, and a beam tilt ``ctf/tilt_A`` becomes ``rlnBeamTiltX/Y``)."""
    return [name for name in _ABERRATION_FIELDS if name in records.dtype.names and np.any(records[name] != 0)]


# --------------------------------------------------------------------------- beam tilt


def beam_tilt_mrad(tilt_angst: np.ndarray, cs_mm: np.ndarray) -> np.ndarray:
    """RELION's beam tilt (``rlnBeamTiltX``, ``rlnBeamTiltY``, mrad) from cryoSPARC's ``ctf/tilt_A`` (Angstrom).

    Derivation (docs/conventions.md, "Beam tilt"). A beam tilted by ``tau`` (rad) adds to the
    wave aberration of a lens with spherical aberration ``Cs`` the axial-coma term
    ``W3(alpha) = Cs |alpha|^2 (alpha . tau)`` (the ``alpha^3`` term of ``Cs |alpha + tau|^4 / 4``),
    ``alpha = lambda k`` the scattering angle, so the CTF phase ``2 pi W / lambda`` gains
    ``2 pi Cs lambda^2 |k|^2 (k . tau)``: the phase RELION applies for ``rlnBeamTiltX/Y``
    (``selfApplyBeamTilt``: ``0.360 Cs[mm] 1e7 lambda^2 |k|^2 (k . tau[mrad])`` degrees).
    cryoSPARC stores this third-order antisymmetric term as a length ``t`` (Angstrom), the
    coefficient of ``W3 = |alpha|^2 (alpha . t)``, and reports ``t / Cs`` as the beam tilt.
    Equal phases give ``t = Cs tau``; the wavelength cancels::

        tau [mrad] = 1e3 * t [A] / (Cs [mm] * 1e7 [A/mm]) = t / (Cs * 1e4)

    Both programs give ``x`` along image columns and ``y`` along rows; the components map
    one to one with the same sign (as the published cryoSPARC readers assume).

    Args:
        tilt_angst: ``(N, 2)`` ``ctf/tilt_A`` in Angstrom.
        cs_mm: ``(N,)`` spherical aberration in mm (``ctf/cs_mm``; must be non-zero).
    Returns:
        ``(N, 2)`` float64 beam tilt in mrad.
    """
    return np.asarray(tilt_angst, dtype=np.float64) / (np.asarray(cs_mm, dtype=np.float64).reshape(-1, 1) * 1e4)


def beam_tilt_angst(tilt_mrad: np.ndarray, cs_mm: np.ndarray) -> np.ndarray:
    """cryoSPARC's ``ctf/tilt_A`` (Angstrom) from RELION's beam tilt (mrad): the inverse of :func:`beam_tilt_mrad`."""
    return np.asarray(tilt_mrad, dtype=np.float64) * (np.asarray(cs_mm, dtype=np.float64).reshape(-1, 1) * 1e4)


# --------------------------------------------------------------------------- kept fields


def kept_field_column(name: str, dtype: np.dtype) -> str:
    """The STAR column that keeps cryoSPARC field ``name`` of type ``dtype``: ``pvaeCs_<type>_<name>``,
    ``<type>`` numpy's code without byte order (``f4``, ``u8``, ``S61``) and ``x<n>`` per array axis
    (``f4x2`` for ``ctf/tilt_A``), so that the field comes back with its exact type."""
    dtype = np.dtype(dtype)
    code = dtype.base.str[1:] + "".join(f"x{size}" for size in dtype.shape)
    return f"{KEPT_PREFIX}{code}_{name}"


def parse_kept_column(column: str) -> tuple[str, np.dtype] | None:
    """``(field name, dtype)`` of a kept-field column, or ``None`` for any other column.

    Raises:
        ValueError: a ``pvaeCs_`` column whose type code is not a numpy type (e.g. ``i3``).
    """
    match = _KEPT_RE.match(column)
    if match is None:
        return None
    try:
        base = np.dtype("<" + match.group(1))
    except TypeError:
        raise ValueError(f"{column}: {match.group(1)!r} is not a numpy type code") from None
    shape = tuple(int(size) for size in match.group(2).split("x")[1:])
    return match.group(3), (np.dtype((base, shape)) if shape else base)


def _encode_text(value: bytes) -> str:
    """A byte string as STAR text that every reader gives back as the same text: bytes outside
    :data:`_TEXT_SAFE` as ``%XX``, and the first byte too when the text would otherwise be read as a
    number, a missing value or a STAR keyword. An empty value (numpy strips trailing NULs, so no value
    ends in one) is written ``%00``."""
    if value == b"":
        return "%00"
    text = "".join(chr(b) if b in _TEXT_SAFE else f"%{b:02X}" for b in value)
    lowered = text.lower()
    try:
        float(text)
        numeric = True
    except ValueError:
        numeric = False
    if numeric or lowered in _NOT_TEXT or lowered.startswith(_STAR_RESERVED) or not (text[0].isalnum() or text[0] in ">./%"):
        text = f"%{value[0]:02X}" + text[len(chr(value[0])) if value[0] in _TEXT_SAFE else 3:]
    return text


def _decode_text(text: str) -> bytes:
    from urllib.parse import unquote_to_bytes

    return b"" if text == "%00" else unquote_to_bytes(text)


def _encode_field(values: np.ndarray) -> np.ndarray | None:
    """One field's values as a STAR column: float32 and other floats as the float64 of the value
    (which reads back bit for bit), integers and booleans as integers, arrays as ``[a,b,...]``,
    text through :func:`_encode_text`; ``None`` for a type that cannot be kept."""
    kind = values.dtype.base.kind
    if kind in "SU":
        raw = values.reshape(-1)
        encoded = [_encode_text(v if kind == "S" else v.encode("utf-8")) for v in raw.tolist()]
        return np.asarray(encoded, dtype=object)
    if kind not in "biuf":
        return None
    if values.ndim == 1:
        if kind == "f":
            return values.astype(np.float64)
        return values.astype(np.uint64 if kind == "u" else np.int64)
    flat = values.reshape(len(values), -1)
    parts = flat.astype(np.float64).astype(str) if kind == "f" else flat.astype(np.int64 if kind in "bi" else np.uint64).astype(str)
    text = parts[:, 0].astype(object)
    for column in range(1, parts.shape[1]):
        text = text + "," + parts[:, column].astype(object)
    return ("[" + text + "]").astype(object)


def _decode_field(series: pd.Series, dtype: np.dtype, column: str, path) -> np.ndarray:
    """The values of a kept-field column in their cryoSPARC type (the inverse of :func:`_encode_field`)."""
    base, shape = dtype.base, dtype.shape
    fix = f"restore the {column} column as written by particle-vae, or drop every {KEPT_PREFIX}* column (or give --template)"
    if base.kind != "f" and series.isna().any():  # NaN is a value of a float field, a gap in any other
        row = int(np.flatnonzero(series.isna().to_numpy())[0])
        raise InputFileError(f"particle {row + 1} has no value in {column}", path, fix)
    try:
        if base.kind in "SU":
            texts = series.astype(str).tolist()
            raw = [_decode_text(t) for t in texts]
            return np.array(raw if base.kind == "S" else [r.decode("utf-8") for r in raw], dtype=base)
        if not shape:
            if base.kind == "f":
                return series.to_numpy(dtype=np.float64).astype(base)
            return np.array(series.tolist(), dtype=object).astype(np.uint64 if base.kind == "u" else np.int64).astype(base)
        texts = series.astype(str).str.strip().tolist()
        if not all(t.startswith("[") and t.endswith("]") for t in texts):
            raise ValueError("not a bracketed list")
        rows = [t[1:-1].split(",") for t in texts]
        if base.kind == "f":
            parsed = np.array(rows, dtype=np.float64)
        else:
            parsed = np.array([[int(v) for v in r] for r in rows], dtype=np.uint64 if base.kind == "u" else np.int64)
        return parsed.reshape((len(series),) + shape).astype(base)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as error:
        raise InputFileError(f"column {column} holds values that are not {dtype} ({error})", path, fix) from None


def kept_field_columns(records: np.ndarray) -> dict[str, np.ndarray]:
    """STAR columns that keep every field of ``records`` except ``uid`` (``pvaeCryosparcUid``),
    in field order, named by :func:`kept_field_column`, so that the way back
    (:func:`star_to_cryosparc`) can restore fields RELION has no column for, and the exact
    values of converted ones whose RELION columns are unchanged."""
    out = {}
    for name in records.dtype.names:
        if name == "uid":
            continue
        encoded = _encode_field(records[name])
        if encoded is None or re.search(r"\s", name):
            log.warning("cryoSPARC field %s (%s) cannot be kept in a STAR column", name, records.dtype[name])
            continue
        out[kept_field_column(name, records.dtype[name])] = encoded
    return out


def kept_records(star: ParticleStar) -> np.ndarray | None:
    """The cryoSPARC records kept in a STAR's ``pvaeCs_`` columns (``uid`` from ``pvaeCryosparcUid``
    first, then the fields in column order), or ``None`` when it has none."""
    particles = star.particles.reset_index(drop=True)
    try:
        fields = [(column, parse_kept_column(str(column))) for column in particles.columns]
    except ValueError as error:
        raise InputFileError(f"has a kept cryoSPARC column that cannot be read ({error})", star.path,
                             f"restore the column as written by particle-vae, or drop every {KEPT_PREFIX}* column") from None
    fields = [(column, parsed) for column, parsed in fields if parsed is not None]
    if not fields:
        return None
    names = ["uid"] + [name for _, (name, _) in fields]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise InputFileError(f"keeps cryoSPARC field {duplicate} in more than one {KEPT_PREFIX}* column", star.path,
                             f"keep one column per field (drop the other {KEPT_PREFIX}*_{duplicate} column)")
    dtype = np.dtype([("uid", "<u8")] + [(name, field_type) for _, (name, field_type) in fields])
    out = np.zeros(len(particles), dtype=dtype)
    out["uid"] = _uids(star, particles)
    for column, (name, field_type) in fields:
        out[name] = _decode_field(particles[column], field_type, column, star.path)
    return out


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
        (an in-plane pose: ``pvaeAnglePsi`` or a 2D ``rlnAnglePsi``). Without a
        template, a STAR with ``pvaeCs_`` columns (:func:`kept_field_columns`) gives
        back the kept fields, in their order and type: each converted field from
        its RELION columns, except in the rows where those columns still hold
        exactly what the kept value converts to, which get the kept value itself
        (a ``.cs`` -> STAR -> ``.cs`` round trip returns every field unchanged, and
        a changed pose, CTF or selection comes back changed); ``blob/path`` keeps its
        value where the particle still names the same image (stack file name and
        index). Fields RELION has no column for (scores, ``ctf/type``,
        ``location/*``, the higher-order optics) come from the kept columns.
    Raises:
        InputFileError: template rows that cannot be matched, no image size,
            unreadable kept columns.
    """
    if template is not None:
        matched = _match_template(star, template)
        columns = _interpreted(star, blob_paths, box, matched, with_blob=False)
    else:
        matched = kept_records(star)
        columns = _interpreted(star, blob_paths, box, matched, with_blob=True)
        if matched is not None:
            columns = _prefer_kept(star, columns, matched, box)
    return _assemble(columns, len(star), matched)


def _interpreted(star: ParticleStar, blob_paths: np.ndarray | None, box: int | None, matched: np.ndarray | None,
                 with_blob: bool) -> dict[str, np.ndarray]:
    """The cryoSPARC fields that the STAR's RELION columns give (module docstring table); poses
    as the axis-angle vectors nearest ``matched``'s (when given)."""
    n = len(star)
    particles = star.particles.reset_index(drop=True)
    columns = {}

    def value(name: str) -> np.ndarray | None:
        series = star.column(name)
        return None if series is None else series.to_numpy(dtype=np.float64)

    columns["uid"] = _uids(star, particles)
    if with_blob:
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
        tilt = [value(name) for name in BEAM_TILT_COLUMNS]
        if all(t is not None for t in tilt):
            columns["ctf/tilt_A"] = beam_tilt_angst(np.stack(tilt, axis=1), ctf["cs"].to_numpy())
    has_3d = value("rlnAngleRot") is not None and value("rlnAngleTilt") is not None
    if has_3d:
        _alignment_columns(columns, "alignments3D", star, ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"),
                           ("rlnOriginXAngst", "rlnOriginYAngst"), psize, matched, labels=True)
    inplane = INPLANE_COLUMNS if INPLANE_COLUMNS[0] in particles.columns else (
        None if has_3d or value("rlnAnglePsi") is None else ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"))
    if inplane is not None:
        _alignment_columns(columns, "alignments2D", star, inplane[:1], inplane[1:], psize, matched, labels=not has_3d)
    return columns


def _prefer_kept(star: ParticleStar, columns: dict[str, np.ndarray], kept: np.ndarray, box: int | None) -> dict[str, np.ndarray]:
    """``columns`` with each converted field replaced by its kept value in the rows whose RELION
    columns are unchanged: where the field converted from the STAR equals the field converted from
    the STAR the kept record itself converts to (integers exactly; floating-point values to
    :data:`KEPT_TOLERANCE`, so that a STAR rewritten by RELION's programs, which keep six decimals,
    still counts as unchanged). ``blob/path`` and ``blob/idx`` are kept where the particle names the
    same image (stack file name and index)."""
    original = cryosparc_to_star(kept, keep_fields=False)
    back = _interpreted(original, None, box, kept, with_blob=False)
    out = dict(columns)
    for name, values in columns.items():
        if name not in kept.dtype.names or name not in back or name in ("uid", "blob/path", "blob/idx"):
            continue
        field_type = kept.dtype[name].base
        shape = kept[name].shape
        now = np.asarray(values).reshape(shape)
        before = np.asarray(back[name]).reshape(shape)
        if field_type.kind == "f":
            now64, before64 = now.astype(np.float64), before.astype(np.float64)
            close = np.abs(now64 - before64) <= KEPT_TOLERANCE * np.maximum(1.0, np.abs(before64))
            same = (close | (now.astype(field_type) == before.astype(field_type))).reshape(len(kept), -1).all(axis=1)
        else:
            same = (now.astype(field_type) == before.astype(field_type)).reshape(len(kept), -1).all(axis=1)
        out[name] = np.where(same.reshape((-1,) + (1,) * (len(shape) - 1)), kept[name], now.astype(field_type))
    if "blob/path" in columns and "blob/idx" in columns:
        kept_names = np.array([os.path.basename(p.removeprefix(EXPORTED_PREFIX)) for p in _text(kept["blob/path"])], dtype=object)
        star_names = np.array([os.path.basename(p.decode("utf-8")) for p in columns["blob/path"]], dtype=object)
        same = (kept_names == star_names) & (np.asarray(columns["blob/idx"]) == kept["blob/idx"].astype(np.int64))
        if same.all():
            out["blob/path"], out["blob/idx"] = kept["blob/path"], kept["blob/idx"]
        else:
            width = max(kept.dtype["blob/path"].itemsize, max((len(p) for p in columns["blob/path"]), default=1))
            out["blob/path"] = np.where(same, kept["blob/path"].astype(f"S{width}"), columns["blob/path"].astype(f"S{width}"))
            out["blob/idx"] = np.where(same, kept["blob/idx"].astype(np.int64), np.asarray(columns["blob/idx"]))
    return out


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
            if dtype.kind == "S" and name in columns:  # a longer value (a new blob/path) widens the field
                width = max([dtype.itemsize] + [len(v) for v in np.asarray(columns[name]).reshape(-1).tolist()])
                dtype = np.dtype(f"S{width}")
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


# --------------------------------------------------------------------------- result group (.csg)

CSG_SUFFIX = ".csg"


def csg_text(cs_name: str, records: np.ndarray, template_csg: str | None = None, created: str | None = None) -> str:
    """The result-group file (``.csg``) that lets cryoSPARC's *Import Result Group* job import a ``.cs``
    file written beside it.

    A ``.csg`` file is the small YAML document cryoSPARC writes next to every exported ``.cs``
    (``exports/groups/J24_particles/J24_particles_exported.csg``): ``created`` (a timestamp),
    ``group`` (``name``, ``type: particle``, ``title``, ``description``), ``results`` (one entry
    per slot of the ``.cs``: ``metafile`` the ``.cs`` file, with ``>`` meaning "in the ``.csg``'s
    folder", ``num_items`` its number of rows, ``type: particle.<slot>``) and ``version`` (the
    cryoSPARC version that wrote it). Keys are written sorted, as cryoSPARC writes them.

    Args:
        cs_name: the ``.cs`` file's name (it lies in the ``.csg``'s folder).
        records: the records written to it (slots and row count).
        template_csg: text of the ``.csg`` beside the template ``.cs``, whose ``group`` block and
            ``version`` line are copied (without one, the group is ``particles`` and no version is written).
        created: the timestamp (default: now).
    Returns:
        The YAML text.
    """
    import datetime

    group, version = None, None
    if template_csg:
        lines = template_csg.splitlines()
        for number, line in enumerate(lines):
            if line.rstrip() == "group:":
                block = [line]
                for following in lines[number + 1:]:
                    if not following.startswith((" ", "\t")):
                        break
                    block.append(following)
                group = block
            elif line.startswith("version:"):
                version = line.rstrip()
    if group is None:
        group = ["group:", "  description: particles written by particle-vae export", "  name: particles",
                 "  title: particle-vae particles", "  type: particle"]
    created = created or datetime.datetime.now().isoformat(sep=" ")
    metafile = "'>" + cs_name.replace("'", "''") + "'"  # single-quoted: '>' starts a YAML block scalar
    out = [f"created: {created}"] + group + ["results:"]
    for slot in sorted({name.split("/")[0] for name in records.dtype.names if "/" in name}):
        out += [f"  {slot}:", f"    metafile: {metafile}", f"    num_items: {len(records)}", f"    type: particle.{slot}"]
    if version is not None:
        out.append(version)
    return "\n".join(out) + "\n"


def write_csg(cs_path: str | Path, records: np.ndarray, template_cs: str | Path | None = None, overwrite: bool = False,
              inputs: tuple = ()) -> Path:
    """Write :func:`csg_text` for ``cs_path`` as ``cs_path`` with suffix ``.csg``, atomically, never over an input.

    Args:
        template_cs: the template ``.cs`` file; a ``.csg`` with its name beside it lends its
            ``group`` block and ``version``.
    Returns:
        The ``.csg`` path.
    """
    cs_path = Path(cs_path)
    path = check_output_path(cs_path.with_suffix(CSG_SUFFIX), overwrite=overwrite, inputs=inputs)
    template = None
    if template_cs is not None and Path(template_cs).with_suffix(CSG_SUFFIX).is_file():
        template = Path(template_cs).with_suffix(CSG_SUFFIX).read_text(encoding="utf-8", errors="replace")
    atomic_write_text(path, csg_text(cs_path.name, records, template))
    return path
