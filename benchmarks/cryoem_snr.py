"""Simulated cryo-EM with ground truth: clustering and in-plane pose accuracy against SNR.

For each SNR: simulate the easy two-protein mixture of tests/test_mixture.py
(T20S, seen from the side, and GroEL, seen down its 7-fold axis, with
``--views top``; 32 px at 8 A; CTF; shifts up to 3 px), train TARGET-VAE
(``--preset tiny``), infer (the model's own poses, ``--no-refine``; the refined
poses are scored by ``lowsnr_mixture.py``), ``analyze --k 2``, and score against the
simulator's truth:

* clustering accuracy (Hungarian matching of classes to proteins);
* T20S in-plane angle error: the spread of ``psi_true - psi_inferred`` around
  its circular mean, modulo 180 degrees (the side view's 2-fold symmetry):
  ``RMS wrap180(delta - mean)`` in degrees (``nan`` if no class is T20S);
* T20S shift error: RMS (pixels) of the inferred particle centre minus the
  true one after removing their mean difference (the model's frame is defined
  up to a shift);
* sharpness of each class average: best-rotation correlation with the true
  centred projection.

  python benchmarks/cryoem_snr.py --preset quick --data-dir ../shared/data --out benchmarks/results/cryoem_snr_quick.json

Presets: ``quick`` (SNR 10, 1, 0.1; 1,200 particles, 6 epochs, as the test) and ``paper``
(SNR 1, 0.1, 0.03; 10,000 particles, 50 epochs, the ``tiny`` model at full
size; GPU). Writes OUT (JSON), OUT with suffix .md and the work folders under
--work (default OUT without suffix).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from particle_vae import api
from particle_vae.analysis.metrics import clustering_accuracy, rotational_correlation
from particle_vae.commands import train as train_command
from particle_vae.io.mrc import MRCStack
from particle_vae.io.paths import data_root
from particle_vae.io.star import ParticleStar

log = logging.getLogger("cryoem_snr")

RUN_SIZES = {
    "quick": {"snrs": [10.0, 1.0, 0.1], "n": 1200, "epochs": 6, "train": ["--batch-size", "16"]},
    "paper": {"snrs": [1.0, 0.1, 0.03], "n": 10000, "epochs": 50, "train": ["--batch-size", "64"]},
}
#: the simulation's settings besides the structures, n and SNR (particle_vae.data.simulation.SimulationConfig fields)
SIMULATE = {"box": 32, "pixel_size": 8.0, "views": "top"}


def wrap(angle_deg, period: float = 360.0):
    """Angles wrapped to ``[-period / 2, period / 2)``."""
    return np.mod(np.asarray(angle_deg, dtype=np.float64) + period / 2, period) - period / 2


def score(sim: Path, out: Path) -> dict:
    """Scores of one analysed run against the simulator's truth (see the module docstring)."""
    particles = ParticleStar(out / "clustered_particles.star").particles
    truth = particles["pvaeTrueClass"].to_numpy()
    classes = particles["rlnClassNumber"].to_numpy()
    record = json.loads((out / "analysis.json").read_text())
    apix = float(record["averages"]["pixel_size"])
    averages = MRCStack(out / "class_averages.mrcs").read(0, record["k"])
    centred = MRCStack(sim / "centred.mrcs")
    result = {"clustering_accuracy": clustering_accuracy(truth, classes), "classes": []}
    angle_error = shift_error = math.nan
    for number in range(1, record["k"] + 1):
        members = classes == number
        protein = int(np.bincount(truth[members]).argmax())
        first = int(np.flatnonzero(truth == protein)[0])
        sharp = float(rotational_correlation(averages[number - 1], centred.read(first, first + 1)[0])[1].max())
        result["classes"].append({"class": number, "protein": protein, "purity": float(np.mean(truth[members] == protein)),
                                  "count": int(members.sum()), "sharpness": sharp})
        if protein == 1 and math.isnan(angle_error):
            rows = members & (truth == 1)
            delta = particles["pvaeTrueAnglePsi"].to_numpy()[rows] - particles["rlnAnglePsi"].to_numpy()[rows]
            doubled = np.radians(2 * delta)  # 2-fold symmetric view: angles modulo 180
            mean = np.degrees(np.arctan2(np.sin(doubled).mean(), np.cos(doubled).mean())) / 2
            angle_error = float(np.sqrt((wrap(delta - mean, 180.0) ** 2).mean()))
            true_centre = -particles[["pvaeTrueOriginXAngst", "pvaeTrueOriginYAngst"]].to_numpy()[rows] / apix
            found_centre = -particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[rows] / apix
            difference = found_centre - true_centre
            shift_error = float(np.sqrt(((difference - difference.mean(0)) ** 2).sum(1).mean()))
    result.update(t20s_angle_rmse_deg=angle_error, t20s_shift_rmse_px=shift_error)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(RUN_SIZES), default="quick")
    parser.add_argument("--data-dir", type=Path, help="reference-data folder holding structures/ (or $PARTICLE_VAE_DATA)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--snrs", type=float, nargs="+", help="override the preset's SNRs")
    parser.add_argument("--n", type=int, help="override the preset's particle count")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--no-ctf", action="store_true", help="simulate without a CTF (the setting of tests/test_mixture.py)")
    parser.add_argument("--extra-train", nargs=argparse.REMAINDER, default=[], help="more options for particle-vae train (last)")
    args = parser.parse_args(argv)
    earlier = set(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in set(logging.getLogger().handlers) - earlier:  # the steps' own lines only from WARNING up (as particle-vae -q)
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or not record.name.startswith("particle_vae"))
    preset = RUN_SIZES[args.preset]
    snrs = args.snrs or preset["snrs"]
    n = args.n or preset["n"]
    epochs = args.epochs or preset["epochs"]
    work = args.work or args.out.with_suffix("")
    structures = data_root(args.data_dir) / "structures"
    results = {"preset": args.preset, "ctf": not args.no_ctf, "n": n, "epochs": epochs, "train": preset["train"] + args.extra_train,
               "date": time.strftime("%Y-%m-%d"), "rows": []}
    for snr in snrs:
        folder = work / f"snr_{snr:g}"
        started = time.perf_counter()
        sim = folder / "sim"
        simulated = api.simulate(api.SimulateRequest.from_preset(
            "t20s", n, sim, structures=[structures / "t20s_3j9i.pdb", structures / "groel_1oel.pdb"], snr=snr, **SIMULATE,
            ctf=not args.no_ctf, write_clean=True, overwrite=True, progress=False))
        # the train options as words (the preset's and --extra-train's), read by the train command's parser
        trained = api.train(train_command.request_from_words([
            simulated.star, "--preset", "tiny", "--epochs", epochs, "--seed", 0, *preset["train"], *args.extra_train,
            "--out", folder / "run", "--overwrite"]))
        inferred = api.infer(api.InferRequest(trained.run, folder / "particles_vae.star", refine=None, overwrite=True))
        analysed = api.analyze(api.AnalyzeRequest(inferred.star, folder / "analysis", run=trained.run, k=2, gallery=0,
                                                  overwrite=True))
        row = {"snr": snr, **score(sim, analysed.out), "seconds": round(time.perf_counter() - started, 1)}
        log.info("SNR %g: %s", snr, row)
        results["rows"].append(row)
    lines = ["| SNR | clustering acc. | T20S angle RMSE (deg, mod 180) | T20S shift RMSE (px) | sharpness T20S / GroEL | time (s) |",
             "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        sharp = {c["protein"]: c["sharpness"] for c in row["classes"]}
        lines.append(f"| {row['snr']:g} | {100 * row['clustering_accuracy']:.1f}% | {row['t20s_angle_rmse_deg']:.1f} | "
                     f"{row['t20s_shift_rmse_px']:.2f} | {sharp.get(1, math.nan):.3f} / {sharp.get(2, math.nan):.3f} | {row['seconds']} |")
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
