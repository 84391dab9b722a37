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

SMALL = ["--fields", "4", "--kernel", "9", "--padding", "2", "--group", "4", "--gen-hidden", "16", "--gen-layers", "1",
         "--fourier-features", "8", "--enc-hidden", "16", "--enc-channels", "4", "--clusters", "2", "--cluster-dim", "2",
         "--batch-size", "8", "--normalize", "minmax", "--likelihood", "bernoulli", "--seed", "1"]


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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_trains_resumes_and_infers(name, labelled_star, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out.star"
    extra = ["--label-column", "rlnClassNumber"] if "n_classes" in MODELS[name].config_class.__dataclass_fields__ else []
    assert cli.main(["-q", "train", str(labelled_star), "--model", name, *SMALL, *extra, "--epochs", "1", "--out", str(run)]) == 0
    assert cli.main(["-q", "train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert [row["epoch"] for row in RunDirectory(run).read_metrics()] == [0, 1]
    assert cli.main(["-q", "infer", str(run), "--out", str(out)]) == 0
    columns = ParticleStar(out).particles.columns
    model = build_model(RunDirectory(run).read_config()["model"])
    assert "pvaeZ1" in columns and "rlnClassNumber" in columns
    assert ("rlnAnglePsi" in columns) == model.has_pose
    if "pvaePredictedClass" in columns:  # mapped back to the label values 3 and 5
        assert set(ParticleStar(out).particles["pvaePredictedClass"].astype(int)) <= {3, 5}
