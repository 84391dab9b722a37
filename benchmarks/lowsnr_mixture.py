"""Low-SNR mixture benchmark: this project's poses and classes beside RELION 2D classification.

Data (``particle_vae.data.simulation``): three structures of different size, shape
and symmetry from ``<data>/structures`` (the 26S proteasome 4CR2 and the 30S
ribosomal subunit 4V4R, both asymmetric, and the C6 p97 hexamer 3CF3), 64 px at
5 A/px, uniform random 3D views, shifts up to 3 px, the CTF drawn from the
EMPIAR-10025 defocus values, white noise at the requested SNR.

This project: ``train --preset tiny --ctf --zdim 8`` (10 epochs, seed 0), ``infer`` (which
refines the poses by default), ``analyze --k 3`` and ``analyze --k 10``.
RELION (when ``relion_refine`` is on PATH): ``relion_preprocess --norm`` of the
stack (RELION expects normalised particles), then ``relion_refine`` 2D
classification with K = 3 and K = 10, 25 iterations, ``--ctf`` (the exact
commands are written to the JSON).

Scores, against the simulator's truth:

* clustering accuracy at K = 3 (Hungarian matching) and purity at K = 10 (``analyze``
  on the latents), and the purity of the classes of ``infer``'s pose refinement;
* origin error: mean distance (pixels) between the written and the true particle
  centre (the projected centre of mass of the structure), with one constant
  offset per structure in the frame of the class average
  (:func:`particle_vae.analysis.pose_metrics.origin_errors`);
* same-view psi error: median error of ``psi_j - psi_i`` over pairs of particles of
  one structure whose true viewing directions are within 10 degrees, with the
  symmetry of 3CF3 taken into account when its map has it (the axis is found from
  the map; the correlation of the turned map is recorded, and below 0.9 the map
  is scored as asymmetric);
* wall time and peak memory (largest resident set of any step).

  python benchmarks/lowsnr_mixture.py --snr 0.1 --data-dir ../shared/data --out benchmarks/results/lowsnr_snr0.1.json

Writes OUT (JSON), OUT with suffix .md (the table) and the work folders under
--work (default OUT without suffix).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STRUCTURES = [("polnet_4cr2_5A.mrc", "C1"), ("polnet_4v4r_30S_5A.mrc", "C1"), ("polnet_3cf3_5A.mrc", "C6")]
BOX, APIX, MAX_SHIFT = 64, 5.0, 3.0
#: a point group is used for the psi pairs only when the map has it: its turned density correlates this well
SYMMETRY_MIN_CORRELATION = 0.9


def timed(command: list[str], log_path: Path, cwd: Path | None = None) -> dict:
    """Run a command, its output to ``log_path``; wall seconds and peak resident memory (MiB) of the process tree."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text()[-2000:]
        raise SystemExit(f"{' '.join(command)} failed (exit {code}); see {log_path}:\n{tail}")
    return {"command": " ".join(map(str, command)), "seconds": round(seconds, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "peak_mib": round(usage.ru_maxrss / 1024, 1)}


def particle_vae(*args) -> list[str]:
    return [sys.executable, "-m", "particle_vae", *map(str, args)]


def truth(star_path: Path, structures_dir: Path) -> dict:
    """True classes, angles, particle centres (projected centre of mass) and symmetry operators."""
    from particle_vae.analysis.pose_metrics import projected_centres, symmetry_operators
    from particle_vae.data.structures import load_density
    from particle_vae.io.star import ParticleStar

    particles = ParticleStar(star_path).particles
    classes = particles["pvaeTrueClass"].to_numpy().astype(np.int64)
    angles = particles[["pvaeTrueAngleRot", "pvaeTrueAngleTilt", "pvaeTrueAnglePsi"]].to_numpy(np.float64)
    centres_xyz = np.zeros((len(particles), 3))
    symmetry, symmetry_corr = {}, {}
    axis = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    for number, (name, group) in enumerate(STRUCTURES, start=1):
        volume = load_density(structures_dir / name, APIX, BOX)
        weights = np.clip(volume, 0, None)
        centres_xyz[classes == number] = [(weights * x).sum() / weights.sum(), (weights * y).sum() / weights.sum(),
                                          (weights * z).sum() / weights.sum()]
        if group != "C1":
            ops, corr = symmetry_operators(volume, group)
            symmetry_corr[name] = corr
            if corr >= SYMMETRY_MIN_CORRELATION:
                symmetry[number] = ops
    shift = -particles[["pvaeTrueOriginXAngst", "pvaeTrueOriginYAngst"]].to_numpy(np.float64) / APIX
    return {"classes": classes, "angles": angles, "centres": shift + projected_centres(angles, centres_xyz),
            "symmetry": symmetry, "symmetry_corr": symmetry_corr}


def score(poses_star: Path, truth_: dict, apix: float, k3_star: Path | None, k10_star: Path | None) -> dict:
    """Scores of one method (module docstring)."""
    from particle_vae.analysis.metrics import clustering_accuracy
    from particle_vae.analysis.pose_metrics import origin_errors, purity, same_view_psi_errors
    from particle_vae.io.star import ParticleStar

    def table(path):
        return ParticleStar(path).particles

    particles = table(poses_star)
    psi = particles["rlnAnglePsi"].to_numpy(np.float64)
    origin = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64) / apix
    errors = same_view_psi_errors(truth_["angles"], psi, truth_["classes"], symmetry=truth_["symmetry"])
    out = {"origin_error_px": float(origin_errors(origin, psi, truth_["centres"], truth_["classes"]).mean()),
           "psi_pair_median_deg": {STRUCTURES[c - 1][0].split("_")[1]: float(np.median(e)) if len(e) else math.nan
                                   for c, e in errors.items()},
           "psi_pairs": {STRUCTURES[c - 1][0].split("_")[1]: int(len(e)) for c, e in errors.items()}}
    if k3_star is not None:
        out["accuracy_k3"] = clustering_accuracy(truth_["classes"], table(k3_star)["rlnClassNumber"].to_numpy())
    if k10_star is not None:
        out["purity_k10"] = purity(truth_["classes"], table(k10_star)["rlnClassNumber"].to_numpy())
    if "pvaeRefineClass" in particles.columns:
        out["purity_refine_classes"] = purity(truth_["classes"], particles["pvaeRefineClass"].to_numpy())
        out["refine_classes"] = int(particles["pvaeRefineClass"].nunique())
    return out


