"""Aligned class averages, a particle gallery per class, and images drawn by the generator.

Alignment uses the pose written in the STAR (RELION convention, see
:mod:`particle_vae.conventions`; infer's ``pvaeAnglePsi``,
``pvaeOriginX/YAngst`` when present, see :func:`relion_poses`): each particle is centred and turned upright
with :func:`~particle_vae.conventions.undo_relion_pose`, ``c(y) = obs(R(-psi) y - o)``
(the shift as an exact Fourier phase ramp, the rotation by interpolation).
The class average of cluster ``j`` is the pixel-wise mean of the aligned
particles with label ``j``:

    avg_j(y) = (1 / n_j) * sum_{i: label_i = j} c_i(y)

in the units of the images as read (after the run's preprocessing, or
normalised raw particles). Generator images (:func:`decode_centres`,
:func:`latent_traversal`) are ``model.decode(z, theta=0, t=0)``: the model's
centred, upright drawing, in data units.

The generator's frame is only defined up to a shift (a model may draw its
object a few pixels off the box centre at pose zero), so by default the
averages are then centred, as RELION's 2D classification centres its class
averages (:func:`centre_averages`): each average is moved so that the centre
of mass of its positive part sits on pixel ``N // 2``, and the particles'
origins are changed to match (:func:`recentred_origins`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from particle_vae.analysis.metrics import image_centre_of_mass
from particle_vae.conventions import fourier_shift, undo_relion_pose
from particle_vae.data.particles import ParticleDataset
from particle_vae.data.preprocess import Preprocessing
from particle_vae.data.sampling import make_loader
from particle_vae.data.sources import open_source
from particle_vae.engine.data import PreparedData, prepare_data
from particle_vae.errors import InputFileError, ParticleVAEError

log = logging.getLogger(__name__)

PSI = "rlnAnglePsi"
ORIGIN_ANGST = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGIN_PX = ("rlnOriginX", "rlnOriginY")
#: where ``particle-vae infer`` writes its in-plane pose beside a 3D refinement's (same convention and units)
PVAE_PSI = "pvaeAnglePsi"
PVAE_ORIGIN_ANGST = ("pvaeOriginXAngst", "pvaeOriginYAngst")


def pose_psi_column(particles: pd.DataFrame) -> str | None:
    """The column holding the in-plane pose's psi: ``pvaeAnglePsi`` when present (infer's pose
    beside a 3D refinement), else ``rlnAnglePsi``; ``None`` when neither is there."""
    return PVAE_PSI if PVAE_PSI in particles.columns else PSI if PSI in particles.columns else None


def relion_poses(particles: pd.DataFrame, pixel_size: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """In-plane poses of a particle table, in RELION's convention.

    Read from ``pvaeAnglePsi``, ``pvaeOriginXAngst/YAngst`` when the table has
    ``pvaeAnglePsi`` (infer writes its pose there for inputs with 3D angles),
    otherwise from ``rlnAnglePsi`` and the RELION origins.

    Args:
        particles: the STAR's particle block.
        pixel_size: Angstrom per pixel of the STAR's particles; only used to
            convert RELION 3.0 ``rlnOriginX/Y`` (pixels) to Angstrom.
    Returns:
        ``(psi_deg (N,), origin_angst (N, 2))`` float64, or ``None`` when the
        table has neither psi column. Missing origins are taken as zero.
    """
    column = pose_psi_column(particles)
    if column is None:
        return None
    psi = particles[column].to_numpy(dtype=np.float64)
    if column == PVAE_PSI:
        origin = (particles[list(PVAE_ORIGIN_ANGST)].to_numpy(dtype=np.float64)
                  if all(c in particles.columns for c in PVAE_ORIGIN_ANGST) else np.zeros((len(psi), 2)))
    elif all(c in particles.columns for c in ORIGIN_ANGST):
        origin = particles[list(ORIGIN_ANGST)].to_numpy(dtype=np.float64)
    elif all(c in particles.columns for c in ORIGIN_PX) and pixel_size is not None:
        origin = particles[list(ORIGIN_PX)].to_numpy(dtype=np.float64) * float(pixel_size)
    else:
        origin = np.zeros((len(psi), 2))
    if not (np.isfinite(psi).all() and np.isfinite(origin).all()):
        raise ValueError("pose columns contain NaN or Inf values")
    return psi, origin


def particle_images(star_path: str | Path, run_config: dict | None = None, datadir: str | Path | None = None,
                    pixel_size: float | None = None, normalize: str = "background") -> PreparedData:
    """The particles of a STAR, in row order, as the analysis reads them.

    With ``run_config`` (a run's config.json), the run's own data pipeline is
    used (same crop, downsampling and normalisation as in training, so images
    have the model's box); otherwise the raw particles, each normalised with
    ``normalize`` (``"background"``, ``"zscore"``, ``"minmax"`` or ``"none"``;
    see :mod:`particle_vae.data.preprocess`).

    Returns:
        :class:`~particle_vae.engine.data.PreparedData` whose ``dataset`` yields
        ``{"images": (B, 1, N, N), "index": (B,)}``; ``pixel_size`` is Angstrom
        per pixel of those images.
    """
    if run_config is not None:
        spec = dict(run_config["data"])
        if spec["kind"] == "benchmark":  # as infer does for runs on generated benchmarks
            spec = {"kind": "particles", "path": str(star_path), "datadir": None, "pixel_size": None,
                    "preprocessing": {"normalize": "none"}}
        if datadir is not None:
            spec["datadir"] = str(datadir)
        if pixel_size is not None:
            spec["pixel_size"] = float(pixel_size)
        prepared = prepare_data(spec, path_override=star_path)
        if prepared.pixel_size is None and run_config.get("pixel_size") is not None:
            prepared.pixel_size = float(run_config["pixel_size"])
        return prepared
    source = open_source(star_path, datadir=datadir, pixel_size=pixel_size)
    prep = Preprocessing(box=source.box, pixel_size=source.pixel_size, normalize=normalize)
    return PreparedData(ParticleDataset(source, transform=prep), prep.output_box, prep.output_pixel_size,
                        [source.describe()] + prep.describe(), source=source)


@dataclass
class ClassAverages:
    """Per-cluster means of aligned particles.

    Attributes:
        averages: ``(k, N, N)`` float32 class averages (image units as read).
        counts: ``(k,)`` int64 particles per class.
        aligned: whether poses were undone (``False``: plain means).
        gallery: ``(k, G, N, N)`` float32, the first ``G`` aligned particles of
            each class in input order (zeros where a class has fewer).
        gallery_index: ``(k, G)`` int64 row numbers of those particles (-1 = none).
    """

    averages: np.ndarray
    counts: np.ndarray
    aligned: bool
    gallery: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 0), np.float32))
    gallery_index: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))


def align_particles(images: torch.Tensor, psi_deg, origin_angst, pixel_size: float, mode: str = "bicubic") -> torch.Tensor:
    """Centre and turn upright: ``(B, N, N)`` -> ``(B, N, N)`` with
    :func:`~particle_vae.conventions.undo_relion_pose` (``psi`` degrees
    ``(B,)``, ``origin_angst`` ``(B, 2)``, ``pixel_size`` Angstrom per pixel of ``images``)."""
    return undo_relion_pose(images, psi_deg, origin_angst, pixel_size, mode=mode)


@torch.no_grad()
def class_averages(dataset, labels, k: int, poses: tuple[np.ndarray, np.ndarray] | None, pixel_size: float | None,
                   batch_size: int = 256, gallery_size: int = 6, mode: str = "bicubic",
                   num_workers: int = 0) -> ClassAverages:
    """Stream every particle once and average the aligned images per cluster.

    Args:
        dataset: yields ``{"images": (B, 1, N, N), "index": (B,)}`` batches
            (e.g. ``PreparedData.dataset``); ``index`` is the row in ``labels``.
        labels: ``(M,)`` cluster ids ``0..k-1`` per row.
        k: number of clusters.
        poses: ``(psi_deg (M,), origin_angst (M, 2))`` from :func:`relion_poses`,
            or ``None`` to average without alignment.
        pixel_size: Angstrom per pixel of the dataset's images (needed with poses).
        gallery_size: ``G``, particles kept per class for the gallery.
        mode: interpolation of the rotation (``"bicubic"``, ``"bilinear"``).
    Returns:
        :class:`ClassAverages`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if poses is not None and pixel_size is None:
        raise ParticleVAEError("no pixel size known to convert the origins (Angstrom) to pixels; pass --pixel-size")
    sums = None
    counts = np.zeros(k, dtype=np.int64)
    gallery = None
    gallery_index = np.full((k, gallery_size), -1, dtype=np.int64)
    filled = np.zeros(k, dtype=np.int64)
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    for batch in tqdm(loader, desc="class averages", unit="batch", disable=None, leave=False):
        images = batch["images"][:, 0].to(torch.float64)
        rows = batch["index"].numpy()
        if poses is not None:
            images = align_particles(images, poses[0][rows], poses[1][rows], pixel_size, mode=mode)
        if sums is None:
            n = images.shape[-1]
            sums = torch.zeros((k, n, n), dtype=torch.float64)
            gallery = np.zeros((k, gallery_size, n, n), dtype=np.float32)
        batch_labels = labels[rows]
        sums.index_add_(0, torch.from_numpy(batch_labels), images)
        counts += np.bincount(batch_labels, minlength=k)
        for position, (row, label) in enumerate(zip(rows, batch_labels)):
            if filled.min() >= gallery_size:
                break
            if filled[label] < gallery_size:
                gallery[label, filled[label]] = images[position].numpy()
                gallery_index[label, filled[label]] = row
                filled[label] += 1
    if sums is None:
        raise ParticleVAEError("no particles were read")
    averages = (sums / torch.from_numpy(np.maximum(counts, 1)).to(sums)[:, None, None]).numpy().astype(np.float32)
    return ClassAverages(averages=averages, counts=counts, aligned=poses is not None, gallery=gallery,
                         gallery_index=gallery_index)


def centre_averages(result: ClassAverages, iterations: int = 3) -> np.ndarray:
    """Centre each class average (and its gallery) in place on its centre of mass.

    The centre of mass is that of the average's positive part above the
    background (:func:`~particle_vae.analysis.metrics.image_centre_of_mass`);
    the image is moved by an exact Fourier shift, and the estimate is repeated
    ``iterations`` times (the shifts add up).

    Returns:
        ``(k, 2)`` float64: ``d_j = (x, y)`` pixels, where the centre of class
        ``j`` was in the aligned frame before centring (zero for empty classes).
    """
    k = len(result.averages)
    shifts = np.zeros((k, 2))
    averages = torch.as_tensor(result.averages, dtype=torch.float64)
    for j in range(k):
        if result.counts[j] == 0:
            continue
        averages[j], shifts[j] = centre_on_mass(averages[j], iterations)
        if result.gallery.size and np.abs(shifts[j]).max() > 0:
            moved = fourier_shift(torch.as_tensor(result.gallery[j], dtype=torch.float64),
                                  torch.as_tensor(np.repeat(-shifts[j:j + 1], result.gallery.shape[1], 0)))
            result.gallery[j] = moved.numpy().astype(np.float32)
    result.averages = averages.numpy().astype(np.float32)
    return shifts


#: centring iterations for generator drawings, whose background fills the box (:func:`centre_on_mass`)
DRAWING_CENTRING_ITERATIONS = 20


def centre_on_mass(image: torch.Tensor, iterations: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """One image moved (exact Fourier shift) so that its centre of mass
    (:func:`~particle_vae.analysis.metrics.image_centre_of_mass`) is on the box centre.

    A background that fills the box (a generator's drawing) stays centred when
    the image moves, so each estimate corrects only the object's share of the
    offset: the estimate is repeated until the centre is within 0.001 px, at most
    ``iterations`` times (:data:`DRAWING_CENTRING_ITERATIONS` for drawings).

    Args:
        image: ``(N, N)``.
    Returns:
        ``(centred image (N, N) float64, d (2,))``: ``d = (x, y)`` pixels, where the centre was;
        the estimate is repeated ``iterations`` times (the shifts add up).
    """
    original = torch.as_tensor(image, dtype=torch.float64)[None]
    moved, shift = original, np.zeros((1, 2))
    for _ in range(iterations):
        centre = image_centre_of_mass(moved[0].numpy())
        if not np.isfinite(centre).all() or np.abs(centre).max() < 1e-3:
            break
        shift[0] += centre
        moved = fourier_shift(original, torch.as_tensor(-shift))
    return moved[0], shift[0]


def recentred_origins(psi_deg, origin_angst, labels, shifts_px, pixel_size: float) -> np.ndarray:
    """RELION origins that undo each particle's pose onto the centred class average.

    A particle aligned with ``(psi, o)`` is ``c(y) = obs(R(-psi) y - o)``; its
    class average has its centre at ``d`` (pixels, aligned frame); the centred
    image ``c(y + d)`` is obtained with ``o' = o - R(-psi) d``.

    Args:
        psi_deg: ``(M,)``; origin_angst: ``(M, 2)``; labels: ``(M,)`` class ids 0..k-1;
        shifts_px: ``(k, 2)`` from :func:`centre_averages`; pixel_size: Angstrom per pixel of the averages.
    Returns:
        ``(M, 2)`` new ``(rlnOriginXAngst, rlnOriginYAngst)``.
    """
    psi = np.radians(np.asarray(psi_deg, dtype=np.float64))
    d = np.asarray(shifts_px, dtype=np.float64)[np.asarray(labels)] * float(pixel_size)
    c, s = np.cos(psi), np.sin(psi)
    # R(-psi) d = (c dx + s dy, -s dx + c dy)
    moved = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)
    return np.asarray(origin_angst, dtype=np.float64) - moved


@torch.no_grad()
def decode_at_pose_zero(model, z) -> np.ndarray:
    """The generator's centred, upright image for each latent vector.

    Args:
        model: a :class:`~particle_vae.models.base.PoseVAE`.
        z: ``(B, k)`` latent vectors (prior units).
    Returns:
        ``(B, N, N)`` float32 images in data units, ``N = model.box``.
    """
    z = torch.as_tensor(np.asarray(z, dtype=np.float32))
    if z.dim() == 1:
        z = z[None]
    if z.shape[1] != model.zdim:
        raise ValueError(f"the model has {model.zdim} latent dimensions, got vectors of {z.shape[1]}")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(z), 256):
        chunk = z[start:start + 256].to(device)
        images = model.decode(chunk, torch.zeros(len(chunk), device=device), torch.zeros(len(chunk), 2, device=device))
        out.append(images.float().cpu().numpy())
    return np.concatenate(out)


def decode_centred(model, z) -> np.ndarray:
    """:func:`decode_at_pose_zero`, each drawing then moved onto its centre of mass
    (:func:`centre_on_mass`, :data:`DRAWING_CENTRING_ITERATIONS`): ``(B, k)`` latents -> ``(B, N, N)``
    float32, data units. The frame in which drawings are compared with centred averages and references."""
    return np.stack([centre_on_mass(torch.as_tensor(image), DRAWING_CENTRING_ITERATIONS)[0].numpy()
                     for image in decode_at_pose_zero(model, z)]).astype(np.float32)


def decode_centres(model, centres) -> np.ndarray:
    """``model.decode(centre, 0, 0)`` for each cluster centre ``(k, d)``: ``(k, N, N)`` float32."""
    return decode_at_pose_zero(model, centres)


def traversal_values(z, dims: tuple[int, ...] = (0, 1), steps: int = 7, quantiles=(0.02, 0.98)) -> tuple[np.ndarray, np.ndarray]:
    """Latent vectors on a grid through the data.

    Dimensions in ``dims`` (at most two, 0-based) run over ``steps`` evenly
    spaced values between the given quantiles of the particles' latent means;
    the others stay at the particles' median.

    Args:
        z: ``(M, k)`` latent means.
    Returns:
        ``(grid (R, C, k), axes (len(dims), steps))``: ``R = steps`` rows
        (``dims[0]``), ``C = steps`` columns (``dims[1]``) or ``R = 1`` for one dim.
    """
    z = np.asarray(z, dtype=np.float64)
    dims = tuple(int(d) for d in dims)[:2]
    if not dims or any(not 0 <= d < z.shape[1] for d in dims):
        raise ValueError(f"traversal dimensions {dims} outside 0..{z.shape[1] - 1}")
    median = np.median(z, axis=0)
    axes = np.stack([np.linspace(*np.quantile(z[:, d], quantiles), steps) for d in dims])
    if len(dims) == 1:
        grid = np.repeat(median[None, None, :], steps, axis=1)
        grid[0, :, dims[0]] = axes[0]
    else:
        grid = np.broadcast_to(median, (steps, steps, z.shape[1])).copy()
        grid[:, :, dims[0]] = axes[0][:, None]
        grid[:, :, dims[1]] = axes[1][None, :]
    return grid, axes


def latent_traversal(model, z, dims: tuple[int, ...] = (0, 1), steps: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a :func:`traversal_values` grid at pose zero.

    Returns:
        ``(images (R, C, N, N) float32, grid (R, C, k), axes)``.
    """
    grid, axes = traversal_values(z, dims, steps)
    rows, cols = grid.shape[:2]
    images = decode_at_pose_zero(model, grid.reshape(rows * cols, -1))
    return images.reshape(rows, cols, *images.shape[-2:]), grid, axes


def check_same_particles(prepared: PreparedData, n_rows: int, path: Path) -> None:
    """The dataset must have one image per STAR row."""
    if len(prepared.dataset) != n_rows:
        raise InputFileError(f"the particle images ({len(prepared.dataset)}) do not match the STAR's {n_rows} rows", path)
