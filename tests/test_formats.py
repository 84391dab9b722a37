"""Files from other programs: RELION 5 STARs (CTF premultiplication, optics aberrations), `info` on
metadata alone, cryoSPARC .cs particle files in and out (`export`), on the real files of
../shared/data/cryoem/formats (``formats_dir``: whole files) and on the small files in their layout that
tests/data/fixtures holds (``fixtures_dir``: same names, blocks, columns and fields, values invented by its
make_fixtures.py; manifest.json there says how many rows and which values)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from particle_vae import cli
from particle_vae.conventions import euler_to_matrix, matrix_to_euler
from particle_vae.data.ctf import ctf_from_table, effective_ctf
from particle_vae.io.cryosparc import UID_COLUMN, cryosparc_to_star, read_cryosparc
from particle_vae.io.star import PROJECT_LEVELS_SEARCHED, ParticleStar, read_star, write_star

REPO = Path(__file__).resolve().parents[1]
J2 = "cryosparc_J2_particles_exported.cs"  # 22 particles, alignments2D, exported ('>' paths)
P12 = "cryosparc_P12_J24_001_particles.cs"  # 2,019 particles, alignments3D
RELION5 = "relion5.star"
SHIPPED = [RELION5, "relion31.6opticsgroups.star", "FinalRefinement-OriginalParticles-PfCRT.star", J2, P12]


@pytest.fixture(scope="session")
def formats_dir() -> Path:
    """The shipped files; a missing folder skips, except under CI where it is a failure."""
    value = os.environ.get("PARTICLE_VAE_DATA")
    folder = (Path(value) if value else REPO.parent / "shared" / "data") / "cryoem" / "formats"
    if not folder.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"reference data {folder} missing under CI")
        pytest.skip("reference data not found: set PARTICLE_VAE_DATA or place it at ../shared/data")
    return folder


def kept(fixtures_dir: Path, name: str, what: str = "rows") -> int:
    """How many rows (or stacks, images, ...) the fixture ``name`` holds (tests/data/fixtures/manifest.json)."""
    return json.loads((fixtures_dir / "manifest.json").read_text())[name][what]


def made(fixtures_dir: Path, name: str) -> dict:
    """The values make_fixtures.py invented for the fixture ``name`` and wrote into it (manifest.json)."""
    return kept(fixtures_dir, name, "values")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- info on every shipped file


def test_info_no_images_summarises_every_shipped_file(formats_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    summaries = {}
    for name in SHIPPED:
        code, out, err = run(["info", "--no-images", "--json", str(formats_dir / name)], capsys)
        assert code == 0, err
        summaries[name] = json.loads(out)
    relion5 = summaries[RELION5]
    assert relion5["star_version"] == "50001" and relion5["particles"] == 17 and relion5["optics_groups"] == 1
    assert relion5["stacks"] == 2 and relion5["stacks_found"] == 2 and relion5["box_px"] == [448]
    assert relion5["optics"][0]["premultiplied"] is False and relion5["ctf"]["voltage_kv"] == [100.0]
    assert [a.split(" (")[0] for a in relion5["optics"][0]["aberrations"]] == ["beam tilt", "odd Zernike", "even Zernike",
                                                                              "magnification matrix [[1.00183, -0.000704404], [-0.000823335, 1.00038]]"]
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(relion5["pose_columns"])
    polished = summaries["relion31.6opticsgroups.star"]
    assert polished["particles"] == 139 and polished["optics_groups"] == 6 and polished["stacks_found"] == 0
    assert polished["pixel_size_angst"] is None and polished["pixel_size_problem"].startswith("1.24/1.25 A in different optics groups")
    assert polished["first_missing_stack"]["name"] == "Polish/job520/Micrographs/0003_shiny.mrcs"
    assert polished["first_missing_stack"]["looked_in"] == [str(formats_dir / "Polish/job520/Micrographs/0003_shiny.mrcs"),
                                                           str(formats_dir / "0003_shiny.mrcs"),
                                                           str(tmp_path / "Polish/job520/Micrographs/0003_shiny.mrcs")] + [
        str(folder / "Polish/job520/Micrographs/0003_shiny.mrcs")
        for folder in list(formats_dir.resolve().parents)[:PROJECT_LEVELS_SEARCHED]]  # a project folder above the STAR's
    refined = summaries["FinalRefinement-OriginalParticles-PfCRT.star"]
    assert refined["star_format"] == "RELION 3.0" and refined["particles"] == 5 and refined["pixel_size_angst"] == pytest.approx(1.035)
    assert refined["pose_columns"] == ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY"]
    assert refined["ctf"].startswith("not available") and "rlnAmplitudeContrast" in refined["ctf"]
    j2 = summaries[J2]
    assert j2["kind"] == "cryosparc" and j2["particles"] == 22 and j2["box_px"] == [300] and j2["pixel_size_angst"] == pytest.approx(1.345)
    assert j2["pose_columns"] == ["rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"] and j2["ctf"]["voltage_kv"] == [300.0]
    assert j2["first_missing_stack"]["name"].startswith(">J1/imported/") and j2["cryosparc"]["slots"] == ["alignments2D", "blob", "ctf"]
    p12 = summaries[P12]
    assert p12["particles"] == 2019 and p12["stacks"] == 50 and p12["ctf"]["amplitude_contrast"] == [0.07]
    assert p12["pose_columns"] == ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]


def test_info_shows_the_metadata_then_one_line_error(fixtures_dir, capsys):
    # relion5.star's optics give an image size its stacks do not have (448 px against 30 px in the RELION 5 file it is
    # modelled on): the file itself is inconsistent
    optics, box = made(fixtures_dir, RELION5), kept(fixtures_dir, "toy_images_a.mrcs", "box")
    assert optics["image_size"] != box == kept(fixtures_dir, "toy_images_b.mrcs", "box")
    code, out, err = run(["info", "--sample", "0", str(fixtures_dir / RELION5)], capsys)
    assert code == 2 and f"particles       {kept(fixtures_dir, RELION5)}\n" in out
    assert f"optics group    1 (opticsGroup1): {optics['pixel_size']:g} A/px, {optics['image_size']} px" in out
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"rlnImageSize says {optics['image_size']} px but the stacks hold {box}x{box} px images" in err
    # missing stacks: the metadata first (where the stacks were looked for), then the error naming --stack-dir
    polished = "relion31.6opticsgroups.star"
    code, out, err = run(["info", str(fixtures_dir / polished)], capsys)
    assert code == 2 and f" {kept(fixtures_dir, polished, 'stacks')} named, 0 found" in out and "looked for as" in out
    assert err.count("\n") == 1 and "--stack-dir" in err
    code, out, err = run(["info", str(fixtures_dir / P12)], capsys)
    assert code == 2 and f"particles       {kept(fixtures_dir, P12)}\n" in out and err.count("\n") == 1
    stacks = kept(fixtures_dir, P12, "stacks")
    project_job = made(fixtures_dir, P12)["first_blob_path"].split("/")[0]  # J19 in the cryoSPARC file it is modelled on
    assert stacks > 1 and "blob/path" in err and f"nor {stacks - 1} other stack(s) of {stacks}" in err
    assert f"the folder holding {project_job}/)" in err


def test_info_warns_when_relion_run_here_would_miss_the_stacks(cryoem_dir, capsys, monkeypatch, tmp_path):
    star = cryoem_dir / "relion31" / "relion31.star"
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["info", "--sample", "0", str(star)], capsys)
    assert code == 0
    warning = next(line for line in out.splitlines() if line.startswith("  warning"))
    assert f"run RELION in {star.parent}" in warning and f"particle-vae export {star} --to relion" in warning
    monkeypatch.chdir(star.parent)
    code, out, _ = run(["info", "--sample", "0", "--json", str(star)], capsys)
    assert code == 0 and "relion_paths_warning" not in json.loads(out)


# --------------------------------------------------------------------------- RELION 5: optics kept, premultiplied CTF


def test_relion5_optics_fields_survive_a_rewrite(fixtures_dir, tmp_path):
    original = read_star(fixtures_dir / RELION5)
    again = read_star(write_star(tmp_path / "copy.star", original))
    for name in ("optics", "particles"):
        assert list(again.blocks[name].columns) == list(original.blocks[name].columns)
        assert again.blocks[name].astype(str).equals(original.blocks[name].astype(str)), name
    optics, values = again.blocks["optics"].iloc[0], made(fixtures_dir, RELION5)
    assert optics["rlnOddZernike"] == values["odd_zernike"] and optics["rlnMagMat01"] == pytest.approx(values["mag_mat"][1])


def premultiplied_copy(folder: Path, tmp_path: Path) -> Path:
    """relion5.star with the 0 of its optics row's rlnCtfDataAreCtfPremultiplied (the 10th value) made 1, nothing else."""
    text = (folder / RELION5).read_text()
    assert "\n_rlnCtfDataAreCtfPremultiplied #10 \n" in text
    row = next(line for line in text.splitlines() if line.startswith("opticsGroup1 "))
    parts = re.split(r"(\s+)", row)  # value, spaces, value, ...
    assert parts[18] == "0"
    parts[18] = "1"
    path = tmp_path / "premultiplied.star"
    path.write_text(text.replace(row, "".join(parts)))
    return path


