"""End to end on an easy simulated two-protein mixture: simulate -> train -> infer -> analyze.

The mixture: T20S proteasome (PDB 3J9I, class 1) and GroEL 14-mer (PDB 1OEL +
BIOMT, class 2), 1,200 particles, 32 px at 8 A, no CTF, SNR 10, shifts up
to 3 px, ``--views top`` (rot = tilt = 0, psi
uniform). In the two models' own frames this shows GroEL down its 7-fold axis
(a ring about 14 nm across) and T20S from the side (3J9I's barrel axis lies
in the model's xy-plane: a 15 x 11 nm rectangle with four stripes), as on a
grid where each complex lies in one preferred orientation. The two shapes
differ clearly, so this is an honestly easy case: a working pipeline must
separate them almost perfectly. (With uniform 3D views the latent mostly
encodes the view, not the protein: see docs/benchmarks.md.)

What is checked, against the simulator's ground truth:

* ``analyze --k 2 --method gmm`` classes match the proteins for more than 95%
  of particles (k-means, which assumes round clusters, does worse on the
  elongated T20S cloud of latents: see docs/benchmarks.md);
* each class average is centred (centre of mass within 1 px of the box centre;
  ``analyze`` centres averages on their centre of mass, so this checks that the
  step ran, and the correlation below, taken without any shift search, checks
  that the centre agrees with the truth's) and sharp: at the best single rotation it correlates with the true centred
  projection of its protein (``centred.mrcs``) above 0.85;
* the T20S average (the asymmetric shape) is upright: it keeps more than 80%
  of the truth's anisotropy (``metrics.anisotropy``: the share of contrast that
  changes with rotation), and it lies in the generator's frame: its best
  rotation onto the decoded cluster centre (pose zero) is within 15 degrees of
  0 modulo 180 (the side view's 2-fold symmetry). The same particles averaged
  with their angles shuffled inside the class blur towards a disc: they keep
  less than 30% of the anisotropy, so the check has teeth (their plain
  correlation with the truth stays high, 0.82-0.85, because the isotropic
  part dominates: hence the anisotropy measure). (The GroEL ring is nearly round at 8 A, so only its
  centring and overall match are tested.)

The CTF is left out (``--no-ctf``): with it (defocus 1.4-2.0 um) similar
training reached 91-94% and blurred T20S averages, see docs/benchmarks.md.

Seeds (docs/benchmarks.md, "The result depends on the training trajectory"):
with TARGET-VAE's sub-pixel offset, which new runs leave out since 2026-12-06
(``--subpixel``, docs/models.md), seeds 0-4 gave 97-98%, 100%, 61%, 100% and
99.9%: seed 2's latent stopped carrying the protein, and no learning rate,
gradient clipping or latent size made every seed pass. Without it all five
give 100%. The poses checked are the ones ``infer`` writes by default, refined
against class references seeded by the model's readout, every class then
turned into the generator's frame (docs/training.md). That last step is what
the 80% tests: without it the T20S classes of one run sat in two frames about
120 degrees apart and their average kept 0.62 of the anisotropy (seed 0; in a
CI pass with AVX2 kernels 0.44-0.47), with it 0.96, as much as the particles
averaged with their true angles (0.93). The model's own poses (``--no-refine``)
of seed 0 keep 0.43-0.45. The suite trains seed 0;
``PARTICLE_VAE_MIXTURE_SEEDS=0,1,2,3,4 python -m pytest tests/test_mixture.py``
runs every check for each of the five seeds.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from particle_vae import cli
from particle_vae.analysis.metrics import anisotropy, clustering_accuracy, image_centre_of_mass, rotational_correlation
from particle_vae.conventions import undo_relion_pose
from particle_vae.io.mrc import MRCStack
from particle_vae.io.star import ParticleStar

N_PARTICLES = 1200
SIMULATE = ["--n", str(N_PARTICLES), "--box", "32", "--pixel-size", "8", "--views", "top", "--snr", "10", "--no-ctf",
            "--write-clean", "--seed", "0", "--no-progress"]
TRAIN = ["--preset", "tiny", "--batch-size", "16", "--epochs", "6"]
#: training seeds to run (module docstring): the suite's is 0; PARTICLE_VAE_MIXTURE_SEEDS=0,1,2,3,4 runs five
TRAINING_SEEDS = [int(seed) for seed in os.environ.get("PARTICLE_VAE_MIXTURE_SEEDS", "0").split(",")]
SHARPNESS = 0.85
UPRIGHT = 0.8  # share of the truth's anisotropy kept by the T20S average


@pytest.fixture(scope="module", params=TRAINING_SEEDS, ids=lambda seed: f"seed{seed}")
def mixture(request, tmp_path_factory, data_root):
    """Simulated mixture, a small model trained on it, its inferred STAR and the analysis.

    Trained on one torch thread whatever the test order: the outcome depends on the
    training trajectory, which depends (slightly) on the number of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _make_mixture(tmp_path_factory, data_root, request.param)
    finally:
        torch.set_num_threads(threads)


