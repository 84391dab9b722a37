"""The analysis of an inferred STAR, step by step (:func:`particle_vae.api.analyze`, ``particle-vae analyze``).

:func:`run_analysis` reads the latents (:func:`read_latents`), loads the run when
given (:func:`load_run`), names every output before any work
(:func:`output_paths`), clusters (:func:`cluster`), averages the particle images
per class (:func:`class_images`), then writes the clustered STAR
(:func:`write_clustered_star`), the class averages and decoded centres
(:func:`write_class_images`), the plots (:func:`write_plots`) and the record
``analysis.json`` (:func:`analysis_record`). Output files: docs/analysis.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from particle_vae.engine.presets import MASS_TOLERANCE
from particle_vae.errors import InputFileError, ParticleVAEError

log = logging.getLogger(__name__)

#: infer's columns of the pose refinement: each particle's class (1-based) and that class's mass
#: (:func:`~particle_vae.engine.refine.class_masses`)
REFINE_CLASS_COLUMN = "pvaeRefineClass"
REFINE_MASS_COLUMN = "pvaeRefineClassMass"
#: infer's class that fits each particle best at low resolution (engine.refine, "structure decision")
LOW_RES_CLASS_COLUMN = "pvaeLowResClass"

#: request field -> the values it takes
CHOICES = {"method": ("kmeans", "gmm", "ward"), "classes_from": ("auto", "latents", "refinement"),
           "normalize": ("background", "zscore", "minmax", "none"), "checkpoint": ("best", "last")}


@dataclass
class Clusters:
    """What :func:`cluster` found.

    Attributes:
        result: the :class:`~particle_vae.analysis.clustering.ClusterResult` (``labels`` ``(N,)``
            0-based, ``centres`` ``(k, zdim)``, ``counts`` ``(k,)``).
        k: number of classes.
        selection: the ``k="auto"`` choice (``None`` for a given k).
        by_refinement: infer's refinement classes were grouped instead of the latents.
        n_refined: number of refinement classes in the STAR (0 without the column).
        criterion: the score of the classes (``silhouette``, ``bic``, ...); scores: k -> its value.
    """

    result: Any
    k: int
    selection: Any
    by_refinement: bool
    n_refined: int
    criterion: str
    scores: dict

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` int class of each particle, 0-based."""
        return self.result.labels


@dataclass
class ClassImages:
    """What :func:`class_images` computed (all ``None`` when no images are read).

    Attributes:
        prepared: the particle images (``analysis.averages.particle_images``).
        averages: the class averages (``analysis.averages.class_averages``).
        pixel_size: Angstrom per pixel of the images.
        centre_shifts: ``(k, 2)`` pixels each average was moved by to centre it (``None``: not centred).
        recentred: ``(N, 2)`` the particles' origins after centring, Angstrom (``None``: not centred).
    """

    prepared: Any = None
    averages: Any = None
    pixel_size: float | None = None
    centre_shifts: np.ndarray | None = None
    recentred: np.ndarray | None = None


