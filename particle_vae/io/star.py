"""RELION STAR files: reading 3.0 and 3.1+ particle files, writing them back intact.

* :func:`read_star` / :func:`write_star` handle any STAR file as an ordered map of
  blocks (loops as ``pandas.DataFrame``, key-value blocks as ``dict``). One
  parser reads every file, small or large (the tests check it against the
  ``starfile`` package on every STAR of the reference data).
* :func:`scan_star_header` finds the particle block's columns from the header
  alone, without reading the rows (for quick checks of large files).
* :class:`ParticleStar` adds the particle view: which block holds
  ``rlnImageName``, where each image lives (``N@stack`` resolved against the
  STAR's folder or a ``--stack-dir``), pixel sizes and CTF parameters joined
  through ``rlnOpticsGroup``, new columns, and conversion to a RELION 3.1 file
  with an optics block.

Writing keeps every block, every column and the column order; values are
written in their shortest exact form, so reading a written file gives back the
same table. Output goes to a temporary file renamed into place, and an input
file is never overwritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from particle_vae.errors import InputFileError
from particle_vae.io.atomic import atomic_write_text, check_output_path

IMAGE_NAME = "rlnImageName"
OPTICS_GROUP = "rlnOpticsGroup"
#: RELION 3.1+ optics flag: 1 when the particle images were multiplied by their CTF (RELION 5 writes it for every group)
PREMULTIPLIED = "rlnCtfDataAreCtfPremultiplied"
#: optics columns of the aberrations and the magnification that particle-vae keeps in outputs but does not model
ABERRATION_COLUMNS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike",
                      "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")

#: folders above a STAR's own where its stacks are looked for (RELION job folders sit two levels below the project)
PROJECT_LEVELS_SEARCHED = 3
#: Columns that RELION 3.1 keeps per optics group rather than per particle.
OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality")

Block = "pd.DataFrame | dict[str, object]"

_IMAGE_NAME_RE = re.compile(r"^\s*(\d+)@(.+?)\s*$")


@dataclass
class StarFile:
    """An ordered collection of STAR data blocks.

    Attributes:
        blocks: block name (without ``data_``) -> DataFrame (a ``loop_``) or dict
            (key-value pairs), in file order.
        path: where it was read from, if anywhere.
    """

    blocks: dict = field(default_factory=dict)
    path: Path | None = None


def read_star(path: str | Path, text_columns: Iterable[str] = ()) -> StarFile:
    """Read every block of a STAR file.

    One parser reads every file, whatever its size: each ``loop_``'s rows go to
    one ``pandas.read_csv`` call (C parser), header lines and key-value blocks
    are parsed line by line. Columns are numeric when every value is a number
    (``int64`` or ``float64``; ``nan`` is a float), otherwise text; quotes
    (``"a b"`` or ``'a b'``) are removed, and ``#`` starts a comment anywhere.
    A loop without rows gives an empty table with its columns; a key-value
    block a ``dict`` whose values are ``int``, ``float`` or ``str``.

    Args:
        path: the STAR file.
        text_columns: column or key names to keep as the text written in the
            file (``rlnImageName`` always is), e.g. to write them back byte for byte.
    Returns:
        A :class:`StarFile`.
    Raises:
        InputFileError: missing, empty, compressed or non-UTF-8 file, a loop row
            without one value per column (naming the line), or unparsable text.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError("file not found", path, "check the path")
    if path.is_dir():
        raise InputFileError("is a folder, not a STAR file", path)
    text = _read_star_text(path)
    blocks = _parse_star(text, path, frozenset(text_columns) | {IMAGE_NAME})
    if not blocks:
        raise InputFileError("contains no data blocks", path, "is it a STAR file?")
    return StarFile(blocks=blocks, path=path)


