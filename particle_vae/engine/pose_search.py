"""Likelihood search of in-plane poses against CTF-modulated references.

The image model is RELION's 2D one (:mod:`particle_vae.conventions`): a
particle is its class reference ``A_k`` turned by ``psi`` and moved by
``d = -o`` pixels, multiplied by the particle's CTF ``C`` in Fourier space,
plus Gaussian noise whose variance depends on spatial frequency only::

    X^(f) = C(f) exp(-2 pi i f.d / N) [Rot_psi A_k]^(f) + noise(f),
    E |noise(f)|^2 = sigma2(|f|)   (unnormalised rfft2 units, N^2 x pixel variance for white noise)

so that, up to a constant, the log-likelihood of a pose is

    L(k, psi, d) = sum_f Re[X^ conj(C B^) e^{+2 pi i f.d / N}] / sigma2  -  1/2 sum_f |C B^|^2 / sigma2,
    B = Rot_psi A_k,

with sums over the whole Fourier plane (the rfft half-plane counted with its
Hermitian weights) up to a resolution cutoff. The first term is evaluated for a
window of whole-pixel shifts at once by a separable discrete Fourier transform
(two small complex matrix products per image and rotation), which is as fast as
an FFT on the window and runs as batched matmuls on a GPU. Rotations come from a
grid of ``n_psi`` angles; the best pose is refined below the grid by fitting a
parabola through the neighbouring log-likelihoods in angle and in each shift
axis. The posterior over (class, angle, shift) with a Gaussian prior on the
shift gives a per-particle uncertainty.

Units: shifts ``d`` in pixels of the images searched (the particle centre moves
to ``+d``; RELION's origin is ``o = -d``), angles in degrees, frequencies as
rfft2 indices. The rfft2 grid helpers (Hermitian weights, frequency shells,
``shell_means`` for ``sigma2``) are in :mod:`particle_vae.fourier`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from particle_vae.conventions import warp_images
from particle_vae.fourier import frequency_radius, hermitian_weights

__all__ = [
    "rotated_spectra",
    "psi_grid",
    "PoseScores",
    "score_poses",
    "best_poses",
    "BestPoses",
    "local_refine",
]


# complex elements of the largest temporary of score_poses per chunk of classes (16 MB on the CPU)
_CHUNK_ELEMENTS_CPU = 1 << 21
_CHUNK_ELEMENTS_GPU = 1 << 27


def psi_grid(n_psi: int) -> np.ndarray:
    """``n_psi`` equally spaced angles in degrees, ``[0, 360)``."""
    return np.arange(n_psi, dtype=np.float64) * (360.0 / n_psi)


def rotated_spectra(references: torch.Tensor, psi_deg: np.ndarray) -> torch.Tensor:
    """rfft2 of every reference turned by every angle (``B(x) = A(R(psi) x)``).

    Args:
        references: ``(K, N, N)`` real images.
        psi_deg: ``(R,)`` degrees.
    Returns:
        ``(K, R, N, N // 2 + 1)`` complex.
    """
    k, n = references.shape[0], references.shape[-1]
    theta = torch.as_tensor(np.radians(psi_deg), dtype=references.dtype, device=references.device)
    repeated = references[:, None].expand(k, len(psi_deg), n, n).reshape(-1, n, n)
    turned = warp_images(repeated, theta.repeat(k), torch.zeros(k * len(psi_deg), 2, dtype=references.dtype,
                                                              device=references.device), mode="bicubic")
    return torch.fft.rfft2(turned).reshape(k, len(psi_deg), n, n // 2 + 1)


@dataclass
class PoseScores:
    """Log-likelihoods of a batch of particles on the pose grid.

    Attributes:
        loglik: ``(B, K, R, S, S)`` float64; axis 3 is the shift ``dy``, axis 4 ``dx``,
            both ``shifts[j]`` pixels.
        shifts: ``(S,)`` whole-pixel shifts ``-s .. s``.
    """

    loglik: torch.Tensor
    shifts: torch.Tensor


def _band(n: int, cutoff: float, inv_sigma2: torch.Tensor, dtype: torch.dtype):
    """The rfft2 coefficients within ``cutoff``: kept rows ``(Fy,)``, number of kept columns ``Fx``,
    their frequencies ``fy (Fy,)`` and ``fx (Fx,)`` (Fourier pixels, float64), and the weight
    ``(Fy, Fx)`` of each in the likelihood (Hermitian multiplicity x inverse noise power, 0 outside)."""
    device = inv_sigma2.device
    radius = frequency_radius(n, device=device)
    keep_rows = torch.nonzero((radius[:, 0] <= cutoff)).reshape(-1)
    keep_cols = int(math.floor(min(cutoff, n // 2))) + 1
    fy = torch.fft.fftfreq(n, device=device, dtype=torch.float64)[keep_rows] * n
    fx = torch.arange(keep_cols, device=device, dtype=torch.float64)
    inside = (radius[keep_rows][:, :keep_cols] <= cutoff).to(dtype)
    weight = (hermitian_weights(n, device=device, dtype=dtype)[keep_rows][:, :keep_cols] * inside
              * inv_sigma2[keep_rows][:, :keep_cols].to(dtype))
    return keep_rows, keep_cols, fy, fx, weight


def score_poses(spectra: torch.Tensor, ctf: torch.Tensor | None, reference_spectra: torch.Tensor, inv_sigma2: torch.Tensor,
                max_shift: int, cutoff: float, shift_step: int = 1) -> PoseScores:
    """Log-likelihood of every (class, angle, shift) for each particle.

    Args:
        spectra: ``(B, N, N // 2 + 1)`` complex rfft2 of the particles.
        ctf: ``(B, N, N // 2 + 1)`` real CTF of each particle, or ``None``.
        reference_spectra: ``(K, R, N, N // 2 + 1)`` from :func:`rotated_spectra`.
        inv_sigma2: ``(N, N // 2 + 1)`` inverse noise power per coefficient (0 drops a coefficient).
        max_shift: ``s``, pixels; shifts ``-s .. s`` on both axes are scored.
        cutoff: Fourier radius (Fourier pixels) beyond which coefficients are ignored.
        shift_step: whole pixels between scored shifts (the log-likelihood of data band-limited to
            ``cutoff`` varies on a scale of ``N / (2 cutoff)`` pixels).
    Returns:
        :class:`PoseScores`.
    """
    n = spectra.shape[-2]
    device = spectra.device
    keep_rows, keep_cols, fy, fx, weight = _band(n, cutoff, inv_sigma2, torch.float32)
    x = spectra[:, keep_rows][:, :, :keep_cols].to(torch.complex64)
    refs = reference_spectra[:, :, keep_rows][..., :keep_cols].to(torch.complex64)
    if ctf is not None:
        c = ctf[:, keep_rows][:, :, :keep_cols].to(torch.float32)
        xc = x * (c * weight)  # C is real: Re[X conj(C B)] = Re[(C X) conj(B)]
        c2w = c * c * weight
    else:
        xc = x * weight
        c2w = weight.expand(x.shape[0], -1, -1)
    b, k, r = x.shape[0], refs.shape[0], refs.shape[1]
    fy_n, fx_n = len(fy), len(fx)
    # norm term 1/2 sum |C B|^2 / sigma2: (B, K, R)
    power = (refs.real ** 2 + refs.imag ** 2).reshape(k * r, -1)
    norm = 0.5 * (c2w.reshape(b, -1) @ power.T).reshape(b, k, r).to(torch.float64)
    shifts = torch.arange(-max_shift, max_shift + 1, shift_step, device=device, dtype=torch.float64)
    s = len(shifts)
    ex = torch.exp(2j * math.pi * fx[:, None] * shifts[None, :] / n).to(torch.complex64)  # (Fx, S)
    ey = torch.exp(2j * math.pi * fy[:, None] * shifts[None, :] / n).to(torch.complex64)  # (Fy, S)
    # cross term: sum_f w Re[C X conj(B) e^{2 pi i (fx dx + fy dy)/N}]; the Hermitian weight 2 stands in for the
    # mirrored half-plane, whose term is the complex conjugate of this one. The particle side is moved to every
    # x-shift first (small: B x Fy x Fx x S), then one batched product over fx per row fy gives every (class,
    # angle, particle, x-shift), and one product over fy every y-shift; no (B, K, R, Fy, Fx) array is formed.
    moved = (xc.permute(1, 2, 0)[..., None] * ex[None, :, None, :]).reshape(fy_n, fx_n, b * s)  # (Fy, Fx, B*S_x)
    loglik = torch.empty((b, k, r, s, s), dtype=torch.float64, device=device)
    # classes in chunks: on the CPU, temporaries under glibc's mmap threshold are reused instead of being
    # page-faulted afresh for every batch (which cost more system time than the products themselves)
    budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS_GPU
    step = max(1, budget // max(1, fy_n * r * b * s))
    for first in range(0, k, step):
        last = min(k, first + step)
        rows = refs[first:last].conj().reshape((last - first) * r, fy_n, fx_n).transpose(0, 1)  # (Fy, kR, Fx)
        along_x = torch.bmm(rows, moved)  # (Fy, kR, B*S_x)
        cross = (ey.T @ along_x.reshape(fy_n, -1)).real.reshape(s, last - first, r, b, s)  # (S_y, k, R, B, S_x)
        torch.sub(cross.permute(3, 1, 2, 0, 4), norm[:, first:last, :, None, None], out=loglik[:, first:last])
    return PoseScores(loglik=loglik, shifts=shifts)


@dataclass
class BestPoses:
    """The most likely pose of each particle and the posterior around it.

    Attributes:
        classes: ``(B,)`` int64, the best class.
        psi_deg: ``(B,)`` refined angle (degrees, ``[0, 360)``).
        shift_px: ``(B, 2)`` refined ``d = (dx, dy)`` pixels (the particle centre; RELION origin ``-d``).
        probability: ``(B,)`` posterior probability of the best grid pose.
        psi_std_deg: ``(B,)`` circular standard deviation of the angle posterior, degrees.
        class_probability: ``(B, K)`` posterior over classes.
        log_evidence: ``(B,)`` log of the summed likelihood (with priors), up to a constant.
        top: ``(B, P, 4)`` float64 rows ``(class, psi_deg, dx, dy)`` of the P most probable grid poses;
        top_weight: ``(B, P)`` their normalised posterior weights.
        mode_weight: ``(B,)`` posterior probability of the best grid pose's neighbourhood (its class, the
            neighbouring angles and shifts on the grid).
        away_shift_sum: ``(B, 2)`` pixels, the sum of ``probability x d`` over every other grid pose: the
            posterior mean of ``d`` is ``mode_weight x (the mode's d) + away_shift_sum``.
    """

    classes: torch.Tensor
    psi_deg: torch.Tensor
    shift_px: torch.Tensor
    probability: torch.Tensor
    psi_std_deg: torch.Tensor
    class_probability: torch.Tensor
    log_evidence: torch.Tensor
    top: torch.Tensor
    top_weight: torch.Tensor
    mode_weight: torch.Tensor
    away_shift_sum: torch.Tensor

    def shift_mean_px(self, mode_shift_px: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean of ``d`` ``(B, 2)``, pixels, with the mode's neighbourhood placed at ``mode_shift_px``
        (default :attr:`shift_px`, e.g. after :func:`local_refine`).

        The particle's centre in the image does not depend on the class or angle (every class reference
        is centred the same way), so the mean over the whole posterior is meaningful; where the posterior
        is split between poses it is the estimate of least expected squared error.
        """
        mode = self.shift_px if mode_shift_px is None else mode_shift_px
        return self.mode_weight[:, None] * mode.to(self.away_shift_sum) + self.away_shift_sum


def _parabola_offset(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Where a parabola through three equally spaced values peaks, in steps from the centre, within [-0.5, 0.5]."""
    curvature = left - 2 * centre + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp(max=-1e-12), torch.zeros_like(centre))
    return offset.clamp(-0.5, 0.5)


def best_poses(scores: PoseScores, psi_deg: np.ndarray, log_class_prior: torch.Tensor | None = None,
               shift_sigma: float | None = None, top: int = 4) -> BestPoses:
    """Posterior summaries of :func:`score_poses` output.

    Args:
        scores: log-likelihoods ``(B, K, R, S, S)``.
        psi_deg: ``(R,)`` the angle grid (equally spaced over 360 degrees).
        log_class_prior: ``(K,)`` log prior class probabilities, or ``(B, K)`` per particle (``-inf``
            rules a class out); default uniform.
        shift_sigma: standard deviation (pixels) of the Gaussian prior on ``d`` about 0 (``None``: flat).
        top: number ``P`` of most probable grid poses returned for the reference update.
    """
    loglik = scores.loglik
    b, k, r, s, _ = loglik.shape
    # in place on one copy: at 100 classes these arrays are hundreds of MB per batch
    logpost = loglik.clone()
    ruled_out = None
    if log_class_prior is not None:
        prior = log_class_prior.to(loglik)
        prior = (prior[None] if prior.dim() == 1 else prior).expand(b, k)
        logpost += prior[:, :, None, None, None]
        ruled_out = torch.isneginf(prior)
    if shift_sigma is not None and shift_sigma > 0:
        d2 = scores.shifts[:, None] ** 2 + scores.shifts[None, :] ** 2
        logpost -= (d2 / (2 * shift_sigma ** 2))[None, None, None]
    flat = logpost.reshape(b, -1)
    peak = flat.max(dim=1).values
    # below e^-100 of the peak a pose weighs nothing; the clamp also keeps exp off its slow path for huge arguments
    posterior = flat.sub_(peak[:, None]).clamp_(min=-100.0).exp_()
    if ruled_out is not None and bool(ruled_out.any()):
        posterior.view(b, k, -1).masked_fill_(ruled_out[:, :, None], 0.0)  # exactly zero, not e^-100
    total = posterior.sum(dim=1)
    posterior /= total[:, None]
    evidence = peak + torch.log(total)
    probability, best = posterior.max(dim=1)
    kk, rr, yy, xx = np.unravel_index(best.cpu().numpy(), (k, r, s, s))
    kk, rr, yy, xx = (torch.as_tensor(a, device=loglik.device) for a in (kk, rr, yy, xx))
    rows = torch.arange(b, device=loglik.device)
    centre = loglik[rows, kk, rr, yy, xx]
    step = 360.0 / r
    # angle: parabola through the best shift's log-likelihood at the neighbouring angles (the grid is periodic)
    left = loglik[rows, kk, (rr - 1) % r, yy, xx]
    right = loglik[rows, kk, (rr + 1) % r, yy, xx]
    psi = (torch.as_tensor(psi_deg, device=loglik.device, dtype=torch.float64)[rr] + step * _parabola_offset(left, centre, right)) % 360.0
    shift = torch.stack([scores.shifts[xx], scores.shifts[yy]], dim=1)
    for axis, index in ((0, xx), (1, yy)):
        inner = (index > 0) & (index < s - 1)
        lo, hi = (index - 1).clamp(min=0), (index + 1).clamp(max=s - 1)
        if axis == 0:
            l, h = loglik[rows, kk, rr, yy, lo], loglik[rows, kk, rr, yy, hi]
        else:
            l, h = loglik[rows, kk, rr, lo, xx], loglik[rows, kk, rr, hi, xx]
        shift[:, axis] += torch.where(inner, _parabola_offset(l, centre, h), torch.zeros_like(centre))
    post = posterior.reshape(b, k, r, s, s)
    class_probability = post.sum(dim=(2, 3, 4))
    angle_marginal = post.sum(dim=(1, 3, 4))  # (B, R)
    angles = torch.as_tensor(np.radians(psi_deg), device=loglik.device, dtype=torch.float64)
    resultant = torch.sqrt((angle_marginal * torch.cos(angles)).sum(1) ** 2 + (angle_marginal * torch.sin(angles)).sum(1) ** 2)
    psi_std = torch.rad2deg(torch.sqrt(-2 * torch.log(resultant.clamp(1e-12, 1.0))))
    top = min(top, flat.shape[1])
    weight, where = posterior.topk(top, dim=1)
    tk, tr, ty, tx = np.unravel_index(where.cpu().numpy(), (k, r, s, s))
    top_rows = torch.stack([torch.as_tensor(tk, dtype=torch.float64), torch.as_tensor(psi_deg[tr], dtype=torch.float64),
                            scores.shifts.cpu()[torch.as_tensor(tx)], scores.shifts.cpu()[torch.as_tensor(ty)]], dim=-1)
    weight = weight / weight.sum(dim=1, keepdim=True)
    # the mode's neighbourhood: its class, angles rr-1..rr+1 (periodic), shifts within one grid step on each axis
    near = torch.zeros((b, r, s, s), dtype=torch.bool, device=loglik.device)
    for dr in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near[rows, (rr + dr) % r, (yy + dy).clamp(0, s - 1), (xx + dx).clamp(0, s - 1)] = True
    # shift marginals (B, S_y, S_x) of the whole posterior and of the mode's neighbourhood; one pass over post
    near_post = (post[rows, kk] * near).sum(dim=1)
    shift_post = post.sum(dim=(1, 2))
    mode_weight = near_post.sum(dim=(1, 2))
    away_post = shift_post - near_post
    away = torch.stack([away_post.sum(dim=1) @ scores.shifts, away_post.sum(dim=2) @ scores.shifts], dim=1)
    return BestPoses(classes=kk, psi_deg=psi, shift_px=shift, probability=probability, psi_std_deg=psi_std,
                     class_probability=class_probability, log_evidence=evidence, top=top_rows.to(loglik.device),
                     top_weight=weight, mode_weight=mode_weight, away_shift_sum=away)


def local_refine(spectra: torch.Tensor, ctf: torch.Tensor | None, references: torch.Tensor, inv_sigma2: torch.Tensor,
                 classes: torch.Tensor, psi_deg: torch.Tensor, shift_px: torch.Tensor, cutoff: float,
                 angle_range: float, n_angles: int = 9, shift_range: float = 1.0,
                 n_shifts: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine each particle's pose on a fine grid around a starting pose, against its own class only.

    Args:
        spectra, ctf, inv_sigma2, cutoff: as for :func:`score_poses`.
        references: ``(K, N, N)`` real class references.
        classes: ``(B,)`` class of each particle; psi_deg ``(B,)`` and shift_px ``(B, 2)``: starting pose.
        angle_range: degrees either side of the start (``n_angles`` angles, odd);
        shift_range: pixels either side of the start on each axis (``n_shifts`` values, odd).
    Returns:
        ``(psi_deg (B,), shift_px (B, 2))``, the best of the fine grid refined by a parabola through its neighbours.
    """
    n = spectra.shape[-2]
    device = spectra.device
    b = spectra.shape[0]
    keep_rows, keep_cols, fy, fx, weight = _band(n, cutoff, inv_sigma2, torch.float64)
    offsets = torch.linspace(-angle_range, angle_range, n_angles, device=device, dtype=torch.float64)
    angles = psi_deg.to(torch.float64)[:, None] + offsets[None]  # (B, A)
    turned = warp_images(references.to(torch.float64)[classes].repeat_interleave(n_angles, 0), torch.deg2rad(angles).reshape(-1),
                         torch.zeros(b * n_angles, 2, dtype=torch.float64, device=device), mode="bicubic")
    refs = torch.fft.rfft2(turned)[:, keep_rows][..., :keep_cols].reshape(b, n_angles, len(fy), len(fx))
    x = spectra[:, keep_rows][:, :, :keep_cols].to(torch.complex128)
    c = ctf[:, keep_rows][:, :, :keep_cols].to(torch.float64) if ctf is not None else torch.ones_like(x.real)
    xc = x * c * weight
    norm = 0.5 * ((refs.real ** 2 + refs.imag ** 2) * (c * c * weight)[:, None]).sum(dim=(-2, -1))  # (B, A)
    steps = torch.linspace(-shift_range, shift_range, n_shifts, device=device, dtype=torch.float64)
    dx = shift_px[:, 0:1].to(torch.float64) + steps[None]  # (B, S)
    dy = shift_px[:, 1:2].to(torch.float64) + steps[None]
    ex = torch.exp(2j * math.pi * fx[None, :, None] * dx[:, None, :] / n)  # (B, Fx, S)
    ey = torch.exp(2j * math.pi * fy[None, :, None] * dy[:, None, :] / n)  # (B, Fy, S)
    q = xc[:, None] * refs.conj()  # (B, A, Fy, Fx)
    cross = (ey.transpose(1, 2)[:, None] @ (q @ ex[:, None])).real  # (B, A, S_y, S_x)
    loglik = cross - norm[..., None, None]
    flat = loglik.reshape(b, -1).argmax(dim=1).cpu().numpy()
    aa, yy, xx = (torch.as_tensor(v, device=device) for v in np.unravel_index(flat, (n_angles, n_shifts, n_shifts)))
    rows = torch.arange(b, device=device)
    centre = loglik[rows, aa, yy, xx]

    def neighbour_offset(index, size, pick):
        inner = (index > 0) & (index < size - 1)
        lo, hi = pick((index - 1).clamp(min=0)), pick((index + 1).clamp(max=size - 1))
        return torch.where(inner, _parabola_offset(lo, centre, hi), torch.zeros_like(centre))

    angle_step = 2 * angle_range / (n_angles - 1)
    shift_step = 2 * shift_range / (n_shifts - 1)
    psi = angles[rows, aa] + angle_step * neighbour_offset(aa, n_angles, lambda i: loglik[rows, i, yy, xx])
    new_x = dx[rows, xx] + shift_step * neighbour_offset(xx, n_shifts, lambda i: loglik[rows, aa, yy, i])
    new_y = dy[rows, yy] + shift_step * neighbour_offset(yy, n_shifts, lambda i: loglik[rows, aa, i, xx])
    return psi % 360.0, torch.stack([new_x, new_y], dim=1)