def run_analysis(request):
    """Run every step for ``request`` (a :class:`particle_vae.api.AnalyzeRequest`); returns a
    :class:`particle_vae.api.AnalyzeResult`."""
    from particle_vae.api import AnalyzeResult
    from particle_vae.io.atomic import atomic_write_text
    from particle_vae.io.infer_pair import check_pair
    from particle_vae.io.paths import project_folder

    started = time.time()
    check_request(request)
    star_path = Path(request.star)
    run_path = None if request.run is None else Path(request.run)
    check_inputs(star_path, run_path)
    project = project_folder(request.project_dir)
    missing_npz = check_pair(star_path, allow_missing_npz=True)  # a STAR beside another infer run's .npz is refused
    if missing_npz:
        log.warning("%s; analyze goes on with the STAR alone", missing_npz)
    star, columns, z = read_latents(star_path)
    n = len(z)
    if request.k != "auto" and not 1 <= request.k <= n:
        raise ParticleVAEError(f"{star_path}: --k {request.k} is {'larger than the number of particles' if request.k > n else 'below 1'} "
                               f"({n}); choose 1 <= k <= {n} or --k auto")
    if request.gallery < 0 or request.traversal_steps < 2 or request.batch_size < 1:
        raise ParticleVAEError("--gallery must be >= 0, --traversal-steps >= 2 and --batch-size >= 1")
    if not (np.isfinite(request.mass_tolerance) and request.mass_tolerance >= 0):
        raise ParticleVAEError(f"--mass-tolerance {request.mass_tolerance} must be a number >= 0 (0: group by the latents alone)")
    log.info("%s: %d particles, latent columns %s", star_path, n, ", ".join(columns))

    model = config = metrics = None
    if run_path is not None:
        model, config, metrics = load_run(run_path, request.checkpoint, star_path, columns)
    dims = tuple(range(min(2, len(columns)))) if request.traverse is None else tuple(d - 1 for d in request.traverse)
    if model is not None and (len(dims) > 2 or len(set(dims)) != len(dims) or any(not 0 <= d < len(columns) for d in dims)):
        raise ParticleVAEError(f"--traverse takes one or two different latent dimensions between 1 and {len(columns)}")

    poses_in_star = _poses(star, star_path, None) is not None
    paths = output_paths(request, star_path, poses_in_star, model is not None, bool(metrics))
    clusters = cluster(request, star, star_path, z)
    images = class_images(request, star, star_path, clusters, model, config) if request.images else ClassImages()
    write_clustered_star(request, star, star_path, project, clusters, images, paths["star"])
    written = {"star": paths["star"]}
    written.update(write_class_images(request, star, project, columns, clusters, images, model, config, paths))
    written.update(write_plots(request, star, star_path, run_path, z, clusters, model, metrics, dims, poses_in_star, paths))

    record = analysis_record(request, star_path, run_path, columns, clusters, images, config, written)
    record["outputs"]["record"] = paths["record"].name
    record["runtime_s"] = round(time.time() - started, 3)
    atomic_write_text(paths["record"], json.dumps(record, indent=2) + "\n")
    log.info("wrote %s; analysis finished in %.1f s", paths["record"], record["runtime_s"])
    return AnalyzeResult(out=Path(request.out), star=paths["star"], record_path=paths["record"], k=clusters.k,
                         counts=[int(c) for c in clusters.result.counts], labels=clusters.labels,
                         outputs={**written, "record": paths["record"]}, record=record)


def check_request(request) -> None:
    """One-line errors for request values the command line's choices would have refused."""
    for name, choices in CHOICES.items():
        value = getattr(request, name)
        if value is None and name == "method":  # not chosen: k-means
            continue
        if value not in choices:
            raise ParticleVAEError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    k = request.k
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, (int, np.integer))):
        raise ParticleVAEError(f"k must be a whole number or 'auto', got {k!r}")


def check_inputs(star: Path, run: Path | None) -> None:
    """A one-line error unless ``star`` is a file and ``run`` (when given) a folder."""
    if not star.is_file():
        raise InputFileError("not found", star, "give the STAR written by particle-vae infer")
    if run is not None and not run.is_dir():
        raise InputFileError("is not a run directory", run, "give the folder written by particle-vae train")


def read_latents(star_path: Path):
    """The STAR, its latent column names and ``(N, k)`` float64 latent means; one-line errors
    for a STAR without (finite) latent columns."""
    from particle_vae.analysis import clustering
    from particle_vae.io.star import ParticleStar

    star = ParticleStar(star_path)
    columns = clustering.latent_columns(star.particles)
    if not columns:
        raise InputFileError("has no pvaeZ latent columns", star_path,
                             "analyse the STAR written by 'particle-vae infer RUN --out FILE.star'")
    z = star.particles[columns].to_numpy(dtype=np.float64)
    if not np.isfinite(z).all():
        raise InputFileError("pvaeZ columns hold NaN or Inf values", star_path, "re-run particle-vae infer")
    return star, columns, z


