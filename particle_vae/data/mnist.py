"""MNIST from local IDX files, checked against the canonical MD5 sums.

The four files of LeCun's MNIST (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``) are read from a folder, gzip-compressed (``.gz``)
or raw. The MD5 of the *decompressed* bytes is compared with the published sum,
so a re-compressed copy is accepted and a corrupt or different file is refused.

The IDX format: two zero bytes, a type byte (``0x08`` = unsigned byte), the
number of dimensions, then one big-endian int32 per dimension and the data in
row-major order.

No network access happens unless :func:`download_mnist` is called.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from particle_vae.errors import InputFileError, ParticleVAEError
from particle_vae.io.atomic import atomic_path
from particle_vae.io.paths import DATA_ENV, data_root

__all__ = [
    "MNIST_FILES",
    "MNIST_MD5",
    "SPLIT_SIZES",
    "DEFAULT_BASE_URL",
    "find_mnist_file",
    "read_idx",
    "resolve_mnist_dir",
    "load_mnist",
    "download_mnist",
]

Split = Literal["train", "test"]

#: split -> (images file, labels file), names without ``.gz``.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: MD5 of the decompressed bytes of each file.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Number of digits in each split.
SPLIT_SIZES: dict[str, int] = {"train": 60000, "test": 10000}

#: A public mirror of the gzip files (the original site often refuses scripts).
DEFAULT_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_WHERE_FIX = (
    f"pass --mnist-dir with the folder holding the four MNIST IDX files (.gz or raw), "
    f"or set {DATA_ENV} to a folder containing mnist/"
)


def _check_split(split: str) -> None:
    if split not in MNIST_FILES:
        raise ParticleVAEError(f"unknown MNIST split '{split}'", None, "use 'train' or 'test'")


def find_mnist_file(root: str | Path, name: str) -> Path:
    """Locate one MNIST file in ``root`` (or ``root/mnist``), compressed or not.

    Args:
        root: folder holding the files, or a data root with an ``mnist/`` folder.
        name: file name without ``.gz``, e.g. ``"t10k-images-idx3-ubyte"``.
    Returns:
        The path of ``name.gz`` or ``name`` (the ``.gz`` is preferred).
    Raises:
        InputFileError: neither exists; the message names the expected file.
    """
    root = Path(root).expanduser()
    for folder in (root, root / "mnist"):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    raise InputFileError(f"MNIST file {name}.gz (or {name}) not found", root / f"{name}.gz", _WHERE_FIX)


def _decompressed_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        if gzipped or path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise InputFileError("file not found", path, _WHERE_FIX) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputFileError(f"not a valid gzip file ({exc})", path, "copy the file again from an MNIST mirror") from None
    except OSError as exc:
        raise InputFileError(f"cannot be read ({exc.strerror or exc})", path, "check the file's permissions") from None


def _parse_idx(raw: bytes, path: Path, expected_ndim: int | None = None, expected_shape: tuple | None = None) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        magic = raw[:4].hex() if raw else "(empty)"
        raise InputFileError(f"not an IDX file (magic bytes {magic})", path, "give the original MNIST IDX files")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise InputFileError(f"IDX file has {ndim} dimensions, expected {expected_ndim}", path, "images and labels files may be swapped")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputFileError("IDX header is truncated", path, "copy the file again from an MNIST mirror")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if expected_shape is not None and any(e is not None and e != s for e, s in zip(expected_shape, shape)):
        raise InputFileError(f"IDX dimensions are {shape}, expected {expected_shape}", path, "give the original MNIST IDX files")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = count * dtype.itemsize
    if len(raw) != header + nbytes:
        raise InputFileError(
            f"IDX header promises {shape} ({nbytes} data bytes) but the file holds {len(raw) - header}",
            path,
            "copy the file again from an MNIST mirror",
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path, md5: str | None = None, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array.

    Args:
        path: the file; gzip-compressed when it starts with the gzip magic bytes
            or is named ``*.gz``.
        md5: expected MD5 hex digest of the decompressed bytes (``None``: no check).
        expected_ndim: number of dimensions the file must have.
    Returns:
        Array of the stored dtype (uint8 for MNIST) and shape (e.g. ``(N, 28, 28)``
        for images, ``(N,)`` for labels), in native byte order.
    Raises:
        InputFileError: missing, unreadable, bad gzip, MD5 mismatch, bad magic
            number or a size that disagrees with the header.
    """
    path = Path(path)
    raw = _decompressed_bytes(path)
    if md5 is not None:
        actual = hashlib.md5(raw).hexdigest()
        if actual != md5.lower():
            raise InputFileError(
                f"MD5 of the decompressed data is {actual}, expected {md5} (corrupt or not the original MNIST file)",
                path,
                "copy the file again from an MNIST mirror",
            )
    return _parse_idx(raw, path, expected_ndim)


