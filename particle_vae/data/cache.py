"""A preprocessed copy of a particle source in one contiguous file, for repeated epochs.

Reading a large input for every epoch repeats work: many stack files, any MRC
mode converted to float32, and the preprocessing (Fourier crop, normalisation,
mask) run again on every image. :func:`ensure_cache` does that once, writing
the preprocessed images, in input order, to a single MRC stack of float16
(mode 12) or float32 (mode 2) values, with a JSON sidecar (``<cache>.json``)
that records where they came from:

* ``fingerprint``: a SHA-256 over the input file and every stack (resolved
  path, size, modification time), the particle index arrays, the
  preprocessing settings and the cache dtype;
* ``n_particles``, ``box`` and ``pixel_size`` of the cached (output) images,
  ``dtype``, the preprocessing steps in words, and the cache file's own size
  and modification time.

The cache is reused when the sidecar's fingerprint and the file's size and
time match; otherwise it is rebuilt: written to a temporary file beside it and
renamed into place (the old sidecar is removed first, so a crash never leaves
a sidecar that vouches for the wrong file). A path that exists without a
sidecar, or that is one of the inputs, is never overwritten.

The cache is an ordinary MRC stack, so the dataset over it is a
:class:`~particle_vae.data.particles.ParticleDataset` without a transform, read
with the same contiguous-run reads and chunk-shuffle sampler; particle ``i`` of
the input is image ``i`` of the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from particle_vae.data.particles import ParticleDataset
from particle_vae.data.preprocess import Preprocessing
from particle_vae.data.sampling import make_loader
from particle_vae.data.sources import ParticleSource, open_source
from particle_vae.errors import InputFileError, OutputFileError
from particle_vae.io.atomic import atomic_write_text
from particle_vae.io.mrc import MRCStack, StackWriter

log = logging.getLogger(__name__)

#: bump when the file layout or the fingerprint recipe changes
CACHE_FORMAT = 1
#: cache dtype name -> (numpy dtype, MRC mode)
CACHE_DTYPES = {"float16": (np.dtype("<f2"), 12), "float32": (np.dtype("<f4"), 2)}


def sidecar_path(cache_path: str | Path) -> Path:
    """The JSON sidecar of a cache file: ``<cache>.json``."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".json")


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def source_fingerprint(source: ParticleSource, preprocessing: dict, dtype: str) -> str:
    """SHA-256 (hex) identifying ``source`` as preprocessed by ``preprocessing`` into ``dtype``.

    Covers the input file (STAR, list or stack), every stack (path, size,
    modification time), the ``(N,)`` stack and image index arrays, the
    preprocessing settings and the dtype; any change gives another value.
    """
    digest = hashlib.sha256()
    recipe = {
        "format": CACHE_FORMAT, "dtype": dtype, "preprocessing": preprocessing,
        "input": _file_stamp(Path(source.path)), "stacks": [_file_stamp(Path(p)) for p in source.stack_paths],
        "box": source.box, "pixel_size": source.pixel_size,
    }
    digest.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(source.stack_index, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(source.image_index, dtype="<i8").tobytes())
    return digest.hexdigest()


@dataclass
class CacheInfo:
    """A ready cache.

    Attributes:
        path: the cache stack; sidecar: its JSON description.
        n_particles, box: images in the cache and their edge length (output box, pixels).
        pixel_size: Angstrom per cached pixel (``None`` if unknown).
        dtype: ``"float16"`` or ``"float32"``.
        built: True when this call wrote it, False when an existing one was reused.
        seconds: time spent building (0 when reused).
    """

    path: Path
    sidecar: Path
    n_particles: int
    box: int
    pixel_size: float | None
    dtype: str
    built: bool
    seconds: float = 0.0


def _valid_sidecar(cache_path: Path, fingerprint: str) -> dict | None:
    """The sidecar's content when it vouches for ``cache_path`` as it is now and matches ``fingerprint``."""
    side = sidecar_path(cache_path)
    if not side.is_file() or not cache_path.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    stat = cache_path.stat()
    if (meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint
            or meta.get("file_size") != stat.st_size or meta.get("file_mtime_ns") != stat.st_mtime_ns):
        return None
    return meta


def _check_cache_path(cache_path: Path, source: ParticleSource) -> None:
    resolved = cache_path.resolve()
    for protected in [Path(source.path), *map(Path, source.stack_paths)]:
        if protected.resolve() == resolved:
            raise OutputFileError("is an input (the particles or one of their stacks) and would be overwritten", cache_path,
                                  "give --cache a new file name, e.g. particles_cache.mrcs")
    if cache_path.exists() and not sidecar_path(cache_path).is_file():
        raise OutputFileError("exists but is not a particle-vae cache (no .json sidecar beside it)", cache_path,
                              "give --cache a new file name or delete the file")
    if cache_path.is_dir():
        raise OutputFileError("is a folder", cache_path, "give --cache a file name, e.g. particles_cache.mrcs")


