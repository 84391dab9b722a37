"""What limits the purity of 2D classes at low SNR, on a finished low-SNR mixture run.

Run after ``benchmarks/lowsnr_mixture.py`` (it reads that script's work folder:
``sim/`` and ``particles_vae.star`` / ``.npz``). Every particle is scored (the
likelihood of :mod:`particle_vae.engine.pose_search`, white noise of the power
measured against the noise-free particles, best of 72 angles and whole-pixel
shifts up to 4 px, Fourier cutoff ``--cutoff``) against:

* ``banks``: the noise-free, centred projections of every other particle of
  each structure (one per true view; the particle's own is left out), and
  random subsets of them with as many views per structure as the refinement
  has classes of that structure (``--draws`` subsets each), and with 80 and 200
  views per structure. Each particle goes to the structure of its best view;
  the fraction that goes to its own structure is the accuracy a 2D
  classification with perfect references at those views would reach;
* ``refinement``: the final class references of ``infer`` (the particles
  normalised as ``infer`` reads them), each class labelled with the structure
  most of its particles have (the truth, for this diagnosis only), at the
  search's cutoff and at the low resolutions of the structure decision
  (``--low-cutoffs``): the same accuracy for the references the refinement
  really has.

  python benchmarks/lowsnr_class_floor.py --work benchmarks/results/lowsnr_snr0.1 --out benchmarks/results/lowsnr_class_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowsnr_mixture as mixture  # noqa: E402

from particle_vae.data.ctf import ctf_from_table  # noqa: E402
from particle_vae.data.preprocess import Preprocessing, radial_distance  # noqa: E402
from particle_vae.engine.pose_search import psi_grid, rotated_spectra, score_poses  # noqa: E402
from particle_vae.engine.refine import inverse_noise_power  # noqa: E402
from particle_vae.fourier import shell_means  # noqa: E402
from particle_vae.io.mrc import read_map  # noqa: E402
from particle_vae.io.star import ParticleStar  # noqa: E402

MAX_SHIFT = 4


def best_per_reference(spectra: torch.Tensor, ctf: torch.Tensor, references: torch.Tensor, inv_sigma2: torch.Tensor,
                       cutoff: float, batch: int = 8) -> np.ndarray:
    """``(M, K)`` float32: each particle's best log-likelihood over angles and shifts against each reference."""
    turned = rotated_spectra(references.to(torch.float32), psi_grid(72))
    out = np.empty((len(spectra), len(references)), np.float32)
    for start in range(0, len(spectra), batch):
        rows = slice(start, start + batch)
        scores = score_poses(spectra[rows].to(torch.complex64), ctf[rows].to(torch.float32), turned,
                             inv_sigma2.to(torch.float32), MAX_SHIFT, cutoff)
        out[rows] = scores.loglik.flatten(2).max(dim=2).values.numpy()
    return out


