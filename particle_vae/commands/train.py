"""Train a model on particles (STAR, .mrcs or .txt list) or on a paper benchmark.

Writes a run directory: config.json (rebuilds model and data pipeline),
metrics.jsonl (one line per epoch), train.log and checkpoints/ (last.pt to
resume, best.pt at the best validation ELBO). Examples:

  particle-vae train particles.star --preset particles --group 8 --zdim 2 --out run1
  particle-vae train --dataset mnist-u --preset mnist --n 10000 --data-dir DATA --out run2
  particle-vae train --out run1 --resume
  particle-vae train particles.star --preset particles --gpus 4 --batch-size 256 --out run3
  torchrun --nnodes 2 --nproc-per-node 8 ... -m particle_vae train particles.star ... --out run4

Each model has its own options: `train --model NAME --help` lists NAME's
(the default model's without --model); an option the chosen model does not
have is an error.

Several GPUs: --gpus N starts N processes on this node with torchrun
(DistributedDataParallel, --batch-size is the global batch); several nodes:
start torchrun yourself on every node (docs/scale.md).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import fields
from pathlib import Path

from particle_vae.api import DEFAULT_MODEL, BenchmarkData, ParticleData, TrainRequest
from particle_vae.engine.presets import TRAINING_PRESETS
from particle_vae.engine.run import RunDirectory
from particle_vae.errors import ParticleVAEError

log = logging.getLogger("particle_vae")

BENCHMARKS = ("mnist-n", "mnist-u", "so2", "se2")

PREP_OPTIONS = {"downsample_to": "target_box", "crop_to": "crop_box", "invert": "invert", "normalize": "normalize",
                "mask_radius": "mask_radius"}
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "val_fraction", "lr_patience", "early_stop_patience", "seed",
                 "num_workers", "device", "max_steps", "compile", "grad_clip_factor")

#: option dest -> (test of a given value, what the value must be); checked before anything is read or written
OPTION_LIMITS = {
    "epochs": (lambda v: v >= 1, "a whole number of at least 1"),
    "batch_size": (lambda v: v >= 1, "a whole number of at least 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a positive number, e.g. 1e-4"),
    "val_fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1), e.g. 0.1"),
    "lr_patience": (lambda v: v >= 0, "a whole number of at least 0"),
    "early_stop_patience": (lambda v: v >= 0, "a whole number of at least 0 (0: never stop early)"),
    "seed": (lambda v: v >= 0, "a whole number of at least 0"),
    "num_workers": (lambda v: v >= 0, "a whole number of at least 0 (0: read in the main process)"),
    "max_steps": (lambda v: v >= 1, "a whole number of at least 1"),
    "grad_clip_factor": (lambda v: math.isfinite(v) and v >= 0, "a number of at least 0 (0: never clip), e.g. 20"),
    "n": (lambda v: v >= 1, "a whole number of at least 1"),
    "labels": (lambda v: v >= 0, "a whole number of at least 0"),
    "downsample_to": (lambda v: v >= 1, "a box size of at least 1 pixel"),
    "crop_to": (lambda v: v >= 1, "a box size of at least 1 pixel"),
}


def check_options(args: argparse.Namespace) -> None:
    """A one-line error for the first option in :data:`OPTION_LIMITS` whose value is out of range."""
    for dest, (allowed, must_be) in OPTION_LIMITS.items():
        value = getattr(args, dest, None)
        if value is not None and not allowed(value):
            option = "--" + {"num_workers": "workers"}.get(dest, dest).replace("_", "-")
            raise ParticleVAEError(f"{option} {value} is out of range: it must be {must_be}")


def add_input_options(parser) -> None:
    """Options that locate and preprocess the particles (shared with ``particle-vae cache``)."""
    from particle_vae.cli import add_stack_dir_option

    add_stack_dir_option(parser)
    parser.add_argument("--pixel-size", type=float, metavar="A",
                        help="input pixel size, Angstrom (default: the STAR's, else the stack header's)")
    parser.add_argument("--downsample-to", type=int, metavar="PX",
                        help=f"Fourier-crop the particles to this box, pixels {_preset_default('preprocessing', 'target_box', 'no crop')}")
    parser.add_argument("--crop-to", type=int, metavar="PX", help="centre-crop the particles to this box first, pixels (default: no crop)")
    parser.add_argument("--invert", action="store_true", default=None, help="invert contrast (multiply by -1)")
    parser.add_argument("--normalize", choices=["background", "zscore", "minmax", "none"],
                        help="per-image normalisation: background = mean 0, std 1 of the pixels outside 85%% of the half box "
                             "(default: background)")
    parser.add_argument("--mask-radius", type=float, metavar="PX", help="circular mask after normalisation, pixels (default: none)")


def _preset_default(section: str, name: str, base) -> str:
    """``(default: BASE; presets: NAME VALUE, ...)`` for a setting that presets may change."""
    from particle_vae.models.base import shown_value

    set_by = [f"{preset} {shown_value(values[section][name])}" for preset, values in sorted(TRAINING_PRESETS.items())
              if name in values.get(section, {})]
    return f"(default: {shown_value(base)}" + (f"; presets: {', '.join(set_by)})" if set_by else ")")


def _train_default(name: str) -> str:
    """The ``(default: ...)`` text of a :class:`TrainSettings` field (and the presets that change it)."""
    from particle_vae.engine.trainer import TrainSettings

    base = next(f.default for f in fields(TrainSettings) if f.name == name)
    return _preset_default("train", name, base)


def add_args(parser: argparse.ArgumentParser, words: list[str] = ()) -> None:
    """The train command's options, with those of the model that ``words`` (the command's words, as
    :func:`particle_vae.cli.build_parser` passes them) name with ``--model`` (:func:`model_in`; the
    default model's without ``--model`` or for a model that does not exist). The command then
    accepts that model only (:func:`_check_model_use`)."""
    from particle_vae.models import MODELS

    model = model_in(words)
    model = model if model in MODELS else DEFAULT_MODEL
    parser.add_argument("input", nargs="?", type=Path,
                        help="particle .star, cryoSPARC particle .cs, .mrcs/.mrc stack or .txt list of stacks")
    parser.add_argument("--out", "-o", type=Path, required=True, help="run directory to create (or resume)")
    parser.add_argument("--dataset", choices=BENCHMARKS, help="train on a paper benchmark instead of particles (default: none)")
    parser.add_argument("--preset", choices=sorted(TRAINING_PRESETS),
                        help="named settings, logged at the start; options override them (default: none, "
                             "the models' own defaults)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                        help="which model to train; its options are listed below (--model NAME --help lists NAME's)")
    parser.set_defaults(_options_of_model=model)
    model_group = parser.add_argument_group(f"model {model} (options of this model; each overrides the preset, "
                                            "the preset the model's default)")

    labelled = ", ".join(name for name, cls in sorted(MODELS.items()) if cls.supports_labels) or "none"
    data = parser.add_argument_group("data")
    add_input_options(data)
    data.add_argument("--n", type=int, help="benchmarks: use the first N training images (default: all)")
    data.add_argument("--label-column",
                      help=f"models trained with labels ({labelled}): STAR column with class labels, e.g. rlnClassNumber "
                           "(default: none, unlabelled)")
    data.add_argument("--labels", type=int,
                      help=f"benchmarks, models trained with labels ({labelled}): label the first N training images "
                           "(default: none)")
    data.add_argument("--ctf", action="store_true",
                      help="CTF-aware likelihood using the STAR's CTF columns (Gaussian likelihood)")
    data.add_argument("--mnist-dir", type=Path, help="benchmarks: folder with the MNIST IDX files (default: DATA/mnist)")
    data.add_argument("--data-dir", type=Path,
                      help="reference-data folder DATA (holds mnist/; not the particle stacks, see --stack-dir) "
                           "(default: $PARTICLE_VAE_DATA)")
    data.add_argument("--cache", type=Path, help="write the preprocessed particles once to this contiguous stack "
                      "(e.g. particles_cache.mrcs, plus a .json) and train from it; reused while input and preprocessing match "
                      "(default: no cache, read the stacks)")
    data.add_argument("--cache-dtype", choices=["float16", "float32"], help="values of the --cache file (default: float16)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, help=f"most epochs (passes over the training images) {_train_default('epochs')}")
    train.add_argument("--batch-size", type=int,
                       help=f"images per optimiser step, all processes together {_train_default('batch_size')}")
    train.add_argument("--lr", type=float, help=f"Adam learning rate {_train_default('lr')}")
    train.add_argument("--val-fraction", type=float, help=f"held-out share of the training data {_train_default('val_fraction')}")
    train.add_argument("--lr-patience", type=int,
                       help=f"epochs without validation improvement before halving the learning rate {_train_default('lr_patience')}")
    train.add_argument("--early-stop-patience", type=int,
                       help=f"epochs without improvement before stopping, 0: never {_train_default('early_stop_patience')}")
    train.add_argument("--seed", type=int,
                       help=f"seeds the validation split, data order, initialisation and sampling {_train_default('seed')}")
    train.add_argument("--workers", dest="num_workers", type=int,
                       help=f"DataLoader worker processes, 0: read in the main process {_train_default('num_workers')}")
    train.add_argument("--device", help=f"auto, cpu, cuda or cuda:N {_train_default('device')}")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                       help="auto: bf16 autocast on CUDA, float32 on CPU; bf16: also on CPU (fast on CPUs with "
                            f"AVX512-BF16/AMX); fp32: never {_train_default('precision')}")
    train.add_argument("--no-bf16", dest="bf16", action="store_false", default=True, help="same as --precision fp32")
    train.add_argument("--max-steps", type=int,
                       help="stop after this many optimiser steps (also inside an epoch; --resume continues) (default: no limit)")
    train.add_argument("--grad-clip-factor", type=float, metavar="F",
                       help="clip a step's gradient norm at F times the median of the previous 50 steps (docs/training.md) "
                            f"{_train_default('grad_clip_factor')}")
    train.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the training step (for CUDA; on the CPU it needs a C++ compiler and minutes to compile); "
                            "if compilation fails, training continues without it")

    from particle_vae.cli import add_launch_options

    add_launch_options(parser, "data-parallel training")
    MODELS[model].add_options(model_group, {preset: values.get("model", {}) for preset, values in TRAINING_PRESETS.items()})


def model_in(words: list[str]) -> str:
    """The model that ``words`` (the train command's words) name with ``--model``, as argparse will read
    them; the default model without ``--model`` (or without its value: the full parser says so). The
    name is not checked (:func:`refusal_before_parsing`)."""
    early = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    early.add_argument("--model", default=DEFAULT_MODEL)
    try:
        return early.parse_known_args(list(words))[0].model
    except argparse.ArgumentError:  # e.g. --model without a value: the full parser says so
        return DEFAULT_MODEL


def _flags_in(words: list[str]) -> list[str]:
    """The long options ``words`` give (without ``=VALUE``), up to a ``--``."""
    words = list(words)
    words = words[:words.index("--")] if "--" in words else words
    return [word.partition("=")[0] for word in words if word.startswith("--")]


def refusal_before_parsing(words: list[str]) -> str | None:
    """The one-line error for the train command's ``words`` that naming a model decides: a model that
    does not exist, or an option of another model than the one named; ``None`` when there is none."""
    from particle_vae.models import MODELS

    name = model_in(words)
    if name not in MODELS:
        return f"--model {name}: no such model (models: {', '.join(sorted(MODELS))})"
    own = {flag for option in MODELS[name].options for flag in (option.flag, *option.old_flags)}
    for flag in _flags_in(words):
        owners = [other for other, cls in sorted(MODELS.items()) if flag in cls.option_flags()]
        if flag not in own and owners:
            return (f"{flag} is not an option of model {name} (its options: {', '.join(MODELS[name].option_flags())}; "
                    f"{flag} is an option of {', '.join(owners)})")
    return None


def refusal_of_unknown(words: list[str], extras: list[str], prog: str) -> str | None:
    """The one-line error for an option among ``extras`` (the words the train parser of ``words``
    did not take) that is neither the command's nor its model's; ``None`` when there is none
    (``prog``: the command's name in the error, ``particle-vae train``)."""
    from particle_vae.models import MODELS

    flags = _flags_in(words)
    unknown = [word for word in extras if word.startswith("--") and word.partition("=")[0] in flags]
    if not unknown:
        return None
    name = model_in(words)
    return (f"{unknown[0].partition('=')[0]} is not an option of {prog} or of model {name} "
            f"(its options: {', '.join(MODELS[name].option_flags())}; see --help)")


def _data(args) -> ParticleData | BenchmarkData:
    """The training data that ``args`` name, with the preset's preprocessing under the options given."""
    from particle_vae.api import preset_preprocessing

    if args.dataset:
        from particle_vae.data.mnist import resolve_mnist_dir

        if args.input is not None:
            raise ParticleVAEError("give either particles or --dataset, not both")
        mnist_dir = resolve_mnist_dir(args.mnist_dir, args.data_dir)
        return BenchmarkData(args.dataset, mnist_dir, n=args.n, labels=args.labels)
    if args.input is None:
        raise ParticleVAEError("no input: give a particle STAR/stack/list, or --dataset for a benchmark")
    if args.cache is None and args.cache_dtype is not None:
        raise ParticleVAEError("--cache-dtype needs --cache PATH")
    prep = preset_preprocessing(args.preset, {name: getattr(args, option) for option, name in PREP_OPTIONS.items()})
    return ParticleData(args.input, stack_dir=args.stack_dir, pixel_size=args.pixel_size, preprocessing=prep,
                        label_column=args.label_column, cache=args.cache, cache_dtype=args.cache_dtype or "float16")


def request(args: argparse.Namespace) -> TrainRequest:
    """The :class:`particle_vae.api.TrainRequest` that ``args`` (this command's options, checked by
    :func:`check_options`) describe: the preset's settings under the options given."""
    from particle_vae.api import preset_model_settings, preset_train_settings
    from particle_vae.models import MODELS

    if args.resume:
        return TrainRequest(out=args.out, model=args.model, resume=True, preset=args.preset, resume_changes={
            "epochs": args.epochs, "max_steps": args.max_steps, "compile": True if args.compile else None})
    data = _data(args)
    settings = preset_train_settings(args.preset, **{option: getattr(args, option) for option in TRAIN_OPTIONS},
                                     bf16=args.bf16, precision=args.precision)
    model_settings = preset_model_settings(args.model, args.preset, MODELS[args.model].settings_from_args(args),
                                           benchmark=args.dataset, seed=args.seed)
    return TrainRequest(out=args.out, data=data, model=args.model, model_settings=model_settings, settings=settings,
                        ctf=bool(args.ctf), overwrite=args.overwrite, preset=args.preset)


#: (model, old option spelling) pairs warned about in this process
_warned_spellings: set[tuple[str, str]] = set()


def _check_model_use(args: argparse.Namespace) -> None:
    """One-line errors for data options the chosen model cannot use; warnings for old option spellings."""
    from particle_vae.models import MODELS

    built_for = getattr(args, "_options_of_model", args.model)
    if built_for != args.model:  # a parser built for another command line (cli.build_parser without argv)
        raise ParticleVAEError(f"--model {args.model}: the command line was parsed with the options of model {built_for}; "
                               "build the parser from the command line that names the model (particle_vae.cli.build_parser(argv=...))")
    for old, new in getattr(args, "old_model_flags", None) or []:
        if (args.model, old) not in _warned_spellings:  # once per process (a one-process launch parses again)
            _warned_spellings.add((args.model, old))
            log.warning("%s is the old name of model %s's %s; use %s", old, args.model, new, new)
    if args.resume or MODELS[args.model].supports_labels:
        return
    given = [option for option, value in (("--label-column", args.label_column), ("--labels", args.labels)) if value is not None]
    if given:
        labelled = [name for name, cls in sorted(MODELS.items()) if cls.supports_labels]
        raise ParticleVAEError(f"{given[0]}: model {args.model} does not train with class labels (models that do: "
                               f"{', '.join(labelled) or 'none'})")


def request_from_words(words) -> TrainRequest:
    """The request of the command line ``particle-vae train WORDS`` (``words``: its options and input as
    strings, e.g. ``["particles.star", "--preset", "tiny", "--zdim", "4", "--out", "run1"]``), checked as the
    command checks them; for scripts that take train options as words. Launch options (``--gpus``) are
    not acted on. An unknown option exits with status 2 (argparse); out-of-range values raise
    :class:`~particle_vae.errors.ParticleVAEError`."""
    from particle_vae.cli import parse_command_line

    args = parse_command_line(["train", *map(str, words)])[1]
    check_options(args)
    _check_model_use(args)
    return request(args)


def main(args: argparse.Namespace) -> int:
    """Train the run ``args`` describe (:func:`particle_vae.api.train`), or start this command again in
    several processes (``--gpus``, ``--ddp-cpu-processes``); returns the exit code."""
    from particle_vae import api
    from particle_vae.engine import distributed as ddp
    from particle_vae.engine.launch import wants_launch

    check_options(args)
    _check_model_use(args)
    if wants_launch(args):
        return _launch(args)
    context = ddp.init_distributed(args.device or "auto")
    if not context.is_main:  # one console log (rank 0's) for the run
        logging.getLogger("particle_vae").setLevel(logging.WARNING)
    try:
        api.train(request(args), context=context)
        return 0
    finally:
        ddp.cleanup(context)


def _launch(args: argparse.Namespace) -> int:
    """Start this command again under torchrun with ``--gpus`` / ``--ddp-cpu-processes`` processes."""
    from particle_vae.engine.launch import relaunch

    if not args.resume and RunDirectory(args.out).config_path.exists() and not args.overwrite:
        RunDirectory(args.out).create(overwrite=False)  # the one-line "already holds a training run" error
    return relaunch(args, args._launch_parser, "train")
