"""`particle-vae select`: subsets by class and by a box in latent space."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from particle_vae import cli
from particle_vae.analysis.clustering import box_rows, class_rows
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import ParticleStar, image_name, make_particle_star

N = 30


@pytest.fixture
def classified(tmp_path):
    """A RELION 3.1 STAR with a stack, CTF and pose columns, latents and classes 1..4."""
    rng = np.random.default_rng(0)
    stack = write_stack(tmp_path / "data" / "particles.mrcs", rng.normal(size=(N, 16, 16)).astype(np.float32), 2.0)
    columns = {
        "rlnDefocusU": rng.uniform(1e4, 2e4, N), "rlnDefocusV": rng.uniform(1e4, 2e4, N),
        "rlnAnglePsi": rng.uniform(-180, 180, N), "rlnOriginXAngst": rng.normal(size=N), "rlnOriginYAngst": rng.normal(size=N),
        "pvaeZ1": rng.normal(size=N), "pvaeZ2": rng.normal(size=N), "pvaeZStd1": np.full(N, 0.2),
        "rlnClassNumber": np.arange(N) % 4 + 1,
    }
    star = make_particle_star([image_name(i, stack.name) for i in range(N)], 2.0, 16, columns=columns)
    return star.write(tmp_path / "data" / "classified.star")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_select_classes_keeps_rows_columns_and_optics(classified, tmp_path):
    out = tmp_path / "elsewhere" / "subset.star"
    assert cli.main(["-q", "select", str(classified), "--classes", "1", "3", "--out", str(out)]) == 0
    source, subset = ParticleStar(classified), ParticleStar(out)
    rows = np.flatnonzero(source.particles["rlnClassNumber"].isin([1, 3]).to_numpy())
    assert len(subset) == len(rows) == 15
    assert list(subset.particles.columns) == list(source.particles.columns)
    expected = source.particles.iloc[rows].reset_index(drop=True)
    for column in source.particles.columns:
        if column != "rlnImageName":
            pd.testing.assert_series_equal(subset.particles[column], expected[column], check_names=False)
    assert subset.optics.equals(source.optics)
    # written to another folder: the image names still lead to the same images
    locations = subset.image_locations()
    assert locations.stack_paths[0].resolve() == (classified.parent / "particles.mrcs").resolve()
    assert (locations.image_index == rows).all()


def test_select_box_on_latents_and_with_classes(classified, tmp_path):
    source = ParticleStar(classified).particles
    z1, z2 = source["pvaeZ1"].to_numpy(), source["pvaeZ2"].to_numpy()
    inside = (z1 >= -0.5) & (z1 <= 1.0) & (z2 >= -1.0) & (z2 <= 0.8)
    out = tmp_path / "box.star"
    assert cli.main(["-q", "select", str(classified), "--box", "-0.5", "1.0", "-1.0", "0.8", "--out", str(out)]) == 0
    np.testing.assert_array_equal(ParticleStar(out).particles["pvaeZ1"].to_numpy(), z1[inside])
    both = tmp_path / "both.star"
    assert cli.main(["-q", "select", str(classified), "--box", "-0.5", "1.0", "-1.0", "0.8", "--classes", "2",
                     "--out", str(both)]) == 0
    keep = inside & (source["rlnClassNumber"].to_numpy() == 2)
    assert (ParticleStar(both).image_locations().image_index == np.flatnonzero(keep)).all()
    other = tmp_path / "other.star"
    assert cli.main(["-q", "select", str(classified), "--box", "0", "90", "-3", "0", "--columns", "rlnAnglePsi",
                     "rlnOriginXAngst", "--out", str(other)]) == 0
    psi, ox = source["rlnAnglePsi"].to_numpy(), source["rlnOriginXAngst"].to_numpy()
    assert len(ParticleStar(other)) == int(((psi >= 0) & (psi <= 90) & (ox >= -3) & (ox <= 0)).sum())


def test_select_refuses_to_overwrite_its_input(classified, capsys):
    before = classified.read_bytes()
    assert cli.main(["-q", "select", str(classified), "--classes", "1", "--overwrite", "--out", str(classified)]) == 2
    assert "is an input of this command" in _one_line(capsys)
    assert classified.read_bytes() == before


def test_select_needs_overwrite_for_an_existing_output(classified, tmp_path, capsys):
    out = tmp_path / "subset.star"
    out.write_text("old")
    assert cli.main(["-q", "select", str(classified), "--classes", "1", "--out", str(out)]) == 2
    assert "already exists" in _one_line(capsys) and out.read_text() == "old"
    assert cli.main(["-q", "select", str(classified), "--classes", "1", "--overwrite", "--out", str(out)]) == 0
    assert len(ParticleStar(out)) == 8


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--classes", "2", "7"], "no particle has rlnClassNumber 7 (present: 1, 2, 3, 4)"),
        (["--box", "0", "1", "0", "1", "--columns", "pvaeZ1", "pvaeZ9"], "has no column pvaeZ9"),
        (["--box", "1", "0", "0", "1"], "minimum 1 above its maximum 0"),
        (["--box", "50", "60", "50", "60"], "no particle matches"),
        ([], "nothing to select"),
        (["--classes", "1", "--columns", "pvaeZ1", "pvaeZ2"], "give --box too"),
        (["--classes", "1", "--class-column", "rlnGroupNumber"], "has no rlnGroupNumber column"),
    ],
)
def test_select_errors_are_one_line(classified, tmp_path, capsys, args, expected):
    out = tmp_path / "subset.star"
    assert cli.main(["-q", "select", str(classified), *args, "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert expected in err, err
    assert not out.exists()


def test_select_without_classes_names_the_fix(tmp_path, capsys):
    star = make_particle_star([image_name(i, "absent.mrcs") for i in range(4)], 1.0, 16, columns={"pvaeZ1": np.zeros(4)})
    path = star.write(tmp_path / "latents.star")
    assert cli.main(["-q", "select", str(path), "--classes", "1", "--out", str(tmp_path / "s.star")]) == 2
    err = _one_line(capsys)
    assert "latents.star: has no rlnClassNumber column" in err and "particle-vae analyze" in err


def test_row_masks():
    frame = pd.DataFrame({"rlnClassNumber": [1, 2, 3, 2], "a": [0.0, 1.0, 2.0, 3.0], "b": [5.0, 5.0, 6.0, 7.0]})
    assert class_rows(frame, [2]).tolist() == [False, True, False, True]
    assert box_rows(frame, ["a", "b"], [1, 3, 5, 6]).tolist() == [False, True, True, False]
    with pytest.raises(KeyError):
        box_rows(frame, ["a", "c"], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="4 bounds"):
        box_rows(frame, ["a", "b"], [0, 1])
