"""Out-of-core training: 1,000,000 particles in 100 sparse stacks, and the cache file.

The 1M-particle input occupies almost no disk: each of the 100 ``.mrcs`` files
is a real MRC header (NZ = 10,000 images of 32x32 float32) extended with
``truncate`` to its full 41 MB length, so it reads as zeros. A fresh
interpreter runs ``particle-vae train`` on the 1,000,000-row STAR for a few
hundred steps (``--max-steps``) with two prefetching reader processes and
reports:

* ``peak_rss``: the training process's own high-water mark (``VmHWM`` in
  ``/proc/self/status``; ``ru_maxrss`` would also carry the RSS pytest had
  when it started the child, see ``test_memory.py``);
* ``peak_pss``: the largest sum, sampled every 0.1 s, of the proportional set
  size (``Pss`` in ``/proc/PID/smaps_rollup``) of the training process and its
  reader processes: memory shared between them after ``fork`` is counted
  once, so this is the memory the whole run occupies.

Both must stay under 2 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from particle_vae.data.cache import ensure_cache, open_cache, sidecar_path
from particle_vae.data.particles import ParticleDataset
from particle_vae.data.preprocess import Preprocessing
from particle_vae.data.sampling import make_loader
from particle_vae.data.sources import open_source
from particle_vae.engine.data import prepare_data
from particle_vae.errors import OutputFileError
from particle_vae.io.mrc import HEADER_BYTES, MRCStack, write_stack
from particle_vae.io.star import ParticleStar, image_name, make_particle_star

REPO = Path(__file__).resolve().parents[1]
N_STACKS, PER_STACK, BOX = 100, 10_000, 32
LIMIT_BYTES = 2 * 1024 ** 3
STEPS = 300

_CHILD = r"""
import gc, json, os, resource, sys, threading, time

def status_value(pid, key):
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))
    except (OSError, StopIteration):
        return 0

def pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []

peak = {"pss": 0, "processes": 0}
done = threading.Event()

def sample():
    me = os.getpid()
    while not done.is_set():
        pids = [me] + children(me)
        peak["pss"] = max(peak["pss"], sum(pss(p) for p in pids))
        peak["processes"] = max(peak["processes"], len(pids))
        time.sleep(0.1)

