"""Back into RELION: image paths that resolve from the project folder, a 3D refinement's pose columns kept, and
RELION's own programs reading (and aligning with) what particle-vae writes.

The RELION checks run ``relion_stack_create`` and ``relion_star_handler`` (RELION 3.1, the Debian package
``relion``; ``.ci/run`` installs it) in the project folder, with the STARs in job subfolders, as RELION runs. They
skip where those programs are not on PATH, and fail under ``CI=true``. The other tests need no RELION.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from particle_vae import cli
from particle_vae.io.mrc import MRCStack, write_stack
from particle_vae.io.star import ParticleStar

RELION_PROGRAMS = ("relion_stack_create", "relion_star_handler")
TINY = ["--preset", "tiny", "--fields", "4", "--gen-hidden", "32", "--fourier-features", "16", "--group", "4",
        "--downsample-to", "24", "--batch-size", "16", "--seed", "3"]
N, BOX, APIX = 24, 32, 8.0
REFINEMENT = "FinalRefinement-OriginalParticles-PfCRT.star"  # a real RELION 3.0 3D refinement (5 particles)
REFINEMENT_STACK = Path("Extract/job012/FinalRefinement-OriginalParticles-PfCRT.mrcs")  # as its rlnImageName says
POSE_3D = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def relion():
    """RELION's programs are on PATH; otherwise skip (fail under CI=true)."""
    missing = [name for name in RELION_PROGRAMS if shutil.which(name) is None]
    if missing:
        reason = f"{', '.join(missing)} not on PATH: install RELION 3.1 (Debian package relion; .ci/run does)"
        if _on_ci():
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


def run_relion(project: Path, *args: str) -> subprocess.CompletedProcess:
    """A RELION program run in the project folder; fails the test with RELION's own message."""
    done = subprocess.run(list(args), cwd=project, capture_output=True, text=True, timeout=120, check=False)
    message = (done.stdout + done.stderr)[-2000:]
    assert done.returncode == 0 and "ERROR" not in message, f"{' '.join(args)} in {project}:\n{message}"
    return done


def loop_text(path: Path, column: str) -> list[str]:
    """The values of ``column`` exactly as written in the STAR's text (the loop that has it; plain tokens)."""
    names: list[str] = []
    rows: list[list[str]] = []
    found = None
    for line in path.read_text().splitlines() + ["data_end"]:
        stripped = line.strip()
        if stripped.startswith(("data_", "loop_")):
            if column in names:
                found = [row[names.index(column)] for row in rows]
            names, rows = [], []
        elif stripped.startswith("_"):
            names.append(stripped.split()[0][1:])
        elif stripped and not stripped.startswith("#") and names:
            rows.append(stripped.split())
    assert found is not None, f"{path} has no column {column}"
    return found