def load_run(run_path: Path, checkpoint: str, star_path: Path, columns: list[str]):
    """The run's model (at ``checkpoint``), config dict and metrics rows; an error when its latent
    size is not the STAR's."""
    from particle_vae.engine.inference import load_model
    from particle_vae.engine.run import RunDirectory

    run = RunDirectory(run_path)
    model, config = load_model(run, checkpoint)
    metrics = run.read_metrics()
    if model.zdim != len(columns):
        raise ParticleVAEError(f"{star_path}: has {len(columns)} latent columns but the run {run_path} has "
                               f"{model.zdim} latent dimensions; give the run that wrote this STAR")
    log.info("run %s: %s model, box %d, %d latent dimensions (%s checkpoint)", run_path, config["model"]["model"],
             model.box, model.zdim, checkpoint)
    return model, config, metrics


def output_paths(request, star_path: Path, poses_in_star: bool, with_model: bool, with_metrics: bool) -> dict[str, Path]:
    """Output key -> path of every file the analysis will write; refuses existing files (without
    ``overwrite``) and the input before any work."""
    from particle_vae.io.atomic import check_output_path

    names = {"star": "clustered_particles.star", "record": "analysis.json", "scatter_png": "latent_scatter.png",
             "scatter_csv": "latent_scatter.csv"}
    if poses_in_star:
        names.update(pose_png="pose_histograms.png", pose_csv="pose_histograms.csv")
    if request.tsne:
        names.update(tsne_png="latent_tsne.png", tsne_csv="latent_tsne.csv")
    if request.images:
        names.update(averages="class_averages.mrcs", averages_star="class_averages.star", averages_png="class_averages.png")
        if request.gallery > 0:
            names.update(gallery_png="gallery.png", gallery_npz="gallery.npz")
    if with_model:
        names.update(centres="cluster_centres.mrcs", traversal_png="latent_traversal.png", traversal_npz="latent_traversal.npz")
        if not request.images:
            names.update(averages_png="class_averages.png")  # the decoded centres alone
        if with_metrics:
            names.update(curves_png="training_curves.png", curves_csv="training_curves.csv")
    out = Path(request.out)
    return {key: check_output_path(out / name, overwrite=request.overwrite, inputs=(star_path,)) for key, name in names.items()}


def cluster(request, star, star_path: Path, z: np.ndarray) -> Clusters:
    """Cluster the ``(N, zdim)`` latents ``z``, or group infer's refinement classes (``classes_from``)."""
    from particle_vae.analysis import clustering

    n = len(z)
    selection = None
    refine_classes = _refinement_classes(star, star_path)
    n_refined = 0 if refine_classes is None else len(np.unique(refine_classes))
    method = request.method or "kmeans"  # None: not chosen, so the refinement classes may be grouped (k-means)
    if request.classes_from == "refinement" and (refine_classes is None or request.k == "auto" or request.k > n_refined):
        reason = (f"has no {REFINE_CLASS_COLUMN} column (infer ran with --no-refine)" if refine_classes is None
                  else f"has {n_refined} refinement classes; give a number --k up to {n_refined}")
        raise ParticleVAEError(f"{star_path}: --classes-from refinement: the infer output {reason}")
    by_refinement = refine_classes is not None and request.k != "auto" and (
        request.classes_from == "refinement" or (request.classes_from == "auto" and method == "kmeans" and request.k < n_refined))
    if by_refinement and method != "kmeans":
        log.warning("--method %s clusters latents; the refinement classes are grouped with k-means", method)
    try:
        if by_refinement:
            k = int(request.k)
            mass = _refinement_masses(star, star_path) if request.mass_tolerance > 0 else None
            log.info("grouping the %d classes of infer's pose refinement into %d by their mean latent%s (--classes-from)",
                     n_refined, k, "" if mass is None else f" and mass (--mass-tolerance {request.mass_tolerance:g})")
            low_res = _low_resolution_classes(star, star_path)
            result = clustering.merge_groups(z, refine_classes, k, seed=request.seed, mass=mass,
                                             mass_tolerance=request.mass_tolerance or MASS_TOLERANCE, join=low_res)
            if low_res is not None:
                log.info("each particle joins the group of its class that fits best at low resolution (%s): %d "
                         "particles moved", LOW_RES_CLASS_COLUMN, int(result.info["moved"]))
        elif request.k == "auto":
            k_range = tuple(request.k_range) if request.k_range else clustering.default_k_range(method, n)
            log.info("choosing k for %s over %d..%d", method, *k_range)
            selection = clustering.suggest_k(z, method, k_range, seed=request.seed)
            k = selection.k
        else:
            k = int(request.k)
        if not by_refinement:
            result = clustering.fit_clusters(z, k, method, seed=request.seed)
    except ValueError as error:
        raise ParticleVAEError(f"{star_path}: clustering failed: {error}") from None
    criterion, _ = clustering.CRITERIA["kmeans" if by_refinement else method]
    if selection is not None:
        scores = {str(key): value for key, value in selection.scores.items()}
        if selection.caution:
            log.warning("k = %d is uncertain: %s", k, selection.caution)
    else:
        scores = {str(k): clustering.score_clusters(z, result.labels, criterion, request.seed, bic=result.info.get("bic"))}
    scores = {key: (value if value is not None and np.isfinite(value) else None) for key, value in scores.items()}
    log.info("%s with k = %d: %s", method, k,
             ", ".join(f"class {j + 1}: {int(c)} ({100 * c / n:.1f}%)" for j, c in enumerate(result.counts)))
    return Clusters(result=result, k=k, selection=selection, by_refinement=by_refinement, n_refined=n_refined,
                    criterion=criterion, scores=scores)


