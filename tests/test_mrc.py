"""MRC stack reading (lazy, validated) and writing."""

from __future__ import annotations

import shutil

import mrcfile
import numpy as np
import pytest

from particle_vae.errors import InputFileError, OutputFileError
from particle_vae.io.mrc import MRCStack, read_map, write_map, write_stack


@pytest.mark.parametrize("name", ["relion31/relion31.mrcs", "toy_projections/toy_projections.mrcs"])
def test_reads_real_stacks_like_mrcfile(cryoem_dir, name):
    path = cryoem_dir / name
    stack = MRCStack(path)
    with mrcfile.open(path, permissive=True) as reference:
        data = reference.data
        assert stack.shape == data.shape
        idx = [len(data) - 1, 0, 2, 2, 1]
        np.testing.assert_array_equal(stack.read_indices(idx), data[idx])
        np.testing.assert_array_equal(stack.read(1, 3), data[1:3])
        np.testing.assert_array_equal(stack[-1], data[-1])


def test_write_then_read_round_trip_and_valid_header(tmp_path):
    images = np.random.default_rng(0).normal(size=(7, 12, 12)).astype(np.float32)
    path = write_stack(tmp_path / "out.mrcs", images, pixel_size=1.75)
    assert mrcfile.validate(str(path), print_file=open(tmp_path / "log.txt", "w"))
    with mrcfile.open(path) as handle:
        assert handle.is_image_stack()
        assert handle.header.mode == 2
        assert np.isclose(float(handle.voxel_size.x), 1.75)
        np.testing.assert_array_equal(handle.data, images)
    stack = MRCStack(path)
    assert stack.pixel_size == pytest.approx(1.75)
    np.testing.assert_array_equal(stack.read(0, 7), images)


def test_int16_and_float16_modes_are_read_as_float32(tmp_path):
    for dtype in (np.int16, np.float16):
        data = (np.arange(2 * 8 * 8).reshape(2, 8, 8) % 50).astype(dtype)
        path = tmp_path / f"m_{np.dtype(dtype).name}.mrcs"
        with mrcfile.new(path) as handle:
            handle.set_data(data)
            handle.set_image_stack()
        out = MRCStack(path).read(0, 2)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, data.astype(np.float32))


def test_truncated_stack_gives_one_line_error(cryoem_dir, tmp_path):
    copy = tmp_path / "short.mrcs"
    shutil.copy(cryoem_dir / "toy_projections" / "toy_projections.mrcs", copy)
    with open(copy, "r+b") as handle:
        handle.truncate(copy.stat().st_size - 100)
    with pytest.raises(InputFileError) as info:
        MRCStack(copy)
    message = str(info.value)
    assert "short.mrcs" in message and "truncated" in message and "\n" not in message


def test_missing_and_non_mrc_files(tmp_path):
    with pytest.raises(InputFileError, match="nothere.mrcs: file not found"):
        MRCStack(tmp_path / "nothere.mrcs")
    tiny = tmp_path / "tiny.mrcs"
    tiny.write_bytes(b"hello")
    with pytest.raises(InputFileError, match="shorter than the 1024-byte header"):
        MRCStack(tiny)


def test_complex_and_non_square_are_rejected(tmp_path):
    path = tmp_path / "complex.mrc"
    with mrcfile.new(path) as handle:
        handle.set_data(np.zeros((4, 4), dtype=np.complex64))
    with pytest.raises(InputFileError, match="Fourier-space"):
        MRCStack(path)
    path = tmp_path / "rect.mrcs"
    with mrcfile.new(path) as handle:
        handle.set_data(np.zeros((3, 8, 10), dtype=np.float32))
    with pytest.raises(InputFileError, match="must be square"):
        MRCStack(path)


def test_big_endian_stack(tmp_path):
    data = np.random.default_rng(1).normal(size=(3, 6, 6)).astype(">f4")
    path = tmp_path / "be.mrcs"
    with mrcfile.new(path) as handle:
        handle.set_data(data)
    np.testing.assert_allclose(MRCStack(path).read(0, 3), data.astype(np.float32))


def test_writer_refuses_to_overwrite(tmp_path):
    path = write_stack(tmp_path / "a.mrcs", np.zeros((1, 4, 4)), 1.0)
    with pytest.raises(OutputFileError, match="already exists"):
        write_stack(path, np.ones((1, 4, 4)), 1.0)
    with pytest.raises(OutputFileError, match="input"):
        write_stack(path, np.ones((1, 4, 4)), 1.0, overwrite=True, inputs=(path,))
    assert MRCStack(path).read(0, 1).max() == 0.0


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_stack(tmp_path / "nan.mrcs", np.full((1, 4, 4), np.nan), 1.0)
    assert list(tmp_path.iterdir()) == []


def test_map_round_trip_and_real_map(tmp_path, structures_dir):
    volume = np.random.default_rng(2).random((5, 6, 7)).astype(np.float32)
    path = write_map(tmp_path / "v.mrc", volume, 2.5)
    back, voxel = read_map(path)
    np.testing.assert_array_equal(back, volume)
    assert voxel == pytest.approx(2.5)
    groel, voxel = read_map(structures_dir / "groel_emd1080.mrc")
    assert groel.shape == (100, 100, 100) and voxel == pytest.approx(2.7, rel=1e-4)