def stack_paths_in(star: Path) -> set[str]:
    return {name.split("@", 1)[1] for name in loop_text(star, "rlnImageName")}


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_root):
    """A RELION-like project folder: every particle-vae command run in it, each output in a job folder.

    Simulate/job001 (noise-free, no CTF, with centred.mrcs), Train/job002 (tiny model, one epoch), Infer/job003,
    Analyze/job004, Select/job005; Refine3D/job010/run_data.star (the real 3D refinement, 5 particles, whose
    stack Extract/job012/... is made here) and Infer/job011 (infer of it, --no-refine), Refine3D/job020 (the
    simulated particles with 3D angles written as RELION writes them) and Infer/job021 (refined), Analyze/job022,
    Select/job023.
    """
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert cli.main(["-q", "simulate", "--preset", "t20s", "--n", str(N), "--box", str(BOX), "--pixel-size", str(APIX),
                         "--snr", "inf", "--no-ctf", "--max-shift", "4", "--write-clean", "--data-dir", str(data_root),
                         "--out", "Simulate/job001", "--no-progress"]) == 0
        assert cli.main(["-q", "train", "Simulate/job001/particles.star", *TINY, "--epochs", "1", "--out", "Train/job002"]) == 0
        assert cli.main(["-q", "infer", "Train/job002", "--out", "Infer/job003/particles_vae.star", "--no-refine"]) == 0
        assert cli.main(["-q", "analyze", "Infer/job003/particles_vae.star", "--k", "2", "--gallery", "0",
                         "--out", "Analyze/job004"]) == 0
        assert cli.main(["-q", "select", "Analyze/job004/clustered_particles.star", "--classes", "1",
                         "--out", "Select/job005/particles.star"]) == 0

        refinement = root / "Refine3D" / "job010" / "run_data.star"
        refinement.parent.mkdir(parents=True)
        shutil.copyfile(data_root / "cryoem" / "formats" / REFINEMENT, refinement)
        write_stack(root / REFINEMENT_STACK, np.random.default_rng(0).normal(size=(5, BOX, BOX)).astype(np.float32), 1.035)
        assert cli.main(["-q", "infer", "Train/job002", "--particles", str(refinement.relative_to(root)), "--no-refine",
                         "--out", "Infer/job011/particles_vae.star"]) == 0

        simulated = ParticleStar(root / "Simulate/job001/particles.star")
        truth = simulated.particles
        as_relion_writes = {name: np.array([f"{v:12.6f}".strip() for v in truth[source].to_numpy()], dtype=object)
                            for name, source in zip(POSE_3D, ("pvaeTrueAngleRot", "pvaeTrueAngleTilt", "pvaeTrueAnglePsi",
                                                              "pvaeTrueOriginXAngst", "pvaeTrueOriginYAngst"))}
        simulated.with_columns(as_relion_writes).write(root / "Refine3D/job020/run_data.star")
        assert cli.main(["-q", "infer", "Train/job002", "--particles", "Refine3D/job020/run_data.star",
                         "--refine-iterations", "1", "--out", "Infer/job021/particles_vae.star"]) == 0
        assert cli.main(["-q", "analyze", "Infer/job021/particles_vae.star", "--k", "2", "--gallery", "0",
                         "--out", "Analyze/job022"]) == 0
        assert cli.main(["-q", "select", "Analyze/job022/clustered_particles.star", "--classes", "1", "2",
                         "--out", "Select/job023/particles.star"]) == 0
    return root


WRITTEN = ("Simulate/job001/particles.star", "Infer/job003/particles_vae.star", "Analyze/job004/clustered_particles.star",
           "Analyze/job004/class_averages.star", "Select/job005/particles.star", "Infer/job011/particles_vae.star",
           "Infer/job021/particles_vae.star", "Analyze/job022/clustered_particles.star", "Select/job023/particles.star")


# --------------------------------------------------------------------------- image paths


def test_every_star_written_names_its_stacks_from_the_project_folder(project):
    for star in WRITTEN:
        for stack in stack_paths_in(project / star):
            assert not Path(stack).is_absolute() and not stack.startswith(".."), f"{star}: {stack}"
            assert (project / stack).is_file(), f"{star}: {stack} does not open from the project folder"
    assert stack_paths_in(project / "Simulate/job001/particles.star") == {"Simulate/job001/particles.mrcs"}
    assert stack_paths_in(project / "Analyze/job004/class_averages.star") == {"Analyze/job004/class_averages.mrcs"}
    # a RELION project's own names are kept as they were
    assert stack_paths_in(project / "Infer/job011/particles_vae.star") == {REFINEMENT_STACK.as_posix()}