def _make_mixture(tmp_path_factory, data_root, seed: int):
    root = tmp_path_factory.mktemp(f"easy_mixture_seed{seed}")
    structures = data_root / "structures"
    sim = root / "sim"
    assert cli.main(["-q", "simulate", "--structure", str(structures / "t20s_3j9i.pdb"), str(structures / "groel_1oel.pdb"),
                     *SIMULATE, "--data-dir", str(data_root), "--out", str(sim)]) == 0
    run = root / "run"
    assert cli.main(["-q", "train", str(sim / "particles.star"), *TRAIN, "--seed", str(seed), "--out", str(run)]) == 0
    star = root / "particles_vae.star"
    # the poses users get: refined against class references seeded by the model's readout, in the model's frame
    assert cli.main(["-q", "infer", str(run), "--out", str(star)]) == 0
    out = root / "analysis"
    assert cli.main(["-q", "analyze", str(star), "--run", str(run), "--k", "2", "--method", "gmm", "--gallery", "0",
                     "--out", str(out)]) == 0
    clustered = ParticleStar(out / "clustered_particles.star").particles
    return {"sim": sim, "run": run, "out": out, "particles": clustered, "inferred": ParticleStar(star).particles,
            "truth": clustered["pvaeTrueClass"].to_numpy(), "classes": clustered["rlnClassNumber"].to_numpy(),
            "record": json.loads((out / "analysis.json").read_text())}


def _protein_of(mixture, number: int) -> int:
    return int(np.bincount(mixture["truth"][mixture["classes"] == number]).argmax())


def _truth_projection(mixture, protein: int) -> np.ndarray:
    first = int(np.flatnonzero(mixture["truth"] == protein)[0])  # top views: one projection per protein
    return MRCStack(mixture["sim"] / "centred.mrcs").read(first, first + 1)[0]


def test_clusters_match_the_two_proteins(mixture):
    accuracy = clustering_accuracy(mixture["truth"], mixture["classes"])
    assert accuracy > 0.95, accuracy
    assert {_protein_of(mixture, 1), _protein_of(mixture, 2)} == {1, 2}


def _t20s_class(mixture) -> int:
    return next(j for j in (1, 2) if _protein_of(mixture, j) == 1)


def _kept_anisotropy(average, truth) -> float:
    """Share of the truth's anisotropy that an average keeps."""
    return anisotropy(average) / anisotropy(truth)


def test_class_averages_are_centred_and_sharp(mixture):
    averages = MRCStack(mixture["out"] / "class_averages.mrcs").read(0, 2)
    assert mixture["record"]["averages"]["centred"] is True
    for number in (1, 2):
        protein = _protein_of(mixture, number)
        assert np.hypot(*image_centre_of_mass(averages[number - 1])) < 1.0
        _, correlation = rotational_correlation(averages[number - 1], _truth_projection(mixture, protein))
        assert correlation.max() > SHARPNESS, (number, protein, correlation.max())


def test_t20s_average_is_upright_in_the_generator_frame(mixture):
    number = _t20s_class(mixture)
    average = MRCStack(mixture["out"] / "class_averages.mrcs").read(number - 1, number)[0]
    decoded = MRCStack(mixture["out"] / "cluster_centres.mrcs").read(number - 1, number)[0]
    assert _kept_anisotropy(average, _truth_projection(mixture, 1)) > UPRIGHT
    angles, correlation = rotational_correlation(average, decoded)
    best = angles[correlation.argmax()] % 180.0
    assert min(best, 180.0 - best) < 15.0, angles[correlation.argmax()]


def test_shuffled_angles_fail_the_upright_check(mixture):
    """The T20S class's particles averaged with their psi shuffled blur towards a disc."""
    particles = mixture["particles"]
    rows = np.flatnonzero(mixture["classes"] == _t20s_class(mixture))
    images = torch.as_tensor(MRCStack(mixture["sim"] / "particles.mrcs").read(0, N_PARTICLES)[rows], dtype=torch.float64)
    psi = particles["rlnAnglePsi"].to_numpy()[rows]
    origin = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[rows]
    apix = float(mixture["record"]["averages"]["pixel_size"])
    truth = _truth_projection(mixture, 1)

    def scores(psi_used) -> tuple[float, float]:
        average = undo_relion_pose(images, psi_used, origin, apix).mean(0).numpy()
        return _kept_anisotropy(average, truth), float(rotational_correlation(average, truth)[1].max())

    kept, correlation = scores(psi)
    assert kept > UPRIGHT and correlation > SHARPNESS
    kept, _ = scores(np.random.default_rng(0).permutation(psi))
    assert kept < 0.3


def test_inferred_origins_follow_the_true_particle_centres(mixture):
    """``infer``'s origins, found against class references centred on their centre of mass,
    follow the true shifts, where the model's own origins, relative to a generator that draws its
    object off-centre, did not (Pearson -0.11 and -0.13 in an early version)."""
    inferred = mixture["inferred"]
    for axis in ("X", "Y"):
        r = np.corrcoef(inferred[f"rlnOrigin{axis}Angst"], inferred[f"pvaeTrueOrigin{axis}Angst"])[0, 1]
        assert r > 0.7, (axis, r)
