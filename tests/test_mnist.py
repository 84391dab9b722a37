"""MNIST IDX reading: real files, MD5 checks, malformed input and the offline download path."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from particle_vae.data.mnist import (
    MNIST_FILES,
    MNIST_MD5,
    download_mnist,
    find_mnist_file,
    load_mnist,
    read_idx,
    resolve_mnist_dir,
)
from particle_vae.errors import InputFileError


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> bytes:
    """Write ``array`` (uint8) as an IDX file; returns the uncompressed bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(raw)
    else:
        path.write_bytes(raw)
    return raw


@pytest.fixture(scope="module")
def raw_test_bytes(mnist_dir) -> dict[str, bytes]:
    """The decompressed t10k files (about 8 MB)."""
    out = {}
    for name in MNIST_FILES["test"]:
        with gzip.open(find_mnist_file(mnist_dir, name), "rb") as handle:
            out[name] = handle.read()
    return out


def test_train_split(mnist_dir):
    images, labels = load_mnist(mnist_dir, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int64
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert images.max() == 255 and images.min() == 0
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 60000 and counts.min() > 5000
    # The well-known normalisation constant of MNIST: mean intensity 0.1307 of 255.
    assert abs(images.mean() / 255.0 - 0.1307) < 1e-4


def test_test_split_and_raw_files_agree(mnist_dir, raw_test_bytes, tmp_path):
    images, labels = load_mnist(mnist_dir, "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert set(np.unique(labels)) == set(range(10))
    for name, raw in raw_test_bytes.items():
        assert hashlib.md5(raw).hexdigest() == MNIST_MD5[name]
        (tmp_path / name).write_bytes(raw)  # uncompressed copies
    images_raw, labels_raw = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(images_raw, images)
    np.testing.assert_array_equal(labels_raw, labels)
    # A data root with an mnist/ folder is accepted too.
    images_root, _ = load_mnist(mnist_dir.parent, "test")
    np.testing.assert_array_equal(images_root, images)


def test_missing_file_says_what_to_do(mnist_dir, tmp_path):
    shutil.copy(find_mnist_file(mnist_dir, "t10k-images-idx3-ubyte"), tmp_path)
    with pytest.raises(InputFileError) as error:
        load_mnist(tmp_path, "test")
    text = _one_line(error)
    assert "t10k-labels-idx1-ubyte" in text and "--mnist-dir" in text and "PARTICLE_VAE_DATA" in text
    with pytest.raises(InputFileError) as error:
        load_mnist(tmp_path / "nowhere", "train")
    assert "train-images-idx3-ubyte" in _one_line(error)


def test_corrupted_copy_fails_md5(raw_test_bytes, tmp_path):
    name = "t10k-images-idx3-ubyte"
    for other in MNIST_FILES["test"]:
        (tmp_path / other).write_bytes(raw_test_bytes[other])
    corrupt = bytearray(raw_test_bytes[name])
    corrupt[5000] ^= 0xFF  # one pixel
    with gzip.open(tmp_path / f"{name}.gz", "wb", compresslevel=1) as handle:  # .gz wins over the raw copy
        handle.write(bytes(corrupt))
    with pytest.raises(InputFileError) as error:
        load_mnist(tmp_path, "test")
    text = _one_line(error)
    assert f"{name}.gz" in text and "MD5" in text and MNIST_MD5[name] in text


def test_truncated_gzip_is_reported(mnist_dir, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    data = find_mnist_file(mnist_dir, name).read_bytes()
    shutil.copy(find_mnist_file(mnist_dir, "t10k-images-idx3-ubyte"), tmp_path)
    (tmp_path / f"{name}.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError) as error:
        load_mnist(tmp_path, "test")
    text = _one_line(error)
    assert f"{name}.gz" in text and "gzip" in text


def test_idx_format_errors(tmp_path):
    labels = tmp_path / "labels"
    _write_idx(labels, np.arange(10, dtype=np.uint8))
    with pytest.raises(InputFileError, match="3 dimensions|1 dimensions"):
        read_idx(labels, expected_ndim=3)  # a labels file given as images
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(InputFileError, match="not an IDX file") as error:
        read_idx(bad_magic)
    assert "magic" in _one_line(error)
    short = tmp_path / "short"
    raw = _write_idx(short, np.zeros((4, 3, 3), dtype=np.uint8))
    short.write_bytes(raw[:-1])
    with pytest.raises(InputFileError, match="promises"):
        read_idx(short)
    with pytest.raises(InputFileError, match="not an IDX file"):
        (tmp_path / "empty").write_bytes(b"")
        read_idx(tmp_path / "empty")


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    compress=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_idx_round_trip(tmp_path_factory, shape, compress, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path_factory.mktemp("idx") / ("a.gz" if compress else "a")
    raw = _write_idx(path, array, compress=compress)
    out = read_idx(path, md5=hashlib.md5(raw).hexdigest(), expected_ndim=len(shape))
    assert out.dtype == np.uint8 and out.shape == tuple(shape)
    np.testing.assert_array_equal(out, array)


def test_resolve_mnist_dir(mnist_dir, tmp_path, monkeypatch):
    assert resolve_mnist_dir(mnist_dir) == mnist_dir
    assert resolve_mnist_dir(None, mnist_dir.parent) == mnist_dir.parent / "mnist"
    monkeypatch.setenv("PARTICLE_VAE_DATA", str(mnist_dir.parent))
    assert resolve_mnist_dir() == mnist_dir.parent / "mnist"
    monkeypatch.delenv("PARTICLE_VAE_DATA")
    with pytest.raises(InputFileError) as error:
        resolve_mnist_dir()
    text = _one_line(error)
    assert "--mnist-dir" in text and "PARTICLE_VAE_DATA" in text
    with pytest.raises(InputFileError) as error:
        resolve_mnist_dir(tmp_path / "absent")
    assert "absent" in _one_line(error)


def test_download_from_local_url(mnist_dir, tmp_path):
    """download_mnist over file:// (never the network): fetch, verify, keep good files."""
    target = download_mnist(tmp_path / "fetched", base_url=mnist_dir.as_uri() + "/", timeout=5)
    images, labels = load_mnist(target, "test")
    assert images.shape == (10000, 28, 28) and labels[0] == 7
    stamp = (target / "t10k-images-idx3-ubyte.gz").stat().st_mtime_ns
    download_mnist(target, base_url=(tmp_path / "no-such-mirror").as_uri())  # all present: no fetch at all
    assert (target / "t10k-images-idx3-ubyte.gz").stat().st_mtime_ns == stamp


def test_download_failures_are_one_line(mnist_dir, tmp_path):
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    dest = tmp_path / "dest"
    with pytest.raises(InputFileError) as error:
        download_mnist(dest, base_url=empty.as_uri(), timeout=5)
    text = _one_line(error)
    assert "download of MNIST failed" in text and "by hand" in text and "train-images-idx3-ubyte.gz" in text
    assert not any(dest.iterdir())  # no partial file left behind

    # A mirror serving the wrong bytes: refused, and the bad file is not kept.
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    for name in MNIST_MD5:
        with gzip.open(bad / f"{name}.gz", "wb") as handle:
            handle.write(b"\0\0\x08\x01\0\0\0\x01\x07")
    with pytest.raises(InputFileError, match="MD5") as error:
        download_mnist(dest, base_url=bad.as_uri(), timeout=5)
    _one_line(error)
    assert not (dest / "train-images-idx3-ubyte.gz").exists()