def class_images(request, star, star_path: Path, clusters: Clusters, model, config) -> ClassImages:
    """Read the particles (with the run's preprocessing when ``config`` is given), average them per
    class with their written pose undone, and centre the averages (unless ``request.centre`` is false)."""
    from particle_vae.analysis import averages as avg

    n, k, labels = len(clusters.labels), clusters.k, clusters.labels
    prepared = avg.particle_images(star_path, run_config=config, datadir=request.stack_dir, pixel_size=request.pixel_size,
                                   normalize=request.normalize)
    avg.check_same_particles(prepared, n, star_path)
    for line in prepared.steps:
        log.info("data: %s", line)
    if model is not None and prepared.box != model.box:
        raise ParticleVAEError(f"{star_path}: the run's preprocessing gives {prepared.box} px images but the model "
                               f"expects {model.box} px; give the run that wrote this STAR")
    image_pixel_size = prepared.pixel_size
    source_apix = prepared.source.pixel_size if prepared.source is not None else None
    poses = _poses(star, star_path, source_apix)
    if poses is None:
        log.warning("%s has no rlnAnglePsi (nor pvaeAnglePsi): class averages are plain means (no pose to undo)", star_path)
    elif image_pixel_size is None:
        raise InputFileError("no pixel size known to undo the shifts", star_path, "pass --pixel-size (Angstrom per pixel)")
    log.info("averaging %d particles in %d classes%s", n, k, " after undoing their poses" if poses is not None else "")
    averages = avg.class_averages(prepared.dataset, labels, k, poses, image_pixel_size, batch_size=request.batch_size,
                                  gallery_size=request.gallery)
    centre_shifts = recentred = None
    if averages.aligned and request.centre:
        centre_shifts = avg.centre_averages(averages)
        recentred = avg.recentred_origins(poses[0], poses[1], labels, centre_shifts, image_pixel_size)
        log.info("centred the class averages: moved by %s px (x, y); particle origins changed to match",
                 ", ".join(f"class {j + 1} ({-dx:+.2f}, {-dy:+.2f})" for j, (dx, dy) in enumerate(centre_shifts)))
    return ClassImages(prepared=prepared, averages=averages, pixel_size=image_pixel_size, centre_shifts=centre_shifts,
                       recentred=recentred)


