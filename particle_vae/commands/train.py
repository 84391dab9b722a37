"""Train a model on particles (STAR, .mrcs or .txt list) or on a paper benchmark.

Writes a run directory: config.json (rebuilds model and data pipeline),
metrics.jsonl (one line per epoch), train.log and checkpoints/ (last.pt to
resume, best.pt at the best validation ELBO). Examples:

  particle-vae train particles.star --preset particles --group 8 --zdim 2 --out run1
  particle-vae train --dataset mnist-u --preset mnist --n 10000 --data-dir DATA --out run2
  particle-vae train --out run1 --resume
  particle-vae train particles.star --preset particles --gpus 4 --batch-size 256 --out run3
  torchrun --nnodes 2 --nproc-per-node 8 ... -m particle_vae train particles.star ... --out run4

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

from particle_vae.engine.device import cpu_has_fast_bf16, resolve_device
from particle_vae.engine.presets import BENCHMARK_THETA_PRIOR, PRESETS, resolve_kernel
from particle_vae.engine.run import RunDirectory
from particle_vae.errors import ParticleVAEError

log = logging.getLogger("particle_vae")

BENCHMARKS = ("mnist-n", "mnist-u", "so2", "se2")

# option name -> TargetVAEConfig field
MODEL_OPTIONS = {
    "group": "group_order", "zdim": "zdim", "fields": "n_fields", "kernel": "kernel", "padding": "padding",
    "encoder": "encoder", "rotation": "rotation", "translation_prior_std": "translation_prior_std",
    "theta_prior": "theta_prior", "likelihood": "likelihood", "sigma": "gaussian_sigma", "gen_hidden": "gen_hidden",
    "gen_layers": "gen_layers", "fourier_features": "n_fourier", "fourier_bandwidth": "fourier_bandwidth",
    "leaky_relu_slope": "leaky_relu_slope",
    "gumbel_temperature": "gumbel_temperature", "mixing": "mixing", "likelihood_mask": "mask_radius", "beta": "beta",
    "enc_hidden": "enc_hidden", "enc_layers": "enc_layers", "enc_channels": "enc_channels",
    "clusters": "n_clusters", "cluster_dim": "cluster_dim", "lie_group": "group", "invariance_weight": "invariance_weight",
    "invariance_translation": "invariance_translation",
}
PREP_OPTIONS = {"downsample_to": "target_box", "crop_to": "crop_box", "invert": "invert", "normalize": "normalize",
                "mask_radius": "mask_radius"}
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "val_fraction", "lr_patience", "early_stop_patience", "seed",
                 "num_workers", "device", "max_steps", "compile")

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
    set_by = [f"{preset} {_shown(values[section][name])}" for preset, values in sorted(PRESETS.items())
              if name in values.get(section, {})]
    return f"(default: {_shown(base)}" + (f"; presets: {', '.join(set_by)})" if set_by else ")")


def _shown(value) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _train_default(name: str) -> str:
    """The ``(default: ...)`` text of a :class:`TrainSettings` field (and the presets that change it)."""
    from particle_vae.engine.trainer import TrainSettings

    base = next(f.default for f in fields(TrainSettings) if f.name == name)
    return _preset_default("train", name, base)


def _model_default(name: str, base_text: str | None = None) -> str:
    """The ``(default: ...)`` text of a model setting: each model's own default (from its
    config class; ``CLI_ALIASES`` map a model's field to the common name) and the presets."""
    from dataclasses import MISSING

    from particle_vae.models import MODELS

    by_value: dict[str, list[str]] = {}
    for model_name, entry in MODELS.items():
        config_class = entry.config_class
        own_name = {common: own for own, common in getattr(config_class, "CLI_ALIASES", {}).items()}.get(name, name)
        for config_field in fields(config_class):
            if config_field.name == own_name and config_field.default is not MISSING:
                by_value.setdefault(_shown(config_field.default), []).append(model_name)
    if base_text is None:
        if len(by_value) == 1 and len(next(iter(by_value.values()))) == len(MODELS):
            base_text = next(iter(by_value))
        else:
            base_text = "; ".join(f"{value} for {', '.join(models)}" for value, models in by_value.items())
    text = _preset_default("model", name, None)
    return text.replace("(default: none", f"(default: {base_text}", 1)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", type=Path,
                        help="particle .star, cryoSPARC particle .cs, .mrcs/.mrc stack or .txt list of stacks")
    parser.add_argument("--out", "-o", type=Path, required=True, help="run directory to create (or resume)")
    parser.add_argument("--dataset", choices=BENCHMARKS, help="train on a paper benchmark instead of particles (default: none)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="named settings, logged at the start; the options below override them (default: none, "
                             "the models' own defaults)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    from particle_vae.models import MODELS

    model = parser.add_argument_group("model (an option overrides the preset, the preset the model's default; options a "
                                      "model does not have are ignored)")
    model.add_argument("--model", default="target-vae", choices=sorted(MODELS), help="which model to train")
    model.add_argument("--beta", type=float, help=f"KL weight of the (beta-)VAE baseline {_model_default('beta')}")
    model.add_argument("--group", type=int,
                       help=f"rotation group order r of P_r (4, 8, 16); MCE-VAE: rotations of the invariance term "
                            f"{_model_default('group_order')}")
    model.add_argument("--zdim", type=int, help=f"semantic latent dimensions {_model_default('zdim')}")
    model.add_argument("--fields", type=int, help=f"encoder hidden fields {_model_default('n_fields')}")
    model.add_argument("--kernel", type=int,
                       help=f"encoder kernel, pixels; none: about half the box, odd {_model_default('kernel')}")
    model.add_argument("--padding", type=int, help=f"encoder padding, pixels {_model_default('padding')}")
    model.add_argument("--mixing", choices=["full", "shared"],
                       help="TARGET-VAE encoder 1x1 layers: shared across rotation channels (the authors') or full e2cnn "
                            f"regular-to-regular kernels (8x the cost at P8) {_model_default('mixing')}")
    model.add_argument("--encoder", choices=["group", "plain", "mlp", "conv"],
                       help="TARGET-VAE: group or plain (ablation: translation-only, ordinary convolutions); spatial-VAE: mlp "
                            f"or conv {_model_default('encoder')}")
    model.add_argument("--enc-hidden", type=int, help=f"spatial-VAE / MCE-VAE: inference MLP width {_model_default('enc_hidden')}")
    model.add_argument("--enc-layers", type=int, help=f"spatial-VAE / MCE-VAE: inference layers {_model_default('enc_layers')}")
    model.add_argument("--enc-channels", type=int,
                       help=f"spatial-VAE / MCE-VAE: first conv layer channels {_model_default('enc_channels')}")
    model.add_argument("--clusters", type=int, help=f"MCE-VAE: mixture components of the cluster latent {_model_default('n_clusters')}")
    model.add_argument("--cluster-dim", type=int,
                       help=f"MCE-VAE: cluster latent dimensions; EquiVAE: class embedding size {_model_default('cluster_dim')}")
    model.add_argument("--lie-group", choices=["so2", "se2"], help=f"MCE-VAE: transformation group {_model_default('group')}")
    model.add_argument("--invariance-weight", type=float,
                       help=f"MCE-VAE: weight of the invariance term {_model_default('invariance_weight')}")
    model.add_argument("--invariance-translation", type=float,
                       help=f"MCE-VAE: largest shift of the sampled group elements, pixels {_model_default('invariance_translation')}")
    model.add_argument("--rotation", choices=["full", "discrete", "none"],
                       help=f"TARGET-VAE ablation: discrete = no theta offsets; none = no rotation inference {_model_default('rotation')}")
    model.add_argument("--no-subpixel", dest="subpixel", action="store_false", default=None,
                       help="TARGET-VAE: no continuous translation offset inside a cell")
    model.add_argument("--translation-prior-std", type=float,
                       help=f"std of p(t) around the centre, pixels {_model_default('translation_prior_std')}")
    model.add_argument("--theta-prior", choices=["uniform", "normal"],
                       help=f"prior of the in-plane rotation {_model_default('theta_prior')}; benchmarks: normal for mnist-n, "
                            "uniform otherwise")
    model.add_argument("--theta-prior-std-deg", type=float, help="std of the normal theta prior, degrees (default: 45)")
    model.add_argument("--likelihood", choices=["bernoulli", "gaussian"],
                       help=f"pixel likelihood {_model_default('likelihood')}; benchmarks: bernoulli")
    model.add_argument("--sigma", type=float,
                       help=f"fixed noise std of the Gaussian likelihood, data units {_model_default('gaussian_sigma', 'learned')}")
    model.add_argument("--gen-hidden", type=int, help=f"generator width {_model_default('gen_hidden')}")
    model.add_argument("--gen-layers", type=int, help=f"generator hidden layers {_model_default('gen_layers')}")
    model.add_argument("--fourier-features", type=int, help=f"random Fourier frequencies of the generator {_model_default('n_fourier')}")
    model.add_argument("--fourier-bandwidth", type=float,
                       help=f"std of the Fourier frequencies, cycles per pixel {_model_default('fourier_bandwidth')}")
    model.add_argument("--leaky-relu-slope", type=float,
                       help=f"TARGET-VAE: negative slope of the LeakyReLUs of encoder and generator {_model_default('leaky_relu_slope')}; "
                            "the authors' code uses 0.01")
    model.add_argument("--gumbel-temperature", type=float,
                       help=f"TARGET-VAE: temperature of the Gumbel-softmax sample of the pose cell {_model_default('gumbel_temperature')}")
    model.add_argument("--likelihood-mask", type=float,
                       help=f"only score pixels within this radius, pixels of the model box {_model_default('mask_radius', 'all pixels')}")
    model.add_argument("--ctf", action="store_true", help="CTF-aware likelihood using the STAR's CTF columns (Gaussian likelihood)")

    data = parser.add_argument_group("data")
    add_input_options(data)
    data.add_argument("--n", type=int, help="benchmarks: use the first N training images (default: all)")
    data.add_argument("--label-column",
                      help="semi-supervised models (equivae): STAR column with class labels, e.g. rlnClassNumber (default: "
                           "none, unlabelled)")
    data.add_argument("--labels", type=int, help="benchmarks, semi-supervised models: label the first N training images (default: none)")
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
    train.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the training step (for CUDA; on the CPU it needs a C++ compiler and minutes to compile); "
                            "if compilation fails, training continues without it")

    from particle_vae.cli import add_launch_options

    add_launch_options(parser, "data-parallel training")


def _data_spec(args, preset: dict) -> dict:
    if args.dataset:
        from particle_vae.data.mnist import resolve_mnist_dir

        if args.input is not None:
            raise ParticleVAEError("give either particles or --dataset, not both")
        mnist_dir = resolve_mnist_dir(args.mnist_dir, args.data_dir)
        return {"kind": "benchmark", "benchmark": args.dataset, "mnist_dir": str(mnist_dir.resolve()), "split": "train",
                "n": args.n, "seed": 0, "labels": args.labels}
    if args.input is None:
        raise ParticleVAEError("no input: give a particle STAR/stack/list, or --dataset for a benchmark")
    prep = dict(preset.get("preprocessing", {}))
    for option, name in PREP_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            prep[name] = value
    spec = {"kind": "particles", "path": str(args.input.resolve()),
            "datadir": None if args.stack_dir is None else str(args.stack_dir.resolve()),
            "pixel_size": args.pixel_size, "preprocessing": prep, "label_column": args.label_column}
    if args.cache is not None:
        spec["cache"] = {"path": str(args.cache.expanduser().resolve()), "dtype": args.cache_dtype or "float16"}
    elif args.cache_dtype is not None:
        raise ParticleVAEError("--cache-dtype needs --cache PATH")
    return spec


def _fit_box(spec: dict):
    """Preset boxes larger than the input fall back to the input box.

    Returns the opened particle source (``None`` for benchmarks) so the data
    pipeline does not read every stack header a second time."""
    if spec["kind"] != "particles":
        return None
    from particle_vae.data.particles import open_source
    from particle_vae.data.preprocess import Preprocessing

    source = open_source(spec["path"], datadir=spec["datadir"], pixel_size=spec["pixel_size"])
    source.require_pixel_size()  # infer writes origins in Angstrom: stop now rather than after training
    prep = spec["preprocessing"]
    limit = prep.get("crop_box") or source.box
    if prep.get("target_box") and prep["target_box"] >= limit:
        prep.pop("target_box")
    try:
        Preprocessing(box=source.box, pixel_size=source.pixel_size, **prep)
    except ValueError as error:
        raise ParticleVAEError(f"invalid preprocessing for {source.box} px particles: {error}", source.path,
                               "choose --crop-to, --downsample-to and --mask-radius inside the box") from None
    return source


def _model_settings(args, preset: dict, box: int, class_values: list | None = None) -> dict:
    """The chosen model's config fields from preset, benchmark defaults and options.

    A model config class may define ``CLI_ALIASES`` (field -> common field name,
    e.g. the VAE's ``hidden`` takes ``gen_hidden``)."""
    from particle_vae.models import MODELS

    config_class = MODELS[args.model].config_class
    settings = {k: v for k, v in preset.get("model", {}).items()}
    if args.dataset:
        prior, std = BENCHMARK_THETA_PRIOR[args.dataset]
        settings["theta_prior"] = prior
        if std is not None:
            settings["theta_prior_std"] = std
        settings.setdefault("likelihood", "bernoulli")
    for option, name in MODEL_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            settings[name] = value
    if args.subpixel is not None:
        settings["subpixel"] = args.subpixel
    if args.theta_prior_std_deg is not None:
        settings["theta_prior_std"] = math.radians(args.theta_prior_std_deg)
    if settings.get("encoder") == "plain":
        settings.setdefault("rotation", "none")
    settings["kernel"] = resolve_kernel(settings.get("kernel"), box)
    settings["box"] = box
    if class_values is not None:
        settings["n_classes"] = len(class_values)
    settings["seed"] = args.seed if args.seed is not None else 0
    for field_name, common in getattr(config_class, "CLI_ALIASES", {}).items():
        if common in settings:
            settings[field_name] = settings[common]
    known = {f.name for f in fields(config_class)}
    return {k: v for k, v in settings.items() if k in known}


def main(args: argparse.Namespace) -> int:
    from particle_vae.engine import distributed as ddp

    check_options(args)
    if ddp.wants_launch(args):
        return _launch(args)
    context = ddp.init_distributed(args.device or "auto")
    if not context.is_main:  # one console log (rank 0's) for the run
        logging.getLogger("particle_vae").setLevel(logging.WARNING)
    try:
        return _main(args, context)
    finally:
        ddp.cleanup(context)


def _main(args: argparse.Namespace, context) -> int:
    from particle_vae.engine import distributed as ddp
    from particle_vae.engine.trainer import TrainSettings

    run = RunDirectory(args.out)
    preset = PRESETS[args.preset] if args.preset else {}
    source = None
    if args.resume:
        def read_config():
            config = run.read_config()
            run.require_checkpoint()
            # settings a resumed run may change: more epochs or steps (extending a run), compiling the same computation
            changes = {"epochs": args.epochs, "max_steps": args.max_steps, "compile": True if args.compile else None}
            changes = {key: value for key, value in changes.items() if value is not None and value != config["train"].get(key)}
            if changes:
                config["train"].update(changes)
                run.write_config(config)
            return config

        config = ddp.run_on_main(context, read_config)
    else:
        spec = _data_spec(args, preset)
        source = _fit_box(spec)
        train_settings = dict(preset.get("train", {}))
        for option in TRAIN_OPTIONS:
            if getattr(args, option) is not None:
                train_settings[option] = getattr(args, option)
        train_settings["bf16"] = args.bf16
        if args.precision is not None:
            train_settings["precision"] = args.precision
        if train_settings.get("precision") == "bf16" and resolve_device(args.device or "auto").type == "cpu" and not cpu_has_fast_bf16():
            log.warning("--precision bf16: this CPU has no bf16 matrix instructions (AVX512-BF16/AMX), bf16 will be slower than fp32")
        config = {"data": spec, "train": vars(TrainSettings(**train_settings)), "ctf": bool(args.ctf)}
        ddp.run_on_main(context, lambda: run.create(overwrite=args.overwrite))
    handler = _attach_log(run, args.resume) if context.is_main else None
    try:
        return _train(args, run, preset, config, source, context)
    finally:
        if handler is not None:
            logging.getLogger("particle_vae").removeHandler(handler)
            handler.close()


def _launch(args: argparse.Namespace) -> int:
    """Start this command again under torchrun with ``--gpus`` / ``--ddp-cpu-processes`` processes."""
    from particle_vae.engine.distributed import relaunch

    if not args.resume and RunDirectory(args.out).config_path.exists() and not args.overwrite:
        RunDirectory(args.out).create(overwrite=False)  # the one-line "already holds a training run" error
    return relaunch(args, args._launch_parser, "train")


def _train(args, run: RunDirectory, preset: dict, config: dict, source=None, context=None) -> int:
    from particle_vae.engine import distributed as ddp
    from particle_vae.engine.data import prepare_data
    from particle_vae.engine.trainer import Trainer, TrainSettings, seed_everything
    from particle_vae.models import build_model

    context = context or ddp.SINGLE
    if args.preset and not args.resume:
        log.info("preset %s sets: %s", args.preset, {k: v for k, v in preset.items() if v})
    settings = TrainSettings(**config["train"])
    prepared = prepare_data(config["data"], source=source, num_workers=settings.num_workers, context=context)
    for line in prepared.steps:
        log.info("data: %s", line)
    seed_everything(settings.seed)
    if not args.resume:
        try:
            model = build_model({"model": args.model, **_model_settings(args, preset, prepared.box, prepared.class_values)})
        except ValueError as error:
            raise ParticleVAEError(f"invalid model settings: {error}") from None
        config.update(model=model.config_dict(), pixel_size=prepared.pixel_size, box=prepared.box,
                      class_values=prepared.class_values)
    else:
        model = build_model(config["model"])
    log.info("model: %s", config["model"])
    log.info("%d trainable parameters", sum(p.numel() for p in model.parameters() if p.requires_grad))
    ctf_for = _ctf_provider(prepared, model) if config.get("ctf") else None
    trainer = Trainer(model, prepared.dataset, settings, run, ctf_for=ctf_for, context=context)
    if not args.resume:  # written once the trainer has accepted the settings, so a refused run leaves no config behind
        ddp.run_on_main(context, lambda: run.write_config(config))
    log.info("device %s%s; %d training and %d validation images", trainer.device,
             f" x {context.world_size} processes ({context.backend}), {settings.batch_size // context.world_size} images per "
             f"process and step" if context.distributed else "", len(trainer.train_idx), len(trainer.val_idx))
    if args.resume:
        trainer.resume()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        log.warning("interrupted; the last finished epoch is saved: continue with  particle-vae train --out %s --resume", run.path)
        raise
    log.info("run written to %s", run.path)
    return 0


def _ctf_provider(prepared, model):
    """index (B,) -> CTF (B, N, N//2+1) at the model's box and pixel size, squared for
    CTF-premultiplied particles (the factor the model's projection is multiplied by)."""
    from particle_vae.data.ctf import effective_ctf

    if prepared.source is None or prepared.source.star is None:
        raise ParticleVAEError("--ctf needs a particle STAR file with CTF columns")
    if model.config.likelihood != "gaussian":
        raise ParticleVAEError("--ctf needs the Gaussian likelihood (--likelihood gaussian)")
    if prepared.pixel_size is None:
        raise ParticleVAEError("--ctf needs the pixel size: pass --pixel-size")
    table = prepared.source.star.ctf_parameters()
    box, apix = prepared.box, prepared.pixel_size
    premultiplied = int(table["premultiplied"].sum())
    if premultiplied:
        log.info("%d of %d particles are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied = 1): the likelihood "
                 "multiplies their projections by the CTF squared", premultiplied, len(table))

    def ctf_for(index):
        return effective_ctf(table.iloc[index.numpy()], box, apix)

    return ctf_for


def _attach_log(run: RunDirectory, resume: bool) -> logging.Handler:
    run.path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run.log_path, mode="a" if resume else "w", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("particle_vae").addHandler(handler)
    return handler
