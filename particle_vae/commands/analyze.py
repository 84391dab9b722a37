"""Cluster the latents of an inferred STAR; write class averages, plots and a record.

INPUT is a STAR written by `particle-vae infer` (it has pvaeZ1..k columns), or
a run directory together with --star. The latent means are clustered (k-means,
Gaussian mixture or Ward; --k auto scores a range of k); when infer refined the
poses (pvaeRefineClass) and --k is below the number of its classes, those
classes are kept whole and grouped by their mean latent instead (--classes-from),
and OUT receives:

  clustered_particles.star   the input (all columns, optics) with rlnClassNumber (1-based); rlnImageName
                             resolves from the folder RELION runs in (--project-dir, default the current one)
  analysis.json              method, k (with --k auto: how strongly the data support it), scores,
                             per-class counts, settings, files
  class_averages.mrcs/.star  per class, the mean of its particles with the written pose undone (pvaeAnglePsi,
                             pvaeOriginX/YAngst when infer put its pose there, else the RELION columns)
                             (then centred on its centre of mass, origins updated; --no-center: not)
  class_averages.png         the averages (and, with a run, the decoded cluster centres)
  cluster_centres.mrcs       with a run: the generator at each cluster centre, pose zero (centred on its
                             centre of mass like the averages; --no-center: as drawn)
  latent_scatter.png/.csv    latent means coloured by class (PCA beyond 2 dimensions)
  latent_tsne.png/.csv       with --tsne
  latent_traversal.png/.npz  with a run: a grid through two latent dimensions, pose zero
  pose_histograms.png/.csv   rlnAnglePsi and shifts
  training_curves.png/.csv   with a run: from its metrics.jsonl
  gallery.png/.npz           the first aligned particles of each class

With a run, particles are read with the run's preprocessing (images in the
model's box); without one, raw particles normalised with --normalize. See
docs/analysis.md. Example:

  particle-vae analyze run1/particles_vae.star --run run1 --k auto --out run1/analysis
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: the column in which infer writes the class of its pose refinement (1-based)
REFINE_CLASS_COLUMN = "pvaeRefineClass"


def _k_value(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    from particle_vae.cli import add_project_dir_option, add_stack_dir_option

    parser.add_argument("input", type=Path, help="STAR written by particle-vae infer, or a run directory (then give --star)")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    parser.add_argument("--star", type=Path, help="the inferred STAR, when INPUT is a run directory (default: none)")
    parser.add_argument("--run", type=Path, help="run directory that wrote the STAR: enables decoded centres, traversal, "
                                                 "training curves, and reads particles with its preprocessing (default: none)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best", help="checkpoint of the run")
    parser.add_argument("--method", choices=["kmeans", "gmm", "ward"], default="kmeans", help="clustering method")
    parser.add_argument("--classes-from", choices=["auto", "latents", "refinement"], default="auto",
                        help="what is clustered: the particles' latents, or the classes of infer's pose refinement (kept whole, "
                             "grouped by their mean latent with k-means; purer where the refinement separated what the latents "
                             "mix); auto: the refinement classes when the STAR has infer's pvaeRefineClass column and --k is a "
                             "number below their count, else the latents (default: auto)")
    parser.add_argument("--k", type=_k_value, default="auto",
                        help="number of clusters, or auto: gmm by the lowest BIC (k = 1 included); kmeans/ward test one population "
                             "against several with the gap statistic, then take the highest silhouette (see docs/analysis.md)")
    parser.add_argument("--k-range", type=int, nargs=2, metavar=("KMIN", "KMAX"),
                        help="k searched by --k auto (default: 1 10, capped by the number of particles)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of clustering, the k test and embeddings")
    parser.add_argument("--tsne", action="store_true", help="also draw a t-SNE embedding of the latents (slower)")
    parser.add_argument("--gallery", type=int, default=6, metavar="G", help="particles shown per class in gallery.png, 0 for none")
    parser.add_argument("--traverse", type=int, nargs="+", metavar="DIM",
                        help="latent dimensions (1-based, one or two) of the traversal grid (default: 1 2, or 1 for one latent)")
    parser.add_argument("--traversal-steps", type=int, default=7, help="values per traversed dimension")
    parser.add_argument("--normalize", choices=["background", "zscore", "minmax", "none"], default="background",
                        help="per-image normalisation of raw particles when no run is given")
    parser.add_argument("--no-images", action="store_true", help="do not read particle images (no class averages or gallery)")
    parser.add_argument("--no-center", action="store_true",
                        help="keep the class averages where the poses put them; by default each aligned average is moved "
                             "to put its centre of mass on the box centre and the particles' origins are changed to match")
    add_stack_dir_option(parser)
    add_project_dir_option(parser)
    parser.add_argument("--pixel-size", type=float, metavar="A",
                        help="the particles' pixel size, Angstrom (default: the STAR's, else the stack header's)")
    parser.add_argument("--batch-size", type=int, default=256, help="particles read at once")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never the input)")


def _resolve_inputs(args) -> tuple[Path, Path | None]:
    from particle_vae.errors import InputFileError, ParticleVAEError

    path = args.input
    if not path.exists():
        raise InputFileError("not found", path, "give a STAR written by particle-vae infer, or a run directory with --star")
    if path.is_dir():
        if args.run is not None:
            raise ParticleVAEError(f"{path}: is a run directory and --run was also given; give one of them")
        if args.star is None:
            raise ParticleVAEError(f"{path}: is a run directory; pass --star with the STAR written by "
                                   f"'particle-vae infer {path} --out FILE.star'")
        star, run = args.star, path
    else:
        if args.star is not None:
            raise ParticleVAEError(f"{path}: INPUT is already a STAR file; use --star only with a run directory as INPUT")
        star, run = path, args.run
    if not star.is_file():
        raise InputFileError("not found", star, "give the STAR written by particle-vae infer")
    if run is not None and not run.is_dir():
        raise InputFileError("is not a run directory", run, "give the folder written by particle-vae train")
    return star, run


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from particle_vae.analysis import averages as avg
    from particle_vae.analysis import clustering, plots
    from particle_vae.errors import InputFileError, ParticleVAEError
    from particle_vae.io.atomic import atomic_write_text, check_output_path
    from particle_vae.io.infer_pair import check_pair
    from particle_vae.io.mrc import write_stack
    from particle_vae.io.paths import project_folder, project_names_for_star, stack_name_for_project
    from particle_vae.io.star import ParticleStar, image_name, make_particle_star

    started = time.time()
    star_path, run_path = _resolve_inputs(args)
    project = project_folder(args.project_dir)
    missing_npz = check_pair(star_path, allow_missing_npz=True)  # a STAR beside another infer run's .npz is refused
    if missing_npz:
        log.warning("%s; analyze goes on with the STAR alone", missing_npz)
    star = ParticleStar(star_path)
    columns = clustering.latent_columns(star.particles)
    if not columns:
        raise InputFileError("has no pvaeZ latent columns", star_path,
                             "analyse the STAR written by 'particle-vae infer RUN --out FILE.star'")
    z = star.particles[columns].to_numpy(dtype=np.float64)
    n = len(z)
    if not np.isfinite(z).all():
        raise InputFileError("pvaeZ columns hold NaN or Inf values", star_path, "re-run particle-vae infer")
    if args.k != "auto" and not 1 <= args.k <= n:
        raise ParticleVAEError(f"{star_path}: --k {args.k} is {'larger than the number of particles' if args.k > n else 'below 1'} "
                               f"({n}); choose 1 <= k <= {n} or --k auto")
    if args.gallery < 0 or args.traversal_steps < 2 or args.batch_size < 1:
        raise ParticleVAEError("--gallery must be >= 0, --traversal-steps >= 2 and --batch-size >= 1")
    log.info("%s: %d particles, latent columns %s", star_path, n, ", ".join(columns))

    # ---- the run (optional) --------------------------------------------------
    model = config = metrics = None
    if run_path is not None:
        from particle_vae.engine.inference import load_model
        from particle_vae.engine.run import RunDirectory

        run = RunDirectory(run_path)
        model, config = load_model(run, args.checkpoint)
        metrics = run.read_metrics()
        if model.zdim != len(columns):
            raise ParticleVAEError(f"{star_path}: has {len(columns)} latent columns but the run {run_path} has "
                                   f"{model.zdim} latent dimensions; give the run that wrote this STAR")
        log.info("run %s: %s model, box %d, %d latent dimensions (%s checkpoint)", run_path, config["model"]["model"],
                 model.box, model.zdim, args.checkpoint)
    dims = tuple(range(min(2, len(columns)))) if args.traverse is None else tuple(d - 1 for d in args.traverse)
    if model is not None and (len(dims) > 2 or len(set(dims)) != len(dims) or any(not 0 <= d < len(columns) for d in dims)):
        raise ParticleVAEError(f"--traverse takes one or two different latent dimensions between 1 and {len(columns)}")

    # ---- outputs: refuse to clobber before any work ---------------------------
    poses_in_star = _poses(star, star_path, None) is not None
    names = {"star": "clustered_particles.star", "record": "analysis.json", "scatter_png": "latent_scatter.png",
             "scatter_csv": "latent_scatter.csv"}
    if poses_in_star:
        names.update(pose_png="pose_histograms.png", pose_csv="pose_histograms.csv")
    if args.tsne:
        names.update(tsne_png="latent_tsne.png", tsne_csv="latent_tsne.csv")
    if not args.no_images:
        names.update(averages="class_averages.mrcs", averages_star="class_averages.star", averages_png="class_averages.png")
        if args.gallery > 0:
            names.update(gallery_png="gallery.png", gallery_npz="gallery.npz")
    if model is not None:
        names.update(centres="cluster_centres.mrcs", traversal_png="latent_traversal.png", traversal_npz="latent_traversal.npz")
        if args.no_images:
            names.update(averages_png="class_averages.png")  # the decoded centres alone
        if metrics:
            names.update(curves_png="training_curves.png", curves_csv="training_curves.csv")
    inputs = (star_path,)
    paths = {key: check_output_path(args.out / name, overwrite=args.overwrite, inputs=inputs) for key, name in names.items()}

    # ---- clustering -------------------------------------------------------------
    selection = None
    refine_classes = _refinement_classes(star)
    n_refined = 0 if refine_classes is None else len(np.unique(refine_classes))
    if args.classes_from == "refinement" and (refine_classes is None or args.k == "auto" or args.k > n_refined):
        reason = (f"has no {REFINE_CLASS_COLUMN} column (infer ran with --no-refine)" if refine_classes is None
                  else f"has {n_refined} refinement classes; give a number --k up to {n_refined}")
        raise ParticleVAEError(f"{star_path}: --classes-from refinement: the infer output {reason}")
    by_refinement = refine_classes is not None and args.k != "auto" and (
        args.classes_from == "refinement" or (args.classes_from == "auto" and args.k < n_refined))
    try:
        if by_refinement:
            k = int(args.k)
            log.info("grouping the %d classes of infer's pose refinement into %d by their mean latent (--classes-from)",
                     n_refined, k)
            result = clustering.merge_groups(z, refine_classes, k, seed=args.seed)
        elif args.k == "auto":
            k_range = tuple(args.k_range) if args.k_range else clustering.default_k_range(args.method, n)
            log.info("choosing k for %s over %d..%d", args.method, *k_range)
            selection = clustering.suggest_k(z, args.method, k_range, seed=args.seed)
            k = selection.k
        else:
            k = int(args.k)
        if not by_refinement:
            result = clustering.fit_clusters(z, k, args.method, seed=args.seed)
    except ValueError as error:
        raise ParticleVAEError(f"{star_path}: clustering failed: {error}") from None
    criterion, _ = clustering.CRITERIA["kmeans" if by_refinement else args.method]
    if selection is not None:
        scores = {str(key): value for key, value in selection.scores.items()}
        if selection.caution:
            log.warning("k = %d is uncertain: %s", k, selection.caution)
    else:
        scores = {str(k): clustering.score_clusters(z, result.labels, criterion, args.seed, bic=result.info.get("bic"))}
    scores = {key: (value if value is not None and np.isfinite(value) else None) for key, value in scores.items()}
    log.info("%s with k = %d: %s", args.method, k,
             ", ".join(f"class {j + 1}: {int(c)} ({100 * c / n:.1f}%)" for j, c in enumerate(result.counts)))
    labels = result.labels

    # ---- particle images: class averages and gallery --------------------------------
    prepared = None
    averages = None
    image_pixel_size = None
    centre_shifts = recentred = None
    if not args.no_images:
        prepared = avg.particle_images(star_path, run_config=config, datadir=args.stack_dir, pixel_size=args.pixel_size,
                                       normalize=args.normalize)
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
        averages = avg.class_averages(prepared.dataset, labels, k, poses, image_pixel_size, batch_size=args.batch_size,
                                      gallery_size=args.gallery)
        if averages.aligned and not args.no_center:
            centre_shifts = avg.centre_averages(averages)
            recentred = avg.recentred_origins(poses[0], poses[1], labels, centre_shifts, image_pixel_size)
            log.info("centred the class averages: moved by %s px (x, y); particle origins changed to match",
                     ", ".join(f"class {j + 1} ({-dx:+.2f}, {-dy:+.2f})" for j, (dx, dy) in enumerate(centre_shifts)))

    # ---- the clustered STAR ------------------------------------------------------
    new_columns = {}
    if "rlnClassNumber" in star.particles.columns:
        log.info("replacing the existing rlnClassNumber column")
    new_columns["rlnClassNumber"] = (labels + 1).astype(np.int64)
    if recentred is not None:
        if avg.PVAE_PSI in star.particles.columns:  # infer's pose beside a 3D refinement's, which stays as it is
            new_columns[avg.PVAE_ORIGIN_ANGST[0]] = np.round(recentred[:, 0], 6)
            new_columns[avg.PVAE_ORIGIN_ANGST[1]] = np.round(recentred[:, 1], 6)
        elif "rlnOriginX" in star.particles.columns and "rlnOriginXAngst" not in star.particles.columns:
            star_apix = prepared.source.pixel_size if prepared.source is not None else image_pixel_size
            new_columns["rlnOriginX"] = np.round(recentred[:, 0] / star_apix, 6)  # RELION 3.0: pixels of the STAR
            new_columns["rlnOriginY"] = np.round(recentred[:, 1] / star_apix, 6)
        else:
            new_columns["rlnOriginXAngst"] = np.round(recentred[:, 0], 6)
            new_columns["rlnOriginYAngst"] = np.round(recentred[:, 1], 6)
    source = prepared.source if prepared is not None else None
    new_columns = {**project_names_for_star(star_path, project, args.stack_dir, source), **new_columns}
    from particle_vae.engine.inference import kept_pose_text

    # a 3D refinement's pose columns that analyze does not change keep their text byte for byte
    star.with_columns({**kept_pose_text(star, new_columns), **new_columns}).write(paths["star"], overwrite=True)
    log.info("wrote %s (%d particles, rlnClassNumber 1..%d)", paths["star"], n, k)

    # ---- class averages and decoded centres ---------------------------------------------
    written = {"star": paths["star"]}
    centres_decoded = None
    if model is not None:
        centres_decoded = avg.decode_centres(model, result.centres)
        if centre_shifts is not None:
            # shown in the frame of the centred averages: each drawing on its own centre of mass (the origins
            # that infer writes already centre the particles on the generator's drawing, so the averages'
            # remaining shifts are not those of the drawings)
            centres_decoded = np.stack([avg.centre_on_mass(image)[0].numpy() for image in centres_decoded]).astype(np.float32)
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
        if args.gallery > 0:
            plots.plot_gallery(averages.averages, averages.gallery, averages.gallery_index, paths["gallery_png"],
                               paths["gallery_npz"], aligned=averages.aligned)
            written.update(gallery_png=paths["gallery_png"], gallery_npz=paths["gallery_npz"])
    elif centres_decoded is not None:
        plots.plot_image_grid(centres_decoded[None], paths["averages_png"], row_labels=["decoded centre"],
                              col_labels=[f"class {j + 1}" for j in range(k)])
        written["averages_png"] = paths["averages_png"]

    # ---- plots -------------------------------------------------------------------------
    log.info("plotting")
    plots.plot_latent_scatter(z, labels, paths["scatter_png"], paths["scatter_csv"], centres=result.centres, how="pca",
                              seed=args.seed)
    written.update(scatter_png=paths["scatter_png"], scatter_csv=paths["scatter_csv"])
    if args.tsne:
        log.info("t-SNE of %d latent vectors", min(n, plots.MAX_TSNE_POINTS))
        plots.plot_latent_scatter(z, labels, paths["tsne_png"], paths["tsne_csv"], centres=result.centres, how="tsne",
                                  seed=args.seed)
        written.update(tsne_png=paths["tsne_png"], tsne_csv=paths["tsne_csv"])
    if poses_in_star:
        psi, origin = _poses(star, star_path, _star_pixel_size(star))
        plots.plot_pose_histograms(psi, origin, paths["pose_png"], paths["pose_csv"])
        written.update(pose_png=paths["pose_png"], pose_csv=paths["pose_csv"])
    if model is not None:
        images, grid, axes = avg.latent_traversal(model, z, dims, args.traversal_steps)
        plots.plot_traversal(images, axes, dims, paths["traversal_png"], paths["traversal_npz"], grid=grid)
        written.update(traversal_png=paths["traversal_png"], traversal_npz=paths["traversal_npz"])
        if metrics:
            plots.plot_training_curves(metrics, paths["curves_png"], paths["curves_csv"])
            written.update(curves_png=paths["curves_png"], curves_csv=paths["curves_csv"])
        else:
            log.info("%s has no metrics.jsonl rows: no training curves", run_path)

    # ---- the record ------------------------------------------------------------------------
    record = {
        "input": str(star_path),
        "run": None if run_path is None else str(run_path),
        "checkpoint": None if run_path is None else args.checkpoint,
        "n_particles": n,
        "latent_columns": columns,
        "method": result.method,
        "classes_from": f"refinement ({n_refined} classes)" if by_refinement else "latents",
        "k": k,
        "k_selection": "auto" if selection is not None else "given",
        "criterion": criterion,
        "criterion_better": "higher" if clustering.CRITERIA[result.method][1] else "lower",
        "scores": scores,
        "k_confidence": None if selection is None else selection.record(),
        "seed": args.seed,
        "fit": result.info,
        "classes": [{"class": j + 1, "count": int(c), "fraction": float(c / n),
                     "centre": [float(v) for v in result.centres[j]]} for j, c in enumerate(result.counts)],
        "averages": None if averages is None else {
            "aligned": averages.aligned, "box": int(averages.averages.shape[-1]), "pixel_size": image_pixel_size,
            "images": "run preprocessing" if config is not None else f"raw particles, normalize={args.normalize}",
            "centred": centre_shifts is not None,
            "centre_shift_px": None if centre_shifts is None else [[round(float(-v), 4) for v in row] for row in centre_shifts],
        },
        "outputs": {key: path.name for key, path in written.items()},
        "runtime_s": None,
    }
    record["outputs"]["record"] = paths["record"].name
    record["runtime_s"] = round(time.time() - started, 3)
    atomic_write_text(paths["record"], json.dumps(record, indent=2) + "\n")
    log.info("wrote %s; analysis finished in %.1f s", paths["record"], record["runtime_s"])
    return 0


def _refinement_classes(star):
    """``(N,)`` classes of infer's pose refinement (its ``pvaeRefineClass`` column), or ``None`` without one."""
    import numpy as np

    if REFINE_CLASS_COLUMN not in star.particles.columns:
        return None
    classes = star.particles[REFINE_CLASS_COLUMN].to_numpy()
    return classes if np.issubdtype(classes.dtype, np.number) and np.isfinite(classes).all() else None


def _poses(star, path: Path, pixel_size):
    """:func:`~particle_vae.analysis.averages.relion_poses` with a one-line error naming the file."""
    from particle_vae.analysis.averages import relion_poses
    from particle_vae.errors import InputFileError

    try:
        return relion_poses(star.particles, pixel_size)
    except ValueError as error:
        raise InputFileError(str(error), path, "re-run particle-vae infer") from None


def _star_pixel_size(star) -> float | None:
    """The STAR's pixel size, or ``None`` when it has none or several."""
    from particle_vae.errors import ParticleVAEError

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
