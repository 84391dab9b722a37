"""Every registered model trains, resumes and infers through the same CLI path."""

from __future__ import annotations

import numpy as np
import pytest

from particle_vae import cli
from particle_vae.engine.run import RunDirectory
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import ParticleStar, image_name, make_particle_star
from particle_vae.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = ["--batch-size", "8", "--normalize", "minmax", "--likelihood", "bernoulli", "--seed", "1"]
#: each model's own options for a small, fast network (a model's options are its own: another's are refused)
SMALL = {
    "target-vae": ["--fields", "4", "--kernel", "9", "--padding", "2", "--group", "4", "--gen-hidden", "16", "--gen-layers", "1",
                   "--fourier-features", "8"],
    "spatial-vae": ["--enc-hidden", "16", "--enc-channels", "4", "--gen-hidden", "16", "--gen-layers", "1",
                    "--fourier-features", "8"],
    "mce-vae": ["--enc-hidden", "16", "--enc-channels", "4", "--clusters", "2", "--cluster-dim", "2", "--dec-hidden", "16",
                "--dec-layers", "1", "--invariance-rotations", "4"],
    "vae": ["--hidden", "16", "--layers", "1"],
    "beta-vae": ["--hidden", "16", "--layers", "1", "--beta", "2"],
    "equivae": ["--hidden", "16", "--layers", "1", "--embed-dim", "2"],
}


@pytest.fixture(scope="module")
def labelled_star(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    images = rng.random((24, 16, 16)).astype(np.float32)
    images[:12, 5:11, 7:9] += 2.0  # two kinds of object
    images[12:, 7:9, 4:12] += 2.0
    write_stack(folder / "p.mrcs", images, 3.0)
    labels = np.array([3] * 12 + [5] * 12)
    labels_text = np.where(np.arange(24) % 3 == 0, "", labels.astype(str))  # a third unlabelled
    star = make_particle_star([image_name(i, "p.mrcs") for i in range(24)], 3.0, 16,
                              columns={"rlnClassNumber": labels_text})
    return star.write(folder / "p.star")


def test_every_registered_model_has_small_options_here():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_trains_resumes_and_infers(name, labelled_star, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out.star"
    extra = ["--label-column", "rlnClassNumber"] if MODELS[name].supports_labels else []
    assert cli.main(["-q", "train", str(labelled_star), "--model", name, *SMALL[name], *COMMON, *extra, "--epochs", "1",
                     "--out", str(run)]) == 0
    settings = RunDirectory(run).read_config()["model"]
    fields = {option.flag: option.field for option in MODELS[name].options}
    for flag, value in zip(SMALL[name][::2], SMALL[name][1::2]):  # every option reached the model's config
        assert settings[fields[flag]] == type(settings[fields[flag]])(value), flag
    assert settings["model"] == name and settings["likelihood"] == "bernoulli"
    if MODELS[name].supports_labels:  # the trainer passes the labels to such a model's loss
        assert settings["n_classes"] == 2  # the label values 3 and 5
        assert RunDirectory(run).read_metrics()[0]["train_labelled_fraction"] > 0
    assert cli.main(["-q", "train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert [row["epoch"] for row in RunDirectory(run).read_metrics()] == [0, 1]
    assert cli.main(["-q", "infer", str(run), "--out", str(out)]) == 0
    columns = ParticleStar(out).particles.columns
    model = build_model(RunDirectory(run).read_config()["model"])
    assert "pvaeZ1" in columns and "rlnClassNumber" in columns
    assert ("rlnAnglePsi" in columns) == model.has_pose
    if "pvaePredictedClass" in columns:  # mapped back to the label values 3 and 5
        assert set(ParticleStar(out).particles["pvaePredictedClass"].astype(int)) <= {3, 5}
