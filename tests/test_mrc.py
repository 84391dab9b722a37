"""MRC stack reading (lazy, validated) and writing."""

from __future__ import annotations

import io
import shutil

import mrcfile
import numpy as np
import pytest

from particle_vae.errors import InputFileError, OutputFileError
from particle_vae.io.mrc import MODE_DTYPES, MRCStack, StackWriter, read_header, read_map, write_map, write_stack


@pytest.mark.parametrize("folder, name", [pytest.param("cryoem_dir", name, id=name)
                                          for name in ("relion31/relion31.mrcs", "toy_projections/toy_projections.mrcs")]
                         + [pytest.param("fixtures_dir", name, id=f"fixtures/{name}")  # stacks written by make_fixtures.py
                            for name in ("toy_projections.mrcs", "toy_images_a.mrcs")])
def test_reads_real_stacks_like_mrcfile(request, folder, name):
    path = request.getfixturevalue(folder) / name
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
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    with mrcfile.open(path) as handle:
        assert handle.is_image_stack()
        assert handle.header.mode == 2
        assert np.isclose(float(handle.voxel_size.x), 1.75)
        np.testing.assert_array_equal(handle.data, images)
    stack = MRCStack(path)
    assert stack.pixel_size == pytest.approx(1.75)
    np.testing.assert_array_equal(stack.read(0, 7), images)


# --------------------------------------------------------------------------- cross-checks against mrcfile
# mrcfile (a test dependency only) is the independent reference for the project's own reader and writer.

MODE_SAMPLES = {  # mode -> values spanning that type's range
    0: np.array([-128, -1, 0, 1, 127], dtype=np.int8),
    1: np.array([-32768, -5, 0, 7, 32767], dtype=np.int16),
    2: np.array([-3.5e15, -1.25, 0.0, 1e-30, 2.5e15], dtype=np.float32),  # squares within float32, for mrcfile's RMS
    6: np.array([0, 1, 1000, 40000, 65535], dtype=np.uint16),
    12: np.array([-65504, -0.5, 0, 6.1e-5, 65504], dtype=np.float16),
}


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("mode", sorted(MODE_SAMPLES))
def test_reader_agrees_with_mrcfile_for_every_real_mode(tmp_path, mode, byteorder):
    rng = np.random.default_rng(mode)
    samples = MODE_SAMPLES[mode]
    data = rng.choice(samples, size=(4, 6, 6)).astype(samples.dtype.newbyteorder(byteorder))
    data[0, 0, : len(samples)] = samples  # every extreme value is in the file
    path = tmp_path / f"mode{mode}.mrcs"
    with mrcfile.new(path) as handle:
        handle.set_data(data)
        handle.set_image_stack()
        handle.voxel_size = 1.37
        handle.header.origin = (10.5, -2.25, 3.0)
        handle.set_extended_header(np.zeros(3, dtype=[("x", "<i4")]))  # 12 bytes between header and data
    stack = MRCStack(path)
    header, order = read_header(path)
    with mrcfile.open(path) as reference:
        assert reference.header.mode == mode
        assert (stack.n_images, stack.box, stack.box) == (reference.header.nz, reference.header.ny, reference.header.nx) == (4, 6, 6)
        assert stack.mode == int(header["mode"]) == mode and order == (byteorder if data.dtype.itemsize > 1 else "<")
        assert stack.pixel_size == pytest.approx(float(reference.voxel_size.x), rel=1e-6) == pytest.approx(1.37, rel=1e-6)
        assert stack.origin == tuple(float(v) for v in reference.header.origin.item()) == (10.5, -2.25, 3.0)
        assert stack.data_offset == 1024 + 12
        expected = np.asarray(reference.data).astype(np.float32)
    out = stack.read(0, 4)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(stack.read_indices([3, 0, 3]), expected[[3, 0, 3]])