def write_clustered_star(request, star, star_path: Path, project: Path, clusters: Clusters, images: ClassImages,
                         path: Path) -> None:
    """Write the input STAR with ``rlnClassNumber`` (1-based) and, when the averages were centred,
    the particles' origins moved to match (in the columns the pose was read from)."""
    from particle_vae.analysis import averages as avg
    from particle_vae.engine.inference import kept_pose_text
    from particle_vae.io.paths import project_names_for_star

    recentred, prepared = images.recentred, images.prepared
    new_columns = {}
    if "rlnClassNumber" in star.particles.columns:
        log.info("replacing the existing rlnClassNumber column")
    new_columns["rlnClassNumber"] = (clusters.labels + 1).astype(np.int64)
    if recentred is not None:
        if avg.PVAE_PSI in star.particles.columns:  # infer's pose beside a 3D refinement's, which stays as it is
            new_columns[avg.PVAE_ORIGIN_ANGST[0]] = np.round(recentred[:, 0], 6)
            new_columns[avg.PVAE_ORIGIN_ANGST[1]] = np.round(recentred[:, 1], 6)
        elif "rlnOriginX" in star.particles.columns and "rlnOriginXAngst" not in star.particles.columns:
            star_apix = prepared.source.pixel_size if prepared.source is not None else images.pixel_size
            new_columns["rlnOriginX"] = np.round(recentred[:, 0] / star_apix, 6)  # RELION 3.0: pixels of the STAR
            new_columns["rlnOriginY"] = np.round(recentred[:, 1] / star_apix, 6)
        else:
            new_columns["rlnOriginXAngst"] = np.round(recentred[:, 0], 6)
            new_columns["rlnOriginYAngst"] = np.round(recentred[:, 1], 6)
    source = prepared.source if prepared is not None else None
    new_columns = {**project_names_for_star(star_path, project, request.stack_dir, source), **new_columns}
    # a 3D refinement's pose columns that analyze does not change keep their text byte for byte
    star.with_columns({**kept_pose_text(star, new_columns), **new_columns}).write(path, overwrite=True)
    log.info("wrote %s (%d particles, rlnClassNumber 1..%d)", path, len(clusters.labels), clusters.k)


def write_class_images(request, star, project: Path, columns: list[str], clusters: Clusters, images: ClassImages,
                       model, config, paths: dict[str, Path]) -> dict[str, Path]:
    """Write the decoded cluster centres (with a model), the class averages with their STAR, and
    their pictures (``class_averages.png``, ``gallery.png``); returns output key -> path written."""
    from particle_vae.analysis import averages as avg
    from particle_vae.analysis import plots
    from particle_vae.io.mrc import write_stack
    from particle_vae.io.paths import stack_name_for_project
    from particle_vae.io.star import image_name, make_particle_star

    result, k, n = clusters.result, clusters.k, len(clusters.labels)
    averages, image_pixel_size = images.averages, images.pixel_size
    inputs = (Path(request.star),)
    written = {}
    centres_decoded = None
    if model is not None:
        # beside centred averages, each drawing on its own centre of mass (the origins that infer writes
        # already centre the particles on the generator's drawing, so the averages' remaining shifts are
        # not those of the drawings)
        centres_decoded = (avg.decode_centred(model, result.centres) if images.centre_shifts is not None
                           else avg.decode_centres(model, result.centres))
        write_stack(paths["centres"], centres_decoded, config.get("pixel_size"), overwrite=True, inputs=inputs)
        written["centres"] = paths["centres"]
        log.info("wrote %s (%d generator images at the cluster centres, pose zero)", paths["centres"], k)
    if averages is not None:
        box = averages.averages.shape[-1]
        write_stack(paths["averages"], averages.averages, image_pixel_size, overwrite=True, inputs=inputs)
        optics = _optics_values(star)
        class_star = make_particle_star(
            [image_name(j, stack_name_for_project(paths["averages"], project)) for j in range(k)], image_pixel_size or 1.0, box, **optics,
            columns={"rlnClassNumber": np.arange(1, k + 1), "rlnClassDistribution": np.round(averages.counts / n, 6),
                     "pvaeClassCount": averages.counts,
                     **{column: np.round(result.centres[:, i], 7) for i, column in enumerate(columns)}},
        )
        class_star.write(paths["averages_star"], overwrite=True)
        written.update(averages=paths["averages"], averages_star=paths["averages_star"])
        log.info("wrote %s and %s (%d class averages of %d px at %s A/px)", paths["averages"], paths["averages_star"], k, box,
                 "unknown" if image_pixel_size is None else f"{image_pixel_size:.4g}")
        plots.plot_class_images(averages.averages, averages.counts, paths["averages_png"], centres_decoded)
        written["averages_png"] = paths["averages_png"]
        if request.gallery > 0:
            plots.plot_gallery(averages.averages, averages.gallery, averages.gallery_index, paths["gallery_png"],
                               paths["gallery_npz"], aligned=averages.aligned)
            written.update(gallery_png=paths["gallery_png"], gallery_npz=paths["gallery_npz"])
    elif centres_decoded is not None:
        plots.plot_image_grid(centres_decoded[None], paths["averages_png"], row_labels=["decoded centre"],
                              col_labels=[f"class {j + 1}" for j in range(k)])
        written["averages_png"] = paths["averages_png"]
    return written


