"""Training and inference throughput and peak memory of TARGET-VAE.

For each configuration and precision: training images/s (forward + backward +
Adam step on random images, after warm-up steps), inference particles/s
(readout in eval mode) and peak memory (CUDA: max allocated; CPU: the process's
peak resident set, which only grows, so configurations run smallest first).

  python benchmarks/throughput.py --configs mnist-paper,particle-64 --precision fp32,bf16 --out bench/throughput.json

Configurations (name: box, group order, fields, kernel, padding, generator):
  particle-32   32 px, P8, 16 fields, kernel 17, padding 2, 2 x 128 generator, 64 frequencies (the "tiny" preset)
  mnist-small   50 px, P8, 16 fields, kernel 28, padding 8, 2 x 128 generator, 64 frequencies
  mnist-paper   the published TARGET-VAE MNIST model: 50 px, P8, z = 2, 128 fields, kernel 28,
                padding 8, 1x1 layers shared across rotation channels, 2 x 512 generator with
                1024 Fourier features (512 frequencies x cos/sin)
  particle-64   64 px (a 128 px box downsampled to 64), P8, 128 fields, kernel 33, padding 4, 6 x 512 generator

Precisions: ``fp32``, and ``bf16`` (autocast; on CPU it pays off on processors
with AVX512-BF16 or AMX, where bf16 matrix products run several times faster).

Also printed: the page faults per timed training step (CPU; see
docs/performance.md on huge pages, which ``THP_MEM_ALLOC_ENABLE=0`` turns off for
a comparison). ``--compile`` runs the training step through ``torch.compile``
(the compilation happens in the warm-up steps and is timed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large CPU tensors in huge pages

import torch

from particle_vae.models import TargetVAE, TargetVAEConfig

CONFIGS = {
    "particle-32": dict(box=32, group_order=8, n_fields=16, kernel=17, padding=2, gen_hidden=128, gen_layers=2, n_fourier=64,
                        likelihood="gaussian"),
    "mnist-small": dict(box=50, group_order=8, n_fields=16, kernel=28, padding=8, gen_hidden=128, gen_layers=2, n_fourier=64),
    "mnist-paper": dict(box=50, group_order=8, n_fields=128, kernel=28, padding=8, mixing="shared", gen_hidden=512, gen_layers=2,
                        n_fourier=512),
    "particle-64": dict(box=64, group_order=8, n_fields=128, kernel=33, padding=4, mixing="shared", gen_hidden=512, gen_layers=6,
                        n_fourier=256, likelihood="gaussian"),
}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, batch_size: int, steps: int, warmup: int, device: torch.device, precision: str = "fp32",
            compile_step: bool = False) -> dict:
    torch.manual_seed(0)
    config = TargetVAEConfig(zdim=2, **CONFIGS[name])
    model = TargetVAE(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 1, config.box, config.box, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    loss = torch.compile(model.loss) if compile_step else model.loss

    def step():
        with torch.autocast(**autocast):
            terms = loss(images)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_rate = steps * batch_size / (time.perf_counter() - start)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    model.eval()
    passes = max(steps, 5)  # a readout pass is short: average over more of them
    with torch.no_grad(), torch.autocast(**autocast):
        model.readout(images)
        sync()
        start = time.perf_counter()
        for _ in range(passes):
            model.readout(images)
        sync()
    infer_rate = passes * batch_size / (time.perf_counter() - start)
    return {"config": name, **CONFIGS[name], "precision": precision, "compile": compile_step, "batch_size": batch_size,
            "train_images_per_s": round(train_rate, 2), "infer_particles_per_s": round(infer_rate, 1),
            "peak_memory_mb": round(peak_memory_mb(device), 1), "page_faults_per_step": int(faults_per_step),
            "warmup_s": round(warmup_s, 1), "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="particle-32,mnist-small,mnist-paper,particle-64")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (compiled during the warm-up)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = set(precisions) - {"fp32", "bf16"}
    if unknown:
        parser.error(f"unknown precision(s) {sorted(unknown)}; use fp32 and/or bf16")
    rows = [measure(name, args.batch_size, args.steps, args.warmup, device, precision, compile_step=args.compile)
            for name in args.configs.split(",") for precision in precisions]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {hardware}; torch {torch.__version__}")
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}; compile: {args.compile}")
    print("| config | box | P_r | fields | precision | train img/s | infer particles/s | peak MB | page faults/step | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['box']} | P{row['group_order']} | {row['n_fields']} | {row['precision']} | {row['train_images_per_s']} | "
              f"{row['infer_particles_per_s']} | {row['peak_memory_mb']} | {row['page_faults_per_step']} | {row['warmup_s']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                        "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
