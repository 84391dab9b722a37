"""Reading particle images from a large MRC stack: particle_vae.io.mrc against the mrcfile package.

The measurement behind docs/data.md, "Why an own MRC reader". The script writes
a temporary stack of random float32 images (``--images`` images of ``--box``
pixels, with :class:`particle_vae.io.mrc.StackWriter`), reads the whole file
once so that it is in the page cache, and then times, each including opening
the file:

* warm page cache, best of 20 (3 for the whole-stack read): the header alone
  (``MRCStack`` against ``mrcfile.open(header_only=True)``); 64 consecutive
  images from the middle of the stack (``MRCStack.read`` against a slice of
  ``mrcfile.mmap`` and against ``mrcfile.open``, which reads the whole stack);
  256 shuffled images (``MRCStack.read_indices`` against fancy indexing of
  ``mrcfile.mmap``). The readers must return the same 64 images;
* cold page cache, median of 5: the same shuffled and consecutive reads after
  the file's pages are dropped with ``posix_fadvise(DONTNEED)`` before each try
  (no root needed; on a tmpfs folder nothing is dropped, so put ``--dir`` on a
  real disk);
* a stack truncated to half its size while open (a copy still in progress),
  read in a child process by each reader: its exit code and last line of output
  (``MRCStack`` raises a one-line error; a memory map can die of SIGBUS, exit
  code -7);
* the peak resident memory of this process (``mrcfile.open`` holds the whole stack).

It prints one table in Markdown. ``mrcfile`` is a test dependency
(``pip install -e .[test]``). Run it on a quiet machine, one thread:

  OMP_NUM_THREADS=1 python benchmarks/mrc_read.py                       # docs/data.md: 10,000 images of 128 px (0.66 GB)
  OMP_NUM_THREADS=1 python benchmarks/mrc_read.py --images 2000 --box 64  # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from particle_vae.io.mrc import HEADER_BYTES, MRCStack, StackWriter

WARM_REPEATS = 20
WHOLE_STACK_REPEATS = 3
COLD_REPEATS = 5
SLICE_IMAGES = 64
SHUFFLED_IMAGES = 256

#: run in a child process: open the stack, truncate it to half, read the last image
TRUNCATED_READ = """
import os, sys, mrcfile
from particle_vae.io.mrc import MRCStack
path = sys.argv[2]
which = sys.argv[1]
handle = mrcfile.mmap(path, permissive=True) if which == "mrcfile" else MRCStack(path)
os.truncate(path, os.path.getsize(path) // 2)
try:
    (handle.data[-1].sum() if which == "mrcfile" else handle[-1].sum())
    print("read without error")
except Exception as error:
    print(type(error).__name__ + ": " + str(error))
"""


def write_random_stack(path: Path, n: int, box: int, rng: np.random.Generator) -> None:
    """``n`` images of ``box`` x ``box`` standard-normal float32 values, written 1000 at a time."""
    with StackWriter(path, box, 1.5) as writer:
        for start in range(0, n, 1000):
            writer.write(rng.normal(size=(min(1000, n - start), box, box)).astype(np.float32))


def read_whole_file(path: Path) -> None:
    """Read every byte once (puts the file in the page cache for every reader alike)."""
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def drop_from_page_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def best_of(function, repeat: int):
    """(shortest time in seconds, result of the last call)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def median_cold(function, path: Path, repeat: int) -> float:
    """Median time in seconds, the file dropped from the page cache before each call."""
    times = []
    for _ in range(repeat):
        drop_from_page_cache(path)
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def readers(path: Path, image_slice: slice, batch: np.ndarray) -> dict:
    """The timed reads, each opening the file itself."""
    import mrcfile

    def ours_header():
        return len(MRCStack(path))

    def mrcfile_header():
        with mrcfile.open(path, header_only=True, permissive=True) as f:
            return int(f.header.nz)

    def ours_slice():
        return MRCStack(path).read(image_slice.start, image_slice.stop)

    def mrcfile_mmap_slice():
        with mrcfile.mmap(path, permissive=True) as f:
            return np.array(f.data[image_slice], dtype=np.float32)

    def mrcfile_open_slice():
        with mrcfile.open(path, permissive=True) as f:
            return np.array(f.data[image_slice], dtype=np.float32)

    def ours_batch():
        return MRCStack(path).read_indices(batch)

    def mrcfile_mmap_batch():
        with mrcfile.mmap(path, permissive=True) as f:
            return np.array(f.data[batch], dtype=np.float32)

    return {"ours_header": ours_header, "mrcfile_header": mrcfile_header, "ours_slice": ours_slice,
            "mrcfile_mmap_slice": mrcfile_mmap_slice, "mrcfile_open_slice": mrcfile_open_slice,
            "ours_batch": ours_batch, "mrcfile_mmap_batch": mrcfile_mmap_batch}


def truncated_read(path: Path, which: str, full_size: int) -> str:
    """Exit code and last output line of a child that reads the stack with ``which`` while it is truncated."""
    with open(path, "r+b") as handle:  # restore the full size (zeros) for each try
        handle.truncate(full_size)
    run = subprocess.run([sys.executable, "-c", TRUNCATED_READ, which, str(path)], capture_output=True, text=True)
    last = (run.stdout + run.stderr).strip().splitlines()[-1:] or ["(no output)"]
    return f"exit code {run.returncode}; {last[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="images in the temporary stack (default: 10000)")
    parser.add_argument("--box", type=int, default=128, help="image size, pixels (default: 128)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the temporary stack, on the disk to measure (default: the system's temporary folder)")
    args = parser.parse_args(argv)
    if args.images < SHUFFLED_IMAGES or args.box < 2:
        parser.error(f"--images must be at least {SHUFFLED_IMAGES} and --box at least 2")
    try:
        import mrcfile
    except ImportError:
        parser.error("needs the mrcfile package, a test dependency: pip install -e .[test]")

    n, box = args.images, args.box
    rng = np.random.default_rng(0)
    image_slice = slice(n // 2, n // 2 + SLICE_IMAGES)
    batch = np.sort(rng.choice(n, SHUFFLED_IMAGES, replace=False))
    with tempfile.TemporaryDirectory(prefix="pvae_mrc_read_", dir=args.dir) as folder:
        path = Path(folder) / "stack.mrcs"
        write_random_stack(path, n, box, rng)
        full_size = HEADER_BYTES + n * box * box * 4
        read_whole_file(path)
        read = readers(path, image_slice, batch)

        rows = []  # (what, reader, milliseconds, statistic)
        reference = None
        for what, key, reader, repeat in [
            ("open + header only", "ours_header", "particle_vae `MRCStack`", WARM_REPEATS),
            ("open + header only", "mrcfile_header", "`mrcfile.open(header_only=True)`", WARM_REPEATS),
            (f"open + read {SLICE_IMAGES} images", "ours_slice", "particle_vae `MRCStack.read`", WARM_REPEATS),
            (f"open + read {SLICE_IMAGES} images", "mrcfile_mmap_slice", "`mrcfile.mmap` + slice", WARM_REPEATS),
            (f"open + read {SHUFFLED_IMAGES} shuffled", "ours_batch", "particle_vae `MRCStack.read_indices`", WARM_REPEATS),
            (f"open + read {SHUFFLED_IMAGES} shuffled", "mrcfile_mmap_batch", "`mrcfile.mmap` + fancy index", WARM_REPEATS),
            (f"open + read {SLICE_IMAGES} images", "mrcfile_open_slice", "`mrcfile.open` (reads the whole stack)",
             WHOLE_STACK_REPEATS),
        ]:
            seconds, out = best_of(read[key], repeat)
            if isinstance(out, np.ndarray) and out.shape[0] == SLICE_IMAGES:
                reference = out if reference is None else reference
                if not np.array_equal(out, reference):
                    raise SystemExit(f"{reader} returned other images than the first reader")
            rows.append((what + ", warm", reader, f"{seconds * 1e3:.2f}", f"best of {repeat}"))

        for what, key, reader in [
            (f"open + read {SHUFFLED_IMAGES} shuffled", "ours_batch", "particle_vae `MRCStack.read_indices`"),
            (f"open + read {SHUFFLED_IMAGES} shuffled", "mrcfile_mmap_batch", "`mrcfile.mmap` + fancy index"),
            (f"open + read {SLICE_IMAGES} images", "ours_slice", "particle_vae `MRCStack.read`"),
            (f"open + read {SLICE_IMAGES} images", "mrcfile_mmap_slice", "`mrcfile.mmap` + slice"),
        ]:
            seconds = median_cold(read[key], path, COLD_REPEATS)
            rows.append((what + ", cold", reader, f"{seconds * 1e3:.2f}", f"median of {COLD_REPEATS}"))

        truncated = {which: truncated_read(path, which, full_size) for which in ("ours", "mrcfile")}
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"stack: {n} x {box}x{box} float32, {full_size / 1e9:.2f} GB; Python {platform.python_version()}, "
          f"numpy {np.__version__}, mrcfile {mrcfile.__version__}, {os.cpu_count()} CPUs")
    print()
    print("| read (each opens the file) | reader | ms | statistic |")
    print("|---|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(f"truncated to half while open, particle_vae `MRCStack`: {truncated['ours']}")
    print(f"truncated to half while open, `mrcfile.mmap`: {truncated['mrcfile']}")
    print(f"peak RSS of this process (mrcfile.open read the whole stack): {peak_rss_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