def ensure_cache(source: ParticleSource, preprocessing: dict, cache_path: str | Path, dtype: str = "float16",
                 batch_size: int = 512, num_workers: int = 0) -> CacheInfo:
    """Reuse or (re)build the preprocessed cache of ``source``.

    Args:
        source: the opened particle source.
        preprocessing: :class:`Preprocessing` fields other than ``box`` and ``pixel_size``.
        cache_path: the cache stack to write (``.mrcs``); the sidecar goes beside it.
        dtype: ``"float16"`` (half the disk and page cache; about 3 significant
            digits, ample for normalised noisy images) or ``"float32"``.
        batch_size, num_workers: how the source is read while building.
    Returns:
        :class:`CacheInfo`.
    Raises:
        OutputFileError: the path is an input, or an existing file that is not a cache.
        InputFileError: preprocessed values too large for float16.
    """
    if dtype not in CACHE_DTYPES:
        raise OutputFileError(f"unknown cache dtype {dtype!r}", cache_path, f"use one of {', '.join(CACHE_DTYPES)}")
    cache_path = Path(cache_path).expanduser()
    prep = Preprocessing(box=source.box, pixel_size=source.pixel_size, **preprocessing)
    fingerprint = source_fingerprint(source, preprocessing, dtype)
    _check_cache_path(cache_path, source)
    meta = _valid_sidecar(cache_path, fingerprint)
    if meta is not None:
        log.info("cache %s matches the input and preprocessing: reusing it (%d particles, %s)", cache_path,
                 meta["n_particles"], dtype)
        return CacheInfo(cache_path, sidecar_path(cache_path), int(meta["n_particles"]), int(meta["box"]),
                         meta["pixel_size"], dtype, built=False)
    start = time.perf_counter()
    np_dtype, mode = CACHE_DTYPES[dtype]
    box, n = prep.output_box, len(source)
    image_bytes = box * box * np_dtype.itemsize
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFileError(f"cannot create its folder ({exc.strerror})", cache_path) from None
    sidecar_path(cache_path).unlink(missing_ok=True)  # never let an old sidecar vouch for a half-replaced file
    log.info("building cache %s: %d particles, %dx%d px %s (%.2f GB)", cache_path, n, box, box, dtype, n * image_bytes / 1e9)
    reader = ParticleDataset(source, transform=prep)
    loader = make_loader(reader, batch_size, shuffle=False, num_workers=num_workers)
    # overwrite=True: _check_cache_path has already refused inputs and files that are not caches
    with StackWriter(cache_path, box, prep.output_pixel_size, overwrite=True, mode=mode, n_images=n, durable=True) as writer:
        for batch in loader:
            images = batch["images"][:, 0].numpy()
            with np.errstate(over="ignore"):
                stored = images.astype(np_dtype)
            if not np.isfinite(stored).all():
                raise InputFileError(f"preprocessed pixel values exceed the {dtype} range (largest magnitude "
                                     f"{float(np.abs(images).max()):.3g})", source.path,
                                     "normalise the images (--normalize) or use --cache-dtype float32")
            writer.write_at(int(batch["index"][0]), stored)
    stat = cache_path.stat()
    meta = {
        "format": CACHE_FORMAT, "fingerprint": fingerprint, "source": str(Path(source.path).resolve()),
        "n_particles": n, "box": box, "pixel_size": prep.output_pixel_size, "dtype": dtype,
        "preprocessing": preprocessing, "steps": prep.describe(), "file_size": stat.st_size, "file_mtime_ns": stat.st_mtime_ns,
    }
    atomic_write_text(sidecar_path(cache_path), json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - start
    log.info("cache %s written in %.1f s (%.0f particles/s)", cache_path, seconds, n / max(seconds, 1e-9))
    return CacheInfo(cache_path, sidecar_path(cache_path), n, box, prep.output_pixel_size, dtype, built=True, seconds=seconds)


def open_cache(info: CacheInfo, max_open_stacks: int = 1) -> ParticleDataset:
    """The dataset over a cache: ``{"images": (B, 1, box, box) float32, "index": (B,)}``,
    index ``i`` = particle ``i`` of the input, no transform (already preprocessed)."""
    stack = MRCStack(info.path)
    if stack.n_images != info.n_particles or stack.box != info.box:
        raise InputFileError(f"holds {stack.n_images} images of {stack.box} px, its sidecar says {info.n_particles} of {info.box} px",
                             info.path, "delete the cache and its .json so that it is rebuilt")
    source = open_source(info.path, pixel_size=info.pixel_size)
    return ParticleDataset(source, max_open_stacks=max_open_stacks)
