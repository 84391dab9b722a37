"""The interface every model implements, so the trainer, inference and
analysis never need to know which model they run.

A model is an ``nn.Module`` with a JSON-serialisable config that rebuilds it,
and four operations on a batch of images ``(B, 1, N, N)``:

* :meth:`PoseVAE.loss` -> :class:`LossTerms` (what training minimises, with
  every term for logging);
* :meth:`PoseVAE.readout` -> :class:`Readout` (deterministic pose and latent
  per image: MAP pose, latent mean and std, confidence values);
* :meth:`PoseVAE.decode` -> images drawn from latents at a given pose;
* :meth:`PoseVAE.reconstruct` -> images redrawn from their readout.

Poses are in the generator convention of :mod:`particle_vae.conventions`:
``theta`` in radians and ``t`` in pixels, ``g(x) = f(R(theta) x + t)``.

A model also owns its settings and its command-line options: its config
dataclass extends :class:`ModelConfig` (the fields every model has), and its
:attr:`PoseVAE.options` table (:class:`ModelOption` rows) is what
``particle-vae train --model NAME`` offers, lists in ``--help`` and accepts;
:attr:`PoseVAE.supports_labels` says whether it trains on class labels. Adding
a model is one new file with such a class plus one line in the registry
(:data:`particle_vae.models.MODELS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

#: the pixel likelihoods of :meth:`PoseVAE.log_likelihood`
LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass
class ModelConfig:
    """The settings every model has; each model's config dataclass extends it.

    The field names are stored in every run's config.json (see
    :mod:`particle_vae.engine.run_config` before renaming or adding one).

    Attributes:
        box: image size in pixels (input and generated).
        zdim: latent size (what it describes is the model's own: see its config class).
        likelihood: ``"bernoulli"`` (images in [0, 1]) or ``"gaussian"``.
        gaussian_sigma: fixed noise std of the Gaussian likelihood, data units,
            or ``None`` to learn it.
    """

    box: int
    zdim: int = 2
    likelihood: str = "bernoulli"
    gaussian_sigma: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for impossible settings
        (models extend it with their own checks)."""
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', not {self.likelihood!r}")
        if self.gaussian_sigma is not None and not self.gaussian_sigma > 0:
            raise ValueError("gaussian_sigma must be positive (or None to learn it)")


class _ConfigDefault:
    """Type of :data:`CONFIG_DEFAULT`."""

    def __repr__(self) -> str:
        return "CONFIG_DEFAULT"


#: :attr:`ModelOption.default` of an option whose default is its config field's default
CONFIG_DEFAULT = _ConfigDefault()


@dataclass(frozen=True)
class ModelOption:
    """One command-line option of a model: ``flag`` sets the config field ``field``.

    Attributes:
        flag: the option, e.g. ``"--zdim"``.
        field: the config field it sets.
        help: what it does (``train --help`` appends the default and what the presets set).
        type: converts the command-line text (``int``, ``float``, ``str``); unused for on/off flags.
        choices: the values allowed, if only some are.
        flag_value: for an option without a value (an on/off flag): the value it stores.
        to_field: turns the given value into the field's (e.g. degrees into radians).
        from_field: turns a field value into the option's units, for the defaults shown.
        default: the value used when neither the option nor the preset gives one, where it is not
            the config class's default (the model's :meth:`PoseVAE.complete_settings` then fills it in).
        none_text: how a value of ``None`` reads in the defaults shown (e.g. ``"learned"``).
        old_flags: earlier spellings, still accepted (with a warning naming ``flag``) but not shown.
        metavar: the value's name in the help.
    """

    flag: str
    field: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    flag_value: Any = None
    to_field: Callable[[Any], Any] | None = None
    from_field: Callable[[Any], Any] | None = None
    default: Any = CONFIG_DEFAULT
    none_text: str = "none"
    old_flags: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments that holds the value (``None``: not given)."""
        return "model_" + self.field


#: options of every model's :class:`ModelConfig` fields (``box`` comes from the data)
ZDIM_OPTION = ModelOption("--zdim", "zdim", "latent dimensions", type=int)
LIKELIHOOD_OPTION = ModelOption("--likelihood", "likelihood", "pixel likelihood; benchmarks: bernoulli", choices=LIKELIHOODS)
SIGMA_OPTION = ModelOption("--sigma", "gaussian_sigma", "fixed noise std of the Gaussian likelihood, data units", type=float,
                           none_text="learned")
#: the likelihood mask of the models with a ``mask_radius`` field
LIKELIHOOD_MASK_OPTION = ModelOption("--likelihood-mask", "mask_radius",
                                     "only score pixels within this radius, pixels of the model box", type=float,
                                     none_text="all pixels")
#: the pose priors of the models with ``translation_prior_std``, ``theta_prior`` and ``theta_prior_std`` fields
POSE_PRIOR_OPTIONS = (
    ModelOption("--translation-prior-std", "translation_prior_std", "std of p(t) around the centre, pixels", type=float),
    ModelOption("--theta-prior", "theta_prior", "prior of the in-plane rotation; benchmarks: normal for mnist-n, uniform "
                "otherwise", choices=("uniform", "normal")),
    ModelOption("--theta-prior-std-deg", "theta_prior_std", "std of the normal theta prior, degrees", type=float,
                to_field=math.radians, from_field=math.degrees),
)
#: the coordinate generator of :class:`particle_vae.nn.generator.SpatialGenerator` (TARGET-VAE, spatial-VAE)
GENERATOR_OPTIONS = (
    ModelOption("--gen-hidden", "gen_hidden", "generator width", type=int),
    ModelOption("--gen-layers", "gen_layers", "generator hidden layers", type=int),
    ModelOption("--fourier-features", "n_fourier", "random Fourier frequencies of the generator", type=int),
    ModelOption("--fourier-bandwidth", "fourier_bandwidth", "std of the Fourier frequencies, cycles per pixel", type=float),
)


class _OldSpelling(argparse.Action):
    """Stores the value of an old spelling of a model option into the option's ``dest`` and
    notes ``(old, new)`` in ``namespace.old_model_flags`` (the command warns about it)."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        noted = list(getattr(namespace, "old_model_flags", None) or [])
        namespace.old_model_flags = [*noted, (option_string, self.new_flag)]


def shown_value(value) -> str:
    """A setting as the help shows it: ``none`` for ``None``, floats without trailing zeros."""
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class LossTerms:
    """Per-batch objective.

    Attributes:
        loss: scalar to minimise (negative ELBO per image, averaged over the batch).
        elbo: scalar ELBO per image (nats), averaged over the batch.
        terms: named scalars for the log (e.g. ``recon``, ``kl_pose``, ``kl_z``).
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Readout:
    """Deterministic per-image outputs for inference and analysis.

    Attributes:
        theta: ``(B,)`` radians (generator convention).
        t: ``(B, 2)`` pixels (generator convention), in the model's box.
        z_mean, z_std: ``(B, k)`` latent posterior mean and standard deviation.
        extra: named ``(B,)`` tensors (e.g. pose confidence) written as columns.
    """

    theta: torch.Tensor
    t: torch.Tensor
    z_mean: torch.Tensor
    z_std: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def concatenate_readouts(parts: list[Readout]) -> Readout:
    """The readouts of consecutive batches as one (all fields joined along the batch)."""
    return Readout(**{name: torch.cat([getattr(part, name) for part in parts]) for name in ("theta", "t", "z_mean", "z_std")},
                   extra={key: torch.cat([part.extra[key] for part in parts]) for key in parts[0].extra})


class PoseVAE(nn.Module):
    """Base class: subclasses set ``name``, ``config_class`` (a :class:`ModelConfig`
    dataclass) and ``options``, and implement the methods.

    A model with ``supports_labels`` takes ``labels`` (``(B,)`` class indices, ``-1``
    unlabelled) in :meth:`loss` and has an ``n_classes`` config field, which
    ``train`` sets from the labels found.
    """

    name: str = ""
    config_class: type = ModelConfig
    #: False for models without a pose (their readout pose is zero and is not written)
    has_pose: bool = True
    #: True for models trained with class labels (``loss(images, ctf, labels=...)``)
    supports_labels: ClassVar[bool] = False
    #: the command-line options of ``particle-vae train --model NAME``: each sets one config field
    options: ClassVar[tuple[ModelOption, ...]] = (ZDIM_OPTION, LIKELIHOOD_OPTION, SIGMA_OPTION)
    #: config field -> the preset model setting it takes its value from when the preset has none of the
    #: field's own name (the presets are written for TARGET-VAE: ``gen_hidden`` sizes a VAE's ``hidden``)
    preset_fields: ClassVar[dict[str, str]] = {}

    @classmethod
    def option_flags(cls) -> list[str]:
        """The flags of :attr:`options`, as ``--help`` lists them (old spellings left out)."""
        return [option.flag for option in cls.options]

    @classmethod
    def option_default(cls, option: ModelOption):
        """The value ``option``'s field takes when neither the option nor a preset sets it."""
        if option.default is not CONFIG_DEFAULT:
            return option.default
        for item in dataclasses.fields(cls.config_class):
            if item.name == option.field:
                return item.default  # MISSING: the field has no default
        raise KeyError(f"model {cls.name}: option {option.flag} sets {option.field!r}, which is not a field of "
                       f"{cls.config_class.__name__}")

    @classmethod
    def default_text(cls, option: ModelOption, presets: Mapping[str, Mapping] | None = None) -> str:
        """``(default: VALUE; presets: NAME VALUE, ...)`` for ``option``: this model's default and
        the value each of ``presets`` (preset name -> its model settings) gives the field."""

        def shown(value) -> str:
            if value is None:
                return option.none_text
            return shown_value(option.from_field(value) if option.from_field is not None else value)

        default = cls.option_default(option)
        text = f"(default: {'required' if default is MISSING else shown(default)}"
        source = {option.field: cls.preset_fields.get(option.field, option.field)}
        set_by = [f"{name} {shown(settings.get(option.field, settings.get(source[option.field])))}"
                  for name, settings in sorted((presets or {}).items())
                  if option.field in settings or source[option.field] in settings]
        return text + (f"; presets: {', '.join(set_by)})" if set_by else ")")

    @classmethod
    def add_options(cls, group, presets: Mapping[str, Mapping] | None = None) -> None:
        """Add :attr:`options` to ``group`` (an argparse parser or argument group).

        Each option stores into :attr:`ModelOption.dest` (``None`` when not given); its
        help ends with :meth:`default_text`. Old spellings are accepted but not listed.
        """
        for option in cls.options:
            if option.flag_value is not None:
                group.add_argument(option.flag, dest=option.dest, action="store_const", const=option.flag_value,
                                   default=None, help=option.help)
            else:
                metavar = option.metavar or (None if option.choices else option.flag.lstrip("-").replace("-", "_").upper())
                group.add_argument(option.flag, dest=option.dest, type=option.type, choices=option.choices,
                                   metavar=metavar, default=None,
                                   help=f"{option.help} {cls.default_text(option, presets)}")
            for old in option.old_flags:
                group.add_argument(old, dest=option.dest, action=_OldSpelling, new_flag=option.flag, type=option.type,
                                   choices=option.choices, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    @classmethod
    def settings_from_args(cls, args: argparse.Namespace) -> dict:
        """The config fields the options in ``args`` set (those given), in the fields' units."""
        settings = {}
        for option in cls.options:
            value = getattr(args, option.dest, None)
            if value is not None:
                settings[option.field] = option.to_field(value) if option.to_field is not None else value
        return settings

    @classmethod
    def complete_settings(cls, settings: dict, box: int) -> dict:
        """``settings`` for a model of ``box`` pixels, with what depends on the box filled in
        (the base adds ``box``; e.g. TARGET-VAE also sizes its kernel)."""
        return {**settings, "box": int(box)}

    def __init__(self, config):
        super().__init__()
        if hasattr(config, "validate"):
            config.validate()  # ValueError with a readable message for impossible settings
        self.config = config

    @property
    def box(self) -> int:
        return int(self.config.box)

    @property
    def zdim(self) -> int:
        return int(self.config.zdim)

    def config_dict(self) -> dict:
        """JSON-serialisable config that rebuilds this model with :func:`build_model`."""
        return {"model": self.name, **dataclasses.asdict(self.config)}

    def _init_likelihood(self) -> None:
        """Create the learned noise level when the config asks for a Gaussian
        likelihood without a fixed ``gaussian_sigma``; no mask by default."""
        learn = self.config.likelihood == "gaussian" and self.config.gaussian_sigma is None
        self.log_sigma = nn.Parameter(torch.zeros(())) if learn else None
        self.likelihood_mask = None

    def log_likelihood(self, images: torch.Tensor, raw: torch.Tensor, ctf: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(y | generated)`` per image, summed over (masked) pixels.

        Args:
            images, raw: ``(B, N, N)`` data and generator output (Bernoulli
                logits or Gaussian means, by ``config.likelihood``).
            ctf: optional ``(B, N, N//2 + 1)`` CTF (``rfft2`` layout) applied to
                the Gaussian mean before comparison.
        Returns:
            ``(B,)`` nats.
        """
        if self.config.likelihood == "bernoulli":
            if ctf is not None:
                raise ValueError("a CTF-aware likelihood needs likelihood='gaussian'")
            per_pixel = -F.binary_cross_entropy_with_logits(raw, images, reduction="none")
        else:
            mean = raw if ctf is None else torch.fft.irfft2(torch.fft.rfft2(raw) * ctf, s=raw.shape[-2:])
            sigma = self.log_sigma.exp() if self.log_sigma is not None else raw.new_tensor(float(self.config.gaussian_sigma))
            per_pixel = -0.5 * ((images - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
        if self.likelihood_mask is not None:
            per_pixel = per_pixel * self.likelihood_mask
        return per_pixel.flatten(1).sum(-1)

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None) -> LossTerms:  # pragma: no cover - interface
        raise NotImplementedError

    def readout(self, images: torch.Tensor) -> Readout:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, z: torch.Tensor, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Images ``(B, N, N)`` in data units from ``z (B, k)``, ``theta (B,)`` rad, ``t (B, 2)`` px."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Redraw images from their readout: ``(B, 1, N, N)`` -> ``(B, N, N)``."""
        out = self.readout(images)
        return self.decode(out.z_mean, out.theta, out.t)


def _learnable_items(model: nn.Module):
    """Parameters and persistent buffers, except buffers of e2cnn modules."""
    parameters = dict(model.named_parameters())
    e2cnn_prefixes = tuple(name + "." for name, module in model.named_modules() if type(module).__module__.startswith("e2cnn"))
    for name, value in model.state_dict(keep_vars=True).items():
        if name in parameters or not name.startswith(e2cnn_prefixes):
            yield name, value


def learnable_names(model: nn.Module) -> list[str]:
    """The names :func:`learnable_state` saves (parameters and the model's own persistent buffers), without copying."""
    return [name for name, _ in _learnable_items(model)]


def learnable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters plus the model's own small buffers, without e2cnn's sampled
    filter bases (hundreds of MB, rebuilt from the config on load)."""
    return {name: value.detach().cpu().clone() for name, value in _learnable_items(model)}


def load_learnable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`learnable_state` dict; every saved tensor must match a model tensor.

    e2cnn layers cache their expanded filters in eval mode, so the model is
    cycled through train mode to rebuild them from the loaded weights.
    """
    names = set(learnable_names(model))
    derived = {name for name, _ in model.named_buffers()} - names  # rebuilt from the config (older files saved them)
    state = {name: value for name, value in state.items() if name not in derived}
    missing, unexpected = names - set(state), set(state) - names
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    mode = model.training
    model.load_state_dict(state, strict=False)
    model.train(True)
    model.train(mode)
