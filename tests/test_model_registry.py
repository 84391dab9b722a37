"""Models own their options (issue 14): a model is one file plus one registry line, `train --model NAME`
offers, lists and accepts NAME's options only, and labels support is a declared class attribute."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from particle_vae import cli
from particle_vae.engine.run import RunDirectory
from particle_vae.errors import ParticleVAEError
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import ParticleStar
from particle_vae.models import MODELS, LossTerms, ModelConfig, ModelOption, PoseVAE, Readout

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- a model defined here


@dataclass
class ToyConfig(ModelConfig):
    """Settings of :class:`ToyVAE`: the shared fields plus the width of its one hidden layer."""

    width: int = 8


class ToyVAE(PoseVAE):
    """A VAE with one hidden layer and no pose, defined in this test only."""

    name = "toy"
    config_class = ToyConfig
    has_pose = False
    options = (*PoseVAE.options, ModelOption("--width", "width", "hidden layer width", type=int))

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        pixels = config.box * config.box
        self.encoder = nn.Sequential(nn.Linear(pixels, config.width), nn.Tanh(), nn.Linear(config.width, 2 * config.zdim))
        self.decoder = nn.Sequential(nn.Linear(config.zdim, config.width), nn.Tanh(), nn.Linear(config.width, pixels))
        self._init_likelihood()

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logstd = self.encoder(images.flatten(1)).chunk(2, dim=-1)
        return mu, logstd.clamp(-8.0, 4.0)

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None) -> LossTerms:
        mu, logstd = self._encode(images)
        z = mu + logstd.exp() * torch.randn_like(mu)
        log_lik = self.log_likelihood(images[:, 0], self.decoder(z).view(-1, self.box, self.box), ctf)
        kl = 0.5 * (mu ** 2 + torch.exp(2 * logstd) - 1.0 - 2 * logstd).sum(-1)
        elbo = log_lik - kl
        return LossTerms(loss=-elbo.mean(), elbo=elbo.mean().detach(),
                         terms={"recon": -log_lik.mean().detach(), "kl_z": kl.mean().detach()})

    @torch.no_grad()
    def readout(self, images: torch.Tensor) -> Readout:
        mu, logstd = self._encode(images)
        zeros = torch.zeros(images.shape[0], device=images.device)
        return Readout(theta=zeros, t=torch.zeros(images.shape[0], 2, device=images.device), z_mean=mu, z_std=logstd.exp())

    def decode(self, z: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raw = self.decoder(z).view(-1, self.box, self.box)
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw


@pytest.fixture()
def toy(monkeypatch):
    """:class:`ToyVAE` in the registry for one test: the one line a new model adds to particle_vae/models/__init__.py."""
    monkeypatch.setitem(MODELS, "toy", ToyVAE)
    return ToyVAE


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """24 images of 16 px, 3 A/px: two kinds of bar on noise."""
    rng = np.random.default_rng(0)
    images = rng.random((24, 16, 16)).astype(np.float32)
    images[:12, 5:11, 7:9] += 2.0
    images[12:, 7:9, 4:12] += 2.0
    return write_stack(tmp_path_factory.mktemp("registry") / "bars.mrcs", images, 3.0)


def help_text(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def listed(text: str) -> dict[str, str]:
    """Option -> its help line, for the options a ``--help`` text lists."""
    return {match.group(1): match.group(2) for match in re.finditer(r"^  (--[\w-]+)(?: \S+)?\s+(.*)$", text, flags=re.M)}


def refusal(argv: list[str], capsys) -> str:
    """The error of a train command line that argparse refuses: exit status 2, one line, no usage."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "usage" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- the registry