#: leading bytes of compressed files -> (format, how to decompress)
_COMPRESSED_MAGIC = (
    (b"\x1f\x8b", "gzip", "gunzip <"),
    (b"BZh", "bzip2", "bunzip2 <"),
    (b"\xfd7zXZ\x00", "xz", "xz -d <"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d <"),
    (b"PK\x03\x04", "zip", "unzip -p"),
)


def _read_star_text(path: Path) -> str:
    """The file's text, or a one-line error naming the real problem: a compressed
    file, UTF-16/32 or binary data, or a byte that is not UTF-8 (with its line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot be read ({exc.strerror or exc})", path, "check the file's permissions") from None
    for magic, kind, command in _COMPRESSED_MAGIC:
        if raw.startswith(magic):
            raise InputFileError(f"is {kind}-compressed, not a plain-text STAR file", path,
                                 f"decompress it first, e.g. {command} {path} > {path.stem}_plain.star")
    head = raw[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(b"\x00") * 4 >= len(head) > 0:
        raise InputFileError("is UTF-16 or UTF-32 text, not UTF-8", path,
                             f"convert it to UTF-8 first, e.g. iconv -f UTF-16 -t UTF-8 {path} > {path.stem}_utf8.star")
    if b"\x00" in head:
        raise InputFileError("holds binary data (NUL bytes), not STAR text", path, "give a RELION particle .star file")
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors write one) is not text
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputFileError(f"line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column})", path,
                             f"save the file as UTF-8 (or ASCII) text, e.g. iconv -f latin1 -t UTF-8 {path} > {path.stem}_utf8.star"
                             ) from None


_STAR_VALUE_RE = re.compile(r"\"[^\"]*\"|'[^']*'|\S+")


def _check_loop_rows(text: str, start: int, end: int, name: str, n_columns: int, path: Path) -> None:
    """Raise naming the first row of a loop (``text[start:end]``) that does not hold one value per column.

    Run when ``read_csv`` failed or its table looks short of values (see
    :func:`_parse_loop_rows`): values are counted line by line, in Python.
    """
    first_line = _line_number(text, start)
    for number, line in enumerate(text[start:end].split("\n"), first_line):
        stripped = line.strip()
        if _line_kind(stripped) == "skip":
            continue
        values = []
        for value in _STAR_VALUE_RE.findall(stripped):
            if value.startswith("#"):
                break
            values.append(value)
        if len(values) != n_columns:
            raise InputFileError(
                f"line {number} has {len(values)} value(s) but the loop of data_{name} has {n_columns} column(s)", path,
                "complete or delete that row (a STAR row holds one value per column)")


# --------------------------------------------------------------------------- the parser

#: a ``data_`` line after the first line (leading blanks allowed); the first line is checked on its own
_DATA_AFTER_NEWLINE_RE = re.compile(r"\n[ \t]*data_")


def _line_kind(stripped: str) -> str:
    """What a stripped STAR line is: ``"skip"`` (blank or ``#`` comment), ``"data"``,
    ``"loop"``, ``"tag"`` (``_name ...``) or ``"value"`` (anything else: a loop row)."""
    if not stripped or stripped[0] == "#":
        return "skip"
    if stripped.startswith("data_"):
        return "data"
    if stripped.startswith("loop_"):
        return "loop"
    if stripped[0] == "_":
        return "tag"
    return "value"


def _block_starts(text: str) -> list[tuple[int, int, str]]:
    """Every ``data_`` line: ``(offset of the line, offset after it, block name)``; the name is the
    first word after ``data_`` (``""`` for a bare ``data_``)."""
    starts = [match.start() + 1 for match in _DATA_AFTER_NEWLINE_RE.finditer(text)]
    if text.lstrip(" \t").startswith("data_"):
        starts.insert(0, 0)
    found = []
    for start in starts:
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        words = text[start:end].strip()[len("data_"):].split()
        found.append((start, end, words[0] if words else ""))
    return found


def _line_number(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _numericise(value: str) -> int | float | str:
    """``value`` as an int, else a float, else the text itself."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _parse_star(text: str, path: Path, text_columns: frozenset) -> dict:
    """Every block of STAR ``text``, in file order (see :func:`read_star`)."""
    starts = _block_starts(text)
    blocks: dict = {}
    for number, (_, body_start, name) in enumerate(starts):
        body_end = starts[number + 1][0] if number + 1 < len(starts) else len(text)
        blocks[name] = _parse_block(text, body_start, body_end, name, path, text_columns)
    return blocks


def _parse_block(text: str, start: int, end: int, name: str, path: Path, text_columns: frozenset):
    """One block, ``text[start:end]`` (the lines after its ``data_`` line): a DataFrame for a
    ``loop_``, a dict for key-value pairs (``{}`` for a block with neither)."""
    kind = None
    columns: list[str] = []
    pairs: dict = {}
    pos = start
    while pos < end:
        newline = text.find("\n", pos, end)
        line_end = end if newline < 0 else newline + 1
        stripped = text[pos:line_end].strip()
        what = _line_kind(stripped)
        if what == "skip":
            pass
        elif kind is None and what == "loop":
            kind = "loop"
        elif kind == "loop" and what == "tag":
            columns.append(stripped.split()[0][1:])
        elif kind == "loop" and what == "value" and columns:
            return _parse_loop_rows(text, pos, end, name, columns, path, text_columns)
        elif kind in (None, "pairs") and what == "tag":
            kind = "pairs"
            key, value = _parse_pair(stripped, text, pos, name, path)
            pairs[key] = value if key in text_columns else _numericise(value)
        else:
            if kind == "loop" and not columns:
                found = "a loop_ without column names"
            elif what == "loop":
                found = "a loop_ after key-value pairs" if kind == "pairs" else "a second loop_"
            else:
                found = "a value outside a loop" if what == "value" else f"an unexpected {what} line"
            raise InputFileError(f"line {_line_number(text, pos)} holds {found} in data_{name}", path,
                                 "a STAR block holds either one loop_ (column names, then one row per line) or _key value lines")
        pos = line_end
    if kind == "loop":
        if not columns:
            raise InputFileError(f"the loop_ of data_{name} has no column names", path, "add its _column lines or delete the loop")
        return _empty_table(columns, text_columns)
    return pairs


def _empty_table(columns: list[str], text_columns: frozenset) -> pd.DataFrame:
    """A loop without rows: its columns, float64 (text for ``text_columns``)."""
    return pd.DataFrame({i: pd.Series(dtype=object if column in text_columns else np.float64)
                         for i, column in enumerate(columns)}).set_axis(columns, axis=1)


def _parse_pair(stripped: str, text: str, pos: int, name: str, path: Path) -> tuple[str, str]:
    """``_key value`` (the value optionally quoted, then an optional ``#`` comment) -> ``(key, value)``."""
    tokens = _STAR_VALUE_RE.findall(stripped)
    key, values = tokens[0][1:], []
    for token in tokens[1:]:
        if token.startswith("#"):
            break
        values.append(token)
    if len(values) != 1:
        line = _line_number(text, pos)
        if not values:
            raise InputFileError(f"line {line}: _{key} in data_{name} has no value", path,
                                 "give the value on the same line (multi-line ; text fields are not supported)")
        raise InputFileError(f"line {line}: _{key} in data_{name} has {len(values)} values", path,
                             "quote a value that holds spaces, e.g. \"a b\"")
    return key, _unquote(values[0])


def _parse_loop_rows(text: str, start: int, end: int, name: str, columns: list[str], path: Path,
                     text_columns: frozenset) -> pd.DataFrame:
    """The rows of a loop, ``text[start:end]``, in one ``read_csv`` call; each column numeric when all its values are."""
    import io

    rows = text[start:end]
    if "'" in rows:  # read_csv knows one quote character: 'a b' is read as "a b"
        rows = rows.replace("'", '"')
    dtypes = {i: str for i, column in enumerate(columns) if column in text_columns}
    try:
        table = pd.read_csv(io.StringIO(rows), sep=r"\s+", header=None, comment="#", dtype=dtypes, keep_default_na=False,
                            na_values=["nan", "NaN", "<NA>"], engine="c")
    except pd.errors.EmptyDataError:  # only comments after the column names
        return _empty_table(columns, text_columns)
    except (ValueError, pd.errors.ParserError) as error:  # e.g. a row with more values than the first
        _check_loop_rows(text, start, end, name, len(columns), path)
        raise InputFileError(f"the rows of data_{name} could not be parsed ({type(error).__name__}: {str(error).strip()})".replace("\n", " "),
                             path, "give each row one value per column, separated by blanks") from None
    # a row short of values leaves its last fields empty ("" or NaN); such a last column is checked row by row
    last = table.iloc[:, -1]
    short = table.shape[1] != len(columns) or bool(last.isna().any())
    if not short and pd.api.types.is_string_dtype(last):
        short = bool((last == "").any())
    if short:
        _check_loop_rows(text, start, end, name, len(columns), path)
        if table.shape[1] != len(columns):
            raise InputFileError(f"the rows of data_{name} hold {table.shape[1]} values but its loop has {len(columns)} columns",
                                 path, "give each row one value per column")
    table.columns = columns
    for column in columns:
        if column not in text_columns and not pd.api.types.is_numeric_dtype(table[column]):
            try:
                table[column] = pd.to_numeric(table[column])
            except (ValueError, TypeError):
                pass
    return table


# --------------------------------------------------------------------------- header scan


@dataclass(frozen=True)
class StarHeader:
    """What the header of a STAR file says about its particles, read without parsing data rows.

    Attributes:
        blocks: names of the ``data_`` blocks seen before the scan stopped, in file order.
        particles_block: the first block whose ``loop_`` has ``rlnImageName``, or ``None``.
        columns: that block's column names, without the leading underscore
            (``[]`` when there is no such block).
        has_rows: whether that block has at least one data row.
    """

    blocks: list[str]
    particles_block: str | None
    columns: list[str]
    has_rows: bool


#: lines of other blocks (an optics table, key-value pairs) read before :func:`scan_star_header` gives up
MAX_SKIPPED_LINES = 100_000


def scan_star_header(path: str | Path, max_skipped_lines: int = MAX_SKIPPED_LINES) -> StarHeader:
    """Find the particle block of a STAR file from its header, reading up to its first row only.

    The particle block is the first ``loop_`` whose columns include
    ``rlnImageName``; the scan stops at its first data row, so this costs the
    same for a file of ten particles as for one of millions. Lines follow the
    rules of :func:`read_star` (blank and ``#`` lines skipped, the first word
    of a ``_`` line names a column). Bytes that are not UTF-8 are replaced
    (:func:`read_star` reports them).

    Args:
        path: the STAR file.
        max_skipped_lines: give up (no particle block) after this many lines
            of other blocks, e.g. the rows of a large table without ``rlnImageName``.
    Returns:
        A :class:`StarHeader`.
    Raises:
        OSError: the file cannot be read.
    """
    blocks: list[str] = []
    columns: list[str] = []
    in_header = False  # between a loop_ and its first row
    skipped = 0
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for line in handle:
            stripped = line.strip()
            what = _line_kind(stripped)
            if what == "skip":
                continue
            if what == "data":
                if IMAGE_NAME in columns:  # a particle loop without rows
                    break
                words = stripped[len("data_"):].split()
                blocks.append(words[0] if words else "")
                columns, in_header = [], False
            elif what == "loop":
                columns, in_header = [], True
            elif what == "tag" and in_header:
                columns.append(stripped.split()[0][1:])
            elif in_header and columns:  # the first row of a loop
                if IMAGE_NAME in columns:
                    return StarHeader(blocks, blocks[-1] if blocks else None, columns, has_rows=True)
                in_header = False
                columns = []
            else:
                skipped += 1
                if skipped > max_skipped_lines:
                    break
    if IMAGE_NAME in columns:
        return StarHeader(blocks, blocks[-1] if blocks else None, columns, has_rows=False)
    return StarHeader(blocks, None, [], has_rows=False)


def _format_column(values: pd.Series) -> list[str]:
    if pd.api.types.is_bool_dtype(values):
        return [str(int(v)) for v in values]
    if pd.api.types.is_unsigned_integer_dtype(values) and not values.isna().any():
        # cryoSPARC uids use all 64 bits: through int64 the upper half would come out negative
        return values.astype(np.uint64).astype(str).tolist()
    if pd.api.types.is_integer_dtype(values) and not values.isna().any():
        return values.astype(np.int64).astype(str).tolist()
    if pd.api.types.is_float_dtype(values):
        # numpy's str() of a float is its shortest exact representation
        return np.asarray(values.to_numpy(), dtype=values.dtype.numpy_dtype if hasattr(values.dtype, "numpy_dtype") else values.dtype).astype(str).tolist()
    return [_quote(v) for v in values.astype(object)]


def _quote(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return '""'
    text = str(value)
    if text == "" or any(ch.isspace() for ch in text):
        return '"' + text.replace('"', "'") + '"'
    return text


def format_star(blocks: Mapping[str, object]) -> str:
    """Render blocks as STAR text (RELION 3.1 layout, ``# version 30001`` headers)."""
    out: list[str] = []
    for name, block in blocks.items():
        out += ["", "# version 30001", "", f"data_{name}", ""]
        if isinstance(block, pd.DataFrame):
            out.append("loop_")
            out += [f"_{column} #{i + 1}" for i, column in enumerate(block.columns)]
            columns = [_format_column(block[column]) for column in block.columns]
            out += [" ".join(row) for row in zip(*columns)]
        else:
            width = max((len(k) for k in block), default=0) + 2
            for key, value in block.items():
                if isinstance(value, (float, np.floating)):
                    text = str(np.float64(value))
                else:
                    text = _quote(value)
                out.append(f"_{key:<{width}}{text}")
        out.append("")
    return "\n".join(out) + "\n"


def write_star(path: str | Path, data: StarFile | Mapping[str, object], overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Write blocks to ``path`` atomically.

    Args:
        data: a :class:`StarFile` or a mapping of block name -> DataFrame/dict.
        overwrite: allow replacing an existing file that is not an input.
        inputs: paths that must never be overwritten (the source STAR of
            ``data`` is always included).
    """
    blocks = data.blocks if isinstance(data, StarFile) else dict(data)
    protected = tuple(inputs) + ((data.path,) if isinstance(data, StarFile) and data.path else ())
    path = check_output_path(path, overwrite=overwrite, inputs=protected)
    atomic_write_text(path, format_star(blocks))
    return path


@dataclass
class ImageLocations:
    """Where each particle image lives.

    Attributes:
        stack_paths: unique resolved stack files.
        stack_index: ``(N,)`` index into ``stack_paths`` per particle.
        image_index: ``(N,)`` 0-based image index inside its stack.
    """

    stack_paths: list[Path]
    stack_index: np.ndarray
    image_index: np.ndarray


class ParticleStar:
    """A RELION particle STAR file (3.0 single block or 3.1+ optics + particles).

    Args:
        star: a :class:`StarFile` or a path to read.
    Raises:
        InputFileError: no block has an ``rlnImageName`` column.
    """

    def __init__(self, star: StarFile | str | Path):
        if not isinstance(star, StarFile):
            star = read_star(star)
        self.star = star
        self.path = star.path
        self.particles_block = self._find_particles_block()
        self.optics_block = self._find_optics_block()

    # -- structure -------------------------------------------------------
    def _find_particles_block(self) -> str:
        for name, block in self.star.blocks.items():
            if isinstance(block, pd.DataFrame) and IMAGE_NAME in block.columns:
                return name
        raise InputFileError(
            "has no rlnImageName column",
            self.path or "STAR data",
            "particle-vae needs a particle STAR whose rlnImageName names each image as N@stack.mrcs (e.g. from RELION Extract)",
        )

    def _find_optics_block(self) -> str | None:
        for name, block in self.star.blocks.items():
            if name != self.particles_block and isinstance(block, pd.DataFrame) and OPTICS_GROUP in block.columns:
                return name
        return None

    @property
    def particles(self) -> pd.DataFrame:
        return self.star.blocks[self.particles_block]

    @property
    def optics(self) -> pd.DataFrame | None:
        return None if self.optics_block is None else self.star.blocks[self.optics_block]

    @property
    def is_relion31(self) -> bool:
        return self.optics_block is not None

    def __len__(self) -> int:
        return len(self.particles)

    # -- per-particle values ---------------------------------------------
    def column(self, name: str) -> pd.Series | None:
        """A per-particle column, looking in the optics block through
        ``rlnOpticsGroup`` when the particles block lacks it; ``None`` if absent."""
        if name in self.particles.columns:
            return self.particles[name].reset_index(drop=True)
        optics = self.optics
        if optics is not None and name in optics.columns:
            if OPTICS_GROUP not in self.particles.columns:
                if len(optics) == 1:
                    return pd.Series(np.repeat(optics[name].to_numpy(), len(self.particles)), name=name)
                raise InputFileError("has several optics groups but particles have no rlnOpticsGroup", self.path)
            lookup = dict(zip(optics[OPTICS_GROUP].astype(int), optics[name]))
            groups = self.particles[OPTICS_GROUP].astype(int)
            missing = sorted(set(groups) - set(lookup))
            if missing:
                raise InputFileError(f"particles refer to optics group(s) {missing[:5]} that the optics block lacks", self.path)
            return groups.map(lookup).reset_index(drop=True).rename(name)
        return None

    def pixel_sizes(self) -> np.ndarray | None:
        """Angstrom per pixel for every particle, or ``None`` if the file has none.

        Looks for ``rlnImagePixelSize`` (3.1 optics), then ``rlnPixelSize``, then
        ``rlnDetectorPixelSize`` (um) * 1e4 / ``rlnMagnification`` (RELION 3.0).

        Raises:
            InputFileError: a pixel size that is not a positive number (naming
                the optics group or the particle row).
        """
        for name in ("rlnImagePixelSize", "rlnPixelSize"):
            values = self.column(name)
            if values is not None:
                return self._positive_pixel_sizes(values.to_numpy(dtype=np.float64), name, (name,))
        detector, magnification = self.column("rlnDetectorPixelSize"), self.column("rlnMagnification")
        if detector is not None and magnification is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                sizes = detector.to_numpy(dtype=np.float64) * 1e4 / magnification.to_numpy(dtype=np.float64)
            return self._positive_pixel_sizes(sizes, "rlnDetectorPixelSize * 1e4 / rlnMagnification",
                                              ("rlnDetectorPixelSize", "rlnMagnification"))
        return None

    def _positive_pixel_sizes(self, sizes: np.ndarray, name: str, columns: tuple[str, ...]) -> np.ndarray:
        """``sizes``, or a one-line error for the first that is not a positive number."""
        bad = np.flatnonzero(~(np.isfinite(sizes) & (sizes > 0)))
        if bad.size == 0:
            return sizes
        row = int(bad[0])
        if columns[0] not in self.particles.columns and self.optics is not None:  # the value comes from the optics block
            group = int(self.particles[OPTICS_GROUP].iloc[row]) if OPTICS_GROUP in self.particles.columns \
                else int(self.optics[OPTICS_GROUP].iloc[0])
            where = f"optics group {group}"
        else:
            where = f"particle {row + 1} ({self.particles[IMAGE_NAME].iloc[row]})" + \
                (f" and {bad.size - 1} other particle(s)" if bad.size > 1 else "")
        raise InputFileError(f"{where} has {name} {sizes[row]:g}, not a positive pixel size", self.path,
                             f"correct {' and '.join(columns)} in the STAR (Angstrom per pixel)")

    def pixel_size(self) -> float | None:
        """The common pixel size in Angstrom; error if particles disagree."""
        sizes = self.pixel_sizes()
        if sizes is None or len(sizes) == 0:
            return None
        if not np.allclose(sizes, sizes[0], rtol=1e-4):
            raise InputFileError(
                f"particles have different pixel sizes ({np.unique(np.round(sizes, 4))[:5]} A)",
                self.path,
                "split the STAR by optics group or rescale the particles to one pixel size",
            )
        return float(sizes[0])

    def ctf_parameters(self) -> pd.DataFrame:
        """Per-particle CTF parameters, joined through the optics groups.

        Returns:
            DataFrame with ``defocus_u``, ``defocus_v`` (Angstrom, underfocus
            positive), ``defocus_angle`` (degrees), ``voltage`` (kV), ``cs`` (mm),
            ``amplitude_contrast``, ``phase_shift`` (degrees), ``bfactor``
            (Angstrom^2), ``scale`` and ``premultiplied`` (bool: RELION's
            ``rlnCtfDataAreCtfPremultiplied``, images already multiplied by
            their CTF, so that the CTF acts on them squared; see
            :func:`particle_vae.data.ctf.effective_ctf`).
        Raises:
            InputFileError: a required CTF column is missing.
        """
        required = {
            "defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "voltage": "rlnVoltage",
            "cs": "rlnSphericalAberration", "amplitude_contrast": "rlnAmplitudeContrast",
        }
        optional = {"defocus_angle": ("rlnDefocusAngle", 0.0), "phase_shift": ("rlnPhaseShift", 0.0),
                    "bfactor": ("rlnCtfBfactor", 0.0), "scale": ("rlnCtfScalefactor", 1.0),
                    "premultiplied": (PREMULTIPLIED, 0.0)}
        out = {}
        for key, name in required.items():
            values = self.column(name)
            if values is None:
                raise InputFileError(f"has no {name} column, needed for the CTF", self.path, "run CTF estimation in RELION first or turn the CTF option off")
            out[key] = values.to_numpy(dtype=np.float64)
        for key, (name, default) in optional.items():
            values = self.column(name)
            out[key] = np.full(len(self), default) if values is None else values.to_numpy(dtype=np.float64)
        names = {**required, **{key: name for key, (name, _) in optional.items()}}
        for key, values in out.items():
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                row = int(bad[0])
                raise InputFileError(f"particle {row + 1} ({self.particles[IMAGE_NAME].iloc[row]}) has {names[key]} {values[row]}"
                                     + (f" ({bad.size} such particles)" if bad.size > 1 else ""), self.path,
                                     "correct the CTF values in the STAR or turn the CTF option off")
        table = pd.DataFrame(out)
        table["premultiplied"] = table["premultiplied"].to_numpy() != 0
        return table

    def image_locations(self, datadir: str | Path | None = None) -> ImageLocations:
        """Parse ``rlnImageName`` (``N@path``, 1-based, any zero padding) and find the stacks.

        A stack path is looked up, in order, as ``datadir/path`` and
        ``datadir/<file name>`` when ``datadir`` is given, otherwise relative to
        the STAR's folder, then its file name in that folder, then relative to
        the current folder (RELION project layout). Absolute paths are used as is.

        Raises:
            InputFileError: malformed names or a stack that cannot be found.
        """
        names = self.particles[IMAGE_NAME].astype(str)
        split = _split_image_names(names)
        if split is None:  # some name is malformed: the regular expression finds and reports it
            parts = names.str.extract(_IMAGE_NAME_RE)
            bad = parts[0].isna()
            if bad.any():
                first = names[bad].iloc[0]
                raise InputFileError(f"rlnImageName '{first}' is not of the form N@stack.mrcs ({int(bad.sum())} such rows)", self.path)
            image_number = parts[0].astype(np.int64).to_numpy()
            codes, uniques = pd.factorize(parts[1])
        else:
            image_number, codes, uniques = split
        if (image_number < 1).any():
            raise InputFileError("rlnImageName uses image number 0; RELION numbers images from 1", self.path)
        base = self.path.parent if self.path is not None else Path.cwd()
        resolved = [self._resolve_stack(name, base, datadir) for name in uniques]
        return ImageLocations(stack_paths=resolved, stack_index=codes.astype(np.int64), image_index=image_number - 1)

    def stack_candidates(self, name: str, datadir: str | Path | None = None) -> list[Path]:
        """Where a stack named ``name`` in ``rlnImageName`` is looked for, in order
        (see :meth:`image_locations`); the first existing file wins: with ``datadir``
        only there; else beside the STAR, in the current folder, and in the
        ``PROJECT_LEVELS_SEARCHED`` folders above the STAR's (a project folder)."""
        raw = Path(name)
        base = self.path.parent if self.path is not None else Path.cwd()
        if raw.is_absolute():
            return [raw] + ([Path(datadir) / raw.name] if datadir else [])
        if datadir:
            return [Path(datadir) / raw, Path(datadir) / raw.name]
        # then the folders above the STAR's: a STAR in a job folder (Class2D/job012/) names its stacks from the
        # project folder two levels up, as RELION, run there, reads them
        above = [parent / raw for parent in list(base.resolve().parents)[:PROJECT_LEVELS_SEARCHED]]
        return [base / raw, base / raw.name, Path.cwd() / raw] + above

    def _resolve_stack(self, name: str, base: Path, datadir) -> Path:
        candidates = self.stack_candidates(name, datadir)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        where = f"--stack-dir {datadir}" if datadir else f"{base}"
        raise InputFileError(
            f"stack '{name}' named in rlnImageName was not found (looked in {where})",
            self.path,
            "pass --stack-dir with the folder that holds the stacks (the RELION project folder)",
        )

    # -- editing and writing -----------------------------------------------
    def with_columns(self, columns: Mapping[str, object], optics_columns: Mapping[str, object] | None = None) -> "ParticleStar":
        """A copy with per-particle columns added or replaced (new ones appended in order).

        Args:
            columns: name (without the leading underscore) -> ``(N,)`` values.
            optics_columns: name -> one value per optics row (3.1 files only).
        """
        blocks = {name: (block.copy() if isinstance(block, pd.DataFrame) else dict(block)) for name, block in self.star.blocks.items()}
        particles = blocks[self.particles_block].reset_index(drop=True)
        for name, values in columns.items():
            values = np.asarray(values)
            if values.shape != (len(particles),):
                raise ValueError(f"column {name}: expected {len(particles)} values, got shape {values.shape}")
            particles[name] = values
        blocks[self.particles_block] = particles
        if optics_columns:
            if self.optics_block is None:
                raise ValueError("this STAR has no optics block; call to_relion31() first")
            optics = blocks[self.optics_block]
            for name, values in optics_columns.items():
                optics[name] = np.broadcast_to(np.asarray(values), (len(optics),)).copy()
        return ParticleStar(StarFile(blocks=blocks, path=self.path))

    def subset(self, rows) -> "ParticleStar":
        """A copy with only the given particle rows (boolean mask or 0-based indices), optics kept."""
        blocks = dict(self.star.blocks)
        particles = self.particles.reset_index(drop=True)
        rows = np.asarray(rows)
        blocks[self.particles_block] = (particles[rows] if rows.dtype == bool else particles.iloc[rows]).reset_index(drop=True)
        return ParticleStar(StarFile(blocks=blocks, path=self.path))

    def to_relion31(self, pixel_size: float | None = None, image_size: int | None = None) -> "ParticleStar":
        """Return a RELION 3.1 version: an optics block with pixel size, voltage,
        Cs, amplitude contrast and image size, and shifts in Angstrom.

        A 3.1 file gains any missing optics fields; a 3.0 file gets one optics
        group per distinct (voltage, Cs, amplitude contrast, pixel size).

        Args:
            pixel_size: Angstrom per pixel when the file does not say.
            image_size: box in pixels when the file does not say.
        Raises:
            InputFileError: pixel size or image size unknown.
        """
        sizes = self.pixel_sizes()
        if sizes is None:
            if pixel_size is None:
                raise InputFileError("gives no pixel size", self.path, "pass --pixel-size (Angstrom per pixel)")
            sizes = np.full(len(self), float(pixel_size))
        particles = self.particles.reset_index(drop=True).copy()
        blocks = {name: block for name, block in self.star.blocks.items()}
        if self.optics_block is None:
            def per_particle(name, default):
                values = self.column(name)
                return np.full(len(self), default) if values is None else values.to_numpy(dtype=np.float64)

            table = pd.DataFrame({
                "rlnVoltage": per_particle("rlnVoltage", 300.0),
                "rlnSphericalAberration": per_particle("rlnSphericalAberration", 2.7),
                "rlnAmplitudeContrast": per_particle("rlnAmplitudeContrast", 0.1),
                "rlnImagePixelSize": sizes,
            })
            keys = list(table.columns)
            groups, uniques = pd.factorize(pd.MultiIndex.from_frame(table))
            optics = pd.DataFrame(list(uniques), columns=keys)
            optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{i + 1}" for i in range(len(optics))])
            optics.insert(0, OPTICS_GROUP, np.arange(1, len(optics) + 1))
            particles = particles.drop(columns=[c for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize", "rlnImagePixelSize") if c in particles.columns])
            particles[OPTICS_GROUP] = groups + 1
            for axis in ("X", "Y"):
                if f"rlnOrigin{axis}" in particles.columns and f"rlnOrigin{axis}Angst" not in particles.columns:
                    particles[f"rlnOrigin{axis}Angst"] = particles[f"rlnOrigin{axis}"].to_numpy(dtype=np.float64) * sizes
                    particles = particles.drop(columns=[f"rlnOrigin{axis}"])
            del blocks[self.particles_block]
            blocks = {"optics": optics, "particles": particles, **blocks}
        else:
            optics = blocks[self.optics_block].copy()
            if "rlnImagePixelSize" not in optics.columns:
                optics["rlnImagePixelSize"] = float(pixel_size) if pixel_size else float(sizes[0])
            for name, default in (("rlnVoltage", 300.0), ("rlnSphericalAberration", 2.7), ("rlnAmplitudeContrast", 0.1)):
                if name not in optics.columns:
                    values = self.column(name)
                    optics[name] = default if values is None else float(values.iloc[0])
            blocks[self.optics_block] = optics
        optics_name = "optics" if self.optics_block is None else self.optics_block
        optics = blocks[optics_name]
        if "rlnImageSize" not in optics.columns:
            if image_size is None:
                raise InputFileError("gives no image size", self.path, "pass the box size")
            optics["rlnImageSize"] = int(image_size)
        if "rlnImageDimensionality" not in optics.columns:
            optics["rlnImageDimensionality"] = 2
        return ParticleStar(StarFile(blocks=blocks, path=self.path))

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write atomically; refuses to overwrite the file this STAR was read from."""
        return write_star(path, self.star, overwrite=overwrite)


def _split_image_names(names: pd.Series) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Vectorised ``N@stack`` split.

    Returns:
        ``(image numbers (N,) int64 (1-based, as written), stack codes (N,)
        int64, stack names (S,) in order of first appearance)``, or ``None``
        when some name does not have that form (the caller then reports it).

    Uses Arrow's string kernels when pyarrow is installed (under 1 s for
    1,000,000 names, no Python object per row), else pandas' ``str.partition``.
    """
    if len(names) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), []
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:
        pa = None
    if pa is not None:
        array = pa.array(names.to_numpy(dtype=object), type=pa.large_string()) if not hasattr(names.array, "_pa_array") \
            else pc.cast(names.array._pa_array, pa.large_string())
        at = pc.find_substring(array, "@")
        if pc.any(pc.less(at, 1)).as_py():
            return None
        pieces = pc.split_pattern(array, "@", max_splits=1)
        number = pc.utf8_trim_whitespace(pc.list_element(pieces, 0))
        stack = pc.utf8_trim_whitespace(pc.list_element(pieces, 1))
        if not pc.all(pc.utf8_is_digit(number)).as_py() or pc.any(pc.equal(pc.utf8_length(stack), 0)).as_py():
            return None
        encoded = pc.dictionary_encode(stack)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        numbers = pc.cast(number, pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
        return numbers, encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()
    parts = names.str.partition("@")
    number, stack = parts[0].str.strip(), parts[2].str.strip()
    if (parts[1] != "@").any() or not number.str.isdigit().all() or (stack == "").any():
        return None
    codes, uniques = pd.factorize(stack)
    return number.astype(np.int64).to_numpy(), codes.astype(np.int64), list(uniques)


def make_particle_star(
    image_names,
    pixel_size: float,
    box: int,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    columns: Mapping[str, object] | None = None,
) -> ParticleStar:
    """Build a new RELION 3.1 particle STAR with one optics group.

    Args:
        image_names: ``(N,)`` strings ``N@stack.mrcs``.
        pixel_size: Angstrom per pixel; box: image size in pixels.
        voltage (kV), cs (mm), amplitude_contrast: optics of the group.
        columns: extra per-particle columns, appended in order.
    """
    optics = pd.DataFrame({
        OPTICS_GROUP: [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnAmplitudeContrast": [float(amplitude_contrast)],
        "rlnSphericalAberration": [float(cs)], "rlnVoltage": [float(voltage)], "rlnImagePixelSize": [float(pixel_size)],
        "rlnImageSize": [int(box)], "rlnImageDimensionality": [2],
    })
    particles = pd.DataFrame({IMAGE_NAME: list(image_names)})
    particles[OPTICS_GROUP] = 1
    for name, values in (columns or {}).items():
        particles[name] = np.asarray(values)
    return ParticleStar(StarFile(blocks={"optics": optics, "particles": particles}))


def image_name(index0: int, stack: str, digits: int = 6) -> str:
    """RELION image name ``000001@stack`` for a 0-based index."""
    return f"{index0 + 1:0{digits}d}@{stack}"
