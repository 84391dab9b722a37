"""MRC/MRCS image stacks and maps: lazy reads, validated headers, atomic writes.

Reading never loads a whole stack: :class:`MRCStack` parses the 1024-byte
header and then reads exactly the bytes of the requested images with
``os.preadv``, so memory stays bounded for stacks of any size and the object is
safe to use from several DataLoader worker processes (each opens its own file
descriptor after a fork).

This module is the project's only MRC reader and writer: :class:`MRCStack`
(stacks), :func:`read_map` (volumes), :class:`StackWriter` / :func:`write_stack`
(stacks, float32 or float16, appended or written at any image index) and
:func:`write_map`. Why an own reader rather than the usual Python MRC
package (which the tests use as an independent reference): see docs/data.md,
"Why an own MRC reader".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from particle_vae.errors import InputFileError, OutputFileError
from particle_vae.io.atomic import atomic_path, check_output_path

HEADER_BYTES = 1024

#: MRC mode -> numpy dtype (little-endian form; byte order is fixed up on read).
MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
#: modes :class:`StackWriter` and :func:`write_stack` write: float32 (2) and float16 (12)
WRITE_MODES = (2, 12)
_COMPLEX_MODES = {3: "complex int16", 4: "complex float32"}

_HEADER_FIELDS = [
    ("nx", "i4"), ("ny", "i4"), ("nz", "i4"), ("mode", "i4"),
    ("nxstart", "i4"), ("nystart", "i4"), ("nzstart", "i4"),
    ("mx", "i4"), ("my", "i4"), ("mz", "i4"),
    ("cella", "f4", 3), ("cellb", "f4", 3),
    ("mapc", "i4"), ("mapr", "i4"), ("maps", "i4"),
    ("dmin", "f4"), ("dmax", "f4"), ("dmean", "f4"),
    ("ispg", "i4"), ("nsymbt", "i4"),
    ("extra1", "V8"), ("exttyp", "S4"), ("nversion", "i4"), ("extra2", "V84"),
    ("origin", "f4", 3), ("map", "S4"), ("machst", "u1", 4),
    ("rms", "f4"), ("nlabl", "i4"), ("label", "S80", 10),
]


def _header_dtype(byteorder: str) -> np.dtype:
    return np.dtype([(f[0], byteorder + f[1], *f[2:]) if f[1][0] in "if" else f for f in _HEADER_FIELDS])


HEADER_DTYPE_LE = _header_dtype("<")
assert HEADER_DTYPE_LE.itemsize == HEADER_BYTES


def read_header(path: str | Path) -> tuple[np.record, str]:
    """Parse and sanity-check an MRC header.

    Returns:
        ``(header, byteorder)`` where ``byteorder`` is ``"<"`` or ``">"``.
    Raises:
        InputFileError: missing file, short file, or a header that is not MRC.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError("file not found", path, "check the path (or --stack-dir for files named in a STAR)")
    if path.is_dir():
        raise InputFileError("is a folder, not an MRC file", path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise InputFileError(f"not an MRC file: {size} bytes, shorter than the 1024-byte header", path, "the file is truncated or of another format")
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    stamp = raw[212]
    candidates = ["<", ">"] if stamp != 0x11 else [">", "<"]
    for order in candidates:
        header = np.frombuffer(raw, dtype=_header_dtype(order))[0]
        nx, ny, nz = int(header["nx"]), int(header["ny"]), int(header["nz"])
        if 0 < nx < 1_000_000 and 0 < ny < 1_000_000 and 0 <= nz < 1_000_000_000 and 0 <= int(header["mode"]) < 1000:
            return header, order
    raise InputFileError("not an MRC file (implausible dimensions in the header)", path, "check that it is an MRC/MRCS image stack")


def _dtype_for(header, path: Path, order: str) -> np.dtype:
    mode = int(header["mode"])
    if mode in _COMPLEX_MODES:
        raise InputFileError(f"MRC mode {mode} ({_COMPLEX_MODES[mode]}) holds Fourier-space data, not images", path, "convert it to a real-space float32 stack")
    if mode not in MODE_DTYPES:
        raise InputFileError(f"unsupported MRC mode {mode}", path, "supported modes are 0, 1, 2, 6 and 12; convert the stack to float32 (mode 2)")
    return np.dtype(MODE_DTYPES[mode]).newbyteorder(order)


def header_pixel_size(header) -> float | None:
    """Angstrom per pixel from ``cella / mx``; ``None`` when the header has none."""
    mx = int(header["mx"])
    cell_x = float(header["cella"][0])
    if mx > 0 and cell_x > 0 and np.isfinite(cell_x):
        return cell_x / mx
    return None


class MRCStack:
    """A lazily read stack of square 2D images.

    Attributes:
        path: the file.
        n_images, box: number of images and their edge length in pixels.
        pixel_size: Angstrom per pixel from the header, or ``None``.
        mode: the MRC mode of the stored values (0, 1, 2, 6 or 12).
        dtype: their numpy dtype, byte order included.
        origin: the header's ORIGIN field ``(x, y, z)`` in Angstrom.

    A 2D ``.mrc`` with one section is a stack of one image.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, order = read_header(self.path)
        self.mode = int(header["mode"])
        self.dtype = _dtype_for(header, self.path, order)
        nx, ny, nz = int(header["nx"]), int(header["ny"]), int(header["nz"])
        if nx != ny:
            raise InputFileError(f"images are {nx}x{ny} pixels; particle images must be square", self.path, "re-extract the particles with a square box")
        if nz < 1:
            raise InputFileError("holds no images (NZ = 0)", self.path)
        self.n_images, self.box = nz, nx
        self.pixel_size = header_pixel_size(header)
        self.origin = tuple(float(v) for v in header["origin"])
        self.data_offset = HEADER_BYTES + max(int(header["nsymbt"]), 0)
        self.image_bytes = nx * ny * self.dtype.itemsize
        expected = self.data_offset + self.n_images * self.image_bytes
        actual = self.path.stat().st_size
        if actual < expected:
            raise InputFileError(
                f"truncated: the header promises {self.n_images} images of {nx}x{ny} (mode {int(header['mode'])}, "
                f"{expected} bytes) but the file has {actual} bytes",
                self.path,
                "copy or re-extract the stack again",
            )
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def __len__(self) -> int:
        return self.n_images

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_images, self.box, self.box)

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = pid
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_fd_pid"] = None
        return state

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images ``start .. stop-1`` (0-based) in one contiguous read.

        Returns:
            ``(stop - start, box, box)`` float32 array.
        """
        if not 0 <= start <= stop <= self.n_images:
            raise IndexError(f"{self.path}: images {start}..{stop - 1} requested, stack has {self.n_images}")
        count = stop - start
        nbytes = count * self.image_bytes
        offset = self.data_offset + start * self.image_bytes
        # read straight into the array returned: a native float32 stack needs no second copy
        images = np.empty((count, self.box, self.box), dtype=self.dtype)
        view = memoryview(images.reshape(-1).view(np.uint8))
        fd = self._descriptor()
        got = 0
        while got < nbytes:
            chunk = os.preadv(fd, [view[got:]], offset + got)
            if chunk == 0:
                raise InputFileError("ended early while reading images", self.path, "the file may have been truncated while in use")
            got += chunk
        return images if images.dtype == np.float32 else images.astype(np.float32)

    def read_indices(self, indices) -> np.ndarray:
        """Images at arbitrary 0-based ``indices`` (any order), grouping contiguous runs.

        Returns:
            ``(len(indices), box, box)`` float32 array in the order given.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        if len(indices) == 0:
            return out
        if indices.min() < 0 or indices.max() >= self.n_images:
            raise IndexError(f"{self.path}: index out of range for a stack of {self.n_images} images")
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        for run in np.split(np.arange(len(sorted_idx)), breaks):
            lo, hi = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
            if hi - lo == len(run):
                out[order[run]] = self.read(lo, hi)
            else:  # repeated indices inside the run
                block = self.read(lo, hi)
                out[order[run]] = block[sorted_idx[run] - lo]
        return out

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self.n_images
        return self.read(index, index + 1)[0]


def read_map(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Read a whole 3D map (density) into memory.

    Returns:
        ``(volume (nz, ny, nx) float32 indexed [z, y, x], voxel_size or None)``.
    """
    path = Path(path)
    header, order = read_header(path)
    dtype = _dtype_for(header, path, order)
    nx, ny, nz = int(header["nx"]), int(header["ny"]), int(header["nz"])
    offset = HEADER_BYTES + max(int(header["nsymbt"]), 0)
    expected = offset + nx * ny * nz * dtype.itemsize
    if path.stat().st_size < expected:
        raise InputFileError(f"truncated: the header promises a {nx}x{ny}x{nz} map but the file is shorter", path, "download or copy the map again")
    data = np.fromfile(path, dtype=dtype, count=nx * ny * nz, offset=offset).reshape(nz, ny, nx).astype(np.float32)
    # Put the axes in (z, y, x) order when the header stores them permuted.
    axes = (int(header["mapc"]), int(header["mapr"]), int(header["maps"]))
    if sorted(axes) == [1, 2, 3] and axes != (1, 2, 3):
        # data is indexed [section, row, col] = [maps, mapr, mapc]; reorder to [3, 2, 1]
        stored = [axes[2], axes[1], axes[0]]
        data = np.transpose(data, [stored.index(3), stored.index(2), stored.index(1)])
    return np.ascontiguousarray(data), header_pixel_size(header)


def _build_header(nx: int, ny: int, nz: int, pixel_size: float | None, is_stack: bool, mode: int = 2) -> np.ndarray:
    """A little-endian MRC2014 header (one record) for ``nx x ny x nz`` values of ``mode``;
    ``pixel_size`` in Angstrom (1.0 when unknown), origin 0; statistics left 0."""
    header = np.zeros(1, dtype=HEADER_DTYPE_LE)
    h = header[0]
    h["nx"], h["ny"], h["nz"], h["mode"] = nx, ny, nz, mode
    h["mx"], h["my"] = nx, ny
    h["mz"] = 1 if is_stack else nz
    apix = float(pixel_size) if pixel_size else 1.0
    h["cella"] = (nx * apix, ny * apix, (1 if is_stack else nz) * apix)
    h["cellb"] = (90.0, 90.0, 90.0)
    h["mapc"], h["mapr"], h["maps"] = 1, 2, 3
    h["ispg"] = 0 if is_stack else 1  # 0 = stack of 2D images (MRC2014)
    h["exttyp"] = b"MRCO"
    h["nversion"] = 20140
    h["map"] = b"MAP "
    h["machst"] = (0x44, 0x44, 0, 0)
    h["nlabl"] = 1
    labels = np.zeros(10, dtype="S80")
    labels[0] = b"particle-vae"
    h["label"] = labels
    return header


def _set_statistics(header: np.ndarray, low: float, high: float, total: float, total_sq: float, count: int) -> None:
    """Fill DMIN, DMAX, DMEAN and RMS (population standard deviation) from running sums over ``count`` values."""
    mean = total / count
    h = header[0]
    h["dmin"], h["dmax"], h["dmean"] = low, high, mean
    h["rms"] = np.sqrt(max(total_sq / count - mean ** 2, 0.0))


def _pwrite_all(fd: int, data: bytes | np.ndarray, offset: int) -> None:
    """Write all of ``data`` (bytes, or a C-contiguous array's raw bytes) at byte ``offset`` of ``fd``."""
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class StackWriter:
    """Write images into a new MRC image stack (ISPG 0), atomically.

    Use as a context manager; the file appears under its final name only when
    the block exits without error, with its header (size, pixel size, minimum,
    maximum, mean and RMS of the values written) filled in then::

        with StackWriter("out.mrcs", box=64, pixel_size=2.0) as writer:
            writer.write(batch)   # (B, 64, 64), appended

    Args:
        path: the ``.mrcs`` to write.
        box: image edge length in pixels.
        pixel_size: Angstrom per pixel (``None``: 1.0 is written, meaning unknown).
        overwrite: allow replacing an existing file that is not in ``inputs``.
        inputs: paths that must never be overwritten.
        mode: MRC mode of the stored values, 2 (float32) or 12 (float16).
        n_images: when given, the file is sized for that many images up front
            and :meth:`write_at` can fill them in any order; exactly that many
            must have been written when the block exits.
        durable: flush the file to the disk (``fsync``) before it is renamed into place.
    """

    def __init__(self, path: str | Path, box: int, pixel_size: float | None, overwrite: bool = False, inputs: tuple = (),
                 mode: int = 2, n_images: int | None = None, durable: bool = False):
        if mode not in WRITE_MODES:
            raise ValueError(f"MRC mode {mode} cannot be written; use one of {WRITE_MODES}")
        self.path = check_output_path(path, overwrite=overwrite, inputs=inputs)
        self.box = int(box)
        self.pixel_size = pixel_size
        self.mode = mode
        self.dtype = np.dtype(MODE_DTYPES[mode]).newbyteorder("<")
        self.image_bytes = self.box * self.box * self.dtype.itemsize
        self.n_images = None if n_images is None else int(n_images)
        self._written = None if n_images is None else np.zeros(self.n_images, dtype=bool)  # images write_at filled
        self.durable = durable
        self.count = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self._min = np.inf
        self._max = -np.inf
        self._ctx = None
        self._handle = None

    def __enter__(self) -> "StackWriter":
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._handle = open(tmp, "wb")
            self._handle.write(b"\0" * HEADER_BYTES)
            if self.n_images is not None:
                self._handle.truncate(HEADER_BYTES + self.n_images * self.image_bytes)
        except BaseException as error:
            if self._handle is not None:
                self._handle.close()
            self._ctx.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def _stored(self, images: np.ndarray) -> np.ndarray:
        """``images`` as the stored dtype, ``(B, box, box)``, checked to be finite after the conversion."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ValueError(f"expected images of {self.box}x{self.box}, got {images.shape[1:]}")
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf and are refused below
            stored = np.ascontiguousarray(images, dtype=self.dtype)
        if not np.isfinite(stored).all():
            raise ValueError(f"{self.path}: refusing to write non-finite pixel values"
                             + (" (values beyond the float16 range?)" if self.mode == 12 else ""))
        as64 = stored.astype(np.float64)
        self._sum += float(as64.sum())
        self._sumsq += float((as64 ** 2).sum())
        if stored.size:
            self._min = min(self._min, float(stored.min()))
            self._max = max(self._max, float(stored.max()))
        self.count += stored.shape[0]
        return stored

    def write(self, images: np.ndarray) -> None:
        """Append ``(B, box, box)`` (or one ``(box, box)``) images, converted to the stack's dtype.

        Raises:
            ValueError: wrong image size, or values that are not finite once converted.
        """
        if self.n_images is not None:
            raise ValueError("a StackWriter sized with n_images is filled with write_at")
        self._handle.write(self._stored(images).tobytes())

    def write_at(self, index: int, images: np.ndarray) -> None:
        """Write ``(B, box, box)`` images as images ``index .. index + B - 1`` (0-based) of a
        writer sized with ``n_images``, in any order.

        Raises:
            ValueError: no ``n_images``, images beyond it, a wrong size or non-finite values.
        """
        if self.n_images is None:
            raise ValueError("write_at needs a StackWriter sized with n_images")
        count = 1 if np.ndim(images) == 2 else len(images)
        if not 0 <= index <= index + count <= self.n_images:
            raise ValueError(f"{self.path}: images {index}..{index + count - 1} requested, the stack holds {self.n_images}")
        if self._written[index:index + count].any():  # the header statistics count every image once
            raise ValueError(f"{self.path}: image {index + int(np.argmax(self._written[index:index + count]))} written twice")
        stored = self._stored(images)
        self._written[index:index + count] = True
        self._handle.flush()  # positional writes go around the buffer
        _pwrite_all(self._handle.fileno(), stored, HEADER_BYTES + int(index) * self.image_bytes)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if self.count == 0:
                    raise ValueError(f"{self.path}: no images were written")
                if self.n_images is not None and not self._written.all():
                    raise OutputFileError(f"wrote {int(self._written.sum())} of {self.n_images} images", self.path, "run again")
                header = _build_header(self.box, self.box, self.count, self.pixel_size, is_stack=True, mode=self.mode)
                _set_statistics(header, self._min, self._max, self._sum, self._sumsq, self.count * self.box * self.box)
                self._handle.flush()  # the buffered images first, then the header over the placeholder
                _pwrite_all(self._handle.fileno(), header, 0)
                if self.durable:
                    self._handle.flush()
                    os.fsync(self._handle.fileno())
            self._handle.close()
        except BaseException as error:
            self._handle.close()
            self._ctx.__exit__(type(error), error, error.__traceback__)
            raise
        return self._ctx.__exit__(exc_type, exc, tb)


def write_stack(path: str | Path, images: np.ndarray, pixel_size: float | None, overwrite: bool = False, inputs: tuple = (),
                mode: int = 2) -> Path:
    """Write ``(N, box, box)`` images as an MRC image stack (ISPG 0), atomically.

    Args:
        pixel_size: Angstrom per pixel (``None``: 1.0 is written, meaning unknown).
        mode: 2 (float32) or 12 (float16).
    Returns:
        The path written.
    """
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    with StackWriter(path, images.shape[-1], pixel_size, overwrite=overwrite, inputs=inputs, mode=mode) as writer:
        writer.write(images)
    return writer.path


def write_map(path: str | Path, volume: np.ndarray, voxel_size: float | None, overwrite: bool = False) -> Path:
    """Write a ``(nz, ny, nx)`` volume indexed ``[z, y, x]`` as a float32 MRC map, atomically.

    Args:
        voxel_size: Angstrom per voxel (``None``: 1.0 is written, meaning unknown).
    Returns:
        The path written.
    """
    volume = np.asarray(volume, dtype="<f4")
    nz, ny, nx = volume.shape
    path = check_output_path(path, overwrite=overwrite)
    header = _build_header(nx, ny, nz, voxel_size, is_stack=False)
    as64 = volume.astype(np.float64)
    _set_statistics(header, float(volume.min()), float(volume.max()), float(as64.sum()), float((as64 ** 2).sum()), volume.size)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(header.tobytes())
            handle.write(np.ascontiguousarray(volume).tobytes())
    return path
