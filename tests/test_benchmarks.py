"""Transformed-MNIST benchmarks: ground-truth alignment, distributions, determinism, files and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from particle_vae import cli
from particle_vae.conventions import apply_relion_pose, undo_relion_pose, warp_images
from particle_vae.data.benchmarks import (
    BENCHMARKS,
    TRUTH_COLUMNS,
    TransformedSet,
    make_benchmark,
    place_on_canvas,
    render_digits,
    sample_poses,
    transform_digits,
    write_benchmark,
)
from particle_vae.data.mnist import find_mnist_file, load_mnist
from particle_vae.errors import OutputFileError, ParticleVAEError
from particle_vae.io.mrc import MRCStack
from particle_vae.io.star import ParticleStar

KINDS = list(BENCHMARKS)


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    return load_mnist(mnist_dir, "test")


@pytest.fixture(scope="module")
def small_sets(mnist_test):
    """The first 400 test images of every kind (seed 11)."""
    digits, labels = mnist_test
    return {kind: transform_digits(kind, digits, labels, "test", seed=11, n=400) for kind in KINDS}


@pytest.fixture
def run_cli(monkeypatch):
    """``particle_vae.cli.main`` with only this subcommand registered, so these
    tests do not depend on the state of the other subcommand modules."""
    monkeypatch.setattr(cli, "COMMANDS", {"make-benchmark": cli.COMMANDS["make-benchmark"]})
    return cli.main


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation of ``(B, H, W)`` stacks."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def _interior(dataset: TransformedSet, digits: np.ndarray, margin: int = 1, lost: float = 0.01) -> np.ndarray:
    """Indices whose moved digit stays inside the box (less than ``lost`` of its ink
    within ``margin`` pixels of the edge or beyond), judged on a large canvas."""
    big = 2 * dataset.box + 2
    moved = render_digits(digits[dataset.source_index], dataset.alpha, dataset.displacement, big)
    lo = big // 2 - dataset.box // 2 + margin
    hi = big // 2 - dataset.box // 2 + dataset.box - margin
    kept = moved[:, lo:hi, lo:hi].sum((1, 2)) / moved.sum((1, 2))
    return np.flatnonzero(kept > 1 - lost)


# -- shapes, sizes and labels ------------------------------------------------

def test_specs_match_the_papers():
    n, u, so2, se2 = (BENCHMARKS[k] for k in ("mnist-n", "mnist-u", "so2", "se2"))
    assert n.box == u.box == 50 and so2.box == se2.box == 28
    assert n.rotation == "normal" and n.rotation_params == (0.0, math.pi / 4)
    assert u.rotation == "uniform" and u.rotation_params == (0.0, 2 * math.pi)
    assert n.translation == u.translation == "normal" and n.translation_param == u.translation_param == 5.0
    for spec in (so2, se2):
        assert spec.rotation == "uniform" and spec.rotation_params == (-math.pi / 2, math.pi / 2)
    assert so2.translation == "none" and se2.translation == "uniform" and se2.translation_param == 7.0


def test_full_test_split_mnist_n(mnist_dir, mnist_test):
    digits, labels = mnist_test
    data = make_benchmark("mnist-n", mnist_dir, "test", seed=0)
    assert len(data) == 10000 and data.images.shape == (10000, 50, 50) and data.images.dtype == np.float32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0 and data.images.max() > 0.99
    assert data.alpha.shape == (10000,) and data.displacement.shape == (10000, 2)
    np.testing.assert_array_equal(data.source_index, np.arange(10000))
    np.testing.assert_array_equal(data.labels, labels[data.source_index])
    # Total ink is kept when the digit stays inside the canvas (bilinear preserves mass).
    inside = _interior(data.subset(np.arange(1000)), digits)
    ink_in, ink_out = digits[inside].sum((1, 2)) / 255.0, data.images[inside].sum((1, 2))
    assert len(inside) > 800 and np.median(np.abs(ink_out / ink_in - 1)) < 0.05


def test_full_train_split_so2(mnist_dir):
    data = make_benchmark("so2", mnist_dir, "train", seed=0)
    assert data.images.shape == (60000, 28, 28) and data.labels.shape == (60000,)
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert np.bincount(data.labels).sum() == 60000 and data.labels[:3].tolist() == [5, 0, 4]
    alpha, d = sample_poses("mnist-u", "train")
    assert alpha.shape == (60000,) and d.shape == (60000, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_undoing_the_truth_recovers_the_source_digit(kind, small_sets, mnist_test):
    digits, labels = mnist_test
    data = small_sets[kind]
    np.testing.assert_array_equal(data.labels, labels[data.source_index])
    inside = _interior(data, digits)
    assert len(inside) >= 40, "too few digits inside the box to test"
    sub = data.subset(inside)
    canonical = sub.canonical_images(digits)
    observed = torch.from_numpy(sub.images)
    # Inverse of obs(x) = c(R(-alpha)(x - d)) is c(y) = obs(R(alpha) y + d).
    back = warp_images(observed, sub.alpha, sub.displacement).numpy()
    assert _corr(back, canonical).min() > 0.9
    # The same through the RELION columns (shift by Fourier phase ramp, then rotation).
    psi, ox, oy = sub.relion_pose(pixel_size=1.7)
    back_relion = undo_relion_pose(observed, psi, np.stack([ox, oy], 1), pixel_size=1.7).numpy()
    assert _corr(back_relion, canonical).min() > 0.9
    # Forward: the generator pose and the RELION pose both re-render the images.
    theta, t = sub.model_pose()
    np.testing.assert_allclose(warp_images(torch.from_numpy(canonical), theta, t).numpy(), sub.images, atol=1e-4)
    again = apply_relion_pose(torch.from_numpy(canonical), psi, np.stack([ox, oy], 1), pixel_size=1.7).numpy()
    np.testing.assert_allclose(again, sub.images, atol=1e-4)


def test_wrong_truth_does_not_align(small_sets, mnist_test):
    """Power check for the alignment test: a sign error in alpha or d is caught."""
    digits, _ = mnist_test
    data = small_sets["mnist-u"]
    inside = _interior(data, digits)
    big = inside[np.abs(np.sin(data.alpha[inside] / 2)) > 0.5]  # rotations beyond +-60 degrees
    sub = data.subset(big)
    canonical = sub.canonical_images(digits)
    observed = torch.from_numpy(sub.images)
    good = _corr(warp_images(observed, sub.alpha, sub.displacement).numpy(), canonical)
    flipped = _corr(warp_images(observed, -sub.alpha, sub.displacement).numpy(), canonical)
    unshifted = _corr(warp_images(observed, sub.alpha, -sub.displacement).numpy(), canonical)
    assert good.mean() > 0.95 and flipped.mean() < 0.6 and unshifted.mean() < 0.8
    # A digit compared with another source digit does not pass the 0.9 bar.
    shuffled = _corr(warp_images(observed, sub.alpha, sub.displacement).numpy(), np.roll(canonical, 1, axis=0))
    assert np.mean(shuffled > 0.9) < 0.1


def test_canvas_placement():
    digit = np.zeros((1, 28, 28), dtype=np.uint8)
    digit[0, 14, 14] = 255
    digit[0, 14, 20] = 51
    canvas = place_on_canvas(digit, 50)
    assert canvas.shape == (1, 50, 50) and canvas[0, 25, 25] == 1.0 and canvas[0, 25, 31] == pytest.approx(0.2)
    assert canvas.sum() == pytest.approx(1.2)
    np.testing.assert_array_equal(place_on_canvas(digit, 28)[0], digit[0] / np.float32(255))
    # Object pose: a quarter turn counter-clockwise in (x, y) takes the +x pixel to +y
    # (the row below the centre); then d = (3, -2) moves everything 3 columns right, 2 rows up.
    moved = render_digits(digit, np.array([math.pi / 2]), np.array([[3.0, -2.0]]), 28)[0]
    assert moved[14 - 2, 14 + 3] == pytest.approx(1.0, abs=1e-5)
    assert moved[20 - 2, 14 + 3] == pytest.approx(0.2, abs=1e-5)
    assert moved.sum() == pytest.approx(1.2, abs=1e-5)


# -- distributions -------------------------------------------------------------

def _check_normal(values: np.ndarray, std: float) -> None:
    n = len(values)
    assert abs(values.mean()) < 5 * std / math.sqrt(n)
    assert abs(values.std() - std) < 5 * std / math.sqrt(2 * n)
    assert stats.kstest(values, stats.norm(0.0, std).cdf).pvalue > 1e-3


def _check_uniform(values: np.ndarray, low: float, high: float) -> None:
    assert values.min() >= low and values.max() <= high
    assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    width = high - low
    assert values.min() - low < 0.01 * width and high - values.max() < 0.01 * width  # range is covered


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("kind", KINDS)
def test_pose_distributions(kind, split):
    alpha, d = sample_poses(kind, split, seed=5)
    if kind == "mnist-n":
        _check_normal(alpha, math.pi / 4)
    elif kind == "mnist-u":
        _check_uniform(alpha, 0.0, 2 * math.pi)
    else:
        _check_uniform(alpha, -math.pi / 2, math.pi / 2)
    if kind in ("mnist-n", "mnist-u"):
        _check_normal(d[:, 0], 5.0)
        _check_normal(d[:, 1], 5.0)
        assert abs(np.corrcoef(d[:, 0], d[:, 1])[0, 1]) < 5 / math.sqrt(len(d))
    elif kind == "so2":
        assert not d.any()
    else:
        assert np.abs(d).max() <= 7.0
        _check_uniform(d[:, 0], -7.0, 7.0)
        _check_uniform(d[:, 1], -7.0, 7.0)
    if kind != "so2":
        assert abs(np.corrcoef(alpha, d[:, 0])[0, 1]) < 5 / math.sqrt(len(d))


def test_distribution_checks_have_power():
    """The KS checks above reject the distribution of a different benchmark."""
    alpha_n, d_n = sample_poses("mnist-n", "test", seed=5)
    alpha_so2, _ = sample_poses("so2", "test", seed=5)
    _, d_se2 = sample_poses("se2", "test", seed=5)
    assert stats.kstest(alpha_n, stats.uniform(-math.pi / 2, math.pi).cdf).pvalue < 1e-6
    assert stats.kstest(alpha_so2, stats.norm(0.0, math.pi / 4).cdf).pvalue < 1e-6
    assert stats.kstest(d_se2[:, 0], stats.norm(0.0, 5.0).cdf).pvalue < 1e-6
    assert stats.kstest(d_n[:, 0], stats.norm(0.0, 4.5).cdf).pvalue < 1e-6


def test_rendered_images_follow_the_poses(small_sets):
    """Image moments agree with the stored shift: the ink centroid moves by about d."""
    for kind in ("mnist-n", "se2"):
        data = small_sets[kind]
        ys, xs = np.mgrid[: data.box, : data.box] - data.box // 2
        mass = data.images.sum((1, 2))
        centroid = np.stack([(data.images * xs).sum((1, 2)) / mass, (data.images * ys).sum((1, 2)) / mass], 1)
        # The digit's own centre of mass is within a few pixels of the box centre, so the
        # centroid tracks d with a small spread.
        slope = np.polyfit(data.displacement[:, 0], centroid[:, 0], 1)[0]
        assert 0.7 < slope < 1.1
        assert np.corrcoef(data.displacement[:, 1], centroid[:, 1])[0, 1] > 0.8


# -- determinism -----------------------------------------------------------------

def test_same_seed_same_set_and_prefixes_agree(mnist_test, small_sets):
    digits, labels = mnist_test
    for kind in ("mnist-u", "se2"):
        again = transform_digits(kind, digits, labels, "test", seed=11, n=400)
        reference = small_sets[kind]
        np.testing.assert_array_equal(again.images, reference.images)
        np.testing.assert_array_equal(again.alpha, reference.alpha)
        np.testing.assert_array_equal(again.displacement, reference.displacement)
        shorter = transform_digits(kind, digits, labels, "test", seed=11, n=50)
        np.testing.assert_array_equal(shorter.images, reference.images[:50])
        np.testing.assert_array_equal(shorter.alpha, reference.alpha[:50])
        alpha_full, d_full = sample_poses(kind, "test", seed=11)
        np.testing.assert_array_equal(alpha_full[:400], reference.alpha)
        np.testing.assert_array_equal(d_full[:400], reference.displacement)


def test_different_seeds_splits_and_kinds_differ():
    alpha0, d0 = sample_poses("mnist-n", "test", seed=0)
    alpha1, d1 = sample_poses("mnist-n", "test", seed=1)
    assert not np.allclose(alpha0, alpha1) and not np.allclose(d0, d1)
    train_alpha, train_d = sample_poses("mnist-n", "train", seed=0)
    # Separate streams: the test poses are not the start of the train poses, and are uncorrelated with them.
    assert not np.allclose(train_alpha[:10000], alpha0)
    bound = 5 / math.sqrt(10000)
    assert abs(np.corrcoef(train_alpha[:10000], alpha0)[0, 1]) < bound
    assert abs(np.corrcoef(train_d[:10000, 0], d0[:, 0])[0, 1]) < bound
    # Each split is reproducible on its own, whatever was drawn before.
    np.testing.assert_array_equal(sample_poses("mnist-n", "test", seed=0)[0], alpha0)
    # Kinds with the same seed do not share draws either.
    alpha_u, d_u = sample_poses("mnist-u", "test", seed=0)
    assert abs(np.corrcoef(d_u[:, 0], d0[:, 0])[0, 1]) < bound


def test_bad_settings_raise_one_line_errors(mnist_test):
    digits, labels = mnist_test
    for call in (
        lambda: sample_poses("mnist-x", "test"),
        lambda: sample_poses("so2", "validation"),
        lambda: sample_poses("so2", "test", seed=-1),
        lambda: sample_poses("so2", "test", n=10001),
        lambda: transform_digits("so2", digits, labels, "test", n=0),
    ):
        with pytest.raises(ParticleVAEError) as error:
            call()
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="labels"):
        transform_digits("so2", digits[:10], labels[:9], "test")


# -- files -------------------------------------------------------------------------

def test_write_benchmark_files(small_sets, tmp_path):
    data = small_sets["mnist-n"].subset(np.arange(30))
    files = write_benchmark(data, tmp_path / "out", "bench", pixel_size=2.0)
    stack = MRCStack(files.stack)
    assert stack.n_images == 30 and stack.box == 50 and stack.pixel_size == pytest.approx(2.0)
    np.testing.assert_array_equal(stack.read(0, 30), data.images)
    star = ParticleStar(files.star)
    assert star.is_relion31 and star.pixel_size() == pytest.approx(2.0)
    table = star.particles
    for column in TRUTH_COLUMNS:
        assert column in table.columns
    assert table["rlnImageName"].iloc[0] == f"000001@{files.stack}"  # outside the current folder: absolute
    assert write_benchmark(data, tmp_path / "p" / "out", "bench", project_dir=tmp_path / "p") and \
        ParticleStar(tmp_path / "p" / "out" / "bench.star").particles["rlnImageName"].iloc[0] == "000001@out/bench.mrcs"
    np.testing.assert_allclose(table["pvaeTrueAlphaDeg"], np.degrees(data.alpha))
    np.testing.assert_allclose(table["pvaeTrueOriginXAngst"], -2.0 * data.displacement[:, 0])
    np.testing.assert_allclose(table["pvaeTrueOriginYAngst"], -2.0 * data.displacement[:, 1])
    meta = json.loads(files.metadata.read_text())
    assert meta["kind"] == "mnist-n" and meta["split"] == "test" and meta["seed"] == 11 and meta["n"] == 30
    assert meta["rotation"]["std_rad"] == pytest.approx(math.pi / 4) and meta["translation"]["std_px"] == 5.0
    assert meta["files"] == {"stack": "bench.mrcs", "star": "bench.star"}
    # Existing outputs are refused before anything is written, and kept intact.
    before = files.stack.read_bytes()
    with pytest.raises(OutputFileError, match="already exists"):
        write_benchmark(small_sets["so2"].subset(np.arange(5)), tmp_path / "out", "bench")
    assert files.stack.read_bytes() == before
    files.stack.unlink()
    with pytest.raises(OutputFileError, match="bench.star"):
        write_benchmark(data, tmp_path / "out", "bench")
    assert not files.stack.exists()  # nothing half-written
    write_benchmark(small_sets["so2"].subset(np.arange(5)), tmp_path / "out", "bench", overwrite=True)
    assert MRCStack(files.stack).box == 28
    with pytest.raises(ParticleVAEError, match="plain file name"):
        write_benchmark(data, tmp_path, "sub/bench")


# -- command line ------------------------------------------------------------------

def test_cli_end_to_end(run_cli, mnist_dir, mnist_test, tmp_path):
    digits, labels = mnist_test
    out = tmp_path / "bench"
    code = run_cli(["make-benchmark", "se2", "--out", str(out), "--mnist-dir", str(mnist_dir),
                    "--split", "both", "--n", "64", "--seed", "3", "--pixel-size", "1.5"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"se2_{s}.{e}" for s in ("train", "test") for e in ("mrcs", "star", "json"))
    expected = make_benchmark("se2", mnist_dir, "test", seed=3, n=64)
    star = ParticleStar(out / "se2_test.star")
    table = star.particles
    assert len(table) == 64 and set(TRUTH_COLUMNS) <= set(table.columns)
    locations = star.image_locations()
    assert locations.stack_paths == [out / "se2_test.mrcs"]
    images = MRCStack(locations.stack_paths[0]).read_indices(locations.image_index)
    np.testing.assert_array_equal(images, expected.images)
    source = table["pvaeSourceIndex"].to_numpy()
    np.testing.assert_array_equal(table["pvaeTrueLabel"].to_numpy(), labels[source])
    np.testing.assert_allclose(table["pvaeTrueShiftXPx"], expected.displacement[:, 0])
    # Undo each image with the RELION truth columns read from the file.
    inside = _interior(expected, digits)
    origin = table[["pvaeTrueOriginXAngst", "pvaeTrueOriginYAngst"]].to_numpy()[inside]
    back = undo_relion_pose(torch.from_numpy(images[inside]), table["pvaeTrueAnglePsi"].to_numpy()[inside], origin, 1.5).numpy()
    assert len(inside) >= 5 and _corr(back, place_on_canvas(digits[source[inside]], 28)).min() > 0.9
    train = ParticleStar(out / "se2_train.star").particles
    assert train["pvaeTrueLabel"].tolist()[:5] == [5, 0, 4, 1, 9]
    assert json.loads((out / "se2_train.json").read_text())["split"] == "train"


def test_cli_reads_data_dir_and_environment(run_cli, mnist_dir, tmp_path, monkeypatch):
    assert run_cli(["make-benchmark", "so2", "--out", str(tmp_path / "a"), "--data-dir", str(mnist_dir.parent),
                    "--split", "test", "--n", "8", "--name", "rot"]) == 0
    assert MRCStack(tmp_path / "a" / "rot_test.mrcs").n_images == 8
    monkeypatch.setenv("PARTICLE_VAE_DATA", str(mnist_dir.parent))
    assert run_cli(["make-benchmark", "mnist-u", "--out", str(tmp_path / "b"), "--split", "test", "--n", "8"]) == 0
    assert MRCStack(tmp_path / "b" / "mnist_u_test.mrcs").box == 50


def _cli_error(run_cli, capsys, argv) -> str:
    capsys.readouterr()
    assert run_cli(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("particle-vae make-benchmark: error:")
    return lines[0]


def test_cli_error_paths(run_cli, capsys, mnist_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    line = _cli_error(run_cli, capsys, ["make-benchmark", "so2", "--out", out, "--mnist-dir", str(tmp_path / "nope")])
    assert "nope" in line and "--mnist-dir" in line
    monkeypatch.delenv("PARTICLE_VAE_DATA", raising=False)
    line = _cli_error(run_cli, capsys, ["make-benchmark", "so2", "--out", out])
    assert "--mnist-dir" in line and "PARTICLE_VAE_DATA" in line
    # A corrupted copy of MNIST: the file is named.
    bad = tmp_path / "bad-mnist"
    bad.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (bad / f"{name}.gz").write_bytes(find_mnist_file(mnist_dir, name).read_bytes())
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    line = _cli_error(run_cli, capsys, ["make-benchmark", "so2", "--out", out, "--mnist-dir", str(bad), "--split", "test"])
    assert "t10k-labels-idx1-ubyte.gz" in line
    line = _cli_error(run_cli, capsys, ["make-benchmark", "so2", "--out", out, "--mnist-dir", str(bad), "--split", "train"])
    assert "train-images-idx3-ubyte" in line
    line = _cli_error(run_cli, capsys, ["make-benchmark", "so2", "--out", out, "--mnist-dir", str(mnist_dir),
                                        "--split", "both", "--n", "20000"])
    assert "--n 20000" in line and "test" in line
    # An existing output is refused (before any rendering) unless --overwrite.
    args = ["make-benchmark", "so2", "--out", out, "--mnist-dir", str(mnist_dir), "--split", "test", "--n", "4"]
    assert run_cli(args) == 0
    line = _cli_error(run_cli, capsys, args)
    assert "so2_test.mrcs" in line and "--overwrite" in line
    assert run_cli(args + ["--overwrite", "--seed", "9"]) == 0
    assert not np.array_equal(ParticleStar(tmp_path / "out" / "so2_test.star").particles["pvaeTrueAlphaDeg"],
                              np.degrees(sample_poses("so2", "test", seed=0, n=4)[0]))
