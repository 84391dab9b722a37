"""RELION STAR reading, particle views and writing."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from particle_vae.errors import InputFileError, OutputFileError
from particle_vae.io.star import ParticleStar, image_name, make_particle_star, read_star, write_star

REAL_STARS = ["relion31/relion31.star", "toy_projections/toy_projections.star", "empiar10025_metadata/particles.star", "empiar10025_metadata/ctf_params.star"]


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


@pytest.mark.parametrize("name", REAL_STARS)
def test_round_trip_keeps_every_block_column_and_row(cryoem_dir, tmp_path, name):
    original = read_star(cryoem_dir / name)
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


def test_relion30_file_with_unknown_column(cryoem_dir, tmp_path):
    star = ParticleStar(cryoem_dir / "toy_projections" / "toy_projections.star")
    assert not star.is_relion31 and len(star) == 1000
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


def test_relion30_pixel_size_from_detector_and_magnification(cryoem_dir):
    star = ParticleStar(cryoem_dir / "empiar10025_metadata" / "particles.star")
    assert star.pixel_size() == pytest.approx(3.733333 * 1e4 / 38023.0)


def test_star_without_image_name_is_a_clear_error(cryoem_dir):
    with pytest.raises(InputFileError) as info:
        ParticleStar(cryoem_dir / "empiar10025_metadata" / "ctf_params.star")
    assert "ctf_params.star" in str(info.value) and "rlnImageName" in str(info.value)


def test_missing_stack_names_the_star_and_suggests_stack_dir(cryoem_dir):
    star = ParticleStar(cryoem_dir / "empiar10025_metadata" / "particles.star")
    with pytest.raises(InputFileError, match="--stack-dir"):
        star.image_locations()


def test_image_names_any_padding_and_datadir(tmp_path, cryoem_dir):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(cryoem_dir / "relion31" / "relion31.mrcs", data / "stack.mrcs")
    star = make_particle_star(["1@Extract/job1/stack.mrcs", "0002@Extract/job1/stack.mrcs", "000005@Extract/job1/stack.mrcs"], 1.0, 256)
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


def test_with_columns_adds_and_replaces_and_never_overwrites_input(cryoem_dir, tmp_path):
    source = tmp_path / "in.star"
    shutil.copy(cryoem_dir / "relion31" / "relion31.star", source)
    before = source.read_bytes()
    star = ParticleStar(source)
    psi = np.linspace(-180, 180, 5)
    edited = star.with_columns({"rlnAnglePsi": psi, "pvaeLatent1": np.arange(5) * 0.5})
    with pytest.raises(OutputFileError):
        edited.write(source, overwrite=True)
    assert source.read_bytes() == before
    out = ParticleStar(edited.write(tmp_path / "out.star"))
    columns = list(out.particles.columns)
    assert columns[: len(star.particles.columns)] == list(star.particles.columns)  # order kept, psi replaced in place
    assert columns[-1] == "pvaeLatent1"
    np.testing.assert_allclose(out.particles["rlnAnglePsi"], psi)
    assert out.optics.equals(star.optics)


def test_subset_keeps_optics_and_columns(cryoem_dir, tmp_path):
    star = ParticleStar(cryoem_dir / "relion31" / "relion31.star")
    sub = star.subset([4, 1])
    assert sub.particles["rlnImageName"].tolist() == ["000005@relion31.mrcs", "000002@relion31.mrcs"]
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


# --------------------------------------------------------------------------- large files (fast reader, vectorised names)


def _large_star_text(n: int) -> str:
    rows = "\n".join(f"  {i % 997 + 1:06d}@Extract/job{i % 3}/mic{i % 50}.mrcs  {1 + i % 2}  {i * 0.5:.2f}  'a b'  {i}"
                     for i in range(n))
    return ("# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n_rlnImagePixelSize #3\n"
            "_rlnImageSize #4\n1 opticsGroup1 1.5 64\n2 opticsGroup2 1.5 64\n\n\n# version 30001\n\ndata_particles\n\nloop_\n"
            "_rlnImageName #1\n_rlnOpticsGroup #2\n_rlnDefocusU #3\n_rlnNote #4\n_rlnCount #5\n# a comment line\n" + rows + "\n\n")


def test_large_files_are_read_by_the_fast_reader_with_starfile_s_result(tmp_path, monkeypatch):
    import starfile

    from particle_vae.io import star as star_module

    path = tmp_path / "large.star"
    path.write_text(_large_star_text(30_000))
    assert path.stat().st_size >= star_module.FAST_READ_BYTES
    calls = []
    real_fast = star_module._read_star_fast
    monkeypatch.setattr(star_module, "_read_star_fast", lambda *a, **k: calls.append(1) or real_fast(*a, **k))
    fast = read_star(path)
    assert calls, "the fast reader was not used"
    reference = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"])
    assert list(fast.blocks) == list(reference) == ["optics", "particles"]
    for name in reference:
        pd.testing.assert_frame_equal(fast.blocks[name], reference[name])
    particles = fast.blocks["particles"]
    assert particles["rlnNote"].iloc[0] == "a b" and particles["rlnCount"].dtype.kind == "i"
    assert particles["rlnImageName"].iloc[5] == "000006@Extract/job2/mic5.mrcs"


def test_fast_reader_leaves_key_value_blocks_to_starfile(tmp_path):
    from particle_vae.io.star import _read_star_fast

    path = tmp_path / "kv.star"
    path.write_text("data_general\n\n_rlnImageSizeX 64\n_rlnNote 'x y'\n\n" + _large_star_text(10))
    assert _read_star_fast(path) is None
    star = read_star(path)
    assert star.blocks["general"]["rlnImageSizeX"] == 64 and len(star.blocks["particles"]) == 10


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