def test_premultiplied_particles_get_the_ctf_squared_in_the_training_likelihood(fixtures_dir, tmp_path):
    from particle_vae.api import ctf_provider

    plain = ParticleStar(fixtures_dir / RELION5)
    assert not plain.ctf_parameters()["premultiplied"].any()
    star = ParticleStar(premultiplied_copy(fixtures_dir, tmp_path))
    table = star.ctf_parameters()
    assert table["premultiplied"].all()
    physical = ctf_from_table(table, 32, 2.0, dtype=torch.float64)
    assert torch.allclose(effective_ctf(table, 32, 2.0, dtype=torch.float64), physical ** 2)
    mixed = table.copy()
    mixed.loc[1::2, "premultiplied"] = False
    both = effective_ctf(mixed, 32, 2.0, dtype=torch.float64)
    assert torch.allclose(both[0::2], physical[0::2] ** 2) and torch.allclose(both[1::2], physical[1::2])
    prepared = SimpleNamespace(source=SimpleNamespace(star=star), pixel_size=2.0, box=32)
    ctf_for = ctf_provider(prepared, SimpleNamespace(config=SimpleNamespace(likelihood="gaussian")))
    assert torch.allclose(ctf_for(torch.arange(3)).double(), physical[:3] ** 2, atol=1e-6)