def measured_inverse_noise_power(residual_spectra: torch.Tensor, box: int) -> torch.Tensor:
    """``(N, N // 2 + 1)`` 1 / noise power per coefficient, measured on the spectra of noise-only images ``(M, N, N // 2 + 1)``."""
    return inverse_noise_power(shell_means(residual_spectra.real ** 2 + residual_spectra.imag ** 2, box).mean(0), box)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="work folder of benchmarks/lowsnr_mixture.py")
    parser.add_argument("--cutoff", type=float, default=17.0,
                        help="Fourier cutoff of the banks and the full-resolution score, Fourier pixels (default 17: "
                             "the refinement's last search on the SNR 0.1 benchmark)")
    parser.add_argument("--low-cutoffs", type=float, nargs="+", default=[4.0, 5.0, 6.0, 8.0],
                        help="low-resolution cutoffs for the refinement's references (default 4 5 6 8)")
    parser.add_argument("--draws", type=int, default=20, help="random view subsets per bank size (default 20)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sim_dir = args.work / "sim"
    simulator = mixture.simulator_of(sim_dir)
    m, box = simulator.config.n, mixture.BOX
    clean, centred = (images.to(torch.float64) for images in simulator.render(0, m, centred=True))
    noisy = torch.as_tensor(np.array(read_map(sim_dir / "particles.mrcs")[0]), dtype=torch.float64)
    recorded = ParticleStar(sim_dir / "particles.star")
    truth = recorded.particles["pvaeTrueClass"].to_numpy().astype(np.int64)
    structures = np.unique(truth)
    ctf = ctf_from_table(recorded.ctf_parameters(), box, mixture.APIX).to(torch.float64)
    spectra = torch.fft.rfft2(noisy)
    inv_sigma2 = measured_inverse_noise_power(spectra - torch.fft.rfft2(clean), box)

    # 1. perfect references: every other particle's noise-free view of each structure
    per_view = {}
    for s in structures:
        members = np.flatnonzero(truth == s)
        scores = best_per_reference(spectra, ctf, centred[members], inv_sigma2, args.cutoff)
        scores[members, np.arange(len(members))] = -np.inf  # the particle's own view is left out
        per_view[int(s)] = scores
        print(f"bank of structure {s}: {len(members)} views, {time.perf_counter() - started:.0f} s", flush=True)

    def bank_accuracy(views: dict[int, np.ndarray]) -> float:
        best = np.stack([per_view[int(s)][:, views[int(s)]].max(1) for s in structures], 1)
        return float((structures[best.argmax(1)] == truth).mean())

    arrays = np.load(args.work / "particles_vae.npz")
    classes = arrays["refine_classes"]
    counts = np.zeros((arrays["refine_references"].shape[0], len(structures)), np.int64)
    np.add.at(counts, (classes, np.searchsorted(structures, truth)), 1)
    class_structure = structures[counts.argmax(1)]
    kept = counts.sum(1) > 0
    classes_per_structure = {int(s): int(((class_structure == s) & kept).sum()) for s in structures}
    rng = np.random.default_rng(0)
    banks = {"all views (own left out)": {"views": {int(s): int((truth == s).sum()) - 1 for s in structures},
                                          "accuracy": bank_accuracy({int(s): np.arange((truth == s).sum()) for s in structures})}}
    sizes = {"as many views as refinement classes": classes_per_structure,
             "80 views each": {int(s): 80 for s in structures}, "200 views each": {int(s): 200 for s in structures}}
    for name, size in sizes.items():
        draws = [bank_accuracy({int(s): rng.choice((truth == s).sum(), size[int(s)], replace=False) for s in structures})
                 for _ in range(args.draws)]
        banks[name] = {"views": size, "accuracy_mean": round(float(np.mean(draws)), 4), "accuracy_min": round(float(np.min(draws)), 4)}

    # 2. the refinement's own references, the particles normalised as infer reads them
    radius = Preprocessing(box=box, normalize="background").effective_background_radius
    outside = radial_distance(box, dtype=torch.float64) > radius
    background = noisy[:, outside]
    scale = background.std(dim=-1, correction=0)[:, None, None]
    normalised = (noisy - background.mean(dim=-1)[:, None, None]) / scale
    normalised_spectra = torch.fft.rfft2(normalised)
    normalised_inv = measured_inverse_noise_power(normalised_spectra - torch.fft.rfft2(clean / scale), box)
    references = torch.as_tensor(arrays["refine_references"], dtype=torch.float64)
    refinement = {}
    for cutoff in [args.cutoff, *args.low_cutoffs]:
        scores = best_per_reference(normalised_spectra, ctf, references, normalised_inv, cutoff)
        scores[:, ~kept] = -np.inf
        chosen = class_structure[scores.argmax(1)]
        refinement[f"{cutoff:g}"] = {"resolution_A": round(box * mixture.APIX / cutoff, 1),
                                     "accuracy": round(float((chosen == truth).mean()), 4)}
    own = class_structure[classes]
    results = {"work": str(args.work), "particles": int(m), "cutoff_fourier_px": args.cutoff,
               "classes_per_structure": classes_per_structure, "banks": banks,
               "refinement": {"own_class_accuracy": round(float((own == truth).mean()), 4), "best_class_at_cutoff": refinement},
               "seconds": round(time.perf_counter() - started, 1), "machine": f"{mixture.os.cpu_count()} CPU cores, {mixture.platform_name()}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mixture.atomic_json(args.out, results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