def resolve_mnist_dir(mnist_dir: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """The folder to read MNIST from.

    Args:
        mnist_dir: explicit folder with the IDX files (``--mnist-dir``); wins.
        data_dir: reference-data root (``--data-dir``); otherwise ``$PARTICLE_VAE_DATA``.
            MNIST is then expected in its ``mnist/`` subfolder.
    Returns:
        The folder (its content is checked later by :func:`load_mnist`).
    Raises:
        InputFileError: nothing given, or the given folder does not exist.
    """
    if mnist_dir is not None:
        folder = Path(mnist_dir).expanduser()
        if not folder.is_dir():
            raise InputFileError("MNIST folder not found", folder, _WHERE_FIX)
        return folder
    root = data_root(data_dir, required=False)
    if root is None:
        raise InputFileError("no MNIST folder given", None, _WHERE_FIX)
    return root / "mnist"


def load_mnist(root: str | Path, split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load one MNIST split from local IDX files, verifying their MD5 sums.

    Args:
        root: folder with the files (or a data root with an ``mnist/`` folder).
        split: ``"train"`` (60,000 digits) or ``"test"`` (10,000, the ``t10k`` files).
    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` in 0..255 (ink bright, row-major,
        row 0 at the top) and int64 ``(N,)`` in 0..9.
    Raises:
        InputFileError: missing file (says to pass --mnist-dir or set
            PARTICLE_VAE_DATA), MD5 mismatch, or malformed IDX content; the
            message names the file.
    """
    _check_split(split)
    image_name, label_name = MNIST_FILES[split]
    image_path = find_mnist_file(root, image_name)
    label_path = find_mnist_file(root, label_name)
    images = read_idx(image_path, MNIST_MD5[image_name], expected_ndim=3)
    labels = read_idx(label_path, MNIST_MD5[label_name], expected_ndim=1)
    # With the MD5 verified these hold by construction; they guard the format logic.
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise InputFileError(f"expected uint8 28x28 images, got {images.dtype} {images.shape[1:]}", image_path)
    if labels.shape[0] != images.shape[0]:
        raise InputFileError(f"has {labels.shape[0]} labels for {images.shape[0]} images", label_path)
    return images, labels.astype(np.int64)


def _verified(path: Path, name: str) -> bool:
    try:
        read_idx(path, MNIST_MD5[name])
    except InputFileError:
        return False
    return True


def download_mnist(
    root: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    timeout: float = 60.0,
    overwrite: bool = False,
) -> Path:
    """Fetch the four MNIST ``.gz`` files into ``root`` and verify them.

    Only for a machine with internet access; everything else reads local
    files. A file already present and matching its MD5 is kept. Each download
    goes to a temporary file that is renamed into place only after its
    decompressed MD5 matches.

    Args:
        root: destination folder (created if needed).
        base_url: folder URL holding ``<name>.gz`` (``https://``, ``http://`` or ``file://``).
        timeout: seconds to wait for the server per request.
        overwrite: replace a present file that fails the MD5 check.
    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    Raises:
        InputFileError: the download failed (one line: copy the files manually),
            the downloaded data fails the MD5 check, or a present file is
            corrupt and ``overwrite`` is false.
    """
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(f"cannot create the folder ({exc.strerror})", root) from None
    manual = f"copy the four MNIST .gz files into {root} by hand and pass --mnist-dir {root}"
    for name in MNIST_MD5:
        target = root / f"{name}.gz"
        if target.exists():
            if _verified(target, name):
                continue
            if not overwrite:
                raise InputFileError("exists but fails the MD5 check", target, "delete it or download with overwrite=True")
        url = base_url.rstrip("/") + f"/{name}.gz"
        with atomic_path(target) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as handle:
                    shutil.copyfileobj(response, handle)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise InputFileError(f"download of MNIST failed ({reason})", url, manual) from None
            try:
                read_idx(tmp, MNIST_MD5[name])
            except InputFileError:
                raise InputFileError("downloaded data fails the MD5/IDX check (not the original MNIST file)", url, manual) from None
    return root