# --------------------------------------------------------------------------- cryoSPARC -> RELION


def test_cryosparc_2d_alignments_become_psi_and_origins(fixtures_dir):
    records = read_cryosparc(fixtures_dir / J2)
    star = cryosparc_to_star(records, fixtures_dir / J2)
    row, first = star.particles.iloc[0], records[0]
    psize, values = float(np.float32(first["blob/psize_A"])), made(fixtures_dir, J2)
    assert values["blob_path"].startswith(">") and first["blob/idx"] == 0
    assert row["rlnImageName"] == "000001@" + values["blob_path"][1:]  # exported '>' path: relative to the project
    assert row["rlnAnglePsi"] == pytest.approx(np.degrees(first["alignments2D/pose"]))  # psi = degrees(pose)
    shift_x, shift_y = values["first_shift"]
    assert first["alignments2D/shift"].tolist() == [shift_x, shift_y] and 0 != shift_x != shift_y != 0
    assert (row["rlnOriginXAngst"], row["rlnOriginYAngst"]) == pytest.approx((shift_x * psize, shift_y * psize))  # origin = shift * psize
    assert row["rlnDefocusU"] == float(first["ctf/df1_A"]) and row["rlnDefocusV"] == float(first["ctf/df2_A"])
    assert row["rlnDefocusAngle"] == pytest.approx(np.degrees(first["ctf/df_angle_rad"]))
    assert row["rlnClassNumber"] == first["alignments2D/class"] + 1 and "rlnRandomSubset" not in star.particles
    optics = star.optics.iloc[0]
    assert (optics["rlnVoltage"], optics["rlnSphericalAberration"], optics["rlnAmplitudeContrast"]) == (
        values["voltage"], values["cs"], values["amplitude_contrast"])  # 300.0, 2.7, 0.07: float32 to their shortest decimals
    assert np.float32(optics["rlnImagePixelSize"]) == first["blob/psize_A"] and optics["rlnImageSize"] == values["box"]
    assert star.particles[UID_COLUMN].to_numpy().astype(np.uint64).tolist() == records["uid"].tolist()


