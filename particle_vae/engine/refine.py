"""Pose refinement after amortised inference: a few iterations of maximum-likelihood 2D alignment.

The VAE's latent clusters and poses seed an expectation-maximisation loop on the
image model of :mod:`particle_vae.engine.pose_search` (the model RELION's 2D
classification uses):

* E-step: every particle is scored against every class reference, turned
  through a grid of angles, multiplied by the particle's own CTF, at every
  whole-pixel shift of a window; the posterior (with class priors and a
  Gaussian prior on the shift) gives the best pose, refined below the grid,
  and its uncertainty.
* M-step: each class reference is the CTF-weighted Wiener average of the
  particles aligned with their most probable poses (the ``top`` poses, weighted
  by their posterior),
  ``A_k = sum w C' Y / (sum w C'^2 + sigma2 / (T tau2))``, where ``Y`` is the
  aligned particle, ``C'`` its CTF in the aligned frame, ``tau2`` the signal
  power of the class per frequency shell (estimated from the same sums) and
  ``T`` the regularisation constant; the reference is masked and moved so that
  its centre of mass is on the box centre.
* noise: ``sigma2`` per frequency shell from the residuals at the best poses.
* resolution: each iteration searches up to the shell where the references'
  signal-to-noise ratio falls below one, plus a margin (coarse to fine).

Everything runs in batches on any torch device; one pass over the particles per
iteration (read through the same loader as inference).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from particle_vae.analysis.averages import centre_on_mass
from particle_vae.conventions import fourier_shift_phase, undo_relion_pose
from particle_vae.data.ctf import effective_ctf
from particle_vae.data.preprocess import circular_mask
from particle_vae.data.sampling import make_loader
from particle_vae.engine.pose_search import best_poses, local_refine, psi_grid, rotated_spectra, score_poses
from particle_vae.fourier import shell_index, shell_means

log = logging.getLogger(__name__)

__all__ = ["RefineSettings", "RefineResult", "refine_poses", "aligned_ctf_table"]


@dataclass
class RefineSettings:
    """Settings of :func:`refine_poses`.

    Attributes:
        iterations: EM iterations (each one pass over the particles).
        seed_iterations: first iterations in which each particle keeps its seed class (only its pose is
            searched), so that the references sharpen before classes compete; blurred seed references
            otherwise attract every particle to the one with the least power.
        n_psi: angles on the rotation grid (72 = 5 degree steps); the best pose is refined below it.
        max_shift: largest particle displacement searched, pixels (default an eighth of the box, at most 6).
        top: most probable poses per particle that enter the reference update.
        regularisation: ``T`` of the Wiener filter (larger trusts the data more; RELION's 2D default is 2).
        mask_radius: soft mask of the references, pixels from the centre (default 0.45 of the box).
        batch_size: particles per batch; device: torch device.
        margin: Fourier shells searched beyond the references' resolution.
    """

    iterations: int = 12
    seed_iterations: int = 2
    n_psi: int = 72
    max_shift: int | None = None
    top: int = 4
    regularisation: float = 2.0
    mask_radius: float | None = None
    batch_size: int = 32
    device: str = "cpu"
    margin: int = 3


@dataclass
class RefineResult:
    """Refined per-particle poses, in input order, and the final references.

    Attributes:
        classes: ``(M,)`` int64 class of each particle (0-based).
        psi_deg: ``(M,)`` RELION ``rlnAnglePsi`` in degrees, ``(-180, 180]``.
        origin_px: ``(M, 2)`` RELION origin in pixels of the images (``-d``).
        psi_std_deg: ``(M,)`` posterior circular standard deviation of the angle, degrees.
        probability: ``(M,)`` posterior probability of the best grid pose.
        class_probability: ``(M,)`` posterior probability of the chosen class.
        references: ``(K, N, N)`` float32 final class references (CTF-corrected, centred).
        counts: ``(K,)`` particles per class.
        resolution_shells: cutoff (Fourier pixels) used in each iteration.
    """

    classes: np.ndarray
    psi_deg: np.ndarray
    origin_px: np.ndarray
    psi_std_deg: np.ndarray
    probability: np.ndarray
    class_probability: np.ndarray
    references: np.ndarray
    counts: np.ndarray
    resolution_shells: list


def aligned_ctf_table(table: pd.DataFrame, psi_deg: np.ndarray) -> pd.DataFrame:
    """CTF parameters of particles turned back by ``psi`` (the aligned frame).

    Turning an image by ``-psi`` turns its spectrum the same way, so the
    astigmatism direction moves from ``angle`` to ``angle + psi``.
    """
    out = table.copy()
    out["defocus_angle"] = (out["defocus_angle"].to_numpy(np.float64) if "defocus_angle" in out else 0.0) + psi_deg
    return out


class _Accumulator:
    """Sums of the M-step and the noise estimate over one pass."""

    def __init__(self, k: int, box: int, device):
        width = box // 2 + 1
        self.numerator = torch.zeros((k, box, width), dtype=torch.complex128, device=device)
        self.denominator = torch.zeros((k, box, width), dtype=torch.float64, device=device)
        self.noise = torch.zeros(box // 2 + 1, dtype=torch.float64, device=device)
        self.noise_count = 0
        self.class_weight = torch.zeros(k, dtype=torch.float64, device=device)
        self.shift_sq = 0.0


def _ctf_for(table: pd.DataFrame | None, rows: np.ndarray, box: int, pixel_size: float, device, psi=None) -> torch.Tensor | None:
    if table is None:
        return None
    sub = table.iloc[rows]
    if psi is not None:
        sub = aligned_ctf_table(sub, psi)
    return effective_ctf(sub, box, pixel_size).to(device)


def _wiener(acc: _Accumulator, sigma2: torch.Tensor, regularisation: float, box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """References ``(K, N, N)`` and their signal-to-noise ratio per shell ``(K, N//2+1)``."""
    shells = shell_index(box, device=sigma2.device)
    sigma2_f = sigma2[shells]  # (N, W)
    den = acc.denominator
    raw = acc.numerator / den.clamp_min(1e-12)
    # |raw|^2 = |A|^2 + noise power sigma2 / den, so the signal power per shell is their difference
    signal = shell_means(raw.real ** 2 + raw.imag ** 2 - sigma2_f / den.clamp_min(1e-12), box).clamp_min(0.0)
    snr = signal * shell_means(den, box) / sigma2[None]
    tau2 = signal[:, shells]  # (K, N, W)
    lam = torch.where(tau2 > 0, sigma2_f / (regularisation * tau2.clamp_min(1e-30)), torch.full_like(tau2, float("inf")))
    spectrum = torch.where(torch.isfinite(lam), acc.numerator / (den + lam), torch.zeros_like(acc.numerator))
    spectrum[:, 0, 0] = 0.0  # no constant offset (the likelihood ignores it too)
    return torch.fft.irfft2(spectrum, s=(box, box)), snr


def _finish_references(refs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = refs * mask
    for j in range(out.shape[0]):
        if out[j].abs().max() > 0:
            out[j] = centre_on_mass(out[j].cpu())[0].to(out) * mask
    return out


def _accumulate(acc: _Accumulator, images: torch.Tensor, rows: np.ndarray, best, table, pixel_size: float, top: int) -> None:
    """Add the particles aligned with their ``top`` most probable poses to the M-step sums."""
    n = images.shape[-1]
    poses = best.top.reshape(-1, 4).cpu().numpy()  # (B*P, 4): class, psi, dx, dy
    weights = best.top_weight.reshape(-1).to(images.device, torch.float64)
    repeated = images.repeat_interleave(top, dim=0).to(torch.float64)
    # the pose (psi, d) is RELION's (psi, origin -d), in pixels
    aligned = undo_relion_pose(repeated, poses[:, 1], -poses[:, 2:], 1.0, mode="bicubic")
    spectra = torch.fft.rfft2(aligned)
    ctf = _ctf_for(table, np.repeat(rows, top), n, pixel_size, images.device, psi=poses[:, 1])
    classes = torch.as_tensor(poses[:, 0].astype(np.int64), device=images.device)
    if ctf is None:
        acc.numerator.index_add_(0, classes, spectra * weights[:, None, None])
        acc.denominator.index_add_(0, classes, weights[:, None, None].expand(-1, n, n // 2 + 1).contiguous())
    else:
        ctf = ctf.to(torch.float64)
        acc.numerator.index_add_(0, classes, spectra * (ctf * weights[:, None, None]))
        acc.denominator.index_add_(0, classes, ctf * ctf * weights[:, None, None])


def _residual_power(spectra, ctf, reference_spectra, best, psi_deg: np.ndarray) -> torch.Tensor:
    """``|X - C B e^{-2 pi i f.d/N}|^2`` per shell at each particle's best grid pose; ``(B, N//2+1)``."""
    n = spectra.shape[-2]
    step = 360.0 / len(psi_deg)
    pose = best.top[:, 0].cpu().numpy()
    k = torch.as_tensor(pose[:, 0].astype(np.int64))
    r = torch.as_tensor(np.round(pose[:, 1] / step).astype(np.int64) % len(psi_deg))
    model = reference_spectra[k, r].to(spectra.device)
    model = model * fourier_shift_phase(n, n, torch.as_tensor(pose[:, 2:], device=spectra.device))
    if ctf is not None:
        model = model * ctf
    residual = spectra.to(torch.complex128) - model
    return shell_means(residual.real ** 2 + residual.imag ** 2, n)


def _initial_references(dataset, table, pixel_size: float, labels: np.ndarray, psi_deg: np.ndarray, origin_px: np.ndarray,
                        k: int, settings: RefineSettings, device, mask: torch.Tensor):
    """Wiener averages of the particles aligned with the seed poses, and the noise power of the raw particles."""
    box = mask.shape[-1]
    acc = _Accumulator(k, box, device)
    noise = torch.zeros(box // 2 + 1, dtype=torch.float64, device=device)
    count = 0
    for batch in make_loader(dataset, settings.batch_size, shuffle=False):
        images = batch["images"][:, 0].to(device, torch.float64)
        rows = batch["index"].numpy()
        seed = SimpleNamespace(top=torch.as_tensor(np.stack([labels[rows], psi_deg[rows], -origin_px[rows, 0], -origin_px[rows, 1]], 1)),
                               top_weight=torch.ones(len(rows), 1, dtype=torch.float64))
        _accumulate(acc, images, rows, seed, table, pixel_size, 1)
        spectra = torch.fft.rfft2(images)
        noise += shell_means(spectra.real ** 2 + spectra.imag ** 2, box).sum(0)
        count += len(rows)
        acc.class_weight += torch.as_tensor(np.bincount(labels[rows], minlength=k), dtype=torch.float64, device=device)
    # at low SNR the particles' own power is mostly noise: a first, slightly high, noise estimate
    sigma2 = noise / max(count, 1)
    refs, snr = _wiener(acc, sigma2, settings.regularisation, box)
    return _finish_references(refs, mask), sigma2, acc.class_weight / acc.class_weight.sum(), snr


def _cutoff(snr: torch.Tensor, margin: int, box: int) -> float:
    """Highest shell where the best class's SNR is still above 1 (low shells only count once reached), plus a margin."""
    best = snr.max(dim=0).values.cpu().numpy()
    above = np.flatnonzero(best[1:] >= 1.0) + 1
    shell = int(above.max()) if above.size else 3
    # the first shell where it falls below one and stays below for two shells
    for s in range(1, len(best) - 2):
        if best[s] < 1.0 and best[s + 1] < 1.0:
            shell = s
            break
    return float(min(max(shell + margin, 4), box // 2 - 1))


@torch.no_grad()
def refine_poses(dataset, table: pd.DataFrame | None, pixel_size: float, labels: np.ndarray, psi_deg: np.ndarray,
                 origin_px: np.ndarray, settings: RefineSettings | None = None, progress: bool = True) -> RefineResult:
    """Refine in-plane poses and classes by maximum-likelihood 2D alignment (module docstring).

    Args:
        dataset: yields ``{"images": (B, 1, N, N), "index": (B,)}`` (``index`` = row of ``table`` and of the seeds).
        table: per-particle CTF parameters (:meth:`~particle_vae.io.star.ParticleStar.ctf_parameters`), or
            ``None`` for particles without a CTF.
        pixel_size: Angstrom per pixel of the images.
        labels: ``(M,)`` seed classes ``0..K-1`` (e.g. k-means of the latents).
        psi_deg: ``(M,)`` seed ``rlnAnglePsi`` (degrees); origin_px: ``(M, 2)`` seed origins in pixels.
    Returns:
        :class:`RefineResult`.
    """
    settings = settings or RefineSettings()
    device = torch.device(settings.device)
    labels = np.asarray(labels, dtype=np.int64)
    psi_deg = np.asarray(psi_deg, dtype=np.float64)
    origin_px = np.asarray(origin_px, dtype=np.float64)
    k = int(labels.max()) + 1
    box = int(dataset[0]["images"].shape[-1])
    max_shift = settings.max_shift if settings.max_shift is not None else max(2, min(6, box // 8))
    mask_radius = settings.mask_radius if settings.mask_radius is not None else 0.45 * box
    mask = circular_mask(box, mask_radius, soft_edge=max(2.0, 0.05 * box), device=device, dtype=torch.float64)
    grid = psi_grid(settings.n_psi)
    refs, sigma2, class_prior, snr = _initial_references(dataset, table, pixel_size, labels, psi_deg, origin_px, k, settings,
                                                         device, mask)
    m = len(labels)
    out = {"classes": np.zeros(m, np.int64), "psi": np.zeros(m), "shift": np.zeros((m, 2)), "psi_std": np.zeros(m),
           "probability": np.zeros(m), "class_probability": np.zeros(m)}
    shift_sigma = max_shift / 2.0
    cutoffs = []
    for iteration in range(settings.iterations):
        cutoff = _cutoff(snr, settings.margin, box)
        cutoffs.append(cutoff)
        shift_step = max(1, int(box // (2 * cutoff)))
        reference_spectra = rotated_spectra(refs.to(torch.float32), grid)
        inv_sigma2 = (1.0 / sigma2.clamp_min(1e-30))[shell_index(box, device=device)]
        inv_sigma2[0, 0] = 0.0  # the constant offset of each image carries no pose information
        acc = _Accumulator(k, box, device)
        log_prior = torch.log(class_prior.clamp_min(1e-6))
        loader = make_loader(dataset, settings.batch_size, shuffle=False)
        for batch in tqdm(loader, desc=f"pose search {iteration + 1}/{settings.iterations}", unit="batch",
                          disable=None if progress else True, leave=False):
            images = batch["images"][:, 0].to(device, torch.float32)
            rows = batch["index"].numpy()
            spectra = torch.fft.rfft2(images)
            ctf = _ctf_for(table, rows, box, pixel_size, device)
            scores = score_poses(spectra, ctf, reference_spectra, inv_sigma2, max_shift, cutoff, shift_step)
            prior = log_prior
            if iteration < settings.seed_iterations:
                prior = torch.full((len(rows), k), -math.inf, dtype=torch.float64, device=device)
                prior[torch.arange(len(rows), device=device), torch.as_tensor(labels[rows], device=device)] = 0.0
            best = best_poses(scores, grid, prior, shift_sigma, top=settings.top)
            acc.noise += _residual_power(spectra, None if ctf is None else ctf.to(torch.float64), reference_spectra, best,
                                         grid).sum(0)
            # below the grid: the best pose on a fine grid around it, against its class alone
            best.psi_deg, best.shift_px = local_refine(spectra, ctf, refs, inv_sigma2, best.classes, best.psi_deg, best.shift_px,
                                                       cutoff, angle_range=360.0 / settings.n_psi, shift_range=float(shift_step))
            best.top[:, 0, 1] = best.psi_deg
            best.top[:, 0, 2:] = best.shift_px
            _accumulate(acc, images, rows, best, table, pixel_size, best.top.shape[1])
            acc.noise_count += len(rows)
            acc.class_weight += best.class_probability.sum(0)
            acc.shift_sq += float((best.shift_px ** 2).sum())
            out["classes"][rows] = best.classes.cpu().numpy()
            out["psi"][rows] = best.psi_deg.cpu().numpy()
            out["shift"][rows] = best.shift_px.cpu().numpy()
            out["psi_std"][rows] = best.psi_std_deg.cpu().numpy()
            out["probability"][rows] = best.probability.cpu().numpy()
            out["class_probability"][rows] = best.class_probability.gather(1, best.classes[:, None])[:, 0].cpu().numpy()
        sigma2 = acc.noise / max(acc.noise_count, 1)
        class_prior = acc.class_weight / acc.class_weight.sum()
        shift_sigma = float(np.clip(math.sqrt(acc.shift_sq / (2 * max(acc.noise_count, 1))), 1.0, max_shift))
        refs, snr = _wiener(acc, sigma2, settings.regularisation, box)
        refs = _finish_references(refs, mask)
        log.info("pose search iteration %d/%d: search to %.1f A, classes %s, median angle uncertainty %.1f deg",
                 iteration + 1, settings.iterations, box * pixel_size / cutoff,
                 np.bincount(out["classes"], minlength=k).tolist(), float(np.median(out["psi_std"])))
    psi = (out["psi"] + 180.0) % 360.0 - 180.0
    psi = np.where(psi <= -180.0, psi + 360.0, psi)
    return RefineResult(classes=out["classes"], psi_deg=psi, origin_px=-out["shift"], psi_std_deg=out["psi_std"],
                        probability=out["probability"], class_probability=out["class_probability"],
                        references=refs.cpu().numpy().astype(np.float32), counts=np.bincount(out["classes"], minlength=k),
                        resolution_shells=cutoffs)