threading.Thread(target=sample, daemon=True).start()
from particle_vae import cli
start = time.perf_counter()
code = cli.main(sys.argv[1:])
seconds = time.perf_counter() - start
gc.collect()
done.set()
time.sleep(0.15)
print(json.dumps({"code": code, "seconds": seconds, "peak_rss": status_value(os.getpid(), "VmHWM:"),
                  "peak_pss": peak["pss"], "processes": peak["processes"],
                  "worker_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def sparse_stack(path: Path, n_images: int, box: int, template: bytes) -> Path:
    """An ``n_images`` x ``box`` x ``box`` float32 stack of zeros occupying no disk (header + hole)."""
    header = bytearray(template)
    header[8:12] = np.int32(n_images).astype("<i4").tobytes()
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(HEADER_BYTES + n_images * box * box * 4)
    return path


def write_million_star(folder: Path) -> Path:
    """A RELION 3.1 STAR with ``N_STACKS * PER_STACK`` rows over sparse stacks ``stacks/sNNN.mrcs``."""
    (folder / "stacks").mkdir(parents=True, exist_ok=True)
    template = write_stack(folder / "template.mrcs", np.zeros((1, BOX, BOX), np.float32), pixel_size=4.0).read_bytes()[:HEADER_BYTES]
    for s in range(N_STACKS):
        sparse_stack(folder / "stacks" / f"s{s:03d}.mrcs", PER_STACK, BOX, template)
    small = make_particle_star([image_name(0, "stacks/s000.mrcs")], pixel_size=4.0, box=BOX)
    head = small.star.blocks["optics"]
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    lines += [f"_{c} #{i + 1}" for i, c in enumerate(head.columns)]
    lines += [" ".join(str(v) for v in row) for row in head.itertuples(index=False)]
    lines += ["", "", "# version 30001", "", "data_particles", "", "loop_", "_rlnImageName #1", "_rlnOpticsGroup #2"]
    rows = [f"{i + 1:06d}@stacks/s{s:03d}.mrcs 1" for s in range(N_STACKS) for i in range(PER_STACK)]
    path = folder / "million.star"
    path.write_text("\n".join(lines) + "\n" + "\n".join(rows) + "\n")
    return path


def test_a_million_particle_star_trains_in_bounded_memory(tmp_path: Path):
    star = write_million_star(tmp_path)
    used = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "stacks").iterdir())
    assert used < 50 * 2 ** 20, f"the stacks should be sparse, they occupy {used} bytes"
    assert MRCStack(tmp_path / "stacks" / "s099.mrcs").shape == (PER_STACK, BOX, BOX)

    start = time.perf_counter()
    source = open_source(star)
    opened = time.perf_counter() - start
    assert len(source) == N_STACKS * PER_STACK and source.n_stacks == N_STACKS
    assert source.stack_index[-1] == N_STACKS - 1 and source.image_index[-1] == PER_STACK - 1
    del source

    run = tmp_path / "run"
    args = ["-q", "train", str(star), "--model", "vae", "--gen-hidden", "64", "--gen-layers", "1", "--likelihood", "gaussian",
            "--normalize", "none", "--batch-size", "64", "--max-steps", str(STEPS), "--epochs", "1", "--val-fraction", "0.001",
            "--workers", "2", "--device", "cpu", "--out", str(run)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"\n1,000,000 particles ({N_STACKS} sparse stacks, {BOX} px), {STEPS} steps of 64 with 2 workers: "
          f"peak RSS {report['peak_rss'] / 2 ** 20:.0f} MiB, peak PSS of trainer + workers {report['peak_pss'] / 2 ** 20:.0f} MiB "
          f"({report['processes']} processes; worker ru_maxrss {report['worker_maxrss'] / 2 ** 20:.0f} MiB), "
          f"train command {report['seconds']:.1f} s, open_source {opened:.2f} s, {rows[0]['images_per_s']:.0f} images/s")
    assert report["code"] == 0
    assert rows[-1]["step"] == STEPS and rows[-1]["partial"]
    assert np.isfinite(rows[-1]["train_elbo"])
    assert report["processes"] >= 3  # the reader processes were running while sampled
    assert report["peak_rss"] < LIMIT_BYTES, report
    assert report["peak_pss"] < LIMIT_BYTES, report


# --------------------------------------------------------------------------- cache file


@pytest.fixture()
def noisy_star(tmp_path: Path) -> Path:
    images = np.random.default_rng(3).normal(size=(60, 24, 24)).astype(np.float32) * 5 + 2
    write_stack(tmp_path / "a.mrcs", images[:35], pixel_size=2.0)
    write_stack(tmp_path / "b.mrcs", images[35:], pixel_size=2.0)
    # rows not in disk order: the cache must follow the STAR's order
    names = [image_name(i, "b.mrcs") for i in range(25)] + [image_name(i, "a.mrcs") for i in range(35)]
    return make_particle_star(names, pixel_size=2.0, box=24).write(tmp_path / "mixed.star")


PREP = {"target_box": 16, "normalize": "background"}


def test_cache_holds_the_preprocessed_particles_in_input_order(noisy_star: Path, tmp_path: Path):
    spec = {"kind": "particles", "path": str(noisy_star), "datadir": None, "pixel_size": None, "preprocessing": PREP}
    direct = prepare_data(spec)
    for dtype, tolerance in (("float32", 1e-6), ("float16", 2e-3)):
        cache = tmp_path / f"cache_{dtype}.mrcs"
        cached = prepare_data({**spec, "cache": {"path": str(cache), "dtype": dtype}})
        assert cached.box == direct.box == 16 and cached.pixel_size == pytest.approx(direct.pixel_size) == pytest.approx(3.0)
        order = np.random.default_rng(0).permutation(60)
        want, got = direct.dataset.__getitems__(order), cached.dataset.__getitems__(order)
        assert torch.equal(want["index"], got["index"])
        scale = float(want["images"].abs().max())
        assert float((want["images"] - got["images"]).abs().max()) <= tolerance * scale, dtype
        assert float(want["images"].std()) > 0.5  # real content, not zeros
        assert MRCStack(cache).dtype.itemsize == (2 if dtype == "float16" else 4)
        assert any("cache:" in step and "built" in step for step in cached.steps)
        meta = json.loads(sidecar_path(cache).read_text())
        assert meta["n_particles"] == 60 and meta["box"] == 16 and meta["dtype"] == dtype
    # the chunk-shuffle loader over the cache yields every particle once
    loader = make_loader(cached.dataset, 7, shuffle=True, num_workers=0, seed=1)
    seen = np.concatenate([batch["index"].numpy() for batch in loader])
    assert sorted(seen.tolist()) == list(range(60))


def test_cache_is_reused_while_valid_and_rebuilt_otherwise(noisy_star: Path, tmp_path: Path):
    cache = tmp_path / "c.mrcs"
    source = open_source(noisy_star)
    first = ensure_cache(source, PREP, cache, dtype="float32")
    assert first.built
    again = ensure_cache(open_source(noisy_star), PREP, cache, dtype="float32")
    assert not again.built
    # other preprocessing, other dtype: rebuilt
    assert ensure_cache(open_source(noisy_star), {**PREP, "invert": True}, cache, dtype="float32").built
    assert ensure_cache(open_source(noisy_star), {**PREP, "invert": True}, cache, dtype="float16").built
    # a changed stack (same size, new content and time): rebuilt
    time.sleep(0.01)
    images = np.random.default_rng(9).normal(size=(35, 24, 24)).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", images, pixel_size=2.0, overwrite=True)
    rebuilt = ensure_cache(open_source(noisy_star), {**PREP, "invert": True}, cache, dtype="float16")
    assert rebuilt.built
    direct = ParticleDataset(open_source(noisy_star), transform=Preprocessing(box=24, pixel_size=2.0, **PREP, invert=True))
    want = direct.__getitems__([30])["images"]
    # float16 keeps 11 significant bits: each value within 2^-11 of itself (plus float32 rounding of the
    # preprocessing, done in other batches when the cache was built)
    np.testing.assert_allclose(open_cache(rebuilt).__getitems__([30])["images"], want, rtol=2.0 ** -11,
                               atol=1e-5 * float(want.abs().max()))
    # a cache file touched behind our back is not trusted
    with open(cache, "r+b") as handle:
        handle.seek(HEADER_BYTES)
        handle.write(b"\0" * 16)
    assert ensure_cache(open_source(noisy_star), {**PREP, "invert": True}, cache, dtype="float16").built
    assert not list(tmp_path.glob(".*.tmp"))


def test_cache_never_overwrites_inputs_or_foreign_files(noisy_star: Path, tmp_path: Path):
    source = open_source(noisy_star)
    before = (tmp_path / "a.mrcs").read_bytes()
    with pytest.raises(OutputFileError, match="is an input"):
        ensure_cache(source, PREP, tmp_path / "a.mrcs")
    assert (tmp_path / "a.mrcs").read_bytes() == before
    foreign = tmp_path / "notes.mrcs"
    foreign.write_text("mine")
    with pytest.raises(OutputFileError, match="not a particle-vae cache"):
        ensure_cache(source, PREP, foreign)
    assert foreign.read_text() == "mine"


def test_train_with_cache_option(noisy_star: Path, tmp_path: Path):
    from particle_vae import cli

    cache = tmp_path / "train_cache.mrcs"
    args = ["-q", "train", str(noisy_star), "--model", "vae", "--gen-hidden", "16", "--downsample-to", "16", "--batch-size", "8",
            "--epochs", "2", "--cache", str(cache), "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "r1")]) == 0
    stamp = cache.stat().st_mtime_ns
    assert cli.main([*args, "--out", str(tmp_path / "r2")]) == 0
    assert cache.stat().st_mtime_ns == stamp  # reused, not rebuilt
    config = json.loads((tmp_path / "r1" / "config.json").read_text())
    assert config["data"]["cache"] == {"path": str(cache.resolve()), "dtype": "float16"}
    assert "cache:" in (tmp_path / "r2" / "train.log").read_text()
    # inference reads the particles themselves and still works
    assert cli.main(["-q", "infer", str(tmp_path / "r1"), "--out", str(tmp_path / "out.star"), "--device", "cpu"]) == 0
    assert len(ParticleStar(tmp_path / "out.star")) == 60


def test_cache_command_builds_what_train_then_reuses(noisy_star: Path, tmp_path: Path):
    from particle_vae import cli

    cache = tmp_path / "cmd_cache.mrcs"
    assert cli.main(["-q", "cache", str(noisy_star), "--preset", "tiny", "--downsample-to", "16", "--out", str(cache)]) == 0
    stamp = cache.stat().st_mtime_ns
    assert json.loads(sidecar_path(cache).read_text())["box"] == 16
    # the same preprocessing through train: the cache is reused, not rebuilt
    assert cli.main(["-q", "train", str(noisy_star), "--preset", "tiny", "--downsample-to", "16", "--model", "vae", "--gen-hidden", "16",
                     "--epochs", "1", "--cache", str(cache), "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert cache.stat().st_mtime_ns == stamp
    assert "reused" in (tmp_path / "run" / "train.log").read_text()


def test_loader_throughput_script_runs_at_toy_size(tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("loader_throughput", REPO / "benchmarks" / "loader_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "loader.json"
    results = module.main(["--n64", "300", "--n128", "100", "--stacks", "2", "--batch-size", "64", "--workers", "0",
                           "--train-configs", "particle-32", "--train-batch", "2", "--train-steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    assert set(results["boxes"]) == {"64", "128"}
    for entry in results["boxes"].values():
        assert set(entry["loaders"]) == {"lazy, 0 workers", "cache-float16, 0 workers", "cache-float32, 0 workers"}
        assert all(rate["cold"] > 0 and rate["warm"] > 0 for rate in entry["loaders"].values())
        assert entry["min_ratio_to_training"]["particle-32"] > 0
    assert results["training_images_per_s"]["particle-32"] > 0
