"""Micro-benchmarks behind the design choices in docs/performance.md.

Measures, on the current machine and thread count: the rate of float32 and
bf16 matrix products of the generator's first-layer shape, the cost of a sine
plus a cosine per element, and the first group convolution of the paper's MNIST
encoder (50 px images, padding 8, kernel 28, 1,024 output channels) computed
directly, as a product over image patches (float32 and bf16), and through FFT.

  python benchmarks/kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import particle_vae

particle_vae.enable_huge_pages()  # before torch is imported: large CPU tensors in huge pages

import torch
import torch.nn.functional as F

from particle_vae.nn.equivariant import image_patches


def seconds(fn, repeats: int) -> float:
    """Mean wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=20, help="images in the convolution test")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"threads": torch.get_num_threads()}

    rows, inner, outer = 25_000, 1024, 512
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, w = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype)
        results[f"matmul_{name}_gflops"] = round(2 * rows * inner * outer / seconds(lambda: a @ w, args.repeats) / 1e9, 1)

    x = torch.randn(rows, 512)
    results["sin_cos_ns_per_element"] = round(seconds(lambda: (torch.sin(x), torch.cos(x)), args.repeats) / x.numel() * 1e9, 2)

    batch, box, pad, kernel, channels = args.batch, 50, 8, 28, 1024
    images = torch.randn(batch, 1, box, box)
    weight = torch.randn(channels, 1, kernel, kernel)
    size = box + 2 * pad

    def fft():
        spectrum = torch.fft.rfft2(F.pad(images, (pad,) * 4))
        filters = torch.fft.rfft2(weight, s=(size, size))
        out = torch.fft.irfft2(spectrum * filters.conj()[None, :, 0], s=(size, size))
        return out[..., :size - kernel + 1, :size - kernel + 1]

    def patches(dtype):
        return lambda: image_patches(images, kernel, pad, dtype=dtype) @ weight.view(channels, -1).to(dtype).T

    direct = F.conv2d(images, weight, padding=pad)
    results["first_layer_fft_max_error_rel"] = float((fft() - direct).abs().max() / direct.abs().max())
    for name, fn in (("direct_fp32", lambda: F.conv2d(images, weight, padding=pad)), ("fft_fp32", fft),
                     ("patches_fp32", patches(torch.float32)), ("patches_bf16", patches(torch.bfloat16))):
        results[f"first_layer_{name}_images_per_s"] = round(batch / seconds(fn, args.repeats), 1)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