def relion_available() -> bool:
    return shutil.which("relion_refine") is not None and shutil.which("relion_preprocess") is not None


def normalise_for_relion(sim: Path) -> dict:
    """``relion_preprocess --norm`` of the simulated stack (rerun every time: the simulation is rewritten on every run)."""
    timing = timed(["relion_preprocess", "--operate_on", "particles.mrcs", "--operate_out", "particles_norm.mrcs", "--norm",
                    "--bg_radius", str(int(0.45 * BOX))], sim / "relion_preprocess.log", cwd=sim)
    text = (sim / "particles.star").read_text().replace("@particles.mrcs", "@particles_norm.mrcs")
    (sim / "particles_norm.star").write_text(text)
    return timing


def run_relion(sim: Path, work: Path, k: int, iterations: int, threads: int) -> tuple[dict, Path]:
    """RELION 2D classification of the normalised particles; returns (timing, data STAR of the last iteration).

    A finished run in ``work`` is reused when its command and the simulated stack's checksum are the same.
    A run that was stopped part-way (K = 10 takes longer than a working session on two cores) is
    continued from its last finished iteration (``relion_refine --continue``); its time is the sum of
    the pieces, each counted up to the last iteration it finished (work on an unfinished iteration
    is lost and not counted), and its CPU seconds are unknown once a piece was killed.
    """
    work.mkdir(parents=True, exist_ok=True)
    steps = {}
    out = work / "run"
    final_star = Path(f"{out}_it{iterations:03d}_data.star")
    command = ["relion_refine", "--i", str(sim / "particles_norm.star"), "--o", str(out), "--K", str(k), "--iter", str(iterations),
               "--tau2_fudge", "2", "--particle_diameter", str(int(0.9 * BOX * APIX)), "--ctf", "--flatten_solvent", "--zero_mask",
               "--oversampling", "1", "--psi_step", "6", "--offset_range", "5", "--offset_step", "1", "--norm", "--scale",
               "--j", str(threads), "--pool", "30", "--pad", "2", "--dont_combine_weights_via_disc", "--random_seed", "0"]
    record_path = work / "relion_run.json"
    # the key is the simulated stack RELION's input was made from: relion_preprocess's output differs
    # between runs in its header even when the particles are the same
    stack_digest = file_digest(sim / "particles.mrcs")
    key = {"command": " ".join(map(str, command)), "simulated_stack_sha256": stack_digest}
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    same_run = all(record.get(name) == value for name, value in key.items())
    if same_run and final_star.exists() and "timing" in record:
        print(f"reusing the RELION K={k} run in {work} (same command, same simulated stack)")
        steps[f"relion_refine_k{k}"] = record["timing"]
        return steps, final_star
    pieces = record.get("pieces", []) if same_run else []
    last = last_relion_iteration(out) if same_run else 0
    if pieces and pieces[-1].get("seconds") is None:  # the previous piece was killed: count it up to its last iteration
        finished = Path(f"{out}_it{last:03d}_optimiser.star")
        pieces[-1]["seconds"] = round(max(finished.stat().st_mtime - pieces[-1]["started"], 0.0), 1) if last else 0.0
        pieces[-1]["to_iteration"] = last
    if last >= 1 and pieces:
        run_command = ["relion_refine", "--continue", f"{out}_it{last:03d}_optimiser.star", "--o", str(out), "--iter",
                       str(iterations), "--j", str(threads), "--pool", "30", "--dont_combine_weights_via_disc"]
        print(f"continuing the RELION K={k} run in {work} from iteration {last}")
    else:
        run_command, pieces, last = command, [], 0
    pieces.append({"from_iteration": last, "started": time.time(), "seconds": None, "cpu_seconds": None})
    atomic_json(record_path, {**key, "pieces": pieces})
    # RELION resolves rlnImageName from the folder it runs in: the STAR's own folder here
    piece = timed(run_command, work / f"relion_refine_from_it{last:03d}.log", cwd=sim)
    pieces[-1].update(seconds=piece["seconds"], cpu_seconds=piece["cpu_seconds"], peak_mib=piece["peak_mib"],
                      to_iteration=iterations)
    cpu = [p.get("cpu_seconds") for p in pieces]
    timing = {"command": key["command"], "seconds": round(sum(p["seconds"] for p in pieces), 1),
              "cpu_seconds": round(sum(cpu), 1) if None not in cpu else None,
              "peak_mib": max(p.get("peak_mib", 0.0) for p in pieces), "pieces": len(pieces)}
    steps[f"relion_refine_k{k}"] = timing
    atomic_json(record_path, {**key, "pieces": pieces, "timing": timing})
    return steps, final_star


