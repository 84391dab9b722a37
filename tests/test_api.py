"""The Python API (particle_vae.api): simulate -> train -> infer -> analyze as functions, the same
outputs as the commands, and the project's errors instead of exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from particle_vae import api, cli
from particle_vae.data.simulation import SimulationConfig, StructureSpec
from particle_vae.engine.refine import RefineSettings
from particle_vae.engine.run import RunDirectory
from particle_vae.errors import InputFileError, OutputFileError, ParticleVAEError
from particle_vae.io.star import ParticleStar

pytestmark = pytest.mark.usefixtures("single_thread")

N = 64
BOX = 24
#: a small TARGET-VAE: the tiny preset with a smaller encoder and generator
MODEL = {"n_fields": 4, "gen_hidden": 32, "n_fourier": 16, "group_order": 4}
#: the same settings as train options
MODEL_OPTIONS = ["--fields", "4", "--gen-hidden", "32", "--fourier-features", "16", "--group", "4"]
TRAIN = {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu"}
TRAIN_OPTIONS = ["--epochs", "1", "--batch-size", "16", "--seed", "0", "--device", "cpu"]
#: a short pose refinement: 1 iteration, 30 degree steps, 2 classes
REFINE = RefineSettings(iterations=1, n_psi=12, device="auto")
REFINE_OPTIONS = ["--refine-iterations", "1", "--refine-angle-step", "30", "--refine-classes", "2"]


def volumes(box: int) -> list[np.ndarray]:
    """Two test objects, ``(box, box, box)`` float32 ``[z, y, x]``: a ball and a rod along x."""
    axis = np.arange(box, dtype=np.float64) - box // 2
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    ball = np.exp(-(xx ** 2 + yy ** 2 + zz ** 2) / (2 * 2.5 ** 2))
    rod = sum(np.exp(-((xx - x) ** 2 + yy ** 2 + zz ** 2) / (2 * 1.5 ** 2)) for x in np.linspace(-6, 6, 7))
    return [(v / v.sum()).astype(np.float32) for v in (ball, rod)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """simulate -> train (1 epoch) -> infer (short refinement) -> analyze (k = 2), all through the API."""
    folder = tmp_path_factory.mktemp("api")
    config = SimulationConfig(structures=[StructureSpec(Path("synthetic_ball"), "ball", False),
                                          StructureSpec(Path("synthetic_rod"), "rod", False)],
                              n=N, box=BOX, pixel_size=8.0, snr=2.0, max_shift=1.0, seed=0, defocus_range=(8000.0, 15000.0))
    simulated = api.simulate(api.SimulateRequest(config, folder / "data", progress=False, densities=volumes(BOX)))
    trained = api.train(api.TrainRequest.from_preset("tiny", folder / "run", api.ParticleData(simulated.star),
                                                     model_settings=MODEL, **TRAIN))
    inferred = api.infer(api.InferRequest(trained.run, folder / "particles_vae.star", refine=REFINE, refine_classes=2))
    analysed = api.analyze(api.AnalyzeRequest(inferred.star, folder / "analysis", run=trained.run, k=2, gallery=2))
    return {"folder": folder, "simulated": simulated, "trained": trained, "inferred": inferred, "analysed": analysed}


def test_the_pipeline_through_the_api_returns_what_it_wrote(pipeline):
    simulated, trained = pipeline["simulated"], pipeline["trained"]
    inferred, analysed = pipeline["inferred"], pipeline["analysed"]
    assert simulated.n == N and simulated.star.is_file() and simulated.stack.is_file()
    assert set(simulated.files) == {"particles.mrcs", "particles.star", "simulation.json"}
    assert simulated.snr_measured == pytest.approx(2.0, rel=0.05)
    assert len(ParticleStar(simulated.star)) == N

    assert trained.run == pipeline["folder"] / "run" and (trained.run / "config.json").is_file()
    assert [row["epoch"] for row in trained.metrics] == [0] and trained.final is trained.metrics[-1]
    assert trained.metrics == RunDirectory(trained.run).read_metrics()
    assert trained.best_val_elbo == trained.final["val_elbo"]
    assert trained.model["box"] == BOX and trained.model["n_fields"] == 4 and trained.model["group_order"] == 4
    config = json.loads((trained.run / "config.json").read_text())
    assert config["train"]["epochs"] == 1 and config["train"]["lr"] == 1e-3  # the option, and the tiny preset's rate
    assert "target_box" not in config["data"]["preprocessing"]  # the preset's 32 px exceeds the 24 px particles

    assert inferred.n_particles == N and inferred.star.is_file() and inferred.npz == inferred.star.with_suffix(".npz")
    particles = ParticleStar(inferred.star).particles
    assert len(particles) == N and {"pvaeZ1", "pvaeZ2", "rlnAnglePsi", "pvaeRefineClass"} <= set(particles.columns)
    assert np.load(inferred.npz)["z_mean"].shape == (N, 2)

    assert analysed.k == 2 and sum(analysed.counts) == N and len(analysed.counts) == 2
    assert analysed.labels.shape == (N,) and set(np.unique(analysed.labels)) <= {0, 1}
    assert analysed.record == json.loads(analysed.record_path.read_text())
    assert analysed.record["outputs"] == {key: path.name for key, path in analysed.outputs.items()}
    assert all(path.is_file() and path.parent == analysed.out for path in analysed.outputs.values())
    assert {"class_averages.mrcs", "cluster_centres.mrcs", "gallery.png", "latent_traversal.png"} <= {
        path.name for path in analysed.outputs.values()}
    classes = ParticleStar(analysed.star).particles["rlnClassNumber"].to_numpy()
    np.testing.assert_array_equal(classes, analysed.labels + 1)
    assert [int(c) for c in np.bincount(analysed.labels, minlength=2)] == analysed.counts


def test_the_commands_write_what_the_api_writes(pipeline, tmp_path):
    run, folder = pipeline["trained"].run, pipeline["folder"]
    # train: the same run settings and the same first epoch
    assert cli.main(["-q", "train", str(pipeline["simulated"].star), "--preset", "tiny", *MODEL_OPTIONS, *TRAIN_OPTIONS,
                     "--out", str(tmp_path / "run")]) == 0
    ours, theirs = (json.loads((path / "config.json").read_text()) for path in (run, tmp_path / "run"))
    assert ours == theirs
    assert [row["train_elbo"] for row in RunDirectory(tmp_path / "run").read_metrics()] == [
        row["train_elbo"] for row in pipeline["trained"].metrics]
    # infer: the same columns and values
    star = tmp_path / "particles_vae.star"
    assert cli.main(["-q", "infer", str(run), "--out", str(star), *REFINE_OPTIONS]) == 0
    by_api, by_cli = ParticleStar(pipeline["inferred"].star).particles, ParticleStar(star).particles
    assert list(by_api.columns) == list(by_cli.columns)
    pd.testing.assert_frame_equal(by_api, by_cli)
    # analyze: the same clustered STAR and the same files
    assert cli.main(["-q", "analyze", str(pipeline["inferred"].star), "--run", str(run), "--k", "2", "--gallery", "2",
                     "--out", str(tmp_path / "analysis")]) == 0
    by_api = ParticleStar(pipeline["analysed"].star).particles
    by_cli = ParticleStar(tmp_path / "analysis" / "clustered_particles.star").particles
    assert list(by_api.columns) == list(by_cli.columns)
    pd.testing.assert_frame_equal(by_api, by_cli)
    assert sorted(p.name for p in (folder / "analysis").iterdir()) == sorted(p.name for p in (tmp_path / "analysis").iterdir())


def test_simulate_from_a_preset_writes_what_the_command_writes(structures_dir, tmp_path):
    data = structures_dir.parent
    result = api.simulate(api.SimulateRequest.from_preset("t20s", 12, tmp_path / "api", data_dir=data, box=32, pixel_size=8.0,
                                                          snr=0.5, progress=False))
    assert cli.main(["-q", "simulate", "--preset", "t20s", "--n", "12", "--box", "32", "--pixel-size", "8", "--snr", "0.5",
                     "--data-dir", str(data), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert result.n == 12 and result.star == tmp_path / "api" / "particles.star"
    assert (tmp_path / "api" / "particles.mrcs").read_bytes() == (tmp_path / "cli" / "particles.mrcs").read_bytes()
    by_api, by_cli = ParticleStar(result.star).particles, ParticleStar(tmp_path / "cli" / "particles.star").particles
    assert list(by_api.columns) == list(by_cli.columns)
    pd.testing.assert_frame_equal(by_api.drop(columns="rlnImageName"), by_cli.drop(columns="rlnImageName"))


def test_bad_inputs_raise_the_project_s_errors_instead_of_exiting(pipeline, tmp_path):
    run, star = pipeline["trained"].run, pipeline["inferred"].star
    cases = [
        (InputFileError, lambda: api.train(api.TrainRequest.from_preset("tiny", tmp_path / "run", api.ParticleData(tmp_path / "no.star")))),
        (ParticleVAEError, lambda: api.train(api.TrainRequest(tmp_path / "run"))),
        (OutputFileError, lambda: api.train(api.TrainRequest.from_preset("tiny", run, api.ParticleData(pipeline["simulated"].star)))),
        (ParticleVAEError, lambda: api.infer(api.InferRequest(tmp_path / "no_run", tmp_path / "out.star"))),
        (OutputFileError, lambda: api.infer(api.InferRequest(run, star))),
        (ParticleVAEError, lambda: api.infer(api.InferRequest(run, tmp_path / "out.star", refine=RefineSettings(iterations=0)))),
        (InputFileError, lambda: api.analyze(api.AnalyzeRequest(tmp_path / "no.star", tmp_path / "analysis"))),
        (ParticleVAEError, lambda: api.analyze(api.AnalyzeRequest(star, tmp_path / "analysis", k=N + 1))),
        (ParticleVAEError, lambda: api.analyze(api.AnalyzeRequest(star, tmp_path / "analysis", method="dbscan"))),
        (InputFileError, lambda: api.simulate(api.SimulateRequest.from_preset("no-such-preset", 10, tmp_path / "sim"))),
    ]
    for kind, call in cases:
        with pytest.raises(kind) as raised:  # a SystemExit would not be caught here and would fail the test
            call()
        assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.star").exists() and not (tmp_path / "analysis").exists()
