"""Peak memory of reading a 100,000-particle stack through a STAR file.

The stack is a sparse file (a real MRC header followed by a hole) so it takes
no disk space; every image reads as zeros. A fresh interpreter iterates over
all particles in shuffled batches and reports its peak resident set size: the
kernel's high-water mark of that process (``VmHWM``). ``getrusage().ru_maxrss``
is printed as well but not asserted on: on Linux it starts from the RSS the
parent (pytest, possibly holding models from other tests) had when it started
the child, so it measures the parent as much as the reading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from particle_vae.io.mrc import HEADER_BYTES, MRCStack, write_stack
from particle_vae.io.star import image_name, make_particle_star

REPO = Path(__file__).resolve().parents[1]
N_PARTICLES = 100_000
BOX = 64
BATCH = 1000
LIMIT_BYTES = 1 << 30  # 1 GiB

_CHILD = r"""
import json, resource, sys, time
import numpy as np
from particle_vae.data.particles import ParticleDataset
from particle_vae.data.sampling import make_loader


def peak_rss():
    # VmHWM: this process's own high-water mark. ru_maxrss is reported too, but on Linux it
    # also carries the RSS of the parent at fork/exec time (here: pytest), so it over-states.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/status") as status:
            hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        hwm = maxrss
    return hwm, maxrss


baseline, _ = peak_rss()  # after importing torch, numpy, pandas and the package
start = time.perf_counter()
dataset = ParticleDataset(sys.argv[1])
opened = time.perf_counter() - start
seen = np.zeros(len(dataset), dtype=np.int64)
loader = make_loader(dataset, batch_size=int(sys.argv[2]), shuffle=True, num_workers=0, seed=0)
total = 0.0
start = time.perf_counter()
for batch in loader:
    seen[batch["index"].numpy()] += 1
    total += float(batch["images"].sum())
elapsed = time.perf_counter() - start
peak, maxrss = peak_rss()
print(json.dumps({
    "particles": len(dataset), "box": dataset.box, "all_read_once": bool((seen == 1).all()), "pixel_sum": total,
    "peak_rss_bytes": peak, "ru_maxrss_bytes": maxrss, "import_rss_bytes": baseline,
    "open_seconds": opened, "read_seconds": elapsed, "particles_per_second": len(dataset) / elapsed,
    "megabytes_per_second": len(dataset) * dataset.box ** 2 * 4 / elapsed / 1e6,
}))
"""


def make_sparse_stack(path: Path, n_images: int, box: int) -> Path:
    """An ``n_images`` x ``box`` x ``box`` float32 MRC stack of zeros that occupies no disk.

    The header is the one :func:`write_stack` writes for a single image, with the
    image count (NZ, bytes 8-11) changed; the file is then extended with a hole.
    """
    template = write_stack(path.with_name("template.mrcs"), np.zeros((1, box, box), np.float32), pixel_size=1.5)
    header = bytearray(template.read_bytes()[:HEADER_BYTES])
    header[8:12] = np.int32(n_images).astype("<i4").tobytes()
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(HEADER_BYTES + n_images * box * box * 4)
    return path


def test_reading_100k_particles_stays_under_1gb(tmp_path: Path):
    stack = make_sparse_stack(tmp_path / "big.mrcs", N_PARTICLES, BOX)
    assert MRCStack(stack).shape == (N_PARTICLES, BOX, BOX)
    assert os.stat(stack).st_blocks * 512 < 1 << 20  # sparse: the images occupy no disk
    star = make_particle_star([image_name(i, "big.mrcs") for i in range(N_PARTICLES)], pixel_size=1.5, box=BOX)
    star_path = star.write(tmp_path / "big.star")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(star_path), str(BATCH)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\n100k x {BOX}x{BOX} float32 particles via STAR, batch {BATCH}: peak RSS "
          f"{report['peak_rss_bytes'] / 2**20:.0f} MiB (after imports: {report['import_rss_bytes'] / 2**20:.0f} MiB; "
          f"ru_maxrss {report['ru_maxrss_bytes'] / 2**20:.0f} MiB), {report['particles_per_second']:.0f} particles/s "
          f"({report['megabytes_per_second']:.0f} MB/s), open {report['open_seconds']:.2f} s, read {report['read_seconds']:.2f} s")
    assert report["particles"] == N_PARTICLES and report["box"] == BOX
    assert report["all_read_once"] and report["pixel_sum"] == 0.0
    assert report["peak_rss_bytes"] < LIMIT_BYTES, report