@pytest.mark.parametrize("mode", [2, 12])
def test_written_stacks_read_back_identically_in_mrcfile(tmp_path, mode):
    # mrcfile.validate computes the RMS in the data's own type: small values, whose sum of squares float16 holds
    images = np.random.default_rng(3).normal(scale=1.0, size=(9, 10, 10)).astype(np.float32)
    stored = images.astype(MODE_DTYPES[mode])
    path = write_stack(tmp_path / f"w{mode}.mrcs", images, pixel_size=2.125, mode=mode)
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    with mrcfile.open(path) as handle:
        h = handle.header
        assert (int(h.nx), int(h.ny), int(h.nz), int(h.mode)) == (10, 10, 9, mode)
        assert handle.is_image_stack() and int(h.ispg) == 0
        assert tuple(float(v) for v in handle.voxel_size.item()) == (2.125, 2.125, 2.125)
        assert tuple(float(v) for v in h.origin.item()) == (0.0, 0.0, 0.0)
        assert handle.data.dtype == MODE_DTYPES[mode]
        np.testing.assert_array_equal(handle.data, stored)
        wide = stored.astype(np.float64)
        assert float(h.dmin) == float(wide.min()) and float(h.dmax) == float(wide.max())
        assert float(h.dmean) == pytest.approx(wide.mean(), rel=1e-6)
        assert float(h.rms) == pytest.approx(wide.std(), rel=1e-6)
    stack = MRCStack(path)
    assert stack.mode == mode and stack.pixel_size == pytest.approx(2.125)
    np.testing.assert_array_equal(stack.read(0, 9), stored.astype(np.float32))


def test_sized_writer_fills_images_in_any_order(tmp_path):
    images = np.random.default_rng(4).normal(size=(7, 8, 8)).astype(np.float32)
    path = tmp_path / "any_order.mrcs"
    with StackWriter(path, 8, 1.0, mode=12, n_images=7, durable=True) as writer:
        writer.write_at(4, images[4:])
        writer.write_at(0, images[:2])
        writer.write_at(2, images[2])
        writer.write_at(3, images[3:4])
        with pytest.raises(ValueError, match="images 6..7 requested"):
            writer.write_at(6, images[:2])
        with pytest.raises(ValueError, match="image 2 written twice"):
            writer.write_at(2, images[2:4])
        with pytest.raises(ValueError, match="filled with write_at"):
            writer.write(images[:1])
    with mrcfile.open(path) as handle:
        assert handle.header.mode == 12
        np.testing.assert_array_equal(handle.data, images.astype(np.float16))


def test_writer_refuses_unwritten_images_float16_overflow_and_integer_modes(tmp_path):
    with pytest.raises(OutputFileError, match="wrote 2 of 3 images"):
        with StackWriter(tmp_path / "short.mrcs", 4, 1.0, n_images=3) as writer:
            writer.write_at(0, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        write_stack(tmp_path / "big.mrcs", np.full((1, 4, 4), 1e5), 1.0, mode=12)
    with pytest.raises(ValueError, match="MRC mode 1 cannot be written"):
        StackWriter(tmp_path / "int.mrcs", 4, 1.0, mode=1)
    assert list(tmp_path.iterdir()) == []


def test_written_map_reads_back_in_mrcfile_and_mrcfile_maps_in_ours(tmp_path):
    volume = np.random.default_rng(5).random((5, 6, 7)).astype(np.float32)
    path = write_map(tmp_path / "ours.mrc", volume, 1.5)
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    with mrcfile.open(path) as handle:
        assert handle.is_volume() and (int(handle.header.nx), int(handle.header.ny), int(handle.header.nz)) == (7, 6, 5)
        assert tuple(float(v) for v in handle.voxel_size.item()) == (1.5, 1.5, 1.5)
        np.testing.assert_array_equal(handle.data, volume)
        assert float(handle.header.rms) == pytest.approx(float(volume.astype(np.float64).std()), rel=1e-6)
    theirs = tmp_path / "theirs.mrc"
    with mrcfile.new(theirs) as handle:
        handle.set_data(volume.astype(np.int16))
        handle.voxel_size = (2.0, 2.0, 2.0)
    back, voxel = read_map(theirs)
    np.testing.assert_array_equal(back, volume.astype(np.int16).astype(np.float32))
    assert voxel == 2.0


def test_truncated_stack_gives_one_line_error(fixtures_dir, tmp_path):
    copy = tmp_path / "short.mrcs"
    shutil.copy(fixtures_dir / "toy_projections.mrcs", copy)
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