def last_relion_iteration(out: Path) -> int:
    """The last iteration of a RELION run (output root ``out``) whose optimiser file was written, 0 if none."""
    numbers = [int(path.name[len(out.name) + 3:len(out.name) + 6]) for path in out.parent.glob(f"{out.name}_it[0-9][0-9][0-9]_optimiser.star")]
    return max(numbers, default=0)


def atomic_json(path: Path, value: dict) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file (a killed benchmark leaves the old record or the new)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def simulator_of(sim_dir: Path):
    """The simulator that wrote ``sim_dir`` (from its ``simulation.json``), to render its particles again, e.g. without noise."""
    from dataclasses import fields

    from particle_vae.data import simulation

    settings = json.loads((sim_dir / "simulation.json").read_text())["settings"]
    known = {f.name for f in fields(simulation.SimulationConfig)}
    config = {key: value for key, value in settings.items() if key in known}
    config["structures"] = [simulation.StructureSpec(**spec) for spec in config["structures"]]
    return simulation.Simulator(simulation.SimulationConfig(**config))


def file_digest(path: Path) -> str:
    """SHA-256 of a file (the peer run is reused only on the very same stack)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, required=True)
    parser.add_argument("--data-dir", type=Path, help="reference-data folder holding structures/ (or $PARTICLE_VAE_DATA)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--n", type=int, default=2400, help="particles (default 2400)")
    parser.add_argument("--epochs", type=int, default=10,
                        help="training epochs (default 10: with the mirror images in infer, 10 and 25 met the same targets "
                             "at SNR 0.1; 3, measured before the mirrors, fell short; docs/benchmarks.md)")
    parser.add_argument("--relion", choices=["auto", "skip"], default="auto", help="run RELION when it is on PATH (default)")
    parser.add_argument("--relion-iterations", type=int, default=25)
    parser.add_argument("--relion-classes", type=int, nargs="+", default=[3, 10], choices=[3, 10],
                        help="RELION runs: K = 3 and/or K = 10 (default both; K = 10 takes about 3 times as long)")
    parser.add_argument("--threads", type=int, default=2, help="RELION threads (--j), default 2")
    parser.add_argument("--train-options", default="", metavar="'OPTIONS'",
                        help="more options for particle-vae train, one string (e.g. --train-options=--subpixel)")
    parser.add_argument("--extra-infer", nargs=argparse.REMAINDER, default=[], help="more options for particle-vae infer (last)")
    args = parser.parse_args(argv)
    from particle_vae.io.paths import data_root

    root = data_root(args.data_dir)
    structures = root / "structures"
    work = args.work or args.out.with_suffix("")
    sim, run = work / "sim", work / "run"
    sim.mkdir(parents=True, exist_ok=True)  # also the project folder of the simulated STAR: it must exist
    steps = {}
    steps["simulate"] = timed(particle_vae("-q", "simulate", "--structure", *[structures / s for s, _ in STRUCTURES], "--n", args.n,
                                           "--box", BOX, "--pixel-size", APIX, "--max-shift", MAX_SHIFT, "--snr", args.snr,
                                           "--data-dir", root, "--defocus-star", root / "cryoem/empiar10025_metadata/ctf_params.star",
                                           "--out", sim, "--project-dir", sim, "--overwrite", "--no-progress"), work / "simulate.log")
    ours = {}
    ours["train"] = timed(particle_vae("train", sim / "particles.star", "--preset", "tiny", "--ctf", "--zdim", "8", "--epochs", args.epochs,
                                       *shlex.split(args.train_options),
                                       "--seed", "0", "--out", run, "--overwrite"), work / "train.log")
    inferred = work / "particles_vae.star"
    ours["infer"] = timed(particle_vae("infer", run, "--out", inferred, "--overwrite", *args.extra_infer), work / "infer.log")
    for k in (3, 10):
        ours[f"analyze_k{k}"] = timed(particle_vae("-q", "analyze", inferred, "--run", run, "--k", k, "--gallery", "0", "--out",
                                                   work / f"analysis_k{k}", "--overwrite"), work / f"analyze_k{k}.log")
    truth_ = truth(sim / "particles.star", structures)
    results = {"date": time.strftime("%Y-%m-%d"), "snr": args.snr, "n": args.n, "epochs": args.epochs, "train_options": args.train_options, "box": BOX, "pixel_size": APIX,
               "structures": [s for s, _ in STRUCTURES], "symmetry_axis_correlation": truth_["symmetry_corr"],
               "machine": f"{os.cpu_count()} CPU cores, {platform_name()}", "simulate": steps["simulate"]}
    ours_scores = score(inferred, truth_, APIX, work / "analysis_k3" / "clustered_particles.star",
                        work / "analysis_k10" / "clustered_particles.star")
    # analyze groups infer's refinement classes by default (--classes-from auto); the latents alone, for comparison
    for k in (3, 10):
        timed(particle_vae("-q", "analyze", inferred, "--run", run, "--k", k, "--classes-from", "latents", "--gallery", "0",
                           "--no-images", "--out", work / f"analysis_latents_k{k}", "--overwrite"), work / f"analyze_latents_k{k}.log")
    latents_only = score(inferred, truth_, APIX, work / "analysis_latents_k3" / "clustered_particles.star",
                         work / "analysis_latents_k10" / "clustered_particles.star")
    ours_scores["latents_only"] = {key: latents_only[key] for key in ("accuracy_k3", "purity_k10")}
    ours_scores["seconds"] = round(sum(step["seconds"] for step in ours.values()), 1)
    ours_scores["cpu_seconds"] = round(sum(step["cpu_seconds"] for step in ours.values()), 1)
    ours_scores["peak_mib"] = max(step["peak_mib"] for step in ours.values())
    results["particle_vae"] = {"steps": ours, **ours_scores}
    if args.relion == "auto" and relion_available():
        relion_steps = {"relion_preprocess": normalise_for_relion(sim)}
        stars = {}
        for k in args.relion_classes:
            timing, star = run_relion(sim, work / f"relion_k{k}", k, args.relion_iterations, args.threads)
            relion_steps.update(timing)
            stars[k] = star
        # poses from the run with the most classes (the sharpest references), as a user would take them
        relion = score(stars[max(stars)], truth_, APIX, stars.get(3), stars.get(10))
        for k in stars:
            relion[f"poses_from_k{k}"] = score(stars[k], truth_, APIX, None, None)
            relion[f"seconds_k{k}"] = relion_steps[f"relion_refine_k{k}"]["seconds"]
            relion[f"cpu_seconds_k{k}"] = relion_steps[f"relion_refine_k{k}"]["cpu_seconds"]
        relion["poses_from"] = f"K = {max(stars)}"
        relion["peak_mib"] = max(step["peak_mib"] for step in relion_steps.values())
        results["relion"] = {"steps": relion_steps, **relion}
    else:
        results["relion"] = None
        print("RELION is not on PATH (relion_refine, relion_preprocess) or --relion skip: scoring this project only; "
              "on Debian/Ubuntu `apt-get install relion` gives RELION 3.1.3")
    text = table_markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return results


def platform_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def table_markdown(results: dict) -> str:
    ours, relion = results["particle_vae"], results["relion"]
    names = list(ours["psi_pair_median_deg"])

    def cell(record, key, fmt):
        if record is None or key not in record:
            return "n/a"
        value = record[key]
        return fmt.format(**value) if isinstance(value, dict) else fmt.format(value)

    rows = [("clustering accuracy, K = 3", "accuracy_k3", "{:.3f}"), ("purity, K = 10", "purity_k10", "{:.3f}"),
            ("accuracy K = 3 / purity K = 10, latents alone (`--classes-from latents`)", "latents_only", "{accuracy_k3:.3f} / {purity_k10:.3f}"),
            (f"purity of infer's refinement classes ({ours.get('refine_classes', 'n/a')})", "purity_refine_classes", "{:.3f}"),
            ("origin error (px, mean)", "origin_error_px", "{:.2f}")]
    relion_header = "RELION 3.1 2D" if relion is None else f"RELION 3.1 2D (poses from {relion['poses_from']})"
    lines = [f"SNR {results['snr']:g}, {results['n']} particles, {results['box']} px at {results['pixel_size']:g} A/px, "
             f"{results['machine']}, {results['date']}", "", f"| score | particle-vae | {relion_header} |", "|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {cell(ours, key, fmt)} | {cell(relion, key, fmt)} |")
    for name in names:
        ours_value = ours["psi_pair_median_deg"][name]
        relion_value = relion["psi_pair_median_deg"][name] if relion else math.nan
        lines.append(f"| same-view psi error {name} (deg, median) | {ours_value:.1f} | "
                     f"{'n/a' if relion is None else f'{relion_value:.1f}'} |")
    def relion_times(prefix):
        if relion is None:
            return "n/a"
        def value(k):
            seconds = relion[f"{prefix}_k{k}"]
            return "not measured (continued after an interruption)" if seconds is None else f"{seconds:.0f}"
        return " + ".join(f"{value(k)} (K={k})" for k in (3, 10) if f"{prefix}_k{k}" in relion)

    lines.append(f"| wall time (s) | {ours['seconds']:.0f} (train + infer + 2 analyze) | {relion_times('seconds')} |")
    lines.append(f"| CPU time (s, all threads) | {ours.get('cpu_seconds', math.nan):.0f} | {relion_times('cpu_seconds')} |")
    lines.append(f"| peak memory (MiB) | {ours['peak_mib']:.0f} | {cell(relion, 'peak_mib', '{:.0f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
