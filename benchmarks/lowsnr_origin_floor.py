"""Where the origin error of 2D alignment comes from, on a finished low-SNR mixture run.

Run after ``benchmarks/lowsnr_mixture.py`` (it reads that script's work folder:
``sim/`` and ``particles_vae.star`` / ``.npz``). On the first ``--n`` particles,
each particle's shift is searched again (``pose_search.local_refine``: +-5
degrees, +-1 px around the written pose, Fourier cutoff ``--cutoff``) in three
settings, and the origin error is scored as in the benchmark:

* ``noisy vs class references``: the particles as recorded against the final
  refinement references (the benchmark's situation, re-searched locally);
* ``clean vs class references``: the same particles without noise (re-rendered
  by the simulator from ``simulation.json``, with their CTF and shift) against
  the same references. Noise plays no part here, so this is the bias of aligning
  a particle to an average of other views: a class average is a blend of the
  views in the class, and a particle lines up with it by overlap, not by its
  own centre of mass;
* ``noisy vs own projection``: each noisy particle against its own true,
  centred projection (a perfect, view-specific reference), starting at the
  true pose: the error noise alone leaves (the shift's spread, pixels).

  python benchmarks/lowsnr_origin_floor.py --work benchmarks/results/lowsnr_snr0.1 --out benchmarks/results/lowsnr_origin_floor.json
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="work folder of benchmarks/lowsnr_mixture.py")
    parser.add_argument("--data-dir", type=Path, help="reference-data folder holding structures/ (or $PARTICLE_VAE_DATA)")
    parser.add_argument("--n", type=int, default=600, help="particles scored (default 600)")
    parser.add_argument("--cutoff", type=float, default=16.0, help="Fourier cutoff of the search, Fourier pixels (default 16)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from particle_vae.analysis.pose_metrics import origin_errors
    from particle_vae.data.ctf import ctf_from_table
    from particle_vae.engine.pose_search import local_refine
    from particle_vae.io.mrc import read_map
    from particle_vae.io.paths import data_root
    from particle_vae.io.star import ParticleStar

    started = time.perf_counter()
    sim_dir = args.work / "sim"
    simulator = mixture.simulator_of(sim_dir)
    m = min(args.n, simulator.config.n)
    clean, centred = simulator.render(0, m, centred=True)
    noisy = torch.as_tensor(np.array(read_map(sim_dir / "particles.mrcs")[0][:m]))
    recorded = ParticleStar(sim_dir / "particles.star")
    ctf = ctf_from_table(recorded.ctf_parameters().iloc[:m], mixture.BOX, mixture.APIX)
    written = ParticleStar(args.work / "particles_vae.star").particles.iloc[:m]
    arrays = np.load(args.work / "particles_vae.npz")
    references = torch.as_tensor(arrays["refine_references"], dtype=torch.float32)
    classes = torch.as_tensor(arrays["refine_classes"][:m], dtype=torch.int64)
    psi = torch.tensor(written["rlnAnglePsi"].to_numpy(np.float64))
    shift = -torch.tensor(written[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64) / mixture.APIX)
    inv_sigma2 = torch.ones(mixture.BOX, mixture.BOX // 2 + 1)  # white noise: the scale does not move the maximum
    inv_sigma2[0, 0] = 0.0
    truth = mixture.truth(sim_dir / "particles.star", data_root(args.data_dir) / "structures")
    centres, true_classes = truth["centres"][:m], truth["classes"][:m]

    def search(images, refs, ref_index, psi0, shift0):
        out_psi, out_shift = [], []
        for start in range(0, m, 50):
            rows = slice(start, min(start + 50, m))
            found = local_refine(torch.fft.rfft2(images[rows].float()), ctf[rows], refs, inv_sigma2, ref_index[rows],
                                 psi0[rows].float(), shift0[rows].float(), args.cutoff, angle_range=5.0, shift_range=1.0)
            out_psi.append(found[0])
            out_shift.append(found[1])
        return torch.cat(out_psi).double().numpy(), torch.cat(out_shift).double().numpy()

    def origin_error(psi_deg, shift_px):
        errors = origin_errors(-shift_px, psi_deg, centres, true_classes)
        return {"mean_px": round(float(errors.mean()), 3),
                **{name: round(float(errors[true_classes == number].mean()), 3)
                   for number, (name, _) in enumerate(mixture.STRUCTURES, start=1)}}

    results = {"particles": m, "cutoff_fourier_px": args.cutoff, "as_written": origin_error(psi.numpy(), shift.numpy()),
               "noisy_vs_class_references": origin_error(*search(noisy, references, classes, psi, shift)),
               "clean_vs_class_references": origin_error(*search(clean, references, classes, psi, shift))}
    true_psi = torch.as_tensor(recorded.particles["pvaeTrueAnglePsi"].to_numpy(np.float64)[:m])
    true_shift = -torch.as_tensor(recorded.particles[["pvaeTrueOriginXAngst", "pvaeTrueOriginYAngst"]].to_numpy(np.float64)[:m]
                                  / mixture.APIX)
    _, own_shift = search(noisy, centred.float(), torch.arange(m), true_psi, true_shift)
    results["noisy_vs_own_projection_shift_error_px"] = round(float(np.hypot(*(own_shift - true_shift.numpy()).T).mean()), 3)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