def write_plots(request, star, star_path: Path, run_path: Path | None, z: np.ndarray, clusters: Clusters, model,
                metrics, dims: tuple[int, ...], poses_in_star: bool, paths: dict[str, Path]) -> dict[str, Path]:
    """Latent scatter (PCA; t-SNE with ``request.tsne``), pose histograms, and with a model the latent
    traversal and training curves; returns output key -> path written."""
    from particle_vae.analysis import averages as avg
    from particle_vae.analysis import plots

    result, labels, n = clusters.result, clusters.labels, len(z)
    written = {}
    log.info("plotting")
    plots.plot_latent_scatter(z, labels, paths["scatter_png"], paths["scatter_csv"], centres=result.centres, how="pca",
                              seed=request.seed)
    written.update(scatter_png=paths["scatter_png"], scatter_csv=paths["scatter_csv"])
    if request.tsne:
        log.info("t-SNE of %d latent vectors", min(n, plots.MAX_TSNE_POINTS))
        plots.plot_latent_scatter(z, labels, paths["tsne_png"], paths["tsne_csv"], centres=result.centres, how="tsne",
                                  seed=request.seed)
        written.update(tsne_png=paths["tsne_png"], tsne_csv=paths["tsne_csv"])
    if poses_in_star:
        psi, origin = _poses(star, star_path, _star_pixel_size(star))
        plots.plot_pose_histograms(psi, origin, paths["pose_png"], paths["pose_csv"])
        written.update(pose_png=paths["pose_png"], pose_csv=paths["pose_csv"])
    if model is not None:
        images, grid, axes = avg.latent_traversal(model, z, dims, request.traversal_steps)
        plots.plot_traversal(images, axes, dims, paths["traversal_png"], paths["traversal_npz"], grid=grid)
        written.update(traversal_png=paths["traversal_png"], traversal_npz=paths["traversal_npz"])
        if metrics:
            plots.plot_training_curves(metrics, paths["curves_png"], paths["curves_csv"])
            written.update(curves_png=paths["curves_png"], curves_csv=paths["curves_csv"])
        else:
            log.info("%s has no metrics.jsonl rows: no training curves", run_path)
    return written


