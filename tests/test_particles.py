"""Particle sources, ParticleDataset, samplers and loaders on the real reference stacks (``toy_*``: the
1000-image toy_projections set of the reference data) and on the few-image stand-in that tests/data/fixtures
holds (``tiny_*``: a STAR in that set's layout, unknown column included, and a 30 px stack of our own, both
written by its make_fixtures.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Subset

from particle_vae.data.particles import ParticleDataset, ParticleLoader, WorkerError, collate
from particle_vae.data.sampling import ChunkShuffleBatchSampler, SequentialBatchSampler, make_loader
from particle_vae.data.sources import open_source
from particle_vae.errors import InputFileError
from particle_vae.io.mrc import HEADER_BYTES, write_stack
from particle_vae.io.star import image_name, make_particle_star

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def relion31_star(cryoem_dir: Path) -> Path:
    return cryoem_dir / "relion31" / "relion31.star"


@pytest.fixture(scope="module")
def toy_star(cryoem_dir: Path) -> Path:
    return cryoem_dir / "toy_projections" / "toy_projections.star"


@pytest.fixture(scope="module")
def toy_stack(cryoem_dir: Path) -> Path:
    return cryoem_dir / "toy_projections" / "toy_projections.mrcs"


@pytest.fixture(scope="module")
def tiny_star(fixtures_dir: Path) -> Path:
    return fixtures_dir / "toy_projections.star"


@pytest.fixture(scope="module")
def tiny_stack(fixtures_dir: Path) -> Path:
    return fixtures_dir / "toy_projections.mrcs"


@pytest.fixture(scope="module")
def tiny_n(fixtures_dir: Path) -> int:
    """How many images tiny_stack holds and tiny_star names, one each (tests/data/fixtures/manifest.json)."""
    manifest = json.loads((fixtures_dir / "manifest.json").read_text())
    n = manifest["toy_projections.mrcs"]["images"]
    assert manifest["toy_projections.star"]["rows"] == n >= 5
    return n


def mrcfile_images(path: Path) -> np.ndarray:
    """Independent reference read of a whole stack with the mrcfile package."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the toy stack's header lacks the MAP stamp
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
    return data[None] if data.ndim == 2 else data


def write_star30(path: Path, names: list[str], extra: dict | None = None) -> Path:
    """A minimal RELION 3.0 particle STAR (single data_ block)."""
    columns = {"rlnImageName": names, **(extra or {})}
    lines = ["", "data_", "", "loop_"] + [f"_{name} #{i + 1}" for i, name in enumerate(columns)]
    for row in zip(*columns.values()):
        lines.append(" ".join(str(v) for v in row))
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- reading real data


def test_relion31_star_matches_mrcfile(relion31_star: Path):
    source = open_source(relion31_star)
    assert (source.kind, len(source), source.box, source.n_stacks) == ("star", 5, 256, 1)
    assert source.pixel_size == pytest.approx(2.806) and source.pixel_size_from == "star"
    assert source.star is not None and source.star.is_relion31 and len(source.star) == 5
    reference = mrcfile_images(source.stack_paths[0])
    dataset = ParticleDataset(source)
    order = [3, 1, 4, 0, 2]
    batch = dataset.__getitems__(order)
    assert batch["images"].shape == (5, 1, 256, 256) and batch["images"].dtype == torch.float32
    assert batch["index"].tolist() == order
    np.testing.assert_array_equal(batch["images"][:, 0].numpy(), reference[order])
    item = dataset[2]
    assert item["images"].shape == (1, 256, 256) and int(item["index"]) == 2
    np.testing.assert_array_equal(item["images"][0].numpy(), reference[2])
    np.testing.assert_array_equal(dataset[-1]["images"][0].numpy(), reference[4])
    with pytest.raises(IndexError):
        dataset[5]


