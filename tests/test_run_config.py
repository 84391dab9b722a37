"""Versioned run directories (issue 14): config.json carries a schema version, older
versions are migrated, unknown keys are refused in one line, checkpoints load with
``weights_only=True``, and a run written before versioning (tests/data/run_v0) keeps
working: it infers and it resumes."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from particle_vae import cli
from particle_vae.engine.inference import load_model
from particle_vae.engine.run import RunDirectory
from particle_vae.engine.run_config import SCHEMA_VERSION, RunConfig
from particle_vae.engine.trainer import _rng_state, _set_rng_state
from particle_vae.errors import InputFileError
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import ParticleStar, image_name, make_particle_star
from particle_vae.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("single_thread")

#: written by particle-vae before config.json had a schema version (tests/data/run_v0/README.md)
RUN_V0 = Path(__file__).parent / "data" / "run_v0"
#: the settings run_v0 was trained with (a tiny TARGET-VAE on 16 px images)
SMALL = ["--fields", "2", "--kernel", "9", "--padding", "2", "--group", "4", "--gen-hidden", "16", "--gen-layers", "1",
         "--fourier-features", "8", "--zdim", "2", "--batch-size", "8", "--normalize", "minmax", "--likelihood", "bernoulli",
         "--seed", "1"]


def write_particles(folder: Path) -> Path:
    """The 24 particles of 16 px that run_v0 was trained on (same generator and seed); returns the STAR."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.random((24, 16, 16)).astype(np.float32)
    images[:12, 5:11, 7:9] += 2.0
    images[12:, 7:9, 4:12] += 2.0
    write_stack(folder / "p.mrcs", images, 3.0, overwrite=True)
    star = make_particle_star([image_name(i, "p.mrcs") for i in range(24)], 3.0, 16)
    return star.write(folder / "p.star", overwrite=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run written by this version (copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("versioned")
    star = write_particles(root / "in")
    run = root / "run"
    assert cli.main(["-q", "train", str(star), *SMALL, "--epochs", "1", "--out", str(run)]) == 0
    return run


def copy_run(source: Path, folder: Path) -> RunDirectory:
    shutil.copytree(source, folder)
    return RunDirectory(folder)


def edit_config(run: RunDirectory, change) -> None:
    """Change config.json as a user might, keeping its version (or its lack of one)."""
    config = json.loads(run.config_path.read_text())
    change(config)
    run.config_path.write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------- runs written now


def test_training_writes_the_current_schema_version_and_weights_only_checkpoints(trained):
    config = json.loads((trained / "config.json").read_text())
    assert list(config)[0] == "schema_version" and config["schema_version"] == SCHEMA_VERSION == 2
    # the content readers (infer, analyze, the napari plugin) index into is unchanged
    assert config["model"]["model"] == "target-vae" and config["model"]["zdim"] == 2 and config["box"] == 16
    assert set(config) == {"schema_version", "data", "train", "ctf", "model", "pixel_size", "box", "class_values"}
    assert config["train"]["batch_size"] == 8 and config["data"]["preprocessing"] == {"normalize": "minmax"}
    loaded = RunConfig.read(trained / "config.json")
    assert loaded.to_dict() == config and loaded.model == config["model"]
    assert RunDirectory(trained).read_config() == config
    last = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    assert last["schema_version"] == best["schema_version"] == SCHEMA_VERSION
    assert isinstance(last["rng"]["numpy"], dict) and isinstance(last["rng"]["python"], dict)
    model = build_model(config["model"])
    assert set(best["model"]) <= set(model.state_dict()) and best["model"]
    for name, value in best["model"].items():
        assert torch.equal(value, last["model"][name]), name  # one epoch: the best is the last


def test_random_states_survive_a_weights_only_checkpoint_exactly(tmp_path):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal(3)  # an odd number of legacy normals: numpy caches the second of a pair
    random.gauss(0.0, 1.0)  # and Python caches its second normal too
    state = _rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["python"]["gauss_next"] is not None
    expected = (np.random.standard_normal(5), np.random.randint(0, 2 ** 31, 5), [random.gauss(0, 1) for _ in range(3)],
                [random.random() for _ in range(3)], torch.rand(4))
    torch.save({"rng": state}, tmp_path / "state.pt")
    restored = torch.load(tmp_path / "state.pt", weights_only=True)["rng"]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    _set_rng_state(restored)
    again = (np.random.standard_normal(5), np.random.randint(0, 2 ** 31, 5), [random.gauss(0, 1) for _ in range(3)],
             [random.random() for _ in range(3)], torch.rand(4))
    assert np.array_equal(again[0], expected[0]) and np.array_equal(again[1], expected[1])
    assert again[2] == expected[2] and again[3] == expected[3] and torch.equal(again[4], expected[4])


# --------------------------------------------------------------------------- a run written before versioning


def test_run_written_before_versioning_infers(tmp_path):
    raw = json.loads((RUN_V0 / "config.json").read_text())
    assert "schema_version" not in raw  # version 0, as the program wrote it before this one
    run = copy_run(RUN_V0, tmp_path / "run_v0")
    before = run.config_path.read_bytes()
    config = run.read_config()
    assert config["schema_version"] == SCHEMA_VERSION
    for key in raw:  # migration only adds what version 0 left to the defaults; it changes nothing written
        if key in ("model", "train"):
            assert {name: config[key][name] for name in raw[key]} == raw[key], key
        else:
            assert config[key] == raw[key], key
    fields = {item.name for item in dataclasses.fields(MODELS["target-vae"].config_class)}
    assert set(config["model"]) == fields | {"model"}
    assert config["model"]["leaky_relu_slope"] == 0.2  # a setting added after version 0: those runs used 0.2
    assert config["train"]["grad_clip_factor"] == 0.0  # added in version 2: older runs never clipped
    model = build_model(config["model"])
    best = torch.load(run.best_checkpoint, weights_only=True)
    assert set(best["model"]) <= set(model.state_dict())
    star = write_particles(tmp_path / "in")
    out = tmp_path / "out" / "poses.star"
    assert cli.main(["-q", "infer", str(run.path), "--particles", str(star), "--no-refine", "--out", str(out)]) == 0
    written = ParticleStar(out).particles
    assert len(written) == 24 and {"pvaeZ1", "pvaeZ2", "rlnAnglePsi"} <= set(written.columns)
    assert np.isfinite(written["pvaeZ1"].astype(float)).all()
    loaded, _ = load_model(run)  # the public loader infer uses: the stored weights, not a fresh initialisation
    for name, value in best["model"].items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert run.config_path.read_bytes() == before  # reading never rewrites the file


def test_run_written_before_versioning_resumes_and_is_then_current(tmp_path):
    run = copy_run(RUN_V0, tmp_path / "run_v0")
    with pytest.raises(pickle.UnpicklingError):  # its last.pt holds numpy random states: not weights_only as it is
        torch.load(run.last_checkpoint, weights_only=True)
    legacy = run.load_checkpoint("last")
    assert isinstance(legacy["rng"]["numpy"], tuple)
    _set_rng_state(legacy["rng"])
    assert np.array_equal(np.random.get_state()[1], legacy["rng"]["numpy"][1])
    assert random.getstate() == legacy["rng"]["python"]
    star = write_particles(tmp_path / "in")
    edit_config(run, lambda config: config["data"].update(path=str(star)))  # the stack it was trained on, moved
    assert cli.main(["-q", "train", "--out", str(run.path), "--resume", "--epochs", "2"]) == 0
    assert [row["epoch"] for row in run.read_metrics()] == [0, 1]
    config = json.loads(run.config_path.read_text())
    assert config["schema_version"] == SCHEMA_VERSION and config["train"]["epochs"] == 2
    state = torch.load(run.last_checkpoint, weights_only=True)
    assert state["epoch"] == 1 and isinstance(state["rng"]["numpy"], dict)


# --------------------------------------------------------------------------- refused content, in one line


def unknown_top_level(config):
    config["comment"] = "trained on Tuesday"


def unknown_model_setting(config):
    config["model"]["z_dim"] = config["model"].pop("zdim")


def unknown_train_setting(config):
    config["train"]["warmup"] = 5


def missing_model_setting(config):
    del config["model"]["n_fourier"]


def newer_version(config):
    config["schema_version"] = SCHEMA_VERSION + 1


def impossible_model_setting(config):
    config["model"]["likelihood"] = "poisson"


CASES = [
    ("v0", unknown_top_level, ["'comment'", "unknown key", "or remove it"]),
    ("v0", unknown_model_setting, ["'z_dim'", "target-vae model setting", "or remove it", "zdim"]),
    ("current", unknown_top_level, ["'comment'", "unknown key"]),
    ("current", unknown_model_setting, ["'z_dim'", "target-vae model setting"]),
    ("current", unknown_train_setting, ["'warmup'", "training setting"]),
    ("current", missing_model_setting, ["'n_fourier'", "lacks", "train the run again"]),
    ("current", newer_version, ["newer particle-vae", "upgrade particle-vae"]),
    ("current", impossible_model_setting, ["poisson", "model settings"]),
]


@pytest.mark.parametrize("command", ["infer", "resume"])
@pytest.mark.parametrize("version, change, words", CASES, ids=[f"{v}-{c.__name__}" for v, c, _ in CASES])
def test_refused_config_gives_one_line_naming_file_and_key(version, change, words, command, trained, tmp_path, capsys):
    run = copy_run(RUN_V0 if version == "v0" else trained, tmp_path / "run")
    edit_config(run, change)
    edited = run.config_path.read_bytes()
    capsys.readouterr()
    argv = (["infer", str(run.path), "--no-refine", "--out", str(tmp_path / "out.star")] if command == "infer"
            else ["train", "--out", str(run.path), "--resume", "--epochs", "3"])
    assert cli.main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert str(run.config_path) in err, err
    for word in words:
        assert word in err, (word, err)
    assert run.config_path.read_bytes() == edited
    assert not (tmp_path / "out.star").exists()


def test_refused_config_raises_input_file_error(tmp_path):
    with pytest.raises(InputFileError, match="not a run configuration"):
        RunConfig.from_dict(["not", "an", "object"], tmp_path / "config.json")
    with pytest.raises(InputFileError, match="schema_version must be"):
        RunConfig.from_dict({"schema_version": "1"}, tmp_path / "config.json")


class Foreign:
    """A class a checkpoint from elsewhere might pickle (its code must never run on load)."""

    def __reduce__(self):
        return (print, ("this must not run",))


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "foreign"])
def test_foreign_or_damaged_checkpoint_gives_one_line(content, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    if content == "foreign":
        torch.save({"epoch": 0, "model": {}, "payload": Foreign()}, run.best_checkpoint)
    else:
        run.best_checkpoint.write_bytes(content)
    capsys.readouterr()
    assert cli.main(["-q", "infer", str(run.path), "--no-refine", "--out", str(tmp_path / "out.star")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "this must not run" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    assert str(run.best_checkpoint) in captured.err and "cannot be read as a checkpoint" in captured.err
