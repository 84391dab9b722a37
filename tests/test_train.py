"""Training engine and the train -> infer -> STAR path on tiny simulated data."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from particle_vae import cli
from particle_vae.engine.run import RunDirectory
from particle_vae.engine.trainer import split_indices
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import ParticleStar, image_name, make_particle_star

TINY = ["--preset", "tiny", "--fields", "4", "--gen-hidden", "32", "--fourier-features", "16", "--group", "4",
        "--downsample-to", "24", "--batch-size", "16", "--seed", "3"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("sim")
    code = cli.main(["-q", "simulate", "--preset", "t20s", "--n", "96", "--box", "32", "--pixel-size", "8",
                     "--snr", "1", "--data-dir", str(data_root), "--out", str(out), "--no-progress"])
    assert code == 0
    return out / "particles.star"


def train(args, capsys=None):
    code = cli.main(["-q", "train", *args])
    return code


def test_split_is_deterministic_disjoint_and_complete():
    train_idx, val_idx = split_indices(50, 0.1, seed=1)
    assert len(val_idx) == 5 and len(train_idx) == 45
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(50))
    again = split_indices(50, 0.1, seed=1)
    assert (again[1] == val_idx).all()
    assert not (split_indices(50, 0.1, seed=2)[1] == val_idx).all()


def test_training_raises_the_elbo_and_writes_a_run(simulated, tmp_path):
    run = tmp_path / "run"
    assert train([str(simulated), *TINY, "--epochs", "5", "--lr", "3e-3", "--out", str(run)]) == 0
    rows = RunDirectory(run).read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["val_elbo"] > rows[0]["val_elbo"]
    assert rows[-1]["train_elbo"] > rows[0]["train_elbo"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["model"] == "target-vae" and config["model"]["box"] == 24
    assert config["data"]["preprocessing"]["target_box"] == 24
    # checkpoints hold learnable parameters only (no e2cnn sampled bases)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert not any("_basisexpansion" in key or key.endswith(".filter") for key in state["model"])
    assert (run / "train.log").read_text().count("epoch") >= 5


def test_resume_continues_exactly(simulated, tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert train([str(simulated), *TINY, "--epochs", "3", "--out", str(straight)]) == 0
    assert train([str(simulated), *TINY, "--epochs", "2", "--out", str(resumed)]) == 0
    assert train(["--out", str(resumed), "--resume", "--epochs", "3"]) == 0
    a, b = RunDirectory(straight).read_metrics(), RunDirectory(resumed).read_metrics()
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for key in ("train_elbo", "val_elbo", "train_kl_pose", "lr"):  # the same computations in the same order
        assert a[2][key] == b[2][key], key


def test_existing_run_is_not_overwritten(simulated, tmp_path, capsys):
    run = tmp_path / "run"
    assert train([str(simulated), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    before = (run / "config.json").read_bytes()
    assert train([str(simulated), *TINY, "--epochs", "1", "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == before


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path)
    run.checkpoint_dir.mkdir()
    run.save_checkpoint(run.last_checkpoint, {"epoch": 1})

    def failing_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(run.last_checkpoint, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(run.last_checkpoint, weights_only=False) == {"epoch": 1}
    assert [p.name for p in run.checkpoint_dir.iterdir()] == ["last.pt"]


def test_train_infer_star_round_trip(simulated, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out" / "poses.star"
    assert train([str(simulated), *TINY, "--epochs", "2", "--out", str(run)]) == 0
    assert cli.main(["-q", "infer", str(run), "--out", str(out), "--batch-size", "40"]) == 0
    source = ParticleStar(simulated)
    ours = ParticleStar(out)
    theirs = starfile.read(out)
    assert len(ours) == len(source) == len(theirs["particles"])
    for column in source.particles.columns:
        if column != "rlnImageName":
            pd.testing.assert_series_equal(ours.particles[column], source.particles[column], check_names=False)
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "pvaeZ1", "pvaeZ2", "pvaeZStd1", "pvaePoseConfidence", "pvaeRotationEntropy"):
        np.testing.assert_array_equal(ours.particles[column].to_numpy(float), theirs["particles"][column].to_numpy(float))
    assert ours.particles["rlnAnglePsi"].between(-180, 180).all()
    assert ours.optics.equals(source.optics)
    # the stacks still resolve from the new folder
    locations = ours.image_locations()
    assert locations.stack_paths[0].resolve() == (simulated.parent / "particles.mrcs").resolve()
    npz = np.load(out.with_suffix(".npz"))
    np.testing.assert_allclose(npz["rlnAnglePsi"], ours.particles["rlnAnglePsi"])
    from particle_vae.commands.info import summarize

    summary = summarize(out, sample=0)
    assert summary["latent_columns"] == ["pvaeZ1", "pvaeZ2", "pvaeZStd1", "pvaeZStd2"]
    assert summary["pose_columns"] == ["rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "pvaeAnglePsiStd", "pvaePoseProbability",
                                       "pvaeRefineClass", "pvaeRefineClassProbability"]
    assert npz["z_mean"].shape == (len(source), 2)


def test_infer_on_a_bare_stack_writes_a_relion31_star(simulated, tmp_path):
    run = tmp_path / "run"
    assert train([str(simulated), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    stack = simulated.parent / "particles.mrcs"
    out = tmp_path / "stack_poses.star"
    assert cli.main(["-q", "infer", str(run), "--particles", str(stack), "--pixel-size", "8", "--out", str(out)]) == 0
    star = ParticleStar(out)
    assert star.is_relion31 and star.pixel_size() == 8 and len(star) == 96
    assert star.image_locations().stack_paths[0].resolve() == stack.resolve()


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("nan", "NaN"),
        ("small_box", "smaller than the encoder kernel"),
        ("cuda", "CUDA"),
    ],
)
def test_bad_training_input_gives_one_line_errors(tmp_path, capsys, problem, expected):
    images = np.random.default_rng(0).normal(size=(20, 24, 24)).astype(np.float32)
    stack = write_stack(tmp_path / "p.mrcs", images, 2.0)
    args = [str(stack), *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]
    if problem == "nan":
        raw = bytearray(stack.read_bytes())
        raw[1024 + 5 * 24 * 24 * 4: 1024 + 5 * 24 * 24 * 4 + 4] = np.array([np.nan], dtype="<f4").tobytes()
        stack.write_bytes(bytes(raw))
    elif problem == "small_box":
        args += ["--kernel", "41"]
    elif problem == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        args += ["--device", "cuda"]
    assert train(args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_empty_stack_is_rejected(tmp_path, capsys):
    star = make_particle_star([image_name(0, "none.mrcs")], 1.0, 24)
    path = star.write(tmp_path / "p.star")
    assert train([str(path), *TINY, "--out", str(tmp_path / "run")]) == 2
    assert "none.mrcs" in capsys.readouterr().err


def test_stack_without_images_is_rejected(tmp_path, capsys):
    from particle_vae.io.mrc import HEADER_DTYPE_LE

    header = np.zeros(1, dtype=HEADER_DTYPE_LE)
    header[0]["nx"], header[0]["ny"], header[0]["nz"], header[0]["mode"] = 24, 24, 0, 2
    header[0]["map"] = b"MAP "
    path = tmp_path / "empty.mrcs"
    path.write_bytes(header.tobytes())
    assert train([str(path), *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "empty.mrcs" in err and "no images" in err and "\n" not in err


def test_ctf_aware_training_runs(simulated, tmp_path):
    run = tmp_path / "run"
    assert train([str(simulated), *TINY, "--epochs", "1", "--ctf", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["ctf"] is True and config["model"]["likelihood"] == "gaussian"
    assert math.isfinite(RunDirectory(run).read_metrics()[0]["val_elbo"])


def test_written_poses_align_the_model_s_own_drawings(simulated, tmp_path):
    """Particles drawn by the model at its inferred pose, aligned with the STAR's
    RELION columns through the conventions module, are the model's upright drawing
    (pose zero) moved so that its centre of mass is on the box centre; with
    --no-center, the drawing as the generator makes it."""
    from particle_vae.conventions import fourier_shift, undo_relion_pose
    from particle_vae.engine.inference import load_model

    run, out, raw = tmp_path / "run", tmp_path / "poses.star", tmp_path / "raw.star"
    assert train([str(simulated), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    assert cli.main(["-q", "infer", str(run), "--out", str(out), "--no-refine"]) == 0
    assert cli.main(["-q", "infer", str(run), "--out", str(raw), "--no-center", "--no-refine"]) == 0
    model, config = load_model(RunDirectory(run))
    npz = np.load(out.with_suffix(".npz"))
    assert "centre_px" not in np.load(raw.with_suffix(".npz"))
    z = torch.tensor(npz["z_mean"][:8], dtype=torch.float32)
    theta, t = torch.as_tensor(npz["theta"][:8]), torch.as_tensor(npz["t_px"][:8])
    with torch.no_grad():
        posed = model.decode(z, theta, t).double()
        upright = model.decode(z, torch.zeros(8), torch.zeros(8, 2)).double()
    centres = torch.as_tensor(npz["centre_px"][:8])
    assert 0.3 < float(centres.norm(dim=1).mean()) < model.box / 2  # trained generators draw off-centre
    inner = model.box // 2 - 4
    centre = slice(model.box // 2 - inner // 2, model.box // 2 + inner // 2)
    for star, expected in ((out, fourier_shift(upright, -centres)), (raw, upright)):
        rows = ParticleStar(star).particles.iloc[:8]
        origin = rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
        aligned = undo_relion_pose(posed, rows["rlnAnglePsi"].to_numpy(), origin, config["pixel_size"], mode="bicubic")
        a, b = aligned[:, centre, centre], expected[:, centre, centre]
        error = (a - b).norm() / b.norm()
        assert error < 0.15, (star.name, float(error))


def test_vae_baseline_through_the_cli_writes_latents_but_no_pose(simulated, tmp_path):
    run, out = tmp_path / "run", tmp_path / "vae.star"
    vae_options = ["--preset", "tiny", "--hidden", "32", "--layers", "1", "--downsample-to", "24", "--batch-size", "16",
                   "--seed", "3", "--beta", "4"]
    assert train([str(simulated), "--model", "vae", *vae_options, "--epochs", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["model"] == "vae" and config["model"]["beta"] == 4.0 and config["model"]["hidden"] == 32
    assert config["model"]["layers"] == 1 and config["model"]["likelihood"] == "gaussian"  # the preset's likelihood
    assert cli.main(["-q", "infer", str(run), "--out", str(out)]) == 0
    columns = ParticleStar(out).particles.columns
    assert "pvaeZ1" in columns and "rlnAnglePsi" not in columns


def test_max_steps_stops_inside_an_epoch_and_resume_continues_exactly(simulated, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train([str(simulated), *TINY, "--epochs", "2", "--out", str(straight)]) == 0
    assert train([str(simulated), *TINY, "--epochs", "2", "--max-steps", "3", "--out", str(stopped)]) == 0
    rows = RunDirectory(stopped).read_metrics()
    assert len(rows) == 1 and rows[0]["partial"] is True and rows[0]["step"] == 3
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 0 and state["batches_done"] == 3 and state["epoch_complete"] is False
    assert train(["--out", str(stopped), "--resume", "--max-steps", "1000"]) == 0
    a, b = RunDirectory(straight).read_metrics(), RunDirectory(stopped).read_metrics()
    assert [r["epoch"] for r in b] == [0, 1] and b[-1]["step"] == a[-1]["step"] == 12  # 86 training images, batches of 16
    assert b[-1]["val_elbo"] == a[-1]["val_elbo"] and b[-1]["lr"] == a[-1]["lr"]
    final_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)["model"]
    final_b = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


# bf16 keeps 8 significant bits: a rounding to bf16 moves a value by up to 2^-8 of itself. The encoder's first
# layer rounds its input, its weights and its output, and each of its three 1 x 1 layers its weights and its
# output (products are summed in float32): 9 roundings along the chain, so its outputs move by up to about
# 9 * 2^-8 (3.5%) of their size, whichever kernels the processor has (the float32 sums differ between
# processors far below the bf16 roundings).
BF16_ENCODER_REL = 9 * 2.0 ** -8


def test_bf16_precision_on_cpu_trains_with_shared_mixing_and_is_recorded(simulated, tmp_path):
    """--precision bf16 runs the autocast path on the CPU (and the patch-product first layer);
    the run still learns and records the setting so that --resume keeps it; infer --precision bf16
    reads out through the bf16 encoder, whose outputs stay within bf16 rounding of float32's."""
    from particle_vae.engine.data import prepare_data
    from particle_vae.engine.inference import load_model, run_inference

    run = tmp_path / "run"
    assert train([str(simulated), *TINY, "--epochs", "3", "--lr", "3e-3", "--precision", "bf16", "--mixing", "shared",
                  "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["precision"] == "bf16" and config["model"]["mixing"] == "shared"
    rows = RunDirectory(run).read_metrics()
    assert all(math.isfinite(r["train_elbo"]) for r in rows)
    assert rows[-1]["train_elbo"] > rows[0]["train_elbo"]

    # the model's own origins (--no-center): the centring groups particles by their latents
    exact, mixed = tmp_path / "fp32.star", tmp_path / "bf16.star"
    assert cli.main(["-q", "infer", str(run), "--out", str(exact), "--no-center", "--no-refine"]) == 0
    assert cli.main(["-q", "infer", str(run), "--out", str(mixed), "--precision", "bf16", "--no-center", "--no-refine"]) == 0
    a, b = np.load(exact.with_suffix(".npz")), np.load(mixed.with_suffix(".npz"))
    # the two commands ran the float32 and the bf16 readout: the same computations here give the same numbers
    model, _ = load_model(RunDirectory(run))
    spec = {key: value for key, value in config["data"].items() if key != "cache"}
    prepared = prepare_data(spec)
    for npz, bf16 in ((a, False), (b, True)):
        result = run_inference(model, prepared, bf16=bf16)
        for key in ("theta", "t", "z_mean", "z_std"):
            np.testing.assert_array_equal(npz["t_px" if key == "t" else key], getattr(result, key), err_msg=f"{key} bf16={bf16}")
    assert not np.array_equal(a["z_mean"], b["z_mean"])

    # the bf16 encoder is within bf16 rounding of the float32 one (this barely trained model's outputs are small
    # and close together, so it is measured here, on its own scale)
    images = prepared.dataset.__getitems__(list(range(len(prepared.dataset))))["images"]
    with torch.no_grad():
        out32, log_q = model.encoder(images), model.posterior(images)["log_q"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = model.encoder(images).float()
    for channel in range(out32.shape[1]):
        error, size = (out16[:, channel] - out32[:, channel]).abs().max(), out32[:, channel].abs().max()
        assert error <= BF16_ENCODER_REL * size, (channel, float(error), float(size))
    # which cell is the MAP cell is not compared: this model's cells lie closer together than bf16 resolves (its
    # log q near -7 is kept in bf16, in steps of 2^-5), so bf16 may pick another one of nearly equal probability.
    # The MAP probability does not depend on which: log max q moves by at most the largest move of any log q,
    # twice the encoder's bf16 error of the logits plus the bf16 rounding of log q (and of the probability)
    bound = 2 * BF16_ENCODER_REL * float(out32[:, 0].abs().max()) + 2.0 ** -8 * (float(log_q.abs().max()) + 1)
    moved = np.abs(np.log(b["extra_pose_confidence"]) - np.log(a["extra_pose_confidence"]))
    assert moved.max() <= bound, (moved.max(), bound)


@pytest.mark.parametrize("check_steps", [1, 100])
def test_a_non_finite_loss_stops_training_with_one_line_and_no_spoiled_checkpoint(simulated, tmp_path, monkeypatch, capsys,
                                                                                   check_steps):
    """The loss is checked every step on the CPU and every few steps on GPUs (no wait for the device at
    each step; 100 here: only the check at the end of the epoch sees it). Either way the run stops with
    a one-line error before a checkpoint holds the weights the bad step spoiled."""
    from particle_vae.engine import trainer as trainer_module
    from particle_vae.models.base import LossTerms
    from particle_vae.models.target_vae import TargetVAE

    monkeypatch.setattr(trainer_module.Trainer, "finite_check_steps", property(lambda self: check_steps))
    original = TargetVAE.loss
    steps = {"n": 0}

    def loss_with_a_bad_third_step(self, images, ctf=None):
        terms = original(self, images, ctf)
        if self.training:
            steps["n"] += 1
            if steps["n"] == 3:
                return LossTerms(loss=terms.loss * float("nan"), elbo=terms.elbo, terms=terms.terms)
        return terms

    monkeypatch.setattr(TargetVAE, "loss", loss_with_a_bad_third_step)
    run = tmp_path / "run"
    assert train([str(simulated), *TINY, "--epochs", "2", "--out", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "NaN or infinite" in lines[0] and "--lr" in lines[0]
    # checked every step: stopped at the bad one; every 100: went on to the end of the first epoch
    assert steps["n"] == 3 if check_steps == 1 else steps["n"] > 3
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "checkpoints" / "best.pt").exists()


def reordering_rel(*lengths: int, margin: float = 16.0) -> float:
    """Relative change of a float32 result when its sums of ``lengths`` terms are taken in another order
    (other kernels, other memory layouts): a sum of n terms moves by about sqrt(n) * 2^-24 relative to its size
    (rounding errors of 2^-24 per addition adding up like a random walk), added along the chain of sums;
    ``margin`` leaves room for terms that cancel and errors that line up."""
    return margin * sum(math.sqrt(n) for n in lengths) * 2.0 ** -24


# How far a traced step may be from the plain one. Dynamo's "eager" backend runs the same ATen kernels in the
# same order on the same random numbers, but the traced graph may hand a kernel tensors of another layout, and
# CPU kernels (oneDNN/MKL blockings differ between AVX2, AVX-512 and AMX machines) may then sum in another
# order. The TINY model's loss passes through these sums one after another: the 13 x 13 first-layer kernel, three
# 1 x 1 layers over 16 channels, the softmax and KL sums over 1,024 pose cells, the generator's 32-term products
# (three) and 2-term latent branch, the likelihood's 24 x 24 pixels and the mean over 16 images: about 1e-4.
# That bounds the first step's loss (weights untouched). After the first Adam step the validation loss stays
# within it too: that step moves each weight by lr g / (|g| + eps), about lr sign(g), which a relative error of g
# does not change; only weights whose gradient is at rounding level can move differently, and with a gradient
# that small they hardly change the loss (perturbing every gradient by 1e-4 of its tensor's RMS, far more than
# rounding, moved the validation ELBO by 2e-7 relative). Later steps are not compared: training amplifies
# rounding differences step by step (2.4e-5 relative after 2 epochs on an Intel Xeon with AMX, 4e-7 on an AMD
# EPYC), so a tolerance there would only describe one processor.
FIRST_STEP_REL = reordering_rel(169, 16, 16, 16, 1024, 32, 32, 32, 2, 576, 16)


def test_compile_trains_like_eager_and_falls_back_when_compilation_fails(simulated, tmp_path, monkeypatch):
    """--compile runs the step through torch.compile (here with dynamo's "eager" backend, which traces
    the step without generating code: same operations, same random numbers); its first optimiser step
    matches plain training up to float32 summation order (``FIRST_STEP_REL``). When compiling fails,
    training goes on without it, with one warning, on the very path of plain training: two epochs then
    give plain training's metrics and weights exactly."""
    import functools

    plain, plain_step, traced, broken = (tmp_path / name for name in ("plain", "plain_step", "traced", "broken"))
    args = [str(simulated), *TINY, "--epochs", "2"]
    first_step = [str(simulated), *TINY, "--epochs", "1", "--max-steps", "1"]
    assert train([*args, "--out", str(plain)]) == 0
    assert train([*first_step, "--out", str(plain_step)]) == 0

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="eager"))
    assert train([*first_step, "--compile", "--out", str(traced)]) == 0

    def compile_that_fails(function, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found\nsecond line")
        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    assert train([*args, "--compile", "--out", str(broken)]) == 0
    for run in (traced, broken):
        assert json.loads((run / "config.json").read_text())["train"]["compile"] is True

    # the traced run: one step, the loss before it (train) and the validation after it
    (expected,), (row,) = RunDirectory(plain_step).read_metrics(), RunDirectory(traced).read_metrics()
    assert row["step"] == expected["step"] == 1
    for key in ("train_elbo", "val_elbo"):
        assert row[key] == pytest.approx(expected[key], rel=FIRST_STEP_REL, abs=0), key
    # the traced step's gradients reached the optimiser: the first Adam step moves a weight by about lr, the
    # same way in both runs except where a gradient is at rounding level; without the step every weight
    # would be about lr away from plain training's (then about 1% of them are within lr / 4)
    ours = torch.load(traced / "checkpoints" / "last.pt", weights_only=False)["model"]
    theirs = torch.load(plain_step / "checkpoints" / "last.pt", weights_only=False)["model"]
    gaps = torch.cat([(ours[k].double() - theirs[k].double()).abs().flatten() for k in theirs])
    assert float((gaps < expected["lr"] / 4).double().mean()) > 0.9

    # the fallback run is plain training: same operations on the same data in the same order
    expected_rows, rows = RunDirectory(plain).read_metrics(), RunDirectory(broken).read_metrics()
    for key in ("train_elbo", "val_elbo", "lr", "step"):
        assert [r[key] for r in rows] == [r[key] for r in expected_rows], key
    final_plain = torch.load(plain / "checkpoints" / "last.pt", weights_only=False)["model"]
    final_broken = torch.load(broken / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(final_plain[k], final_broken[k]) for k in final_plain)
    log_text = (broken / "train.log").read_text()
    assert log_text.count("torch.compile failed") == 1 and "no working C++ compiler found" in log_text
    assert "torch.compile failed" not in (traced / "train.log").read_text()
