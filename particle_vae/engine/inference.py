"""Inference: per-particle pose and latent readout, and writing them to STAR.

Output columns (added to, or replacing those of, the input STAR):

* ``rlnAnglePsi`` (degrees), ``rlnOriginXAngst``, ``rlnOriginYAngst``
  (Angstrom): the in-plane pose in RELION's convention, through
  :func:`particle_vae.conventions.model_pose_to_relion`; Angstrom values do
  not depend on the model's (possibly downsampled) box. The generator is free
  to draw its object anywhere in the box at pose zero (the translation prior
  only loosely ties it to the centre; trained models draw it a few pixels
  off), and the model's own origins align each particle onto that drawing. By
  default the origins are centred instead: the particles aligned with the
  model's pose are averaged per group of latents and each group is moved so
  that its average's centre of mass is on the box centre (:func:`data_centres`),
  which is what RELION expects of an origin. The ``.npz`` keeps the model's
  own pose (``theta``, ``t_px``) and the shift applied (``centre_px``).
  When the input has 3D angles (``rlnAngleRot``/``rlnAngleTilt``, a 3D
  refinement), its RELION pose columns are written back as they were, byte
  for byte, and the in-plane pose goes to ``pvaeAnglePsi``,
  ``pvaeOriginXAngst``, ``pvaeOriginYAngst`` instead
  (:func:`pose_target_columns`; ``--poses-to-relion-columns``: into the
  RELION columns).
* ``rlnImageName``: resolves from the project folder (the folder RELION runs
  in; ``--project-dir``, default the current folder), absolute for stacks
  outside it (:mod:`particle_vae.io.paths`).
* ``pvaeZ1..k`` and ``pvaeZStd1..k``: latent posterior mean and std.
* ``pvaePoseConfidence`` (max q(t, r)) and ``pvaeRotationEntropy`` (nats) for
  TARGET-VAE; other models add their own ``pvae*`` readouts.

Under torchrun (several processes, see :mod:`particle_vae.engine.distributed`)
every rank reads out one contiguous share of the particles; rank 0 gathers the
shares in rank order, which is input order, and alone writes the STAR and the
``.npz``.

The STAR and the ``.npz`` are written as a pair (:mod:`particle_vae.io.infer_pair`):
a kill leaves the old pair or the new one, or, between the two renames, the old
STAR beside the new ``.npz``, which readers recognise and report.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from particle_vae.analysis.pipeline import LOW_RES_CLASS_COLUMN, REFINE_CLASS_COLUMN, REFINE_MASS_COLUMN
from particle_vae.conventions import model_pose_to_relion
from particle_vae.data.particles import IndexSubset
from particle_vae.data.sampling import make_loader
from particle_vae.engine import distributed as ddp
from particle_vae.engine.data import PreparedData, prepare_data
from particle_vae.engine.distributed import SINGLE, DistContext
from particle_vae.engine.presets import REFINE_CLASSES, REFINE_PARTICLES_PER_CLASS
from particle_vae.engine.run import RunDirectory
from particle_vae.errors import InputFileError, ParticleVAEError
from particle_vae.io.atomic import check_output_path
from particle_vae.io.infer_pair import write_pair
from particle_vae.io.star import ParticleStar, image_name, make_particle_star
from particle_vae.models import PoseVAE, build_model
from particle_vae.models.base import load_learnable_state

log = logging.getLogger(__name__)

#: readout ``extra`` key -> STAR column
EXTRA_COLUMNS = {"pose_confidence": "pvaePoseConfidence", "rotation_entropy": "pvaeRotationEntropy"}


def load_model(run: RunDirectory, checkpoint: str = "best", device: torch.device | None = None) -> tuple[PoseVAE, dict]:
    """Rebuild a trained model from its run directory (eval mode).

    Args:
        checkpoint: ``"best"`` (best validation ELBO) or ``"last"``.
    Returns:
        ``(model, run config)``.
    """
    config = run.read_config()
    model = build_model(config["model"])
    state = run.load_checkpoint(checkpoint)
    try:
        load_learnable_state(model, state["model"])
    except KeyError as error:
        raise ParticleVAEError(f"{run.path}: the checkpoint does not fit the model in config.json ({error.args[0]}); retrain the run") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, config


@dataclass
class InferenceResult:
    """Per-particle outputs in input order.

    Attributes:
        theta: ``(N,)`` radians; t: ``(N, 2)`` pixels of the model box
            (generator convention); z_mean, z_std: ``(N, k)``; extra: name -> ``(N,)``.
    """

    theta: np.ndarray
    t: np.ndarray
    z_mean: np.ndarray
    z_std: np.ndarray
    extra: dict[str, np.ndarray]


@torch.no_grad()
def run_inference(model: PoseVAE, prepared: PreparedData, batch_size: int = 256, device: torch.device | None = None,
                  num_workers: int = 0, context: DistContext | None = None, bf16: bool = False) -> InferenceResult | None:
    """Read out every particle of ``prepared.dataset`` in input order.

    ``bf16`` runs the encoder under bf16 autocast (2-3 times faster on GPUs and on
    CPUs with bf16 instructions; poses are still assembled in float32, latent
    means carry about three significant digits).

    With several ranks each reads out its contiguous share
    (:func:`~particle_vae.engine.distributed.shard_bounds`) and the shares are
    gathered on rank 0, which returns the whole result; other ranks return ``None``.
    """
    context = context or SINGLE
    device = device or torch.device("cpu")
    model.to(device).eval()
    dataset = prepared.dataset
    if context.distributed:
        start, stop = ddp.shard_bounds(len(dataset), context)
        dataset = IndexSubset(dataset, np.arange(start, stop, dtype=np.int64))
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    parts: dict[str, list] = {"theta": [], "t": [], "z_mean": [], "z_std": []}
    extras: dict[str, list] = {}
    for batch in tqdm(loader, desc="inference", unit="batch", disable=None if context.is_main else True, leave=False):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.readout(batch["images"].to(device, non_blocking=True))
        for key in parts:
            parts[key].append(getattr(out, key).float().cpu().numpy())
        for key, value in out.extra.items():
            extras.setdefault(key, []).append(value.float().cpu().numpy())
    local = {"parts": parts, "extras": extras}
    shards = ddp.gather_to_main(context, local)
    if shards is None:
        return None
    shards = [shard for shard in shards if shard["parts"]["theta"]]  # a rank may have had no particles
    if not shards:
        raise ParticleVAEError("no particles to read out")
    joined = {key: np.concatenate([a for shard in shards for a in shard["parts"][key]]) for key in parts}
    extra_keys = list(shards[0]["extras"])
    extra = {key: np.concatenate([a for shard in shards for a in shard["extras"][key]]) for key in extra_keys}
    return InferenceResult(extra=extra, **joined)


def original_class_values(predicted: np.ndarray, class_values: list) -> np.ndarray:
    """Map 1-based class indices (into the sorted label values seen in training)
    back to the label values themselves, e.g. index 1 of {3, 5} -> 3; non-numeric
    label values keep the index."""
    try:
        values = np.asarray([float(v) for v in class_values])
    except (TypeError, ValueError):
        return predicted
    return values[np.asarray(predicted, dtype=np.int64) - 1]


def latent_groups(z: np.ndarray, groups: int, seed: int = 0) -> np.ndarray:
    """k-means groups of latent means: ``(N,)`` int64 labels ``0 .. k-1`` with every label used,
    ``k <= groups``; one group when there is a single particle or no latent dimension.

    Args:
        z: ``(N, k)`` latent means.
    """
    from particle_vae.analysis.clustering import fit_clusters

    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    k = min(groups, len(z))
    if not z.shape[1] or k < 2:
        return np.zeros(len(z), dtype=np.int64)
    labels = fit_clusters(z, k, "kmeans", seed=seed).labels
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


def data_centres(prepared: PreparedData, z: np.ndarray | None, psi_deg: np.ndarray | None, origin_angst: np.ndarray | None,
                 pixel_size: float, groups: int = 8, seed: int = 0, num_workers: int = 0,
                 context: DistContext | None = None) -> np.ndarray | None:
    """Where the particles, aligned with their pose, have their centre of mass, per group of latents.

    The particles are split into up to ``groups`` k-means groups of their
    latents (groups of similar particles, whose aligned average is sharp); each
    group's aligned average (as ``particle-vae analyze`` makes it) gives the
    centre of mass of its positive part
    (:func:`~particle_vae.analysis.averages.centre_averages`).

    Args:
        prepared: the particles (at the model's box), ``index`` = row.
        z: ``(N, k)`` latent means; psi_deg ``(N,)`` and origin_angst ``(N, 2)``: the poses to align with
            (needed on rank 0 only; other ranks pass ``None``).
        pixel_size: Angstrom per pixel of the particles.
        num_workers: reader processes for the pass over the particles.
        context: with several ranks each averages a contiguous share of the particles and the
            sums are added up, so that no rank reads them all.
    Returns:
        ``(N, 2)`` float64 ``(x, y)`` pixels from pixel ``box // 2``, in the aligned frame, on
        rank 0 (``None`` on the other ranks).
    """
    from particle_vae.analysis.averages import ClassAverages, centre_averages, class_averages

    context = context or SINGLE
    plan = None
    if context.is_main:
        plan = (latent_groups(z, groups, seed), np.asarray(psi_deg, dtype=np.float64), np.asarray(origin_angst, dtype=np.float64))
    labels, psi_deg, origin_angst = ddp.broadcast_object(context, plan) if context.distributed else plan
    k = int(labels.max()) + 1
    start, stop = ddp.shard_bounds(len(labels), context)
    box = prepared.box
    sums, counts = torch.zeros((k, box, box), dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    if stop > start:
        share = IndexSubset(prepared.dataset, np.arange(start, stop, dtype=np.int64)) if context.distributed else prepared.dataset
        part = class_averages(share, labels, k, (psi_deg, origin_angst), pixel_size, gallery_size=0, num_workers=num_workers)
        counts = torch.as_tensor(part.counts, dtype=torch.float64)
        sums = torch.as_tensor(part.averages, dtype=torch.float64) * counts[:, None, None]
    total = ddp.all_reduce_sum(context, torch.cat([sums.reshape(-1), counts]))
    if not context.is_main:
        return None
    counts = total[-k:]
    averages = (total[:-k].reshape(k, box, box) / counts.clamp_min(1.0)[:, None, None]).numpy().astype(np.float32)
    gathered = ClassAverages(averages=averages, counts=counts.numpy().astype(np.int64), aligned=True,
                             gallery=np.zeros((k, 0, box, box), dtype=np.float32), gallery_index=np.zeros((k, 0), dtype=np.int64))
    return centre_averages(gathered)[labels]


def result_columns(result: InferenceResult, pixel_size: float, pose: bool = True,
                   centres_px: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """STAR columns for a result; ``pixel_size`` is Angstrom per *model* pixel.
    ``pose=False`` (models without a pose) leaves the pose columns out;
    ``centres_px`` ``(N, 2)`` (:func:`data_centres`) centres the origins."""
    columns = {}
    if pose:
        psi, origin_x, origin_y = model_pose_to_relion(result.theta, result.t, pixel_size)
        if centres_px is not None:
            from particle_vae.analysis.averages import recentred_origins

            origin_x, origin_y = recentred_origins(psi, np.stack([origin_x, origin_y], 1), np.arange(len(psi)),
                                                   centres_px, pixel_size).T
        columns = {"rlnAnglePsi": np.round(psi, 6), "rlnOriginXAngst": np.round(origin_x, 6), "rlnOriginYAngst": np.round(origin_y, 6)}
    for i in range(result.z_mean.shape[1]):
        columns[f"pvaeZ{i + 1}"] = np.round(result.z_mean[:, i].astype(np.float64), 7)
    for i in range(result.z_std.shape[1]):
        columns[f"pvaeZStd{i + 1}"] = np.round(result.z_std[:, i].astype(np.float64), 7)
    for key, value in result.extra.items():
        columns[EXTRA_COLUMNS.get(key, "pvae" + "".join(p.title() for p in key.split("_")))] = np.round(value.astype(np.float64), 7)
    return columns


#: RELION's in-plane pose columns, as infer writes them for 2D inputs
RELION_POSE_COLUMNS = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
#: where infer writes the in-plane pose instead when the input holds a 3D refinement
PVAE_POSE_COLUMNS = ("pvaeAnglePsi", "pvaeOriginXAngst", "pvaeOriginYAngst")
#: input columns whose presence marks 3D angles (a 3D refinement or 3D classification)
ANGLES_3D = ("rlnAngleRot", "rlnAngleTilt")
#: prefixes of the RELION pose columns (angles, origins and their priors) kept as written when infer does not write them
RELION_POSE_PREFIXES = ("rlnAngle", "rlnOrigin")


def has_3d_angles(star: ParticleStar | None) -> bool:
    """Whether a particle STAR carries 3D angles (``rlnAngleRot`` or ``rlnAngleTilt``)."""
    return star is not None and any(name in star.particles.columns for name in ANGLES_3D)


def pose_target_columns(star: ParticleStar | None, to_relion: bool = False) -> tuple[str, str, str]:
    """Where infer writes its in-plane pose (psi in degrees, origins in Angstrom), with one log line for 3D inputs.

    A 2D input (no ``rlnAngleRot``/``rlnAngleTilt``) gets :data:`RELION_POSE_COLUMNS`; an input with 3D
    angles keeps its RELION pose columns, and the pose goes to :data:`PVAE_POSE_COLUMNS`, unless
    ``to_relion`` (``--poses-to-relion-columns``).
    """
    if not has_3d_angles(star):
        return RELION_POSE_COLUMNS
    if to_relion:
        log.info("the input has 3D angles (%s): the in-plane pose goes into %s as asked (--poses-to-relion-columns), "
                 "beside the input's rlnAngleRot/rlnAngleTilt, which are kept",
                 "/".join(n for n in ANGLES_3D if n in star.particles.columns), ", ".join(RELION_POSE_COLUMNS))
        return RELION_POSE_COLUMNS
    log.info("the input has 3D angles (%s): its RELION pose columns are kept as they are and the in-plane pose goes to %s "
             "(--poses-to-relion-columns: into %s instead)", "/".join(n for n in ANGLES_3D if n in star.particles.columns),
             ", ".join(PVAE_POSE_COLUMNS), ", ".join(RELION_POSE_COLUMNS))
    return PVAE_POSE_COLUMNS


def pose_columns_renamed(columns: dict[str, np.ndarray], target: tuple[str, str, str]) -> dict[str, np.ndarray]:
    """``columns`` with :data:`RELION_POSE_COLUMNS` renamed to ``target`` (same order, values untouched)."""
    names = dict(zip(RELION_POSE_COLUMNS, target))
    return {names.get(name, name): values for name, values in columns.items()}


def verbatim_column_text(star_path: Path, block: str, names: list[str], rows: int) -> dict[str, np.ndarray]:
    """The text of columns ``names`` of loop ``block`` exactly as written in the STAR file.

    Returns:
        name -> ``(rows,)`` object array of strings; ``{}`` (with a warning, the values
        are then written in their shortest exact form) when the file changed since it was read.
    """
    from particle_vae.io.star import read_star

    if not names:
        return {}
    blocks = read_star(star_path, text_columns=names).blocks
    table = blocks.get(block)
    if not isinstance(table, pd.DataFrame) or len(table) != rows or not all(name in table.columns for name in names):
        log.warning("%s: the pose columns are rewritten in their shortest form (same values): the file changed since it was read",
                    star_path)
        return {}
    return {name: table[name].astype(str).to_numpy(dtype=object) for name in names}


def kept_pose_text(star: ParticleStar, written: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For a STAR with 3D angles (:func:`has_3d_angles`, a refinement's pose), its RELION pose columns
    (angles, origins, priors; 3.0 and 3.1 names) that are not in ``written``, as their original text,
    so that they are written back byte for byte; ``{}`` for other STARs (their values are written in
    the shortest form that reads back the same, which spares reading the file again).

    RELION 3.0 origins in pixels (``rlnOriginX/Y``) are kept beside the Angstrom ones of the 3.1
    output, which RELION 3.1 reads (it ignores the pixel ones); they are left out when ``written``
    has ``rlnOriginXAngst/YAngst``, since they would then disagree.
    """
    if not has_3d_angles(star):
        return {}
    names = [str(name) for name in star.particles.columns if str(name).startswith(RELION_POSE_PREFIXES) and name not in written]
    if "rlnOriginXAngst" in written:
        names = [name for name in names if name not in ("rlnOriginX", "rlnOriginY", "rlnOriginZ")]
    if not names or star.path is None:
        return {}
    text = verbatim_column_text(star.path, star.particles_block, names, len(star))
    for name, values in text.items():  # the text must still be what is in memory (the file may have changed)
        try:
            same = np.allclose(values.astype(np.float64), star.particles[name].to_numpy(dtype=np.float64), rtol=1e-12, atol=0.0,
                               equal_nan=True)
        except (TypeError, ValueError):
            same = np.array_equal(values, star.particles[name].astype(str).to_numpy(dtype=object))
        if not same:
            log.warning("%s: the pose columns are rewritten in their shortest form: %s differs from the file's text",
                        star.path, name)
            return {}
    return text


def output_star(prepared: PreparedData, columns: dict[str, np.ndarray], out_path: Path,
                project: Path | None = None) -> ParticleStar:
    """The input STAR (made RELION 3.1) with ``columns`` added, or a new STAR for stacks.

    ``rlnImageName`` resolves from ``project`` (the folder RELION runs in; default: the current
    folder, :mod:`particle_vae.io.paths`). When the input has 3D angles, its RELION pose columns that
    ``columns`` does not replace are written with their original text (:func:`kept_pose_text`).
    """
    from particle_vae.io.paths import project_folder, project_names_for_source, stack_name_for_project

    source = prepared.source
    if source is None:
        raise ParticleVAEError("inference needs particles on disk: pass --particles (e.g. a set written by make-benchmark)")
    project = project_folder(project)
    if source.star is not None:
        star = source.star.to_relion31(pixel_size=source.pixel_size, image_size=source.box)
        kept = kept_pose_text(source.star, columns)
        return star.with_columns({**project_names_for_source(source, project), **kept, **columns})
    if source.pixel_size is None:
        raise ParticleVAEError(f"{source.path}: no pixel size known; pass --pixel-size")
    stacks = [stack_name_for_project(path, project) for path in source.stack_paths]
    names = [image_name(int(i), stacks[int(s)]) for s, i in zip(source.stack_index, source.image_index)]
    return make_particle_star(names, source.pixel_size, source.box, columns=columns)


#: STAR columns of the refined pose (besides rlnAnglePsi and rlnOriginXAngst/YAngst)
REFINE_COLUMNS = {"psi_std_deg": "pvaeAnglePsiStd", "probability": "pvaePoseProbability",
                  "class_probability": "pvaeRefineClassProbability"}


def refine_from_readout(prepared: PreparedData, result: InferenceResult, model_apix: float, settings,
                        classes: int = REFINE_CLASSES, max_box: int = 128, seed: int = 0):
    """Likelihood pose refinement (:mod:`particle_vae.engine.refine`) seeded by a readout.

    The particles are read again at their own box (Fourier-cropped to at most
    ``max_box`` pixels), not at the model's, so that the poses use all the
    resolution the data have; the seeds are k-means groups of the latent means
    (``classes`` of them) and the model's own poses. The CTF comes from the
    STAR's CTF columns when it has them.

    Returns:
        ``(RefineResult, pixel size of the refined images in Angstrom)``.
    """
    from particle_vae.data.particles import ParticleDataset
    from particle_vae.data.preprocess import Preprocessing
    from particle_vae.engine.refine import refine_poses

    source = prepared.source
    if source.pixel_size is None:
        raise ParticleVAEError(f"{source.path}: no pixel size known; pass --pixel-size")
    target = min(source.box, max_box)
    target -= target % 2
    prep = Preprocessing(box=source.box, pixel_size=source.pixel_size, target_box=target if target < source.box else None,
                         normalize="background")
    dataset = ParticleDataset(source, transform=prep)
    apix = prep.output_pixel_size
    table = None
    if source.star is not None and source.star.column("rlnDefocusU") is not None:
        try:
            table = source.star.ctf_parameters()
        except InputFileError as incomplete:
            # the poses are still worth refining; without the CTF they are less exact at high defocus
            log.warning("%s; the pose refinement runs without the CTF", incomplete)
    z = result.z_mean
    labels = latent_groups(z, max(1, min(classes, len(z) // REFINE_PARTICLES_PER_CLASS)), seed)
    psi, origin_x, origin_y = model_pose_to_relion(result.theta, result.t, model_apix)
    log.info("pose refinement: %d particles of %d px at %.3g A/px, %d classes seeded by the latents, %s CTF, %d iterations",
             len(z), target, apix, int(labels.max()) + 1, "with the" if table is not None else "no", settings.iterations)
    refined = refine_poses(dataset, table, apix, labels, psi, np.stack([origin_x, origin_y], 1) / apix, settings)
    return refined, apix


def frames_of_the_model(refined, refined_apix: float, model: PoseVAE, z_mean: np.ndarray, model_apix: float):
    """The refined classes turned into one frame, the generator's (:func:`~particle_vae.engine.refine.register_frames`).

    Class references that match each other after a turn are turned onto each
    other; each such group is then turned onto the generator's drawings at pose
    zero of its classes' mean latents (centred on their centre of mass,
    resampled to the refinement's pixel grid), weighted by the classes' sizes.

    Args:
        refined: :class:`~particle_vae.engine.refine.RefineResult`; refined_apix: its pixel size, Angstrom.
        z_mean: ``(M, k)`` latent means of the particles; model_apix: the model's pixel size, Angstrom.
    Returns:
        the :class:`~particle_vae.engine.refine.RefineResult` with turned angles and references.
    """
    from particle_vae.analysis.averages import decode_centred
    from particle_vae.engine.refine import apply_registration, register_frames, resample_image

    k, box = refined.references.shape[0], refined.references.shape[-1]
    z = np.asarray(z_mean, dtype=np.float64).reshape(len(refined.classes), -1)
    counts = np.bincount(refined.classes, minlength=k)
    if z.shape[1] == 0 or k < 1:
        return refined
    means = np.stack([np.bincount(refined.classes, weights=z[:, d], minlength=k) for d in range(z.shape[1])], 1)
    means /= np.maximum(counts, 1)[:, None]
    drawings = np.stack([resample_image(d, model_apix, box, refined_apix) for d in decode_centred(model, means)])
    registration = register_frames(refined.references, drawings, weights=counts)
    groups = int(registration.group.max()) + 1
    log.info("pose refinement: the %d classes in %d group(s) of matching references, each group turned onto the generator's "
             "drawings (mean correlation of the anisotropic parts per class: %s)", k, groups,
             " ".join(f"{c:.2f}" for c in registration.drawing_correlation))
    return apply_registration(refined, registration)


def infer_run(run_path: Path, out_path: Path, particles: Path | None = None, checkpoint: str = "best", batch_size: int = 256,
              device: str = "auto", num_workers: int = 0, datadir: Path | None = None, pixel_size: float | None = None,
              overwrite: bool = False, context: DistContext | None = None, bf16: bool = False,
              centre: bool = True, refine=None, refine_classes: int = REFINE_CLASSES, refine_box: int = 128,
              project_dir: Path | None = None, poses_to_relion_columns: bool = False) -> tuple[Path, Path]:
    """Load a run, read out every particle and write ``out_path`` (STAR) and a ``.npz`` beside it
    (``bf16``: see :func:`run_inference`; ``centre``: centred origins, see the module docstring).

    ``project_dir``: the folder the output's ``rlnImageName`` resolves from (default: the current
    folder). An input with 3D angles keeps its RELION pose columns and gets the in-plane pose in
    :data:`PVAE_POSE_COLUMNS`, unless ``poses_to_relion_columns`` (:func:`pose_target_columns`).

    ``refine``: :class:`~particle_vae.engine.refine.RefineSettings` to refine the poses by
    likelihood search against class references seeded by the readout (:func:`refine_from_readout`,
    ``refine_classes`` seed classes, images at most ``refine_box`` pixels); the refined poses are
    written to the RELION columns, the model's own stay in the ``.npz``. ``None``: no refinement.

    With several ranks (``context``), each reads out a share and rank 0 writes
    the files; every rank returns the same paths.

    Returns:
        ``(star path, npz path)``.
    """
    context = context or SINGLE
    run = RunDirectory(run_path)
    torch_device = ddp.device_for(context, device)
    model, config = load_model(run, checkpoint, torch_device)
    spec = dict(config["data"])
    spec.pop("cache", None)  # inference reads the particles themselves (exact values, any --particles)
    if spec["kind"] == "benchmark":
        if particles is None:
            raise ParticleVAEError("this run was trained on a generated benchmark: pass --particles with a STAR from make-benchmark")
        spec = {"kind": "particles", "path": str(particles), "datadir": None, "pixel_size": None,
                "preprocessing": {"normalize": "none"}}
    if datadir is not None:
        spec["datadir"] = str(datadir)
    if pixel_size is not None:
        spec["pixel_size"] = pixel_size
    inputs = tuple(p for p in (particles, spec.get("path")) if p is not None)
    if project_dir is not None:
        from particle_vae.io.paths import project_folder

        project_dir = project_folder(project_dir)  # a wrong folder fails before any work
    out_path, npz_path = ddp.run_on_main(context, lambda: (
        check_output_path(out_path, overwrite=overwrite, inputs=inputs),
        check_output_path(Path(out_path).with_suffix(".npz"), overwrite=overwrite, inputs=inputs)))
    prepared = prepare_data(spec, path_override=particles)
    if prepared.box != model.box:
        raise ParticleVAEError(
            f"{prepared.source.path}: preprocessing gives {prepared.box} px images but the model expects {model.box} px; "
            "use particles with the training box size"
        )
    model_apix = prepared.pixel_size if prepared.pixel_size is not None else config.get("pixel_size")
    if model_apix is None:
        raise ParticleVAEError(f"{prepared.source.path}: no pixel size known; pass --pixel-size")
    if context.is_main:
        for line in prepared.steps:
            log.info("data: %s", line)
    result = run_inference(model, prepared, batch_size=batch_size, device=torch_device, num_workers=num_workers, context=context,
                           bf16=bf16)

    refined = None
    if refine is not None and model.has_pose and context.is_main:
        if refine.device == "auto":
            refine = dataclasses.replace(refine, device=str(torch_device))
        refined, refined_apix = refine_from_readout(prepared, result, model_apix, refine, classes=refine_classes,
                                                    max_box=refine_box)
        refined = frames_of_the_model(refined, refined_apix, model, result.z_mean, model_apix)
    centres = None
    if centre and model.has_pose and refine is None:
        # every rank averages a share of the particles; rank 0 (which holds the result) plans the groups
        z = psi = origin = None
        if context.is_main:
            psi, origin_x, origin_y = model_pose_to_relion(result.theta, result.t, model_apix)  # the model's own pose
            z, origin = result.z_mean, np.stack([origin_x, origin_y], 1)
        centres = data_centres(prepared, z, psi, origin, model_apix, num_workers=num_workers, context=context)
        if centres is not None:
            log.info("origins centred on the aligned particles of each latent group: moved by %.2f px on average "
                     "(--no-center: not)", float(np.hypot(*centres.T).mean()))

    def write() -> None:
        from particle_vae.engine.refine import class_masses

        if "predicted_class" in result.extra and config.get("class_values"):
            result.extra["predicted_class"] = original_class_values(result.extra["predicted_class"], config["class_values"])
        columns = result_columns(result, model_apix, pose=model.has_pose, centres_px=centres)
        refined_arrays = {}
        if refined is not None:
            columns["rlnAnglePsi"] = np.round(refined.psi_deg, 6)
            columns["rlnOriginXAngst"] = np.round(refined.origin_px[:, 0] * refined_apix, 6)
            columns["rlnOriginYAngst"] = np.round(refined.origin_px[:, 1] * refined_apix, 6)
            for key, name in REFINE_COLUMNS.items():
                columns[name] = np.round(getattr(refined, key).astype(np.float64), 6)
            columns[REFINE_CLASS_COLUMN] = refined.classes + 1
            masses = class_masses(refined.references, refined_apix)
            columns[REFINE_MASS_COLUMN] = np.round(masses[refined.classes], 3)
            refined_arrays = {"refine_classes": refined.classes, "refine_references": refined.references, "refine_class_mass": masses,
                              "refine_pixel_size": refined_apix, "refine_psi_std_deg": refined.psi_std_deg}
            if refined.low_res_classes is not None:
                columns[LOW_RES_CLASS_COLUMN] = refined.low_res_classes + 1
                refined_arrays["refine_low_res_classes"] = refined.low_res_classes
        star_in = prepared.source.star if prepared.source is not None else None
        columns = pose_columns_renamed(columns, pose_target_columns(star_in, poses_to_relion_columns))
        star = output_star(prepared, columns, out_path, project_dir)
        extra_arrays = {} if centres is None else {"centre_px": centres}
        arrays = dict(theta=result.theta, t_px=result.t, z_mean=result.z_mean, z_std=result.z_std, pixel_size=model_apix,
                      **{f"extra_{k}": v for k, v in result.extra.items()}, **extra_arrays, **refined_arrays,
                      **{k: v for k, v in columns.items() if k.startswith("rln") or k in PVAE_POSE_COLUMNS})
        write_pair(star.star, out_path, arrays, npz_path)  # the .npz, then the STAR: never a STAR beside an older .npz
        log.info("wrote %s (%d particles%s) and %s", out_path, len(result.theta),
                 f", read out by {context.world_size} processes" if context.distributed else "", npz_path)

    ddp.run_on_main(context, write)
    return out_path, npz_path
