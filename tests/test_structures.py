"""PDB reading, BIOMT assemblies, atoms -> density, map resampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from particle_vae.data import structures as S
from particle_vae.errors import InputFileError
from particle_vae.io.mrc import write_map


def _atom(serial, name4, resname, chain, resseq, xyz, element="", record="ATOM", altloc=" "):
    """A fixed-column PDB ATOM/HETATM line (element in columns 77-78)."""
    x, y, z = xyz
    return (f"{record:<6}{serial:>5} {name4}{altloc}{resname:>3} {chain}{resseq:>4}    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{0.0:6.2f}          {element:>2}")


TOY_PDB = "\n".join([
    "HEADER    TOY",
    "REMARK 350 BIOMOLECULE: 1",
    "REMARK 350 APPLY THE FOLLOWING TO CHAINS: A,",
    "REMARK 350                    AND CHAINS: B",
    "REMARK 350   BIOMT1   1  1.000000  0.000000  0.000000        0.00000",
    "REMARK 350   BIOMT2   1  0.000000  1.000000  0.000000        0.00000",
    "REMARK 350   BIOMT3   1  0.000000  0.000000  1.000000        0.00000",
    "REMARK 350   BIOMT1   2 -1.000000  0.000000  0.000000       10.00000",
    "REMARK 350   BIOMT2   2  0.000000 -1.000000  0.000000        0.00000",
    "REMARK 350   BIOMT3   2  0.000000  0.000000  1.000000        0.00000",
    "MODEL        1",
    _atom(1, " N  ", "ALA", "A", 1, (1.0, 2.0, 3.0), "N"),
    _atom(2, " CA ", "ALA", "A", 1, (2.0, 2.0, 3.0), ""),          # element from the name: C, not Ca
    _atom(3, " SD ", "MET", "A", 2, (3.0, 2.0, 3.0), "S", altloc="A"),
    _atom(4, " SD ", "MET", "A", 2, (3.5, 2.0, 3.0), "S", altloc="B"),  # second altloc: dropped
    _atom(5, " O  ", "GLY", "B", 1, (0.0, 0.0, 0.0), "O"),
    _atom(6, "FE  ", "HEM", "B", 2, (5.0, 5.0, 5.0), "", record="HETATM"),  # element from name: Fe
    _atom(7, " O  ", "HOH", "B", 3, (9.0, 9.0, 9.0), "O", record="HETATM"),  # water
    _atom(8, " C  ", "ALA", "C", 1, (7.0, 7.0, 7.0), "C"),  # chain C is not in the biomolecule
    "ENDMDL",
    "MODEL        2",
    _atom(1, " N  ", "ALA", "A", 1, (99.0, 99.0, 99.0), "N"),
    "ENDMDL",
    "END",
]) + "\n"


@pytest.fixture()
def toy_pdb(tmp_path):
    path = tmp_path / "toy.pdb"
    path.write_text(TOY_PDB)
    return path


def test_toy_pdb_records_elements_altlocs_models_and_water(toy_pdb):
    model = S.read_pdb(toy_pdb)
    assert len(model) == 6  # N, CA, SD(A), O, FE, C; no altloc B, water or model 2
    assert list(model.elements) == ["N", "C", "S", "O", "FE", "C"]
    assert list(model.weights) == [7, 6, 16, 8, 26, 6]
    assert model.chain_ids == ["A", "B", "C"]
    assert model.hetero.tolist() == [False, False, False, False, True, False]
    assert len(S.read_pdb(toy_pdb, include_water=True)) == 7
    assert len(S.read_pdb(toy_pdb, include_hetatm=False)) == 5
    groups = model.assemblies[1]
    assert len(groups) == 1 and groups[0].chains == ["A", "B"] and groups[0].operator_ids == [1, 2]


def test_toy_assembly_applies_biomt_to_listed_chains(toy_pdb):
    model = S.read_pdb(toy_pdb)
    full = S.expand_assembly(model)
    assert len(full) == 2 * 5  # chains A and B (5 atoms) twice; chain C dropped
    assert sorted(set(full.chains)) == ["A", "A_2", "B", "B_2"]
    copy = full.coords[full.chains == "A_2"]
    original = full.coords[full.chains == "A"]
    np.testing.assert_allclose(copy, np.stack([10 - original[:, 0], -original[:, 1], original[:, 2]], axis=1))
    with pytest.raises(InputFileError, match="biomolecule 3"):
        S.expand_assembly(model, biomolecule=3)


def test_groel_asymmetric_unit_and_14mer(structures_dir):
    model = S.read_pdb(structures_dir / "groel_1oel.pdb")
    assert len(model) == 26929  # protein atoms; the 149 waters are left out
    assert len(S.read_pdb(structures_dir / "groel_1oel.pdb", include_water=True)) == 26929 + 149
    assert model.chain_ids == list("ABCDEFG")
    assembly = S.expand_assembly(model)
    assert len(assembly.chain_ids) == 14 and len(assembly) == 2 * 26929
    # The second ring is the two-fold image (x, -y, -z) of the first.
    second = assembly.coords[assembly.chains == "A_2"]
    first = assembly.coords[assembly.chains == "A"]
    np.testing.assert_allclose(second, first * np.array([1, -1, -1]), atol=1e-9)


def test_t20s_model_has_28_chains(structures_dir):
    model = S.read_pdb(structures_dir / "t20s_3j9i.pdb")
    assert len(model) == 46228 and len(model.chain_ids) == 28
    assembly = S.expand_assembly(model)  # the 28-mer is the deposited model (identity operator)
    assert len(assembly) == 46228 and len(assembly.chain_ids) == 28
    assert set(model.elements) == {"C", "N", "O", "S"}


def test_density_centre_of_mass_is_the_box_centre_and_mass_is_kept(structures_dir):
    model = S.read_pdb(structures_dir / "t20s_3j9i.pdb")
    for box in (48, 49):
        volume = S.atoms_to_density(model.coords, model.weights, box, 5.5)
        assert volume.shape == (box, box, box) and volume.dtype == np.float32
        np.testing.assert_allclose(S.centre_of_mass(volume, positive_only=False), [box // 2] * 3, atol=0.02)
        assert volume.sum() == pytest.approx(model.weights.sum(), rel=1e-4)


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.25])
def test_single_atom_blur_has_the_resolution_sigma(frac):
    # sigma = resolution / (pi sqrt 2); trilinear splatting of an atom at fractional offset f
    # adds f (1 - f) to the variance, and the Gaussian is narrowed by the mean splat variance 1/6.
    box, apix, resolution = 40, 1.0, 2.0 * math.pi * math.sqrt(2)  # sigma = 2 px
    coords = np.array([[frac, frac, frac]])
    volume = S.atoms_to_density(coords, np.array([6.0]), box, apix, resolution, centre=False).astype(np.float64)
    idx = np.arange(box) - box // 2
    profile = volume.sum(axis=(0, 1))  # along x
    mean = (profile * idx).sum() / profile.sum()
    var = (profile * (idx - mean) ** 2).sum() / profile.sum()
    assert mean == pytest.approx(frac, abs=1e-6)
    assert var == pytest.approx(4.0 - 1 / 6 + frac * (1 - frac), rel=1e-3)
    assert S.resolution_sigma(10.0) == pytest.approx(10 / (math.pi * math.sqrt(2)))


def test_structure_too_large_for_the_box_is_an_input_error(toy_pdb):
    model = S.read_pdb(toy_pdb)
    with pytest.raises(InputFileError) as info:
        S.atoms_to_density(model.coords * 20, model.weights, 16, 1.0, path=toy_pdb)
    assert str(toy_pdb) in str(info.value) and "--box" in str(info.value)


def test_pdb_without_atoms_missing_and_cif_are_input_errors(tmp_path):
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    NOTHING\nREMARK   2 NO COORDINATES\nEND\n")
    with pytest.raises(InputFileError) as info:
        S.read_pdb(empty)
    assert str(empty) in str(info.value) and "ATOM" in str(info.value)
    with pytest.raises(InputFileError, match="not found"):
        S.load_density(tmp_path / "missing.pdb", 2.0, 32)
    cif = tmp_path / "model.cif"
    cif.write_text("data_x\n")
    with pytest.raises(InputFileError, match="mmCIF"):
        S.load_density(cif, 2.0, 32)
    other = tmp_path / "model.xyz"
    other.write_text("1\n")
    with pytest.raises(InputFileError, match="unknown structure format"):
        S.load_density(other, 2.0, 32)


def _blob(n, voxel, centre_xyz, sigma_angst):
    idx = np.arange(n)
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    r2 = ((x - centre_xyz[0]) ** 2 + (y - centre_xyz[1]) ** 2 + (z - centre_xyz[2]) ** 2) * voxel ** 2
    return np.exp(-r2 / (2 * sigma_angst ** 2)).astype(np.float32)


@pytest.mark.parametrize("voxel,pixel,box", [(2.0, 3.0, 32), (2.0, 1.0, 64), (2.0, 4.0, 16)])
def test_map_resampling_keeps_physical_position_and_width(tmp_path, voxel, pixel, box):
    n = 40
    offset_vox = np.array([3.0, 0.0, -2.0])  # (x, y, z) from the centre voxel n // 2
    path = tmp_path / "blob.mrc"
    write_map(path, _blob(n, voxel, n // 2 + offset_vox, 6.0), voxel)
    volume = S.load_density(path, pixel, box)
    assert volume.shape == (box, box, box)
    expected = box // 2 + offset_vox * voxel / pixel
    np.testing.assert_allclose(S.centre_of_mass(volume), expected, atol=0.02)
    profile = np.clip(volume, 0, None).astype(np.float64).sum(axis=(0, 1))
    idx = np.arange(box)
    mean = (profile * idx).sum() / profile.sum()
    sigma = math.sqrt((profile * (idx - mean) ** 2).sum() / profile.sum()) * pixel
    assert sigma == pytest.approx(6.0, rel=0.03)
    # the resampled map is the same Gaussian sampled on the new grid (same height, same place)
    np.testing.assert_allclose(volume, _blob(box, pixel, expected, 6.0), atol=2e-3)


def test_experimental_map_loads_and_recentres(structures_dir):
    path = structures_dir / "groel_emd1080.mrc"
    same = S.load_density(path, 2.7, 100)
    raw, _ = __import__("particle_vae.io.mrc", fromlist=["read_map"]).read_map(path)
    np.testing.assert_allclose(same, raw, atol=1e-4 * float(np.abs(raw).max()))
    half = S.load_density(path, 5.4, 50)
    com_raw = (S.centre_of_mass(raw) - 50) * 2.7
    com_half = (S.centre_of_mass(half) - 25) * 5.4
    np.testing.assert_allclose(com_half, com_raw, atol=0.5)
    centred = S.load_density(structures_dir / "t20s_3j9i_5A.mrc", 5.0, 75, centre=True)
    np.testing.assert_allclose(S.centre_of_mass(centred), [37, 37, 37], atol=0.05)


def test_load_density_from_pdb_expands_the_assembly(structures_dir):
    path = structures_dir / "groel_1oel.pdb"
    ring = S.load_density(path, 8.0, 32, assembly=False)
    full = S.load_density(path, 8.0, 32)
    assert full.sum() == pytest.approx(2 * ring.sum(), rel=1e-3)
    # the 14-mer is taller (z) than one ring
    def z_extent(v):
        profile = v.sum(axis=(1, 2))
        return np.count_nonzero(profile > 0.05 * profile.max())
    assert z_extent(full) > 1.5 * z_extent(ring)