def test_a_model_defined_in_one_file_trains_and_infers_through_the_cli(toy, stack, tmp_path, capsys, monkeypatch):
    run, out = tmp_path / "run", tmp_path / "toy.star"
    shown = listed(help_text(["--model", "toy"], capsys, monkeypatch))
    assert shown["--width"] == "hidden layer width (default: 8)" and "--fields" not in shown and "--epochs" in shown
    assert cli.main(["-q", "train", str(stack), "--model", "toy", "--width", "4", "--zdim", "3", "--normalize", "minmax",
                     "--batch-size", "8", "--epochs", "1", "--seed", "0", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"model": "toy", "box": 16, "zdim": 3, "likelihood": "bernoulli", "gaussian_sigma": None,
                               "width": 4}
    assert cli.main(["-q", "train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert [row["epoch"] for row in RunDirectory(run).read_metrics()] == [0, 1]
    assert cli.main(["-q", "infer", str(run), "--out", str(out)]) == 0
    particles = ParticleStar(out).particles
    assert len(particles) == 24 and "rlnAnglePsi" not in particles.columns
    z = particles[["pvaeZ1", "pvaeZ2", "pvaeZ3"]].to_numpy(float)
    assert np.isfinite(z).all() and z.std(axis=0).min() > 0


def test_every_registered_model_declares_its_options_on_its_config_fields():
    for name, cls in MODELS.items():
        assert cls.name == name, name  # the name run directories store
        assert issubclass(cls.config_class, ModelConfig) and isinstance(cls.supports_labels, bool), name
        config_fields = {item.name for item in dataclasses.fields(cls.config_class)}
        flags = [flag for option in cls.options for flag in (option.flag, *option.old_flags)]
        assert len(flags) == len(set(flags)), name
        for option in cls.options:
            assert option.field in config_fields and option.field != "box", (name, option.flag)
        if cls.supports_labels:
            assert "n_classes" in config_fields, name
    assert [name for name, cls in MODELS.items() if cls.supports_labels] == ["equivae"]
    for name, cls in MODELS.items():  # no model's flag collides with the command's own options
        argv = ["train", "--out", "r", "--model", name]
        args = cli.build_parser(only="train", argv=argv).parse_args(argv)
        assert args.model == name and all(getattr(args, option.dest) is None for option in cls.options), name


# --------------------------------------------------------------------------- help and refusals


def test_help_lists_only_the_chosen_models_options(capsys, monkeypatch):
    vae = listed(help_text(["--model", "vae"], capsys, monkeypatch))
    for option in ("--hidden", "--layers", "--beta", "--zdim", "--likelihood", "--sigma"):
        assert option in vae, option
    for option in ("--fields", "--gumbel-temperature", "--group", "--gen-hidden", "--kernel", "--cluster-dim", "--lie-group"):
        assert option not in vae, option
    for option in ("--epochs", "--batch-size", "--downsample-to", "--label-column", "--ctf", "--preset", "--model"):
        assert option in vae, option  # the shared data and training options
    text = help_text([], capsys, monkeypatch)  # the default model's, and how to see another's
    target = listed(text)
    assert "--fields" in target and "--gumbel-temperature" in target and "--hidden" not in target and "--beta" not in target
    assert "model target-vae (options of this model;" in text and "--model NAME --help lists NAME's" in target["--model"]
    mce = listed(help_text(["--model=mce-vae"], capsys, monkeypatch))
    assert "--invariance-rotations" in mce and "--dec-hidden" in mce and "--group" not in mce and "--gen-hidden" not in mce
    equivae = listed(help_text(["--model", "equivae"], capsys, monkeypatch))
    assert "--embed-dim" in equivae and "--cluster-dim" not in equivae


def test_help_defaults_are_the_models_own_and_the_presets(capsys, monkeypatch):
    assert listed(help_text(["--model", "vae"], capsys, monkeypatch))["--beta"].endswith("(default: 1)")
    assert listed(help_text(["--model", "beta-vae"], capsys, monkeypatch))["--beta"].endswith("(default: 4)")
    target = listed(help_text([], capsys, monkeypatch))
    assert target["--fields"].endswith("(default: 128; presets: mnist 128, particles 128, tiny 16)")
    assert target["--gen-layers"].endswith("(default: 2; presets: mnist 2, particles 6, tiny 2)")
    assert target["--theta-prior-std-deg"].endswith("(default: 45)")  # the config's pi/4, in the option's degrees
    assert target["--sigma"].endswith("(default: learned)")
    mce = listed(help_text(["--model", "mce-vae"], capsys, monkeypatch))
    # the presets, written for TARGET-VAE, size the other generators through preset_fields (gen_layers)
    assert mce["--dec-layers"].endswith("(default: 2; presets: mnist 2, particles 6, tiny 2)")
    vae = listed(help_text(["--model", "vae"], capsys, monkeypatch))
    assert vae["--hidden"].endswith("(default: 512; presets: mnist 512, particles 512, tiny 128)")
    assert mce["--enc-layers"].endswith("(default: 1)") and mce["--translation-prior-std"].endswith("tiny 3)")
    spatial = listed(help_text(["--model", "spatial-vae"], capsys, monkeypatch))
    assert spatial["--enc-layers"].endswith("(default: 2)") and "{mlp,conv}" in help_text(["--model", "spatial-vae"], capsys,
                                                                                               monkeypatch)


@pytest.mark.parametrize("model, option, value, owners", [
    ("vae", "--fields", "4", "target-vae"),
    ("vae", "--gumbel-temperature", "0.5", "target-vae"),
    ("equivae", "--group", "4", "target-vae"),
    ("target-vae", "--beta", "4", "beta-vae, vae"),
    ("spatial-vae", "--cluster-dim", "2", "mce-vae"),
    ("vae", "--width", "4", "toy"),
])
def test_an_option_of_another_model_is_a_one_line_error_naming_the_model(toy, stack, model, option, value, owners, tmp_path,
                                                                         capsys):
    err = refusal([str(stack), "--model", model, option, value, "--out", str(tmp_path / "run")], capsys)
    own = ", ".join(option.flag for option in MODELS[model].options)
    assert err == (f"particle-vae train: error: {option} is not an option of model {model} (its options: {own}; "
                   f"{option} is an option of {owners})")
    assert not (tmp_path / "run").exists()
    # written after the option too, and with =VALUE
    err = refusal([str(stack), f"{option}={value}", "--out", str(tmp_path / "run"), "--model", model], capsys)
    assert f"{option} is not an option of model {model}" in err


def test_an_unknown_option_and_an_unknown_model_are_one_line_errors(stack, tmp_path, capsys):
    err = refusal([str(stack), "--model", "vae", "--feilds", "4", "--out", str(tmp_path / "run")], capsys)
    assert "--feilds is not an option of particle-vae train or of model vae (its options: --zdim," in err
    err = refusal([str(stack), "--model", "nope", "--out", str(tmp_path / "run")], capsys)
    assert "--model nope: no such model (models: beta-vae, equivae," in err


def test_the_train_parser_has_the_options_of_the_model_its_command_line_names(stack):
    vae_argv = ["train", str(stack), "--model", "vae", "--hidden", "8", "--out", "r"]
    vae = cli.build_parser(only="train", argv=vae_argv).parse_args(vae_argv)
    target_argv = ["train", str(stack), "--fields", "4", "--out", "r"]
    target = cli.build_parser(argv=target_argv).parse_args(target_argv)
    assert vae.model == "vae" and vae.model_hidden == 8 and target.model == "target-vae" and target.model_n_fields == 4
    assert not hasattr(target, "model_hidden") and not hasattr(vae, "model_n_fields")
    wrong = ["train", str(stack), "--model", "vae", "--fields", "4", "--out", "r"]
    with pytest.raises(SystemExit):
        cli.build_parser(only="train", argv=wrong).parse_args(wrong)
    # the command refuses what a parser built for another command line (here: the default model's) parsed
    args = cli.build_parser(only="train").parse_args(["train", str(stack), "--model", "vae", "--out", "r"])
    with pytest.raises(ParticleVAEError, match="^--model vae: the command line was parsed with the options of model target-vae"):
        args._handler(args)


def test_parsing_a_train_command_line_parses_it_with_its_models_options(stack):
    """:func:`cli.parse_command_line` (what ``particle-vae`` and ``request_from_words`` parse with) builds the
    train parser for the model the words name, whatever it was before."""
    for argv, dest, value in [(["train", str(stack), "--model", "vae", "--hidden", "8", "--out", "r"], "model_hidden", 8),
                              (["-q", "train", str(stack), "--fields", "4", "--out", "r"], "model_n_fields", 4),
                              (["train", str(stack), "--model=mce-vae", "--dec-layers", "3", "--out", "r"], "model_dec_layers", 3)]:
        parser, args = cli.parse_command_line(argv)
        assert getattr(args, dest) == value and args._options_of_model == args.model
        # a launch of several processes parses the same words again with the train parser it kept
        again = args._launch_parser.parse_args(argv[argv.index("train") + 1:])
        assert vars(again) == {key: kept for key, kept in vars(args).items() if key not in ("command", "verbose", "quiet")}


def test_the_subpixel_offset_is_off_unless_asked_for(stack):
    """TARGET-VAE's sub-pixel offset (beyond the paper) made training depend on the seed (docs/models.md):
    new runs leave it out; ``--subpixel`` puts it back and ``--no-subpixel`` stays accepted."""
    from particle_vae.commands.train import request_from_words
    from particle_vae.models.target_vae import TargetVAEConfig

    assert TargetVAEConfig(box=32).subpixel is False
    for extra, expected in [([], None), (["--subpixel"], True), (["--no-subpixel"], False)]:
        settings = request_from_words([str(stack), "--preset", "tiny", *extra, "--out", "r"]).model_settings
        assert settings.get("subpixel") is expected, extra


@pytest.fixture()
def unwarned(monkeypatch):
    """No old option spelling warned about yet in this process (the warning comes once per process)."""
    from particle_vae.commands import train

    monkeypatch.setattr(train, "_warned_spellings", set())


def test_old_spellings_of_renamed_options_still_work_and_warn(stack, tmp_path, capsys, unwarned):
    argv = ["train", str(stack), "--model", "mce-vae", "--group", "4", "--gen-hidden", "32", "--out", "r"]
    args = cli.build_parser(only="train", argv=argv).parse_args(argv)
    assert args.model_invariance_rotations == 4 and args.model_dec_hidden == 32
    assert args.old_model_flags == [("--group", "--invariance-rotations"), ("--gen-hidden", "--dec-hidden")]
    # the warning comes first, whatever fails later (here: no such file)
    assert cli.main(["train", str(tmp_path / "absent.star"), "--model", "equivae", "--cluster-dim", "3", "--out",
                     str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--cluster-dim is the old name of model equivae's --embed-dim; use --embed-dim" in err


def test_an_old_spelling_is_warned_about_once_per_process(tmp_path, capsys, unwarned):
    argv = ["train", str(tmp_path / "absent.star"), "--model", "mce-vae", "--gen-hidden", "32", "--gen-hidden", "64",
            "--out", str(tmp_path / "run")]
    warning = "--gen-hidden is the old name of model mce-vae's --dec-hidden; use --dec-hidden"
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.count(warning) == 1  # given twice, warned once
    assert cli.main(argv) == 2  # e.g. a launch of one process runs the command again in this process
    err = capsys.readouterr().err
    assert warning not in err and "absent.star" in err
    assert cli.main(["train", str(tmp_path / "absent.star"), "--model", "vae", "--gen-hidden", "32", "--out",
                     str(tmp_path / "run")]) == 2
    assert "--gen-hidden is the old name of model vae's --hidden" in capsys.readouterr().err  # another model's: its own warning


def test_labels_need_a_model_that_trains_with_them(stack, tmp_path, capsys):
    assert cli.main(["train", str(stack), "--model", "vae", "--label-column", "rlnClassNumber", "--out",
                     str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("particle-vae train: error: --label-column: model vae does not train with class labels "
                   "(models that do: equivae)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, fields", [("vae", {"hidden": 128, "layers": 2}), ("equivae", {"hidden": 128, "layers": 2}),
                                           ("mce-vae", {"dec_hidden": 128, "dec_layers": 2})])
def test_presets_size_every_models_generator(model, fields, stack, tmp_path):
    """The presets are written for TARGET-VAE (gen_hidden, gen_layers); the other generators take those sizes."""
    run = tmp_path / "run"
    assert cli.main(["-q", "train", str(stack), "--model", model, "--preset", "tiny", "--downsample-to", "16", "--batch-size", "8",
                     "--max-steps", "1", "--epochs", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())["model"]
    assert {name: config[name] for name in fields} == fields
