"""The transformed-MNIST benchmarks of the papers, generated with exact ground truth.

Four sets, each made from the MNIST train (60,000) or test (10,000) split, one
transformed image per source digit, in MNIST order:

``mnist-n`` / ``mnist-u`` -- TARGET-VAE (Nasiri & Bepler), MNIST(N) and MNIST(U)
    Each 28x28 digit is pasted on a 50x50 canvas with its centre pixel (14, 14)
    on the canvas centre (25, 25), i.e. ``box // 2`` on both. The object is
    rotated by ``alpha ~ N(0, (pi/4)^2)`` (MNIST(N)) or ``alpha ~ U(0, 2 pi)``
    (MNIST(U)) about the centre and moved by ``d ~ N(0, 5^2)`` pixels per axis.
``so2`` / ``se2`` -- MCE-VAE (Bajaj, Roy, Zhang), SO(2)- and SE(2)-MNIST
    28x28 images; ``alpha ~ U(-90, 90)`` degrees; SE(2) also moves the digit by
    ``d ~ U(-7, 7)`` pixels per axis (25 % of the 28-pixel width); SO(2) does
    not translate.

Ground truth is stored as the *object pose* of :mod:`particle_vae.conventions`:
``obs(x) = digit(R(-alpha) (x - d))`` with ``x = col - box // 2``,
``y = row - box // 2`` -- the digit turned counter-clockwise (in x, y) by ``alpha``
radians and its centre moved to ``d`` pixels. Images are rendered with
:func:`particle_vae.conventions.move_objects` (bilinear, zero outside the box)
and clipped to [0, 1].

Poses are drawn with ``numpy.random.default_rng`` from a seed sequence keyed by
``(seed, kind, split)``: train and test use separate streams, so each split is
reproducible on its own and independent of the other; rotation and translation
use separate child streams, so the first ``n`` poses of a split do not depend
on ``n``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from particle_vae.conventions import box_centre, move_objects, object_pose_to_model, object_pose_to_relion
from particle_vae.data.mnist import MNIST_FILES, SPLIT_SIZES, load_mnist
from particle_vae.errors import ParticleVAEError
from particle_vae.io.atomic import atomic_write_text, check_output_path
from particle_vae.io.mrc import StackWriter
from particle_vae.io.paths import project_folder, stack_name_for_project
from particle_vae.io.star import image_name, make_particle_star

__all__ = [
    "BenchmarkSpec",
    "BENCHMARKS",
    "TRUTH_COLUMNS",
    "TransformedSet",
    "BenchmarkFiles",
    "benchmark_paths",
    "get_spec",
    "pose_generators",
    "sample_poses",
    "place_on_canvas",
    "render_digits",
    "transform_digits",
    "make_benchmark",
    "write_benchmark",
]

MNIST_BOX = 28

#: STAR column -> what it holds (written by :func:`write_benchmark`).
TRUTH_COLUMNS: dict[str, str] = {
    "pvaeTrueLabel": "digit class 0-9 of the source MNIST image",
    "pvaeTrueAlphaDeg": "object rotation alpha in degrees, counter-clockwise in (x, y) = (col, row), as sampled (not wrapped)",
    "pvaeTrueShiftXPx": "object displacement d along x (columns) in pixels",
    "pvaeTrueShiftYPx": "object displacement d along y (rows) in pixels",
    "pvaeTrueAnglePsi": "the same truth as RELION rlnAnglePsi in degrees (psi = -alpha, wrapped to (-180, 180])",
    "pvaeTrueOriginXAngst": "the same truth as RELION rlnOriginXAngst (-d_x times the pixel size)",
    "pvaeTrueOriginYAngst": "the same truth as RELION rlnOriginYAngst (-d_y times the pixel size)",
    "pvaeSourceIndex": "0-based index of the source digit in the MNIST split",
}

_KIND_CODES = {"mnist-n": 1, "mnist-u": 2, "so2": 3, "se2": 4}
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark set is made.

    Attributes:
        kind: ``"mnist-n"``, ``"mnist-u"``, ``"so2"`` or ``"se2"``.
        title: the name used in the paper.
        paper: the paper that defines it.
        box: image edge in pixels (50 or 28).
        rotation: ``"normal"`` (params mean, std) or ``"uniform"`` (params low, high).
        rotation_params: the two parameters in radians.
        translation: ``"normal"`` (param std), ``"uniform"`` (param half-width,
            i.e. ``U(-p, p)``) or ``"none"``, per axis.
        translation_param: that parameter in pixels (0 for ``"none"``).
    """

    kind: str
    title: str
    paper: str
    box: int
    rotation: str
    rotation_params: tuple[float, float]
    translation: str
    translation_param: float

    def sample(self, rot_rng: np.random.Generator, shift_rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` object poses.

        Returns:
            ``(alpha (n,) radians, d (n, 2) pixels (x, y))`` float64 arrays.
        """
        a, b = self.rotation_params
        if self.rotation == "normal":
            alpha = a + b * rot_rng.standard_normal(n)
        elif self.rotation == "uniform":
            alpha = rot_rng.uniform(a, b, n)
        else:  # pragma: no cover - specs are fixed below
            raise ValueError(f"unknown rotation distribution {self.rotation}")
        p = self.translation_param
        if self.translation == "normal":
            d = p * shift_rng.standard_normal((n, 2))
        elif self.translation == "uniform":
            d = shift_rng.uniform(-p, p, (n, 2))
        elif self.translation == "none":
            d = np.zeros((n, 2))
        else:  # pragma: no cover
            raise ValueError(f"unknown translation distribution {self.translation}")
        return alpha.astype(np.float64), d.astype(np.float64)

    def describe(self) -> dict:
        """The distributions as a JSON-ready dict (radians, degrees and pixels spelled out)."""
        a, b = self.rotation_params
        if self.rotation == "normal":
            rotation = {"distribution": "normal", "mean_rad": a, "std_rad": b,
                        "mean_deg": math.degrees(a), "std_deg": math.degrees(b)}
        else:
            rotation = {"distribution": "uniform", "low_rad": a, "high_rad": b,
                        "low_deg": math.degrees(a), "high_deg": math.degrees(b)}
        p = self.translation_param
        if self.translation == "normal":
            translation = {"distribution": "normal", "per_axis": True, "mean_px": 0.0, "std_px": p}
        elif self.translation == "uniform":
            translation = {"distribution": "uniform", "per_axis": True, "low_px": -p, "high_px": p}
        else:
            translation = {"distribution": "none"}
        return {"rotation": rotation, "translation": translation}


_TARGET = ("Nasiri & Bepler, Unsupervised object representation learning using translation and rotation "
           "group equivariant VAE (TARGET-VAE), NeurIPS 2022")
_MCE = ("Bajaj, Roy & Zhang, Invariance-based multi-clustering of latent space embeddings for equivariant "
        "learning (MCE-VAE), arXiv:2107.11717, 2021")

BENCHMARKS: dict[str, BenchmarkSpec] = {
    "mnist-n": BenchmarkSpec("mnist-n", "MNIST(N)", _TARGET, 50, "normal", (0.0, math.pi / 4), "normal", 5.0),
    "mnist-u": BenchmarkSpec("mnist-u", "MNIST(U)", _TARGET, 50, "uniform", (0.0, 2 * math.pi), "normal", 5.0),
    "so2": BenchmarkSpec("so2", "SO(2)-MNIST", _MCE, MNIST_BOX, "uniform", (-math.pi / 2, math.pi / 2), "none", 0.0),
    "se2": BenchmarkSpec("se2", "SE(2)-MNIST", _MCE, MNIST_BOX, "uniform", (-math.pi / 2, math.pi / 2), "uniform", 0.25 * MNIST_BOX),
}


def get_spec(kind: str) -> BenchmarkSpec:
    """The :class:`BenchmarkSpec` of ``kind``; a one-line error for an unknown name."""
    try:
        return BENCHMARKS[kind]
    except KeyError:
        raise ParticleVAEError(f"unknown benchmark '{kind}'", None, f"choose one of {', '.join(BENCHMARKS)}") from None


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODES:
        raise ParticleVAEError(f"unknown split '{split}'", None, "use 'train' or 'test'")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParticleVAEError(f"seed must be a non-negative integer, got {seed!r}", None,
                               "pass --seed 0 or another integer >= 0")
    return int(seed)


def pose_generators(kind: str, split: str, seed: int = 0) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent random streams for the rotations and the translations of one set.

    The seed sequence is keyed by ``(seed, kind, split)``, so train and test
    (and the four kinds) never share draws.

    Returns:
        ``(rotation_rng, translation_rng)``.
    """
    get_spec(kind)
    _check_split(split)
    root = np.random.SeedSequence([_check_seed(seed), _KIND_CODES[kind], _SPLIT_CODES[split]])
    rot, shift = root.spawn(2)
    return np.random.default_rng(rot), np.random.default_rng(shift)


def _check_n(n: int | None, available: int, split: str) -> int:
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= available:
        raise ParticleVAEError(f"n = {n} is out of range for the {split} split of {available} digits", None,
                               f"choose 1 <= n <= {available}")
    return int(n)


def sample_poses(kind: str, split: str, seed: int = 0, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The object poses of the first ``n`` images of a benchmark split (no rendering).

    ``sample_poses(k, s, seed, n)`` equals the first ``n`` rows of
    ``sample_poses(k, s, seed)``.

    Args:
        kind: a key of :data:`BENCHMARKS`.
        split: ``"train"`` or ``"test"``.
        seed: non-negative integer.
        n: number of poses; default the full split (60,000 or 10,000).
    Returns:
        ``(alpha (n,) radians, d (n, 2) pixels as (x, y))``, float64.
    """
    spec = get_spec(kind)
    _check_split(split)
    n = _check_n(n, SPLIT_SIZES[split], split)
    rot_rng, shift_rng = pose_generators(kind, split, seed)
    return spec.sample(rot_rng, shift_rng, n)


def place_on_canvas(digits: np.ndarray, box: int) -> np.ndarray:
    """Centre 28x28 digits on a ``box`` x ``box`` zero canvas, scaled to [0, 1].

    The digit's centre pixel (index 14) lands on the canvas centre (``box // 2``).

    Args:
        digits: ``(N, 28, 28)`` uint8 (0..255) or float in [0, 1].
        box: canvas edge in pixels, ``>= 28``.
    Returns:
        ``(N, box, box)`` float32 in [0, 1].
    """
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1:] != (MNIST_BOX, MNIST_BOX):
        raise ValueError(f"expected (N, 28, 28) digits, got shape {digits.shape}")
    if box < MNIST_BOX:
        raise ValueError(f"canvas of {box} pixels is smaller than a 28-pixel digit")
    values = digits.astype(np.float32) / 255.0 if digits.dtype == np.uint8 else digits.astype(np.float32)
    offset = box_centre(box) - box_centre(MNIST_BOX)
    canvas = np.zeros((digits.shape[0], box, box), dtype=np.float32)
    canvas[:, offset:offset + MNIST_BOX, offset:offset + MNIST_BOX] = values
    return canvas


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    # progress=None: show the bar only on an interactive terminal.
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress is None else not progress, leave=False)


def render_digits(
    digits: np.ndarray,
    alpha: np.ndarray,
    displacement: np.ndarray,
    box: int,
    batch_size: int = 4096,
    progress: bool | None = False,
    desc: str = "rendering",
) -> np.ndarray:
    """Place digits on a canvas and move them: ``out(x) = canvas(R(-alpha)(x - d))``.

    Args:
        digits: ``(N, 28, 28)`` uint8 or float in [0, 1].
        alpha: ``(N,)`` object rotations in radians (counter-clockwise in x, y).
        displacement: ``(N, 2)`` object displacements ``(x, y)`` in pixels.
        box: output edge in pixels.
        batch_size: images rendered per call of :func:`~particle_vae.conventions.move_objects`.
        progress: show a tqdm bar (``None``: only on a terminal).
    Returns:
        ``(N, box, box)`` float32 in [0, 1] (bilinear, zero outside, clipped).
    """
    n = len(digits)
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    displacement = np.asarray(displacement, dtype=np.float64).reshape(-1, 2)
    if alpha.shape[0] != n or displacement.shape[0] != n:
        raise ValueError(f"{n} digits but {alpha.shape[0]} rotations and {displacement.shape[0]} displacements")
    out = np.empty((n, box, box), dtype=np.float32)
    with _progress(n, desc, progress) as bar, torch.no_grad():
        for part in _batches(n, batch_size):
            canvas = torch.from_numpy(place_on_canvas(digits[part], box))
            moved = move_objects(canvas, alpha[part], displacement[part], mode="bilinear")
            out[part] = moved.clamp_(0.0, 1.0).numpy()
            bar.update(part.stop - part.start)
    return out


@dataclass
class TransformedSet:
    """A benchmark set: images with their exact ground truth, aligned by index.

    Attributes:
        images: ``(N, H, W)`` float32 in [0, 1].
        labels: ``(N,)`` int64 digit classes.
        alpha: ``(N,)`` float64 object rotations in radians (counter-clockwise in
            (x, y) = (col, row)); as sampled, not wrapped.
        displacement: ``(N, 2)`` float64 object displacements ``(x, y)`` in pixels.
        source_index: ``(N,)`` int64 index of the source digit in the MNIST split.
        kind: key of :data:`BENCHMARKS`; split: ``"train"`` or ``"test"``; seed: the seed used.
    """

    images: np.ndarray
    labels: np.ndarray
    alpha: np.ndarray
    displacement: np.ndarray
    source_index: np.ndarray
    kind: str
    split: str
    seed: int

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be (N, box, box), got {self.images.shape}")
        for name, shape in (("labels", (n,)), ("alpha", (n,)), ("displacement", (n, 2)), ("source_index", (n,))):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {np.shape(getattr(self, name))}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def box(self) -> int:
        """Image edge in pixels."""
        return int(self.images.shape[-1])

    @property
    def spec(self) -> BenchmarkSpec:
        """The :class:`BenchmarkSpec` this set was drawn from."""
        return get_spec(self.kind)

    def model_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth as the generator pose of :mod:`particle_vae.conventions`.

        Returns:
            ``(theta (N,) radians, t (N, 2) pixels)`` with ``image(x) = canonical(R(theta) x + t)``.
        """
        return object_pose_to_model(self.alpha, self.displacement)

    def relion_pose(self, pixel_size: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ground truth in RELION's convention.

        Args:
            pixel_size: Angstrom per pixel.
        Returns:
            ``(psi (N,) degrees in (-180, 180], origin_x (N,) Angstrom, origin_y (N,) Angstrom)``.
        """
        return object_pose_to_relion(self.alpha, self.displacement, pixel_size)

    def canonical_images(self, mnist_images: np.ndarray) -> np.ndarray:
        """The untransformed source digits, centred on this set's canvas.

        Args:
            mnist_images: ``(M, 28, 28)`` the MNIST split this set was made from.
        Returns:
            ``(N, box, box)`` float32 in [0, 1].
        """
        return place_on_canvas(np.asarray(mnist_images)[self.source_index], self.box)

    def subset(self, rows) -> "TransformedSet":
        """A copy holding only ``rows`` (0-based indices or a boolean mask)."""
        rows = np.asarray(rows)
        return TransformedSet(
            self.images[rows], self.labels[rows], self.alpha[rows], self.displacement[rows],
            self.source_index[rows], self.kind, self.split, self.seed,
        )

    def metadata(self, pixel_size: float = 1.0) -> dict:
        """What the JSON sidecar of :func:`write_benchmark` records."""
        spec = self.spec
        return {
            "format": "particle-vae benchmark",
            "format_version": 1,
            "kind": self.kind,
            "title": spec.title,
            "paper": spec.paper,
            "split": self.split,
            "seed": int(self.seed),
            "n": len(self),
            "box": self.box,
            "pixel_size_angstrom": float(pixel_size),
            "source": {"dataset": "MNIST", "files": list(MNIST_FILES[self.split]), "digits": "source_index column (0-based)"},
            **spec.describe(),
            "rendering": (
                "digit centre pixel 14 placed on canvas pixel box//2; obs(x) = digit(R(-alpha)(x - d)), "
                "x = col - box//2, y = row - box//2; bilinear interpolation, zero outside, clipped to [0, 1]"
            ),
            "columns": TRUTH_COLUMNS,
        }


def transform_digits(
    kind: str,
    digits: np.ndarray,
    labels: np.ndarray,
    split: str,
    seed: int = 0,
    n: int | None = None,
    progress: bool | None = False,
    batch_size: int = 4096,
) -> TransformedSet:
    """Make a benchmark set from already loaded MNIST digits.

    The ``i``-th image is source digit ``i`` moved by the ``i``-th pose of
    :func:`sample_poses`.

    Args:
        kind: a key of :data:`BENCHMARKS`.
        digits: ``(M, 28, 28)`` uint8, the whole MNIST ``split`` in file order.
        labels: ``(M,)`` its labels.
        split: which MNIST split ``digits`` is (selects the random stream).
        seed: non-negative integer.
        n: keep the first ``n`` digits (default all ``M``).
        progress: tqdm bar while rendering (``None``: only on a terminal).
    Returns:
        A :class:`TransformedSet` of ``n`` images.
    """
    spec = get_spec(kind)
    _check_split(split)
    digits = np.asarray(digits)
    labels = np.asarray(labels)
    if digits.ndim != 3 or digits.shape[1:] != (MNIST_BOX, MNIST_BOX) or labels.shape != (digits.shape[0],):
        raise ValueError(f"expected digits (M, 28, 28) and labels (M,), got {digits.shape} and {labels.shape}")
    n = _check_n(n, len(digits), split)
    rot_rng, shift_rng = pose_generators(kind, split, seed)
    alpha, d = spec.sample(rot_rng, shift_rng, n)
    images = render_digits(digits[:n], alpha, d, spec.box, batch_size=batch_size, progress=progress, desc=f"{kind} {split}")
    return TransformedSet(
        images=images,
        labels=labels[:n].astype(np.int64),
        alpha=alpha,
        displacement=d,
        source_index=np.arange(n, dtype=np.int64),
        kind=kind,
        split=split,
        seed=_check_seed(seed),
    )


def make_benchmark(
    kind: str,
    mnist_root: str | Path,
    split: str = "train",
    seed: int = 0,
    n: int | None = None,
    progress: bool | None = False,
) -> TransformedSet:
    """Load an MNIST split from ``mnist_root`` and make a benchmark set from it.

    Args:
        kind: ``"mnist-n"``, ``"mnist-u"``, ``"so2"`` or ``"se2"``.
        mnist_root: folder with the MNIST IDX files (see :func:`particle_vae.data.mnist.load_mnist`).
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        seed: non-negative integer.
        n: keep the first ``n`` (default the whole split).
        progress: tqdm bar while rendering.
    Returns:
        A :class:`TransformedSet`: images ``(n, 50, 50)`` for mnist-n/u, ``(n, 28, 28)`` for so2/se2.
    Raises:
        InputFileError: MNIST missing or corrupt.
        ParticleVAEError: unknown kind or split, bad seed or n.
    """
    get_spec(kind)
    _check_split(split)
    _check_seed(seed)
    _check_n(n, SPLIT_SIZES[split], split)
    digits, labels = load_mnist(mnist_root, split)
    return transform_digits(kind, digits, labels, split, seed=seed, n=n, progress=progress)


class BenchmarkFiles(NamedTuple):
    """Paths written by :func:`write_benchmark`."""

    stack: Path
    star: Path
    metadata: Path


def benchmark_paths(out_dir: str | Path, name: str) -> BenchmarkFiles:
    """``out_dir/name.mrcs``, ``.star`` and ``.json``; ``name`` must be a plain file name."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ParticleVAEError(f"output name '{name}' must be a plain file name without folders", None, "put the folder in --out")
    out_dir = Path(out_dir)
    return BenchmarkFiles(out_dir / f"{name}.mrcs", out_dir / f"{name}.star", out_dir / f"{name}.json")


def write_benchmark(
    dataset: TransformedSet,
    out_dir: str | Path,
    name: str,
    pixel_size: float = 1.0,
    overwrite: bool = False,
    inputs: tuple = (),
    batch_size: int = 8192,
    project_dir: str | Path | None = None,
) -> BenchmarkFiles:
    """Write a set as ``name.mrcs`` + ``name.star`` (RELION 3.1) + ``name.json``.

    The STAR has one optics group (pixel size ``pixel_size``, image size
    ``box``), ``rlnImageName`` = ``000001@<the stack>``... (the stack named
    relative to ``project_dir``, the folder RELION runs in, default the current
    folder; absolutely when it lies outside, see :mod:`particle_vae.io.paths`) and the ground truth in
    the columns of :data:`TRUTH_COLUMNS`. Every file is written atomically; all
    three are checked before anything is written, so an existing output (without
    ``overwrite``) leaves the folder untouched.

    Args:
        dataset: the set to write.
        out_dir: destination folder (created if needed).
        name: file name stem, e.g. ``"mnist_n_train"``.
        pixel_size: Angstrom per pixel for the MRC header and the STAR.
        overwrite: replace existing outputs.
        inputs: paths that must never be overwritten (e.g. the MNIST files).
        project_dir: see above.
    Returns:
        :class:`BenchmarkFiles` with the three paths.
    Raises:
        OutputFileError: an output exists (without ``overwrite``) or is an input.
    """
    if not (pixel_size > 0 and math.isfinite(pixel_size)):
        raise ParticleVAEError(f"pixel size must be a positive number of Angstrom, got {pixel_size}", None, "pass --pixel-size 1.0")
    files = benchmark_paths(out_dir, name)
    for path in files:
        check_output_path(path, overwrite=overwrite, inputs=inputs)
    box = dataset.box
    with StackWriter(files.stack, box, pixel_size, overwrite=overwrite, inputs=inputs) as writer:
        for part in _batches(len(dataset), batch_size):
            writer.write(dataset.images[part])
    psi, origin_x, origin_y = dataset.relion_pose(pixel_size)
    columns = {
        "pvaeTrueLabel": dataset.labels.astype(np.int64),
        "pvaeTrueAlphaDeg": np.degrees(dataset.alpha),
        "pvaeTrueShiftXPx": dataset.displacement[:, 0],
        "pvaeTrueShiftYPx": dataset.displacement[:, 1],
        "pvaeTrueAnglePsi": psi,
        "pvaeTrueOriginXAngst": origin_x,
        "pvaeTrueOriginYAngst": origin_y,
        "pvaeSourceIndex": dataset.source_index.astype(np.int64),
    }
    stack_name = stack_name_for_project(files.stack, project_folder(project_dir))
    names = [image_name(i, stack_name) for i in range(len(dataset))]
    star = make_particle_star(names, pixel_size=pixel_size, box=box, columns=columns)
    star.write(files.star, overwrite=overwrite)
    meta = dataset.metadata(pixel_size)
    meta["files"] = {"stack": files.stack.name, "star": files.star.name}
    check_output_path(files.metadata, overwrite=overwrite, inputs=inputs)
    atomic_write_text(files.metadata, json.dumps(meta, indent=2) + "\n")
    return files
