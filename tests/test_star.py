"""RELION STAR reading, particle views and writing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from particle_vae.errors import InputFileError, OutputFileError
from particle_vae.io.star import (
    ParticleStar,
    StarHeader,
    image_name,
    make_particle_star,
    read_star,
    scan_star_header,
    write_star,
)

REAL_STARS = ["relion31/relion31.star", "toy_projections/toy_projections.star", "empiar10025_metadata/particles.star", "empiar10025_metadata/ctf_params.star"]

#: every STAR file of tests/data/fixtures, written by its make_fixtures.py (test_the_list_of_fixture_stars_is_complete)
FIXTURE_STARS = ["FinalRefinement-OriginalParticles-PfCRT.star", "empiar10025_ctf_params.star", "empiar10025_particles.star",
                 "relion31.6opticsgroups.star", "relion31.star", "relion5.star", "toy_projections.star"]


def in_reference_data_and_fixtures(names: list[str]) -> list:
    """Parameters ``(folder fixture, name)``: each file of the reference data's cryoem folder (id: its path there,
    skipped without the data), then each fixture STAR (id: fixtures/name, always run)."""
    return ([pytest.param("cryoem_dir", name, id=name) for name in names]
            + [pytest.param("fixtures_dir", name, id=f"fixtures/{name}") for name in FIXTURE_STARS])


def kept_rows(fixtures_dir, name: str) -> int:
    """How many particle rows the fixture ``name`` holds (tests/data/fixtures/manifest.json)."""
    return json.loads((fixtures_dir / "manifest.json").read_text())[name]["rows"]


def made_values(fixtures_dir, name: str) -> dict:
    """The values make_fixtures.py invented for the fixture ``name`` and wrote into it (manifest.json)."""
    return json.loads((fixtures_dir / "manifest.json").read_text())[name]["values"]


def assert_same_blocks(a, b):
    assert list(a.blocks) == list(b.blocks)
    for name in a.blocks:
        x, y = a.blocks[name], b.blocks[name]
        if isinstance(x, pd.DataFrame):
            assert list(x.columns) == list(y.columns), name
            assert x.shape == y.shape, name
            for column in x.columns:
                if pd.api.types.is_numeric_dtype(x[column]):
                    np.testing.assert_array_equal(x[column].to_numpy(float), y[column].to_numpy(float), err_msg=column)
                else:
                    assert x[column].astype(str).tolist() == y[column].astype(str).tolist(), column
        else:
            assert x == y


@pytest.mark.parametrize("folder, name", in_reference_data_and_fixtures(REAL_STARS))
def test_round_trip_keeps_every_block_column_and_row(request, tmp_path, folder, name):
    original = read_star(request.getfixturevalue(folder) / name)
    out = write_star(tmp_path / "copy.star", original)
    assert_same_blocks(original, read_star(out))


def test_relion31_particles_join_optics(cryoem_dir):
    star = ParticleStar(cryoem_dir / "relion31" / "relion31.star")
    assert star.is_relion31 and len(star) == 5
    assert star.pixel_size() == pytest.approx(2.806)
    ctf = star.ctf_parameters()
    assert ctf["voltage"].tolist() == [300.0] * 5
    assert ctf["cs"].iloc[0] == pytest.approx(0.01)
    assert ctf["defocus_u"].iloc[0] == pytest.approx(13108.082418)
    locations = star.image_locations()
    assert [p.name for p in locations.stack_paths] == ["relion31.mrcs"]
    assert locations.image_index.tolist() == [0, 1, 2, 3, 4]


def test_relion30_file_with_unknown_column(fixtures_dir, tmp_path):
    star = ParticleStar(fixtures_dir / "toy_projections.star")
    assert not star.is_relion31 and len(star) == kept_rows(fixtures_dir, "toy_projections.star")
    assert "dummyVariable" in star.particles.columns
    assert star.pixel_size() is None
    upgraded = star.to_relion31(pixel_size=6.0, image_size=30)
    assert upgraded.is_relion31 and upgraded.pixel_size() == 6.0
    assert upgraded.optics["rlnImageSize"].tolist() == [30]
    assert "dummyVariable" in upgraded.particles.columns and "rlnVoltage" not in upgraded.particles.columns
    path = upgraded.write(tmp_path / "up.star")
    again = ParticleStar(path)
    assert again.ctf_parameters()["voltage"].iloc[0] == 300.0
    assert again.particles["dummyVariable"].tolist() == star.particles["dummyVariable"].tolist()


def test_relion30_pixel_size_from_detector_and_magnification(fixtures_dir):
    star = ParticleStar(fixtures_dir / "empiar10025_particles.star")
    assert star.pixel_size() == pytest.approx(3.733333 * 1e4 / 38023.0)


def test_star_without_image_name_is_a_clear_error(fixtures_dir):
    with pytest.raises(InputFileError) as info:
        ParticleStar(fixtures_dir / "empiar10025_ctf_params.star")
    assert "empiar10025_ctf_params.star" in str(info.value) and "rlnImageName" in str(info.value)


def test_missing_stack_names_the_star_and_suggests_stack_dir(fixtures_dir):
    star = ParticleStar(fixtures_dir / "empiar10025_particles.star")
    with pytest.raises(InputFileError, match="--stack-dir"):
        star.image_locations()


def test_image_names_any_padding_and_datadir(tmp_path, fixtures_dir):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(fixtures_dir / "toy_projections.mrcs", data / "stack.mrcs")  # 30 px images, 5 or more of them
    star = make_particle_star(["1@Extract/job1/stack.mrcs", "0002@Extract/job1/stack.mrcs", "000005@Extract/job1/stack.mrcs"], 1.0, 30)
    path = star.write(tmp_path / "p.star")
    with pytest.raises(InputFileError):
        ParticleStar(path).image_locations()
    locations = ParticleStar(path).image_locations(datadir=data)
    assert locations.image_index.tolist() == [0, 1, 4]
    assert locations.stack_paths == [data / "stack.mrcs"]


def test_malformed_image_name(tmp_path):
    path = make_particle_star(["stack.mrcs"], 1.0, 8).write(tmp_path / "bad.star")
    with pytest.raises(InputFileError, match="not of the form N@stack"):
        ParticleStar(path).image_locations()


def test_multiple_optics_groups_join_per_particle(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["a", "b"], "rlnVoltage": [300.0, 200.0],
                           "rlnSphericalAberration": [2.7, 2.0], "rlnAmplitudeContrast": [0.1, 0.07],
                           "rlnImagePixelSize": [1.5, 1.5], "rlnImageSize": [64, 64], "rlnImageDimensionality": [2, 2]})
    particles = pd.DataFrame({"rlnImageName": [image_name(i, "s.mrcs") for i in range(4)], "rlnOpticsGroup": [2, 1, 2, 1],
                              "rlnDefocusU": [1e4] * 4, "rlnDefocusV": [9e3] * 4, "rlnDefocusAngle": [10.0] * 4})
    path = write_star(tmp_path / "g.star", {"optics": optics, "particles": particles})
    ctf = ParticleStar(path).ctf_parameters()
    assert ctf["voltage"].tolist() == [200.0, 300.0, 200.0, 300.0]
    assert ctf["amplitude_contrast"].tolist() == [0.07, 0.1, 0.07, 0.1]


def test_with_columns_adds_and_replaces_and_never_overwrites_input(fixtures_dir, tmp_path):
    source = tmp_path / "in.star"
    shutil.copy(fixtures_dir / "relion31.star", source)
    before = source.read_bytes()
    star = ParticleStar(source)
    n = kept_rows(fixtures_dir, "relion31.star")
    psi = np.linspace(-180, 180, n)
    edited = star.with_columns({"rlnAnglePsi": psi, "pvaeLatent1": np.arange(n) * 0.5})
    with pytest.raises(OutputFileError):
        edited.write(source, overwrite=True)
    assert source.read_bytes() == before
    out = ParticleStar(edited.write(tmp_path / "out.star"))
    columns = list(out.particles.columns)
    assert columns[: len(star.particles.columns)] == list(star.particles.columns)  # order kept, psi replaced in place
    assert columns[-1] == "pvaeLatent1"
    np.testing.assert_allclose(out.particles["rlnAnglePsi"], psi)
    assert out.optics.equals(star.optics)


def test_subset_keeps_optics_and_columns(fixtures_dir, tmp_path):
    star = ParticleStar(fixtures_dir / "relion31.star")
    sub = star.subset([4, 1])
    stack = made_values(fixtures_dir, "relion31.star")["stack"]
    assert sub.particles["rlnImageName"].tolist() == [f"000005@{stack}", f"000002@{stack}"]
    assert sub.optics is star.optics or sub.optics.equals(star.optics)


def test_unparsable_and_missing_star(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        read_star(tmp_path / "none.star")
    empty = tmp_path / "empty.star"
    empty.write_text("# nothing here\n")
    with pytest.raises(InputFileError, match="empty.star"):
        read_star(empty)


def test_floats_are_written_exactly(tmp_path):
    values = np.array([1e-12, 0.1, 12845.582418, -160.39, 2.586789e5, 1 / 3])
    star = make_particle_star([image_name(i, "x.mrcs") for i in range(6)], 1.0, 8, columns={"v": values})
    back = ParticleStar(star.write(tmp_path / "f.star"))
    np.testing.assert_array_equal(back.particles["v"].to_numpy(float), values)


# --------------------------------------------------------------------------- one parser, checked against starfile
# The starfile package (a test dependency) is the independent reference: same blocks, same columns, the same
# values (numbers compared as numbers, text as text) and the same column types.

#: every STAR file of the reference data (test_the_list_of_shipped_stars_is_complete keeps it complete)
SHIPPED_STARS = ["empiar10025_metadata/ctf_params.star", "empiar10025_metadata/particles.star",
                 "formats/FinalRefinement-OriginalParticles-PfCRT.star", "formats/relion31.6opticsgroups.star",
                 "formats/relion5.star", "relion31/relion31.star", "toy_projections/toy_projections.star"]


def assert_same_as_starfile(ours, reference):
    """``ours`` (a StarFile's blocks) equals starfile's reading, block for block."""
    assert list(ours) == list(reference)
    for name, theirs in reference.items():
        mine = ours[name]
        if not isinstance(theirs, pd.DataFrame):
            assert mine == theirs, name
            continue
        assert isinstance(mine, pd.DataFrame) and list(mine.columns) == list(theirs.columns), name
        assert mine.shape == theirs.shape, name
        for column in theirs.columns:
            a, b = mine[column], theirs[column]
            if len(b) == 0:
                continue  # an empty loop: starfile makes every column float64, text columns stay text here
            assert a.dtype.kind == b.dtype.kind or (pd.api.types.is_string_dtype(a) and pd.api.types.is_string_dtype(b)), column
            if pd.api.types.is_numeric_dtype(b):
                np.testing.assert_array_equal(a.to_numpy(np.float64), b.to_numpy(np.float64), err_msg=f"{name}/{column}")
            else:
                assert a.astype(str).tolist() == b.astype(str).tolist(), f"{name}/{column}"


def test_the_list_of_shipped_stars_is_complete(cryoem_dir):
    assert sorted(str(p.relative_to(cryoem_dir)) for p in cryoem_dir.rglob("*.star")) == sorted(SHIPPED_STARS)


def test_the_list_of_fixture_stars_is_complete(fixtures_dir):
    assert sorted(str(p.relative_to(fixtures_dir)) for p in fixtures_dir.rglob("*.star")) == sorted(FIXTURE_STARS)


@pytest.mark.parametrize("folder, name", in_reference_data_and_fixtures(SHIPPED_STARS))
def test_every_shipped_star_reads_as_starfile_reads_it(request, folder, name):
    import starfile

    path = request.getfixturevalue(folder) / name
    ours = read_star(path)
    assert_same_as_starfile(ours.blocks, starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"]))
    # and every column as the text written in the file (what infer uses to write a refinement's poses back byte for byte)
    names = sorted({str(c) for block in ours.blocks.values() if isinstance(block, pd.DataFrame) for c in block.columns})
    assert_same_as_starfile(read_star(path, text_columns=names).blocks, starfile.read(path, always_dict=True, parse_as_string=names))
    # the header scan finds the same particle block and columns, without the rows
    header = scan_star_header(path)
    particles = [block for block, table in ours.blocks.items() if isinstance(table, pd.DataFrame) and "rlnImageName" in table.columns]
    if particles:
        assert header.particles_block == particles[0] and header.has_rows
        assert header.columns == list(ours.blocks[particles[0]].columns)
        assert header.blocks == list(ours.blocks)[: len(header.blocks)] and header.blocks[-1] == particles[0]
    else:
        assert header.particles_block is None and header.columns == [] and header.blocks == list(ours.blocks)


def test_relion30_and_relion5_files_give_their_versions_tables(fixtures_dir):
    relion30 = read_star(fixtures_dir / "FinalRefinement-OriginalParticles-PfCRT.star")
    rows = kept_rows(fixtures_dir, "FinalRefinement-OriginalParticles-PfCRT.star")
    assert list(relion30.blocks) == ["images"] and relion30.blocks["images"].shape == (rows, 22)
    relion5 = read_star(fixtures_dir / "relion5.star")
    assert list(relion5.blocks) == ["optics", "particles"]
    optics, made = relion5.blocks["optics"], made_values(fixtures_dir, "relion5.star")
    assert optics["rlnImageSize"].tolist() == [made["image_size"]] and optics["rlnCtfDataAreCtfPremultiplied"].dtype.kind == "i"
    assert optics["rlnOddZernike"].iloc[0] == made["odd_zernike"] and made["odd_zernike"].startswith("[")  # a bracketed array stays text
    assert relion5.blocks["particles"]["rlnImageName"].iloc[0].endswith("toy_images_a.mrcs")


def _large_star_text(n: int) -> str:
    rows = "\n".join(f"  {i % 997 + 1:06d}@Extract/job{i % 3}/mic{i % 50}.mrcs  {1 + i % 2}  {i * 0.5:.2f}  'a b'  {i}"
                     for i in range(n))
    return ("# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n_rlnImagePixelSize #3\n"
            "_rlnImageSize #4\n1 opticsGroup1 1.5 64\n2 opticsGroup2 1.5 64\n\n\n# version 30001\n\ndata_particles\n\nloop_\n"
            "_rlnImageName #1\n_rlnOpticsGroup #2\n_rlnDefocusU #3\n_rlnNote #4\n_rlnCount #5\n# a comment line\n" + rows + "\n\n")


@pytest.mark.parametrize("n", [10, 30_000])  # 1 kB and 1.9 MB: the reading must not depend on the size
def test_small_and_large_files_read_alike_and_as_starfile_reads_them(tmp_path, n):
    import starfile

    path = tmp_path / "particles.star"
    path.write_text(_large_star_text(n))
    star = read_star(path)
    reference = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"])
    for name in reference:
        pd.testing.assert_frame_equal(star.blocks[name], reference[name])
    particles = star.blocks["particles"]
    assert len(particles) == n and particles["rlnNote"].iloc[0] == "a b" and particles["rlnCount"].dtype.kind == "i"
    assert particles["rlnImageName"].iloc[5] == "000006@Extract/job2/mic5.mrcs"


EDGE_CASES = {
    # key-value block (quoted values with blanks, numbers), then a RELION 3.0 loop (no optics)
    "key-value and loop": ("# written by hand\ndata_general\n\n_rlnImageSizeX 64\n_rlnNote 'x y'\n_rlnScale 1.5e3\n"
                           "_rlnTitle \"hello world\"\n\ndata_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@a.mrcs 10000\n2@a.mrcs 2e4\n"),
    # RELION 3.1: optics + particles, trailing comments, comment rows, quoted and empty strings, nan
    "quotes and comments": ("data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 1.1\n\ndata_particles\nloop_\n"
                            "_rlnImageName #1\n_rlnOpticsGroup #2\n_rlnNote #3\n_rlnV #4\n1@a.mrcs 1 'a b' 1\n"
                            "# a comment row\n2@a.mrcs 1 \"c d\" nan\n3@a.mrcs 1 e 2 # trailing comment\n4@a.mrcs 1 \"\" 3\n"),
    # empty tables (a loop with columns and no rows), one at the end of the file
    "empty tables": ("data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n\n"
                     "data_particles\nloop_\n_rlnImageName #1\n_rlnX #2\n\n"),
    # indented lines, tabs, Windows line ends
    "indented, tabs, CRLF": "  data_p\r\n  loop_\r\n  _rlnImageName #1\r\n\t_rlnX #2\r\n  1@a.mrcs\t1\r\n  2@a.mrcs 2\r\n",
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_read_as_starfile_reads_them(tmp_path, case):
    import starfile

    path = tmp_path / "edge.star"
    path.write_bytes(EDGE_CASES[case].encode())
    ours = read_star(path).blocks
    assert_same_as_starfile(ours, starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"]))
    if case == "key-value and loop":
        assert ours["general"] == {"rlnImageSizeX": 64, "rlnNote": "x y", "rlnScale": 1500.0, "rlnTitle": "hello world"}
        assert ours[""]["rlnDefocusU"].tolist() == [10000.0, 20000.0]
    if case == "quotes and comments":
        assert ours["particles"]["rlnNote"].tolist() == ["a b", "c d", "e", ""]
        assert np.isnan(ours["particles"]["rlnV"].iloc[1])
    if case == "empty tables":
        assert ours["particles"].shape == (0, 2) and list(ours["particles"].columns) == ["rlnImageName", "rlnX"]


def test_comments_between_column_names_and_text_columns(tmp_path):
    path = tmp_path / "c.star"
    path.write_text("data_p\nloop_\n# the columns\n_rlnImageName #1\n\n_rlnAngleRot #2 # degrees\n"
                    "# the rows\n1@a.mrcs 10.50\n2@a.mrcs -0.000\n\ndata_kv\n_rlnKey 0012 # a comment\n")
    star = read_star(path)
    assert star.blocks["p"]["rlnAngleRot"].tolist() == [10.5, 0.0]
    assert star.blocks["kv"] == {"rlnKey": 12}
    text = read_star(path, text_columns=["rlnAngleRot", "rlnKey"])
    assert text.blocks["p"]["rlnAngleRot"].tolist() == ["10.50", "-0.000"] and text.blocks["kv"] == {"rlnKey": "0012"}


@pytest.mark.parametrize("text, message", [
    ("data_p\n_rlnA 1 2\n", "line 2: _rlnA in data_p has 2 values"),
    ("data_p\n_rlnA\n", "line 2: _rlnA in data_p has no value"),
    ("data_p\n1 2 3\n", "line 2 holds a value outside a loop in data_p"),
    ("data_p\nloop_\n1 2\n", "line 3 holds a loop_ without column names in data_p"),
    ("data_p\nloop_\n_rlnA\n1\n_rlnB 2\n", "line 5 has 2 value(s) but the loop of data_p has 1 column(s)"),
    ("data_p\nloop_\n_rlnA\n_rlnB\n1 2\n3\n", "line 6 has 1 value(s) but the loop of data_p has 2 column(s)"),
    ("data_p\nloop_\n_rlnA\n_rlnB\n1 2\n3 4 5\n", "line 6 has 3 value(s) but the loop of data_p has 2 column(s)"),
    ("data_p\n_rlnA 1\nloop_\n_rlnB\n1\n", "line 3 holds a loop_ after key-value pairs in data_p"),
    ("data_p\nloop_\n_rlnA\nloop_\n_rlnB\n1\n", "line 4 holds a second loop_ in data_p"),
    ("data_p\nloop_\n", "the loop_ of data_p has no column names"),
])
def test_broken_files_give_one_line_errors_naming_the_line(tmp_path, text, message):
    path = tmp_path / "broken.star"
    path.write_text(text)
    with pytest.raises(InputFileError) as info:
        read_star(path)
    assert message in str(info.value) and "broken.star" in str(info.value) and "\n" not in str(info.value)


def test_header_scan_stops_at_the_first_particle_row(tmp_path):
    path = tmp_path / "scan.star"
    path.write_text(_large_star_text(5) + "this line is not STAR \x00 at all\n")
    header = scan_star_header(path)
    assert header == StarHeader(["optics", "particles"], "particles",
                                ["rlnImageName", "rlnOpticsGroup", "rlnDefocusU", "rlnNote", "rlnCount"], has_rows=True)
    empty = tmp_path / "empty.star"
    empty.write_text(EDGE_CASES["empty tables"])
    assert scan_star_header(empty) == StarHeader(["optics", "particles"], "particles", ["rlnImageName", "rlnX"], has_rows=False)
    no_particles = tmp_path / "ctf.star"
    no_particles.write_text("data_kv\n_rlnA 1\n\ndata_ctf\nloop_\n_rlnDefocusU\n" + "1.0\n" * 50)
    assert scan_star_header(no_particles) == StarHeader(["kv", "ctf"], None, [], has_rows=False)
    # a large table without rlnImageName is not read to its end
    assert scan_star_header(no_particles, max_skipped_lines=10) == StarHeader(["kv", "ctf"], None, [], has_rows=False)
    late = tmp_path / "late.star"
    late.write_text(no_particles.read_text() + "data_particles\nloop_\n_rlnImageName\n1@a.mrcs\n")
    assert scan_star_header(late).particles_block == "particles"
    assert scan_star_header(late, max_skipped_lines=10).particles_block is None


def test_vectorised_image_name_split_matches_the_regular_expression(tmp_path):
    from particle_vae.io.star import _IMAGE_NAME_RE, _split_image_names

    names = pd.Series([" 12@ a.mrcs", "0003@dir/b.mrcs ", "7@a.mrcs", "1@x@y.mrcs"], dtype=str)
    numbers, codes, stacks = _split_image_names(names)
    assert numbers.tolist() == [12, 3, 7, 1] and codes.tolist() == [0, 1, 0, 2] and stacks == ["a.mrcs", "dir/b.mrcs", "x@y.mrcs"]
    expected = names.str.extract(_IMAGE_NAME_RE)
    assert expected[0].astype(int).tolist() == numbers.tolist()
    for bad in (["1@a", "b.mrcs"], ["x@a"], ["2@"], ["@a"]):
        assert _split_image_names(pd.Series(bad, dtype=str)) is None, bad
        assert _split_image_names(pd.Series(bad, dtype=object)) is None, bad
    # a 200,000-row STAR resolves its stacks quickly and without a Python object per row
    rows = 200_000
    star = make_particle_star([image_name(i % 1000, f"s{i // 1000}.mrcs") for i in range(rows)], 1.0, 8)
    for s in range(rows // 1000):
        (tmp_path / f"s{s}.mrcs").touch()
    path = star.write(tmp_path / "many.star")
    locations = ParticleStar(path).image_locations()
    assert len(locations.stack_paths) == 200 and locations.image_index[-1] == 999 and locations.stack_index[-1] == 199


def test_a_byte_order_mark_before_data_is_not_text(tmp_path):
    """Some Windows editors save UTF-8 with a byte-order mark; the first block must still be found."""
    text = "data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n1@a.mrcs 10000.0\n2@a.mrcs 12000.0\n"
    path = tmp_path / "bom.star"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    table = read_star(path).blocks["particles"]
    assert list(table.columns) == ["rlnImageName", "rlnDefocusU"] and table["rlnDefocusU"].tolist() == [10000.0, 12000.0]
    assert scan_star_header(path).columns[:2] == ["rlnImageName", "rlnDefocusU"]