def test_relion30_star_with_unknown_column(tiny_star: Path, tiny_stack: Path, tiny_n: int):
    source = open_source(tiny_star)
    assert (source.kind, len(source), source.box) == ("star", tiny_n, 30)
    assert "dummyVariable" in source.star.particles.columns  # the unknown column survives
    # no pixel size in this STAR: it comes from the stack header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(tiny_stack, permissive=True, header_only=True) as mrc:
            header_apix = float(mrc.voxel_size.x)
    assert source.pixel_size_from == "header" and source.pixel_size == pytest.approx(header_apix)
    assert open_source(tiny_star, pixel_size=1.7).pixel_size == 1.7
    reference = mrcfile_images(tiny_stack)
    dataset = ParticleDataset(source)
    picks = np.random.default_rng(0).permutation(tiny_n)[:-1]  # a shuffled subset
    np.testing.assert_array_equal(dataset.read(picks), reference[picks])
    np.testing.assert_array_equal(dataset.read(np.arange(tiny_n)), reference)
    repeated = [tiny_n - 1, tiny_n - 1, tiny_n // 2]
    np.testing.assert_array_equal(dataset.read(repeated), reference[repeated])


def test_star_input_order_datadir_and_storage_order(tmp_path: Path, tiny_stack: Path, tiny_n: int):
    stacks = tmp_path / "project" / "Extract"
    stacks.mkdir(parents=True)
    shutil.copy(tiny_stack, stacks / "parts.mrcs")
    rows = np.random.default_rng(1).permutation(tiny_n)
    assert (np.diff(rows) < 0).any()  # STAR order is not storage order
    star = write_star30(tmp_path / "elsewhere.star", [image_name(int(i), "Extract/parts.mrcs") for i in rows])
    with pytest.raises(InputFileError) as excinfo:
        open_source(star)
    one_line_error(excinfo, str(star), "Extract/parts.mrcs", "--stack-dir")
    source = open_source(star, datadir=tmp_path / "project")
    assert source.stack_paths == [stacks / "parts.mrcs"]
    np.testing.assert_array_equal(source.image_index, rows)
    reference = mrcfile_images(tiny_stack)
    dataset = ParticleDataset(source)
    np.testing.assert_array_equal(dataset.read(np.arange(len(rows))), reference[rows])  # STAR (input) order
    order = dataset.storage_order()
    assert np.all(np.diff(source.image_index[order]) > 0)


def test_relion31_star_written_by_make_particle_star(tmp_path: Path, tiny_stack: Path, tiny_n: int):
    shutil.copy(tiny_stack, tmp_path / "toy.mrcs")
    every_other = range(0, tiny_n, 2)
    star = make_particle_star([image_name(i, "toy.mrcs") for i in every_other], pixel_size=2.5, box=30)
    path = star.write(tmp_path / "toy31.star")
    source = open_source(path)
    assert (len(source), source.pixel_size, source.pixel_size_from) == (len(every_other), 2.5, "star")
    np.testing.assert_array_equal(ParticleDataset(source).read(np.arange(len(every_other))), mrcfile_images(tiny_stack)[::2])


def test_bare_stack(tiny_stack: Path, tiny_n: int):
    source = open_source(tiny_stack)
    assert (source.kind, len(source), source.star) == ("stack", tiny_n, None)
    assert source.pixel_size_from == "header"
    assert open_source(tiny_stack, pixel_size=3.0).pixel_size_from == "user"
    dataset = ParticleDataset(tiny_stack)
    np.testing.assert_array_equal(dataset.read(np.arange(tiny_n - 2, tiny_n)), mrcfile_images(tiny_stack)[tiny_n - 2:])


def test_txt_list_of_two_stacks(tmp_path: Path, tiny_stack: Path, tiny_n: int):
    reference = mrcfile_images(tiny_stack)
    k = 3  # images in the first stack: the tiny stack's first 3, reversed
    (tmp_path / "stacks").mkdir()
    write_stack(tmp_path / "stacks" / "first.mrcs", reference[:k][::-1], pixel_size=1.0)
    listing = tmp_path / "stacks.txt"
    listing.write_text(f"# two stacks\nstacks/first.mrcs\n\n{tiny_stack}\n")
    source = open_source(listing)
    assert (source.kind, source.n_stacks, len(source)) == ("list", 2, k + tiny_n)
    assert source.stack_lengths.tolist() == [k, tiny_n]
    dataset = ParticleDataset(source)
    expected = np.concatenate([reference[:k][::-1], reference])
    picks = np.array([0, k - 1, k, k + 1, k + tiny_n - 1, 1, k + tiny_n // 2])
    np.testing.assert_array_equal(dataset.read(picks), expected[picks])
    np.testing.assert_array_equal(dataset.read(np.arange(k + tiny_n)), expected)


# --------------------------------------------------------------------------- loaders


def _all_batches(loader) -> tuple[np.ndarray, np.ndarray]:
    images, index = [], []
    for batch in loader:
        assert batch["images"].dim() == 4 and batch["images"].shape[1] == 1
        images.append(batch["images"].numpy())
        index.append(batch["index"].numpy())
    return np.concatenate(images), np.concatenate(index)


def test_loader_workers_match_single_process(toy_star: Path, toy_stack: Path):
    reference = mrcfile_images(toy_stack)
    dataset = ParticleDataset(toy_star, max_open_stacks=2)
    serial = make_loader(dataset, batch_size=64, shuffle=True, num_workers=0, seed=3)
    parallel = make_loader(dataset, batch_size=64, shuffle=True, num_workers=2, seed=3)
    assert isinstance(parallel, ParticleLoader)
    images0, index0 = _all_batches(serial)
    images2, index2 = _all_batches(parallel)
    np.testing.assert_array_equal(index0, index2)
    np.testing.assert_array_equal(images0, images2)
    assert sorted(index0.tolist()) == list(range(1000))
    np.testing.assert_array_equal(images0[:, 0], reference[index0])
    # sequential (inference) order is the input order
    images, index = _all_batches(make_loader(dataset, batch_size=300, shuffle=False, num_workers=2))
    np.testing.assert_array_equal(index, np.arange(1000))
    np.testing.assert_array_equal(images[:, 0], reference)


def test_plain_dataloader_per_item_and_batched(toy_stack: Path):
    reference = mrcfile_images(toy_stack)
    dataset = ParticleDataset(toy_stack)
    # auto-collation with a batch size uses __getitems__
    images, index = _all_batches(DataLoader(dataset, batch_size=128, collate_fn=collate))
    np.testing.assert_array_equal(images[:, 0], reference)
    # without batching, each item goes through collate on its own
    single = next(iter(DataLoader(dataset, batch_size=None, collate_fn=collate)))
    assert single["images"].shape == (1, 1, 30, 30) and single["index"].tolist() == [0]
    # a list of __getitem__ items is stacked
    stacked = collate([dataset[5], dataset[2]])
    assert stacked["images"].shape == (2, 1, 30, 30) and stacked["index"].tolist() == [5, 2]
    np.testing.assert_array_equal(stacked["images"][:, 0].numpy(), reference[[5, 2]])
    # a Subset forwards to __getitems__ with the dataset's own indices
    subset = Subset(dataset, [10, 20, 30])
    images, index = _all_batches(DataLoader(subset, batch_size=2, collate_fn=collate))
    assert index.tolist() == [10, 20, 30]
    np.testing.assert_array_equal(images[:, 0], reference[[10, 20, 30]])


def test_transform_runs_on_batches(tiny_stack: Path):
    dataset = ParticleDataset(tiny_stack, transform=lambda x: x[..., 5:25, 5:25] * 2)
    batch = dataset.__getitems__([0, 1])
    np.testing.assert_allclose(batch["images"][:, 0].numpy(), mrcfile_images(tiny_stack)[:2, 5:25, 5:25] * 2)


def test_pickle_and_bounded_open_stacks(tmp_path: Path, toy_stack: Path):
    reference = mrcfile_images(toy_stack)
    names = []
    for k in range(12):
        write_stack(tmp_path / f"s{k:02d}.mrcs", reference[k * 5:(k + 1) * 5], pixel_size=1.0)
        names.append(f"s{k:02d}.mrcs")
    listing = tmp_path / "many.txt"
    listing.write_text("\n".join(names) + "\n")
    dataset = ParticleDataset(listing, max_open_stacks=3)
    before = open_fds()
    order = np.random.default_rng(2).permutation(60)
    for start in range(0, 60, 7):
        picks = order[start:start + 7]
        np.testing.assert_array_equal(dataset.read(picks), reference[picks])
        assert dataset.n_open_stacks <= 3
        assert open_fds() - before <= 3
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.n_open_stacks == 0 and clone.source.star is None
    np.testing.assert_array_equal(clone.read([59, 0]), reference[[59, 0]])
    clone.close()
    dataset.close()
    assert dataset.n_open_stacks == 0 and open_fds() <= before
    np.testing.assert_array_equal(dataset.read([4]), reference[[4]])  # reopens after close


# --------------------------------------------------------------------------- samplers


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), batch=st.integers(1, 70), chunk=st.integers(1, 40), seed=st.integers(0, 10), epoch=st.integers(0, 5))
def test_chunk_sampler_covers_every_index_once(n, batch, chunk, seed, epoch):
    sampler = ChunkShuffleBatchSampler(n, batch, chunk_size=chunk, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-n // batch)
    assert all(len(b) == batch for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    # the order is made of runs of `chunk` consecutive indices (one run may be shorter: the tail chunk)
    perm = sampler.permutation()
    runs = np.split(perm, np.flatnonzero(np.diff(perm) != 1) + 1)
    assert sum(len(r) % chunk != 0 for r in runs) <= 1
    assert all(r[0] % chunk == 0 for r in runs)
    again = ChunkShuffleBatchSampler(n, batch, chunk_size=chunk, seed=seed)
    again.set_epoch(epoch)
    assert list(again) == batches


def test_chunk_sampler_epochs_seeds_drop_last_and_order():
    sampler = ChunkShuffleBatchSampler(1000, 64, chunk_size=8, seed=0)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    assert list(ChunkShuffleBatchSampler(1000, 64, chunk_size=8, seed=1)) != epoch0
    dropping = ChunkShuffleBatchSampler(1000, 64, chunk_size=8, drop_last=True)
    assert len(dropping) == 15 == len(list(dropping)) and all(len(b) == 64 for b in dropping)
    custom = np.random.default_rng(0).permutation(100)
    perm = ChunkShuffleBatchSampler(100, 10, chunk_size=5, order=custom).permutation()
    assert sorted(perm.tolist()) == list(range(100))
    position = {int(v): k for k, v in enumerate(custom)}
    pos = np.array([position[int(v)] for v in perm])  # consecutive in `custom`, chunk by chunk
    assert np.all(np.diff(pos.reshape(20, 5), axis=1) == 1)
    with pytest.raises(ValueError):
        ChunkShuffleBatchSampler(10, 0)


def test_sequential_sampler():
    sampler = SequentialBatchSampler(10, 4)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(sampler) == 3


# --------------------------------------------------------------------------- errors


def test_missing_stack_errors(tmp_path: Path, tiny_stack: Path):
    missing = tmp_path / "absent.mrcs"
    with pytest.raises(InputFileError) as excinfo:
        open_source(missing)
    one_line_error(excinfo, str(missing), "not found")
    star = write_star30(tmp_path / "p.star", [image_name(0, "gone.mrcs")])
    with pytest.raises(InputFileError) as excinfo:
        open_source(star)
    one_line_error(excinfo, str(star), "gone.mrcs", "not found")
    listing = tmp_path / "l.txt"
    listing.write_text(f"{tiny_stack}\nnot_here.mrcs\n")
    with pytest.raises(InputFileError) as excinfo:
        open_source(listing)
    one_line_error(excinfo, str(listing), "not_here.mrcs", "entry 2")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InputFileError) as excinfo:
        open_source(empty)
    one_line_error(excinfo, str(empty), "no stacks")
    odd = tmp_path / "x.hdf"
    odd.write_text("x")
    with pytest.raises(InputFileError) as excinfo:
        open_source(odd)
    one_line_error(excinfo, str(odd), ".star")


def truncated_copy(source: Path, target: Path, keep_images: float) -> Path:
    shutil.copy(source, target)
    target.chmod(0o644)
    with open(target, "r+b") as handle:
        handle.truncate(HEADER_BYTES + int(keep_images * 30 * 30 * 4))
    return target


def test_truncated_stack(tmp_path: Path, tiny_stack: Path, tiny_n: int):
    broken = truncated_copy(tiny_stack, tmp_path / "toy_projections.mrcs", tiny_n - 1.5)
    with pytest.raises(InputFileError) as excinfo:
        open_source(broken)
    one_line_error(excinfo, str(broken), "truncated")
    star = write_star30(tmp_path / "t.star", [image_name(0, "toy_projections.mrcs")])
    with pytest.raises(InputFileError) as excinfo:
        ParticleDataset(star)
    one_line_error(excinfo, str(broken), "truncated")
    header_only = tmp_path / "short.mrcs"
    header_only.write_bytes(tiny_stack.read_bytes()[:500])
    with pytest.raises(InputFileError) as excinfo:
        open_source(header_only)
    one_line_error(excinfo, str(header_only))


def test_star_without_image_name(tmp_path: Path, tiny_star: Path):
    text = tiny_star.read_text().replace("_rlnImageName", "_rlnMicrographName")
    star = tmp_path / "noimage.star"
    star.write_text(text)
    with pytest.raises(InputFileError) as excinfo:
        open_source(star)
    one_line_error(excinfo, str(star), "rlnImageName")
    empty = tmp_path / "empty.star"
    empty.write_text("data_\nloop_\n_rlnImageName #1\n")
    with pytest.raises(InputFileError) as excinfo:
        open_source(empty)
    one_line_error(excinfo, str(empty), "no particles")


def test_mismatched_box_sizes(tmp_path: Path, toy_stack: Path, relion31_star: Path):
    big = relion31_star.with_suffix(".mrcs")
    listing = tmp_path / "mixed.txt"
    listing.write_text(f"{toy_stack}\n{big}\n{toy_stack}\n")
    with pytest.raises(InputFileError) as excinfo:
        open_source(listing)
    message = one_line_error(excinfo, "256x256", "30x30", str(toy_stack))
    assert message.startswith(f"{big}:")  # the odd stack is the one named first
    shutil.copy(big, tmp_path / "big.mrcs")
    shutil.copy(toy_stack, tmp_path / "small.mrcs")
    star = write_star30(tmp_path / "mixed.star", [image_name(0, "small.mrcs"), image_name(1, "small.mrcs"), image_name(0, "big.mrcs")])
    with pytest.raises(InputFileError) as excinfo:
        open_source(star)
    one_line_error(excinfo, str(tmp_path / "big.mrcs"), "256x256", "30x30")


def test_star_image_size_disagrees_with_stack(tmp_path: Path, tiny_stack: Path):
    shutil.copy(tiny_stack, tmp_path / "toy.mrcs")
    star = make_particle_star([image_name(0, "toy.mrcs")], pixel_size=1.0, box=64).write(tmp_path / "wrongsize.star")
    with pytest.raises(InputFileError) as excinfo:
        open_source(star)
    one_line_error(excinfo, str(star), "rlnImageSize", "64", "30x30")


def test_index_beyond_stack(tmp_path: Path, tiny_stack: Path, tiny_n: int):
    shutil.copy(tiny_stack, tmp_path / "toy.mrcs")
    names = [image_name(i, "toy.mrcs") for i in (0, tiny_n - 1, tiny_n, tiny_n + 200)]
    star = write_star30(tmp_path / "beyond.star", names)
    with pytest.raises(InputFileError) as excinfo:
        open_source(star)
    one_line_error(excinfo, str(star), "particle 2", f"{tiny_n + 1:06d}@toy.mrcs", f"image {tiny_n + 1}", f"{tiny_n} images", "2 such")


@pytest.fixture()
def nan_stack(tmp_path: Path, toy_stack: Path) -> Path:
    images = mrcfile_images(toy_stack)[:40]
    path = write_stack(tmp_path / "nan.mrcs", images, pixel_size=1.0)
    with open(path, "r+b") as handle:  # poison one pixel of image 24 (0-based 23)
        handle.seek(HEADER_BYTES + (23 * 30 * 30 + 17) * 4)
        handle.write(np.float32(np.nan).tobytes())
    return path


def test_nan_image(nan_stack: Path):
    dataset = ParticleDataset(nan_stack)  # headers only: opening succeeds
    np.testing.assert_array_equal(dataset.read(np.arange(20)).shape, (20, 30, 30))
    for call in (lambda: dataset.read([3, 23, 4]), lambda: dataset[23], lambda: dataset.__getitems__(list(range(40)))):
        with pytest.raises(InputFileError) as excinfo:
            call()
        one_line_error(excinfo, str(nan_stack), "image 24", "particle 23", "NaN")


def test_nan_image_in_worker_is_one_line(nan_stack: Path):
    dataset = ParticleDataset(nan_stack)
    with pytest.raises(InputFileError) as excinfo:
        for _ in make_loader(dataset, batch_size=8, shuffle=True, num_workers=2):
            pass
    one_line_error(excinfo, str(nan_stack), "image 24", "particle 23")
    assert "Traceback" not in str(excinfo.value) and excinfo.value.path == nan_stack
    # with a plain DataLoader the error surfaces on first use of the batch
    with pytest.raises(InputFileError) as excinfo:
        for batch in DataLoader(dataset, batch_size=8, collate_fn=collate, num_workers=2):
            batch["images"]
    one_line_error(excinfo, str(nan_stack), "image 24")
    placeholder = WorkerError(message="m", path=None)
    assert collate(placeholder) is placeholder and collate([placeholder]) is placeholder


# --------------------------------------------------------------------------- through the CLI


def test_errors_through_cli_info(tmp_path: Path, toy_stack: Path, toy_star: Path, relion31_star: Path, nan_stack: Path, capsys):
    from particle_vae import cli
    from particle_vae.errors import EXIT_USER_ERROR

    shutil.copy(toy_stack, tmp_path / "toy.mrcs")
    listing = tmp_path / "mixed.txt"
    listing.write_text(f"{toy_stack}\n{relion31_star.with_suffix('.mrcs')}\n")
    noimage = tmp_path / "noimage.star"
    noimage.write_text(toy_star.read_text().replace("_rlnImageName", "_rlnMicrographName"))
    cases = {
        "missing": write_star30(tmp_path / "missing.star", [image_name(0, "gone.mrcs")]),
        "truncated": truncated_copy(toy_stack, tmp_path / "trunc.mrcs", 3.5),
        "noimage": noimage,
        "mixed": listing,
        "beyond": write_star30(tmp_path / "beyond.star", [image_name(1000, "toy.mrcs")]),
        "nan": nan_stack,  # info reads a sample of images, which covers image 24 of 40
    }
    for name, path in cases.items():
        capsys.readouterr()
        code = cli.main(["info", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USER_ERROR, (name, code, err)
        assert len(err.splitlines()) == 1 and path.name in err, (name, err)
    assert cli.main(["info", str(toy_star)]) == 0


# --------------------------------------------------------------------------- IndexSubset, loader random state


def test_index_subset_reads_batches_in_disk_order_and_pickles_small(tmp_path: Path, toy_stack: Path):
    from particle_vae.data.particles import IndexSubset

    # STAR rows in reverse disk order: the subset's storage order follows the disk, not the rows
    n = 40
    star = make_particle_star([image_name(n - 1 - i, toy_stack.name) for i in range(n)], 1.0, 30)
    shutil.copy(toy_stack, tmp_path / toy_stack.name)
    dataset = ParticleDataset(star.write(tmp_path / "reverse.star"))
    chosen = np.array([3, 10, 11, 25, 39], dtype=np.int64)
    subset = IndexSubset(dataset, chosen)
    assert len(subset) == 5 and subset.box == dataset.box
    batch = subset.__getitems__([4, 0])
    assert batch["index"].tolist() == [39, 3]
    torch.testing.assert_close(batch["images"], dataset.__getitems__([39, 3])["images"])
    # particle 39 is image 0 on disk, particle 3 is image 36: disk order is positions 4, 3, 2, 1, 0
    assert subset.storage_order().tolist() == [4, 3, 2, 1, 0]
    copy = pickle.loads(pickle.dumps(subset))  # what a worker receives: one int64 array, no Python list
    assert isinstance(copy.indices, np.ndarray) and copy.indices.tolist() == chosen.tolist()
    torch.testing.assert_close(copy.__getitems__([4, 0])["images"], batch["images"])
    seen = np.concatenate([b["index"].numpy() for b in make_loader(subset, 2, shuffle=True, num_workers=0, seed=1)])
    assert sorted(seen.tolist()) == sorted(chosen.tolist())
    with pytest.raises(IndexError):
        IndexSubset(dataset, [n])


def test_loaders_do_not_draw_from_the_global_torch_generator(toy_stack: Path):
    dataset = ParticleDataset(toy_stack)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for shuffle in (True, False):
        for _ in make_loader(dataset, 64, shuffle=shuffle, num_workers=0, seed=2):
            pass
    assert torch.equal(torch.rand(3), expected)