def analysis_record(request, star_path: Path, run_path: Path | None, columns: list[str], clusters: Clusters,
                    images: ClassImages, config, written: dict[str, Path]) -> dict:
    """The contents of ``analysis.json`` (its ``runtime_s`` and the record's own name are added by the caller)."""
    from particle_vae.analysis import clustering

    result, selection, k, n = clusters.result, clusters.selection, clusters.k, len(clusters.labels)
    averages, centre_shifts = images.averages, images.centre_shifts
    return {
        "input": str(star_path),
        "run": None if run_path is None else str(run_path),
        "checkpoint": None if run_path is None else request.checkpoint,
        "n_particles": n,
        "latent_columns": columns,
        "method": result.method,
        "classes_from": f"refinement ({clusters.n_refined} classes)" if clusters.by_refinement else "latents",
        "mass_tolerance": request.mass_tolerance if result.info.get("mass") else None,
        "k": k,
        "k_selection": "auto" if selection is not None else "given",
        "criterion": clusters.criterion,
        "criterion_better": "higher" if clustering.CRITERIA[result.method][1] else "lower",
        "scores": clusters.scores,
        "k_confidence": None if selection is None else selection.record(),
        "seed": request.seed,
        "fit": result.info,
        "classes": [{"class": j + 1, "count": int(c), "fraction": float(c / n),
                     "centre": [float(v) for v in result.centres[j]]} for j, c in enumerate(result.counts)],
        "averages": None if averages is None else {
            "aligned": averages.aligned, "box": int(averages.averages.shape[-1]), "pixel_size": images.pixel_size,
            "images": "run preprocessing" if config is not None else f"raw particles, normalize={request.normalize}",
            "centred": centre_shifts is not None,
            "centre_shift_px": None if centre_shifts is None else [[round(float(-v), 4) for v in row] for row in centre_shifts],
        },
        "outputs": {key: path.name for key, path in written.items()},
        "runtime_s": None,
    }


def _refinement_classes(star, star_path: Path):
    """``(N,)`` classes of infer's pose refinement (its ``pvaeRefineClass`` column), or ``None`` without one."""
    return _numeric_column(star, star_path, REFINE_CLASS_COLUMN, "class numbers",
                           "restore the column written by particle-vae infer, or delete it to cluster the latents")


def _low_resolution_classes(star, star_path: Path):
    """``(N,)`` infer's low-resolution class of each particle (``pvaeLowResClass``), or ``None`` without the column."""
    return _numeric_column(star, star_path, LOW_RES_CLASS_COLUMN, "class numbers",
                           "restore the column written by particle-vae infer, or delete it to keep each particle in its class's group")


def _refinement_masses(star, star_path: Path):
    """``(N,)`` mass of each particle's refinement class (infer's ``pvaeRefineClassMass``), or ``None`` without the column."""
    return _numeric_column(star, star_path, REFINE_MASS_COLUMN, "numbers",
                           "restore the column written by particle-vae infer, or give --mass-tolerance 0 to group by the latents alone")


def _numeric_column(star, star_path: Path, column: str, what: str, fix: str):
    """``(N,)`` values of one of infer's columns, or ``None`` when the STAR lacks it.

    Raises:
        InputFileError: the column holds something other than finite numbers.
    """
    if column not in star.particles.columns:
        return None
    values = star.particles[column].to_numpy()
    if not (np.issubdtype(values.dtype, np.number) and np.isfinite(values).all()):
        raise InputFileError(f"its {column} column holds values that are not {what}", star_path, fix)
    return values


def _poses(star, path: Path, pixel_size):
    """:func:`~particle_vae.analysis.averages.relion_poses` with a one-line error naming the file."""
    from particle_vae.analysis.averages import relion_poses

    try:
        return relion_poses(star.particles, pixel_size)
    except ValueError as error:
        raise InputFileError(str(error), path, "re-run particle-vae infer") from None


def _star_pixel_size(star) -> float | None:
    """The STAR's pixel size, or ``None`` when it has none or several."""
    try:
        return star.pixel_size()
    except ParticleVAEError:
        return None


def _optics_values(star) -> dict:
    """Voltage, Cs and amplitude contrast of the input's first optics group (defaults otherwise)."""
    out = {}
    for key, column in (("voltage", "rlnVoltage"), ("cs", "rlnSphericalAberration"), ("amplitude_contrast", "rlnAmplitudeContrast")):
        values = star.column(column)
        if values is not None and len(values):
            out[key] = float(values.iloc[0])
    return out
