"""End-to-end inference rate of ``particle-vae infer`` at the paper's MNIST setting.

Writes MNIST(U) test digits as an MRC stack + STAR, makes a run with the
``mnist`` preset (the published TARGET-VAE MNIST model; one training step is
enough, only the architecture matters for speed), then times ``particle-vae
infer`` on the stack as a command (reading, preprocessing, readout, writing the
STAR) for each requested variant. It prints particles/s for the whole command,
start-up included (imports and building e2cnn's filter basis, a few seconds),
and after start-up: the command is also timed on the first 64 digits, and
``(N - 64) / (time for N - time for 64)`` is the rate a large data set sees.

  python benchmarks/infer_throughput.py --data-dir ../shared/data --n 10000 --work bench/infer \\
      --variants fp32,bf16,bf16x2 --out benchmarks/results/infer_throughput_cpu.json

Variants: ``fp32``, ``bf16`` (``--precision bf16``), and ``bf16xN`` (also
``--ddp-cpu-processes N``: N processes of one thread each, each reading out a
contiguous share).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SMALL = 64


def run(args: list[str], env: dict | None = None) -> float:
    """Run ``particle-vae args``; return its wall time in seconds (raises on failure)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "particle_vae", "-q", *args], check=True, env=env)
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="reference data folder (with mnist/)")
    parser.add_argument("--n", type=int, default=10000, help="test digits to read out (default all 10000)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the stack and the run")
    parser.add_argument("--variants", default="fp32,bf16,bf16x2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    work = args.work
    data = work / "data"
    star = data / "mnist_u_test.star"
    small = work / "small" / "mnist_u_test.star"  # the first SMALL digits: the command's start-up time
    for path, count in ((star, args.n), (small, SMALL)):
        if not path.exists():
            run(["make-benchmark", "mnist-u", "--data-dir", str(args.data_dir), "--split", "test", "--n", str(count),
                 "--out", str(path.parent), "--overwrite"])
    model = work / "run"
    if not (model / "checkpoints" / "last.pt").exists():
        run(["train", str(star), "--preset", "mnist", "--batch-size", "20", "--max-steps", "1", "--epochs", "1",
             "--device", "cpu", "--out", str(model), "--overwrite"])
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        precision, _, processes = variant.partition("x")
        if precision not in ("fp32", "bf16") or (processes and not processes.isdigit()):
            parser.error(f"unknown variant {variant!r}: use fp32, bf16 or bf16xN")
        extra = ["--precision", precision]
        env = dict(os.environ)
        if processes:
            extra += ["--ddp-cpu-processes", processes]
            env["OMP_NUM_THREADS"] = "1"
        times = {}
        for name, particles in (("small", small), ("all", star)):
            out = work / f"particles_{variant}_{name}.star"
            times[name] = run(["infer", str(model), "--particles", str(particles), "--out", str(out), "--batch-size",
                               str(args.batch_size), "--device", "cpu", "--overwrite", "--no-refine", *extra], env=env)
        seconds = times["all"]
        steady = (args.n - SMALL) / max(seconds - times["small"], 1e-9)
        rows.append({"variant": variant, "particles": args.n, "seconds": round(seconds, 2),
                     "particles_per_s": round(args.n / seconds, 1), f"seconds_for_{SMALL}": round(times["small"], 2),
                     "particles_per_s_after_startup": round(steady, 1)})
        print(f"{variant}: {args.n} particles in {seconds:.1f} s = {args.n / seconds:.1f} particles/s (whole command); "
              f"{SMALL} particles in {times['small']:.1f} s; {steady:.1f} particles/s after start-up", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"hardware": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
                                        "model": "mnist preset (published TARGET-VAE MNIST model)", "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
