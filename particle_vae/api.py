"""The Python API: ``simulate``, ``train``, ``infer`` and ``analyze`` as functions.

Each function takes a request (a dataclass of typed settings) and returns a
result record (a dataclass of what it wrote). Problems a user can fix raise
:class:`~particle_vae.errors.ParticleVAEError` (or its subclasses
``InputFileError`` / ``OutputFileError``) with a one-line message; nothing here
exits the process. Progress goes to the ``particle_vae`` logger at INFO (call
``logging.basicConfig(level=logging.INFO)`` to see it), the same lines the
``particle-vae`` commands print: each command parses its options into one of
these requests and calls the function below it.

Example (a tiny run on CPU)::

    from particle_vae import api

    sim = api.simulate(api.SimulateRequest.from_preset("t20s", 200, "demo/data", data_dir="../shared/data"))
    run = api.train(api.TrainRequest.from_preset("tiny", "demo/run", api.ParticleData(sim.star), epochs=2))
    out = api.infer(api.InferRequest(run.run, "demo/particles_vae.star"))
    classes = api.analyze(api.AnalyzeRequest(out.star, "demo/analysis", run=run.run, k=2))

Multi-process runs (``--gpus``, ``torchrun``) go through the command line;
``train`` and ``infer`` join a torchrun process group when started inside one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from particle_vae.engine.presets import MASS_TOLERANCE, REFINE_CLASSES, TRAINING_PRESETS
from particle_vae.errors import ParticleVAEError

if TYPE_CHECKING:  # imported where used: importing this module stays cheap
    from particle_vae.data.simulation import SimulationConfig
    from particle_vae.engine.refine import RefineSettings
    from particle_vae.engine.trainer import TrainSettings

log = logging.getLogger("particle_vae")

#: the model trained when a request names none
DEFAULT_MODEL = "target-vae"

__all__ = [
    "DEFAULT_MODEL", "SimulateRequest", "SimulateResult", "simulate", "ParticleData", "BenchmarkData", "TrainRequest",
    "TrainResult", "train", "preset_train_settings", "preset_model_settings", "preset_preprocessing", "ctf_provider",
    "InferRequest", "InferResult", "infer", "AnalyzeRequest", "AnalyzeResult", "analyze",
]


# --------------------------------------------------------------------------- simulate

@dataclass
class SimulateRequest:
    """What :func:`simulate` writes.

    Attributes:
        config: every setting of the simulation (:class:`~particle_vae.data.simulation.SimulationConfig`;
            :meth:`from_preset` builds one from a preset, as ``particle-vae simulate`` does).
        out: output folder (created).
        overwrite: replace existing output files (never an input).
        progress: show a progress bar.
        project_dir: the folder RELION runs in: the STAR's ``rlnImageName`` names the stack relative
            to it (default: the current folder).
        densities: optional precomputed ``(box, box, box)`` float32 volumes indexed ``[z, y, x]``, one
            per structure, used instead of reading ``config.structures``.
    """

    config: SimulationConfig
    out: Path
    overwrite: bool = False
    progress: bool = True
    project_dir: Path | None = None
    densities: Sequence[Any] | None = None

    @classmethod
    def from_preset(cls, preset: str, n: int, out: str | Path, *, data_dir: str | Path | None = None,
                    structures: Sequence[str | Path] | None = None, defocus_star: str | Path | None = None,
                    overwrite: bool = False, progress: bool = True, project_dir: str | Path | None = None,
                    **settings) -> SimulateRequest:
        """A request for ``n`` particles of preset ``preset`` (``t20s``, ``groel``, ``mixture``) written to ``out``.

        ``settings``: any :class:`~particle_vae.data.simulation.SimulationConfig` field (``snr``, ``box`` in
        pixels, ``pixel_size`` in Angstrom, ``max_shift`` in output pixels, ...), ``None`` meaning the
        preset's; ``data_dir``: the reference-data folder holding ``structures/`` (default
        ``$PARTICLE_VAE_DATA``). Raises :class:`~particle_vae.errors.InputFileError` for an unknown preset,
        missing reference data or impossible settings.
        """
        from particle_vae.data.simulation import preset_config

        config = preset_config(preset, n, data_dir=data_dir, structures=structures, defocus_star=defocus_star, **settings)
        return cls(config, Path(out), overwrite=overwrite, progress=progress,
                   project_dir=None if project_dir is None else Path(project_dir))


@dataclass
class SimulateResult:
    """What :func:`simulate` wrote.

    Attributes:
        star: the RELION 3.1 particle STAR (CTF columns, ground truth in ``pvaeTrue*``).
        stack: the ``(n, box, box)`` float32 particle stack it names.
        n: number of particles.
        snr_measured: ``sum var(clean) / sum var(noise)`` over all particles (``None`` without noise).
        runtime_s: seconds the simulation took.
        files: file name -> path of every file written (``simulation.json`` included).
        summary: the contents of ``simulation.json``.
    """

    star: Path
    stack: Path
    n: int
    snr_measured: float | None
    runtime_s: float
    files: dict[str, Path]
    summary: dict


def simulate(request: SimulateRequest) -> SimulateResult:
    """Simulate the particles of ``request.config`` into ``request.out`` (``particle-vae simulate``).

    Raises:
        InputFileError / OutputFileError: bad inputs or settings, outputs that exist (without ``overwrite``).
    """
    from particle_vae.data.simulation import run_simulation

    config = request.config
    log.info("simulating %d particles (%s): %s; %d px at %.4g A/px%s", config.n, config.preset,
             ", ".join(f"{s.name}={s.path}" for s in config.structures), config.box, config.pixel_size,
             f" -> {config.output_box} px at {config.output_pixel_size:.4g} A/px" if config.output_box != config.box else "")
    result = run_simulation(config, request.out, overwrite=request.overwrite, progress=request.progress,
                            densities=request.densities, project_dir=request.project_dir)
    for name, path in result.files.items():
        log.info("wrote %s", path)
    if result.snr_measured is not None:
        log.info("SNR requested %.4g, measured %.4g; %d particles in %.1f s", config.snr, result.snr_measured,
                 result.n, result.summary["runtime_s"])
    else:
        log.info("%d noise-free particles in %.1f s", result.n, result.summary["runtime_s"])
    return SimulateResult(star=result.files["particles.star"], stack=result.files["particles.mrcs"], n=result.n,
                          snr_measured=result.snr_measured, runtime_s=float(result.summary["runtime_s"]),
                          files=dict(result.files), summary=result.summary)


# --------------------------------------------------------------------------- train

def _train_settings(**values) -> TrainSettings:
    from particle_vae.engine.trainer import TrainSettings

    return TrainSettings(**values)


@dataclass
class ParticleData:
    """Particles to train on (the ``data`` section of a run's ``config.json``, see :mod:`particle_vae.engine.data`).

    Attributes:
        path: particle ``.star``, cryoSPARC ``.cs``, ``.mrcs``/``.mrc`` stack or ``.txt`` list of stacks.
        stack_dir: folder the STAR's ``rlnImageName`` is relative to (default: the STAR's folder).
        pixel_size: Angstrom per input pixel (default: the STAR's, else the stack header's).
        preprocessing: :class:`~particle_vae.data.preprocess.Preprocessing` fields other than ``box`` and
            ``pixel_size`` (``target_box``, ``crop_box`` in pixels, ``invert``, ``normalize``,
            ``mask_radius`` in output pixels); a ``target_box`` at least the input box is dropped.
        label_column: STAR column with class labels, for models trained with labels.
        cache: write the preprocessed images once to this contiguous stack and train from it.
        cache_dtype: ``float16`` or ``float32`` values of the cache.
    """

    path: Path
    stack_dir: Path | None = None
    pixel_size: float | None = None
    preprocessing: dict = field(default_factory=dict)
    label_column: str | None = None
    cache: Path | None = None
    cache_dtype: str = "float16"

    def spec(self) -> dict:
        """The data settings as the run directory stores them (absolute paths)."""
        spec = {"kind": "particles", "path": str(Path(self.path).resolve()),
                "datadir": None if self.stack_dir is None else str(Path(self.stack_dir).resolve()),
                "pixel_size": self.pixel_size, "preprocessing": dict(self.preprocessing), "label_column": self.label_column}
        if self.cache is not None:
            spec["cache"] = {"path": str(Path(self.cache).expanduser().resolve()), "dtype": self.cache_dtype}
        return spec


@dataclass
class BenchmarkData:
    """A paper benchmark to train on (its training split, generated from MNIST).

    Attributes:
        benchmark: ``mnist-n``, ``mnist-u``, ``so2`` or ``se2``.
        mnist_dir: folder with the MNIST IDX files.
        n: the first ``n`` training images (default: all).
        labels: label the first ``labels`` training images (models trained with labels).
    """

    benchmark: str
    mnist_dir: Path
    n: int | None = None
    labels: int | None = None

    def spec(self) -> dict:
        """The data settings as the run directory stores them."""
        return {"kind": "benchmark", "benchmark": self.benchmark, "mnist_dir": str(Path(self.mnist_dir).resolve()),
                "split": "train", "n": self.n, "seed": 0, "labels": self.labels}


@dataclass
class TrainRequest:
    """What :func:`train` trains (``particle-vae train``).

    Attributes:
        out: the run directory to create (or, with ``resume``, to continue).
        data: the training data (``None`` only with ``resume``: the run's own).
        model: a name in :data:`particle_vae.models.MODELS`.
        model_settings: fields of the model's config class (its defaults for the rest); ``box``, and
            ``n_classes`` for models trained with labels, come from the data. :func:`preset_model_settings`
            resolves a preset's.
        settings: the optimisation settings (:class:`~particle_vae.engine.trainer.TrainSettings`).
        ctf: CTF-aware likelihood from the STAR's CTF columns (Gaussian likelihood).
        overwrite: replace a run already in ``out``.
        resume: continue the run in ``out`` from its last checkpoint (``data``, ``model``,
            ``model_settings``, ``settings`` and ``ctf`` are then the run's).
        resume_changes: with ``resume``, settings a resumed run may change: ``epochs``, ``max_steps``
            (extending a run) and ``compile`` (``None`` values: unchanged).
        preset: the name of the preset the settings came from, logged at the start (it sets nothing here).
    """

    out: Path
    data: ParticleData | BenchmarkData | None = None
    model: str = DEFAULT_MODEL
    model_settings: dict = field(default_factory=dict)
    settings: TrainSettings = field(default_factory=_train_settings)
    ctf: bool = False
    overwrite: bool = False
    resume: bool = False
    resume_changes: dict = field(default_factory=dict)
    preset: str | None = None

    @classmethod
    def from_preset(cls, preset: str | None, out: str | Path, data: ParticleData | BenchmarkData, *,
                    model: str = DEFAULT_MODEL, model_settings: dict | None = None, ctf: bool = False,
                    overwrite: bool = False, **train) -> TrainRequest:
        """A request with preset ``preset``'s settings (``None``: the models' and trainer's defaults), as
        ``particle-vae train --preset`` resolves them: ``model_settings``, ``train`` (any
        :class:`~particle_vae.engine.trainer.TrainSettings` field, e.g. ``epochs=2``) and ``data.preprocessing``
        override the preset's values of the same names."""
        if isinstance(data, ParticleData):
            data = dataclasses.replace(data, preprocessing=preset_preprocessing(preset, data.preprocessing))
        benchmark = data.benchmark if isinstance(data, BenchmarkData) else None
        return cls(out=Path(out), data=data, model=model,
                   model_settings=preset_model_settings(model, preset, model_settings or {}, benchmark=benchmark,
                                                        seed=train.get("seed")),
                   settings=preset_train_settings(preset, **train), ctf=ctf, overwrite=overwrite, preset=preset)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        run: the run directory (``config.json``, ``metrics.jsonl``, ``train.log``, ``checkpoints/``).
        metrics: the ``metrics.jsonl`` rows of the epochs this call trained (ELBOs in nats per image).
        best_val_elbo: the best validation ELBO of the run so far (``-inf`` before any full epoch).
        model: the model's settings as stored in ``config.json``.
    """

    run: Path
    metrics: list[dict]
    best_val_elbo: float
    model: dict

    @property
    def final(self) -> dict | None:
        """The last epoch's metrics row (``None`` when no epoch ran)."""
        return self.metrics[-1] if self.metrics else None


def preset_preprocessing(preset: str | None, given: dict | None = None) -> dict:
    """Preset ``preset``'s preprocessing settings with ``given`` (``None`` values ignored) overriding them."""
    prep = dict(TRAINING_PRESETS[preset].get("preprocessing", {})) if preset else {}
    for name, value in (given or {}).items():
        if value is not None:
            prep[name] = value
    return prep


def preset_train_settings(preset: str | None, **given) -> TrainSettings:
    """Preset ``preset``'s training settings with ``given`` :class:`TrainSettings` fields (``None``
    values ignored) overriding them; the trainer's defaults for the rest."""
    values = dict(TRAINING_PRESETS[preset].get("train", {})) if preset else {}
    values.update({name: value for name, value in given.items() if value is not None})
    try:
        return _train_settings(**values)
    except TypeError as error:
        raise ParticleVAEError(f"unknown training setting: {error}") from None


def preset_model_settings(model: str, preset: str | None, given: dict | None = None, benchmark: str | None = None,
                          seed: int | None = None) -> dict:
    """The config fields of model ``model``: preset ``preset``'s settings of the same names (or of the
    names the model's ``preset_fields`` maps them to), then a benchmark's defaults (theta prior,
    Bernoulli likelihood), then ``given`` (fields in their own units), then ``seed`` (0 when
    ``None``) for a model with a ``seed`` field. ``box`` and ``n_classes`` are left to :func:`train`."""
    from particle_vae.engine.presets import BENCHMARK_THETA_PRIOR
    from particle_vae.models import MODELS

    if model not in MODELS:
        raise ParticleVAEError(f"unknown model {model!r}; models: {', '.join(sorted(MODELS))}")
    cls = MODELS[model]
    known = {item.name for item in dataclasses.fields(cls.config_class)}
    preset_model = TRAINING_PRESETS[preset].get("model", {}) if preset else {}
    settings = {name: value for name, value in preset_model.items() if name in known}
    for name, preset_name in cls.preset_fields.items():
        if name in known and name not in settings and preset_name in preset_model:
            settings[name] = preset_model[preset_name]
    if benchmark:
        prior, std = BENCHMARK_THETA_PRIOR[benchmark]
        values = {"theta_prior": prior} if std is None else {"theta_prior": prior, "theta_prior_std": std}
        settings.update({name: value for name, value in values.items() if name in known})
        settings.setdefault("likelihood", "bernoulli")
    settings.update(given or {})
    if "seed" in known:
        settings["seed"] = seed if seed is not None else 0
    return settings


def train(request: TrainRequest, context=None) -> TrainResult:
    """Train (or resume) the run ``request.out`` (``particle-vae train``).

    ``context``: the :class:`~particle_vae.engine.distributed.DistContext` of a process group the
    caller has joined; ``None``: join torchrun's when started under it (and leave it after), else
    one process.

    Raises:
        ParticleVAEError: missing or unreadable data, impossible settings, a run already in ``out``
            (without ``overwrite`` or ``resume``).
    """
    from particle_vae.engine import distributed as ddp

    own = context is None
    if own:
        context = ddp.init_distributed(request.settings.device)
        if not context.is_main:  # one console log (rank 0's) for the run
            logging.getLogger("particle_vae").setLevel(logging.WARNING)
    try:
        return _train(request, context)
    finally:
        if own:
            ddp.cleanup(context)


def _train(request: TrainRequest, context) -> TrainResult:
    from particle_vae.engine import distributed as ddp
    from particle_vae.engine.device import cpu_has_fast_bf16, resolve_device
    from particle_vae.engine.run import RunDirectory

    run = RunDirectory(request.out)
    preset = TRAINING_PRESETS[request.preset] if request.preset else {}
    source = None
    if request.resume:
        def read_config():
            config = run.read_config()
            run.require_checkpoint()
            # settings a resumed run may change: more epochs or steps (extending a run), compiling the same computation
            changes = {key: value for key, value in request.resume_changes.items()
                       if value is not None and value != config["train"].get(key)}
            if changes:
                config["train"].update(changes)
                run.write_config(config)
            return config

        config = ddp.run_on_main(context, read_config)
    else:
        if request.data is None:
            raise ParticleVAEError("no training data: give the request ParticleData or BenchmarkData, or resume=True")
        spec = request.data.spec()
        source = _fit_box(spec)
        settings = request.settings
        if settings.precision == "bf16" and resolve_device(settings.device).type == "cpu" and not cpu_has_fast_bf16():
            log.warning("--precision bf16: this CPU has no bf16 matrix instructions (AVX512-BF16/AMX), bf16 will be slower than fp32")
        config = {"data": spec, "train": dataclasses.asdict(settings), "ctf": bool(request.ctf)}
        ddp.run_on_main(context, lambda: run.create(overwrite=request.overwrite))
    handler = _attach_log(run, request.resume) if context.is_main else None
    try:
        return _fit(request, run, preset, config, source, context)
    finally:
        if handler is not None:
            logging.getLogger("particle_vae").removeHandler(handler)
            handler.close()


def _fit_box(spec: dict):
    """Preset boxes larger than the input fall back to the input box.

    Returns the opened particle source (``None`` for benchmarks) so the data
    pipeline does not read every stack header a second time."""
    if spec["kind"] != "particles":
        return None
    from particle_vae.data.preprocess import Preprocessing
    from particle_vae.data.sources import open_source

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


def _fit(request: TrainRequest, run, preset: dict, config: dict, source, context) -> TrainResult:
    from particle_vae.engine import distributed as ddp
    from particle_vae.engine.data import prepare_data
    from particle_vae.engine.trainer import Trainer, TrainSettings, seed_everything
    from particle_vae.models import MODELS, build_model

    if request.preset and not request.resume:
        log.info("preset %s sets: %s", request.preset, {k: v for k, v in preset.items() if v})
        fields_of_model = {item.name for item in dataclasses.fields(MODELS[request.model].config_class)}
        taken = fields_of_model | set(MODELS[request.model].preset_fields.values())
        left_out = [name for name in preset.get("model", {}) if name not in taken]
        if left_out:
            log.info("preset %s: model %s has no setting %s (left out)", request.preset, request.model, ", ".join(left_out))
    settings = TrainSettings(**config["train"])
    prepared = prepare_data(config["data"], source=source, num_workers=settings.num_workers, context=context)
    for line in prepared.steps:
        log.info("data: %s", line)
    seed_everything(settings.seed)
    if not request.resume:
        if request.model not in MODELS:
            raise ParticleVAEError(f"unknown model {request.model!r}; models: {', '.join(sorted(MODELS))}")
        cls = MODELS[request.model]
        model_settings = dict(request.model_settings)
        if prepared.class_values is not None and cls.supports_labels:
            model_settings["n_classes"] = len(prepared.class_values)
        try:
            model = build_model({"model": request.model, **cls.complete_settings(model_settings, prepared.box)})
        except ValueError as error:
            raise ParticleVAEError(f"invalid model settings: {error}") from None
        config.update(model=model.config_dict(), pixel_size=prepared.pixel_size, box=prepared.box,
                      class_values=prepared.class_values)
    else:
        model = build_model(config["model"])
    log.info("model: %s", config["model"])
    log.info("%d trainable parameters", sum(p.numel() for p in model.parameters() if p.requires_grad))
    ctf_for = ctf_provider(prepared, model) if config.get("ctf") else None
    trainer = Trainer(model, prepared.dataset, settings, run, ctf_for=ctf_for, context=context)
    if not request.resume:  # written once the trainer has accepted the settings, so a refused run leaves no config behind
        ddp.run_on_main(context, lambda: run.write_config(config))
    log.info("device %s%s; %d training and %d validation images", trainer.device,
             f" x {context.world_size} processes ({context.backend}), {settings.batch_size // context.world_size} images per "
             f"process and step" if context.distributed else "", len(trainer.train_idx), len(trainer.val_idx))
    if request.resume:
        trainer.resume()
    try:
        rows = trainer.fit()
    except KeyboardInterrupt:
        log.warning("interrupted; the last finished epoch is saved: continue with  particle-vae train --out %s --resume", run.path)
        raise
    log.info("run written to %s", run.path)
    return TrainResult(run=run.path, metrics=rows, best_val_elbo=float(trainer.best_val), model=dict(config["model"]))


def ctf_provider(prepared, model):
    """The CTF of the training likelihood for ``prepared`` data (``engine.data.PreparedData`` of a
    particle STAR) and ``model``: a function ``index (B,) -> CTF (B, N, N//2+1)`` at the model's box
    and pixel size, squared for CTF-premultiplied particles (the factor the model's projection is
    multiplied by)."""
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


def _attach_log(run, resume: bool) -> logging.Handler:
    """Copy the ``particle_vae`` log (INFO and above) into the run's ``train.log`` (appended when resuming)."""
    run.path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run.log_path, mode="a" if resume else "w", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("particle_vae").addHandler(handler)
    return handler


# --------------------------------------------------------------------------- infer

def _auto_refine() -> RefineSettings:
    from particle_vae.engine.refine import RefineSettings

    return RefineSettings(device="auto")


@dataclass
class InferRequest:
    """What :func:`infer` reads out (``particle-vae infer``).

    Attributes:
        run: run directory written by :func:`train`.
        out: output STAR; a ``.npz`` with the same numbers is written beside it.
        particles: particles to process (default: the training input).
        checkpoint: ``best`` (best validation ELBO) or ``last``.
        batch_size: particles per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        workers: DataLoader worker processes (0: read in the main process).
        stack_dir: folder the STAR's ``rlnImageName`` is relative to (default: the STAR's folder).
        pixel_size: Angstrom per input pixel (default: the STAR's, else the stack header's).
        precision: ``fp32``, or ``bf16`` autocast (latents to about 3 significant digits).
        centre: write origins that centre each particle (else the model's own origins).
        refine: pose refinement by likelihood search against class references
            (:class:`~particle_vae.engine.refine.RefineSettings`; its ``device`` ``auto`` follows
            ``device``); ``None``: write the model's own poses.
        refine_classes: class references seeded by k-means of the latents.
        refine_box: refine on particles Fourier-cropped to at most this box, pixels.
        poses_to_relion_columns: for inputs with 3D angles, write the in-plane pose into the RELION
            columns instead of ``pvaeAnglePsi``, ``pvaeOriginX/YAngst``.
        project_dir: the folder RELION runs in, which ``rlnImageName`` is written relative to
            (default: the current folder).
        overwrite: replace existing output files (never the input).
    """

    run: Path
    out: Path
    particles: Path | None = None
    checkpoint: str = "best"
    batch_size: int = 256
    device: str = "auto"
    workers: int = 0
    stack_dir: Path | None = None
    pixel_size: float | None = None
    precision: str = "fp32"
    centre: bool = True
    refine: RefineSettings | None = field(default_factory=_auto_refine)
    refine_classes: int = REFINE_CLASSES
    refine_box: int = 128
    poses_to_relion_columns: bool = False
    project_dir: Path | None = None
    overwrite: bool = False


@dataclass
class InferResult:
    """What :func:`infer` wrote.

    Attributes:
        star: the output STAR (every input column plus poses, latents ``pvaeZ1..k`` and confidences).
        npz: the ``.npz`` beside it (``theta`` radians, ``t_px`` pixels, ``z_mean``/``z_std`` ``(N, k)``, ...).
        n_particles: rows written.
    """

    star: Path
    npz: Path
    n_particles: int


def infer(request: InferRequest, context=None) -> InferResult:
    """Read out every particle with a trained run and write ``request.out`` + ``.npz`` (``particle-vae infer``).

    ``context``: as for :func:`train`; with several processes each reads out a share and rank 0 writes.

    Raises:
        ParticleVAEError: a missing run or particles, a box or pixel size that does not fit the run,
            outputs that exist (without ``overwrite``), impossible refinement settings.
    """
    import numpy as np

    from particle_vae.engine import distributed as ddp
    from particle_vae.engine.inference import infer_run

    if request.precision not in ("fp32", "bf16"):
        raise ParticleVAEError(f"precision must be fp32 or bf16, got {request.precision!r}")
    refine = request.refine
    if refine is not None:
        for name, value in (("refine.iterations", refine.iterations), ("refine.n_psi", refine.n_psi),
                            ("refine.max_shift", refine.max_shift), ("refine_classes", request.refine_classes),
                            ("refine_box", request.refine_box)):
            if value is not None and value < 1:
                raise ParticleVAEError(f"{name} must be at least 1, got {value}")
    own = context is None
    if own:
        context = ddp.init_distributed(request.device)
        if not context.is_main:
            logging.getLogger("particle_vae").setLevel(logging.WARNING)
    try:
        star, npz = infer_run(request.run, request.out, particles=request.particles, checkpoint=request.checkpoint,
                              batch_size=request.batch_size, device=request.device, num_workers=request.workers,
                              datadir=request.stack_dir, pixel_size=request.pixel_size, overwrite=request.overwrite,
                              context=context, bf16=request.precision == "bf16", centre=request.centre, refine=refine,
                              refine_classes=request.refine_classes, refine_box=request.refine_box,
                              project_dir=request.project_dir, poses_to_relion_columns=request.poses_to_relion_columns)

        def count() -> int:
            with np.load(npz) as arrays:
                return int(arrays["theta"].shape[0])

        n = ddp.run_on_main(context, count)
    finally:
        if own:
            ddp.cleanup(context)
    return InferResult(star=Path(star), npz=Path(npz), n_particles=n)


# --------------------------------------------------------------------------- analyze

@dataclass
class AnalyzeRequest:
    """What :func:`analyze` clusters and draws (``particle-vae analyze``; outputs in docs/analysis.md).

    Attributes:
        star: a STAR written by :func:`infer` (with ``pvaeZ1..k`` columns).
        out: output folder.
        run: the run that wrote the STAR: decoded cluster centres, latent traversal, training
            curves, and particles read with its preprocessing.
        checkpoint: ``best`` or ``last`` checkpoint of the run.
        method: ``kmeans``, ``gmm`` or ``ward`` for the latents (``None``: k-means, and under
            ``classes_from="auto"`` infer's refinement classes may be grouped instead).
        classes_from: ``auto``, ``latents`` or ``refinement`` (group infer's refinement classes).
        mass_tolerance: when refinement classes are grouped, the relative difference of their
            masses (infer's ``pvaeRefineClassMass``) worth one prior standard deviation of a latent
            mean (:func:`~particle_vae.analysis.clustering.merge_groups`); 0: the latents alone.
        k: number of classes, or ``"auto"``.
        k_range: ``(kmin, kmax)`` searched by ``k="auto"`` (default: 1..10, capped by the particles).
        seed: random seed of clustering, the k test and embeddings.
        tsne: also draw a t-SNE embedding.
        gallery: particles shown per class in ``gallery.png`` (0: none).
        traverse: 1-based latent dimensions (one or two) of the traversal grid (default: 1 2, or 1).
        traversal_steps: values per traversed dimension (at least 2).
        normalize: per-image normalisation of raw particles when no run is given.
        images: read particle images (class averages, gallery).
        centre: centre each class average on its centre of mass (and the particles' origins to match).
        stack_dir: folder the STAR's ``rlnImageName`` is relative to (default: the STAR's folder).
        project_dir: the folder RELION runs in, which the outputs' ``rlnImageName`` is written
            relative to (default: the current folder).
        pixel_size: Angstrom per particle pixel (default: the STAR's, else the stack header's).
        batch_size: particles read at once.
        overwrite: replace existing output files (never the input).
    """

    star: Path
    out: Path
    run: Path | None = None
    checkpoint: str = "best"
    method: str | None = None
    classes_from: str = "auto"
    mass_tolerance: float = MASS_TOLERANCE
    k: int | str = "auto"
    k_range: tuple[int, int] | None = None
    seed: int = 0
    tsne: bool = False
    gallery: int = 6
    traverse: Sequence[int] | None = None
    traversal_steps: int = 7
    normalize: str = "background"
    images: bool = True
    centre: bool = True
    stack_dir: Path | None = None
    project_dir: Path | None = None
    pixel_size: float | None = None
    batch_size: int = 256
    overwrite: bool = False


@dataclass
class AnalyzeResult:
    """What :func:`analyze` wrote.

    Attributes:
        out: the output folder.
        star: ``clustered_particles.star`` (the input with ``rlnClassNumber``, 1-based).
        record_path: ``analysis.json``.
        k: number of classes.
        counts: ``(k,)`` particles per class.
        labels: ``(N,)`` int class of each particle, 0-based, in STAR order.
        outputs: output name (as in ``analysis.json``'s ``outputs``) -> path of every file written.
        record: the contents of ``analysis.json``.
    """

    out: Path
    star: Path
    record_path: Path
    k: int
    counts: list[int]
    labels: Any
    outputs: dict[str, Path]
    record: dict


def analyze(request: AnalyzeRequest) -> AnalyzeResult:
    """Cluster the latents of an inferred STAR; write class averages, plots and a record (``particle-vae analyze``).

    Raises:
        InputFileError: a missing STAR or run, a STAR without latent columns.
        ParticleVAEError: settings that do not fit the data (``k`` above the particles, a run of
            another latent size, ...), outputs that exist (without ``overwrite``).
    """
    from particle_vae.analysis.pipeline import run_analysis

    return run_analysis(request)