def test_project_dir_option_and_stacks_outside_the_project(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere: --project-dir names the project folder
    out = project / "Select" / "job030" / "particles.star"
    assert cli.main(["-q", "select", str(project / "Analyze/job004/clustered_particles.star"), "--classes", "1", "2",
                     "--project-dir", str(project), "--out", str(out)]) == 0
    assert stack_paths_in(out) == {"Simulate/job001/particles.mrcs"}
    # with the current folder as the project folder, the stacks lie outside it: absolute paths
    outside = tmp_path / "subset.star"
    assert cli.main(["-q", "select", str(out), "--classes", "1", "--stack-dir", str(project), "--out", str(outside)]) == 0
    assert stack_paths_in(outside) == {str(project / "Simulate/job001/particles.mrcs")}
    assert cli.main(["-q", "select", str(out), "--classes", "1", "--project-dir", str(tmp_path / "missing"),
                     "--out", str(tmp_path / "never.star")]) == 2
    assert not (tmp_path / "never.star").exists()


def test_path_helpers(tmp_path):
    from particle_vae.io.paths import project_image_names, stack_name_for_project, stacks_not_found_from

    stack = write_stack(tmp_path / "proj" / "Extract" / "a.mrcs", np.zeros((2, 4, 4), np.float32), 1.0)
    other = write_stack(tmp_path / "elsewhere" / "b.mrcs", np.zeros((2, 4, 4), np.float32), 1.0)
    project = tmp_path / "proj"
    assert stack_name_for_project(stack, project) == "Extract/a.mrcs"
    assert stack_name_for_project(other, project) == str(other)
    (tmp_path / "link").symlink_to(project)
    assert stack_name_for_project(stack, tmp_path / "link") == "Extract/a.mrcs"
    names = ["1@Extract/a.mrcs", "2@Extract/a.mrcs", "01@b.mrcs", "2@b.mrcs"]
    rewritten = project_image_names(names, [stack, other], np.array([0, 0, 1, 1]), project)
    assert rewritten.tolist() == ["1@Extract/a.mrcs", "2@Extract/a.mrcs", f"01@{other}", f"2@{other}"]
    assert project_image_names(names[:2], [stack], np.array([0, 0]), project) is None
    absolute = [f"1@{stack}", f"1@{other}"]  # absolute only for stacks outside the project
    assert project_image_names(absolute, [stack, other], np.array([0, 1]), project).tolist() == ["1@Extract/a.mrcs", f"1@{other}"]
    assert stacks_not_found_from(names, project) == ["b.mrcs"]
    assert stacks_not_found_from(names, other.parent) == ["Extract/a.mrcs"]


# --------------------------------------------------------------------------- pose columns


def test_infer_keeps_a_3d_refinement_byte_for_byte(project):
    source, out = project / "Refine3D/job010/run_data.star", project / "Infer/job011/particles_vae.star"
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY"):
        assert loop_text(out, column) == loop_text(source, column), column
    written = ParticleStar(out)
    table = written.particles
    assert written.is_relion31
    # RELION 3.1's own reading of the 3.0 origins: pixels times the pixel size
    np.testing.assert_allclose(table["rlnOriginXAngst"], np.array(loop_text(source, "rlnOriginX"), float) * 1.035)
    for column in ("pvaeAnglePsi", "pvaeOriginXAngst", "pvaeOriginYAngst", "pvaeZ1"):
        assert np.isfinite(table[column].to_numpy(dtype=float)).all(), column
    npz = np.load(out.with_suffix(".npz"))
    np.testing.assert_allclose(npz["pvaeAnglePsi"], table["pvaeAnglePsi"])


def test_infer_says_where_the_pose_goes_and_can_write_the_relion_columns(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert cli.main(["infer", "Train/job002", "--particles", "Refine3D/job010/run_data.star", "--no-refine",
                     "--out", "Infer/job013/particles_vae.star"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "3D angles" in line]
    assert len(lines) == 1 and "pvaeAnglePsi, pvaeOriginXAngst, pvaeOriginYAngst" in lines[0] and "kept" in lines[0]
    assert cli.main(["infer", "Train/job002", "--particles", "Refine3D/job010/run_data.star", "--no-refine",
                     "--poses-to-relion-columns", "--out", "Infer/job012/particles_vae.star"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "3D angles" in line]
    assert len(lines) == 1 and "--poses-to-relion-columns" in lines[0]
    into_relion = ParticleStar(project / "Infer/job012/particles_vae.star").particles
    kept = ParticleStar(project / "Infer/job011/particles_vae.star").particles
    np.testing.assert_allclose(into_relion["rlnAnglePsi"], kept["pvaeAnglePsi"])
    np.testing.assert_allclose(into_relion[["rlnOriginXAngst", "rlnOriginYAngst"]], kept[["pvaeOriginXAngst", "pvaeOriginYAngst"]])
    assert "pvaeAnglePsi" not in into_relion.columns and "rlnOriginX" not in into_relion.columns  # no stale pixel origins
    source = project / "Refine3D/job010/run_data.star"
    for column in ("rlnAngleRot", "rlnAngleTilt"):
        assert loop_text(project / "Infer/job012/particles_vae.star", column) == loop_text(source, column)


def test_refined_poses_of_a_3d_input_go_to_pvae_columns_and_analyze_aligns_with_them(project):
    source, inferred = project / "Refine3D/job020/run_data.star", project / "Infer/job021/particles_vae.star"
    clustered, selected = project / "Analyze/job022/clustered_particles.star", project / "Select/job023/particles.star"
    for column in POSE_3D:
        assert loop_text(inferred, column) == loop_text(source, column) == loop_text(clustered, column) \
            == loop_text(selected, column), column
    table = ParticleStar(inferred).particles
    for column in ("pvaeAnglePsi", "pvaeOriginXAngst", "pvaeAnglePsiStd", "pvaePoseProbability", "pvaeRefineClass",
                   "pvaeRefineClassProbability"):
        assert column in table.columns, column
    # analyze aligns with the pvae pose and re-centres those origins, not the refinement's
    after = ParticleStar(clustered).particles
    np.testing.assert_array_equal(after["pvaeAnglePsi"], table["pvaeAnglePsi"])
    assert not np.allclose(after["pvaeOriginXAngst"], table["pvaeOriginXAngst"])


def test_readers_prefer_the_pvae_pose():
    import pandas as pd

    from particle_vae.analysis.averages import relion_poses

    table = pd.DataFrame({"rlnAnglePsi": [10.0], "rlnOriginXAngst": [1.0], "rlnOriginYAngst": [2.0],
                          "pvaeAnglePsi": [-30.0], "pvaeOriginXAngst": [3.0], "pvaeOriginYAngst": [4.0]})
    psi, origin = relion_poses(table)
    assert psi.tolist() == [-30.0] and origin.tolist() == [[3.0, 4.0]]
    psi, origin = relion_poses(table.drop(columns=["pvaeAnglePsi", "pvaeOriginXAngst", "pvaeOriginYAngst"]))
    assert psi.tolist() == [10.0] and origin.tolist() == [[1.0, 2.0]]


# --------------------------------------------------------------------------- RELION itself


def test_relion_reads_every_star_written_from_the_project_folder(relion, project):
    for number, star in enumerate(WRITTEN):
        rows = len(ParticleStar(project / star))
        run_relion(project, "relion_stack_create", "--i", star, "--o", f"Check/stack{number}")
        assert MRCStack(project / "Check" / f"stack{number}.mrcs").n_images == rows, star
        run_relion(project, "relion_star_handler", "--i", star, "--o", f"Check/handled{number}.star")
        handled = ParticleStar(project / "Check" / f"handled{number}.star")
        assert len(handled) == rows and set(ParticleStar(project / star).particles.columns) <= set(handled.particles.columns)
    # RELION keeps the refinement's pose: what it writes back has the input's values
    handled = ParticleStar(project / "Check" / f"handled{WRITTEN.index('Infer/job011/particles_vae.star')}.star").particles
    source = ParticleStar(project / "Refine3D/job010/run_data.star").particles
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        np.testing.assert_allclose(handled[column], source[column], atol=1e-5)


def _correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=(1, 2), keepdims=True)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    return (a * b).sum(axis=(1, 2)) / np.sqrt((a * a).sum(axis=(1, 2)) * (b * b).sum(axis=(1, 2)))


def test_relion_apply_transformation_with_our_poses_lines_up_simulated_particles(relion, project):
    """The true poses, turned into the model's pose and written as infer writes it, undone by RELION itself."""
    from particle_vae.conventions import relion_to_model_pose
    from particle_vae.engine.inference import InferenceResult, result_columns

    simulated = ParticleStar(project / "Simulate/job001/particles.star")
    truth = simulated.particles
    theta, t = relion_to_model_pose(truth["pvaeTrueAnglePsi"].to_numpy(), truth["pvaeTrueOriginXAngst"].to_numpy(),
                                    truth["pvaeTrueOriginYAngst"].to_numpy(), APIX)
    result = InferenceResult(theta=theta, t=t, z_mean=np.zeros((N, 1)), z_std=np.ones((N, 1)), extra={})
    simulated.with_columns(result_columns(result, APIX)).write(project / "Poses/job040/true_poses.star")
    run_relion(project, "relion_stack_create", "--i", "Poses/job040/true_poses.star", "--o", "Poses/job040/aligned",
               "--apply_transformation")
    read = lambda path: MRCStack(path).read(0, N).astype(np.float64)
    centred = read(project / "Simulate/job001/centred.mrcs")
    aligned = _correlations(read(project / "Poses/job040/aligned.mrcs"), centred)
    raw = _correlations(read(project / "Simulate/job001/particles.mrcs"), centred)
    assert aligned.mean() > 0.98 and aligned.min() > 0.95, aligned
    assert aligned.mean() > raw.mean() + 0.15, (aligned.mean(), raw.mean())