def test_cryosparc_3d_pose_is_relion_euler_of_the_transposed_rotation(fixtures_dir):
    records = read_cryosparc(fixtures_dir / P12)
    star = cryosparc_to_star(records, fixtures_dir / P12)
    angles = star.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    expected = np.transpose(Rotation.from_rotvec(records["alignments3D/pose"].astype(np.float64)).as_matrix(), (0, 2, 1))
    assert np.abs(euler_to_matrix(*angles.T) - expected).max() < 1e-9
    assert star.particles["rlnRandomSubset"].tolist() == (records["alignments3D/split"] + 1).tolist()
    # a turn about z alone is an in-plane turn: RELION psi = cryoSPARC's angle, as for 2D alignments
    turn = records[:1].copy()
    turn["alignments3D/pose"] = [0.0, 0.0, 0.5]
    row = cryosparc_to_star(turn).particles.iloc[0]
    assert (row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"]) == pytest.approx((0.0, 0.0, np.degrees(0.5)))


def test_matrix_to_euler_inverts_euler_to_matrix():
    rng = np.random.default_rng(4)
    angles = np.stack([rng.uniform(-180, 180, 200), rng.uniform(1, 179, 200), rng.uniform(-180, 180, 200)], axis=1)
    assert np.abs(matrix_to_euler(euler_to_matrix(*angles.T)) - angles).max() < 1e-9
    poles = euler_to_matrix([10.0, 10.0], [0.0, 180.0], [20.0, 20.0])
    assert np.abs(euler_to_matrix(*matrix_to_euler(poles).T) - poles).max() < 1e-12


# --------------------------------------------------------------------------- the round trip through `export`


def read_csg(path: Path) -> dict:
    """A .csg file read by the plain text rules of the block YAML cryoSPARC writes (two-space indents,
    ``key: value``, single-quoted scalars with '' for a quote); checked against PyYAML where installed."""
    root: dict = {}
    stack = [(-1, root)]
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, _, value = line.strip().partition(": ") if ": " in line else (line.strip().rstrip(":"), "", "")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value == "":
            parent[key] = {}
            stack.append((indent, parent[key]))
        elif value.startswith("'") and value.endswith("'"):
            parent[key] = value[1:-1].replace("''", "'")
        else:
            parent[key] = int(value) if value.isdigit() else value
    try:
        import yaml
    except ImportError:
        return root
    parsed = yaml.safe_load(path.read_text())
    parsed["created"] = str(parsed["created"])  # YAML reads the timestamp as a datetime
    assert parsed == root, (parsed, root)
    return root


def assert_same_records(got: np.ndarray, expected: np.ndarray, skip=()) -> None:
    assert got.dtype == expected.dtype
    for field in expected.dtype.names:
        if field not in skip:
            floats = expected.dtype[field].base.kind == "f"
            assert np.array_equal(got[field], expected[field], equal_nan=floats), field


def test_nan_in_a_cryosparc_float_field_survives_the_round_trip(fixtures_dir, tmp_path, capsys, monkeypatch):
    """A NaN is a value of a float field (a score cryoSPARC could not compute), not a gap."""
    monkeypatch.chdir(tmp_path)
    records = np.load(fixtures_dir / P12)
    # a score (not a pixel size or a CTF value, which must be numbers)
    float_fields = [name for name in records.dtype.names if records.dtype[name].kind == "f" and not records.dtype[name].shape
                    and name.endswith("/error")]
    records[float_fields[0]][1] = np.nan
    with open("nan.cs", "wb") as handle:
        np.save(handle, records)
    assert run(["-q", "export", "nan.cs", "--to", "relion", "--out", "p.star"], capsys)[0] == 0
    assert run(["-q", "export", "p.star", "--to", "cryosparc", "--out", "back.cs"], capsys)[0] == 0
    back = np.load("back.cs")
    assert np.isnan(back[float_fields[0]][1])
    assert_same_records(back, records)


def test_a_damaged_kept_cryosparc_column_is_a_one_line_error(fixtures_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["-q", "export", str(fixtures_dir / J2), "--to", "relion", "--out", "p.star"], capsys)[0] == 0
    text = Path("p.star").read_text()
    column = next(line.split()[0] for line in text.splitlines() if line.startswith("_pvaeCs_f4_"))
    Path("bad.star").write_text(text.replace(column + " ", column.replace("_pvaeCs_f4_", "_pvaeCs_i3_") + " ", 1))
    code, _, err = run(["-q", "export", "bad.star", "--to", "cryosparc", "--out", "bad.cs"], capsys)
    message = [line for line in err.strip().splitlines() if "WARNING" not in line]  # the stacks are not shipped
    assert code == 2 and len(message) == 1 and "i3" in message[0] and "Traceback" not in err


@pytest.mark.parametrize("folder, name", [pytest.param("formats_dir", name, id=name) for name in (J2, P12)]
                         + [pytest.param("fixtures_dir", name, id=f"fixtures/{name}") for name in (J2, P12)])
def test_cs_to_star_and_back_gives_every_field_back_exactly(request, tmp_path, capsys, monkeypatch, folder, name):
    """Whole files (formats_dir), and the rows tests/data/fixtures keeps of them (fixtures_dir, run without the data)."""
    source = request.getfixturevalue(folder)
    monkeypatch.chdir(tmp_path)
    original = np.load(source / name)
    assert run(["-q", "export", str(source / name), "--to", "relion", "--out", "p.star"], capsys)[0] == 0
    assert run(["-q", "export", "p.star", "--to", "cryosparc", "--out", "plain.cs"], capsys)[0] == 0
    assert run(["-q", "export", "p.star", "--to", "cryosparc", "--template", str(source / name), "--out", "t.cs"], capsys)[0] == 0
    # without a template, from the STAR alone: every field (scores, ctf/type, blob/import_sig, '>' paths, 3D poses
    # with their turns of 2 pi, ...) in its order and type, value for value
    assert_same_records(np.load("plain.cs"), original)
    assert_same_records(np.load("t.cs"), original)  # the template route, bit for bit as before
    # RELION's programs rewrite a STAR with six decimals: that still counts as unchanged
    star = read_star("p.star")
    particles = star.blocks["particles"]
    for column in particles.columns:
        if column.startswith("rln") and particles[column].dtype.kind == "f":
            particles[column] = particles[column].round(6)
    star.blocks["optics"]["rlnImagePixelSize"] = star.blocks["optics"]["rlnImagePixelSize"].round(6)
    write_star("six.star", star)
    assert run(["-q", "export", "six.star", "--to", "cryosparc", "--out", "six.cs"], capsys)[0] == 0
    assert_same_records(np.load("six.cs"), original)
    # --drop-cryosparc-fields: the converted fields only
    assert run(["-q", "export", str(source / name), "--to", "relion", "--drop-cryosparc-fields", "--out", "lean.star"], capsys)[0] == 0
    assert not [c for c in ParticleStar("lean.star").particles.columns if c.startswith("pvaeCs_")]
    assert run(["-q", "export", "lean.star", "--to", "cryosparc", "--out", "lean.cs"], capsys)[0] == 0
    lean = np.load("lean.cs")
    slot = "alignments2D" if "alignments2D/pose" in original.dtype.names else "alignments3D"
    assert (lean[f"{slot}/error"] == 0).all() and (original[f"{slot}/error"] != 0).any()  # scores at neutral values
    assert np.array_equal(lean["ctf/df1_A"], original["ctf/df1_A"]) and "blob/import_sig" not in lean.dtype.names


def test_changed_relion_columns_win_over_the_kept_values(fixtures_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "a").mkdir()
    for name in (J2, P12):
        monkeypatch.chdir(tmp_path / "a" if name == J2 else tmp_path)
        original = np.load(fixtures_dir / name)
        assert len(original) > 3  # particles 0 and 1 changed, 2 dropped, the rest untouched
        assert run(["-q", "export", str(fixtures_dir / name), "--to", "relion", "--out", "p.star"], capsys)[0] == 0
        star = ParticleStar("p.star")
        angle = "rlnAnglePsi" if name == J2 else "rlnAngleRot"
        angles = star.particles[angle].to_numpy().copy()
        angles[0] += 10.0
        defocus = star.particles["rlnDefocusU"].to_numpy().copy()
        defocus[1] += 500.0
        keep = np.arange(len(star)) != 2  # and a selection: particle 3 dropped
        star.with_columns({angle: angles, "rlnDefocusU": defocus}).subset(np.flatnonzero(keep)).write("changed.star")
        assert run(["-q", "export", "changed.star", "--to", "cryosparc", "--out", "changed.cs"], capsys)[0] == 0
        got, expected = np.load("changed.cs"), original[keep]
        assert len(got) == len(original) - 1
        slot = "alignments2D" if name == J2 else "alignments3D"
        assert_same_records(got[2:], expected[2:])  # the untouched particles, value for value
        assert_same_records(got[:2], expected[:2], skip=(f"{slot}/pose", "ctf/df1_A"))
        assert got["ctf/df1_A"][1] == np.float32(defocus[1]) and got["ctf/df1_A"][0] == expected["ctf/df1_A"][0]
        assert np.array_equal(got[f"{slot}/pose"][1:], expected[f"{slot}/pose"][1:])
        if name == J2:
            assert got[f"{slot}/pose"][0] == np.float32(np.mod(np.radians(angles[0]), 2 * np.pi))
        else:  # the new rotation, as RELION's Euler angles say
            rotation = Rotation.from_rotvec(got[f"{slot}/pose"][0].astype(np.float64)).as_matrix().T
            row = star.particles.iloc[0]
            assert np.abs(rotation - euler_to_matrix([angles[0]], [row["rlnAngleTilt"]], [row["rlnAnglePsi"]])[0]).max() < 1e-6


def test_kept_text_and_integer_fields_survive_any_value(tmp_path):
    """Text that STAR readers would take for a number, a missing value or a keyword, bytes outside ASCII,
    booleans, signed and 64-bit integers and integer arrays all come back unchanged."""
    from particle_vae.io.cryosparc import kept_records

    texts = [b"", b"01", b"nan", b"NA", b"data_x", b"_x", b"-1e5", b"a b#c;'d\"", b"%41", b"\xff\xfeutf", b"True", b"ok/path.mrc"]
    n = len(texts)
    records = np.zeros(n, dtype=[("uid", "<u8"), ("blob/path", "S16"), ("blob/idx", "<u4"), ("location/micrograph_path", "S16"),
                                 ("location/name", "<U6"), ("pick_stats/flag", "?"), ("pick_stats/offset", "<i8"),
                                 ("pick_stats/big", "<u8"), ("location/micrograph_shape", "<u4", (2,)), ("x/grid", "<f8", (2, 3))])
    records["uid"] = np.arange(n, dtype=np.uint64) + np.uint64(2 ** 63)
    records["blob/path"] = b"stack.mrcs"
    records["blob/idx"] = np.arange(n)
    records["location/micrograph_path"] = texts
    records["location/name"] = ["", "1", "é", "x y", "None", "0.5"] * 2
    records["pick_stats/flag"] = np.arange(n) % 2 == 0
    records["pick_stats/offset"] = -(2 ** 62) + np.arange(n)
    records["pick_stats/big"] = np.uint64(2 ** 64 - 1) - np.arange(n, dtype=np.uint64)
    records["location/micrograph_shape"] = [[3710, 3838]] * n
    records["x/grid"] = np.random.default_rng(0).normal(size=(n, 2, 3))
    path = cryosparc_to_star(records).write(tmp_path / "odd.star")
    again = kept_records(ParticleStar(path))
    assert_same_records(again, records)


def test_cryosparc_beam_tilt_becomes_relion_beam_tilt_in_mrad(fixtures_dir, tmp_path, capsys, monkeypatch):
    from particle_vae.io.cryosparc import beam_tilt_mrad

    # hand-computed: a coma coefficient of 270 nm = 2700 A at Cs 2.7 mm is a beam tilt of 2700 / (2.7 * 1e4) = 0.1 mrad
    # (RELION's developers quote the same pair: "Cs = 2.7 mm, 0.1 mrad beam tilt -> 270 nm axial coma", RELION issue 698)
    assert beam_tilt_mrad([[2700.0, -1350.0]], [2.7]) == pytest.approx(np.array([[0.1, -0.05]]), rel=1e-12)
    # the phase RELION applies for that tilt (selfApplyBeamTilt: 0.360 Cs[mm] 1e7 lambda^2 |k|^2 (k . tilt[mrad]) degrees)
    # equals 2 pi lambda^2 |k|^2 (k . t) with the coma coefficient t in Angstrom
    from particle_vae.data.ctf import electron_wavelength
    lam, k = electron_wavelength(300.0), np.array([0.21, -0.13])
    relion_rad = np.radians(0.360 * 2.7 * 1e7 * lam ** 2 * (k @ k) * (k @ np.array([0.1, -0.05])))
    assert relion_rad == pytest.approx(2 * np.pi * lam ** 2 * (k @ k) * (k @ np.array([2700.0, -1350.0])), rel=1e-12)

    monkeypatch.chdir(tmp_path)
    records = read_cryosparc(fixtures_dir / J2)
    records["ctf/tilt_A"] = [2700.0, -1350.0]
    with open("tilted.cs", "wb") as handle:
        np.save(handle, records)
    star = cryosparc_to_star(records)
    optics = star.optics.iloc[0]
    assert (optics["rlnBeamTiltX"], optics["rlnBeamTiltY"]) == pytest.approx((0.1, -0.05), rel=1e-9)
    assert run(["-q", "export", "tilted.cs", "--to", "relion", "--out", "tilted.star"], capsys)[0] == 0
    assert run(["-q", "export", "tilted.star", "--to", "cryosparc", "--out", "back.cs"], capsys)[0] == 0
    assert_same_records(np.load("back.cs"), records)
    # a changed RELION beam tilt comes back as ctf/tilt_A = mrad * Cs[mm] * 1e4
    tilted = read_star("tilted.star")
    tilted.blocks["optics"]["rlnBeamTiltX"] = 0.2
    write_star("more.star", tilted)
    assert run(["-q", "export", "more.star", "--to", "cryosparc", "--out", "more.cs"], capsys)[0] == 0
    assert np.load("more.cs")["ctf/tilt_A"][:, 0] == pytest.approx(5400.0, rel=1e-6)
    # a RELION 5 STAR without a template: its rlnBeamTiltX/Y (mrad) at its Cs (mm)
    code, _, err = run(["export", str(fixtures_dir / RELION5), "--to", "cryosparc", "--out", "r5.cs"], capsys)
    assert code == 0, err
    (tilt_x, tilt_y), cs = made(fixtures_dir, RELION5)["beam_tilt"], made(fixtures_dir, RELION5)["cs"]
    assert tilt_x != 0 != tilt_y and np.load("r5.cs")["ctf/tilt_A"][0] == pytest.approx([tilt_x * cs * 1e4, tilt_y * cs * 1e4], rel=1e-6)
    assert "rlnOddZernike, rlnEvenZernike, rlnMagMat00" in err and "rlnBeamTiltX" not in err


def test_a_csg_result_group_is_written_beside_the_cs(fixtures_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["-q", "export", str(fixtures_dir / P12), "--to", "relion", "--out", "p.star"], capsys)[0] == 0
    assert run(["-q", "export", "p.star", "--to", "cryosparc", "--out", "out/sel.cs"], capsys)[0] == 0
    group = read_csg(Path("out/sel.csg"))
    assert set(group) == {"created", "group", "results"} and group["group"]["type"] == "particle"
    assert group["results"] == {slot: {"metafile": ">sel.cs", "num_items": kept(fixtures_dir, P12), "type": f"particle.{slot}"}
                                for slot in ("alignments3D", "blob", "ctf")}
    # an export's own .csg beside the template lends its group and cryoSPARC version
    export = tmp_path / "exports" / "J24_particles"
    export.mkdir(parents=True)
    shutil.copy(fixtures_dir / J2, export / "J24_particles_exported.cs")
    (export / "J24_particles_exported.csg").write_text(
        "created: 2024-05-01 10:00:00.000000\ngroup:\n  description: All particles\n  name: particles\n  title: All particles\n"
        f"  type: particle\nresults:\n  blob:\n    metafile: '>J24_particles_exported.cs'\n    num_items: {kept(fixtures_dir, J2)}\n"
        "    type: particle.blob\nversion: v4.4.1\n")
    assert run(["-q", "export", str(export / "J24_particles_exported.cs"), "--to", "relion", "--out", "j.star"], capsys)[0] == 0
    ParticleStar("j.star").subset(np.arange(5)).write("five.star")
    target = export / "it's five.cs"
    code, _, err = run(["-q", "export", "five.star", "--to", "cryosparc", "--template", str(export / "J24_particles_exported.cs"),
                        "--out", str(target)], capsys)
    assert code == 0, err
    group = read_csg(target.with_suffix(".csg"))
    assert group["version"] == "v4.4.1" and group["group"]["title"] == "All particles"
    assert group["results"]["alignments2D"] == {"metafile": ">it's five.cs", "num_items": 5, "type": "particle.alignments2D"}
    assert set(group["results"]) == {"alignments2D", "blob", "ctf"}
    # an existing .csg is refused before anything is written; --no-csg writes none
    code, _, err = run(["export", "p.star", "--to", "cryosparc", "--out", "out/sel.cs"], capsys)
    assert code == 2 and err.count("\n") == 1 and "sel.cs" in err and "--overwrite" in err
    Path("out/sel.cs").unlink()
    code, _, err = run(["export", "p.star", "--to", "cryosparc", "--out", "out/sel.cs"], capsys)
    assert code == 2 and "sel.csg" in err and not Path("out/sel.cs").exists()
    assert run(["-q", "export", "p.star", "--to", "cryosparc", "--no-csg", "--out", "lone.cs"], capsys)[0] == 0
    assert Path("lone.cs").is_file() and not Path("lone.csg").exists()


# --------------------------------------------------------------------------- a cryoSPARC project through train, infer, export


@pytest.fixture()
def cryosparc_project(formats_dir, tmp_path) -> Path:
    """Project P/ with a 30 px stack in J1/imported/ and J2/particles.cs naming it (the J2 records, paths relative to P/)."""
    project = tmp_path / "P"
    (project / "J1" / "imported").mkdir(parents=True)
    (project / "J2").mkdir()
    shutil.copy(formats_dir / "toy_images_a.mrcs", project / "J1" / "imported" / "toy.mrcs")
    records = read_cryosparc(formats_dir / J2)
    fields = [(n, records.dtype[n]) for n in records.dtype.names if n != "blob/path"] + [("blob/path", "S32")]
    moved = np.zeros(len(records), dtype=fields)
    for name in records.dtype.names:
        if name != "blob/path":
            moved[name] = records[name]
    moved["blob/path"] = b"J1/imported/toy.mrcs"
    moved["blob/idx"] = np.arange(len(records))
    moved["blob/shape"] = 30
    moved["blob/psize_A"] = moved["alignments2D/psize_A"] = 4.0
    with open(project / "J2" / "particles.cs", "wb") as handle:
        np.save(handle, moved)
    return project


def test_a_cs_file_trains_infers_and_goes_back_to_cryosparc(cryosparc_project, tmp_path, capsys, single_thread):
    cs = cryosparc_project / "J2" / "particles.cs"
    code, out, err = run(["info", "--json", "--sample", "4", str(cs)], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["kind"] == "cryosparc" and summary["particles"] == 22 and summary["box_px"] == 30 and summary["pixel_size_angst"] == 4.0
    elsewhere = tmp_path / "elsewhere.cs"
    shutil.copy(cs, elsewhere)
    assert run(["info", "--sample", "0", str(elsewhere)], capsys)[0] == 2  # blob/path is relative to the project folder...
    assert run(["info", "--sample", "0", "--stack-dir", str(cryosparc_project), str(elsewhere)], capsys)[0] == 0  # ...given here
    tiny = ["--preset", "tiny", "--fields", "4", "--gen-hidden", "16", "--fourier-features", "8", "--group", "4",
            "--downsample-to", "16", "--batch-size", "11", "--seed", "3", "--epochs", "1"]
    assert run(["-q", "train", str(cs), *tiny, "--out", str(tmp_path / "run")], capsys)[0] == 0
    out_star = tmp_path / "vae.star"
    code, _, err = run(["-q", "infer", str(tmp_path / "run"), "--no-refine", "--out", str(out_star)], capsys)
    assert code == 0, err
    inferred = ParticleStar(out_star)
    assert inferred.particles[UID_COLUMN].to_numpy().astype(np.uint64).tolist() == np.load(cs)["uid"].tolist()
    keep = inferred.subset(np.arange(0, 22, 2)).write(tmp_path / "every_other.star")
    back = cryosparc_project / "J2" / "selected.cs"
    assert run(["-q", "export", str(keep), "--to", "cryosparc", "--template", str(cs), "--out", str(back)], capsys)[0] == 0
    original, selected = np.load(cs), np.load(back)
    assert selected.dtype == original.dtype and selected["uid"].tolist() == original["uid"][::2].tolist()
    assert np.array_equal(selected["blob/path"], original["blob/path"][::2])
    psi = inferred.particles["rlnAnglePsi"].to_numpy()[::2]
    assert np.allclose(selected["alignments2D/pose"], np.mod(np.radians(psi), 2 * np.pi), atol=1e-6)
    origin = inferred.particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[::2]
    assert np.allclose(selected["alignments2D/shift"], origin / 4.0, atol=1e-5)
    # without the template: infer kept the pvaeCs_ columns, so the same records come back from the STAR alone
    plain = cryosparc_project / "J2" / "selected_plain.cs"
    assert run(["-q", "export", str(keep), "--to", "cryosparc", "--out", str(plain)], capsys)[0] == 0
    assert_same_records(np.load(plain), selected)


# --------------------------------------------------------------------------- errors


def test_bad_cryosparc_and_export_inputs_give_one_line(fixtures_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.cs").write_text("not numpy\n")
    code, _, err = run(["info", str(tmp_path / "text.cs")], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a cryoSPARC .cs file" in err
    passthrough = np.zeros(3, dtype=[("uid", "<u8"), ("location/center_x_frac", "<f4")])
    with open(tmp_path / "passthrough.cs", "wb") as handle:
        np.save(handle, passthrough)
    code, _, err = run(["info", "--no-images", str(tmp_path / "passthrough.cs")], capsys)
    assert code == 2 and "has no blob/path and blob/idx field" in err and "passthrough" in err
    code, _, err = run(["export", str(fixtures_dir / RELION5), "--to", "cryosparc", "--out", "x.star"], capsys)
    assert code == 2 and "writes a .cs file" in err
    code, _, err = run(["export", str(fixtures_dir / RELION5), "--to", "cryosparc", "--template", str(fixtures_dir / J2),
                        "--out", "x.cs"], capsys)
    assert code == 2 and err.count("\n") == 1 and UID_COLUMN in err and not Path("x.cs").exists()
    shutil.copy(fixtures_dir / RELION5, "r5.star")
    code, _, err = run(["export", "r5.star", "--to", "relion", "--out", "r5.star", "--overwrite"], capsys)
    assert code == 2 and "is an input" in err
