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
* written centre: after the last iteration, the posterior mean of the
  particle's centre over every (class, angle, shift) against the final
  references and their mirror images, with the best pose's neighbourhood at its
  refined shift. Every reference is centred on its centre of mass, so a
  particle's centre in the image means the same under every class, mirror and
  angle; where the posterior is split the mean errs less than the mode. The
  projection from the opposite side of a structure is the mirror of the one
  from the front (:func:`~particle_vae.conventions.mirror_images`), so the
  mirrors are views of the same structures that the classes may not hold:
  twice the views to line a particle up with, for one more pass. The angle and
  class stay those of the EM (a mirrored match has no in-plane angle in the
  class's frame).
* structure decision: after the last iteration every particle is compared
  with every final reference once more at low resolution only (4.5 Fourier
  cycles across the mask's diameter, about 64 A for a 290 A particle), and the
  class that fits best there is recorded beside the particle's own class. The
  views of one structure differ in fine detail, and a particle whose view no
  class of its structure holds fits a similar view of another structure better
  at full resolution; at low resolution the classes of one structure look alike
  (size, mass, envelope) and structures differ. Each reference's mirror image
  is scored as well and counts for its class. ``analyze`` puts each particle in
  the group of that class (docs/analysis.md).

Each class's angles are relative to its own reference; :func:`register_frames`
turns the classes into one frame afterwards (references onto each other, then
onto drawings in a model's frame) and :func:`apply_registration` turns the
particles' angles with them.

Everything runs in batches on any torch device; one pass over the particles per
iteration (read through the same loader as inference).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from particle_vae.analysis.averages import centre_on_mass
from particle_vae.conventions import fourier_shift_phase, mirror_images, undo_relion_pose
from particle_vae.data.ctf import effective_ctf
from particle_vae.data.preprocess import circular_mask
from particle_vae.data.sampling import make_loader
from particle_vae.engine.pose_search import best_poses, local_refine, psi_grid, rotated_spectra, score_poses
from particle_vae.fourier import shell_index, shell_means

log = logging.getLogger(__name__)

__all__ = ["RefineSettings", "RefineResult", "refine_poses", "posterior_mean_centres", "low_resolution_classes",
           "inverse_noise_power", "aligned_ctf_table", "FrameRegistration", "register_frames", "apply_registration",
           "resample_image"]


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
        mean_shift: write the posterior mean of each particle's centre (the mode's part refined below the
            grid) instead of the most probable pose's; the angle is always the most probable one's.
        structure_cycles: resolution of the structure decision (module docstring) as Fourier cycles
            across the mask's diameter (4.5: a 290 A mask compares to 64 A); ``None`` skips it.
        mirrors: score the mirror image of each final reference as well, for the written centre (with
            ``mean_shift``) and the structure decision (module docstring).
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
    mean_shift: bool = True
    structure_cycles: float | None = 4.5
    mirrors: bool = True


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
        low_res_classes: ``(M,)`` int64 class whose final reference fits each particle best at the low
            resolution of the structure decision (module docstring); ``classes`` when it was skipped.
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
    low_res_classes: np.ndarray | None = None


def _wrap(angle_deg):
    """Degrees to ``[-180, 180)``."""
    return (np.asarray(angle_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0


def _psi_range(psi_deg):
    """Degrees to RELION's ``(-180, 180]``."""
    psi = _wrap(psi_deg)
    return np.where(psi <= -180.0, psi + 360.0, psi)


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


def inverse_noise_power(sigma2: torch.Tensor, box: int) -> torch.Tensor:
    """``(N, N // 2 + 1)`` weight ``1 / sigma2`` of each rfft2 coefficient from the noise power per shell ``(N // 2 + 1,)``.

    The constant term gets weight 0: each image's offset carries no pose or class information.
    """
    inverse = (1.0 / sigma2.clamp_min(1e-30))[shell_index(box, device=sigma2.device)]
    inverse[0, 0] = 0.0
    return inverse


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
        inv_sigma2 = inverse_noise_power(sigma2, box)
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
            out["shift"][rows] = best.shift_px.cpu().numpy()  # with mean_shift, replaced after the EM
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
    counts = np.bincount(out["classes"], minlength=k)
    if settings.mean_shift:
        out["shift"] = posterior_mean_centres(dataset, table, pixel_size, refs, sigma2, class_prior,
                                              _cutoff(snr, settings.margin, box), max_shift, shift_sigma, settings.n_psi,
                                              settings.mirrors, settings.batch_size, device, progress)
    low_res = out["classes"]
    if settings.structure_cycles is not None:
        low_res = low_resolution_classes(dataset, table, pixel_size, refs, sigma2, counts > 0,
                                         settings.structure_cycles * box / (2.0 * mask_radius), max_shift, settings.n_psi,
                                         settings.batch_size, device, progress, mirrors=settings.mirrors)
        log.info("structure decision at %.0f A: %d particles fit another class best", 2.0 * mask_radius * pixel_size
                 / settings.structure_cycles, int((low_res != out["classes"]).sum()))
    return RefineResult(classes=out["classes"], psi_deg=_psi_range(out["psi"]), origin_px=-out["shift"], psi_std_deg=out["psi_std"],
                        probability=out["probability"], class_probability=out["class_probability"],
                        references=refs.cpu().numpy().astype(np.float32), counts=counts, resolution_shells=cutoffs,
                        low_res_classes=low_res)


def _with_mirrors(references: torch.Tensor, mirrors: bool) -> torch.Tensor:
    """``(K, N, N)`` references, followed by their mirror images when ``mirrors``: ``(2K, N, N)``."""
    return torch.cat([references, mirror_images(references)]) if mirrors else references


def _batch_for(batch_size: int, mirrors: bool) -> int:
    """Particles per batch of a pass over twice the references: the score array stays the E-step's size."""
    return max(1, batch_size // 2) if mirrors else batch_size


@torch.no_grad()
def posterior_mean_centres(dataset, table: pd.DataFrame | None, pixel_size: float, references: torch.Tensor,
                           sigma2: torch.Tensor, class_prior: torch.Tensor, cutoff: float, max_shift: int, shift_sigma: float,
                           n_psi: int = 72, mirrors: bool = True, batch_size: int = 32, device="cpu",
                           progress: bool = True) -> np.ndarray:
    """Posterior mean of each particle's displacement over every class (and mirror image), angle and shift.

    Args:
        dataset, table, pixel_size: as for :func:`refine_poses`.
        references: ``(K, N, N)`` class references, each centred on its centre of mass.
        sigma2: ``(N // 2 + 1,)`` noise power per Fourier shell; class_prior: ``(K,)`` prior class probabilities.
        cutoff: Fourier radius (Fourier pixels) of the search; max_shift: largest displacement, pixels.
        shift_sigma: standard deviation of the Gaussian prior on the displacement, pixels.
        n_psi: angles on the rotation grid; mirrors: score each reference's mirror image as well (half its
            class's prior each).
    Returns:
        ``(M, 2)`` float64 ``(dx, dy)`` displacement in pixels (the RELION origin is its negative), in dataset
        order (``index``).
    """
    device = torch.device(device)
    candidates = _with_mirrors(references.to(device, torch.float64), mirrors)
    grid = psi_grid(n_psi)
    spectra_refs = rotated_spectra(candidates.to(torch.float32), grid)
    box = references.shape[-1]
    inv_sigma2 = inverse_noise_power(sigma2.to(device), box)
    prior = torch.log(class_prior.to(device, torch.float64).clamp_min(1e-6))
    if mirrors:
        prior = torch.cat([prior, prior]) - math.log(2.0)
    shift_step = max(1, int(box // (2 * cutoff)))
    centres = np.zeros((len(dataset), 2))
    for batch in tqdm(make_loader(dataset, _batch_for(batch_size, mirrors), shuffle=False), desc="centres", unit="batch",
                      disable=None if progress else True, leave=False):
        images = batch["images"][:, 0].to(device, torch.float32)
        rows = batch["index"].numpy()
        spectra = torch.fft.rfft2(images)
        ctf = _ctf_for(table, rows, box, pixel_size, device)
        best = best_poses(score_poses(spectra, ctf, spectra_refs, inv_sigma2, max_shift, cutoff, shift_step), grid, prior,
                          shift_sigma, top=1)
        _, mode_shift = local_refine(spectra, ctf, candidates, inv_sigma2, best.classes, best.psi_deg, best.shift_px, cutoff,
                                     angle_range=360.0 / n_psi, shift_range=float(shift_step))
        centres[rows] = best.shift_mean_px(mode_shift).cpu().numpy()
    return centres


@torch.no_grad()
def low_resolution_classes(dataset, table: pd.DataFrame | None, pixel_size: float, references: torch.Tensor, sigma2: torch.Tensor,
                           allowed: np.ndarray, cutoff: float, max_shift: int, n_psi: int = 72, batch_size: int = 32,
                           device="cpu", progress: bool = True, mirrors: bool = True) -> np.ndarray:
    """The class whose reference, or its mirror image (with ``mirrors``), fits each particle best (over every angle
    and shift) up to a low resolution (the structure decision of the module docstring).

    Args:
        dataset: as for :func:`refine_poses`.
        table: per-particle CTF parameters, or ``None``.
        pixel_size: Angstrom per pixel of the images.
        references: ``(K, N, N)`` class references.
        sigma2: ``(N // 2 + 1,)`` noise power per Fourier shell.
        allowed: ``(K,)`` bool, classes that may be chosen (e.g. those that kept particles).
        cutoff: Fourier radius (Fourier pixels of the ``N``-pixel box) of the comparison.
        max_shift: largest displacement searched, pixels; n_psi: angles on the rotation grid.
        mirrors: score each reference's mirror image as well (a fit of the mirror counts for its class).
    Returns:
        ``(M,)`` int64 class of each particle, in dataset order (``index``).
    """
    device = torch.device(device)
    box = references.shape[-1]
    k = references.shape[0]
    spectra_refs = rotated_spectra(_with_mirrors(references.to(device, torch.float32), mirrors), psi_grid(n_psi))
    inv_sigma2 = inverse_noise_power(sigma2.to(device), box)
    ruled_out = torch.as_tensor(~np.asarray(allowed, dtype=bool), device=device)
    chosen = np.zeros(len(dataset), np.int64)
    for batch in tqdm(make_loader(dataset, _batch_for(batch_size, mirrors), shuffle=False), desc="structure decision",
                      unit="batch", disable=None if progress else True, leave=False):
        images = batch["images"][:, 0].to(device, torch.float32)
        rows = batch["index"].numpy()
        scores = score_poses(torch.fft.rfft2(images), _ctf_for(table, rows, box, pixel_size, device), spectra_refs,
                             inv_sigma2.to(torch.float32), max_shift, cutoff)
        best = scores.loglik.flatten(2).max(dim=2).values  # (B, K) or (B, 2K): the references, then their mirrors
        best = torch.maximum(best[:, :k], best[:, k:]) if mirrors else best
        chosen[rows] = best.masked_fill(ruled_out[None], -math.inf).argmax(dim=1).cpu().numpy()
    return chosen


@dataclass
class FrameRegistration:
    """In-plane turn of each refinement class onto a shared frame (:func:`register_frames`).

    Attributes:
        angle_deg: ``(K,)`` counter-clockwise turn of each class reference, degrees, ``[-180, 180)``.
        group: ``(K,)`` int64 group of classes whose references match each other after a turn.
        drawing_correlation: ``(K,)`` mean correlation of the group's turned references with their drawings.
    """

    angle_deg: np.ndarray
    group: np.ndarray
    drawing_correlation: np.ndarray


def _turn_curves(moving: np.ndarray, fixed: np.ndarray, step_deg: float = 1.0) -> np.ndarray:
    """Pearson correlation of each moving image turned by each angle with each fixed image: ``(K, A, L)``.

    Images ``(K, N, N)`` and ``(L, N, N)``, compared inside the inscribed circle; angles ``0, step, ...``
    counter-clockwise.
    """
    from particle_vae.conventions import move_objects

    n = moving.shape[-1]
    angles = np.arange(0.0, 360.0, step_deg)
    coords = np.arange(n) - n // 2
    inside = torch.as_tensor(np.hypot(*np.meshgrid(coords, coords, indexing="ij")) <= n // 2 - 1)

    def normalised(images: torch.Tensor) -> torch.Tensor:
        values = images[..., inside]
        values = values - values.mean(-1, keepdim=True)
        return values / values.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    fixed_vectors = normalised(torch.as_tensor(np.asarray(fixed, dtype=np.float64)))
    curves = []
    for image in np.asarray(moving, dtype=np.float64):
        stack = torch.as_tensor(image)[None].expand(len(angles), n, n).contiguous()
        turned = move_objects(stack, np.radians(angles), np.zeros((len(angles), 2)), mode="bilinear")
        curves.append(normalised(turned) @ fixed_vectors.T)
    return torch.stack(curves).numpy()


def _peak(curve: np.ndarray, step_deg: float = 1.0) -> tuple[float, float]:
    """``(angle in degrees [-180, 180), value)`` of a periodic curve's maximum, refined by a parabola."""
    best = int(np.argmax(curve))
    before, at, after = curve[best - 1], curve[best], curve[(best + 1) % len(curve)]
    curvature = before - 2.0 * at + after
    offset = float(np.clip(0.5 * (before - after) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0
    return (best + offset) * step_deg % 360.0, float(at)




def register_frames(references: np.ndarray, drawings: np.ndarray, weights: np.ndarray | None = None,
                    link_correlation: float = 0.8) -> FrameRegistration:
    """Turns that bring the class references into one frame: each other's, then the drawings'.

    Every refinement class aligns its particles to its own reference, and nothing
    in the likelihood fixes one reference's in-plane frame against another's: two
    classes of the same view end up turned against each other (measured: two
    families about 120 degrees apart on a simulated top-view mixture), so their
    particles' angles are not comparable. Two steps, on the part of each image that
    changes with rotation (:func:`~particle_vae.analysis.metrics.anisotropic_part`):

    1. references that match each other after a turn (correlation at least
       ``link_correlation``; the same view of the same object) are joined into
       groups, strongest matches first, and turned onto each other;
    2. each group as a whole is turned onto the drawings (a generator's images
       at pose zero, all in the model's one frame): the turn that maximises the
       ``weights``-weighted sum of its references' correlations with their own
       drawings. One blurred drawing cannot move a group on its own.

    Args:
        references: ``(K, N, N)`` class references, centred on their centre of mass.
        drawings: ``(K, N, N)`` drawings on the same pixel grid, centred.
        weights: ``(K,)`` weight of each class in its group's turn (e.g. its number of particles).
    Returns:
        :class:`FrameRegistration`.
    """
    from particle_vae.analysis.metrics import anisotropic_part

    k = len(references)
    weights = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    moving = np.stack([anisotropic_part(r) for r in references])
    between = _turn_curves(moving, moving)  # (K, A, K): reference i turned onto reference j
    group, parent_turn = np.arange(k), np.zeros(k)  # turn of each class into its group's first class's frame
    pairs = sorted(((between[i, :, j].max(), i, j) for i in range(k) for j in range(i + 1, k)), reverse=True)
    for value, i, j in pairs:
        if value < link_correlation:
            break
        if group[i] == group[j]:
            continue
        turn_ij, _ = _peak(between[i, :, j])  # turn of i onto j
        # i's whole group joins j's: a member goes into i's frame (its turn minus i's), onto j, then into j's group frame
        members = group == group[i]
        parent_turn[members] = _wrap(parent_turn[members] - parent_turn[i] + turn_ij + parent_turn[j])
        group[members] = group[j]
    # (K, A): each reference turned onto its own drawing only
    onto_drawings = np.stack([_turn_curves(moving[m:m + 1], anisotropic_part(drawings[m])[None])[0, :, 0] for m in range(k)])
    angles = onto_drawings.shape[1]
    turn, drawing_value = np.zeros(k), np.zeros(k)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        combined = np.zeros(angles)
        for m in members:
            own = onto_drawings[m]
            # own[a] is m turned by a degrees; the group turn b turns m by parent_turn[m] + b in total
            combined += weights[m] * np.roll(own, -int(round(parent_turn[m])) % angles)
        total = max(weights[members].sum(), 1e-30)
        group_turn, value = _peak(combined)
        turn[members] = _wrap(parent_turn[members] + group_turn)
        drawing_value[members] = value / total
    return FrameRegistration(angle_deg=turn, group=np.unique(group, return_inverse=True)[1].astype(np.int64),
                             drawing_correlation=drawing_value)


def apply_registration(result: RefineResult, registration: FrameRegistration) -> RefineResult:
    """``result`` with each class turned by its registration angle: the particles' ``psi`` and the reference.

    A particle aligned with ``psi`` matches its reference; turning the reference by ``alpha``
    counter-clockwise is matched by ``psi + alpha`` (:func:`~particle_vae.conventions.undo_relion_pose`
    turns by ``psi`` after the shift, so the origin stays).
    """
    from particle_vae.conventions import move_objects

    psi = _psi_range(result.psi_deg + registration.angle_deg[result.classes])
    references = move_objects(torch.as_tensor(result.references, dtype=torch.float64), np.radians(registration.angle_deg),
                              np.zeros((len(registration.angle_deg), 2)), mode="bicubic").numpy().astype(np.float32)
    return dataclasses.replace(result, psi_deg=psi, references=references)


def class_masses(references: np.ndarray, pixel_size: float) -> np.ndarray:
    """The integrated density of each class reference: the same for every view of one structure.

    A projection's integral is the object's total density whatever the view, so
    classes of one structure share it and structures of different mass differ.
    The references are CTF-corrected and have no constant term over the box, so
    the sum measures the object against its surroundings inside the mask.

    Args:
        references: ``(K, N, N)`` (:attr:`RefineResult.references`, normalised data units).
        pixel_size: Angstrom per pixel of the references.
    Returns:
        ``(K,)`` float64, data units x Angstrom^2 (comparable between runs on the same normalisation).
    """
    references = np.asarray(references, dtype=np.float64)
    return references.sum(axis=(-2, -1)) * float(pixel_size) ** 2


def resample_image(image: np.ndarray, pixel_size: float, box: int, new_pixel_size: float) -> np.ndarray:
    """An image on another pixel grid with the same centre (pixel ``N // 2``), band-limited to the new grid.

    Args:
        image: ``(N, N)`` at ``pixel_size`` Angstrom per pixel.
        box: edge of the new grid, pixels; new_pixel_size: its Angstrom per pixel.
    Returns:
        ``(box, box)`` float64; zero outside the input's extent.
    """
    image = torch.as_tensor(np.asarray(image, dtype=np.float64))
    n = image.shape[-1]
    if n == box and abs(pixel_size - new_pixel_size) < 1e-9 * pixel_size:
        return image.numpy()
    if new_pixel_size > pixel_size:  # coarser: drop what the new grid cannot hold
        fy = torch.fft.fftfreq(n, d=pixel_size, dtype=torch.float64)
        fx = torch.fft.rfftfreq(n, d=pixel_size, dtype=torch.float64)
        keep = torch.hypot(fy[:, None], fx[None, :]) <= 0.5 / new_pixel_size
        image = torch.fft.irfft2(torch.fft.rfft2(image) * keep, s=(n, n))
    positions = (torch.arange(box, dtype=torch.float64) - box // 2) * (new_pixel_size / pixel_size) + n // 2
    normalised = positions / (n - 1) * 2.0 - 1.0
    grid_y, grid_x = torch.meshgrid(normalised, normalised, indexing="ij")
    grid = torch.stack([grid_x, grid_y], -1)[None]
    sampled = torch.nn.functional.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled[0, 0].numpy()
